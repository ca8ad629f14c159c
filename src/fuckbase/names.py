"""The naming rules of the contract, shared by the API and by restores of backups."""

from __future__ import annotations

import re

from fuckbase.contract import (
    BACKUP_FOLDER_PATTERN,
    DB_NAME_PATTERN,
    MAX_KEY_BYTES,
    MAX_NAME_CHARS,
    MAX_SORT_FIELDS,
    OBJECT_NAME_PATTERN,
    RESERVED_DB_NAMES,
)

_DB_NAME = re.compile(DB_NAME_PATTERN)
_OBJECT_NAME = re.compile(OBJECT_NAME_PATTERN)
_BACKUP_FOLDER = re.compile(BACKUP_FOLDER_PATTERN)


def is_database_name(name: object) -> bool:
    """1-64 of A-Z a-z 0-9 _ - ., not "." or "..", and not the reserved "full"."""
    return isinstance(name, str) and bool(_DB_NAME.fullmatch(name)) and name not in RESERVED_DB_NAMES


def is_backup_folder(name: object) -> bool:
    """A database name as a backup's folder holds it: ours, or any the original took."""
    return isinstance(name, str) and bool(_BACKUP_FOLDER.fullmatch(name))


def is_object_name(name: object) -> bool:
    """A set or index name: 1-256 characters, no control characters."""
    return isinstance(name, str) and bool(_OBJECT_NAME.fullmatch(name))


def sort_fields_problem(fields: object) -> str | None:
    """What breaks the rules in a sortable index's sort fields (each a field name, as the
    primary field is), or None."""
    if not isinstance(fields, list) or not fields or not all(is_object_name(f) for f in fields):
        return (f'"sort_fields" must be a non-empty list of field names, each 1-{MAX_NAME_CHARS} characters'
                " without control characters")
    if len(set(fields)) != len(fields):
        return '"sort_fields" must not repeat a field'
    if len(fields) > MAX_SORT_FIELDS:
        return f'"sort_fields" may name at most {MAX_SORT_FIELDS} fields'
    return None


def is_key(key: object) -> bool:
    """1-1024 bytes of UTF-8."""
    if not isinstance(key, str) or not key:
        return False
    if len(key) <= MAX_KEY_BYTES // 4:  # at most 4 bytes per character: short enough
        return True
    try:
        return len(key.encode()) <= MAX_KEY_BYTES
    except UnicodeEncodeError:
        return False
