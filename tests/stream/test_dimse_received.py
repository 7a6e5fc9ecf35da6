"""Received data must be what was asked for: the C-MOVE destination takes associations from the
PACS only and instances of a retrieval under way only, within a size read before it is buffered;
a C-GET answered with another instance is an error, never served, cached or learnt.

Byte tables for the PDU guard and the UID checks; real peers on loopback for the rest: DCMTK's
dcmqrscp (C-MOVE) and storescu, pynetdicom as a sender and as a PACS that lies."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import encode

from gateway.app import create_app
from gateway.config import AuthConfig, Config, Deadlines, ServerConfig, SourceConfig, load_config
from gateway.errors import ConfigError, SourceUnavailable
from gateway.service import Gateway
from gateway.stream.dimse import pduguard
from gateway.stream.dimse import retrieve as dimse_retrieve
from gateway.stream.dimse.associations import STUDY_FIND, STUDY_GET, SYNTAXES, VERIFICATION
from gateway.stream.dimse.pduguard import PduGuard, affected_instance
from gateway.stream.dimse.source import DimseSource
from gateway.stream.dimse.storescp import MoveListener, listen_host
from peers.dcmtk import dcmtk_missing, running_dcmqrscp
from peers.gateway import dimse_source, running_gateway
from peers.process import free_port
from tests.conftest import Client, fixture_files
from tests.helpers import expected_frames, serving

ANY_FRAME = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
NOT_AUTHORIZED = 0x0124  # the C-STORE status of a refused instance (PS3.7 C.5.21)
# The uncompressed CT instances of one series: one per C-MOVE test, since the gateway caches
# what it retrieved.
CT = [p for p in fixture_files() if p.name.startswith("s01_ct_explicit_vr_le")]
needs_dcmtk = pytest.mark.skipif(dcmtk_missing() is not None, reason=str(dcmtk_missing()))


def uids(ds: Dataset) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def frame_url(ds: Dataset) -> str:
    study, series, sop = uids(ds)
    return f"/studies/{study}/series/{series}/instances/{sop}/frames/1"


def intruder(ds: Dataset, *, study: bool = True, series: bool = False, instance: bool = False) -> Dataset:
    """``ds`` as someone else's: another patient, other pixels, and new UIDs where asked."""
    forged = pydicom.dcmread(ds.filename) if ds.filename else ds
    forged.PatientID, forged.PatientName = "INTRUDER", "Intruder^Eve"
    forged.PixelData = bytes(len(forged.PixelData))
    if study:
        forged.StudyInstanceUID = generate_uid()
    if series:
        forged.SeriesInstanceUID = generate_uid()
    if instance:
        forged.SOPInstanceUID = forged.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return forged


# -- the PDU guard: byte tables -------------------------------------------------------------------


def pdu(kind: int, body: bytes) -> list[bytes]:
    """A PDU as pynetdicom reads it: its 6-byte header (PS3.8 9.3.1), then its body."""
    return [struct.pack(">BBL", kind, 0, len(body)), body]


def pdv(control: int, size: int) -> bytes:
    """One PDV item (PS3.8 9.3.5.1) of ``size`` fragment bytes: control bit 0 command, bit 1 last."""
    return struct.pack(">LBB", size + 2, 1, control) + bytes(size)


DATA, DATA_LAST, COMMAND_LAST, COMMAND = 0b00, 0b10, 0b11, 0b01
GUARD_CASES = [
    (
        "a whole instance within the limit",
        [pdu(4, pdv(COMMAND_LAST, 100)), pdu(4, pdv(DATA_LAST, 900))],
        True,
    ),
    ("a data set growing past the limit", [pdu(4, pdv(DATA, 600)), pdu(4, pdv(DATA_LAST, 600))], False),
    ("two instances each within it", [pdu(4, pdv(DATA_LAST, 900)), pdu(4, pdv(DATA_LAST, 900))], True),
    ("a PDU announcing 4 GiB", [[struct.pack(">BBL", 4, 0, 0xFFFFFFFF)]], False),
    ("an A-ASSOCIATE-RQ of 50 kB", [pdu(1, bytes(50_000))], True),
    ("a command set without end", [pdu(4, pdv(COMMAND, 16_000)) for _ in range(6)], False),
]


