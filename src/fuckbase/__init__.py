"""FuckBase: a small, fast HTTP database with S3-compatible backups.

The client (`fuckbase.Client`, `fuckbase.AsyncClient`) is imported on first use, so the
server does not load an HTTP client library it never uses.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fuckbase.client import AsyncClient as AsyncClient
    from fuckbase.client import Client as Client
    from fuckbase.client import Entry as Entry
    from fuckbase.client import FuckBaseError as FuckBaseError
    from fuckbase.client import Page as Page

_CLIENT_EXPORTS = {"AsyncClient", "Client", "Entry", "FuckBaseError", "Page"}


def __getattr__(name: str) -> object:
    if name in _CLIENT_EXPORTS:
        from fuckbase import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
