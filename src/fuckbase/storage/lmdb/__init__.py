"""The embedded LMDB backend (the default): one directory, any number of local processes."""

from fuckbase.storage.lmdb.store import LmdbStorage, NotUpgraded

__all__ = ["LmdbStorage", "NotUpgraded"]