def command(uid: str, field: int = 0x0001) -> bytes:
    """A command set as pynetdicom encodes it (implicit VR little endian, PS3.7 6.3.1)."""
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType = field, 7, 0, 1
    ds.AffectedSOPInstanceUID = uid
    return encode(ds, True, True)


def store_rq(uid: str) -> bytes:
    body = command(uid)
    return struct.pack(">LBB", len(body) + 2, 1, COMMAND_LAST) + body


GUARD_CASES += [
    ("an awaited instance up to the limit", [pdu(4, store_rq("1.2.3")), pdu(4, pdv(DATA_LAST, 900))], True),
    ("an instance nobody awaits, small", [pdu(4, store_rq("6.6")), pdu(4, pdv(DATA_LAST, 90))], True),
    ("an instance nobody awaits, larger", [pdu(4, store_rq("6.6")), pdu(4, pdv(DATA_LAST, 900))], False),
]


def test_the_affected_instance_is_read_from_a_c_store_command_only():
    assert affected_instance(command("1.2.3.4")) == "1.2.3.4"
    assert affected_instance(command("1.2.3.4", field=0x0020)) is None  # a C-FIND-RQ
    assert affected_instance(b"\x00\x00\x00") is None


@pytest.mark.parametrize("reads, accepted", [c[1:] for c in GUARD_CASES], ids=[c[0] for c in GUARD_CASES])
def test_the_pdu_guard_refuses_what_passes_a_limit_before_reading_it(monkeypatch, reads, accepted):
    monkeypatch.setattr(pduguard, "UNASKED_BYTES", 100)
    guard = PduGuard(limit=1000, awaited=lambda uid: uid == "1.2.3")
    fed = []
    for part in (part for one in reads for part in one):
        fed.append(guard.feed(part))
        if not fed[-1]:
            break  # as the socket reader does: nothing more is read
    assert all(fed) is accepted
    assert (guard.refused is None) is accepted
    if not accepted:
        assert len(fed) % 2 == 1  # refused at a header: that PDU's body was never read
        assert guard.feed(bytes(6)) is False  # nor anything after it
    assert guard.largest <= 1000


# -- what a received instance must be: UID checks -------------------------------------------------

A = ("1.2.3", "1.2.3.4", "1.2.3.4.5")
MISMATCHES = [
    ("another instance", A, ("1.2.3", "1.2.3.4", "9.9"), "9.9"),
    ("the instance in another study", A, ("6.6", "1.2.3.4", "1.2.3.4.5"), "1.2.3.4.5"),
    ("the instance in another series", A, ("1.2.3", "6.6", "1.2.3.4.5"), "1.2.3.4.5"),
    ("another instance in a C-STORE that names ours", A, ("1.2.3", "1.2.3.4", "9.9"), "1.2.3.4.5"),
    ("ours in a C-STORE that names another", A, A, "9.9"),
]


@pytest.mark.parametrize("asked, own, command", [c[1:] for c in MISMATCHES], ids=[c[0] for c in MISMATCHES])
def test_an_instance_is_kept_only_when_its_own_uids_are_the_ones_asked_for(asked, own, command):
    retrieval = dimse_retrieve._Retrieval(asked, lambda item: None)
    problem = dimse_retrieve._mismatch(retrieval, command, own)
    assert problem is not None and f"asked for instance {A[2]} of study {A[0]}, series {A[1]}" in problem
    assert own[2] in problem
    assert dimse_retrieve._mismatch(retrieval, A[2], A) is None
    assert dimse_retrieve._mismatch(None, A[2], A) is not None  # no retrieval under way asked for it


# -- where the C-MOVE destination listens, and whom it accepts ------------------------------------


def move_config(**keys) -> SourceConfig:
    values = {
        "name": "pacs",
        "kind": "dimse",
        "host": "127.0.0.1",
        "port": 104,
        "called_ae": "PACS",
        "calling_ae": "GATEWAY",
        "retrieve": "c-move",
        "move_destination_port": free_port(),
        "deadlines": Deadlines(connect=2, message=5, total=30),
    }
    return SourceConfig(**(values | keys))


