"""Credentials: Basic headers or body fields, hashed database passwords, constant-time checks.

Database passwords are stored as scrypt hashes. Checking scrypt on every request would cost
tens of milliseconds, so a credential that verified once is remembered as a keyed digest
(HMAC with a per-process random key), compared in constant time on later requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from fuckbase.contract import ErrorCode
from fuckbase.errors import ApiError, invalid
from fuckbase.storage import AccessCheck, Credentials

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_PROCESS_KEY = os.urandom(32)


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def make_db_auth(username: str, password: str) -> dict[str, str]:
    """The stored form of a database's credentials: never the password itself."""
    return {"username": username, "hash": hash_password(password)}


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic …` header value, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def body_credentials(body: dict[str, Any], field: str) -> tuple[str, str] | None:
    """(user, password) from a body object such as `"auth": {"username", "password"}`. As
    the original reads it, a part left out or null is empty, and an object with neither
    (clients that fill it from unset variables send `{}`) is no credentials at all."""
    raw = body.get(field)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid(f'"{field}" must be an object with "username" and "password"')
    user, password = raw.get("username"), raw.get("password")
    if user is None and password is None:
        return None
    if not isinstance(user, str | None) or not isinstance(password, str | None):
        raise invalid(f'"{field}" must have string "username" and "password"')
    return user or "", password or ""


class AdminGuard:
    """Checks the admin credentials, when an admin user is configured."""

    def __init__(self, username: str, password: str) -> None:
        self.enabled = bool(username)
        self._user = username.encode()
        self._password = password.encode()

    def check(self, header: str | None, body: dict[str, Any]) -> None:
        if not self.enabled:
            return
        creds = parse_basic(header) or body_credentials(body, "admin_auth")
        ok = False
        if creds is not None:
            user_ok = hmac.compare_digest(creds[0].encode(), self._user)
            password_ok = hmac.compare_digest(creds[1].encode(), self._password)
            ok = user_ok and password_ok
        if not ok:
            raise ApiError(401, ErrorCode.ADMIN_AUTH_REQUIRED, "Admin authentication required")


class NeedsVerification(Exception):
    """A credential this process has not verified yet. Checking it costs tens of milliseconds
    of scrypt, so an event loop catches this, has `PasswordChecks` run `verify` and retries."""

    def __init__(self, guard: DatabaseGuard, stored: Credentials, creds: tuple[str, str]) -> None:
        super().__init__("credentials need verifying")
        self._guard = guard
        self._stored = stored
        self._creds = creds
        self.token = _token(creds) + stored["hash"].encode()  # this credential against this hash

    def verify(self) -> bool:
        """Blocking; remembers a success, so the retried request passes at once."""
        if self._guard.remembers(self._stored, self._creds):  # verified while this one waited
            return True
        return self._guard.verify(self._stored, self._creds)


class TooManyChecks(Exception):
    """Password checks refused for now: the client failed too often, or too many are queued."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PasswordChecks:
    """Runs the scrypt checks of one process so that guessing cannot slow anyone else down.

    One thread, at the lowest CPU priority, hashes; at most MAX_QUEUED distinct checks wait
    for it, and the same credential asked for by many requests at once is hashed once. A
    client address whose checks failed FREE_FAILURES times in a row must then wait a back-off
    that doubles with each further failure (up to MAX_BACKOFF seconds) and is refused with
    429 meanwhile; a success clears it. Credentials verified before never reach here.
    """

    MAX_QUEUED = 8
    FREE_FAILURES = 5
    MAX_BACKOFF = 60.0
    MAX_CLIENTS = 10_000

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="scrypt", initializer=_lowest_priority)
        self._running: dict[bytes, asyncio.Future[bool]] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures in a row, refused until)

    async def verify(self, pending: NeedsVerification, client: str) -> bool:
        now = time.monotonic()
        failures, until = self._failures.get(client, (0, 0.0))
        if until > now:
            raise TooManyChecks("too many failed authentication attempts; retry later", math.ceil(until - now))
        running = self._running.get(pending.token)
        if running is None:
            if len(self._running) >= self.MAX_QUEUED:
                raise TooManyChecks("too many authentication checks under way; retry shortly", 1)
            running = asyncio.get_running_loop().run_in_executor(self._executor, pending.verify)
            self._running[pending.token] = running
            running.add_done_callback(lambda _: self._running.pop(pending.token, None))
        ok = await asyncio.shield(running)
        if ok:
            self._failures.pop(client, None)
        else:
            self._failed(client, failures + 1)
        return ok

    def _failed(self, client: str, failures: int) -> None:
        if len(self._failures) >= self.MAX_CLIENTS:
            self._failures.clear()  # bounded memory; a guesser only regains its free tries
        wait = 0.0 if failures < self.FREE_FAILURES else min(self.MAX_BACKOFF, 2.0 ** (failures - self.FREE_FAILURES))
        self._failures[client] = (failures, time.monotonic() + wait)


def _lowest_priority() -> None:
    """Linux applies a nice value to one thread: hashing yields the CPU to request handling."""
    with suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class DatabaseGuard:
    """Checks per-database credentials against their stored hash, remembering successes.

    `inline=True` (threads that may block) verifies at once; otherwise an unverified
    credential raises NeedsVerification.
    """

    def __init__(self, inline: bool = True) -> None:
        self._verified: dict[str, bytes] = {}
        self._inline = inline

    def check(self, stored: Credentials, header: str | None, body: dict[str, Any]) -> None:
        creds = parse_basic(header) or body_credentials(body, "auth")
        if creds is None:
            raise ApiError(401, ErrorCode.AUTH_FAILED, "Authentication failed")
        if self.remembers(stored, creds):
            return
        if not self._inline:
            raise NeedsVerification(self, stored, creds)
        if not self.verify(stored, creds):
            raise ApiError(401, ErrorCode.AUTH_FAILED, "Authentication failed")

    def access(self, header: str | None, body: dict[str, Any]) -> AccessCheck:
        """The AccessCheck a storage write calls with the database's stored credentials."""

        def check(stored: Credentials | None) -> None:
            if stored:
                self.check(stored, header, body)

        return check

    def remembers(self, stored: Credentials, creds: tuple[str, str]) -> bool:
        remembered = self._verified.get(stored["hash"])
        return remembered is not None and hmac.compare_digest(remembered, _token(creds))

    def verify(self, stored: Credentials, creds: tuple[str, str]) -> bool:
        user, password = creds
        user_ok = hmac.compare_digest(user.encode(), stored["username"].encode())
        password_ok = verify_password(password, stored["hash"])  # scrypt releases the GIL
        if user_ok and password_ok:
            self._verified[stored["hash"]] = _token(creds)
        return user_ok and password_ok


def _token(creds: tuple[str, str]) -> bytes:
    return hmac.new(_PROCESS_KEY, f"{creds[0]}\0{creds[1]}".encode(), hashlib.sha256).digest()
