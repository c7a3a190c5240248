"""Prompt tokens counted locally: tiktoken where its encoding is on disk, else the estimator.

tiktoken (the optional extra ``nbtoolkit[tokens]``) downloads its BPE files on first use;
with no network that download would hang or fail, so it is used only when the model's
encoding is already in tiktoken's cache directory (``$TIKTOKEN_CACHE_DIR``, or where a
previous online run left it). Otherwise the engine's own estimator (four bytes of the
request body a token, framing included) counts, and the estimate says which.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtoolkit.core._rows import estimate_tokens
from nbtoolkit.core.endpoints._base import Item

# OpenAI's chat framing: each message costs a few tokens beyond its content, and every
# reply is primed with a few more (the counting recipe of OpenAI's cookbook).
_PER_MESSAGE = 3
_PER_REPLY = 3
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
ESTIMATOR = "estimator (4 bytes of the request body a token)"


@dataclass(frozen=True)
class TokenCounter:
    """Counts one row's prompt tokens; ``method`` says how, for the estimate to show."""

    method: str
    exact: bool  # a real tokenizer for the model (else the estimator)
    encode: Callable[[str], int] | None = None

    def count(self, item: Item) -> float:
        """The prompt tokens of one row's request."""
        if self.encode is None:
            return item.prompt_tokens
        body = item.body
        messages = body.get("messages")
        if isinstance(messages, list):
            total = float(_PER_REPLY)
            for message in messages:
                total += _PER_MESSAGE + self._text_tokens(message)
            for name in ("response_format", "tools"):
                if name in body:
                    total += self.text(_json(body[name]))
            return total
        text = body.get("input") if isinstance(body, Mapping) else None
        if isinstance(text, str):
            return self.text(text)
        return item.prompt_tokens

    def text(self, text: str) -> float:
        """Tokens of a piece of text (the estimator: four UTF-8 bytes a token)."""
        if self.encode is None:
            return estimate_tokens(text.encode("utf-8", "replace"))
        return float(self.encode(text))

    def _text_tokens(self, message: Any) -> float:
        if not isinstance(message, Mapping):
            return self.text(_json(message))
        total = 0.0
        for value in message.values():
            total += self.text(value if isinstance(value, str) else _json(value))
        return total


@functools.cache
def token_counter(model: str) -> TokenCounter:
    """The best counter available offline for ``model``."""
    try:
        import tiktoken  # optional: nbtoolkit[tokens]
    except ImportError:
        return TokenCounter(f"{ESTIMATOR}; tiktoken is not installed", exact=False)
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return TokenCounter(f"{ESTIMATOR}; tiktoken has no encoding for {model!r}", exact=False)
    if not _on_disk(name):
        return TokenCounter(
            f"{ESTIMATOR}; tiktoken's {name} is not on this machine (it downloads it once "
            "online; or set TIKTOKEN_CACHE_DIR)",
            exact=False,
        )
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # a damaged cache file: tiktoken would try the network
        return TokenCounter(f"{ESTIMATOR}; tiktoken's {name} did not load: {exc}", exact=False)

    def encode(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return TokenCounter(f"tiktoken {name}", exact=True, encode=encode)


def _on_disk(name: str) -> bool:
    """Whether tiktoken's cache holds ``name``, so that it loads without the network."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not folder:
        return False
    key = hashlib.sha1(_BLOB.format(name=name).encode()).hexdigest()
    return (Path(folder) / key).is_file()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
