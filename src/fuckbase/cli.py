"""The `fuckbase` command: flags (each with its FUCKBASE_* environment twin) to Settings.

`fuckbase [--port …]` serves, exactly as the original's command line does; subcommands do
other jobs. Bad configuration ends the process with one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from fuckbase import __version__
from fuckbase.config import (
    COMPRESSIONS,
    DURABILITY_MODES,
    LOG_LEVELS,
    ConfigError,
    S3Settings,
    Settings,
    default_workers,
    parse_age,
)


def _opt(*decls: str, env: str, **kw: Any) -> Any:
    return click.option(*decls, envvar=env, show_envvar=True, **kw)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_opt("--port", env="FUCKBASE_PORT", type=int, default=8080, show_default=True, help="TCP port to listen on.")
@_opt("--host", env="FUCKBASE_HOST", default="0.0.0.0", show_default=True, help="Address to bind.")
@_opt(
    "--data-dir",
    env="FUCKBASE_DATA_DIR",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("./data"),
    show_default=True,
    help="Where the data lives (created if missing).",
)
@_opt(
    "--storage",
    env="FUCKBASE_STORAGE",
    default="",
    help="A postgresql://user[:password]@host:port/db URL: the data lives in that PostgreSQL database,"
    " shared by every node given it. Default: the embedded engine in --data-dir.",
)
@_opt("--admin-username", env="FUCKBASE_ADMIN_USERNAME", default="", help="Admin user; enables admin auth.")
@_opt("--admin-password", env="FUCKBASE_ADMIN_PASSWORD", default="", help="Admin password.")
@_opt(
    "--log-level",
    env="FUCKBASE_LOG_LEVEL",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Log verbosity; info and debug include the access log.",
)
@_opt("--log-file", env="FUCKBASE_LOG_FILE", default="", help="Log to this file instead of stdout.")
@_opt(
    "--access-log/--no-access-log",
    env="FUCKBASE_ACCESS_LOG",
    default=True,
    show_default=True,
    help="One line per request at log level info or debug.",
)
@_opt(
    "--durability",
    env="FUCKBASE_DURABILITY",
    type=click.Choice(DURABILITY_MODES),
    default="os",
    show_default=True,
    help="os: a write is acknowledged once the OS has it (survives kill -9; fsync every second). "
    "fsync: acknowledged only after fsync (survives power loss).",
)
@_opt(
    "--max-body-size",
    env="FUCKBASE_MAX_BODY_SIZE",
    type=int,
    default=16 * 1024 * 1024,
    show_default=True,
    help="Largest request body in bytes; larger ones get 413.",
)
@_opt(
    "--workers",
    env="FUCKBASE_WORKERS",
    type=int,
    default=None,
    help="Worker processes serving HTTP. Default: one per CPU core, at most 8.",
)
@_opt(
    "--storage-timeout",
    env="FUCKBASE_STORAGE_TIMEOUT",
    type=float,
    default=60.0,
    show_default=True,
    help="PostgreSQL: seconds a statement may run, and a request wait for the database; then 503.",
)
@_opt(
    "--read-timeout",
    env="FUCKBASE_READ_TIMEOUT",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds a request may take to arrive whole; slower ones get 408 and are closed.",
)
@_opt(
    "--request-threads",
    env="FUCKBASE_REQUEST_THREADS",
    type=int,
    default=4,
    show_default=True,
    help="Long operations (index builds, password hashing) that run at once; more wait their turn. "
    "Short requests never wait for them. With --storage postgresql://…, also each worker's reads at once.",
)
@_opt("--s3-endpoint", env="FUCKBASE_S3_ENDPOINT", default="", help="host:port (plain http), http(s)://…, or empty for AWS.")
@_opt("--s3-bucket", env="FUCKBASE_S3_BUCKET", default="", help="Bucket for backups; enables S3.")
@_opt("--s3-access-key", env="FUCKBASE_S3_ACCESS_KEY", default="", help="S3 access key id.")
@_opt("--s3-secret-key", env="FUCKBASE_S3_SECRET_KEY", default="", help="S3 secret key (never logged).")
@_opt("--s3-region", env="FUCKBASE_S3_REGION", default="us-east-1", show_default=True, help="S3 region.")
@_opt(
    "--s3-timeout",
    env="FUCKBASE_S3_TIMEOUT",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds one storage step may take (retries included) before the request fails.",
)
@_opt(
    "--backup-interval",
    env="FUCKBASE_BACKUP_INTERVAL",
    type=float,
    default=None,
    help="Minutes between automatic full backups; 0 disables. Default: 60 with S3, off otherwise.",
)
@_opt(
    "--backup-dir",
    env="FUCKBASE_BACKUP_DIR",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Local backup folder when no S3 bucket is set. Default: <data-dir>/backups.",
)
@_opt("--backup-retention", env="FUCKBASE_BACKUP_RETENTION", type=int, default=0, help="Keep the newest N automatic backups (0: all).")
@_opt(
    "--backup-compression",
    env="FUCKBASE_BACKUP_COMPRESSION",
    type=click.Choice(COMPRESSIONS),
    default="none",
    show_default=True,
    help="Compression of new backups.",
)
@_opt(
    "--restore-on-start",
    env="FUCKBASE_RESTORE_ON_START",
    default="",
    help="'latest' (the newest change of the continuous backup, else the newest full backup) or a "
    "backup name: restore it when the data dir is empty at startup.",
)
@_opt(
    "--backup-continuous/--no-backup-continuous",
    env="FUCKBASE_BACKUP_CONTINUOUS",
    default=None,
    help="Ship every change to the backup target within the sync interval, for point-in-time restores. "
    "Default: on with S3, off for the local folder.",
)
@_opt(
    "--backup-sync-interval",
    env="FUCKBASE_BACKUP_SYNC_INTERVAL",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds within which a committed change reaches the backup target (continuous backup).",
)
@_opt(
    "--backup-snapshot-interval",
    env="FUCKBASE_BACKUP_SNAPSHOT_INTERVAL",
    type=float,
    default=60.0,
    show_default=True,
    help="Minutes between the base snapshots of continuous backup (taken only when something changed).",
)
@_opt(
    "--backup-snapshot-changes",
    env="FUCKBASE_BACKUP_SNAPSHOT_CHANGES",
    type=int,
    default=200_000,
    show_default=True,
    help="Changes after which continuous backup takes a new base snapshot, bounding what a restore replays.",
)
@_opt(
    "--backup-retention-age",
    env="FUCKBASE_BACKUP_RETENTION_AGE",
    default="",
    help="How far back point-in-time restores reach (e.g. 7d, 12h); older continuous-backup objects no "
    "longer needed are deleted. Default: keep everything. Named backups are never touched.",
)
@_opt("--backup-keep-daily", env="FUCKBASE_BACKUP_KEEP_DAILY", type=int, default=0, show_default=True,
      help="Beyond the retention age, keep the newest base snapshot of each of this many days.")
@_opt("--backup-keep-weekly", env="FUCKBASE_BACKUP_KEEP_WEEKLY", type=int, default=0, show_default=True,
      help="… and of this many ISO weeks.")
@_opt("--backup-keep-monthly", env="FUCKBASE_BACKUP_KEEP_MONTHLY", type=int, default=0, show_default=True,
      help="… and of this many months.")
@_opt(
    "--backup-encryption-key-file",
    env="FUCKBASE_BACKUP_ENCRYPTION_KEY_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Encrypt every backup object (AES-256-GCM) with the first key in this file; the other keys "
    "(one per line) still open older backups. A key: 32 bytes as base64 or hex (openssl rand -base64 32).",
)
@_opt(
    "--backup-encryption-key",
    env="FUCKBASE_BACKUP_ENCRYPTION_KEY",
    default="",
    help="The same keys given directly, comma-separated, the current one first (prefer the environment "
    "variable: flags are visible to other users).",
)
@click.version_option(__version__, prog_name="fuckbase")
@click.pass_context
def cli(ctx: click.Context, /, **opts: Any) -> None:
    """FuckBase: a small, fast HTTP database. Without a subcommand, runs the server."""
    if ctx.invoked_subcommand is not None:
        return
    from fuckbase.server import StartupError, run

    try:
        run(settings_from(opts))
    except (ConfigError, StartupError) as exc:
        fail(str(exc))


@cli.group()
@_opt("--url", env="FUCKBASE_URL", default="http://127.0.0.1:8080", show_default=True, help="The server.")
@_opt("--admin-username", env="FUCKBASE_ADMIN_USERNAME", default="", help="Admin user, if the server has one.")
@_opt("--admin-password", env="FUCKBASE_ADMIN_PASSWORD", default="", help="Admin password.")
@_opt("--timeout", env="FUCKBASE_TIMEOUT", type=float, default=3600.0, show_default=True, help="Seconds to wait.")
@click.pass_context
def backup(ctx: click.Context, url: str, admin_username: str, admin_password: str, timeout: float) -> None:
    """Back up, list, restore and verify through a running server."""
    ctx.obj = (url, (admin_username, admin_password) if admin_username else None, timeout)


@backup.command("create")
@click.option("--database", default=None, help="One database; all databases when omitted.")
@click.pass_obj
def backup_create(obj: Any, database: str | None) -> None:
    """Back up one database, or all of them (a full backup)."""
    result = _remote(obj, f"backing up {database or 'all databases'}", lambda c: c.backups.create(database))
    click.echo(f"{result['backup_name']}  {result['size']} bytes, {result['entries']} entries")


@backup.command("list")
@click.option("--database", default=None, help="Only this database's backups (it need not exist here).")
@click.pass_obj
def backup_list(obj: Any, database: str | None) -> None:
    """List backups, newest first."""
    found = _remote(obj, "listing backups", lambda c: c.backups.list(database))
    for b in found:
        click.echo(f"{b.timestamp}  {b.database:<20} {b.size:>12}  {b.name}")
    if not found:
        click.echo(f"no backups{f' of {database}' if database else ''}", err=True)


@backup.command("restore")
@click.argument("name", required=False)
@click.option("--at", default=None, help="Instead of NAME: the state at this instant (ISO 8601), from the"
              " continuous backup.")
@click.option("--database", default=None, help="With --at: only this database.")
@click.option("--as", "into", default=None, help="Restore one database under this new name (not in use)"
              " instead of replacing it.")
@_opt("--username", env="FUCKBASE_DB_USERNAME", default="",
      help="With no admin on the server: the credentials of the protected database it replaces.")
@_opt("--password", env="FUCKBASE_DB_PASSWORD", default="", help="That database's password.")
@click.pass_obj
def backup_restore(obj: Any, name: str | None, at: str | None, database: str | None, into: str | None,
                   username: str, password: str) -> None:
    """Restore backup NAME (replaces that database, or every database for a full backup), or
    with --at the state at an instant."""
    if (name is None) == (at is None):
        raise click.UsageError("give a backup NAME or --at INSTANT, not both")
    if database is not None and at is None:
        raise click.UsageError("--database goes with --at (a backup NAME names its database)")
    auth = (username, password) if username else None
    if at is not None:
        result = _remote(obj, f"restoring to {at}", lambda c: c.backups.restore_to(at, database, into, auth))
    else:
        result = _remote(obj, f"restoring {name}", lambda c: c.backups.restore(name, auth, into))
    click.echo(f"restored {', '.join(result['databases'])}: {result['entries']} entries")


@backup.command("verify")
@click.argument("name")
@click.pass_obj
def backup_verify(obj: Any, name: str) -> None:
    """Read a backup fully and check it, without applying it."""
    result = _remote(obj, f"verifying {name}", lambda c: c.backups.verify(name))
    click.echo(f"valid: {result['entries']} entries, checksum {result['checksum']}")


def _counted(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


@cli.command("import")
@click.argument("file", type=click.File("rb"))
@click.option("--database", required=True, help="The database to load into (it must exist).")
@click.option("--set", "set_name", required=True, help="The set to load into (created if needed).")
@_opt("--url", env="FUCKBASE_URL", default="http://127.0.0.1:8080", show_default=True, help="The server.")
@_opt("--username", env="FUCKBASE_DB_USERNAME", default="", help="The database's user, if it has credentials.")
@_opt("--password", env="FUCKBASE_DB_PASSWORD", default="", help="The database's password.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=5000, show_default=True,
              help="Operations per request; each request is applied all or nothing.")
def import_file(file: Any, database: str, set_name: str, url: str, username: str, password: str,
                batch_size: int) -> None:
    """Load a JSON Lines file (or - for stdin) through /set/batch.

    Each line is {"key": ..., "value": ...} (a put) or {"op": "delete", "key": ...}. Every
    batch is one transaction; a bad line stops the import before its batch is sent, and the
    batches sent before it stay applied.
    """
    from fuckbase.bulkload import import_lines

    auth = (username, password) if username else None
    total = _file_size(file)
    with click.progressbar(length=total or 0, label="importing", file=sys.stderr,
                           show_pos=False, show_percent=bool(total), hidden=not total) as bar:
        try:
            result = import_lines(file, url, database, set_name, auth, batch_size, bar.update)
        except ValueError as exc:
            fail(str(exc))
    click.echo(f"imported {_counted(result.applied, 'operation')} from {_counted(result.lines, 'line')}"
               f" in {result.seconds:.1f}s")


def _file_size(file: Any) -> int:
    try:
        return int(os.fstat(file.fileno()).st_size) if file.seekable() else 0
    except (OSError, ValueError):
        return 0


def _remote(obj: Any, doing: str, call: Any) -> Any:
    """Runs one client call, with an elapsed-time progress line on a terminal."""
    from concurrent.futures import ThreadPoolExecutor

    from fuckbase.client import Client, FuckBaseError

    url, admin_auth, timeout = obj
    started = time.monotonic()
    with Client(url, admin_auth=admin_auth, timeout=timeout) as client, ThreadPoolExecutor(1) as pool:
        future = pool.submit(call, client)
        while not future.done():
            try:
                future.result(timeout=0.5)
            except TimeoutError:
                if sys.stderr.isatty():
                    click.echo(f"\r{doing}… {time.monotonic() - started:.0f}s", nl=False, err=True)
            except FuckBaseError:
                break
        if sys.stderr.isatty():
            click.echo("\r\033[K", nl=False, err=True)
        try:
            return future.result()
        except FuckBaseError as exc:
            fail(f"{doing} failed: {exc.code or exc.status}: {exc.message}")


def settings_from(opts: dict[str, Any]) -> Settings:
    return Settings(
        host=opts["host"],
        port=opts["port"],
        data_dir=opts["data_dir"],
        storage=opts["storage"],
        admin_username=opts["admin_username"],
        admin_password=opts["admin_password"],
        log_level=opts["log_level"],
        log_file=opts["log_file"],
        access_log=opts["access_log"],
        durability=opts["durability"],
        max_body_bytes=opts["max_body_size"],
        request_threads=opts["request_threads"],
        read_timeout=opts["read_timeout"],
        storage_timeout=opts["storage_timeout"],
        workers=opts["workers"] if opts["workers"] is not None else default_workers(),
        s3=S3Settings(
            endpoint=opts["s3_endpoint"],
            bucket=opts["s3_bucket"],
            access_key=opts["s3_access_key"],
            secret_key=opts["s3_secret_key"],
            region=opts["s3_region"],
            timeout=opts["s3_timeout"],
        ),
        backup_dir=opts["backup_dir"],
        backup_interval_minutes=opts["backup_interval"],
        backup_retention=opts["backup_retention"],
        backup_compression=opts["backup_compression"],
        restore_on_start=opts["restore_on_start"],
        backup_continuous=opts["backup_continuous"],
        backup_sync_interval=opts["backup_sync_interval"],
        backup_snapshot_interval_minutes=opts["backup_snapshot_interval"],
        backup_snapshot_changes=opts["backup_snapshot_changes"],
        backup_retention_age=parse_age(opts["backup_retention_age"]) if opts["backup_retention_age"] else None,
        backup_keep_daily=opts["backup_keep_daily"],
        backup_keep_weekly=opts["backup_keep_weekly"],
        backup_keep_monthly=opts["backup_keep_monthly"],
        backup_encryption_key_file=opts["backup_encryption_key_file"],
        backup_encryption_key=opts["backup_encryption_key"],
    )


def fail(message: str) -> None:
    click.echo(f"fuckbase: error: {message}", err=True)
    sys.exit(2)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message())
    except click.exceptions.Abort:
        sys.exit(130)
