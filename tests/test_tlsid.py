"""perc.tlsid: the one tls-id rule (RFC 8842 §4) and generator (D15)."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.tlsid import TLS_ID_LENGTH, check_tls_id, is_tls_id, random_tls_id

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"


def test_random_tls_ids_are_valid_and_fresh() -> None:
    ids = {random_tls_id() for _ in range(200)}
    assert len(ids) == 200
    for t in ids:
        assert len(t) == TLS_ID_LENGTH
        assert check_tls_id(t) == t


@pytest.mark.parametrize(
    "bad", ["short", "x" * 19, "x" * 256, "has space in it......", "é" * 20, "a" * 20 + "\n", ""]
)
def test_bad_tls_ids_are_refused_with_the_rule(bad: str) -> None:
    assert not is_tls_id(bad)
    with pytest.raises(ValueError, match=re.escape("20 to 255 characters of A-Z a-z 0-9")):
        check_tls_id(bad)


@given(st.text(alphabet=ALPHABET, min_size=20, max_size=255))
def test_every_string_of_the_alphabet_and_length_is_a_tls_id(text: str) -> None:
    assert is_tls_id(text)


@given(st.text(min_size=20, max_size=40).filter(lambda t: any(c not in ALPHABET for c in t)))
def test_any_other_character_is_refused(text: str) -> None:
    assert not is_tls_id(text)
