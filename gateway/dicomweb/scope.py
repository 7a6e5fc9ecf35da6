"""The UIDs of a WADO-RS path as an SQL condition and as a 404 message."""

from __future__ import annotations

from gateway.errors import NotFound

__all__ = ["where", "not_found"]


def where(scope: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """SQL over instances ``i`` and series ``se`` selecting the instances under ``scope``."""
    clauses, params = ["se.StudyInstanceUID = ?"], [scope["StudyInstanceUID"]]
    if "SeriesInstanceUID" in scope:
        clauses.append("i.SeriesInstanceUID = ?")
        params.append(scope["SeriesInstanceUID"])
    if "SOPInstanceUID" in scope:
        clauses.append("i.SOPInstanceUID = ?")
        params.append(scope["SOPInstanceUID"])
    return " AND ".join(clauses), tuple(params)


def not_found(scope: dict[str, str]) -> NotFound:
    if "SOPInstanceUID" in scope:
        return NotFound(
            f"instance {scope['SOPInstanceUID']} not found in series "
            f"{scope['SeriesInstanceUID']} of study {scope['StudyInstanceUID']}"
        )
    if "SeriesInstanceUID" in scope:
        return NotFound(f"series {scope['SeriesInstanceUID']} not found in study {scope['StudyInstanceUID']}")
    return NotFound(f"study {scope['StudyInstanceUID']} not found")
