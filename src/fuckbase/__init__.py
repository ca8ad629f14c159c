"""FuckBase: a small, fast HTTP database with S3-compatible backups.

Every public name of the client (`Client`, `AsyncClient`, their errors, `Page`, `Entry` …)
is importable from here. They load on first use, so the server does not import an HTTP
client library it never uses, and a client-only install (`pip install fuckbase`, without
the `server` extra) needs nothing else.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fuckbase.client import *  # noqa: F403


def __getattr__(name: str) -> object:
    client = import_module("fuckbase.client")
    if name in client.__all__:
        return getattr(client, name)
    if name == "client":  # `from fuckbase import client` before it was imported
        return client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *import_module("fuckbase.client").__all__])
