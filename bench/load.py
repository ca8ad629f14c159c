"""Preloads a running server: database "bench", set "users", N keys, optionally the email index.

Usage: python bench/load.py --url http://127.0.0.1:8080 --keys 100000 [--index basic|none]

HTTP client libraries cost far more per request than the server does, so this loader speaks
plain HTTP/1.1 with pipelining over a few keep-alive connections: 1M keys load in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

PIPELINE = 128


async def _pipeline(host: str, port: int, bodies: list[bytes], path: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for start in range(0, len(bodies), PIPELINE):
            chunk = bodies[start : start + PIPELINE]
            writer.write(
                b"".join(
                    b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), len(b), b)
                    for b in chunk
                )
            )
            await writer.drain()
            for _ in chunk:
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                if status != 200:
                    raise SystemExit(f"{path} failed with {status}: {body[:200]!r}")
    finally:
        writer.close()


async def post(url: str, path: str, bodies: list[bytes], connections: int) -> None:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    share = (len(bodies) + connections - 1) // connections
    await asyncio.gather(
        *(_pipeline(host, port, bodies[i : i + share], path) for i in range(0, len(bodies), share))
    )


def value(i: int) -> dict[str, object]:
    return {"name": "John", "email": f"user{i}@example.com", "age": 30}


async def preload(url: str, keys: int, db: str = "bench", index: bool = True, connections: int = 8) -> float:
    """Creates `db` and puts `keys` users (pipelined), then the email index; returns the load's seconds."""
    try:
        await post(url, "/create", [json.dumps({"name": db}).encode()], 1)
    except SystemExit as exc:
        if "409" not in str(exc):
            raise
    try:  # the set first: the original fails puts that race to create it ("Failed to create set")
        await post(url, "/set/create", [json.dumps({"database": db, "name": "users"}).encode()], 1)
    except SystemExit as exc:
        if "409" not in str(exc):
            raise
    started = time.perf_counter()
    step = 50_000
    for lo in range(0, keys, step):
        bodies = [
            json.dumps({"database": db, "set": "users", "key": f"user{i}", "value": value(i)}).encode()
            for i in range(lo, min(keys, lo + step))
        ]
        await post(url, "/set/put", bodies, connections)
    took = time.perf_counter() - started
    if index:
        body = {"database": db, "set": "users", "name": "email_index", "field": "email"}
        await post(url, "/index/create", [json.dumps(body).encode()], 1)
    return took


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--index", choices=["basic", "none"], default="basic")
    ap.add_argument("--database", default="bench")
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    t = time.perf_counter()
    took = await preload(args.url, args.keys, args.database, args.index == "basic", args.connections)
    print(f"loaded {args.keys} keys in {took:.1f}s")
    if args.index == "basic":
        print(f"index created in {time.perf_counter() - t - took:.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
