"""The PostgreSQL backend (`--storage postgresql://…`): stateless nodes sharing one database."""

from fuckbase.storage.postgresql.schema import SchemaTooNew
from fuckbase.storage.postgresql.store import PostgresStorage

__all__ = ["PostgresStorage", "SchemaTooNew"]
