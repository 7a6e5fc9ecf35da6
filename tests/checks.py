"""Assertions shared by the tests that go through a real server with dicomweb-client."""

from __future__ import annotations

from pathlib import Path

import pydicom
from dicomweb_client.api import DICOMwebClient

from tests.dicomweb.test_retrieve import expected_frames

__all__ = ["assert_frames_and_instance"]


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
