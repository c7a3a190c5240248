"""What every test server shares: a real aiohttp server, scripted actions, counters, records.

`ScriptedServer` runs the life of a request the same way for every provider: read the body,
check the key, ask the `Limiter`, take the request's action (queued by `script`, else one
`FaultRates` picks, else a reply), wait the latency, answer. A provider's server is a
subclass that knows only its wire format: its routes, how a key travels, how an error, a
429 and an answer look (`ChatServer` for OpenAI, `AnthropicServer`, `GeminiServer`).

Longer than ~400 lines: the request life every provider's test server shares (key, limiter,
scripted actions, faults, records) is one piece, so that no provider's server copies it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from nbtoolkit.testing._actions import (
    Action,
    Echo,
    FaultRates,
    Malformed,
    Reply,
    Reset,
    Stall,
    Status,
)
from nbtoolkit.testing._ratelimit import Limiter, RateLimit, Rejection

__all__ = ["RecordedRequest", "ScriptedServer"]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it, and how it ended.

    `outcome` is "ok" (a valid answer was sent), the status as a string for an error
    ("429", "401", ...), "malformed", "reset", "stall" (cut while stalled) or "dropped" (the
    client hung up, or the server stopped, before the reply was written). Times are
    `time.monotonic()`; `attempt` counts earlier requests with the same prompt, leaving out
    those a `RateLimit` turned away.
    """

    body: dict[str, Any]
    headers: dict[str, str]
    prompt: str
    started: float
    finished: float
    status: int | None
    outcome: str
    attempt: int = 0
    path: str = ""  # the URL path, e.g. /v1/chat/completions
    query: dict[str, str] = field(default_factory=dict)  # the URL's query parameters


@dataclass
class Exchange:
    """The mutable state of a request in progress, frozen into a RecordedRequest at the end."""

    kind: str = "chat"  # the route's kind: "chat" or "embeddings"
    body: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    attempt: int = 0
    status: int | None = None
    outcome: str = "dropped"
    headers: dict[str, str] = field(default_factory=dict)  # added to whatever reply is sent
    inputs: list[str] | None = None  # an embeddings request's texts, each counted as answered
    started: float = 0.0
    settled: bool = False  # counted and recorded already


