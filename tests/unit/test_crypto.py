"""AES-GCM envelopes for tokens at rest: key rotation and what must fail to open."""

from __future__ import annotations

import os

import pytest

from service.crypto import EnvelopeError, TokenCipher
from service.keys import EncryptionKey

OLD = EncryptionKey(kid="k-old", key=os.urandom(32))
NEW = EncryptionKey(kid="k-new", key=os.urandom(32))
PLAINTEXT = b'{"access_token":"eyJ.secret.token"}'


def test_envelope_round_trip_hides_the_plaintext() -> None:
    """What is sealed for an account opens for it, and the envelope does not show the text."""
    cipher = TokenCipher([OLD])
    envelope = cipher.seal("fleet-eu", PLAINTEXT)
    assert b"secret" not in envelope
    assert cipher.open("fleet-eu", envelope) == PLAINTEXT


def test_rotated_ring_seals_with_the_new_key_and_opens_old_envelopes() -> None:
    """After rotation, envelopes sealed with the old key still open; new ones need the new key."""
    before = TokenCipher([OLD]).seal("fleet-eu", PLAINTEXT)
    rotated = TokenCipher([NEW, OLD])
    after = rotated.seal("fleet-eu", PLAINTEXT)
    assert rotated.open("fleet-eu", before) == PLAINTEXT
    assert rotated.open("fleet-eu", after) == PLAINTEXT
    with pytest.raises(EnvelopeError):
        TokenCipher([OLD]).open("fleet-eu", after)


def test_envelope_for_another_account_does_not_open() -> None:
    """A record copied to another account's key is refused (the account is associated data)."""
    cipher = TokenCipher([OLD])
    with pytest.raises(EnvelopeError):
        cipher.open("fleet-us", cipher.seal("fleet-eu", PLAINTEXT))


def test_envelope_naming_an_unknown_key_does_not_open() -> None:
    """An envelope sealed with a key that left the ring is refused, not misread."""
    envelope = TokenCipher([OLD]).seal("fleet-eu", PLAINTEXT)
    with pytest.raises(EnvelopeError):
        TokenCipher([NEW]).open("fleet-eu", envelope)


@pytest.mark.parametrize("position", [0, 6, 20, -1])
def test_tampered_envelope_does_not_open(position: int) -> None:
    """Changing any byte of an envelope (key id, nonce, ciphertext or tag) makes it unreadable."""
    cipher = TokenCipher([OLD])
    envelope = bytearray(cipher.seal("fleet-eu", PLAINTEXT))
    envelope[position] ^= 0x01
    with pytest.raises(EnvelopeError):
        cipher.open("fleet-eu", bytes(envelope))


@pytest.mark.parametrize("envelope", [b"not an envelope", b"k-old:", b"k-old:short"])
def test_garbage_and_truncated_envelopes_do_not_open(envelope: bytes) -> None:
    """Bytes that are no envelope, or a cut-off one, are refused with EnvelopeError."""
    with pytest.raises(EnvelopeError):
        TokenCipher([OLD]).open("fleet-eu", envelope)


def test_a_context_is_bound_like_the_account() -> None:
    """An envelope sealed with a context (a record's version) opens only with that context;
    one sealed without any opens only without one."""
    cipher = TokenCipher([OLD])
    envelope = cipher.seal("fleet-eu", PLAINTEXT, b"v7")
    assert cipher.open("fleet-eu", envelope, b"v7") == PLAINTEXT
    for context in (b"v8", b""):
        with pytest.raises(EnvelopeError):
            cipher.open("fleet-eu", envelope, context)
    with pytest.raises(EnvelopeError):
        cipher.open("fleet-eu", cipher.seal("fleet-eu", PLAINTEXT), b"v7")
