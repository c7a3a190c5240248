"""One repetition of one client: a fresh server process, a fresh client process, their figures.

The parent does no measuring of its own: the child times itself, and the server says
what it saw (requests, statuses, prompts answered twice) once the child has exited.

Both processes run from a `snapshot` of ``nbtoolkit/`` and ``benchmarks/`` taken when the
run starts (their working directory comes first on ``sys.path``), so edits made to the
working tree while a long run goes on never mix two versions into one table.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from benchmarks.scenarios import Scenario

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 60.0  # a server that has not printed its URL by then is broken
GRACE_SECONDS = 60.0  # past a child's own deadline, before it is killed


def snapshot(dest: Path, rev: str | None = None) -> str:
    """Copy the code under test to `dest`, checked to import; returns a digest of it.

    Args:
        dest: an empty directory; the children run with it as their working directory.
        rev: a git revision to take ``nbtoolkit/`` from; None takes the working tree. The
            test servers, ``nbtoolkit/testing/``, always come from the working tree.

    Raises:
        RuntimeError: the copied nbtoolkit does not import (caught in the middle of an edit).
    """
    ignore = shutil.ignore_patterns("__pycache__", "results*", "*.pyc")
    shutil.copytree(ROOT / "benchmarks", dest / "benchmarks", ignore=ignore)
    if rev is None:
        shutil.copytree(ROOT / "nbtoolkit", dest / "nbtoolkit", ignore=ignore)
    else:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev, "nbtoolkit"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)  # our own git archive, so trusted
        # The test servers: a package now (nbtoolkit/testing/), a module before.
        for old in (dest / "nbtoolkit" / "testing.py", dest / "nbtoolkit" / "testing"):
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        shutil.copytree(
            ROOT / "nbtoolkit" / "testing", dest / "nbtoolkit" / "testing", ignore=ignore
        )
    check = subprocess.run(
        [sys.executable, "-c", "import nbtoolkit.testing, benchmarks.clients"],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check.returncode:
        raise RuntimeError(f"the code to measure does not import:\n{check.stderr[-2000:]}")
    digest = hashlib.sha256()
    for path in sorted((dest / "nbtoolkit").rglob("*.py")):
        digest.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def environment(cache_dir: Path | None = None) -> dict[str, str]:
    """This process's environment, less anything that could send a request elsewhere.

    `cache_dir` becomes nbtoolkit's response cache folder: a fresh one per run keeps runs
    from answering each other and keeps benchmark rows out of the user's own cache.
    """
    blocked = {"OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"}
    env = {
        k: v for k, v in os.environ.items() if k not in blocked and not k.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if cache_dir is not None:
        env["NBTOOLKIT_CACHE_DIR"] = str(cache_dir)
    return env


def _read_line(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no reply from the server within {timeout} s")
    return stream.readline().strip()


class _Server:
    """The `benchmarks.serve` process: its URL, and its stats on demand."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        if process.stdin is None or process.stdout is None:
            raise RuntimeError("the server process needs piped stdin and stdout")
        self._stdin, self._stdout = process.stdin, process.stdout
        self.url = _read_line(self._stdout, STARTUP_SECONDS)
        if not self.url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"server did not start: {self.url!r}")

    def stats(self) -> dict[str, Any]:
        self._stdin.write("stats\n")
        self._stdin.flush()
        stats: dict[str, Any] = json.loads(_read_line(self._stdout, 30))
        return stats

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._stdin.write("stop\n")
            self._stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@contextlib.contextmanager
def server(options: dict[str, Any], log: IO[str], source: Path) -> Iterator[_Server]:
    """A running `benchmarks.serve` process, stopped on exit whatever happened."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.serve", json.dumps(options)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=source,
        env=environment(),
    )
    try:
        running = _Server(process)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    try:
        yield running
    finally:
        running.stop()


def _child(spec: dict[str, Any], log: IO[str], source: Path, cache: Path) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=source,
            env=environment(cache),
            timeout=spec["deadline"] + GRACE_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"killed: still running {GRACE_SECONDS:g} s past its deadline"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            return result
    log.flush()
    tail = Path(log.name).read_text(errors="replace")[-2000:]
    return {"error": f"exit {done.returncode}, no result; stderr ends: {tail}"}


def run_once(scenario: Scenario, client: str, *, source: Path, logs: Path) -> dict[str, Any]:
    """Run `client` once over `scenario` with the code in `source`; child's and server's figures."""
    stem = logs / f"{scenario.name}-{client}"
    with (
        open(f"{stem}-server.log", "a") as server_log,
        open(f"{stem}-client.log", "a") as client_log,
        tempfile.TemporaryDirectory(dir=logs, prefix="cache-") as cache,
        server(scenario.server, server_log, source) as running,
    ):
        spec = {
            "client": client,
            "url": running.url,
            "rows": scenario.rows,
            "max_parallel": scenario.max_parallel,
            "timeout": scenario.timeout,
            "deadline": scenario.deadline,
        }
        # The 1-minute load average: other work on the machine shows up here, not in medians.
        load = os.getloadavg()[0]
        result = _child(spec, client_log, source, Path(cache))
        result["server"] = running.stats()
        result["load_before"], result["load_after"] = load, os.getloadavg()[0]
    result.setdefault("client", client)
    return result
