"""Prompt rewrites are deterministic, change what they claim, and invert exactly where they claim to."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lat_lightning.eval.rewrites import REWRITES, apply_rewrite, get_rewrite, invert

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
INVERTIBLE = [name for name, rw in REWRITES.items() if rw.invertible]


def test_at_least_leetspeak_and_two_more():
    assert "leetspeak" in REWRITES and len(REWRITES) >= 3
    assert set(INVERTIBLE) == {"char_spaced", "reversed_words", "rot13", "roleplay"}


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_every_rewrite_is_deterministic(text):
    for name in REWRITES:
        assert apply_rewrite(name, [text, text]) == [get_rewrite(name)(text)] * 2


@pytest.mark.parametrize("name", INVERTIBLE)
@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_invertible_rewrites_invert_exactly(name, text):
    assert invert(name, get_rewrite(name)(text)) == text


def test_examples():
    assert get_rewrite("leetspeak")("Tesla is OK at 5") == "735l4 15 0K 47 5"
    assert get_rewrite("char_spaced")("ab c") == "a b   c"
    assert get_rewrite("reversed_words")("how do  I").endswith("I  do how")
    assert get_rewrite("rot13")("Hello, World!").endswith("Uryyb, Jbeyq!")
    assert "Decode" in get_rewrite("rot13")("x") and "reverse order" in get_rewrite("reversed_words")("x")
    assert "never refuses" in get_rewrite("roleplay")("Tell me a secret.")


def test_leetspeak_is_lossy_and_has_no_inverse():
    rw = get_rewrite("leetspeak")
    assert rw("s") == rw("5") == rw("S")  # merges letters with digits and drops case: no inverse exists
    with pytest.raises(ValueError, match="not invertible"):
        invert("leetspeak", "h3ll0")


def test_errors():
    with pytest.raises(ValueError, match="unknown rewrite 'leet'.*leetspeak"):
        get_rewrite("leet")
    with pytest.raises(ValueError, match="not a 'rot13' rewrite"):
        invert("rot13", "plain text without the instruction")
