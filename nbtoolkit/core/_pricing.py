"""What tokens cost: a shipped, dated price table per provider and model, or the caller's own.

The table (``prices.json`` beside this module) holds USD per million tokens for input,
cached input (prompt tokens the provider served from its own prompt cache) and output, for
the common OpenAI, Azure OpenAI, Anthropic, Gemini, Groq and Mistral models, with the date
the prices were read. Batch APIs bill at ``batch_discount`` of every figure. Anthropic bills a
prompt-cache write (``cache_creation_input_tokens``) at 1.25 x the input price
(`ANTHROPIC_CACHE_WRITE`); `config_price` sets that rate for an Anthropic run.

A model with no price is "price unknown", never $0: `resolve_price` returns None and every
figure built on it says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from nbtoolkit.config import ChatConfig
from nbtoolkit.errors import ConfigError

PRICE_UNKNOWN = "price unknown"
# Anthropic's price of writing the 5-minute prompt cache (the kind nbtoolkit asks for), as a
# share of the input price (docs.anthropic.com, prompt caching pricing).
ANTHROPIC_CACHE_WRITE = 1.25

# A dated snapshot name (gpt-4o-mini-2024-07-18, claude-haiku-4-5-20251001) bills as its family.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
# Hosts by provider: the table is keyed by provider, since one model name may cost
# differently behind different APIs (gpt-oss on Groq, an Azure deployment).
_HOSTS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    (".openai.azure.com", "azure"),
    (".cognitiveservices.azure.com", "azure"),
    (".services.ai.azure.com", "azure"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "gemini"),
    ("api.groq.com", "groq"),
    ("api.mistral.ai", "mistral"),
)


@dataclass(frozen=True, slots=True)
class Price:
    """USD (or the caller's currency) per million tokens for one model.

    Args:
        input: per million prompt tokens.
        output: per million completion tokens (reasoning tokens are billed as output).
        cached_input: per million prompt tokens served from the provider's prompt cache;
            None: the same as ``input``.
        cache_write_input: per million prompt tokens written to the provider's prompt cache
            (Anthropic's ``cache_creation_input_tokens``); None: the same as ``input``.
        batch_discount: the share of every price a Batch API job pays.
        source: where the price comes from, as the estimate and the summary show it.
    """

    input: float
    output: float
    cached_input: float | None = None
    batch_discount: float = 0.5
    source: str = "prices="
    cache_write_input: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input", "cache_write_input"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ConfigError(f"a price's {name} must be a number >= 0, got {value!r}")

    def cost(
        self,
        prompt: float,
        completion: float,
        cached: float = 0.0,
        *,
        written: float = 0.0,
        batch: bool = False,
    ) -> float:
        """What these tokens cost; ``cached`` is the part of ``prompt`` served from cache,
        ``written`` the part written to it."""
        cached = min(max(cached, 0.0), prompt)
        written = min(max(written, 0.0), prompt - cached)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        total = (
            (prompt - cached - written) * self.input
            + cached * cached_rate
            + written * self._write_rate
            + completion * self.output
        ) / 1e6
        return total * self.batch_discount if batch else total

    def worst_cost(self, prompt: float, completion: float, *, batch: bool = False) -> float:
        """The most these tokens may cost: every prompt token at the dearer of the input and
        the cache-write price (a budget's reservation, which must hold whatever is written)."""
        written = prompt if self._write_rate > self.input else 0.0
        return self.cost(prompt, completion, written=written, batch=batch)

    def scaled(self, share: float) -> Price:
        """This price with every rate times ``share`` (a Batch API's discount)."""

        def times(rate: float | None) -> float | None:
            return None if rate is None else rate * share

        return dataclasses.replace(
            self,
            input=self.input * share,
            output=self.output * share,
            cached_input=times(self.cached_input),
            cache_write_input=times(self.cache_write_input),
        )

    @property
    def _write_rate(self) -> float:
        return self.input if self.cache_write_input is None else self.cache_write_input


@dataclass(frozen=True, slots=True)
class PriceTable:
    """The shipped table: provider -> model -> (input, cached input, output), and its date."""

    read: str
    batch_discount: float
    models: Mapping[str, Mapping[str, tuple[float, float, float]]]

    def find(self, provider: str | None, model: str) -> Price | None:
        """The price of ``model`` behind ``provider``, or None when the table has none."""
        if provider is None:
            return None
        by_model = self.models.get(provider, {})
        for name in _candidates(model):
            found = by_model.get(name)
            if found is not None:
                return Price(
                    found[0],
                    found[2],
                    found[1],
                    batch_discount=self.batch_discount,
                    source=f"{provider} price table read {self.read}",
                )
        return None


@functools.cache
def price_table() -> PriceTable:
    """The shipped price table (read once)."""
    raw = json.loads(resources.files("nbtoolkit.core").joinpath("prices.json").read_text("utf-8"))
    models = {
        provider: {name: (float(v[0]), float(v[1]), float(v[2])) for name, v in table.items()}
        for provider, table in raw["models"].items()
    }
    return PriceTable(read=raw["read"], batch_discount=float(raw["batch_discount"]), models=models)


def provider_of(base_url: str | None, azure_endpoint: str | None = None) -> str | None:
    """The provider whose prices apply to requests sent to this URL; None when unknown
    (a local server, a gateway): its prices are only what ``prices=`` says."""
    if azure_endpoint:
        return "azure"
    host = (urlsplit(base_url or "").hostname or "").lower()
    for suffix, provider in _HOSTS:
        if host == suffix.lstrip(".") or host.endswith(suffix):
            return provider
    return None


def resolve_price(
    model: str, *, provider: str | None, prices: Mapping[str, Any] | None
) -> Price | None:
    """The price for ``model``: the caller's ``prices=`` first, then the shipped table.

    Raises:
        ConfigError: a ``prices=`` entry that is not ``(input, output)``,
            ``(input, cached_input, output)`` or a `Price`.
    """
    given = (prices or {}).get(model)
    if given is not None:
        return as_price(model, given)
    return price_table().find(provider, model)


def as_price(model: str, value: Any) -> Price:
    """One ``prices=`` entry as a `Price`.

    Raises:
        ConfigError: a value of the wrong shape.
    """
    if isinstance(value, Price):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (2, 3):
        numbers = [float(v) for v in value]
        if len(numbers) == 2:
            return Price(numbers[0], numbers[1])
        return Price(numbers[0], numbers[2], numbers[1])
    raise ConfigError(
        f"prices[{model!r}] must be (input, output) or (input, cached_input, output) per "
        f"million tokens, or a nbtoolkit.Price; got {value!r}"
    )


def format_money(amount: float | None) -> str:
    """``$0.42``, with more digits for small amounts; "price unknown" for None."""
    if amount is None:
        return PRICE_UNKNOWN
    if amount == 0:
        return "$0"
    if abs(amount) < 0.01:
        return f"${amount:.4f}"
    if abs(amount) < 100:
        return f"${amount:.2f}"
    return f"${amount:,.0f}"


def _candidates(model: str) -> list[str]:
    """The names a model may be listed under: as given, without a dated snapshot suffix,
    without a ``models/`` prefix (Gemini's own form)."""
    name = model.strip().lower().removeprefix("models/")
    names = [name]
    stripped = _SNAPSHOT.sub("", name)
    if stripped != name:
        names.append(stripped)
    return names


def config_price(config: ChatConfig) -> Price | None:
    """The price of a (resolved) config's model behind its server, or None; on Anthropic,
    with its cache-write rate unless the `Price` given says one."""
    provider = provider_of(config.base_url, config.azure_endpoint)
    price = resolve_price(config.model or "", provider=provider, prices=config.prices)
    if price is not None and config.provider == "anthropic" and price.cache_write_input is None:
        price = dataclasses.replace(price, cache_write_input=price.input * ANTHROPIC_CACHE_WRITE)
    return price
