"""The README's Python example runs as written against a fresh server."""

from __future__ import annotations

from pathlib import Path

from conftest import ServerProcess


def test_readme_client_example(server: ServerProcess, capsys: object) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8080" in code
    exec(compile(code.replace("http://127.0.0.1:8080", server.url), "README.md", "exec"), {})
