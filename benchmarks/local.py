"""``python -m benchmarks.local [--old-python PATH] [--rows N] [--repeat R] [--quick]``: the local
model's runtimes side by side, in the same run, on the same prompts.

    new   xllamacpp (llama.cpp's C++ server, continuous batching), as `LocalServer` starts it,
          with ``parallel`` slots (1, 4, 8) and llama.cpp's thread count (one per core)
    old   llama-cpp-python 0.3.36's server (the runtime before issue #20), started with the
          flags the old `LocalServer` used, from another virtual environment's Python
          (``--old-python``; skipped without it: its install compiles llama.cpp for minutes)

Two workloads, each through ``df.chat.complete`` (no cache) at 1, 4 and 8 requests in flight:

    generate  24 rows, a 30-token prompt continued for up to 48 tokens at temperature 0:
              decoding speed, completion tokens per second of wall time
    label     the demo's few-shot sentiment prompt on 24 reviews, 3 tokens each: rows per
              second (mostly prompt processing, where the slots' prefix cache counts)

Repetitions are interleaved (old, new with each slot count, then again) so a slow minute on
this shared machine does not land on one runtime alone; figures are medians. Also reported:
each server's peak memory (VmHWM of its process), and with ``--threads`` the new runtime at
4 slots with 1 and 2 threads. Writes ``benchmarks/results-local.md``.

Install time is measured apart (``--install``): the ``local`` extra into a fresh virtual
environment with ``pip install --no-cache-dir``, timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

import nbtoolkit
from benchmarks.harness import ROOT
from nbtoolkit.local import SENTIMENT_TEMPLATE, LocalServer, model_path, sample_reviews

IN_FLIGHT = (1, 4, 8)
SLOTS = (1, 4, 8)
GENERATE_TEMPLATE = "Product: {product}\nReview: {review}\nA longer review of the same {product}:"
GENERATE_TOKENS = 48
# The plain template the old LocalServer gave llama-cpp-python (hf-tokenizer-config format).
_OLD_TEMPLATE = {
    "chat_template": "{{ bos_token }}{{ messages | selectattr('content')"
    " | map(attribute='content') | join('\\n\\n') }}",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.local", description=__doc__)
    parser.add_argument("--old-python", help="a Python with llama-cpp-python[server]==0.3.36")
    parser.add_argument("--rows", type=int, default=24, help="rows per run (default 24)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true", help="one repetition, 4 slots only")
    parser.add_argument("--threads", action="store_true", help="also 1 and 2 threads, 4 slots")
    parser.add_argument("--install", action="store_true", help="only time the local extra")
    parser.add_argument(
        "--slots", default="1,4,8", help="the new runtime's slot counts (default 1,4,8)"
    )
    parser.add_argument(
        "--workloads", default="generate,label", help="which workloads (default both)"
    )
    parser.add_argument(
        "--tokens", type=int, default=GENERATE_TOKENS, help="generate: max_tokens (default 48)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results-local.md")
    return parser.parse_args()


def frame(rows: int) -> pd.DataFrame:
    """The sample reviews, repeated to ``rows`` rows (each a different prompt by its index)."""
    sample = sample_reviews()
    copies = pd.concat([sample] * (rows // len(sample) + 1), ignore_index=True).head(rows)
    # A number per row: no two prompts are the same, so no answer is shared.
    copies["review"] = [f"{text} ({i})" for i, text in enumerate(copies["review"])]
    return copies


def run(
    workload: str,
    base_url: str,
    model: str,
    rows: int,
    in_flight: int,
    tokens: int = GENERATE_TOKENS,
) -> dict[str, Any]:
    """One timed run of ``workload``; returns its wall, tokens, and rate."""
    data = frame(rows)
    if workload == "generate":
        options: dict[str, Any] = {"template": GENERATE_TEMPLATE, "max_tokens": tokens}
    else:
        options = {"template": SENTIMENT_TEMPLATE, "max_tokens": 3, "stop": ["\n"]}
    started = time.perf_counter()
    data.chat.complete(
        model=model,
        base_url=base_url,
        temperature=0,
        max_parallel=in_flight,
        cache=False,
        progress=False,
        timeout=600,
        **options,
    )
    wall = time.perf_counter() - started
    report = nbtoolkit.last_run()
    assert report is not None
    ok = int((report.rows["status"] == "ok").sum())
    tokens = report.stats.completion_tokens
    rate = tokens / wall if workload == "generate" else ok / wall
    return {"wall": wall, "ok": ok, "tokens": tokens, "rate": rate}


@contextlib.contextmanager
def old_server(python: str) -> Iterator[tuple[str, int]]:
    """llama-cpp-python's server as the old LocalServer started it; yields (base URL, pid)."""
    with tempfile.TemporaryDirectory(prefix="bench-old-") as work:
        template = Path(work) / "plain_template.json"
        template.write_text(json.dumps(_OLD_TEMPLATE))
        port = _free_port()
        # fmt: off
        command = [
            python, "-m", "llama_cpp.server", "--model", str(model_path()),
            "--model_alias", "gemma-3-270m", "--n_ctx", "2048", "--host", "127.0.0.1",
            "--port", str(port), "--chat_format", "hf-tokenizer-config",
            "--hf_tokenizer_config_path", str(template), "--verbose", "False",
            "--logits_all", "False",
        ]
        # fmt: on
        with open(Path(work) / "server.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                base_url = f"http://127.0.0.1:{port}/v1"
                _wait(f"{base_url}/models", process)
                yield base_url, process.pid
            finally:
                process.terminate()
                process.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(url: str, process: subprocess.Popen[bytes], limit: float = 300.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the old server exited with code {process.returncode}")
        with contextlib.suppress(OSError), opener.open(url, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the old server did not come up")


def peak_memory_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (runtime, slots, threads) x workload x in-flight cell, ``repeat`` times."""
    configs: list[tuple[str, int, int | None]] = []
    if args.old_python:
        configs.append(("old", 1, None))
    slot_counts = [int(n) for n in args.slots.split(",")]
    configs += [("new", slots, None) for slots in ((4,) if args.quick else slot_counts)]
    workloads = args.workloads.split(",")
    if args.threads:
        configs += [("new", 4, 1), ("new", 4, 2)]
    results: list[dict[str, Any]] = []
    for repetition in range(1 if args.quick else args.repeat):
        for runtime, slots, threads in configs:
            with _server(runtime, slots, threads, args.old_python) as (base_url, pid):
                run("label", base_url, "gemma-3-270m", 4, 1)  # warm-up: the first request
                for workload in workloads:
                    for in_flight in IN_FLIGHT:
                        row = run(
                            workload, base_url, "gemma-3-270m", args.rows, in_flight, args.tokens
                        )
                        row |= {
                            "runtime": runtime,
                            "slots": slots,
                            "threads": threads or "auto",
                            "workload": workload,
                            "in_flight": in_flight,
                            "repetition": repetition,
                        }
                        results.append(row)
                        print(json.dumps(row), flush=True)
                memory = peak_memory_mb(pid)
            for row in results:
                if (row["runtime"], row["slots"], row["threads"], row["repetition"]) == (
                    runtime,
                    slots,
                    threads or "auto",
                    repetition,
                ):
                    row["peak_mb"] = memory
    return results


@contextlib.contextmanager
def _server(
    runtime: str, slots: int, threads: int | None, old_python: str | None
) -> Iterator[tuple[str, int]]:
    if runtime == "old":
        assert old_python is not None
        with old_server(old_python) as found:
            yield found
        return
    with LocalServer(parallel=slots, threads=threads) as server:
        assert server.pid is not None
        yield server.base_url, server.pid


def table(results: list[dict[str, Any]]) -> str:
    """Medians per configuration: tokens/s (generate) and rows/s (label) at each in-flight."""
    frame_ = pd.DataFrame(results)
    keys = ["runtime", "slots", "threads"]
    lines = [
        "| runtime | slots | threads | generate tok/s at 1 / 4 / 8 in flight "
        "| label rows/s at 1 / 4 / 8 | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for (runtime, slots, threads), group in frame_.groupby(keys, sort=False):
        cells = []
        for workload in ("generate", "label"):
            rates = [
                group[(group.workload == workload) & (group.in_flight == k)]["rate"]
                for k in IN_FLIGHT
            ]
            medians = [f"{statistics.median(r):.1f}" if len(r) else "-" for r in rates]
            cells.append(" / ".join(medians))
        name = "xllamacpp" if runtime == "new" else "llama-cpp-python 0.3.36"
        shown_slots = slots if runtime == "new" else "1 (serial)"
        memory = f"{statistics.median(group['peak_mb']):.0f} MB"
        lines.append(f"| {name} | {shown_slots} | {threads} | {cells[0]} | {cells[1]} | {memory} |")
    return "\n".join(lines)


def install_time() -> str:
    """The ``local`` extra's packages into a fresh venv from an empty cache, timed."""
    extra = _local_extra()
    with tempfile.TemporaryDirectory(prefix="bench-install-") as work:
        venv = Path(work) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        started = time.perf_counter()
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir", *extra],
            check=True,
            env={**os.environ, "PIP_NO_CACHE_DIR": "1"},
        )
        seconds = time.perf_counter() - started
    return f"`pip install --no-cache-dir {' '.join(extra)}`: {seconds:.1f} s"


def _local_extra() -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    return list(project["optional-dependencies"]["local"])


def main() -> int:
    """Run the benchmark; print and write the table."""
    args = _arguments()
    if args.install:
        print(install_time())
        return 0
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = measure(args)
    text = (
        f"# Local model runtimes ({started}, {os.cpu_count()} cores, load average at the end "
        f"{os.getloadavg()[0]:.1f})\n\n`python -m benchmarks.local {' '.join(sys.argv[1:])}`"
        f", {args.rows} rows per run, medians of {1 if args.quick else args.repeat}\n\n"
        + table(results)
        + "\n"
    )
    print(text)
    args.output.write_text(text)
    (args.output.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
