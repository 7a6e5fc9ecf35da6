"""QIDO attribute names: keywords or tags of exactly eight hex digits."""

from __future__ import annotations

import pytest

from gateway.codec.attributes import resolve_attribute


@pytest.mark.parametrize("name", ["-0000001", "0x100010", "1_000010", "0010001G", "Patient Name"])
def test_only_eight_hex_digits_or_a_keyword_name_an_attribute(name):
    assert resolve_attribute(name) is None


@pytest.mark.parametrize("name", ["00100010", "PatientName"])
def test_a_tag_or_a_keyword_names_its_keyword(name):
    assert resolve_attribute(name) == "PatientName"