def test_the_listener_accepts_connections_from_the_pacs_addresses_only():
    listener = MoveListener("pacs", move_config(host="127.0.0.1"), lambda event: 0)
    assert listener.accepts("127.0.0.1")
    assert listener.accepts("::ffff:127.0.0.1")  # the same address, seen on a dual-stack socket
    for other in ("127.0.0.2", "10.0.0.5", "::1", "not an address"):
        assert not listener.accepts(other), other


def test_the_listener_binds_loopback_for_a_pacs_on_loopback_and_never_every_interface():
    assert listen_host("pacs", move_config(host="127.0.0.1")) == "127.0.0.1"
    assert listen_host("pacs", move_config(host="localhost")) == "127.0.0.1"
    assert listen_host("pacs", move_config(host="10.0.0.5", move_listen_host="10.0.0.1")) == "10.0.0.1"
    try:  # a PACS elsewhere: the address this machine reaches it from, if there is a route
        chosen = listen_host("pacs", move_config(host="192.0.2.10"))
    except SourceUnavailable as exc:
        assert "move_listen_host" in exc.message
    else:
        assert chosen not in ("", "0.0.0.0", "::")


def test_the_move_keys_are_read_with_their_defaults(tmp_path):
    config = tmp_path / "gateway.toml"
    table = '[[sources]]\nname = "pacs"\nkind = "dimse"\nhost = "10.0.0.5"\ncalled_ae = "PACS"\n'
    config.write_text('[registry]\nurl = "sqlite:///r.db"\n[auth]\nopen = true\n' + table)
    (source,) = load_config(str(config)).sources
    assert source.move_source_ae == "PACS" and source.move_listen_host is None
    assert source.max_instance_bytes == 1024**3
    config.write_text(config.read_text() + 'move_source_ae = "PACS-STORE"\nmax_instance_bytes = 1048576\n')
    (source,) = load_config(str(config)).sources
    assert source.move_source_ae == "PACS-STORE" and source.max_instance_bytes == 1024**2
    config.write_text(config.read_text() + 'move_listen_host = "pacs.example"\n')
    with pytest.raises(ConfigError, match="move_listen_host"):
        load_config(str(config))


@contextlib.contextmanager
def listening(config: SourceConfig, awaited=None) -> Iterator[tuple[MoveListener, list[object]]]:
    """The C-MOVE destination on its own, keeping (and counting) whatever it hands over."""
    stored: list[object] = []

    def store(event) -> int:
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0

    listener = MoveListener(config.name, config, store, awaited)
    listener.start()
    try:
        yield listener, stored
    finally:
        listener.close()


@contextlib.contextmanager
def sender(calling: str, **associate) -> Iterator[object]:
    """An association to the listener from a pynetdicom Storage SCU calling as ``calling``."""
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)  # CT Image Storage
    ae.acse_timeout = ae.connection_timeout = ae.dimse_timeout = 5
    sockets: list[socket.socket] = []

    def opened(event) -> None:
        sockets.append(event.assoc.dul.socket.socket)

    assoc = ae.associate(ae_title="GATEWAY", evt_handlers=[(evt.EVT_CONN_OPEN, opened)], **associate)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        for sock in sockets:  # pynetdicom does not close it when the peer aborted or rejected
            sock.close()


def echo_from(port: int, calling: str, bind: str) -> bool:
    """Whether an association from ``bind`` as ``calling`` is accepted by the listener."""
    with sender(calling, addr="127.0.0.1", port=port, bind_address=(bind, 0)) as assoc:
        return bool(assoc.is_established)


@pytest.mark.network
def test_a_sender_at_another_address_is_cut_off_before_a_byte_is_read(caplog):
    # Every 127/8 address is this machine's (Linux): the PACS "is" 127.0.0.2, a neighbour 127.0.0.3.
    config = move_config(host="127.0.0.2", move_listen_host="127.0.0.1", called_ae="PACS")
    with caplog.at_level(logging.WARNING, "gateway.dimse"), listening(config) as (listener, stored):
        port = listener.address[1]
        assert not echo_from(port, "PACS", bind="127.0.0.3")  # the right AE title, from elsewhere
        assert echo_from(port, "PACS", bind="127.0.0.2")
    assert stored == []
    assert "127.0.0.3" in caplog.text and "not an address of the PACS" in caplog.text


# -- oversized instances: refused before they are buffered ----------------------------------------


