import pytest

from gateway.codec.multipart import (
    Data,
    End,
    Headers,
    MultipartError,
    MultipartReader,
    MultipartWriter,
    PartEnd,
    boundary_of,
)

PAYLOADS = [b"\r\n--almost\r\n" + bytes(range(256)) * 3, b"", b"x" * 5000]


def body(writer: MultipartWriter) -> bytes:
    out = b"preamble\r\n"
    for payload in PAYLOADS:
        out += writer.part_header(len(payload), "1.2.840.10008.1.2.1") + payload + writer.part_end
    return out + writer.closing() + b"epilogue"


def read(data: bytes, boundary: str, chunk: int) -> list[tuple[dict[str, str], bytes]]:
    reader = MultipartReader(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    ended = False
    for start in range(0, len(data), chunk):
        for event in reader.feed(data[start : start + chunk]):
            if isinstance(event, Headers):
                parts.append((event.headers, b""))
            elif isinstance(event, Data):
                parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
            elif isinstance(event, End):
                ended = True
            else:
                assert isinstance(event, PartEnd)
    reader.close()
    assert ended
    return parts


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 4096, 1 << 20])
def test_parts_come_back_whatever_the_chunking(chunk):
    writer = MultipartWriter("application/octet-stream")
    parts = read(body(writer), writer.boundary, chunk)
    assert [payload for _, payload in parts] == PAYLOADS
    assert parts[0][0]["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"


def test_body_bytes_are_passed_on_before_the_part_ends():
    writer = MultipartWriter("application/dicom")
    reader = MultipartReader(writer.boundary)
    events = reader.feed(writer.part_header(100_000) + b"a" * 60_000)
    assert sum(len(e.data) for e in events if isinstance(e, Data)) > 59_000


def test_a_body_cut_before_the_closing_delimiter_is_an_error():
    writer = MultipartWriter("application/dicom")
    data = body(writer)
    reader = MultipartReader(writer.boundary)
    reader.feed(data[: len(data) // 2])
    with pytest.raises(MultipartError, match="ended before"):
        reader.close()


@pytest.mark.parametrize(
    "header,boundary",
    [
        ('multipart/related; type="application/dicom"; boundary=abc', "abc"),
        ('multipart/related; boundary="a:b c"; type=application/dicom', "a:b c"),
        ("multipart/related;boundary=xyz", "xyz"),
    ],
    ids=["plain", "quoted", "no-space"],
)
def test_boundary_parameter_quoted_or_not(header, boundary):
    assert boundary_of(header) == boundary


def test_no_boundary_is_an_error():
    with pytest.raises(MultipartError):
        boundary_of("multipart/related; type=application/dicom")
