"""Caller keys and the encryption key file format."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from service.keys import (
    KID_PATTERN,
    EncryptionKey,
    api_key_digest,
    new_api_key,
    new_encryption_key,
    parse_encryption_keys,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
B64_A = base64.b64encode(KEY_A).decode()
B64_B = base64.b64encode(KEY_B).decode()


def test_new_api_key_digest_is_sha256_of_key() -> None:
    """The digest printed for the config is the SHA-256 of the key handed to the caller."""
    key, digest = new_api_key()
    assert digest == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert api_key_digest(key) == digest.removeprefix("sha256:")


def test_new_api_keys_are_distinct_and_long() -> None:
    """Every generated caller key is fresh and carries enough randomness."""
    keys = {new_api_key()[0] for _ in range(20)}
    assert len(keys) == 20
    assert all(len(key) >= 40 for key in keys)


def test_new_encryption_key_parses_as_one_32_byte_key() -> None:
    """A generated key line is accepted by the key file parser."""
    line = new_encryption_key()
    [key] = parse_encryption_keys(line)
    assert len(key.key) == 32
    assert KID_PATTERN.fullmatch(key.kid)
    assert line.startswith(f"{key.kid}:")


def test_new_encryption_keys_differ() -> None:
    """Two generated keys can live in one file: different ids and key material."""
    first, second = parse_encryption_keys(new_encryption_key() + "\n" + new_encryption_key())
    assert first.kid != second.kid
    assert first.key != second.key


def test_parse_keeps_order_and_skips_blanks_and_comments() -> None:
    """The first key in the file encrypts; comments and blank lines are ignored."""
    text = f"# rotated 2026-11\n\nnew:{B64_B}  # current\n   \nold:{B64_A}\n"
    assert parse_encryption_keys(text) == [
        EncryptionKey("new", KEY_B),
        EncryptionKey("old", KEY_A),
    ]


def test_parse_accepts_comma_separated_keys() -> None:
    """An inline value (e.g. from an environment variable) may separate keys by commas."""
    keys = parse_encryption_keys(f"new:{B64_B}, old:{B64_A}")
    assert [key.kid for key in keys] == ["new", "old"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no keys"),
        ("# only a comment\n\n", "no keys"),
        (B64_A, "line 1: expected 'kid:base64key'"),
        (f"k1:{B64_A}\nk1:{B64_B}", "line 2: duplicate key id 'k1'"),
        (f"k1:{base64.b64encode(KEY_A[:16]).decode()}", "must be exactly 32 bytes, got 16"),
        ("k1:not*base64!", "key 'k1' is not valid base64"),
        (f"bad kid:{B64_A}", "key id must be 1-32 characters"),
        (f"{'k' * 33}:{B64_A}", "key id must be 1-32 characters"),
        (f"k1:{B64_A},{B64_B}", "line 1, entry 2: expected 'kid:base64key'"),
    ],
)
def test_parse_rejects_malformed_key_files(text: str, message: str) -> None:
    """Malformed key files are refused with a message that says where and why."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_encryption_keys(text)


def test_parse_reports_every_bad_line() -> None:
    """All bad entries are reported in one go, so the operator fixes them at once."""
    with pytest.raises(ValueError, match="line 1") as caught:
        parse_encryption_keys(f"a:{B64_A[:-4]}\nb:{B64_B}\nc\n")
    assert "line 3" in str(caught.value)
    assert "line 2" not in str(caught.value)


def test_parse_errors_never_contain_key_material() -> None:
    """A broken key file never has its key material echoed into logs or terminals."""
    leaked = base64.b64encode(b"x" * 31).decode()
    for text in (leaked, f"k:{leaked}", f"{leaked}:{leaked}", f"k:{leaked}!"):
        with pytest.raises(ValueError, match=r"\w") as caught:
            parse_encryption_keys(text)
        assert leaked not in str(caught.value)


def test_encryption_key_repr_hides_key() -> None:
    """Printing or logging a key shows its id but not the key bytes."""
    shown = repr(EncryptionKey("k1", KEY_A))
    assert "k1" in shown
    assert repr(KEY_A) not in shown
    assert B64_A not in shown
