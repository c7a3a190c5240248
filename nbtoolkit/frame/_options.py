"""Which keyword options each accessor method takes, named once, and the check of the rest.

Every method's keywords are its own options (the table `METHOD_OPTIONS`) plus request-body
fields for the provider (``**params``: temperature, seed, ...). A keyword that is another
method's option (``complete(dimensions=256)``) or a setting only `nbtoolkit.configure` takes
(``adaptive=False``) would otherwise go out as a body field of every request, and a strict
provider answers each row with a 400: so it is a `ConfigError` naming what takes it, raised
before anything is sent. A body field that happens to share an option's name goes in
``extra_body={...}``, which is merged into the body.

The run options (where requests go, pacing, cache, budgets) are `RunOptions`; `settings`
lays one call's run options over the process-wide config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from nbtoolkit.config import ChatConfig, Provider, RetryPolicy, Timeouts, get_config, merge
from nbtoolkit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """One call's run options; None everywhere means "as the config says"."""

    model: str | None = None
    max_parallel: int | None = None
    progress: bool | None = None
    provider: Provider | None = None
    base_url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    headers: Mapping[str, str] | None = dataclasses.field(default=None, repr=False)
    query: Mapping[str, str] | None = dataclasses.field(default=None, repr=False)
    azure_endpoint: str | None = None
    api_version: str | None = None
    timeout: float | Timeouts | None = None
    retry: int | RetryPolicy | None = None
    rpm: float | None = None
    tpm: float | None = None
    cache: bool | str | os.PathLike[str] | None = None
    dedupe: bool | None = None
    prices: Mapping[str, Any] | None = None
    max_cost: float | None = None
    max_tokens_total: int | None = None
    config: ChatConfig | None = None

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> RunOptions:
        """The run options among a method's arguments: ``RunOptions.of(locals())`` as the
        method's first statement.

        Each method takes its run options as keywords of these names (tests/test_options.py
        checks every signature against `METHOD_OPTIONS`), so they are picked by name here,
        not listed again in a dozen methods. A batch method has fewer of them; the rest keep
        their defaults.
        """
        return cls(**{name: arguments[name] for name in RUN_OPTIONS if name in arguments})

    def settings(self, params: Mapping[str, Any], *, method: str) -> ChatConfig:
        """These options and ``params`` (checked) on top of ``config`` or the process-wide one.

        Args:
            params: the call's request-body keywords (``**params``).
            method: the accessor method called ("complete", "embed", ...), for messages.

        Returns:
            The run's config; ``params`` land in its ``params``, ``extra_body`` merged in.

        Raises:
            ConfigError: a bad value, or a keyword in ``params`` that is not a body field
                (see `body_fields`).
        """
        body = body_fields(params, method=method)
        base = self.config or get_config()
        if self.provider is not None:
            base = base.for_provider(self.provider)
        changes: dict[str, Any] = {
            name: getattr(self, name) for name in _CONFIG_FIELDS_OF_RUN_OPTIONS
        }
        if isinstance(self.timeout, Timeouts):
            changes["timeouts"] = self.timeout
        elif self.timeout is not None:
            changes["timeout_total"] = float(self.timeout)
        if isinstance(self.retry, RetryPolicy):
            changes["retry"] = self.retry
        elif self.retry is not None:
            changes["retry_attempts"] = int(self.retry)
        if body:
            changes["params"] = {**base.params, **body}
        return merge(base, **changes)


# The run options, in the order of the methods' signatures.
RUN_OPTIONS: Final = tuple(f.name for f in dataclasses.fields(RunOptions))
# Run options that are ChatConfig fields of the same name (not timeout, retry, config).
_CONFIG_FIELDS_OF_RUN_OPTIONS = tuple(
    n for n in RUN_OPTIONS if n not in {"timeout", "retry", "config"}
)
# A batch job runs at the provider's pace, sent once: no client-side pacing, and identical
# rows are always sent once.
BATCH_RUN_OPTIONS: Final = tuple(
    n for n in RUN_OPTIONS if n not in {"max_parallel", "rpm", "tpm", "dedupe"}
)

# Every method can say what it would cost instead of running (see nbtoolkit.CostEstimate).
ESTIMATE: Final = ("dry_run", "pilot")