class ScriptedServer:
    """The machinery of a scripted test server; subclasses speak one provider's format.

    Args:
        latency: Seconds every successful reply waits before it is sent.
        api_key: When set, requests without this key are refused as the provider does.
        faults: Random but reproducible faults for requests without a scripted action.
        record: False keeps no per-request list (for big benchmarks); counters still work.
        rate_limit: Request (and token) buckets, and the rate headers that describe them.

    Counters (`request_count`, `in_flight`, `peak_in_flight`, `answered`, `statuses`) are
    only written by the server's loop, so reading them from another thread is safe.
    `statuses` counts the `RecordedRequest.outcome` of each finished request.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        faults: FaultRates | None = None,
        record: bool = True,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.latency = latency
        self.rate_limit = rate_limit
        self._api_key = api_key
        self._faults = faults
        self._record = record
        # script() is called from the test's thread while requests pop on the server's loop.
        self._lock = threading.Lock()
        self._global: collections.deque[Action] = collections.deque()
        self._by_prompt: dict[str, collections.deque[Action]] = {}
        # Attempt numbers drive fault picks, so reset_records() leaves them alone.
        self._seen: collections.Counter[str] = collections.Counter()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = False
        # Pending waits, woken at shutdown so stalled handlers never hold up runner.cleanup().
        self._sleepers: set[asyncio.Future[None]] = set()
        self._limiter: Limiter | None = None
        self.in_flight = 0
        self.reset_records()

    # What a provider's server says; each subclass fills these in.

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def _prompt(self, body: dict[str, Any], kind: str) -> str:
        """The text a request's scripted actions and faults are keyed by."""
        raise NotImplementedError

    def _authorized(self, request: web.Request) -> bool:
        raise NotImplementedError

    def _auth_error(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    def _bad_body(self) -> web.Response:
        """The reply to a body that is not a JSON object."""
        raise NotImplementedError

    def _status_response(self, action: Status) -> web.Response:
        raise NotImplementedError

    def _rate_limited(self, rejection: Rejection) -> web.Response:
        raise NotImplementedError

    def _token_cost(self, body: dict[str, Any], kind: str) -> float:
        """What a request draws from a token bucket: its prompt estimate and completion cap."""
        raise NotImplementedError

    def _answer(
        self, request: web.Request, ex: Exchange, body: dict[str, Any], action: Reply
    ) -> web.Response:
        """The reply to a request that got through; sets ``ex.inputs`` for embeddings."""
        raise NotImplementedError

    def _precheck(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        """A refusal before any limit or action (a wrong URL, an unknown model), or None."""
        return None

    def _refuse(self, body: dict[str, Any], kind: str) -> web.Response | None:
        """A refusal after the limiter and before any action (a request shape it rejects)."""
        return None

    @property
    def base_url(self) -> str:
        """The URL to give the client (its meaning depends on the provider)."""
        raise NotImplementedError

    # The machinery.

    def reset_records(self) -> None:
        """Forget recorded requests and zero the counters (scripts and attempts stay)."""
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        # Requests still in flight keep counting: they decrement in_flight when they end.
        self.peak_in_flight = self.in_flight
        self.answered: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()

    def script(self, *actions: Action, prompt: str | None = None) -> None:
        """Queue `actions` for the next requests with `prompt`, or for any prompt when None.

        Safe to call from any thread while the server runs.
        """
        with self._lock:
            if prompt is None:
                self._global.extend(actions)
            else:
                self._by_prompt.setdefault(prompt, collections.deque()).extend(actions)

    @property
    def port(self) -> int:
        """The port the OS picked; only valid while the server runs."""
        if self._port is None:
            name = type(self).__name__
            raise RuntimeError(f"{name} is not running; use `async with` or run_in_thread()")
        return self._port

    async def start(self) -> None:
        """Start listening on 127.0.0.1 on a free port."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        app = web.Application()
        self._routes(app)
        # handler_cancellation: a client hanging up ends its handler (and a Stall) at once.
        # shutdown_timeout: handlers still running at stop are cancelled after a second.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._closing = False
        # Full buckets on every start: a limit's history never leaks into the next run.
        self._limiter = None if self.rate_limit is None else Limiter(self.rate_limit)
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop the server, cutting stalled requests short."""
        if self._runner is None:
            return
        self._closing = True
        for sleeper in list(self._sleepers):
            if not sleeper.done():
                sleeper.set_result(None)
        runner, self._runner, self._port = self._runner, None, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self, *, timeout: float = 10.0) -> Iterator[Self]:
        """Run the server on a daemon thread with its own event loop, for sync tests.

        Args:
            timeout: Seconds to wait for the server to start, and to stop.

        Returns:
            A context manager that yields this server once it is listening.
        """
        ready = threading.Event()
        handle: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        failure: list[BaseException] = []

        async def serve() -> None:
            done = asyncio.Event()
            async with self:
                handle.append((asyncio.get_running_loop(), done))
                ready.set()
                await done.wait()

        def main() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:
                failure.append(exc)
            finally:
                ready.set()

        name = f"nbtoolkit-{type(self).__name__}"
        thread = threading.Thread(target=main, name=name, daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"{type(self).__name__} did not start within {timeout} s")
        if failure:
            raise RuntimeError(f"{type(self).__name__} failed to start") from failure[0]
        loop, done = handle[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(done.set)
            thread.join(timeout)

    async def _wait(self, seconds: float) -> bool:
        """Sleep `seconds`; False when the server started stopping meanwhile."""
        if seconds > 0 and not self._closing:
            loop = asyncio.get_running_loop()
            sleeper: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(seconds, _wake, sleeper)
            self._sleepers.add(sleeper)
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleepers.discard(sleeper)
        return not self._closing

    def _next_action(self, prompt: str) -> tuple[Action, int]:
        with self._lock:
            attempt = self._seen[prompt]
            self._seen[prompt] += 1
            queue = self._by_prompt.get(prompt)
            if queue:
                return queue.popleft(), attempt
            if self._global:
                return self._global.popleft(), attempt
        fault = self._faults.pick(prompt, attempt) if self._faults else None
        return fault or Reply(), attempt

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        """The handler behind every answering route: counts, records, then `_handle`."""
        self.request_count += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        ex = Exchange(kind=kind, started=time.monotonic())
        try:
            return await self._handle(request, ex)
        finally:
            self.in_flight -= 1
            self._settle(request, ex)

    def _settle(self, request: web.Request, ex: Exchange) -> None:
        """Count and record the exchange, once. `_send` calls this before a reply's last byte
        leaves, so a client that has read its reply always finds the request recorded."""
        if ex.settled:
            return
        ex.settled = True
        self.statuses[ex.outcome] += 1
        if ex.outcome == "ok" and ex.inputs is not None:
            self.answered.update(ex.inputs)
        elif ex.outcome == "ok":
            self.answered[ex.prompt] += 1
        if self._record:
            record = RecordedRequest(
                body=ex.body,
                headers=dict(request.headers),
                prompt=ex.prompt,
                started=ex.started,
                finished=time.monotonic(),
                status=ex.status,
                outcome=ex.outcome,
                attempt=ex.attempt,
                path=request.path,
                query=dict(request.query),
            )
            self.requests.append(record)

    async def _handle(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            ex.body = body
            ex.prompt = self._prompt(body, ex.kind)
        if not self._authorized(request):
            return await self._send(request, ex, self._auth_error(request))
        refused = self._precheck(request, body if isinstance(body, dict) else None)
        if refused is not None:
            return await self._send(request, ex, refused)
        if not isinstance(body, dict):
            return await self._send(request, ex, self._bad_body())
        if self._limiter is not None:
            rejection = self._limiter.admit(self._token_cost(body, ex.kind))
            ex.headers.update(self._limiter.headers())
            if rejection is not None:
                with self._lock:
                    ex.attempt = self._seen[ex.prompt]
                return await self._send(request, ex, self._rate_limited(rejection))
        refused = self._refuse(body, ex.kind)
        if refused is not None:
            return await self._send(request, ex, refused)
        action, ex.attempt = self._next_action(ex.prompt)
        if isinstance(action, Reset):
            ex.outcome = "reset"
            return _abort(request)
        if isinstance(action, Status):
            if not await self._wait(action.latency):
                return _abort(request)
            return await self._send(request, ex, self._status_response(action))
        if isinstance(action, Malformed):
            response = web.Response(
                status=action.status, text=action.body, content_type=action.content_type
            )
            return await self._send(request, ex, response, outcome="malformed")
        if isinstance(action, Echo):
            echoed = {"url": str(request.url), "headers": dict(request.headers)}
            response = web.json_response(echoed)
            return await self._send(request, ex, response, outcome="malformed")
        if isinstance(action, Stall):
            ex.outcome = "stall"
            if not await self._wait(action.seconds):
                return _abort(request)
            ex.outcome = "dropped"
            action = Reply()
        latency = self.latency if action.latency is None else action.latency
        if not await self._wait(latency):
            return _abort(request)
        response = self._answer(request, ex, body, action)
        outcome = "ok" if response.status == 200 else None
        return await self._send(request, ex, response, outcome=outcome)

    async def _send(
        self,
        request: web.Request,
        ex: Exchange,
        response: web.StreamResponse,
        *,
        outcome: str | None = None,
    ) -> web.StreamResponse:
        response.headers.update(ex.headers)
        # Written here, not by aiohttp after we return, so in_flight covers the write.
        try:
            await response.prepare(request)
        except ConnectionError:
            return response
        ex.status = response.status
        ex.outcome = outcome or str(response.status)
        self._settle(request, ex)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


def _abort(request: web.Request) -> web.StreamResponse:
    # No HTTP response at all: aiohttp's write of the returned object fails quietly on the
    # aborted transport, and the client sees the connection drop.
    if request.transport is not None:
        request.transport.abort()
    return web.Response()


def tokens(text: str) -> int:
    """A rough token count (about four characters a token), enough for usage arithmetic."""
    return len(text) // 4 + 1


def text_of(content: Any) -> str:
    """A message's text: a string, or the text of its parts (OpenAI's and Anthropic's lists)."""
    if isinstance(content, list):
        return "".join(
            text_of(p.get("text", p.get("content"))) for p in content if isinstance(p, dict)
        )
    return content if isinstance(content, str) else ""
