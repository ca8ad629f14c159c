"""The client's backup operations against the real server (local-folder backup target).

Skipped until the server implements /backup/*: they land with the backup issue.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import ServerProcess

from fuckbase.client import (
    AdminAuthRequired,
    AlreadyExistsError,
    AsyncClient,
    BackupInfo,
    BackupNotFound,
    Client,
    DatabaseNotFound,
    KeyNotFound,
    NotFoundError,
)

ADMIN = ("admin", "adm1n-pw")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
MISSING = "backups/shop/20000101-000000.json"


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def fill_shop(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    users.put("u1", {"email": "a@x.io"})
    users.put("u2", {"email": "b@x.io"})
    users.create_index("by_email", "email")


def test_database_backup_roundtrip(client: Client) -> None:
    fill_shop(client)
    created = client.backups.create("shop")
    assert created["status"] == "success" and created["message"]
    name = created["backup_name"]
    assert re.fullmatch(r"backups/shop/\d{8}-\d{6}\.json", name)

    listed = client.backups.list("shop")
    assert listed and all(isinstance(b, BackupInfo) for b in listed)
    latest = listed[0]
    assert latest.name == name and latest.database == "shop"
    assert latest.size > 0 and TIMESTAMP.fullmatch(latest.timestamp)

    assert client.backups.verify(name)["status"] == "success"

    users = client.database("shop").set("users")
    users.put("u3", {"email": "c@x.io"})
    users.delete("u1")
    assert client.backups.restore(name)["status"] == "success"
    assert users.get("u1") == {"email": "a@x.io"}
    with pytest.raises(KeyNotFound):
        users.get("u3")
    assert [e.key for e in users.query("by_email", "b@x.io")] == ["u2"]  # indexes come back too


def test_full_backup_roundtrip(client: Client) -> None:
    fill_shop(client)
    client.create_database("other").create_set("s").put("k", 1)
    created = client.backups.create()
    assert created["status"] == "success"
    name = created["backup_name"]
    assert name.startswith("backups/full/")
    full = [b for b in client.backups.list() if b.name == name]
    assert len(full) == 1 and full[0].database == "all"

    client.drop_database("other")
    client.database("shop").set("users").put("u1", "changed")
    client.backups.restore(name)
    assert client.database("other").set("s").get("k") == 1
    assert client.database("shop").set("users").get("u1") == {"email": "a@x.io"}


def test_list_newest_first_and_for_absent_database(client: Client) -> None:
    fill_shop(client)
    first = client.backups.create("shop")["backup_name"]
    time.sleep(1.1)  # backup names have second resolution
    second = client.backups.create("shop")["backup_name"]
    names = [b.name for b in client.backups.list("shop")]
    assert names.index(second) < names.index(first)
    # disaster recovery lists before the database exists on this node
    assert client.backups.list("ghost") == []
    client.drop_database("shop")
    assert first in [b.name for b in client.backups.list("shop")]
    client.backups.restore(first)
    assert client.database("shop").set("users").get("u2") == {"email": "b@x.io"}


def test_missing_backup(client: Client) -> None:
    with pytest.raises(BackupNotFound) as info:
        client.backups.verify(MISSING)
    assert isinstance(info.value, NotFoundError)
    assert (info.value.code, info.value.status) == ("BACKUP_NOT_FOUND", 404)
    with pytest.raises(BackupNotFound):
        client.backups.restore(MISSING)


def test_backup_of_missing_database(client: Client) -> None:
    with pytest.raises(DatabaseNotFound):
        client.backups.create("ghost")


def test_backups_need_admin(make_server: Any) -> None:
    srv = make_server(args=["--admin-username", ADMIN[0], "--admin-password", ADMIN[1]])
    with Client(srv.url) as plain:
        for call in (
            lambda: plain.backups.create(),
            lambda: plain.backups.list(),
            lambda: plain.backups.verify(MISSING),
            lambda: plain.backups.restore(MISSING),
        ):
            with pytest.raises(AdminAuthRequired):
                call()
    with Client(srv.url, admin_auth=ADMIN) as admin:
        admin.create_database("shop")
        name = admin.backups.create("shop")["backup_name"]
        assert [b.name for b in admin.backups.list("shop")] == [name]
        assert admin.backups.verify(name)["status"] == "success"


async def test_async_backups(server: ServerProcess) -> None:
    async with AsyncClient(server.url) as c:
        users = await (await c.create_database("shop")).create_set("users")
        await users.put("u1", {"v": 1})
        created = await c.backups.create("shop")
        name = created["backup_name"]
        listed = await c.backups.list("shop")
        assert listed[0] == BackupInfo(name, listed[0].timestamp, listed[0].size, "shop")
        assert (await c.backups.verify(name))["status"] == "success"
        assert await c.backups.window() is None  # no continuous backup to the local folder by default
        await users.put("u1", {"v": 2})
        assert (await c.backups.restore(name))["status"] == "success"
        assert await users.get("u1") == {"v": 1}
        with pytest.raises(BackupNotFound):
            await c.backups.verify(MISSING)


def _shipped_past(c: Client, moment: float) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        window = c.server_info().get("continuous", {}).get("window", {})
        if window.get("latest") and datetime.fromisoformat(window["latest"]).timestamp() > moment:
            return
        time.sleep(0.1)
    raise AssertionError(c.server_info())


def test_point_in_time_restores_from_the_client(make_server: Any) -> None:
    srv = make_server(["--backup-continuous", "--backup-sync-interval", "0.2"])
    with Client(srv.url) as c:
        _shipped_past(c, 0)
        users = c.create_database("shop").create_set("users")
        users.put("u1", {"v": 1})
        time.sleep(0.05)
        then = datetime.now(UTC)
        time.sleep(0.05)
        users.put("u1", {"v": 2})
        _shipped_past(c, time.time())
        window = c.backups.window("shop")
        assert window is not None and set(window["databases"]) == {"shop"}
        assert datetime.fromisoformat(window["databases"]["shop"]["earliest"]) < then
        assert c.backups.restore_to(then, "shop", into="shop_then")["databases"] == ["shop_then"]
        assert c.database("shop_then").set("users").get("u1") == {"v": 1}
        assert users.get("u1") == {"v": 2}
        c.backups.restore_to(then.isoformat())
        assert users.get("u1") == {"v": 1}
        with pytest.raises(ValueError):
            c.backups.restore_to(datetime.now())  # no time zone
        with pytest.raises(BackupNotFound):
            c.backups.restore_to("2001-01-01T00:00:00Z")
        name = c.backups.create("shop")["backup_name"]
        assert c.backups.restore(name, into="shop_copy")["databases"] == ["shop_copy"]
        with pytest.raises(AlreadyExistsError):
            c.backups.restore(name, into="shop_copy")
