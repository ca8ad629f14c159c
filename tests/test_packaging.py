"""How it is installed: the container files, and the client on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ServerProcess

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_is_valid() -> None:
    r = subprocess.run(["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "FUCKBASE_S3_ENDPOINT: minio:9000" in r.stdout
    assert "fuckbase-backups" in r.stdout


def test_dockerfile_runs_the_server_on_a_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir '.[server]'" in text
    assert 'ENTRYPOINT ["fuckbase"]' in text and "--data-dir" in text and "EXPOSE 8080" in text


CLIENT_SCRIPT = """
import sys
import fuckbase
from fuckbase import Client, KeyNotFound, FuckBaseError
for server_only in ("lmdb", "uvloop", "httptools", "obstore", "zstandard", "prometheus_client", "click", "orjson"):
    try:
        __import__(server_only)
    except ImportError:
        continue
    sys.exit(f"{server_only} came with the client")
with Client(sys.argv[1]) as c:
    users = c.create_database("from-client-only").create_set("users")
    users.put("u1", {"email": "a@x"})
    assert users.get("u1") == {"email": "a@x"}
    try:
        users.get("nope")
    except KeyNotFound as exc:
        assert isinstance(exc, FuckBaseError) and exc.code == "KEY_NOT_FOUND"
    else:
        sys.exit("no KeyNotFound")
print("client-only ok")
"""


def test_a_client_only_install_works_against_a_server(server: ServerProcess, tmp_path: Path) -> None:
    """`pip install fuckbase` (no extra) brings the client and httpx, nothing of the server."""
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True, text=True,
                         timeout=600)
    assert pip.returncode == 0, pip.stderr
    r = subprocess.run([str(venv / "bin" / "python"), "-c", CLIENT_SCRIPT, server.url], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "client-only ok" in r.stdout, r.stdout + r.stderr
    assert server.ok("/set/get", {"database": "from-client-only", "set": "users", "key": "u1"})["data"] == {"email": "a@x"}
    # the server command says what to install instead of a traceback
    r = subprocess.run([str(venv / "bin" / "fuckbase"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "pip install 'fuckbase[server]'" in r.stderr and "Traceback" not in r.stderr
