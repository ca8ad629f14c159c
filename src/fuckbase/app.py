"""From a request to a response in a worker: routing, JSON bodies, errors, metrics, the access log.

Short operations run inline. Long ones (the contract's `long` endpoints) go to the job
process and are awaited; a credential seen for the first time is verified by `PasswordChecks`
(bounded, off the loop) and the request run again; with durability "fsync" a write is
answered once a flush covers its commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Generic, TypeVar

import orjson

from fuckbase.accesslog import AccessLog
from fuckbase.api import Api, PreparedRead, error_for
from fuckbase.auth import NeedsVerification, PasswordChecks, TooManyChecks
from fuckbase.contract import BY_PATH, ErrorCode
from fuckbase.errors import ApiError, invalid
from fuckbase.http import Pending, Request, Response, answer_of, error_response
from fuckbase.metrics import Metrics
from fuckbase.storage import PointRead, Storage, StorageError, StorageUnavailable

log = logging.getLogger("fuckbase.http")

GetRoute = Callable[[], Response | Awaitable[Response]]  # awaitable: answered off the event loop
Forward = Callable[[str, bytes, dict[str, str]], Awaitable[Response]]
_ALLOW_POST = b"allow: POST\r\n"
_ALLOW_GET = b"allow: GET, HEAD\r\n"


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw or raw.isspace():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise invalid(f"request body is not valid JSON: {exc}") from None
        body = _lone_surrogates_replaced(raw, exc)
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    return body


def _lone_surrogates_replaced(raw: bytes, exc: orjson.JSONDecodeError) -> Any:
    """A body whose strings hold an escaped surrogate with no partner (`"\\ud83d"`: what
    JavaScript sends for an emoji cut in half), read as the original reads it: each such
    one becomes U+FFFD. Parsed again from the repaired text, so that every other rule of
    the usual parse holds (nesting, numbers)."""
    try:
        repaired = json.dumps(_replace_surrogates(json.loads(raw)), ensure_ascii=False).encode()
        return orjson.loads(repaired)
    except UnicodeDecodeError:  # orjson says "surrogates" of bytes that are not UTF-8 too
        raise invalid("request body is not valid UTF-8") from None
    except (ValueError, RecursionError):  # not JSON after all, or nested too deep
        raise invalid(f"request body is not valid JSON: {exc}") from None


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def run_handler(handler: Callable[..., bytes], *args: Any) -> Response:
    """Runs a synchronous handler; every failure becomes the contract's error envelope."""
    try:
        return Response(200, handler(*args))
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except StorageError as exc:
        err = error_for(exc)
        return error_response(err.status, err.code, err.message)


Redo = Callable[[NeedsVerification], Awaitable[Response]]


Handler = Callable[[dict[str, Any], Any], bytes]
T = TypeVar("T")


class WriteGroup:
    """The writes of one turn of the event loop commit together (Storage.begin_group): the
    first write of a turn opens the group and schedules its end for the end of the turn, when
    the queued writes run and commit; each answer waits for that (and, with durability
    "fsync", a flush). A write whose credentials were not verified yet is redone after."""

    def __init__(self, storage: Storage, flush: Callable[[], Awaitable[None]] | None) -> None:
        self._storage = storage
        self._flush = flush
        self._waiting: list[_Deferred] = []
        self._open = False

    def write(self, handler: Handler, body: dict[str, Any], headers: Any, done: Callable[[int], None],
              redo: Redo) -> Response | Pending:
        """Runs the handler, whose storage writes join the turn's group: its answer at once
        when it was refused before writing (`done` called), else once the group committed.
        Raises NeedsVerification when the handler itself did."""
        if not self._open:
            self._storage.begin_group()
            self._open = True
            asyncio.get_running_loop().call_soon(self._commit)
        before = self._storage.queued_writes()
        response = run_handler(handler, body, headers)
        if response.status != 200:
            done(response.status)
            return response
        pending = Pending(joinable=True)
        self._waiting.append(_Deferred(pending, response, self._storage.queued_writes() - before, done, redo))
        return pending

    def _commit(self) -> None:
        self._open = False
        waiting, self._waiting = self._waiting, []
        _answer(waiting, self._storage.end_group(), self._flush)


