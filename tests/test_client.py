"""The Python client (fuckbase.client) against the real server, sync and async."""

from __future__ import annotations

import asyncio
import http.server
import pickle
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, free_port

from fuckbase import client as fb
from fuckbase.client import (
    AdminAuthRequired,
    AlreadyExistsError,
    AsyncClient,
    AsyncSet,
    AuthFailed,
    Client,
    Database,
    DatabaseExists,
    DatabaseNotFound,
    Entry,
    FuckBaseConnectionError,
    FuckBaseError,
    IndexExists,
    IndexNotFound,
    InvalidRequest,
    KeyNotFound,
    NotFoundError,
    Page,
    PayloadTooLarge,
    Set,
    SetExists,
    SetNotFound,
)

ADMIN = ("admin", "adm1n-pw")
ALICE = ("alice", "s3cr3t")

STAFF = {
    "e1": {"dept": "eng", "position": "dev", "hireDate": "2020-01-05", "name": "Ann", "age": 30},
    "e2": {"dept": "eng", "position": "dev", "hireDate": "2021-03-01", "name": "Bob", "age": 41},
    "e3": {"dept": "eng", "position": "lead", "hireDate": "2019-07-15", "name": "Cid", "age": 30},
    "e4": {"dept": "eng", "position": "dev", "hireDate": "2018-11-30", "name": "Dee", "age": 25},
    "e5": {"dept": "ops", "position": "dev", "hireDate": "2022-02-02", "name": "Eve", "age": 35},
    "e6": {"dept": "eng", "position": "lead", "hireDate": "2023-05-20", "name": "Fay", "age": 52},
    "e7": {"dept": "eng", "position": "dev", "name": "Gus", "age": 28},  # no hireDate: sorts last
    "e8": {"position": "dev", "hireDate": "2017-01-01", "name": "Hal"},  # no dept: not indexed
}


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


@pytest.fixture
async def aclient(server: ServerProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.url) as c:
        yield c


@pytest.fixture
def staff(client: Client) -> Set:
    """Database "hr" with set "staff" holding STAFF and a sortable index by dept."""
    staff = client.create_database("hr").create_set("staff")
    for key, value in STAFF.items():
        staff.put(key, value)
    staff.create_sortable_index("by_dept", "dept", ["hireDate", "position", "name"])
    return staff


def keys(entries: Any) -> list[str]:
    return [e.key for e in entries]


def request_count(server: ServerProcess, endpoint: str) -> int:
    """Requests the server answered on `endpoint` (any status), from its /metrics."""
    text = httpx.get(server.url + "/metrics").text
    pattern = rf'^fuckbase_requests_total\{{endpoint="{re.escape(endpoint)}",status="\d+"\}} (\S+)$'
    return sum(int(float(m)) for m in re.findall(pattern, text, re.M))


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# ------------------------------------------------------------------------------ databases and server


def test_context_manager_and_server_info(server: ServerProcess) -> None:
    with Client(server.url + "/") as c:
        assert c.url == server.url
        info = c.server_info()
        assert info["status"] == "success"
        assert info["databases_count"] == 0
        assert isinstance(info["version"], str) and re.fullmatch(r"\d+d \d+h \d+m", info["uptime"])
        c.create_database("one")
        c.create_database("two")
        assert c.server_info()["databases_count"] == 2


def test_create_database_returns_handle(client: Client) -> None:
    db = client.create_database("shop")
    assert isinstance(db, Database) and db.name == "shop"
    assert db.sets() == []
    assert repr(db) == "Database('shop')"


def test_create_existing_database(client: Client) -> None:
    client.create_database("shop")
    with pytest.raises(DatabaseExists) as info:
        client.create_database("shop")
    err = info.value
    assert isinstance(err, AlreadyExistsError) and isinstance(err, FuckBaseError)
    assert (err.code, err.status) == ("DB_ALREADY_EXISTS", 409)
    assert "shop" in err.message and str(err).startswith("DB_ALREADY_EXISTS (HTTP 409): ")


def test_database_handle_makes_no_request(client: Client) -> None:
    ghost = client.database("ghost")  # no request: nothing raised yet
    assert ghost.name == "ghost"
    with pytest.raises(DatabaseNotFound) as info:
        ghost.sets()
    assert isinstance(info.value, NotFoundError)
    assert (info.value.code, info.value.status) == ("DB_NOT_FOUND", 404)


