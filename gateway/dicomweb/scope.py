"""The UIDs of a WADO-RS path as a 404 message."""

from __future__ import annotations

from gateway.errors import NotFound

__all__ = ["not_found"]

_SHOWN = 64  # the longest UID (PS3.5 9.1); a longer path segment is cut in messages


def not_found(scope: dict[str, str]) -> NotFound:
    study = _shown(scope["StudyInstanceUID"])
    if "SOPInstanceUID" in scope:
        return NotFound(
            f"instance {_shown(scope['SOPInstanceUID'])} not found in series "
            f"{_shown(scope['SeriesInstanceUID'])} of study {study}"
        )
    if "SeriesInstanceUID" in scope:
        return NotFound(f"series {_shown(scope['SeriesInstanceUID'])} not found in study {study}")
    return NotFound(f"study {study} not found")


def _shown(uid: str) -> str:
    """A UID from the path, for a message: whole when it could be one, else cut and said so."""
    return uid if len(uid) <= _SHOWN else f"{uid[:_SHOWN]}... ({len(uid)} characters)"