# Each method's keywords, besides **params. The methods' signatures are these, in this
# order (tests/test_options.py checks it); the async twin (``acomplete``) takes the same.
METHOD_OPTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "complete": ("column", "template", "system", "output", *RUN_OPTIONS, "batch", *ESTIMATE),
    "extract": (
        "column",
        "schema",
        "template",
        "system",
        "prefix",
        "validation_retries",
        "structured",
        *RUN_OPTIONS,
        *ESTIMATE,
    ),
    "classify": (
        "column",
        "labels",
        "multi_label",
        "output",
        "template",
        "system",
        "validation_retries",
        "structured",
        *RUN_OPTIONS,
        *ESTIMATE,
    ),
    "embed": (
        "column",
        "model",
        "dimensions",
        "output",
        "template",
        "batch_size",
        "max_batch_tokens",
        *(n for n in RUN_OPTIONS if n != "model"),
        *ESTIMATE,
    ),
    "submit_batch": (
        "column",
        "template",
        "system",
        "output",
        *BATCH_RUN_OPTIONS,
        "batch",
        *ESTIMATE,
    ),
    # The semantic operators (frame/semantic).
    "filter": (
        "template",
        "column",
        "system",
        "keep",
        "cheap_model",
        "sample",
        "agreement",
        "sample_seed",
        *RUN_OPTIONS,
        "dry_run",
    ),
    "top_k": ("k", "template", "column", "system", "output", *RUN_OPTIONS, "dry_run"),
    "aggregate": (
        "template",
        "column",
        "by",
        "system",
        "context_tokens",
        "output",
        *RUN_OPTIONS,
        "dry_run",
    ),
    "join": (
        "right",
        "template",
        "embed_model",
        "candidates",
        "max_pairs",
        "left_on",
        "right_on",
        "suffixes",
        "system",
        "cheap_model",
        "sample",
        "agreement",
        "sample_seed",
        *RUN_OPTIONS,
        "dry_run",
    ),
}
# Settings a call cannot change, only `nbtoolkit.configure` or a `ChatConfig`: ChatConfig
# fields no method takes, and merge()'s flat retry_* / timeout_* forms.
CONFIGURE_ONLY: Final = frozenset(
    {f.name for f in dataclasses.fields(ChatConfig)}
    - {name for names in METHOD_OPTIONS.values() for name in names}
    | {f"retry_{f.name}" for f in dataclasses.fields(RetryPolicy)}
    | {f"timeout_{f.name}" for f in dataclasses.fields(Timeouts)}
)
_ALL_OPTIONS = frozenset(name for names in METHOD_OPTIONS.values() for name in names)
_NESTED = ("retry_", "timeout")  # RetryPolicy / Timeouts, given flat or whole

# Request-body fields of the OpenAI API and common servers: passed through, never flagged
# as a misspelt option (``top_p`` is close to ``tpm``).
KNOWN_BODY_FIELDS: Final = frozenset(
    {
        "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens",
        "seed", "stop", "n", "presence_penalty", "frequency_penalty", "repeat_penalty",
        "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
        "user", "reasoning_effort", "metadata", "store", "service_tier", "modalities",
        "parallel_tool_calls", "prediction", "verbosity", "grammar", "typical_p",
        "mirostat", "num_ctx", "encoding_format", "input_type",
    }
)  # fmt: skip


def takers(option: str) -> list[str]:
    """The methods that take ``option``, in table order."""
    return [method for method, names in METHOD_OPTIONS.items() if option in names]


def body_fields(params: Mapping[str, Any], *, method: str) -> dict[str, Any]:
    """A call's ``**params`` as request-body fields, ``extra_body`` merged in.

    Args:
        params: the keywords the method did not take as its own options.
        method: the method called, for messages.

    Returns:
        The body fields, ``extra_body``'s last (so they may replace the others).

    Raises:
        ConfigError: ``stream=True``; another method's option or a configure-only setting
            (naming what takes it); a keyword close to an option's name (a misspelling);
            an ``extra_body`` that is not a mapping of names.
    """
    fields: dict[str, Any] = {}
    for name, value in params.items():
        if name == "extra_body":
            continue
        check_body_field(name, value, method=method)
        fields[name] = value
    extra = params.get("extra_body")
    if extra is not None:
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise ConfigError(
                f"extra_body must map body field names to values, got {type(extra).__name__}"
            )
        fields.update(extra)
    return fields


def check_body_field(name: str, value: Any, *, method: str) -> None:
    """Refuse a ``**params`` keyword that is surely not meant for the request body."""
    if name == "stream" and value:
        raise ConfigError(
            "stream=True is not supported: nbtoolkit reads whole answers, one per row"
        )
    if name in KNOWN_BODY_FIELDS:
        return
    owners = takers(name)
    if owners:
        where = ", ".join(f"{owner}()" for owner in owners)
        raise ConfigError(
            f"{method}() does not take {name}=: it is an option of {where}. (A request-body "
            f"field of that name goes in extra_body={{{name!r}: ...}}.)"
        )
    if name in CONFIGURE_ONLY:
        raise ConfigError(
            f"{name}= is not an option of {method}(): set it with nbtoolkit.configure("
            f"{name}=...) or pass config=ChatConfig(...)"
            + ("; per call, use retry= or timeout=" if name.startswith(_NESTED) else "")
        )
    close = difflib.get_close_matches(name, METHOD_OPTIONS[method], n=1, cutoff=0.75)
    close = close or difflib.get_close_matches(name, sorted(_ALL_OPTIONS), n=1, cutoff=0.75)
    if close:
        owner = (
            "" if close[0] in METHOD_OPTIONS[method] else f", an option of {takers(close[0])[0]}()"
        )
        raise ConfigError(
            f"unknown option {name!r} of {method}(): did you mean {close[0]!r}{owner}? "
            f"(Other keywords go into the request body; a real body field named like that "
            f"goes in extra_body={{{name!r}: ...}}.)"
        )