def test_drop_database(client: Client) -> None:
    db = client.create_database("shop")
    db.create_set("users").put("k", 1)
    client.drop_database("shop")
    with pytest.raises(DatabaseNotFound):
        db.sets()
    with pytest.raises(DatabaseNotFound):
        client.drop_database("shop")
    # and through the handle
    again = client.create_database("shop")
    assert again.sets() == []
    again.drop()
    assert client.server_info()["databases_count"] == 0


def test_invalid_database_name(client: Client) -> None:
    with pytest.raises(InvalidRequest) as info:
        client.create_database("no spaces allowed")
    assert (info.value.code, info.value.status) == ("INVALID_REQUEST", 400)
    with pytest.raises(InvalidRequest):
        client.create_database("")


# ------------------------------------------------------------------------------ sets and data


def test_sets(client: Client) -> None:
    db = client.create_database("shop")
    users = db.create_set("users")
    assert isinstance(users, Set)
    assert (users.name, users.database) == ("users", "shop")
    db.create_set("products")
    assert db.sets() == ["products", "users"]
    with pytest.raises(SetExists) as info:
        db.create_set("users")
    assert isinstance(info.value, AlreadyExistsError)
    assert (info.value.code, info.value.status) == ("SET_ALREADY_EXISTS", 409)
    # put creates a set on the fly; a handle alone does not
    db.set("orders")
    assert "orders" not in db.sets()
    db.set("orders").put("o1", {"total": 3})
    assert db.sets() == ["orders", "products", "users"]


@pytest.mark.parametrize(
    "value",
    [
        {"name": "Ann", "tags": ["a", "b"], "n": {"x": 1.5}},
        [1, "two", None],
        "text ✓",
        42,
        -1.25,
        True,
        False,
        0,
        "",
    ],
)
def test_put_get_roundtrip(client: Client, value: Any) -> None:
    users = client.create_database("shop").create_set("users")
    users.put("k", value)
    assert users.get("k") == value
    assert type(users.get("k")) is type(value)


