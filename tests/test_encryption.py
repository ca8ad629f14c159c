"""Client-side encryption of backups: the framing itself, then real servers with and without keys."""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess

from fuckbase.encryption import (
    FRAME_BYTES,
    HEADER_BYTES,
    MAGIC,
    EncryptionError,
    KeyMissing,
    Keyring,
    Unsealer,
    key_id,
    open_sealed,
    parse_key,
)

OLD, NEW = os.urandom(32), os.urandom(32)


def encrypt(ring: Keyring, data: bytes, rng: random.Random) -> bytes:
    enc = ring.encryptor()
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, FRAME_BYTES // 2)
        out.append(enc.update(data[pos : pos + n]))
        pos += n
    return b"".join(out) + enc.finish()


def decrypt(ring: Keyring | None, sealed: bytes, rng: random.Random) -> bytes:
    u = Unsealer(ring)
    out, pos = [], 0
    while pos < len(sealed):
        n = rng.choice([1, 7, 100, 65536, FRAME_BYTES + 3])
        out.append(u.feed(sealed[pos : pos + n]))
        pos += n
    out.append(u.finish())
    return b"".join(out)


@pytest.mark.parametrize("size", [0, 1, FRAME_BYTES - 1, FRAME_BYTES, FRAME_BYTES + 1, 3 * FRAME_BYTES + 5])
def test_round_trip_in_any_chunking(size: int) -> None:
    rng = random.Random(size)
    data = os.urandom(size)
    ring = Keyring([NEW])
    sealed = encrypt(ring, data, rng)
    assert sealed.startswith(MAGIC) and sealed[len(MAGIC) : len(MAGIC) + 8] == key_id(NEW)
    assert data[:64] not in sealed or size < 16  # a byte or two of random data may well occur in the ciphertext
    assert decrypt(ring, sealed, rng) == data
    assert open_sealed(ring, sealed) == data


def test_every_kind_of_damage_is_caught() -> None:
    ring = Keyring([NEW])
    data = os.urandom(2 * FRAME_BYTES + 10)
    sealed = ring.seal(data)
    frame = 4 + FRAME_BYTES + 16
    first, second = HEADER_BYTES, HEADER_BYTES + frame
    damaged = {
        "flipped": sealed[:5000] + bytes([sealed[5000] ^ 1]) + sealed[5001:],
        "flipped header": sealed[:10] + bytes([sealed[10] ^ 1]) + sealed[11:],
        "cut": sealed[:-1],
        "final frame dropped": sealed[: second + frame],
        "frame dropped": sealed[:second] + sealed[second + frame :],
        "frames swapped": sealed[:first] + sealed[second : second + frame] + sealed[first:second]
        + sealed[second + frame :],
        "appended": sealed + sealed[first : first + 40],
        "other object's frame": sealed[:first] + ring.seal(data)[first:],
    }
    for what, bad in damaged.items():
        with pytest.raises(EncryptionError):
            decrypt(ring, bad, random.Random(1))
            pytest.fail(what)


def test_keys_rotate_and_a_missing_key_is_named() -> None:
    old = Keyring([OLD]).seal(b"written under the old key")
    rotated = Keyring([NEW, OLD])
    assert open_sealed(rotated, old) == b"written under the old key"
    new = rotated.seal(b"new")
    assert new[len(MAGIC) : len(MAGIC) + 8] == key_id(NEW)
    with pytest.raises(KeyMissing, match="key id"):
        open_sealed(Keyring([OLD]), new)
    with pytest.raises(KeyMissing, match="no encryption key"):
        open_sealed(None, new)
    assert open_sealed(None, b'{"plain": true}') == b'{"plain": true}'  # unencrypted objects pass


