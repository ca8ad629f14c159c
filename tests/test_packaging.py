"""The container files: docker-compose.yml validates, the Dockerfile installs this package."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_is_valid() -> None:
    r = subprocess.run(["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "FUCKBASE_S3_ENDPOINT: minio:9000" in r.stdout
    assert "fuckbase-backups" in r.stdout


def test_dockerfile_runs_the_server_on_a_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in text
    assert 'ENTRYPOINT ["fuckbase"]' in text and "--data-dir" in text and "EXPOSE 8080" in text
