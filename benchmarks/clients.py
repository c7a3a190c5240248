"""The clients under test, one function each, all sending the same request for each row.

Each takes a `Job` and writes each row's answer into ``job.results`` as soon as it has it,
so a run cut short by its deadline still shows how far it got. They differ only in the
way they send (the issue's peers):

    floor      bare aiohttp + asyncio.Semaphore, gather over every row, no retries
    recipe     the common recipe: floor + tenacity's wait_random_exponential(1, 60), 20 tries
    openai     the official SDK's AsyncOpenAI with its default settings + a Semaphore
    pool       N workers pulling from a lazily fed asyncio.Queue, no retries (memory baseline)
    nbtoolkit  ``df.chat.complete(...)`` with the progress bar on
    nbtoolkit_extract  ``df.chat.extract(..., schema=BenchReview)``: typed, checked fields
    engine     nbtoolkit's ``ChatRun`` directly: no DataFrame, no bar
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import openai
import pandas as pd
import pydantic
from tenacity import retry, stop_after_attempt, wait_random_exponential

import nbtoolkit

MODEL = "bench-model"


@dataclass(frozen=True)
class Job:
    """One client's work: the rows (column ``prompt``) and where and how to send them."""

    url: str  # the server's base_url, http://127.0.0.1:PORT/v1
    frame: pd.DataFrame
    max_parallel: int
    timeout: float | None  # seconds per request; None: each client's own default
    results: list[str | None]  # one slot per row, filled as rows finish


def _body(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}


@contextlib.asynccontextmanager
async def _session(job: Job) -> AsyncIterator[aiohttp.ClientSession]:
    # A pool as wide as the concurrency cap, as nbtoolkit's engine sizes its own.
    connector = aiohttp.TCPConnector(limit=job.max_parallel)
    timeout = aiohttp.ClientTimeout(total=job.timeout or 300)  # 300 s: aiohttp's default
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def _post(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    """One request; raises on any status >= 400 or a body that is not a completion."""
    async with session.post(url + "/chat/completions", json=_body(prompt)) as reply:
        reply.raise_for_status()
        data = await reply.json(content_type=None)
    return str(data["choices"][0]["message"]["content"])


async def _gather(job: Job, call: Callable[[str], Awaitable[str]]) -> None:
    """A task per row, all at once, at most max_parallel inside `call`; failures stay None."""
    semaphore = asyncio.Semaphore(job.max_parallel)

    async def one(index: int, prompt: str) -> None:
        async with semaphore:
            with contextlib.suppress(Exception):
                job.results[index] = await call(prompt)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(job.frame["prompt"])))


async def floor(job: Job) -> None:
    """Bare aiohttp + Semaphore + gather; a failed row is simply None."""
    async with _session(job) as session:
        await _gather(job, lambda prompt: _post(session, job.url, prompt))


# The recipe as it is usually copied: retry anything, up to 20 tries, 1-60 s random waits.
@retry(wait=wait_random_exponential(min=1, max=60), stop=stop_after_attempt(20))
async def _post_with_retries(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    return await _post(session, url, prompt)


async def recipe(job: Job) -> None:
    """Floor plus tenacity's @retry; the Semaphore is held through the waits, as usual."""
    async with _session(job) as session:
        await _gather(job, lambda prompt: _post_with_retries(session, job.url, prompt))


async def openai_sdk(job: Job) -> None:
    """``AsyncOpenAI`` with default retries and pool; only the timeout follows the scenario."""
    options: dict[str, Any] = {} if job.timeout is None else {"timeout": job.timeout}
    client = openai.AsyncOpenAI(base_url=job.url, api_key="x", **options)

    async def call(prompt: str) -> str:
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return str(reply.choices[0].message.content)

    try:
        await _gather(job, call)
    finally:
        await client.close()


async def pool(job: Job) -> None:
    """max_parallel workers over a queue of 2 x max_parallel slots fed lazily from the frame."""
    workers = job.max_parallel
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(maxsize=2 * workers)

    async def produce() -> None:
        for item in enumerate(job.frame["prompt"]):
            await queue.put(item)
        for _ in range(workers):
            await queue.put(None)

    async def work(session: aiohttp.ClientSession) -> None:
        while (item := await queue.get()) is not None:
            index, prompt = item
            with contextlib.suppress(Exception):
                job.results[index] = await _post(session, job.url, prompt)

    async with _session(job) as session, asyncio.TaskGroup() as group:
        group.create_task(produce())
        for _ in range(workers):
            group.create_task(work(session))


def _config(job: Job) -> nbtoolkit.ChatConfig:
    timeouts = nbtoolkit.Timeouts(total=job.timeout) if job.timeout else nbtoolkit.Timeouts()
    return nbtoolkit.ChatConfig(
        base_url=job.url,
        model=MODEL,
        max_parallel=job.max_parallel,
        timeouts=timeouts,
        progress=False,
    )


async def engine(job: Job) -> None:
    """``ChatRun.execute`` over a generator of requests, with nbtoolkit's defaults."""
    run = nbtoolkit.ChatRun(_config(job))
    requests = (
        nbtoolkit.ChatRequest(({"role": "user", "content": prompt},))
        for prompt in job.frame["prompt"]
    )
    try:
        await run.execute(requests)
    finally:
        for index, row in enumerate(run.results):
            job.results[index] = None if row is None else row.text


def accessor(job: Job, **options: Any) -> bool:
    """``df.chat.complete`` with the bar on; False when the deadline interrupted it."""
    finished = True
    try:
        out = job.frame.chat.complete(
            "prompt",
            model=MODEL,
            base_url=job.url,
            max_parallel=job.max_parallel,
            timeout=job.timeout,
            progress=True,
            **options,
        )
    except nbtoolkit.RunInterrupted as exc:
        out, finished = exc.partial, False
    job.results[:] = list(out["response"])
    return finished


class BenchReview(pydantic.BaseModel):
    """The schema of the structured scenario: an enum, an integer, a boolean, a string."""

    sentiment: Literal["positive", "negative", "mixed"]
    stars: int
    recommend: bool
    summary: str


def extract(job: Job) -> bool:
    """``df.chat.extract`` with the bar on; each row's result is its ``summary`` field."""
    finished = True
    try:
        out = job.frame.chat.extract(
            "prompt",
            schema=BenchReview,
            model=MODEL,
            base_url=job.url,
            max_parallel=job.max_parallel,
            timeout=job.timeout,
            progress=True,
        )
    except nbtoolkit.RunInterrupted as exc:
        out, finished = exc.partial, False
    job.results[:] = [None if pd.isna(value) else value for value in out["summary"]]
    return finished


ASYNC_CLIENTS: dict[str, Callable[[Job], Awaitable[None]]] = {
    "floor": floor,
    "recipe": recipe,
    "openai": openai_sdk,
    "pool": pool,
    "engine": engine,
}


def accessor_without_cache(job: Job) -> bool:
    """``df.chat.complete(..., cache=False)``: what the response cache costs, by difference."""
    return accessor(job, cache=False)


SYNC_CLIENTS: dict[str, Callable[[Job], bool]] = {
    "nbtoolkit": accessor,
    "nbtoolkit_nocache": accessor_without_cache,
    # The same call a second time: every answer comes from the cache (see PREPARE).
    "nbtoolkit_cached": accessor,
    "nbtoolkit_extract": extract,
}
# Run before the clock starts, in the same process (and the same fresh cache folder).
PREPARE: dict[str, Callable[[Job], bool]] = {"nbtoolkit_cached": accessor}
