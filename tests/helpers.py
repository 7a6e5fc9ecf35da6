"""What several test modules share: reading WADO-RS answers (multipart parts, the frames pydicom
reads, instance URLs), the check run against a real server with dicomweb-client, files and folders
that test the folder source, and the token issuers and INS study used against a real ``gateway serve``.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import os
import socket
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pydicom
from cryptography.hazmat.primitives.asymmetric import rsa
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian

from fixtures.generate import make_ct_study

ANY_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


ANY_INSTANCE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def parts(response) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body with the standard library's MIME parser."""
    raw = b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert message.is_multipart()
    out = []
    for part in message.iter_parts():
        headers = {k.lower(): v for k, v in part.items()}
        headers["transfer-syntax"] = part.get_param("transfer-syntax")
        out.append((headers, part.get_payload(decode=True)))
    return out


def expected_frames(ds: pydicom.Dataset) -> list[bytes]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    data = ds.PixelData
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian and ds.BitsAllocated > 8:
        words = array("H")
        words.frombytes(data)
        words.byteswap()
        data = words.tobytes()
    length = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * ds.BitsAllocated // 8
    return [data[i * length : (i + 1) * length] for i in range(count)]


def instance_url(ds: pydicom.Dataset) -> str:
    return (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def within_seconds(work: Callable[[], Any], seconds: float) -> Any:
    """``work()``'s result; fails (instead of hanging the suite) when it takes longer."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    if errors:
        raise errors[0]
    return result[0]


def nest(root: Path, levels: int, name: str = "d") -> Path:
    """``levels`` nested directories under ``root`` (made one at a time: os.makedirs recurses)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return root.joinpath(*[name] * levels)


def unnest(root: Path, name: str = "d") -> None:
    """Remove what ``nest`` made, deepest first (shutil.rmtree recurses as deep as the tree)."""
    chain = [root]
    while (chain[-1] / name).is_dir() and not (chain[-1] / name).is_symlink():
        chain.append(chain[-1] / name)
    for directory in reversed(chain[1:]):
        for child in directory.iterdir():
            if not child.is_dir() or child.is_symlink():
                child.unlink()
        directory.rmdir()


TRAILER_SOURCES = {
    "explicit-le": "GW-0001/A1001_ct_chest/s01_ct_explicit_vr_le_01.dcm",
    "implicit-le": "GW-0001/A1001_ct_chest/s02_ct_implicit_vr_le_01.dcm",
    "explicit-be": "GW-0001/A1002_mr_brain/s01_mr_explicit_vr_be_01.dcm",
    "deflated": "GW-0001/A1002_mr_brain/s02_mr_deflated_explicit_vr_le_01.dcm",
    "encapsulated-multiframe": "GW-0002/B2002_us_abdomen/s01_us_jpegls_multiframe_bot_01.dcm",
    "native-multiframe": "GW-0001/A1002_mr_brain/s03_sc_native_multiframe_5f_01.dcm",
}


BLOB = bytes(range(256)) * 8  # past the inline limit: a BulkDataURI


def with_trailer(source: Path, target: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(source)
    ds.add_new(0x7FE10010, "LO", "GATEWAY TEST")  # private groups above Pixel Data, as in real files
    ds.add_new(0x7FE11010, "LO", "after the pixels")
    ds.add_new(0x7FE11020, "OB", BLOB)
    ds.add_new(0x8E050010, "LO", "OTHER CREATOR")
    ds.add_new(0x8E051001, "US", 7)
    ds.save_as(target)
    return ds


def assert_frames_and_instance(gateway: str, path: Path) -> None:
    """Every frame served equals pydicom's reading of ``path`` (stored syntax, as OHIF asks with
    transfer-syntax=*), and the instance served holds the same pixels."""
    ds = pydicom.dcmread(path)
    client = DICOMwebClient(url=gateway)
    uid = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    frames = expected_frames(ds)
    got = client.retrieve_instance_frames(
        *uid, frame_numbers=list(range(1, len(frames) + 1)), media_types=(("application/octet-stream", "*"),)
    )
    assert got == frames
    instance = client.retrieve_instance(*uid)
    assert instance.SOPInstanceUID == ds.SOPInstanceUID
    assert (instance.pixel_array == ds.pixel_array).all()


# -- identity providers ---

PORTAL, PSC = "https://portal.test", "https://psc.test"
NIR_OID = "1.2.250.1.213.1.4.8"  # the INS's issuer


@dataclass(frozen=True)
class Issuers:
    auth: str  # the [auth] section naming both issuers
    token: Callable[..., str]  # token(issuer, lifetime=600, **claims)


def issuers(work: Path) -> Issuers:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (work / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k", "alg": "RS256"}]}))
    auth = "[auth]\n" + "".join(
        f'[[auth.issuers]]\nissuer = "{issuer}"\naudience = "gateway"\n'
        f'jwks_file = "{work / "jwks.json"}"\nrole = "{role}"\n'
        for issuer, role in ((PORTAL, "patient"), (PSC, "professional"))
    )

    def token(issuer: str, lifetime: float = 600, **claims: Any) -> str:
        payload = {"iss": issuer, "aud": "gateway", "exp": time.time() + lifetime, **claims}
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k"})

    return Issuers(auth, token)


def study_with_ins(folder: Path, ins: str, seed: int) -> str:
    """A two-instance study in ``folder`` whose patient carries ``ins``; its StudyInstanceUID."""
    for path in make_ct_study(folder, n_instances=2, rows=16, cols=16, seed=seed):
        ds = pydicom.dcmread(path)
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID = ins, NIR_OID
        ds.OtherPatientIDsSequence = Sequence([item])
        ds.save_as(path)
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@contextlib.contextmanager
def serving(ae: Any, handlers: list[Any]) -> Iterator[int]:
    """A pynetdicom ``ae`` serving on a free loopback port with ``handlers``, yielding the port;
    every connection's socket is closed at the end (pynetdicom leaves one open when its peer
    aborted)."""
    from pynetdicom import evt

    sockets: list[socket.socket] = []

    def opened(event: Any) -> None:
        sockets.append(event.assoc.dul.socket.socket)

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[*handlers, (evt.EVT_CONN_OPEN, opened)]
    )
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        for sock in sockets:
            sock.close()
