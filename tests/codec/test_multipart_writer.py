import email.parser
import email.policy

from gateway.codec.multipart import MultipartWriter


def build(writer, payloads, syntax="1.2.840.10008.1.2.1"):
    body = b"".join(writer.part_header(len(p), syntax) + p + writer.part_end for p in payloads)
    return body + writer.closing()


def test_parts_parse_back_with_a_standard_mime_parser():
    writer = MultipartWriter("application/octet-stream")
    payloads = [b"\r\n--not-the-boundary\r\n" + bytes(range(256)), b"", b"x" * 1000]
    body = build(writer, payloads)
    raw = f"Content-Type: {writer.content_type}\r\n\r\n".encode() + body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    got = [part.get_payload(decode=True) for part in message.iter_parts()]
    assert got == payloads
    assert {part.get_param("transfer-syntax") for part in message.iter_parts()} == {"1.2.840.10008.1.2.1"}


def test_total_length_is_known_before_the_first_byte():
    writer = MultipartWriter("application/dicom")
    payloads = [b"a" * 10, b"b" * 20]
    body = build(writer, payloads)
    headers = [(writer.part_header(len(p), "1.2.840.10008.1.2.1"), len(p)) for p in payloads]
    assert writer.total_length(headers) == len(body)


def test_each_response_gets_its_own_boundary():
    assert MultipartWriter("application/dicom").boundary != MultipartWriter("application/dicom").boundary
