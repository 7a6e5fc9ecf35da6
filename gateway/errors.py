"""The gateway's one exception tree.

    GatewayError                      base; carries the HTTP status it maps to
    ├── ConfigError                   a bad configuration file or variable (never reaches HTTP)
    ├── RequestError (400)            a malformed DICOMweb request
    │   └── QueryError (400)          an unknown or malformed QIDO key or value
    ├── Unauthenticated (401)         no credentials, or a token / link / session refused
    ├── Forbidden (403)               authenticated, but the access policy says no
    ├── NotFound (404)                an unknown study / series / instance / frame
    ├── NotAcceptable (406)           no representation matches the Accept header
    ├── SourceError (502)             a source failed to deliver what the index promised
    │   ├── SourceUnavailable (503)   the source cannot be reached (refused, down, unhealthy)
    │   └── SourceTimeout (504)       the source missed a deadline
    ├── DicomFileError                a file that cannot be indexed (never reaches HTTP)
    └── RegistryError (500)           the index itself failed

Errors from other libraries (OSError, sqlite3, pydicom) are mapped at the module that calls them,
with ``raise ... from exc``; callers above never catch third-party types. The HTTP layer has one
handler that turns a ``GatewayError`` into a response with ``status`` and a plain message.
"""

from __future__ import annotations

__all__ = [
    "GatewayError",
    "ConfigError",
    "RequestError",
    "QueryError",
    "Unauthenticated",
    "Forbidden",
    "NotFound",
    "NotAcceptable",
    "SourceError",
    "SourceUnavailable",
    "SourceTimeout",
    "DicomFileError",
    "RegistryError",
]


class GatewayError(Exception):
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(GatewayError):
    """A configuration key is missing, unknown or has a wrong value."""


class RequestError(GatewayError):
    status = 400


class QueryError(RequestError):
    """A QIDO-RS query parameter cannot be understood (PS3.18 8.3.4: answer 400)."""


class Unauthenticated(GatewayError):
    """Answered with ``WWW-Authenticate: Bearer`` (RFC 6750 3)."""

    status = 401


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class NotAcceptable(GatewayError):
    status = 406


class SourceError(GatewayError):
    status = 502


class SourceUnavailable(SourceError):
    status = 503


class SourceTimeout(SourceError):
    status = 504


class DicomFileError(GatewayError):
    """A file is not DICOM, is truncated, or is hostile (too deep, too large)."""


class RegistryError(GatewayError):
    status = 500