class _Batches(Generic[T]):
    """Items gathered on the loop and run a batch at a time on a thread (`_run`), their
    results settled back on the loop (`_settle`): a batch leaves at the end of the loop turn,
    or, while one runs, once it has ended; what gathered meanwhile goes in the next. One batch
    at a time per worker gave the most requests per second (bench/postgresql.py): batches grow
    while one runs."""

    MAX = 256  # items per batch

    def __init__(self, threads: Executor, deadline: float | None = None) -> None:
        self._threads = threads
        self._deadline = deadline  # seconds a batch may run before its requests get 503
        self._waiting: list[T] = []
        self._busy = False
        self._scheduled = False

    def _add(self, item: T) -> None:
        self._waiting.append(item)
        if not self._scheduled and not self._busy:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        if self._busy or not self._waiting:
            return
        batch, self._waiting = self._waiting[: self.MAX], self._waiting[self.MAX :]
        self._busy = True
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._threads, self._run, batch)
        timer = None if self._deadline is None else loop.call_later(self._deadline, self._expire, batch, job)
        job.add_done_callback(partial(self._ended, batch, timer))

    def _next(self) -> None:
        self._busy = False
        if self._waiting:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _ended(self, batch: list[T], timer: asyncio.TimerHandle | None, job: asyncio.Future[Any]) -> None:
        if timer is not None:
            timer.cancel()
        if job.cancelled():  # expired: answered already, and its thread's result is dropped
            return
        self._next()
        self._settle(batch, job)

    def _expire(self, batch: list[T], job: asyncio.Future[Any]) -> None:
        """The storage did not answer in time (a frozen or unreachable database): the batch's
        requests get 503 now and the next batch goes on another thread. A write so answered
        may still be applied when the database wakes, as with any timeout."""
        if job.done():
            return
        log.warning("a batch of %d requests answered 503: the storage did not answer within %g s"
                    " (its writes may still be applied when it does)", len(batch), self._deadline)
        job.cancel()
        self._next()
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(StorageUnavailable(f"the storage did not answer within {self._deadline:g} s"))
        self._settle(batch, failed)

    def _run(self, batch: list[T]) -> Any:
        raise NotImplementedError

    def _settle(self, batch: list[T], job: asyncio.Future[Any]) -> None:
        raise NotImplementedError


class ThreadedWriteGroup(_Batches["_Queued"]):
    """A remote backend's groups of writes (Storage.begin_group), run on a thread so that the
    loop goes on meanwhile: while one group commits, the next gathers; then its handlers, its
    queued writes and its commit all run on a thread, and the answers come back to the loop."""

    MAX = 1024

    def __init__(self, storage: Storage, threads: Executor, flush: Callable[[], Awaitable[None]] | None,
                 deadline: float | None = None) -> None:
        super().__init__(threads, deadline)
        self._storage = storage
        self._flush = flush

    def write(self, handler: Handler, body: dict[str, Any], headers: Any, done: Callable[[int], None],
              redo: Redo) -> Response | Pending:
        pending = Pending(joinable=True)
        self._add(_Queued(handler, body, headers, pending, done, redo))
        return pending

    def _run(self, batch: list[_Queued]) -> tuple[list[Response | NeedsVerification], list[int],
                                                   list[BaseException | None]]:
        """On the thread: the handlers (their writes queued in the group), then the commit."""
        responses: list[Response | NeedsVerification] = []
        counts: list[int] = []
        self._storage.begin_group()
        try:
            for q in batch:
                before = self._storage.queued_writes()
                try:
                    responses.append(run_handler(q.handler, q.body, q.headers))
                except NeedsVerification as unverified:
                    responses.append(unverified)
                counts.append(self._storage.queued_writes() - before)
        finally:
            outcomes = self._storage.end_group()
        return responses, counts, outcomes

    def _settle(self, batch: list[_Queued], job: asyncio.Future[Any]) -> None:
        try:
            responses, counts, outcomes = job.result()
        except StorageError as exc:
            failed = _error_response(exc)
            responses, counts, outcomes = [failed] * len(batch), [0] * len(batch), []
        except Exception:
            log.exception("a group of writes failed")
            failed = error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")
            responses, counts, outcomes = [failed] * len(batch), [0] * len(batch), []
        committed: list[_Deferred] = []
        for q, response, count in zip(batch, responses, counts, strict=True):
            if isinstance(response, NeedsVerification):
                q.pending.joinable = False
                asyncio.ensure_future(q.redo(response)).add_done_callback(partial(_redone, q.pending, q.done))
            elif response.status != 200:
                q.done(response.status)
                q.pending.resolve(response)
            else:
                committed.append(_Deferred(q.pending, response, count, q.done, q.redo))
        _answer(committed, outcomes, self._flush)


