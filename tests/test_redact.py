"""What leaves the process as text: escaped, bounded, without the secrets the gateway knows."""

from __future__ import annotations

import logging

import pytest

from gateway.redact import SafeLogFilter, escape, redact

SECRETS = [
    pytest.param("GET /link/AbC-123_xyz -> 404", "AbC-123_xyz", id="link secret in a path"),
    pytest.param("http://h/link/AbC-123_xyz?x=1", "AbC-123_xyz", id="link secret in a URL"),
    pytest.param("Authorization: Bearer abcdefghijklmnop.qrst", "abcdefghijklmnop", id="bearer token"),
    pytest.param("token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln here", "eyJhbGci", id="a JWT anywhere"),
    pytest.param("Cookie: gateway_session=s3cr3t-value; other=1", "s3cr3t-value", id="session cookie"),
]


@pytest.mark.parametrize(("text", "secret"), SECRETS)
def test_redact_removes_the_secret(text, secret):
    assert secret not in redact(text)


def test_redact_keeps_ordinary_words():
    assert redact("bearer token has expired") == "bearer token has expired"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a\nb", "a\\x0ab"), ("\x1b[31m", "\\x1b[31m"), ("\x85", "\\x85"), ("\ufffe", "\\ufffe"), ("é", "é")],
)
def test_escape_makes_one_printable_line(value, expected):
    assert escape(value) == expected


def test_escape_bounds_the_length():
    assert escape("x" * 1000, 10) == "x" * 9 + "…"


def test_the_log_filter_merges_redacts_and_escapes():
    record = logging.LogRecord(
        "t", logging.INFO, __file__, 1, "GET %s -> %d", ("/link/SECRET\nFORGED", 404), None
    )
    assert SafeLogFilter().filter(record)
    assert record.getMessage() == "GET /link/…\\x0aFORGED -> 404"
