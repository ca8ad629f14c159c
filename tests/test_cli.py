"""Configuration: flags beat environment beat defaults; bad configuration fails in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FUCKBASE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fuckbase", *args], capture_output=True, text=True, env=full_env, timeout=30
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--port", "70000"], {}, "port 70000 is out of range"),
        (["--port", "abc"], {}, "'abc' is not a valid integer"),
        ([], {"FUCKBASE_PORT": "0"}, "port 0 is out of range"),
        (["--bogus"], {}, "No such option"),
        (["--data-dir", "/proc/version/x"], {}, "cannot be created"),
        (["--log-level", "loud"], {}, "loud"),
        (["--durability", "maybe"], {}, "maybe"),
        (["--admin-username", "root"], {}, "admin username and admin password must be given together"),
        (["--backup-interval", "-1"], {}, "backup interval"),
        (["--request-threads", "0"], {}, "request threads must be 1-256"),
        (["--workers", "0"], {}, "workers must be 1-64"),
        (["--storage", "mysql://db/x"], {}, "storage must be a postgresql:// URL"),
    ],
)
def test_bad_configuration_fails_in_one_line(args: list[str], env: dict[str, str], needle: str, tmp_path: Path) -> None:
    extra = [] if "--data-dir" in args else ["--data-dir", str(tmp_path / "d")]
    r = run_cli(*args, *extra, env=env)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert r.stdout == ""


def test_an_unreachable_postgresql_stops_the_start_with_one_line_and_no_password(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    r = run_cli("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "d"), env={
        "FUCKBASE_STORAGE": "postgresql://u:hunter2@127.0.0.1:1/db"})
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fuckbase: error: cannot open the data in postgresql://u:***@127.0.0.1:1/db"), r.stderr
    assert "PostgreSQL is unavailable" in last
    assert "hunter2" not in r.stdout + r.stderr


def test_port_in_use(tmp_path: Path, make_server: Any) -> None:
    srv = make_server()
    r = run_cli("--host", "127.0.0.1", "--port", str(srv.port), "--data-dir", str(tmp_path / "other"))
    assert r.returncode != 0
    assert "cannot listen" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_every_flag_and_env() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ["--port", "--host", "--data-dir", "--admin-username", "--admin-password", "--log-level",
                 "--log-file", "--s3-endpoint", "--s3-bucket", "--s3-access-key", "--s3-secret-key",
                 "--s3-region", "--backup-interval", "--durability", "--max-body-size", "--request-threads"]:
        assert flag in r.stdout
    assert "FUCKBASE_PORT" in r.stdout and "FUCKBASE_LOG_FILE" in r.stdout


def test_flag_beats_env_beats_default(make_server: Any, tmp_path: Path) -> None:
    # env sets the log file; the flag --log-level error silences the access log
    log_file = tmp_path / "fb.log"
    srv = make_server(env={"FUCKBASE_LOG_FILE": str(log_file), "FUCKBASE_LOG_LEVEL": "info"}, args=["--log-level", "error"])
    srv.ok("/create", {"name": "d"})
    srv.stop()
    assert log_file.exists()
    assert "access" not in log_file.read_text()


def test_access_log_and_log_file(make_server: Any, tmp_path: Path) -> None:
    log_file = tmp_path / "fb.log"
    srv = make_server(args=["--log-file", str(log_file), "--admin-username", "root", "--admin-password", "topsecret"])
    srv.post("/create", {"name": "d"})
    srv.stop()
    text = log_file.read_text()
    assert "access POST /create 401" in text
    assert "topsecret" not in text


def test_unreadable_data_fails_in_one_line(tmp_path: Path) -> None:
    """The worker opens the data; its failure still reaches the operator as one line."""
    store = tmp_path / "d" / "store"
    store.mkdir(parents=True)
    (store / "data.mdb").write_bytes(os.urandom(16384))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = run_cli("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot open the data" in lines[0], r.stderr