@dataclass(frozen=True, slots=True)
class _Queued:
    """A write waiting for the next group of a ThreadedWriteGroup."""

    handler: Handler
    body: dict[str, Any]
    headers: Any
    pending: Pending
    done: Callable[[int], None]
    redo: Redo


def _for_method(req: Request, response: Response) -> Response:
    """An answer to HEAD has no body, whatever it says (refusals and 404s included)."""
    return replace(response, head_only=True) if req.method == "HEAD" else response


def _answer(waiting: list[_Deferred], outcomes: list[BaseException | None],
            flush: Callable[[], Awaitable[None]] | None) -> None:
    """Each write's answer from the outcomes of its queued writes (in order), after a flush
    when durability asks for one; a write whose credentials were not verified is redone."""
    if outcomes.count(None) == len(outcomes):  # the common case: every write committed
        answers = [(d, d.response) for d in waiting]
    else:
        results = iter(outcomes)
        answers = []
        for d in waiting:
            failure = next((o for o in (next(results) for _ in range(d.count)) if o is not None), None)
            if failure is None:
                answers.append((d, d.response))
            elif isinstance(failure, NeedsVerification):
                d.pending.joinable = False
                asyncio.ensure_future(d.redo(failure)).add_done_callback(d.redone)
            else:
                answers.append((d, _error_response(failure)))
    if flush is not None and any(r.status == 200 for _, r in answers):
        asyncio.ensure_future(flush()).add_done_callback(lambda f: _flushed(f, answers))
    else:
        _settle(answers)


def _flushed(flush: asyncio.Future[None], answers: list[tuple[_Deferred, Response]]) -> None:
    exc = flush.exception()
    if exc is not None:
        log.error("fsync failed: %s", exc)
        failed = error_response(500, ErrorCode.INTERNAL_ERROR, "the write is committed but not known to be on disk: fsync failed")
        answers = [(d, failed if r.status == 200 else r) for d, r in answers]
    _settle(answers)


class ReadGroup(_Batches[tuple[PointRead, Callable[[Any], None]]]):
    """A remote backend's point reads go to it many at once (Storage.fetch), like writes:
    the reads that gathered while the previous fetch ran share one round trip."""

    def __init__(self, storage: Storage, threads: Executor, deadline: float | None = None) -> None:
        super().__init__(threads, deadline)
        self._storage = storage

    def fetch(self, read: PointRead, done: Callable[[Any], None]) -> None:
        """Calls `done` on the loop with the read's result (or what it raised, as a value)."""
        self._add((read, done))

    def _run(self, batch: list[tuple[PointRead, Callable[[Any], None]]]) -> list[Any]:
        return self._storage.fetch([read for read, _ in batch])

    def _settle(self, batch: list[tuple[PointRead, Callable[[Any], None]]], job: asyncio.Future[Any]) -> None:
        failure = job.exception()
        results = [failure] * len(batch) if failure is not None else job.result()
        for (_, done), result in zip(batch, results, strict=True):
            done(result)


