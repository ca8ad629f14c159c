"""Client-side encryption of backup objects with AES-256-GCM (the `cryptography` library).

An encrypted object is a header and a run of frames, so objects of any size stream through in
bounded memory and any damage is caught:

    header:  b"FBENC1\\n" · key id (8 bytes) · nonce prefix (8 random bytes)
    frame:   ciphertext length (4 bytes, big-endian) · ciphertext with its 16-byte tag

Frame i is sealed with the nonce prefix · i (4 bytes) and the header plus a final-frame flag
as associated data: a frame altered, dropped, repeated, reordered or moved from another object
fails its tag, and an object cut short lacks its final frame. The key id (a digest of the key)
says which key opens an object, so a keyring of several keys reads objects written under any
of them while the first one encrypts: rotation without re-encrypting old backups.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"FBENC1\n"
HEADER_BYTES = len(MAGIC) + 8 + 8
FRAME_BYTES = 1 << 20  # plaintext per frame
TAG_BYTES = 16
MAX_FRAMES = 1 << 32


class EncryptionError(Exception):
    """An encrypted object that cannot be opened: damaged, cut short, or under another key."""


class KeyMissing(EncryptionError):
    """The object is encrypted under a key this server was not given (or under none at all)."""


def is_encrypted(head: bytes) -> bool:
    return head.startswith(MAGIC)


def parse_key(text: str) -> bytes:
    """A 256-bit key written as 64 hex digits or base64 (standard or URL-safe)."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None,
                               validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError("an encryption key must be 32 bytes, written as 64 hex digits or base64"
                         " (e.g. the output of: openssl rand -base64 32)")
    return key


def _named_key(header: bytes) -> str:
    """The key id an encrypted object's header names, as the refusals print it."""
    return f"key id {header[len(MAGIC) : len(MAGIC) + 8].hex()}"


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"fuckbase backup key id\x00" + key).digest()[:8]


