"""Settings as frozen dataclasses; the only module that reads environment variables.

A run's settings come from three layers, later ones winning: the defaults below, the
process-wide config (`nbtoolkit.configure(...)`), and the keyword arguments of one call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

from nbtoolkit.errors import ConfigError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_LOOPBACK_HOSTS = frozenset({"localhost", "::1", "0.0.0.0"})


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a row that failed for a passing reason is tried again.

    A server's ``Retry-After`` / ``retry-after-ms`` wins over the computed backoff, up to
    ``retry_after_max``; beyond that the row fails with the server's wait in its reason
    rather than silently holding the cell for an hour.
    """

    attempts: int = 6  # tries per row in all, the first included
    wait_initial: float = 0.5  # seconds before the second try, doubling after each
    wait_max: float = 30.0  # cap on the computed backoff
    # The random share of each backoff, 0 to 1. At 1 ("full jitter") a wait is anywhere from
    # 0 to the backoff: workers never retry in step, and on average wait half as long.
    jitter: float = 1.0
    retry_after_max: float = 300.0  # the longest server-requested wait we honour

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"attempts must be >= 1, got {self.attempts}")
        for name in ("wait_initial", "wait_max", "retry_after_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"jitter is a share of the backoff, 0 to 1; got {self.jitter}")


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    """Per-request time limits, in seconds. A stalled connection is cut and retried."""

    connect: float = 10.0  # to open the TCP (and TLS) connection
    total: float = 120.0  # for the whole request, connection pool wait excluded
    read: float | None = None  # longest silence between bytes of the reply; None: no such limit

    def __post_init__(self) -> None:
        for name in ("connect", "total", "read"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"timeout {name} must be > 0 seconds, got {value}")


@dataclass(frozen=True, kw_only=True)
class ChatConfig:
    """Where requests go and how a run behaves.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``, the
    variables the official SDK reads. A key-less local server (llama.cpp, vLLM) needs no key.
    """

    base_url: str | None = None  # None: $OPENAI_BASE_URL, else the OpenAI API
    api_key: str | None = field(default=None, repr=False)  # None: $OPENAI_API_KEY, else no key
    model: str | None = None
    max_parallel: int = 16  # requests in flight at once, never more
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress: bool = True
    rpm: float | None = None  # client-side budget, requests per minute; None: the server's
    tpm: float | None = None  # client-side budget, tokens per minute (estimated, then settled)
    adaptive: bool = True  # halve concurrency on 429s/timeouts, grow it back on success
    # The response cache: True for the per-user default file, a path, or False for none.
    cache: bool | str | os.PathLike[str] = True
    dedupe: bool = True  # identical requests in one run are sent once and shared
    # Per model, (input, output) price per million tokens; turns tokens into money.
    prices: Mapping[str, tuple[float, float]] | None = None
    max_cost: float | None = None  # stop sending once this much would be spent (needs prices)
    max_tokens_total: int | None = None  # stop sending once this many tokens would be used
    # Extra request-body fields sent with every request (temperature, seed, ...).
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.max_parallel, int) or self.max_parallel < 1:
            raise ConfigError(f"max_parallel must be an integer >= 1, got {self.max_parallel!r}")
        for name in ("rpm", "tpm", "max_cost", "max_tokens_total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")

    def resolved(self) -> ChatConfig:
        """Fill base_url and api_key from the environment where they were left unset."""
        base_url = self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        api_key = self.api_key if self.api_key is not None else os.environ.get("OPENAI_API_KEY")
        return dataclasses.replace(self, base_url=base_url.rstrip("/"), api_key=api_key or None)

    @property
    def cache_path(self) -> Path | None:
        """The cache file this config uses, or None when caching is off."""
        if self.cache is False:
            return None
        if self.cache is True:
            return default_cache_path()
        return Path(self.cache)

    @property
    def endpoint(self) -> str:
        return self.url("/chat/completions")

    def url(self, path: str) -> str:
        """The full URL of an endpoint (``path`` like ``"/chat/completions"``)."""
        return f"{(self.base_url or DEFAULT_BASE_URL).rstrip('/')}{path}"

    @property
    def use_proxy_env(self) -> bool:
        """Follow HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as the openai SDK does, except on
        loopback: a local server is never reached through a proxy."""
        host = urlsplit(self.base_url or DEFAULT_BASE_URL).hostname or ""
        return host not in _LOOPBACK_HOSTS and not host.startswith("127.")

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def default_cache_path() -> Path:
    """The platform's per-user cache folder (via platformdirs), or ``$NBTOOLKIT_CACHE_DIR``."""
    folder = os.environ.get("NBTOOLKIT_CACHE_DIR")
    if not folder:
        folder = platformdirs.user_cache_dir("nbtoolkit", appauthor=False)
    return Path(folder) / "responses.sqlite3"


_FIELDS = {f.name for f in dataclasses.fields(ChatConfig)}
_RETRY_FIELDS = {f.name for f in dataclasses.fields(RetryPolicy)}
_TIMEOUT_FIELDS = {f.name for f in dataclasses.fields(Timeouts)}
_global_config = ChatConfig()


def configure(**changes: Any) -> ChatConfig:
    """Change the process-wide defaults every later call starts from.

    Args:
        **changes: any `ChatConfig` field (``base_url``, ``api_key``, ``model``,
            ``max_parallel``, ``timeouts``, ``retry``, ``progress``, ``params``).

    Returns:
        The new process-wide config.

    Example:
        >>> configure(base_url="http://127.0.0.1:8080/v1", model="local")  # doctest: +SKIP
    """
    global _global_config
    _global_config = merge(_global_config, **changes)
    return _global_config


def get_config() -> ChatConfig:
    """The process-wide config (before the environment fills base_url and api_key)."""
    return _global_config


def merge(base: ChatConfig, **changes: Any) -> ChatConfig:
    """A copy of ``base`` with ``changes`` applied; None means "keep the base value".

    Besides ChatConfig's own fields, the fields of `RetryPolicy` and `Timeouts` may be given
    flat, with a prefix: ``timeout_total=5`` or ``retry_attempts=3``.
    """
    top: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    timeouts: dict[str, Any] = {}
    for name, value in changes.items():
        if value is None:
            continue
        if name in _FIELDS:
            top[name] = value
        elif name.startswith("retry_") and name[6:] in _RETRY_FIELDS:
            retry[name[6:]] = value
        elif name.startswith("timeout_") and name[8:] in _TIMEOUT_FIELDS:
            timeouts[name[8:]] = value
        else:
            raise ConfigError(f"unknown setting {name!r}; settings are {sorted(_FIELDS)}")
    merged = dataclasses.replace(base, **top)
    if retry:
        merged = dataclasses.replace(merged, retry=dataclasses.replace(merged.retry, **retry))
    if timeouts:
        merged = dataclasses.replace(
            merged, timeouts=dataclasses.replace(merged.timeouts, **timeouts)
        )
    return merged