def test_key_formats_and_files(tmp_path: Path) -> None:
    key = os.urandom(32)
    for text in (key.hex(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode().rstrip("="),
                 f"  {key.hex()}\n"):
        assert parse_key(text) == key
    for bad in ("", "abc", os.urandom(16).hex(), base64.b64encode(os.urandom(31)).decode(), "!" * 44):
        with pytest.raises(ValueError, match="32 bytes"):
            parse_key(bad)
    f = tmp_path / "keys"
    f.write_text(f"# current\n{NEW.hex()}\n\n{base64.b64encode(OLD).decode()}  # last year's\n")
    ring = Keyring.load(f, "")
    assert ring is not None and open_sealed(ring, Keyring([OLD]).seal(b"x")) == b"x"
    assert ring.seal(b"y")[len(MAGIC) : len(MAGIC) + 8] == key_id(NEW)
    assert Keyring.load(None, "") is None
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        Keyring.load(tmp_path / "empty", "")
    with pytest.raises(ValueError, match="cannot read"):
        Keyring.load(tmp_path / "missing", "")


# ------------------------------------------------------------------ servers


def keyed(*keys: bytes) -> dict[str, str]:
    return {"FUCKBASE_BACKUP_ENCRYPTION_KEY": ",".join(base64.b64encode(k).decode() for k in keys)}


def objects(srv: ServerProcess, backups: Path) -> dict[str, bytes]:
    return {str(p.relative_to(backups)): p.read_bytes() for p in backups.rglob("*") if p.is_file()}


def test_backups_are_encrypted_and_need_their_key(make_server: Any, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    plain = make_server(["--backup-dir", str(backups)], data_dir=tmp_path / "a")
    plain.ok("/create", {"name": "shop"})
    plain.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": "unencrypted-value"})
    unencrypted = plain.ok("/backup/create", {"database": "shop"})["backup_name"]
    plain.stop()

    srv = make_server(["--backup-dir", str(backups)], env=keyed(OLD), data_dir=tmp_path / "a")
    assert srv.ok("/server/info")["backup_encryption"] is True
    srv.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": "secret-value"})
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    full = srv.ok("/backup/create", {})["backup_name"]
    stored = objects(srv, backups)
    for key in (name, name + ".sha256", full, full + ".sha256"):
        assert stored[key].startswith(MAGIC), key
        assert b"secret-value" not in stored[key] and b"shop" not in stored[key]
    assert srv.ok("/backup/verify", {"backup_name": name})["checksum"] == "verified"
    srv.ok("/backup/restore", {"backup_name": unencrypted})  # older, unencrypted backups still restore
    assert srv.ok("/set/get", {"database": "shop", "set": "s", "key": "k"})["data"] == "unencrypted-value"
    srv.ok("/backup/restore", {"backup_name": name})
    assert srv.ok("/set/get", {"database": "shop", "set": "s", "key": "k"})["data"] == "secret-value"
    srv.stop()

    for env in ({}, keyed(NEW)):  # no key, or the wrong one: refused, and nothing changes
        other = make_server(["--backup-dir", str(backups)], env=env, data_dir=tmp_path / "a")
        other.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": "now"})
        for path in ("/backup/restore", "/backup/verify"):
            r = other.post(path, {"backup_name": name})
            assert (r.status_code, r.json()["code"]) == (422, "BACKUP_ENCRYPTED"), r.text
            assert f"key id {key_id(OLD).hex()}" in r.json()["message"], r.text  # the key it needs
        assert other.ok("/set/get", {"database": "shop", "set": "s", "key": "k"})["data"] == "now"
        other.stop()

    key_file = tmp_path / "keys"
    key_file.write_text(f"{NEW.hex()}\n{OLD.hex()}\n")
    rotated = make_server(["--backup-dir", str(backups), "--backup-encryption-key-file", str(key_file)],
                          data_dir=tmp_path / "a")
    rotated.ok("/backup/restore", {"backup_name": name})  # the old key still opens old backups
    assert rotated.ok("/set/get", {"database": "shop", "set": "s", "key": "k"})["data"] == "secret-value"
    newer = rotated.ok("/backup/create", {"database": "shop"})["backup_name"]
    assert (backups / newer).read_bytes()[len(MAGIC) : len(MAGIC) + 8] == key_id(NEW)


def test_continuous_backup_is_encrypted_too(make_server: Any, tmp_path: Path) -> None:
    srv = make_server(["--backup-continuous", "--backup-sync-interval", "0.2"], env=keyed(NEW))
    deadline = time.monotonic() + 20
    while not srv.ok("/server/info").get("continuous", {}).get("window") and time.monotonic() < deadline:
        time.sleep(0.1)  # the window opens with the first base snapshot
    srv.ok("/create", {"name": "shop"})
    srv.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": "secret-value"})
    time.sleep(0.05)
    at = time.time()
    time.sleep(0.05)
    srv.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": "later"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        latest = srv.ok("/server/info").get("continuous", {}).get("window", {}).get("latest")
        if latest and datetime.fromisoformat(latest).timestamp() > at + 0.5:
            break
        time.sleep(0.1)
    stream = srv.data_dir / "backups" / "continuous"
    files = [p for p in stream.rglob("*.zst")] + [p for p in stream.rglob("*.sha256")] + [
        p for p in stream.rglob("databases.json")]
    assert any("/segments/" in str(p) for p in files) and any("/snapshots/" in str(p) for p in files)
    assert any(p.name == "databases.json" for p in files)
    assert b'"shop"' not in next(p for p in files if p.name == "databases.json").read_bytes()
    assert "shop" in srv.ok("/backup/list")["point_in_time"]["databases"]  # opened with the key
    for p in files:
        assert p.read_bytes().startswith(MAGIC), p
        assert b"secret-value" not in p.read_bytes()
    instant = datetime.fromtimestamp(at, UTC).isoformat()
    srv.ok("/backup/restore", {"at": instant})
    assert srv.ok("/set/get", {"database": "shop", "set": "s", "key": "k"})["data"] == "secret-value"
    srv.stop()
    keyless = make_server(["--backup-dir", str(srv.data_dir / "backups"), "--no-backup-continuous"],
                          data_dir=tmp_path / "keyless")
    r = keyless.post("/backup/restore", {"at": instant})
    assert (r.status_code, r.json()["code"]) == (422, "BACKUP_ENCRYPTED"), r.text


@pytest.mark.parametrize("env", [{"FUCKBASE_BACKUP_ENCRYPTION_KEY": "too-short"},
                                 {"FUCKBASE_BACKUP_ENCRYPTION_KEY_FILE": "/nonexistent/keys"}])
def test_a_bad_key_stops_the_start_with_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUCKBASE_")}
    r = subprocess.run([sys.executable, "-m", "fuckbase", "--data-dir", str(tmp_path / "d"), "--port", "1"],
                       env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuckbase: error:") and "key" in lines[0], r.stderr
    assert "too-short" not in r.stderr