def test_put_replaces_and_unicode_keys(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    users.put("ключ/🔑 with spaces", {"v": 1})
    users.put("ключ/🔑 with spaces", {"v": 2})
    assert users.get("ключ/🔑 with spaces") == {"v": 2}


def test_get_missing_key_and_default(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    with pytest.raises(KeyNotFound) as info:
        users.get("nope")
    assert isinstance(info.value, NotFoundError)
    assert (info.value.code, info.value.status) == ("KEY_NOT_FOUND", 404)
    assert users.get("nope", default=None) is None
    assert users.get("nope", "fallback") == "fallback"
    assert users.get("nope", default={"d": 1}) == {"d": 1}


def test_stored_null_is_not_missing(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    users.put("nothing", None)
    assert users.get("nothing") is None
    assert users.get("nothing", default="fallback") is None


def test_get_default_does_not_hide_other_errors(client: Client) -> None:
    db = client.create_database("shop")
    with pytest.raises(SetNotFound) as info:
        db.set("nosuchset").get("k", default=None)
    assert (info.value.code, info.value.status) == ("SET_NOT_FOUND", 404)
    with pytest.raises(DatabaseNotFound):
        client.database("nodb").set("s").get("k", default=None)


def test_delete(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    users.put("k", {"a": 1})
    users.delete("k")
    with pytest.raises(KeyNotFound):
        users.get("k")
    with pytest.raises(KeyNotFound):
        users.delete("k")


def test_invalid_key(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    with pytest.raises(InvalidRequest):
        users.put("", 1)
    with pytest.raises(InvalidRequest):
        users.put("x" * 2000, 1)


def test_values_that_are_not_json_fail_before_sending(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    with pytest.raises(ValueError):
        users.put("k", float("nan"))
    with pytest.raises(TypeError):
        users.put("k", {1, 2})
    with pytest.raises(KeyNotFound):
        users.get("k")


# ------------------------------------------------------------------------------ basic indexes


def test_basic_index_query(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    users.put("u1", {"email": "a@x.io", "age": 30, "admin": True})
    users.put("u2", {"email": "b@x.io", "age": 30, "admin": False})
    users.put("u3", {"name": "no email"})
    users.create_index("by_email", "email")  # indexes what is already there
    users.create_index("by_age", "age")
    users.create_index("by_admin", "admin")

    found = users.query("by_email", "a@x.io")
    assert found == [Entry("u1", {"email": "a@x.io", "age": 30, "admin": True})]
    assert found[0].key == "u1" and found[0].value["age"] == 30
    assert users.query("by_email", "nobody@x.io") == []
    # matching is on the value's text form
    assert sorted(keys(users.query("by_age", "30"))) == ["u1", "u2"]
    assert sorted(keys(users.query("by_age", 30))) == ["u1", "u2"]
    assert keys(users.query("by_admin", True)) == ["u1"]
    assert keys(users.query("by_admin", "false")) == ["u2"]

    # later puts and deletes keep the index current
    users.put("u4", {"email": "a@x.io"})
    users.put("u1", {"email": "changed@x.io"})
    assert keys(users.query("by_email", "a@x.io")) == ["u4"]
    users.delete("u4")
    assert users.query("by_email", "a@x.io") == []


def test_index_errors(client: Client) -> None:
    db = client.create_database("shop")
    users = db.create_set("users")
    users.create_index("by_email", "email")
    with pytest.raises(IndexExists) as exists:
        users.create_index("by_email", "email")
    assert isinstance(exists.value, AlreadyExistsError)
    assert (exists.value.code, exists.value.status) == ("INDEX_ALREADY_EXISTS", 409)
    with pytest.raises(IndexNotFound) as missing:
        users.query("nope", "x")
    assert isinstance(missing.value, NotFoundError)
    assert (missing.value.code, missing.value.status) == ("INDEX_NOT_FOUND", 404)
    with pytest.raises(IndexNotFound):
        users.drop_index("nope")
    with pytest.raises(SetNotFound):
        db.set("nosuchset").create_index("i", "f")
    with pytest.raises(InvalidRequest):
        users.query("by_email", None)  # type: ignore[arg-type]


def test_drop_index(client: Client) -> None:
    users = client.create_database("shop").create_set("users")
    users.put("u1", {"email": "a@x.io"})
    users.create_index("by_email", "email")
    users.drop_index("by_email")
    with pytest.raises(IndexNotFound):
        users.query("by_email", "a@x.io")
    users.create_index("by_email", "email")  # the name is free again
    assert keys(users.query("by_email", "a@x.io")) == ["u1"]


# ------------------------------------------------------------------------------ sortable indexes and pages


def test_query_sorted_page(staff: Set) -> None:
    page = staff.query_sorted("by_dept", "eng", sort=("hireDate", "desc"), offset=0, limit=2)
    assert isinstance(page, Page)
    assert (page.total, page.offset, page.limit) == (6, 0, 2)
    assert keys(page.items) == ["e6", "e2"]
    assert all(isinstance(e, Entry) for e in page.items)
    assert page.items[0].value == STAFF["e6"]
    assert page.has_more and len(page) == 2 and keys(page) == ["e6", "e2"]

    rest = staff.query_sorted("by_dept", "eng", sort=("hireDate", "desc"), offset=2, limit=10)
    # e7 lacks hireDate: last in both orders
    assert keys(rest.items) == ["e1", "e3", "e4", "e7"]
    assert (rest.total, rest.offset, rest.limit) == (6, 2, 10)
    assert not rest.has_more

    asc = staff.query_sorted("by_dept", "eng", sort=("hireDate", "asc"))
    assert keys(asc) == ["e4", "e3", "e1", "e2", "e6", "e7"]
    assert keys(staff.query_sorted("by_dept", "eng", sort="name")) == ["e1", "e2", "e3", "e4", "e6", "e7"]
    # no sort: the index's first sort field, ascending; default page of 10
    default = staff.query_sorted("by_dept", "eng")
    assert keys(default) == keys(asc) and (default.offset, default.limit) == (0, 10)

    beyond = staff.query_sorted("by_dept", "eng", sort=("hireDate", "asc"), offset=50)
    assert beyond.items == [] and beyond.total == 6 and not beyond.has_more
    assert staff.query_sorted("by_dept", "sales").total == 0


def test_query_multi_sorted(staff: Set) -> None:
    page = staff.query_multi_sorted(
        "by_dept", "eng", sort=[("position", "asc"), ("hireDate", "desc")], offset=0, limit=10
    )
    assert keys(page) == ["e2", "e1", "e4", "e7", "e6", "e3"]
    assert page.total == 6
    second = staff.query_multi_sorted(
        "by_dept", "eng", sort=[("position", "desc"), "name"], offset=1, limit=2
    )
    assert keys(second) == ["e6", "e1"]
    assert (second.offset, second.limit, second.total) == (1, 2, 6)


def test_sorted_query_errors(staff: Set) -> None:
    with pytest.raises(InvalidRequest):
        staff.query_sorted("by_dept", "eng", sort=("age", "asc"))  # not a sort field of the index
    with pytest.raises(InvalidRequest):
        staff.query_sorted("by_dept", "eng", sort=("name", "sideways"))
    with pytest.raises(InvalidRequest):
        staff.query_multi_sorted("by_dept", "eng", sort=[])
    with pytest.raises(TypeError):
        staff.query_multi_sorted("by_dept", "eng", sort=("name", "asc"))
    with pytest.raises(IndexNotFound):
        staff.query_sorted("nope", "eng")
    staff.create_index("by_name", "name")
    with pytest.raises(InvalidRequest):
        staff.query_sorted("by_name", "Ann")  # a basic index cannot sort
    with pytest.raises(InvalidRequest):
        staff.create_sortable_index("bad", "dept", [])
    with pytest.raises(IndexExists):
        staff.create_sortable_index("by_dept", "dept", ["name"])


def test_iter_sorted_fetches_all_pages_lazily(server: ServerProcess, staff: Set) -> None:
    for i in range(20):
        hired = f"2024-01-{i + 1:02}"
        staff.put(f"x{i:02}", {"dept": "eng", "position": "dev", "hireDate": hired, "name": f"X{i}"})
    everything = staff.query_sorted("by_dept", "eng", sort=("hireDate", "desc"), limit=1000)
    assert everything.total == 26

    before = request_count(server, "/index/query/sorted")
    it = staff.iter_sorted("by_dept", "eng", sort=("hireDate", "desc"), page_size=5)
    assert request_count(server, "/index/query/sorted") == before  # nothing fetched yet
    first = next(it)
    assert request_count(server, "/index/query/sorted") == before + 1  # one page
    got = [first, *it]
    assert got == everything.items
    assert request_count(server, "/index/query/sorted") == before + 6  # 26 entries / 5 per page

    order = [("position", "desc"), ("name", "asc")]
    multi = list(staff.iter_multi_sorted("by_dept", "eng", sort=order, page_size=4))
    assert multi == staff.query_multi_sorted("by_dept", "eng", sort=order, limit=100).items
    assert list(staff.iter_sorted("by_dept", "sales", page_size=3)) == []
    with pytest.raises(ValueError):
        next(staff.iter_sorted("by_dept", "eng", page_size=0))


def test_iter_sorted_errors_surface_when_iterated(staff: Set) -> None:
    it = staff.iter_sorted("nope", "eng")
    with pytest.raises(IndexNotFound):
        next(it)


# ------------------------------------------------------------------------------ database auth


def test_database_auth(server: ServerProcess) -> None:
    with Client(server.url) as open_client:
        db = open_client.create_database("vault", auth=ALICE)
        # the handle from create_database carries the new credentials
        secrets = db.create_set("secrets")
        secrets.put("k", {"v": 1})
        assert secrets.get("k") == {"v": 1}
        # a handle without credentials is refused
        with pytest.raises(AuthFailed) as info:
            open_client.database("vault").sets()
        assert (info.value.code, info.value.status) == ("AUTH_FAILED", 401)
        with pytest.raises(AuthFailed):
            open_client.database("vault").set("secrets").get("k", default=None)
        # per-database credentials
        assert open_client.database("vault", auth=ALICE).sets() == ["secrets"]
        with pytest.raises(AuthFailed):
            open_client.database("vault", auth=("alice", "wrong")).set("secrets").get("k")
        with pytest.raises(AuthFailed):
            open_client.database("vault", auth=("mallory", "s3cr3t")).sets()

    with Client(server.url, auth=ALICE) as alice:
        vault = alice.database("vault")
        assert vault.set("secrets").get("k") == {"v": 1}
        vault.set("secrets").create_index("by_v", "v")
        assert keys(vault.set("secrets").query("by_v", 1)) == ["k"]
        # a per-database auth overrides the client's, both ways
        with pytest.raises(AuthFailed):
            alice.database("vault", auth=("alice", "nope")).sets()

    with Client(server.url, auth=("alice", "wrong")) as wrong:
        with pytest.raises(AuthFailed):
            wrong.database("vault").sets()
        assert wrong.database("vault", auth=ALICE).sets() == ["secrets"]
        # an open database ignores credentials
        wrong.create_database("public").create_set("s").put("k", 1)
        assert wrong.database("public").set("s").get("k") == 1


def test_drop_protected_database_without_admin(server: ServerProcess) -> None:
    with Client(server.url) as c:
        c.create_database("vault", auth=ALICE)
        with pytest.raises(AuthFailed):
            c.drop_database("vault")
        c.drop_database("vault", auth=ALICE)
        with pytest.raises(DatabaseNotFound):
            c.database("vault").sets()


# ------------------------------------------------------------------------------ admin auth


@pytest.fixture
def admin_server(make_server: Any) -> ServerProcess:
    srv: ServerProcess = make_server(args=["--admin-username", ADMIN[0], "--admin-password", ADMIN[1]])
    return srv


def test_admin_auth(admin_server: ServerProcess) -> None:
    for admin_auth in (None, ("admin", "wrong"), ("root", ADMIN[1])):
        with Client(admin_server.url, admin_auth=admin_auth) as c:
            for call in (lambda: c.create_database("shop"), c.server_info, lambda: c.drop_database("shop")):
                with pytest.raises(AdminAuthRequired) as info:
                    call()
                assert (info.value.code, info.value.status) == ("ADMIN_AUTH_REQUIRED", 401)

    with Client(admin_server.url, admin_auth=ADMIN) as admin:
        db = admin.create_database("shop")
        assert admin.server_info()["databases_count"] == 1
        db.create_set("users").put("k", 1)

    # data operations need no admin credentials
    with Client(admin_server.url) as plain:
        assert plain.database("shop").set("users").get("k") == 1
        assert plain.database("shop").sets() == ["users"]

    with Client(admin_server.url, admin_auth=ADMIN) as admin:
        admin.drop_database("shop")
        assert admin.server_info()["databases_count"] == 0


def test_admin_and_database_auth_together(admin_server: ServerProcess) -> None:
    with Client(admin_server.url, auth=ALICE, admin_auth=ADMIN) as c:
        vault = c.create_database("vault", auth=ALICE)
        vault.create_set("s").put("k", "v")
        assert c.database("vault").set("s").get("k") == "v"
    with Client(admin_server.url, admin_auth=ADMIN) as admin_only:
        with pytest.raises(AuthFailed):
            admin_only.database("vault").sets()
        admin_only.drop_database("vault")  # the admin may drop any database


# ------------------------------------------------------------------------------ transport errors


def test_payload_too_large(make_server: Any) -> None:
    small = make_server(args=["--max-body-size", "2048"])
    with Client(small.url) as c:
        users = c.create_database("shop").create_set("users")
        users.put("ok", "x" * 1000)
        with pytest.raises(PayloadTooLarge) as info:
            users.put("big", "x" * 4096)
        assert (info.value.code, info.value.status) == ("PAYLOAD_TOO_LARGE", 413)
        assert users.get("big", default=None) is None


def test_connection_refused() -> None:
    with Client(closed_port_url(), timeout=5) as c:
        with pytest.raises(FuckBaseConnectionError) as info:
            c.server_info()
    err = info.value
    assert isinstance(err, FuckBaseError) and isinstance(err, ConnectionError)
    assert err.status is None and err.code is None
    assert "/server/info" in err.message


def test_timeout_is_a_connection_error() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        with Client(f"http://127.0.0.1:{port}", timeout=0.3) as c:
            with pytest.raises(FuckBaseConnectionError) as info:
                c.database("shop").sets()
    assert "timed out" in info.value.message


def test_unknown_path_is_not_found(server: ServerProcess) -> None:
    # a URL prefix makes every path unknown: the server answers 404 with code NOT_FOUND
    with Client(server.url + "/not/here") as c:
        with pytest.raises(FuckBaseError) as info:
            c.server_info()
    assert type(info.value) is fb.NotFoundError
    assert (info.value.code, info.value.status) == ("NOT_FOUND", 404)


class _HtmlErrorHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"<html><body>502 Bad Gateway</body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def html_proxy() -> Iterator[str]:
    """A real HTTP server answering like a broken reverse proxy in front of FuckBase."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlErrorHandler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_non_json_error_response(html_proxy: str) -> None:
    with Client(html_proxy) as c:
        with pytest.raises(FuckBaseError) as info:
            c.database("shop").set("s").get("k")
    assert type(info.value) is FuckBaseError
    assert info.value.status == 502 and info.value.code is None
    assert "Bad Gateway" in info.value.message


# ------------------------------------------------------------------------------ the exception tree


API_CODES = {
    "INVALID_REQUEST": (400, "InvalidRequest", None),
    "AUTH_FAILED": (401, "AuthFailed", None),
    "ADMIN_AUTH_REQUIRED": (401, "AdminAuthRequired", None),
    "DB_NOT_FOUND": (404, "DatabaseNotFound", "NotFoundError"),
    "SET_NOT_FOUND": (404, "SetNotFound", "NotFoundError"),
    "INDEX_NOT_FOUND": (404, "IndexNotFound", "NotFoundError"),
    "KEY_NOT_FOUND": (404, "KeyNotFound", "NotFoundError"),
    "DB_ALREADY_EXISTS": (409, "DatabaseExists", "AlreadyExistsError"),
    "SET_ALREADY_EXISTS": (409, "SetExists", "AlreadyExistsError"),
    "INDEX_ALREADY_EXISTS": (409, "IndexExists", "AlreadyExistsError"),
    "PAYLOAD_TOO_LARGE": (413, "PayloadTooLarge", None),
    "METHOD_NOT_ALLOWED": (405, "MethodNotAllowed", None),
    "S3_NOT_ENABLED": (503, "S3NotEnabled", None),
    "BACKUP_FAILED": (500, "BackupFailed", None),
    "RESTORE_FAILED": (502, "RestoreFailed", None),
    "LIST_FAILED": (504, "ListFailed", None),
    "BACKUP_NOT_FOUND": (404, "BackupNotFound", "NotFoundError"),
    "BACKUP_INVALID": (422, "BackupInvalid", None),
    "INTERNAL_ERROR": (500, "InternalError", None),
}


@pytest.mark.parametrize("code", sorted(API_CODES))
def test_every_api_error_code_has_its_exception(code: str) -> None:
    """The response parser (shared by both clients) maps each code of API.md."""
    status, name, parent = API_CODES[code]
    cls = getattr(fb, name)
    assert issubclass(cls, FuckBaseError) and name in fb.__all__
    if parent is not None:
        assert issubclass(cls, getattr(fb, parent))
    body = b'{"status":"error","code":"%s","message":"went wrong"}' % code.encode()
    err = fb._error(status, body)
    assert type(err) is cls
    assert (err.code, err.message, err.status) == (code, "went wrong", status)


def test_errors_survive_pickling() -> None:
    err = KeyNotFound("key 'k' not found", code="KEY_NOT_FOUND", status=404)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is KeyNotFound
    assert (back.code, back.message, back.status) == ("KEY_NOT_FOUND", "key 'k' not found", 404)
    assert str(back) == "KEY_NOT_FOUND (HTTP 404): key 'k' not found"


# ------------------------------------------------------------------------------ the async client


async def test_async_databases_and_sets(aclient: AsyncClient) -> None:
    info = await aclient.server_info()
    assert info["databases_count"] == 0
    db = await aclient.create_database("shop")
    assert db.name == "shop"
    users = await db.create_set("users")
    assert isinstance(users, AsyncSet) and (users.database, users.name) == ("shop", "users")
    await db.create_set("products")
    assert await db.sets() == ["products", "users"]
    with pytest.raises(DatabaseExists):
        await aclient.create_database("shop")
    with pytest.raises(SetExists):
        await db.create_set("users")
    with pytest.raises(DatabaseNotFound):
        await aclient.database("ghost").sets()
    await aclient.drop_database("shop")
    with pytest.raises(DatabaseNotFound):
        await db.sets()
    await (await aclient.create_database("tmp")).drop()
    assert (await aclient.server_info())["databases_count"] == 0


async def test_async_data(aclient: AsyncClient) -> None:
    users = (await aclient.create_database("shop")).set("users")
    await users.put("u1", {"name": "Ann"})  # creates the set
    await users.put("nothing", None)
    assert await users.get("u1") == {"name": "Ann"}
    assert await users.get("nothing") is None
    assert await users.get("nothing", default="fallback") is None
    assert await users.get("missing", default=None) is None
    assert await users.get("missing", default=7) == 7
    with pytest.raises(KeyNotFound):
        await users.get("missing")
    await users.delete("u1")
    with pytest.raises(KeyNotFound):
        await users.delete("u1")
    with pytest.raises(SetNotFound):
        await aclient.database("shop").set("other").get("k", default=None)
    with pytest.raises(InvalidRequest):
        await users.put("", 1)


async def test_async_concurrent_requests_share_the_pool(aclient: AsyncClient) -> None:
    users = await (await aclient.create_database("shop")).create_set("users")
    await asyncio.gather(*(users.put(f"k{i}", {"i": i}) for i in range(50)))
    values = await asyncio.gather(*(users.get(f"k{i}") for i in range(50)))
    assert values == [{"i": i} for i in range(50)]


async def test_async_indexes_and_pages(server: ServerProcess, aclient: AsyncClient) -> None:
    staff = await (await aclient.create_database("hr")).create_set("staff")
    for key, value in STAFF.items():
        await staff.put(key, value)
    await staff.create_index("by_age", "age")
    assert sorted(keys(await staff.query("by_age", "30"))) == ["e1", "e3"]
    with pytest.raises(IndexExists):
        await staff.create_index("by_age", "age")
    await staff.drop_index("by_age")
    with pytest.raises(IndexNotFound):
        await staff.query("by_age", 30)

    await staff.create_sortable_index("by_dept", "dept", ["hireDate", "position", "name"])
    page = await staff.query_sorted("by_dept", "eng", sort=("hireDate", "desc"), offset=1, limit=2)
    assert keys(page) == ["e2", "e1"] and (page.total, page.offset, page.limit) == (6, 1, 2)
    multi = await staff.query_multi_sorted("by_dept", "eng", sort=[("position", "asc"), ("hireDate", "desc")])
    assert keys(multi) == ["e2", "e1", "e4", "e7", "e6", "e3"]
    with pytest.raises(InvalidRequest):
        await staff.query_sorted("by_dept", "eng", sort=("age", "asc"))

    before = request_count(server, "/index/query/sorted")
    it = staff.iter_sorted("by_dept", "eng", sort=("hireDate", "asc"), page_size=4)
    assert request_count(server, "/index/query/sorted") == before
    got = [e async for e in it]
    assert keys(got) == ["e4", "e3", "e1", "e2", "e6", "e7"]
    assert request_count(server, "/index/query/sorted") == before + 2
    by_position = staff.iter_multi_sorted("by_dept", "eng", sort=[("position", "desc"), "name"], page_size=1)
    got_multi = [e async for e in by_position]
    assert keys(got_multi) == ["e3", "e6", "e1", "e2", "e4", "e7"]
    with pytest.raises(IndexNotFound):
        async for _ in staff.iter_sorted("nope", "eng"):
            pass


async def test_async_auth(admin_server: ServerProcess) -> None:
    async with AsyncClient(admin_server.url) as no_admin:
        with pytest.raises(AdminAuthRequired):
            await no_admin.create_database("vault", auth=ALICE)
        with pytest.raises(AdminAuthRequired):
            await no_admin.server_info()
    async with AsyncClient(admin_server.url, admin_auth=ADMIN) as admin:
        vault = await admin.create_database("vault", auth=ALICE)
        await (await vault.create_set("s")).put("k", 1)
        with pytest.raises(AuthFailed):
            await admin.database("vault").sets()
        assert await admin.database("vault", auth=ALICE).sets() == ["s"]
    async with AsyncClient(admin_server.url, auth=ALICE) as alice:
        assert await alice.database("vault").set("s").get("k") == 1
        with pytest.raises(AuthFailed):
            await alice.database("vault", auth=("alice", "wrong")).set("s").get("k")


async def test_async_transport_errors(make_server: Any) -> None:
    async with AsyncClient(closed_port_url(), timeout=5) as c:
        with pytest.raises(FuckBaseConnectionError) as info:
            await c.server_info()
    assert info.value.status is None
    small = make_server(args=["--max-body-size", "2048"])
    async with AsyncClient(small.url) as c:
        users = (await c.create_database("shop")).set("users")
        with pytest.raises(PayloadTooLarge):
            await users.put("big", "x" * 4096)