def big_instance(path: Path, pixel_bytes: int) -> Dataset:
    """A CT instance with ``pixel_bytes`` of pixel data, written without holding them in memory."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in range(3))
    ds.PatientID, ds.Modality = "BIG", "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8192, pixel_bytes // 16384, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    with open(path, "ab") as out:
        out.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
        chunk = bytes(1024 * 1024)
        for _ in range(pixel_bytes // len(chunk)):
            out.write(chunk)
    return ds


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@contextlib.contextmanager
def peak_rss() -> Iterator[list[int]]:
    """This process's resident memory, sampled every 5 ms while the block runs: [before, peak]."""
    seen = [rss(), rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            seen[1] = max(seen[1], rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()


OVERSIZED = [
    # (case, max_instance_bytes, whether a retrieval awaits it, what the log says)
    ("larger than max_instance_bytes", 8 * 1024**2, True, "an instance of more than 8388608 bytes"),
    ("not awaited, within the default limit", SourceConfig.max_instance_bytes, False, "no retrieval awaits"),
]


@pytest.mark.network
@needs_dcmtk
@pytest.mark.parametrize("limit, awaited, logged", [c[1:] for c in OVERSIZED], ids=[c[0] for c in OVERSIZED])
def test_an_oversized_instance_is_refused_before_it_is_buffered(tmp_path, caplog, limit, awaited, logged):
    path = tmp_path / "big.dcm"
    big = big_instance(path, 128 * 1024 * 1024)
    config = move_config(max_instance_bytes=limit)
    with (
        caplog.at_level(logging.WARNING, "gateway.dimse"),
        listening(config, lambda uid: awaited) as (
            listener,
            stored,
        ),
    ):
        command = ["storescu", "-aet", "PACS", "-aec", "GATEWAY", "127.0.0.1", str(listener.address[1])]
        with peak_rss() as memory:
            sent = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=60)
    assert stored == []  # never handed over, not even to be refused
    assert logged in caplog.text and "aborted the association with 127.0.0.1" in caplog.text
    assert awaited or big.SOPInstanceUID in caplog.text
    # storescu: its association cut off mid-instance; which words it prints depends on whether the
    # abort reached it while it was still sending or while it waited for the response.
    assert "Store Failed" in sent.stderr or "Connection closed while waiting" in sent.stderr
    growth = memory[1] - memory[0]
    print(f"peak RSS growth while refusing a 128 MiB instance ({logged}): {growth / 2**20:.1f} MiB")
    assert growth < min(limit, 1024**2) + 16 * 1024**2  # what the guard lets in, not the 128 MiB


# -- C-MOVE from a real dcmqrscp, with someone else sending first ----------------------------------


class HeldRelay:
    """Carries the PACS's store associations to the gateway's C-MOVE port, holding each until
    released: the gateway is then waiting for the C-MOVE, and a test sends before the PACS does."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.arrived = threading.Event()
        self.released = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.arrived.clear()
        self.released.clear()

    def _accept(self) -> None:
        while True:
            try:
                pacs, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._carry, args=(pacs,), daemon=True).start()

    def _carry(self, pacs: socket.socket) -> None:
        self.arrived.set()
        self.released.wait(20)
        with pacs, socket.create_connection(("127.0.0.1", self.target)) as gateway:
            back = threading.Thread(target=_pump, args=(gateway, pacs), daemon=True)
            back.start()
            _pump(pacs, gateway)
            back.join(20)

    def close(self) -> None:
        self.released.set()
        self.server.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@dataclass
class Moving:
    url: str  # the gateway's DICOMweb base
    log: Path  # its log
    relay: HeldRelay  # between dcmqrscp and its C-MOVE port
    move_port: int


@pytest.fixture(scope="module")
def moving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moving]:
    if dcmtk_missing():
        pytest.skip(str(dcmtk_missing()))
    move_port = free_port()
    relay = HeldRelay(move_port)
    work = tmp_path_factory.mktemp("moving")
    try:
        with running_dcmqrscp(work / "pacs", CT, move_destinations={"GATEWAY": relay.port}) as pacs:
            source = dimse_source(
                "moving", pacs.port, pacs.aet, retrieve="c-move", move_port=move_port, timeout=10
            )
            with running_gateway(source, work / "gw") as url:
                yield Moving(url, work / "gw" / "gateway.log", relay, move_port)
    finally:
        relay.close()


def store(port: int, calling: str, dataset: Dataset | Path) -> tuple[bool, int | None]:
    """Send one C-STORE to the gateway's listener: (association accepted, status)."""
    with sender(calling, addr="127.0.0.1", port=port) as assoc:
        if not assoc.is_established:
            return False, None
        status = assoc.send_c_store(dataset)
        return True, int(status.Status) if "Status" in status else None


def instance_with_the_command_of(target: Dataset, path: Path) -> Path:
    """A file whose Part 10 header names ``target`` but whose data set is another instance of
    another study and patient: pynetdicom sends its header's UIDs as the C-STORE's."""
    forged = intruder(target, study=True, series=True, instance=True)
    forged.file_meta.MediaStorageSOPInstanceUID = target.SOPInstanceUID
    forged.save_as(path)  # as is: enforce_file_format would set the header from the data set
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID == target.SOPInstanceUID
    return path


MOVE_ATTACKS = [
    # (case, instance index, calling AE title, what is sent, accepted association)
    ("another AE title sending our UIDs with another patient", 0, "INTRUDER", "same uids", False),
    ("the PACS's AE title sending our instance in another study", 1, "DCMQRSCP", "other study", True),
    ("the PACS's AE title sending another instance as ours", 2, "DCMQRSCP", "other instance", True),
]


@pytest.mark.network
@pytest.mark.parametrize(
    "index, calling, sent, associated", [c[1:] for c in MOVE_ATTACKS], ids=[c[0] for c in MOVE_ATTACKS]
)
def test_during_a_c_move_only_the_pacs_own_copy_is_kept(
    moving, tmp_path, monkeypatch, index, calling, sent, associated
):
    gateway, relay = moving.url, moving.relay
    ds = pydicom.dcmread(CT[index])
    relay.hold()
    answer: dict[str, httpx.Response] = {}
    viewer = threading.Thread(
        target=lambda: answer.update(ok=httpx.get(gateway + frame_url(ds), headers=ANY_FRAME, timeout=30))
    )
    viewer.start()
    try:
        assert relay.arrived.wait(15), "the PACS did not start its C-MOVE"
        if sent == "other instance":
            monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the header's UIDs
            result = store(moving.move_port, calling, instance_with_the_command_of(ds, tmp_path / "f.dcm"))
        else:
            result = store(moving.move_port, calling, intruder(ds, study=sent == "other study"))
    finally:
        relay.released.set()
        viewer.join(30)
    assert result == ((True, NOT_AUTHORIZED) if associated else (False, None))
    response = answer["ok"]
    assert response.status_code == 200, response.text
    assert expected_frames(ds)[0] in response.content  # the PACS's pixels, not the sender's
    study, series, sop = uids(ds)
    (metadata,) = httpx.get(f"{gateway}/studies/{study}/series/{series}/instances/{sop}/metadata").json()
    assert metadata["00100020"]["Value"] == [ds.PatientID]  # learnt from the PACS's copy
    assert httpx.get(f"{gateway}/studies", params={"PatientID": "INTRUDER"}).json() == []
    text = moving.log.read_text()  # the sender named, escaped, on one line
    if not associated:
        (rejected,) = [line for line in text.splitlines() if f"as '{calling}'" in line]
        assert (
            "rejected an association from 127.0.0.1:" in rejected and "only 'DCMQRSCP' may send" in rejected
        )
    else:
        (refused,) = [line for line in text.splitlines() if f"asked for instance {sop}" in line]
        assert "refused an instance from 127.0.0.1" in refused and f"as '{calling}'" in refused
        assert (f"in a C-STORE of instance {sop}" in refused) is (sent == "other instance")


# -- C-GET from a PACS that answers with another instance -----------------------------------------


@contextlib.contextmanager
def lying_pacs(original: Dataset, sent: Dataset) -> Iterator[int]:
    """A Q/R SCP (pynetdicom) on loopback that answers C-FIND with ``original`` and a C-GET for
    it with ``sent``."""
    ae = AE(ae_title="LIAR")
    for model in (VERIFICATION, STUDY_FIND, STUDY_GET):
        ae.add_supported_context(model)
    ae.add_supported_context(original.SOPClassUID, SYNTAXES, scu_role=False, scp_role=True)

    def on_find(event):
        query, answer = event.identifier, Dataset()
        for element in query:
            if element.VR != "SQ" and element.tag in original:
                answer[element.tag] = original[element.tag]
        answer.QueryRetrieveLevel = query.QueryRetrieveLevel
        yield 0xFF00, answer

    def on_get(event):
        yield 1
        yield 0xFF00, sent

    with serving(ae, [(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)]) as port:
        yield port


@contextlib.contextmanager
def gateway_over(port: int, tmp_path: Path, **keys) -> Iterator[tuple[Gateway, Client]]:
    source = SourceConfig(
        name="liar",
        kind="dimse",
        host="127.0.0.1",
        port=port,
        called_ae="LIAR",
        deadlines=Deadlines(connect=2, message=5, total=30),
        **keys,
    )
    config = Config(
        ServerConfig(), f"sqlite:///{tmp_path / 'registry.db'}", (source,), auth=AuthConfig(open=True)
    )
    gateway = Gateway(config)
    try:
        assert gateway.harvest("liar").indexed == 1
        yield gateway, Client(create_app(gateway))
    finally:
        anyio.run(gateway.aclose)
        gateway.registry.close()


GET_LIES = [
    ("another instance of another patient", {"study": True, "series": True, "instance": True}),
    ("the instance asked for in another study, of another patient", {"study": True}),
]


@pytest.mark.network
@pytest.mark.parametrize("forge", [c[1] for c in GET_LIES], ids=[c[0] for c in GET_LIES])
def test_a_c_get_answered_with_another_instance_is_a_502_never_served_or_learnt(tmp_path, forge):
    original = pydicom.dcmread(CT[0])
    sent = intruder(original, **forge)
    with lying_pacs(original, sent) as port, gateway_over(port, tmp_path) as (gateway, client):
        for _ in range(2):  # and again: nothing was cached
            response = client.get("/dicom-web" + frame_url(original), headers=ANY_FRAME)
            assert response.status_code == 502
            assert "liar" in response.text
            assert f"asked for instance {original.SOPInstanceUID}" in response.text
            assert (
                f"received instance {sent.SOPInstanceUID} of study {sent.StudyInstanceUID}" in response.text
            )
        source = gateway.sources["liar"]
        assert isinstance(source, DimseSource) and not source._cache
        studies = client.get("/dicom-web/studies").json()
        assert [s["00100020"]["Value"] for s in studies] == [[original.PatientID]]  # nothing learnt
        assert [s["0020000D"]["Value"] for s in studies] == [[original.StudyInstanceUID]]


@pytest.mark.network
def test_an_instance_over_max_instance_bytes_by_c_get_is_a_502_naming_the_limit(tmp_path):
    original = pydicom.dcmread(CT[0])
    sent = pydicom.dcmread(CT[0])
    sent.PixelData = bytes(256 * 1024)  # larger than the limit below: refused as it comes
    sent.Rows = sent.Columns = 362
    with (
        lying_pacs(original, sent) as port,
        gateway_over(port, tmp_path, max_instance_bytes=64 * 1024) as (
            gateway,
            client,
        ),
    ):
        response = client.get("/dicom-web" + frame_url(original), headers=ANY_FRAME)
        assert response.status_code == 502
        assert "liar" in response.text and "max_instance_bytes" in response.text
        source = gateway.sources["liar"]
        assert isinstance(source, DimseSource) and not source._cache


@pytest.mark.network
def test_a_c_get_answered_with_a_data_set_without_its_uids_is_a_502(tmp_path):
    original = pydicom.dcmread(CT[0])
    sent = intruder(original, study=False)
    del sent.StudyInstanceUID  # which study it belongs to cannot be told: "cannot understand"
    with lying_pacs(original, sent) as port, gateway_over(port, tmp_path) as (gateway, client):
        response = client.get("/dicom-web" + frame_url(original), headers=ANY_FRAME)
        assert response.status_code == 502
        assert f"C-STORE of {original.SOPInstanceUID} whose data set's UIDs cannot be read" in response.text
        studies = client.get("/dicom-web/studies").json()
        assert [s["00100020"]["Value"] for s in studies] == [[original.PatientID]]
