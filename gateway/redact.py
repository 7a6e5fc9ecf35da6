"""Text that leaves the process (log lines, audit fields, error messages): escaped, bounded, and
without secrets.

Values that reach a log line or an audit record come from files (names, headers), upstreams
(metadata, error bodies) and clients (paths, query strings, claims): any of them can carry a
newline that forges a log line, markup or characters that XML cannot hold, or 60 kB of junk.
``escape`` makes any value one printable line of bounded length; ``redact`` removes the secrets
the gateway hands out or receives (study link secrets, session cookies, bearer tokens), whatever
text they were pasted into; ``SafeLogFilter`` applies both to every log record, so that no log
statement, ours or a library's, has to remember to.
"""

from __future__ import annotations

import logging
import re

__all__ = ["escape", "redact", "SafeLogFilter", "REDACTED"]

REDACTED = "…"

# C0 and C1 controls, DEL, the surrogates and the two non-characters that XML 1.0 cannot carry
# even as references (XML 1.0 section 2.2): escaped as \xNN / \uNNNN, readable and one line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
# (marker, pattern, replacement): a pattern is tried only where its marker occurs (lower-cased
# text), so that the audit record of every frame request pays a few substring tests, not regexes.
_SECRETS = [
    # A study link's secret in a path or URL (/link/<secret>): the link's only credential.
    ("/link/", re.compile(r"(/link/)[^\s/?#\"']+"), r"\1" + REDACTED),
    # Bearer tokens and JWTs wherever they appear (an Authorization header pasted into an error).
    ("bearer", re.compile(r"(?i)(bearer\s+)[\w.~+/-]{16,}=*"), r"\1" + REDACTED),  # RFC 6750 b64token
    ("eyj", re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*"), REDACTED),
    # The link session cookie's value.
    ("gateway_session=", re.compile(r"(gateway_session=)[^\s;\"',]+"), r"\1" + REDACTED),
]


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(value: object, limit: int = 256) -> str:
    """``value`` as one printable line of at most ``limit`` characters (then ``…``)."""
    text = value if isinstance(value, str) else str(value)
    if not text.isascii() or not text.isprintable():  # the common case needs no substitution
        text = _UNSAFE.sub(_escaped, text)
    return text if len(text) <= limit else text[: limit - 1] + REDACTED


def redact(text: str) -> str:
    """``text`` without the secrets the gateway knows the shape of."""
    lowered = text.lower()
    for marker, pattern, replacement in _SECRETS:
        if marker in lowered:
            text = pattern.sub(replacement, text)
    return text


class SafeLogFilter(logging.Filter):
    """Every log record's message, arguments merged, redacted and escaped (a traceback, kept in
    ``exc_info``, is formatted by the handler and stays multi-line: it is ours, not data)."""

    def __init__(self, limit: int = 4096) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is the logger's bug; still log something
            message = f"{record.msg!r} {record.args!r}"
        record.msg = escape(redact(message), self.limit)
        record.args = None
        return True
