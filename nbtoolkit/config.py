"""Settings as frozen dataclasses; the only module that reads environment variables.

A run's settings come from three layers, later ones winning: the defaults below, the
process-wide config (`nbtoolkit.configure(...)`), and the keyword arguments of one call.

Longer than ~400 lines because it is the one module that reads the environment: every
provider's variables, Azure's URL forms and the redaction of what a repr shows live together.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import platformdirs

from nbtoolkit.errors import ConfigError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Which wire format requests speak: OpenAI's chat completions (and every compatible server),
# Anthropic's Messages API, or the Gemini API. Each has its own endpoints (core/endpoints).
Provider = Literal["openai", "anthropic", "gemini"]
PROVIDERS: tuple[Provider, ...] = get_args(Provider)
# The API roots, as each official SDK takes its base_url; paths (/v1/messages,
# /v1beta/models/...) are the endpoints'.
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
# Sent with every Anthropic request: the Messages API version nbtoolkit speaks.
ANTHROPIC_VERSION = "2023-06-01"
# Query parameters that are never secret, shown as they are in a repr.
_PLAIN_QUERY = frozenset({"api-version"})


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

    Azure OpenAI, as the SDK's ``AzureOpenAI`` reads it: with ``azure_endpoint`` (or
    ``$AZURE_OPENAI_ENDPOINT`` when no base URL is set anywhere), the key (``api_key`` or
    ``$AZURE_OPENAI_API_KEY``) goes in an ``api-key`` header and requests go to
    ``{endpoint}/openai/deployments/{model}/chat/completions?api-version={api_version}``
    (``$OPENAI_API_VERSION``), the model being the deployment's name. An endpoint that ends
    in ``/openai/v1`` (the v1 API) or names a deployment is used as it is.

    ``provider="anthropic"`` speaks Anthropic's Messages API (key ``$ANTHROPIC_API_KEY``,
    root ``$ANTHROPIC_BASE_URL``, else https://api.anthropic.com); ``provider="gemini"`` the
    Gemini API (key ``$GOOGLE_API_KEY``, else ``$GEMINI_API_KEY``, as google-genai reads
    them; root ``$GOOGLE_GEMINI_BASE_URL``, else https://generativelanguage.googleapis.com).
    Their ``base_url`` is the API root, as their SDKs take it. Left unset, the provider is
    OpenAI's, unless nothing points at OpenAI or Azure (no base URL, key or endpoint, here or
    in the environment) and only Anthropic's or only Gemini's key is in the environment.
    """

    provider: Provider | None = None  # None: see above
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else the OpenAI API
    api_key: str | None = field(default=None, repr=False)  # None: $OPENAI_API_KEY, else no key
    model: str | None = None
    # Sent with every request (OpenRouter's HTTP-Referer, a gateway's own key), after ours,
    # so they may replace them. Out of reprs and cache keys, like the key: they may be secret.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Added to every request URL. Out of reprs and cache keys: some gateways take keys here.
    query: Mapping[str, str] = field(default_factory=dict, repr=False)
    azure_endpoint: str | None = None  # https://NAME.openai.azure.com; see above
    api_version: str | None = None  # Azure's api-version; None: $OPENAI_API_VERSION on Azure
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
    # Per model, (input, output) or (input, cached_input, output) per million tokens, or a
    # nbtoolkit.Price; wins over the shipped price table (nbtoolkit/core/prices.json).
    prices: Mapping[str, Any] | None = None
    max_cost: float | None = None  # stop sending once this much would be spent (needs prices)
    max_tokens_total: int | None = None  # stop sending once this many tokens would be used
    # Extra request-body fields sent with every request (temperature, seed, ...).
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        # By hand, not the dataclass's: base_url and azure_endpoint may carry a key in their
        # query (some gateways take it there), shown masked; the repr=False fields not at all.
        shown = []
        for spec in dataclasses.fields(self):
            if not spec.repr:
                continue
            value = getattr(self, spec.name)
            if spec.name in ("base_url", "azure_endpoint") and isinstance(value, str):
                value = masked_url(value)
            shown.append(f"{spec.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __post_init__(self) -> None:
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ConfigError(f"provider must be one of {list(PROVIDERS)}; got {self.provider!r}")
        for name in ("headers", "query"):
            mapping = getattr(self, name)
            if not isinstance(mapping, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
            ):
                # Not the values: a header may hold a key.
                raise ConfigError(f"{name} must map names to strings; got {type(mapping).__name__}")
        if not isinstance(self.max_parallel, int) or self.max_parallel < 1:
            raise ConfigError(f"max_parallel must be an integer >= 1, got {self.max_parallel!r}")
        for name in ("rpm", "tpm", "max_cost", "max_tokens_total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")

    def speaks(self) -> Provider:
        """The provider this config speaks: its own, else the one the environment points at."""
        return self.provider or _provider_from(self, os.environ)

    def for_provider(self, provider: Provider) -> ChatConfig:
        """This config, speaking ``provider``.

        The base URL, key, headers, query, Azure settings and model are one provider's: when
        ``provider`` is another, they are dropped (an OpenAI key must never be sent to
        Anthropic, nor a GPT model name), to come from the caller or that provider's
        environment variables.

        Raises:
            ConfigError: ``provider`` is not one of `PROVIDERS`.
        """
        if provider not in PROVIDERS:
            raise ConfigError(f"provider must be one of {list(PROVIDERS)}; got {provider!r}")
        if provider == self.speaks():
            return dataclasses.replace(self, provider=provider)
        return dataclasses.replace(
            self,
            provider=provider,
            base_url=None,
            api_key=None,
            headers={},
            query={},
            azure_endpoint=None,
            api_version=None,
            model=None,
        )

    def resolved(self) -> ChatConfig:
        """Fill the endpoint, key and API version from the environment where left unset.

        Raises:
            ConfigError: an Azure deployment URL with no API version to send.
        """
        env = os.environ
        provider = self.speaks()
        if provider == "anthropic":
            key = self.api_key if self.api_key is not None else env.get("ANTHROPIC_API_KEY")
            root = self.base_url or env.get("ANTHROPIC_BASE_URL") or ANTHROPIC_BASE_URL
            return self._native(provider, root, key)
        if provider == "gemini":
            key = self.api_key
            if key is None:
                key = env.get("GOOGLE_API_KEY") or env.get("GEMINI_API_KEY")
            root = self.base_url or env.get("GOOGLE_GEMINI_BASE_URL") or GEMINI_BASE_URL
            return self._native(provider, root, key)
        base_url = self.base_url or env.get("OPENAI_BASE_URL")
        # A base URL set anywhere wins over the environment's Azure endpoint, as it does in
        # the SDK's OpenAI client; an explicit azure_endpoint wins over both.
        azure = self.azure_endpoint or (None if base_url else env.get("AZURE_OPENAI_ENDPOINT"))
        if not azure:
            api_key = self.api_key if self.api_key is not None else env.get("OPENAI_API_KEY")
            base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
            return dataclasses.replace(
                self, provider="openai", base_url=base_url, api_key=api_key or None
            )
        azure = azure.rstrip("/")
        api_key = self.api_key if self.api_key is not None else env.get("AZURE_OPENAI_API_KEY")
        api_version = self.api_version
        if not _is_azure_url_complete(azure):
            api_version = api_version or env.get("OPENAI_API_VERSION")
            if not api_version:
                raise ConfigError(
                    "Azure OpenAI deployment URLs need an API version: pass "
                    "api_version='2024-10-21' (or the one your resource supports) or set "
                    "OPENAI_API_VERSION; or use the v1 API, azure_endpoint='https://NAME"
                    ".openai.azure.com/openai/v1', which needs none"
                )
        return dataclasses.replace(
            self,
            provider="openai",
            azure_endpoint=azure,
            api_key=api_key or None,
            api_version=api_version,
        )

    def _native(self, provider: Provider, root: str, api_key: str | None) -> ChatConfig:
        if self.azure_endpoint:
            raise ConfigError(f"azure_endpoint is OpenAI's; provider={provider!r} takes base_url")
        return dataclasses.replace(
            self, provider=provider, base_url=root.rstrip("/"), api_key=api_key or None
        )

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
        """The chat-completions URL: ``url("/chat/completions")``."""
        return self.url("/chat/completions")

    @property
    def use_proxy_env(self) -> bool:
        """Follow HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as the openai SDK does, except on
        loopback: a local server is never reached through a proxy."""
        return not is_loopback(urlsplit(self._root()[0]).hostname)

    def url(self, path: str) -> str:
        """The full URL of an API path (``"/chat/completions"``, ``"/embeddings"``).

        The base URL (or the Azure deployment's), the path, then the query: the base URL's
        own, ``api-version`` when set, and ``query``.
        """
        root, params = self._root()
        if self.api_version:
            params["api-version"] = self.api_version
        params.update(self.query)
        return root + path + (f"?{urlencode(params)}" if params else "")

    def key_url(self, path: str) -> str:
        """The URL as cache keys see it: `url` without the query, which may hold secrets."""
        return self._root()[0] + path

    def _root(self) -> tuple[str, dict[str, str]]:
        """The URL the API's paths hang from, and the query it came with."""
        if self.azure_endpoint:
            root = self.azure_endpoint.rstrip("/")
            if not _is_azure_url_complete(root):
                root += f"/openai/deployments/{quote(self.model or '', safe='')}"
        else:
            root = (self.base_url or DEFAULT_BASE_URL).rstrip("/")
        parts = urlsplit(root)
        if not parts.query:
            return root, {}
        bare = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        return bare, dict(parse_qsl(parts.query))

    def request_headers(self) -> dict[str, str]:
        """The headers every request carries: JSON, the key, then the user's ``headers``."""
        headers = {"Content-Type": "application/json"}
        if self.provider == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if self.api_key:
                headers["x-api-key"] = self.api_key
        elif self.provider == "gemini":
            if self.api_key:
                headers["x-goog-api-key"] = self.api_key
        elif self.api_key:
            if self.azure_endpoint:
                headers["api-key"] = self.api_key
            else:
                headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.headers)
        return headers


