"""Server settings: one immutable object built by the CLI from flags, environment and defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from fuckbase.encryption import Keyring

DURABILITY_MODES = ("os", "fsync")
LOG_LEVELS = ("debug", "info", "warn", "error")
COMPRESSIONS = ("none", "gzip", "zstd")


def default_workers() -> int:
    """One worker process per core the process may run on, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


class ConfigError(ValueError):
    """Configuration that cannot work; reported as one line before anything binds."""


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """A duration such as 90s, 30m, 12h, 7d or 2w (a plain number is days)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None:
        raise ConfigError(f"backup retention age {text!r} must look like 90s, 30m, 12h, 7d or 2w")
    return float(m.group(1)) * _UNITS[m.group(2) or "d"]


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = ""
    bucket: str = ""
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    region: str = "us-east-1"
    timeout: float = 30.0  # seconds per storage step before a backup request fails

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8080
    data_dir: Path = Path("./data")
    storage: str = field(default="", repr=False)  # a postgresql:// URL (may hold a password); "": the embedded engine
    admin_username: str = ""
    admin_password: str = field(default="", repr=False)
    log_level: str = "info"
    log_file: str = ""
    access_log: bool = True
    durability: str = "os"
    max_body_bytes: int = 16 * 1024 * 1024
    request_threads: int = 4
    read_timeout: float = 30.0
    storage_timeout: float = 60.0  # PostgreSQL: its statement timeout, and how long a request waits
    workers: int = 1
    s3: S3Settings = field(default_factory=S3Settings)
    backup_dir: Path | None = None
    backup_interval_minutes: float | None = None
    backup_retention: int = 0
    backup_compression: str = "none"
    restore_on_start: str = ""
    backup_continuous: bool | None = None
    backup_sync_interval: float = 1.0
    backup_snapshot_interval_minutes: float = 60.0
    backup_snapshot_changes: int = 200_000
    backup_retention_age: float | None = None  # seconds of point-in-time window kept; None: all
    backup_keep_daily: int = 0
    backup_keep_weekly: int = 0
    backup_keep_monthly: int = 0
    backup_encryption_key_file: Path | None = None
    backup_encryption_key: str = field(default="", repr=False)  # comma-separated, the current one first

    @property
    def effective_backup_dir(self) -> Path:
        return self.backup_dir if self.backup_dir is not None else self.data_dir / "backups"

    @property
    def effective_backup_interval(self) -> float:
        """Minutes between automatic backups: 60 with S3 as in the original, off for the local folder."""
        if self.backup_interval_minutes is not None:
            return self.backup_interval_minutes
        return 60.0 if self.s3.enabled else 0.0

    @property
    def effective_backup_continuous(self) -> bool:
        """Continuous backup: on by default with S3, off for the local folder."""
        return self.backup_continuous if self.backup_continuous is not None else self.s3.enabled

    @property
    def storage_label(self) -> str:
        """Where the data lives, fit for logs and errors: a URL without its password."""
        if not self.storage:
            return str(self.data_dir)
        parts = urlsplit(self.storage)
        if parts.password is None:
            return self.storage
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}{port}"))

    def keyring(self) -> Keyring | None:
        """The backup encryption keys, or None: backups are then written unencrypted."""
        from fuckbase.encryption import Keyring

        return Keyring.load(self.backup_encryption_key_file, self.backup_encryption_key)

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range 1-65535")
        if self.durability not in DURABILITY_MODES:
            raise ConfigError(f"durability must be one of {', '.join(DURABILITY_MODES)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        if self.max_body_bytes < 1024:
            raise ConfigError("max body size must be at least 1024 bytes")
        if not 1 <= self.request_threads <= 256:
            raise ConfigError("request threads must be 1-256")
        if self.read_timeout <= 0:
            raise ConfigError("read timeout must be > 0 seconds")
        if self.storage_timeout <= 0:
            raise ConfigError("storage timeout must be > 0 seconds")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be 1-64")
        if self.backup_interval_minutes is not None and self.backup_interval_minutes < 0:
            raise ConfigError("backup interval must be >= 0 minutes")
        if self.s3.timeout <= 0:
            raise ConfigError("S3 timeout must be > 0 seconds")
        if self.backup_retention < 0:
            raise ConfigError("backup retention must be >= 0")
        if self.backup_compression not in COMPRESSIONS:
            raise ConfigError(f"backup compression must be one of {', '.join(COMPRESSIONS)}")
        if not 0.05 <= self.backup_sync_interval <= 3600:
            raise ConfigError("backup sync interval must be 0.05-3600 seconds")
        if self.backup_snapshot_interval_minutes <= 0:
            raise ConfigError("backup snapshot interval must be > 0 minutes")
        if self.backup_retention_age is not None and self.backup_retention_age <= 0:
            raise ConfigError("backup retention age must be > 0")
        if min(self.backup_keep_daily, self.backup_keep_weekly, self.backup_keep_monthly) < 0:
            raise ConfigError("the numbers of daily, weekly and monthly snapshots kept must be >= 0")
        if self.backup_snapshot_changes < 1:
            raise ConfigError("backup snapshot changes must be >= 1")
        try:
            self.keyring()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.storage and not self.storage.startswith(("postgresql://", "postgres://")):
            raise ConfigError("storage must be a postgresql:// URL (or empty for the embedded engine in the data dir)")
        if bool(self.admin_username) != bool(self.admin_password):
            raise ConfigError("admin username and admin password must be given together")
        if self.s3.enabled and bool(self.s3.access_key) != bool(self.s3.secret_key):
            raise ConfigError("S3 access key and secret key must be given together")
        _check_writable_dir(self.data_dir, "data dir")

def _check_writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {exc.strerror}") from None
    if not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r} is not writable")
    probe = path / ".write-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not writable: {exc.strerror}") from None
