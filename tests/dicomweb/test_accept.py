import pytest

from gateway.dicomweb.accept import Offer, negotiate, parse_accept
from gateway.errors import NotAcceptable, RequestError

JPEG = Offer("image/jpeg", "1.2.840.10008.1.2.4.50")
JPEG_AS_OCTETS = Offer("application/octet-stream", "1.2.840.10008.1.2.4.50")
NATIVE = Offer("application/octet-stream", "1.2.840.10008.1.2.1")


def pick(accept, offers, default="application/octet-stream"):
    return negotiate(parse_accept(accept), offers, default)


def test_ohif_frame_request_with_unquoted_type_takes_stored_syntax():
    accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    assert pick(accept, [JPEG, JPEG_AS_OCTETS]) == JPEG_AS_OCTETS


def test_octet_stream_without_syntax_means_explicit_little_endian():
    assert pick('multipart/related; type="application/octet-stream"', [NATIVE]) == NATIVE
    with pytest.raises(NotAcceptable, match="transcoding"):
        pick('multipart/related; type="application/octet-stream"', [JPEG, JPEG_AS_OCTETS])


def test_q_values_order_the_ranges():
    accept = (
        'multipart/related; type="application/octet-stream"; transfer-syntax=*; q=0.5, '
        'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50; q=0.9'
    )
    assert pick(accept, [JPEG_AS_OCTETS, JPEG]) == JPEG


def test_q_zero_excludes_a_range():
    with pytest.raises(NotAcceptable):
        pick('multipart/related; type="image/jpeg"; transfer-syntax=*; q=0', [JPEG])


def test_image_jpeg_without_syntax_means_jpeg_lossless_by_default():
    # PS3.18 Table 8.7.3-5: the default for image/jpeg is 1.2.840.10008.1.2.4.70.
    with pytest.raises(NotAcceptable):
        pick('multipart/related; type="image/jpeg"', [JPEG])


def test_no_accept_header_takes_the_first_offer():
    assert pick(None, [JPEG, JPEG_AS_OCTETS]) == JPEG


def test_quoted_parameters_may_hold_separators():
    (media_range,) = parse_accept('multipart/related; type="application/dicom; x=1"')
    assert media_range.params["type"] == "application/dicom; x=1"


@pytest.mark.parametrize("header", ["garbage", "multipart/related; q=high"], ids=["no-slash", "bad-q"])
def test_malformed_accept_is_a_400(header):
    with pytest.raises(RequestError):
        parse_accept(header)