def _provider_from(config: ChatConfig, env: Mapping[str, str]) -> Provider:
    """The provider a config without one speaks (see `ChatConfig`)."""
    openai_names = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT")
    if config.base_url or config.api_key or config.azure_endpoint:
        return "openai"
    if any(env.get(name) for name in openai_names):
        return "openai"
    anthropic = bool(env.get("ANTHROPIC_API_KEY") or env.get("ANTHROPIC_BASE_URL"))
    gemini = bool(env.get("GOOGLE_API_KEY") or env.get("GEMINI_API_KEY"))
    if anthropic and not gemini:
        return "anthropic"
    if gemini and not anthropic:
        return "gemini"
    return "openai"


def is_loopback(host: str | None) -> bool:
    """True for a host on this machine: ``localhost``, 127.0.0.0/8, ``::1``, or ``0.0.0.0``
    (which clients connect to as this machine). The one test of "local" in the package: the
    proxy bypass and the response cache's port-free scope both ask it."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def masked_url(url: str) -> str:
    """``url`` with each query value but ``api-version`` shown as ``***``: a key some gateways
    take in the query must not reach a repr, a message or a log."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (name, value if name in _PLAIN_QUERY else "***")
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def _is_azure_url_complete(endpoint: str) -> bool:
    """An Azure endpoint in the v1 form (``/openai/v1``) or naming its deployment already."""
    path = urlsplit(endpoint).path.rstrip("/")
    return path.endswith("/openai/v1") or "/openai/deployments/" in path


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
        **changes: any `ChatConfig` field (``provider``, ``base_url``, ``api_key``, ``model``,
            ``headers``, ``query``, ``azure_endpoint``, ``api_version``, ``max_parallel``,
            ``timeouts``, ``retry``, ``progress``, ``params``).

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