class Keyring:
    """The keys a server holds: the first encrypts new objects, every one can open old ones."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._current = keys[0]
        self._by_id = {key_id(k): k for k in keys}

    @classmethod
    def load(cls, key_file: Path | None, key_text: str) -> Keyring | None:
        """Keys from a file (one per line, the current one first; # starts a comment) and from
        a text of comma-separated keys (the environment's); None when neither gives any."""
        texts: list[str] = []
        if key_text:
            texts += [t for t in key_text.split(",") if t.strip()]
        if key_file is not None:
            try:
                lines = key_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read the encryption key file {str(key_file)!r}: {exc.strerror}") from None
            texts += [line.split("#", 1)[0] for line in lines if line.split("#", 1)[0].strip()]
            if not texts:
                raise ValueError(f"the encryption key file {str(key_file)!r} holds no key")
        if not texts:
            return None
        return cls([parse_key(t) for t in texts])

    def encryptor(self) -> Encryptor:
        return Encryptor(self._current)

    def decryptor(self, header: bytes) -> Decryptor:
        key = self._by_id.get(header[len(MAGIC) : len(MAGIC) + 8])
        if key is None:
            raise KeyMissing(f"the backup is encrypted under a key this server was not given ({_named_key(header)})")
        return Decryptor(key, header)

    def seal(self, data: bytes) -> bytes:
        """A whole small object, encrypted."""
        enc = self.encryptor()
        return enc.update(data) + enc.finish()


class Encryptor:
    """Encrypts a stream: update() returns the bytes ready so far, finish() the rest."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._header = MAGIC + key_id(key) + os.urandom(8)
        self._pending = bytearray()
        self._frames = 0
        self._started = False

    def _seal(self, plaintext: bytes, final: bool) -> bytes:
        if self._frames >= MAX_FRAMES:
            raise EncryptionError("object too large to encrypt")
        nonce = self._header[-8:] + self._frames.to_bytes(4, "big")
        sealed = self._aead.encrypt(nonce, plaintext, self._header + (b"\x01" if final else b"\x00"))
        self._frames += 1
        return len(sealed).to_bytes(4, "big") + sealed

    def _head(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._header

    def update(self, data: bytes) -> bytes:
        self._pending += data
        out = [self._head()]
        while len(self._pending) > FRAME_BYTES:  # keep the last bytes back: they may be the final frame
            out.append(self._seal(bytes(self._pending[:FRAME_BYTES]), False))
            del self._pending[:FRAME_BYTES]
        return b"".join(out)

    def finish(self) -> bytes:
        head = self._head()
        last = self._seal(bytes(self._pending), True)
        self._pending.clear()
        return head + last


class Decryptor:
    """Decrypts a stream that begins with `header`: feed() returns the plaintext of every
    complete frame so far, finish() checks that the final frame came."""

    def __init__(self, key: bytes, header: bytes) -> None:
        self._aead = AESGCM(key)
        self._header = header[:HEADER_BYTES]
        self._buffer = bytearray(header[HEADER_BYTES:])
        self._frames = 0
        self._done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while len(self._buffer) >= 4:
            size = int.from_bytes(self._buffer[:4], "big")
            if size < TAG_BYTES or size > FRAME_BYTES + TAG_BYTES:
                raise EncryptionError("the encrypted object is damaged (a frame has an impossible length)")
            if len(self._buffer) < 4 + size:
                break
            if self._done:
                raise EncryptionError("the encrypted object has data after its final frame")
            sealed = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            out.append(self._open(sealed))
        return b"".join(out)

    def _open(self, sealed: bytes) -> bytes:
        nonce = self._header[-8:] + self._frames.to_bytes(4, "big")
        for final in (False, True):
            try:
                plain = self._aead.decrypt(nonce, sealed, self._header + (b"\x01" if final else b"\x00"))
            except InvalidTag:
                continue
            self._frames += 1
            self._done = final
            return plain
        raise EncryptionError("the encrypted object is damaged or was altered (a frame fails its check)")

    def finish(self) -> None:
        if self._buffer or not self._done:
            raise EncryptionError("the encrypted object is cut short (its final frame is missing)")


def open_sealed(keyring: Keyring | None, data: bytes) -> bytes:
    """A whole small object, decrypted when it is encrypted."""
    if not is_encrypted(data):
        return data
    if keyring is None:
        raise KeyMissing(f"the object is encrypted ({_named_key(data)}) and this server was given no encryption key")
    dec = keyring.decryptor(data[:HEADER_BYTES])
    plain = dec.feed(data[HEADER_BYTES:])
    dec.finish()
    return plain


class Unsealer:
    """Turns an object's stream into its plaintext, whether or not it is encrypted: the first
    bytes decide. Unencrypted objects (older backups, the original's) pass through."""

    def __init__(self, keyring: Keyring | None) -> None:
        self._keyring = keyring
        self._head = b""
        self._decryptor: Decryptor | None = None
        self._plain = False
        self.encrypted = False

    def feed(self, data: bytes) -> bytes:
        if self._plain:
            return data
        if self._decryptor is not None:
            return self._decryptor.feed(data)
        self._head += data
        if len(self._head) < HEADER_BYTES and MAGIC.startswith(self._head[: len(MAGIC)]):
            return b""  # too little yet to tell
        head, self._head = self._head, b""
        if not is_encrypted(head):
            self._plain = True
            return head
        self.encrypted = True
        if self._keyring is None:
            raise KeyMissing(f"the backup is encrypted ({_named_key(head)}) and this server was given no encryption key")
        self._decryptor = self._keyring.decryptor(head)
        return self._decryptor.feed(b"")

    def finish(self) -> bytes:
        """The bytes held back (an object shorter than a header); checks an encrypted end."""
        if self._decryptor is not None:
            self._decryptor.finish()
            return b""
        head, self._head = self._head, b""
        return head
