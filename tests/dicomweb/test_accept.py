import io

import anyio
import pydicom
import pytest

from gateway.dicomweb.accept import Offer, negotiate, parse_accept
from gateway.dicomweb.retrieve import _as_explicit_little_endian, _instance_offers
from gateway.errors import NotAcceptable, RequestError, SourceError
from gateway.types import InstanceFile
from tests.conftest import fixture_files

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


# -- an instance whose syntax its source has not said (a DIMSE PACS before its first retrieval) ---

UNKNOWN_SYNTAX = InstanceFile(
    "pacs", "/studies/1.2/series/1.2.3/instances/1.2.3.4", 0, None, "1.2.3.4", "remote"
)
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    "accept,syntax",
    [
        ('multipart/related; type="application/dicom"', EXPLICIT_LE),  # dicomweb-client's default
        ("multipart/related; type=application/dicom", EXPLICIT_LE),
        (f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}', EXPLICIT_LE),
        ("multipart/related", EXPLICIT_LE),
        ('multipart/related; type="application/dicom"; transfer-syntax=*', "*"),
        (None, "*"),
        ("*/*", "*"),
    ],
    ids=lambda v: str(v),
)
def test_an_instance_of_unknown_syntax_is_offered_as_explicit_little_endian_when_asked(accept, syntax):
    # PS3.18 Table 8.7.3-5: application/dicom without a transfer-syntax means Explicit VR Little
    # Endian; naming no syntax must behave as naming that one.
    chosen = negotiate(parse_accept(accept), _instance_offers(UNKNOWN_SYNTAX), "application/dicom")
    assert chosen == Offer("application/dicom", syntax)


def test_an_instance_of_unknown_syntax_is_not_promised_in_a_compressed_syntax():
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    with pytest.raises(NotAcceptable):
        negotiate(parse_accept(accept), _instance_offers(UNKNOWN_SYNTAX), "application/dicom")


def _fixture(name: str) -> bytes:
    return next(p for p in fixture_files() if p.name == name).read_bytes()


def _syntax(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_an_instance_that_came_as_explicit_little_endian_is_passed_on_untouched():
    data = _fixture("s01_ct_explicit_vr_le_01.dcm")
    assert anyio.run(_as_explicit_little_endian, data, UNKNOWN_SYNTAX) is data


@pytest.mark.parametrize(
    "name",
    ["s02_ct_implicit_vr_le_01.dcm", "s01_mr_explicit_vr_be_01.dcm", "s02_mr_deflated_explicit_vr_le_01.dcm"],
)
def test_an_instance_that_came_uncompressed_in_another_syntax_is_re_encoded(name):
    data = _fixture(name)
    sent = anyio.run(_as_explicit_little_endian, data, UNKNOWN_SYNTAX)
    assert _syntax(sent) == EXPLICIT_LE
    original, received = (pydicom.dcmread(io.BytesIO(b)) for b in (data, sent))
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert (received.pixel_array == original.pixel_array).all()


def test_an_instance_that_came_compressed_is_refused_naming_its_syntax():
    with pytest.raises(NotAcceptable, match=r"1\.2\.840\.10008\.1\.2\.4\.50.*transfer-syntax=\*"):
        anyio.run(_as_explicit_little_endian, _fixture("s01_cr_jpeg_baseline_mono8_01.dcm"), UNKNOWN_SYNTAX)


def test_an_instance_without_file_meta_is_a_source_error():
    with pytest.raises(SourceError, match="pacs"):
        anyio.run(_as_explicit_little_endian, b"\x00" * 300, UNKNOWN_SYNTAX)
