"""Submitting a job, or re-attaching to the one already submitted for the same requests.

A job is claimed in the cache file before anything is uploaded (`BatchStore.claim`), keyed
by its requests and the query-free URL: the same cell run again, in another process or with
another ``api-version``, finds it. Each part (one input file) is then sent through the
provider; a part whose upload failed is left "unsent" for a re-run to send.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

from nbtoolkit.batch import _files as batch_files
from nbtoolkit.batch._http import BatchHTTP
from nbtoolkit.batch._job import Job
from nbtoolkit.batch._plan import BatchOptions, cache_path, check_budget, plan_rows
from nbtoolkit.batch._provider import provider_for
from nbtoolkit.config import ChatConfig
from nbtoolkit.core._engine import request_keys
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.core.endpoints._providers import chat_endpoint
from nbtoolkit.core.store._batch_jobs import BatchStore, Part, job_key
from nbtoolkit.core.store._cache import ResponseCache
from nbtoolkit.errors import ConfigError, NbToolkitError

# How long a run waits for another process that is uploading the same job right now.
_OTHER_SUBMITTER_WAIT = 120.0


async def submit(
    requests: Iterable[Any],
    config: ChatConfig,
    *,
    endpoint: Endpoint | None = None,
    options: BatchOptions | None = None,
) -> Job:
    """Submit the uncached requests as a batch job, or re-attach to the one already submitted.

    Args:
        requests: one request (or None: nothing to send) per row.
        config: where requests go; its cache file keeps the job.
        endpoint: how requests become bodies; default chat completions.
        options: splitting, discount and polling; default `BatchOptions()`.

    Returns:
        The job, at once (it runs on the server for up to 24 hours).

    Raises:
        ConfigError: no model, no cache, or a worst case over ``max_cost`` /
            ``max_tokens_total``: raised before anything is uploaded.
    """
    config = config.resolved()
    if options is not None and not isinstance(options, BatchOptions):
        raise ConfigError(f"batch= takes a BatchOptions (or nothing); got {options!r}")
    options = options or BatchOptions()
    if not config.model:
        raise ConfigError(
            "no model: pass model='...' or set it with nbtoolkit.configure(model=...)"
        )
    path = cache_path(config)
    endpoint = endpoint or chat_endpoint(config)
    provider_for(config, endpoint)  # a provider without a batch API here: refused up front
    if endpoint.max_items != 1:
        raise ConfigError(
            f"batch mode sends one row per line; {type(endpoint).__name__} groups rows"
        )
    rows = plan_rows(requests, endpoint, request_keys(config, endpoint).key)
    with ResponseCache(path) as cache:
        rows.cached = set(cache.get_many(list(rows.items)))
    job = Job(job_id=None, config=config, endpoint=endpoint, options=options, rows=rows)
    to_send = [k for k in rows.items if k not in rows.cached]
    if not to_send:
        return job
    key = job_key(config.key_url(endpoint.path), to_send)
    lines = []
    for k in to_send:
        custom_id = batch_files.custom_id(k)
        model = rows.items[k].body.get("model")
        data = job.provider.line(custom_id, rows.items[k])
        lines.append(
            batch_files.Line(custom_id, k, model if isinstance(model, str) else None, data)
        )
    files = batch_files.split(lines, max_lines=options.max_lines, max_bytes=options.max_bytes)
    with BatchStore(path) as store:
        if store.live_job(key) is None:
            # Checked only for a new job: re-attaching uploads nothing and pays nothing more.
            check_budget(config, options, [rows.items[k] for k in to_send])
        job.job_id, created = store.claim(
            key,
            model=config.model,
            endpoint=endpoint.path,
            parts=[[(one.custom_id, one.key) for one in file] for file in files],
        )
    await _send_parts(job, {one.custom_id: one.data for one in lines}, mine=created)
    return job


async def _send_parts(job: Job, lines: Mapping[str, bytes], *, mine: bool) -> None:
    """Submit each batch of the job that has none yet.

    ``mine``: this call claimed the job and sends every part. Otherwise it sends only parts
    left unsent (their submitter failed, or died long ago) and waits for a part another
    process is submitting right now.
    """
    assert job.job_id is not None
    deadline = time.monotonic() + _OTHER_SUBMITTER_WAIT
    async with BatchHTTP(job.config) as http:
        for part in job._parts():
            while part.batch_id is None:
                if not mine:
                    with job._store() as store:
                        taken = store.take_over(part)
                if mine or taken:
                    await _send_part(http, job, part, lines)
                    break
                if time.monotonic() > deadline:
                    raise NbToolkitError(
                        f"another process is still submitting batch job {job.job_id}; "
                        "run the cell again in a minute to re-attach"
                    )
                await asyncio.sleep(0.2)
                part = next(p for p in job._parts() if p.part == part.part)


async def _send_part(http: BatchHTTP, job: Job, part: Part, lines: Mapping[str, bytes]) -> None:
    assert job.job_id is not None
    with job._store() as store:
        ids = store.requests(job.job_id, part.part)
    try:
        submitted = await job.provider.submit(
            http,
            [lines[cid] for cid in ids],
            name=f"{job.job_id}-{part.part}",
            metadata={"nbtoolkit_job": job.job_id, "part": str(part.part)},
        )
    except BaseException:
        with job._store() as store:
            store.update(job.job_id, part.part, status="unsent")  # a re-run sends it
        raise
    with job._store() as store:
        store.update(
            job.job_id,
            part.part,
            batch_id=submitted.batch_id,
            input_file_id=submitted.input_file_id,
            status=submitted.state.status,
            total=submitted.state.total or len(ids),
        )
