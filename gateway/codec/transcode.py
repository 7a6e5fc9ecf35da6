"""Re-encoding of uncompressed files into Explicit VR Little Endian for web clients.

PS3.18 8.7.3.3.1: Implicit VR Little Endian and Explicit VR Big Endian shall not be used by web
services, so such files (and deflated ones, when the client did not accept deflate) are re-encoded.
The whole instance is held in memory for this, bounded by one instance's size; frames of these
files do not come through here (see ``FolderSource.open_frame``).
"""

from __future__ import annotations

import io
from array import array

import pydicom
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from gateway.errors import SourceError

__all__ = ["to_explicit_little_endian"]


def to_explicit_little_endian(stored: bytes, name: str) -> bytes:
    try:
        ds = pydicom.dcmread(io.BytesIO(stored))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            raise ValueError(f"{ds.file_meta.TransferSyntaxUID.name} is compressed: no transcoding yet")
        big_endian = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
        if big_endian and "PixelData" in ds and int(ds.get("BitsAllocated", 8)) > 8:
            words = array("H" if int(ds.BitsAllocated) == 16 else "I")
            words.frombytes(ds.PixelData)
            words.byteswap()
            ds.PixelData = words.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buffer = io.BytesIO()
        # force_encoding: pydicom refuses to change endianness unless told that values were fixed.
        pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True, force_encoding=True)
        return buffer.getvalue()
    except Exception as exc:  # pydicom raises many types on a file that changed under us
        raise SourceError(f"{name}: cannot re-encode as Explicit VR Little Endian ({exc})") from exc