class _Deferred:
    __slots__ = ("pending", "response", "count", "done", "redo")

    def __init__(self, pending: Pending, response: Response, count: int, done: Callable[[int], None],
                 redo: Redo) -> None:
        self.pending = pending
        self.response = response
        self.count = count
        self.done = done
        self.redo = redo

    def redone(self, task: asyncio.Future[Response]) -> None:
        _redone(self.pending, self.done, task)


def _redone(pending: Pending, done: Callable[[int], None], task: asyncio.Future[Response]) -> None:
    response = answer_of(task)
    done(response.status)
    pending.resolve(response)


def _settle(answers: list[tuple[_Deferred, Response]]) -> None:
    for d, response in answers:
        d.done(response.status)
    Pending.resolve_all([(d.pending, response) for d, response in answers])


def _error_response(exc: BaseException) -> Response:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message)
    if isinstance(exc, StorageError):
        err = error_for(exc)
        return error_response(err.status, err.code, err.message)
    log.error("a write failed: %r", exc)
    return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")


class App:
    """The dispatch function of a worker's HttpServer."""

    def __init__(
        self,
        api: Api,
        metrics: Metrics,
        access_log: AccessLog | None,
        get_routes: dict[str, GetRoute],
        forward: Forward,
        group: WriteGroup | ThreadedWriteGroup,
        flush: Callable[[], Awaitable[None]] | None,
        offload: Executor | None = None,
        reads: ReadGroup | None = None,
    ) -> None:
        self.api = api
        self.offload = offload  # reads of a remote backend run on these threads, not the loop
        self.reads = reads  # and its point reads are fetched many at once
        self.metrics = metrics
        self.access_log = access_log
        self.get_routes = get_routes
        self.forward = forward
        self.group = group
        self.flush = flush  # durability "fsync": awaits a flush covering every commit so far
        self.password_checks = PasswordChecks()

    def joins(self, req: Request) -> bool:
        """Whether the request would be a write of the current group."""
        route = BY_PATH.get(req.path)
        return route is not None and route.writes and not route.long and req.method == "POST"

    def __call__(self, req: Request) -> Response | Pending:
        started = time.perf_counter()
        route = BY_PATH.get(req.path)
        if route is None:
            answer = self._non_api(req)
            if not isinstance(answer, Response):
                return Pending.of(self._finish_later(answer, req, started))
            response = answer
            label = req.path if req.path in self.get_routes else "other"
        elif req.method != "POST":
            response = error_response(405, ErrorCode.METHOD_NOT_ALLOWED, "Only POST method is allowed", _ALLOW_POST)
            label = req.path
        else:
            label = req.path
            try:
                body = parse_body(req.body)
            except ApiError as exc:
                response = error_response(exc.status, exc.code, exc.message)
            else:
                if route.long:
                    raw = req.body if body else b"{}"
                    return Pending.of(self._finish_later(self._forwarded(req, raw), req, started))
                try:
                    if route.writes:
                        return self._write(req, body, started)
                    if self.reads is not None and req.path in self.api.point_reads:
                        return self._point_read(req, body, started)
                    if self.offload is not None:
                        return Pending.of(self._finish_later(self._read_off_loop(req, body), req, started))
                    response = run_handler(self.api.handlers[req.path], body, req.headers)
                except NeedsVerification as pending:
                    return Pending.of(self._finish_later(self._verify_then_run(pending, req, body), req, started))
        self._record(req, label, response.status, started=started)
        return _for_method(req, response)

    def _write(self, req: Request, body: dict[str, Any], started: float) -> Response | Pending:
        """Validates a write and queues it in a group; its answer waits for the group's commit."""
        return self.group.write(self.api.handlers[req.path], body, req.headers,
                                partial(self._record, req, req.path, started=started),
                                partial(self._verify_then_run, req=req, body=body))

    def _point_read(self, req: Request, body: dict[str, Any], started: float) -> Response | Pending:
        assert self.reads is not None
        try:
            prepared = self.api.point_reads[req.path](body, req.headers)
        except ApiError as exc:
            self._record(req, req.path, exc.status, started=started)
            return error_response(exc.status, exc.code, exc.message)
        pending = Pending()
        self.reads.fetch(prepared.read, partial(self._fetched, prepared, pending, req, body, started))
        return pending

    def _fetched(self, prepared: PreparedRead, pending: Pending, req: Request, body: dict[str, Any],
                 started: float, result: Any) -> None:
        try:
            response = run_handler(prepared.finish, result)
        except NeedsVerification as unverified:
            later = asyncio.ensure_future(self._finish_later(self._verify_then_run(unverified, req, body), req, started))
            later.add_done_callback(lambda task: pending.resolve(answer_of(task)))
            return
        except Exception:
            log.exception("unexpected error on %s", req.path)
            response = error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")
        self._record(req, req.path, response.status, started=started)
        pending.resolve(response)

    def _non_api(self, req: Request) -> Response | Awaitable[Response]:
        get = self.get_routes.get(req.path)
        if get is None:
            return error_response(404, ErrorCode.NOT_FOUND, f"no endpoint {req.path}")
        if req.method not in ("GET", "HEAD"):
            return error_response(405, ErrorCode.METHOD_NOT_ALLOWED, f"{req.path} answers GET", _ALLOW_GET)
        return get()

    async def _forwarded(self, req: Request, raw: bytes) -> Response:
        response = await self.forward(req.path, raw, req.headers)
        if BY_PATH[req.path].writes and self.flush is not None and response.status == 200:
            return await self._after_flush(response)
        return response

    async def _read_off_loop(self, req: Request, body: dict[str, Any]) -> Response:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.offload, run_handler, self.api.handlers[req.path], body, req.headers)
        except NeedsVerification as pending:
            return await self._verify_then_run(pending, req, body)

    async def _finish_later(self, work: Awaitable[Response], req: Request, started: float) -> Response:
        try:
            response = await work
        except Exception:
            log.exception("unexpected error on %s", req.path)
            response = error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")
        self._record(req, req.path, response.status, started=started)
        return _for_method(req, response)

    async def _verify_then_run(self, pending: NeedsVerification, req: Request, body: dict[str, Any]) -> Response:
        try:
            verified = await self.password_checks.verify(pending, req.peer)
        except TooManyChecks as exc:
            return error_response(429, ErrorCode.TOO_MANY_REQUESTS, str(exc), b"retry-after: %d\r\n" % exc.retry_after)
        if not verified:
            return error_response(401, ErrorCode.AUTH_FAILED, "Authentication failed")
        try:
            if not BY_PATH[req.path].writes:
                if self.offload is not None:
                    return await self._read_off_loop(req, body)
                return run_handler(self.api.handlers[req.path], body, req.headers)
            answer = self.group.write(self.api.handlers[req.path], body, req.headers, lambda status: None,
                                      partial(self._verify_then_run, req=req, body=body))
        except NeedsVerification as again:  # a restore swapped the credentials meanwhile
            return await self._verify_then_run(again, req, body)
        return answer if isinstance(answer, Response) else await answer.wait()

    async def _after_flush(self, response: Response) -> Response:
        assert self.flush is not None
        try:
            await self.flush()
        except StorageError as exc:
            err = error_for(exc)
            return error_response(err.status, err.code, f"the write is committed but not yet on disk: {err.message}")
        return response

    def _record(self, req: Request, label: str, status: int, *, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.observe(label, status, elapsed)
        if self.access_log is not None:
            self.access_log.record(req.method, req.path, status, elapsed)
