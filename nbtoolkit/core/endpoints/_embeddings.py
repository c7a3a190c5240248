"""``/embeddings``: many texts per request, one float32 vector per text, cached per text.

The engine does the rest (grouping, dedupe, retries, the governor, halving a group on a
400 to find the bad input, interrupt safety); this module knows only the wire format::

    item(index, text)  -> Item     cache key material: canonical JSON of (model, dimensions, text)
    payload(items)     -> bytes    {"model", "input": [texts], "dimensions"?, "encoding_format"}
    parse(reply)       -> Parsed   answers mapped back by each datum's ``index`` (any order)
    decode(blob)       -> vector   the cache keeps raw float32 bytes, 4 bytes per dimension

A server that answers one vector per *token* (llama.cpp's Python server with a model that
has no pooling type: a ``[tokens, d]`` list per input) gets its vectors mean-pooled into one
per text: the average of the token vectors, the pooling sentence-embedding models mostly use.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring as _json_string  # the C one, if built
from typing import Any

import numpy as np
import numpy.typing as npt

from nbtoolkit.core._rows import MESSAGE_FRAMING_TOKENS, estimate_tokens
from nbtoolkit.core.endpoints._base import Answer, Item, Outcome, Parsed, plain_json
from nbtoolkit.core.store._cache import encode_body
from nbtoolkit.errors import APIError, ConfigError, IgnoredParameter, MalformedResponse

__all__ = ["EmbeddingEndpoint"]

# OpenAI's limits per request: 2,048 inputs and 300,000 tokens (all inputs together).
MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
DEFAULT_OUTPUT = "embedding"

Vector = npt.NDArray[np.float32]


class EmbeddingEndpoint:
    """``/embeddings``: up to ``batch_size`` texts per request, one vector per text.

    Args:
        model: the embedding model.
        dimensions: ask the server for vectors this long (models that can shorten them,
            such as text-embedding-3-*); None sends no ``dimensions``.
        batch_size: texts per request, at most.
        max_batch_tokens: estimated tokens per request, at most (a text longer than that
            goes alone, and the server says whether it fits).
        params: other body fields sent with every request (``user``, ``input_type``);
            part of the key material, since a field may change the vectors.
    """

    path = "/embeddings"
    binary_answers = True  # the cache keeps float32 bytes

    def __init__(
        self,
        *,
        model: str,
        dimensions: int | None = None,
        batch_size: int = MAX_INPUTS,
        max_batch_tokens: float = MAX_REQUEST_TOKENS,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        check_options(
            dimensions=dimensions, batch_size=batch_size, max_batch_tokens=max_batch_tokens
        )
        self.model = model
        self.dimensions = dimensions
        self.params = plain_json(dict(params or {}), what="request parameters")
        for name in ("model", "input", "dimensions"):
            if name in self.params:
                raise ConfigError(f"{name} is set by embed itself; drop it from the body fields")
        self.max_items = batch_size
        self.max_request_tokens = float(max_batch_tokens)
        # The key material is (model, dimensions, text): the same text asked of the same
        # model at the same length is one vector, in this run (dedupe) and the next (cache).
        # Its canonical JSON is {"dimensions":...,"input":<text>,"model":...}: the text's
        # JSON string between a fixed head and tail (encode_body's bytes, a third the CPU).
        empty = encode_body({**self.params, "dimensions": dimensions, "input": "", "model": model})
        head, _, tail = empty.partition(b'"input":""')  # once: the model's quotes are escaped
        self._key_head, self._key_tail = head + b'"input":', tail

    def item(self, index: int, request: str) -> Item:
        # The text's estimate plus a message's framing, as if sent in a chat message (the
        # estimate of the whole body would count the model name for every text); no
        # completion tokens.
        if type(request) is str:
            payload = self._key_head + _json_string(request).encode() + self._key_tail
            tokens = estimate_tokens(request) + MESSAGE_FRAMING_TOKENS
            return Item(index, {"input": request}, payload, tokens, 0.0)
        # Not text (only a direct caller of the engine sends that): encoded as it is.
        body = {**self.params, "dimensions": self.dimensions, "input": request, "model": self.model}
        payload = encode_body(body)
        return Item(index, {"input": request}, payload, MESSAGE_FRAMING_TOKENS, 0.0)

    def payload(self, items: Sequence[Item]) -> bytes:
        body: dict[str, Any] = {
            "encoding_format": "float",
            **self.params,
            "model": self.model,
            "input": [item.body["input"] for item in items],
        }
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        return encode_body(body)

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        try:
            reply = json.loads(text)
            data = reply["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedResponse(f"reply is not an embedding list: {text[:200]!r}") from exc
        if len(data) != len(items):
            raise MalformedResponse(f"{len(items)} texts sent, {len(data)} vectors received")
        positions = _positions(data, len(items))
        if len(set(positions)) != len(positions):
            twice = next(p for p in positions if positions.count(p) > 1)
            raise MalformedResponse(f"two vectors have index {twice}")
        vectors: list[Vector | None] = [None] * len(items)
        for position, received in zip(positions, _vectors(data), strict=True):
            if self.dimensions is not None and received.shape[0] != self.dimensions:
                # Cached under dimensions=N, a vector of another length would be wrong for
                # good; and every row would get the same: the run stops (IgnoredParameter).
                raise IgnoredParameter(
                    f"asked for {self.dimensions} dimensions, the server sent vectors of "
                    f"{received.shape[0]}: it ignored dimensions="
                )
            vectors[position] = received
        outcomes: list[Outcome] = []
        for vector in vectors:
            assert vector is not None  # as many distinct indexes in range as there are items
            outcomes.append(Answer(vector.tobytes(), vector))
        usage = reply.get("usage")
        # The reply's usage is the whole request's: counted once, against tpm and budgets.
        return Parsed(outcomes, usage if isinstance(usage, Mapping) else None)

    def on_error_reply(self, error: APIError, items: Sequence[Item]) -> APIError | None:
        return error  # one shape only; a 400 for one input is found by the engine's halving

    def decode(self, stored: str | bytes) -> Vector:
        if isinstance(stored, str):  # not written by this endpoint; never a vector
            raise MalformedResponse("a cached embedding is text, not float32 bytes")
        # A copy, so a vector from the cache is writable like one fresh from the server.
        return np.frombuffer(stored, dtype=np.float32).copy()


def _positions(data: list[Any], count: int) -> list[int]:
    """Which text each datum answers: its ``index``. A reply none of whose data has an
    ``index`` (a server that leaves it out) is taken in input order, the order the API
    specifies; one that has some but not all is malformed.
    """
    if all(isinstance(datum, dict) and "index" not in datum for datum in data):
        return list(range(count))
    positions: list[int] = []
    for datum in data:
        position = datum.get("index") if isinstance(datum, dict) else None
        if not isinstance(position, int) or not 0 <= position < count:
            raise MalformedResponse(f"a vector has no valid index: {str(datum)[:200]}")
        positions.append(position)
    return positions


def _vectors(data: list[dict[str, Any]]) -> Sequence[Vector]:
    """The data's vectors, in the data's order.

    The usual reply (every embedding a list of as many floats) is converted in one numpy
    call and checked for NaN in one pass; each row's vector is then a row of that matrix
    (a view: one allocation for the batch, not one per text). Anything else (base64,
    per-token vectors, a bad value) goes datum by datum through `as_vector`.
    """
    matrix: Vector | None
    try:
        matrix = np.array([datum.get("embedding") for datum in data], dtype=np.float32)
    except (ValueError, TypeError):
        matrix = None
    if matrix is not None and matrix.ndim == 2 and matrix.shape[1] > 0:
        # A float64 sum of float32s cannot overflow: it is finite iff every value is.
        if not math.isfinite(matrix.sum(dtype=np.float64)):
            raise MalformedResponse("an embedding holds NaN or infinity")
        return list(matrix)
    return [as_vector(datum.get("embedding")) for datum in data]


def as_vector(embedding: object) -> Vector:
    """One text's vector from a datum's ``embedding``: floats, per-token floats, or base64.

    Raises:
        MalformedResponse: not a non-empty list of finite numbers (or of equal-length lists).
    """
    try:
        if isinstance(embedding, str):  # encoding_format "base64", sent by some servers anyway
            vector = np.frombuffer(base64.b64decode(embedding, validate=True), dtype=np.float32)
        else:
            vector = np.asarray(embedding, dtype=np.float32)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise MalformedResponse(f"an embedding is not a list of numbers: {exc}") from exc
    if vector.ndim == 2 and vector.shape[0] > 0:
        # One vector per token: their mean is the text's vector.
        vector = vector.mean(axis=0, dtype=np.float64).astype(np.float32)
    if vector.ndim != 1 or vector.size == 0:
        raise MalformedResponse(f"an embedding has shape {vector.shape}, not (dimensions,)")
    if not np.isfinite(vector).all():
        raise MalformedResponse("an embedding holds NaN or infinity")
    return vector


def check_options(*, dimensions: int | None, batch_size: int, max_batch_tokens: float) -> None:
    """Refuse option values that cannot make a request, before anything is sent.

    Raises:
        ConfigError: a non-positive or non-integer ``dimensions`` or ``batch_size``, or a
            ``max_batch_tokens`` that is not a positive number.
    """
    for name, value in (("dimensions", dimensions), ("batch_size", batch_size)):
        if value is None and name == "dimensions":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    if (
        not isinstance(max_batch_tokens, int | float)
        or isinstance(max_batch_tokens, bool)
        or not max_batch_tokens > 0
        or math.isnan(max_batch_tokens)
    ):
        raise ConfigError(f"max_batch_tokens must be a number > 0, got {max_batch_tokens!r}")
