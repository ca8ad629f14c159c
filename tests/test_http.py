"""The HTTP layer against the real server over raw sockets: framing, limits, slow and hostile
clients, pipelining, and several workers serving one data dir."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import ServerProcess


def _connect(srv: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_responses(s: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Reads n responses (content-length framed) off a socket."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} responses")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a body")
            buf += chunk
        body, buf = buf[:length], buf[length:]
        if status == 100:
            continue
        out.append((status, headers, body))
    return out


def _post(path: str, body: Any, extra: str = "") -> bytes:
    raw = json.dumps(body).encode()
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n{extra}\r\n".encode() + raw


def _closed(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_requests_are_answered_in_order(shop: ServerProcess) -> None:
    s = _connect(shop)
    reqs = []
    for i in range(50):
        reqs.append(_post("/set/put", {"database": "shop", "set": "users", "key": f"k{i}", "value": i}))
        reqs.append(_post("/set/get", {"database": "shop", "set": "users", "key": f"k{i}"}))
    reqs.append(_post("/index/create", {"database": "shop", "set": "users", "name": "v", "field": "v"}))
    reqs.append(_post("/set/get", {"database": "shop", "set": "users", "key": "k49"}))
    s.sendall(b"".join(reqs))
    answers = _read_responses(s, len(reqs))
    for i in range(50):
        assert answers[2 * i][0] == 200
        assert json.loads(answers[2 * i + 1][2]) == {"status": "success", "data": i}  # reads its own write
    assert answers[100][0] == 200 and json.loads(answers[101][2])["data"] == 49
    s.close()


def test_a_body_cut_short_is_never_applied(shop: ServerProcess) -> None:
    body = json.dumps({"database": "shop", "set": "users", "key": "cut", "value": 1}).encode()
    s = _connect(shop)
    s.sendall(f"POST /set/put HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) + 50}\r\n\r\n".encode() + body)
    s.shutdown(socket.SHUT_WR)
    assert _closed(s)
    s = _connect(shop)
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n"  # no last chunk
    s.sendall(b"POST /set/put HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    s.shutdown(socket.SHUT_WR)
    assert _closed(s)
    time.sleep(0.2)
    assert shop.post("/set/get", {"database": "shop", "set": "users", "key": "cut"}).status_code == 404


def test_chunked_bodies_and_expect_continue(shop: ServerProcess) -> None:
    body = json.dumps({"database": "shop", "set": "users", "key": "c", "value": "x" * 5000}).encode()
    s = _connect(shop)
    parts = b"".join(f"{len(body[i:i + 1000]):x}\r\n".encode() + body[i:i + 1000] + b"\r\n" for i in range(0, len(body), 1000))
    s.sendall(b"POST /set/put HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + parts + b"0\r\n\r\n")
    assert _read_responses(s, 1)[0][0] == 200
    s.sendall(b"POST /set/get HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 48\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
    s.sendall(json.dumps({"database": "shop", "set": "users", "key": "c"}).encode().ljust(48))
    status, _, got = _read_responses(s, 1)[0]
    assert status == 200 and json.loads(got)["data"] == "x" * 5000


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GARBAGE\r\n\r\n", 400, "INVALID_REQUEST"),
    (b"POST /set/get HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "INVALID_REQUEST"),
    (b"POST /set/get HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "INVALID_REQUEST"),
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414, "URI_TOO_LONG"),
    (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n", 431, "HEADERS_TOO_LARGE"),
    (b"POST /set/put HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413, "PAYLOAD_TOO_LARGE"),
])
def test_framing_errors_are_json(server: ServerProcess, raw: bytes, status: int, code: str) -> None:
    s = _connect(server)
    s.sendall(raw)
    got, headers, body = _read_responses(s, 1)[0]
    assert got == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == code
    assert headers.get("connection") == "close" and _closed(s)


def test_method_not_allowed_says_what_is(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/set/get")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["code"] == "METHOD_NOT_ALLOWED"
    r = httpx.post(server.url + "/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    r = httpx.head(server.url + "/health")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(b'{"status":"ok"}')


def test_answers_to_head_never_carry_a_body(server: ServerProcess) -> None:
    """Refused or not found, a HEAD's answer has headers only: a body would be read as the
    start of the next answer on the connection."""
    s = _connect(server)
    s.sendall(b"HEAD /set/get HTTP/1.1\r\nHost: x\r\n\r\nHEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n"
              b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while not buf.endswith(b'{"status":"ok"}'):
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    answers = buf.split(b"\r\n\r\n")
    assert [a.split(b" ", 2)[1] for a in answers[:4]] == [b"405", b"404", b"200", b"200"]
    assert answers[4] == b'{"status":"ok"}'


def test_http_1_0_and_connection_close(server: ServerProcess) -> None:
    s = _connect(server)
    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    assert _read_responses(s, 1)[0][0] == 200 and _closed(s)
    s = _connect(server)
    s.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert _read_responses(s, 1)[0][0] == 200 and _closed(s)


def test_stalled_bodies_stop_nobody_and_time_out(make_server: Any) -> None:
    """Hundreds of clients that promise a body and stall hold only their own connections."""
    srv = make_server(args=["--read-timeout", "2"])
    srv.ok("/create", {"name": "shop"})
    srv.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": 1})
    stalled = []
    for _ in range(300):
        s = _connect(srv)
        s.sendall(b"POST /set/put HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"data")
        stalled.append(s)
    worst = 0.0
    with httpx.Client(base_url=srv.url) as c:
        for _ in range(200):
            started = time.monotonic()
            assert c.post("/set/get", json={"database": "shop", "set": "s", "key": "k"}).status_code == 200
            worst = max(worst, time.monotonic() - started)
    assert worst < 0.1, worst
    time.sleep(3.5)  # past the read timeout: each stalled client got a 408 and was closed
    for s in stalled[:20]:
        status, _, body = _read_responses(s, 1)[0]
        assert status == 408 and json.loads(body)["code"] == "REQUEST_TIMEOUT"
        assert _closed(s)
    for s in stalled:
        s.close()


def test_every_worker_sees_every_write_at_once(make_server: Any) -> None:
    srv = make_server(args=["--workers", "3"])
    for i in range(30):
        with httpx.Client(base_url=srv.url) as writer:  # a new connection each: any worker
            assert writer.post("/create", json={"name": f"db{i}"}).status_code == 200
            assert writer.post("/set/put", json={"database": f"db{i}", "set": "s", "key": "k", "value": i}).status_code == 200
        for _ in range(5):
            with httpx.Client(base_url=srv.url) as reader:
                r = reader.post("/set/get", json={"database": f"db{i}", "set": "s", "key": "k"})
                assert r.status_code == 200 and r.json()["data"] == i
    with httpx.Client(base_url=srv.url) as c:
        for _ in range(30):
            c.post("/set/get", json={"database": "db0", "set": "s", "key": "k"})
        metrics = c.get("/metrics").text
    gets = sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('fuckbase_requests_total{endpoint="/set/get",status="200"}'))
    assert gets == 30 * 5 + 30  # every worker's requests, counted at once


def test_a_restore_is_atomic_for_readers_under_load(make_server: Any) -> None:
    srv = make_server(args=["--workers", "2"])
    srv.ok("/create", {"name": "shop"})
    srv.ok("/set/batch", {"database": "shop", "set": "s", "operations": [
        {"op": "put", "key": f"k{i}", "value": {"v": i}} for i in range(20000)]})
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        with httpx.Client(base_url=srv.url) as c:
            while not stop.is_set():
                r = c.post("/set/get", json={"database": "shop", "set": "s", "key": f"k{reads % 20000}"})
                reads += 1
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            srv.ok("/backup/restore", {"backup_name": name})
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert reads > 100
    assert failures == []
    metrics = srv.client.get("/metrics").text if srv.client is not None else ""
    assert 'fuckbase_keys{database="shop"} 20000.0' in metrics  # nothing staged was reclaimed
