"""The test server's ``POST /v1/embeddings``: deterministic vectors, shuffled order, bad inputs.

`ChatServer` routes embedding requests here (and `GeminiServer` reuses the vectors and the
refusals for ``batchEmbedContents``). They meet the same machinery as chat: the API key,
the model list, the `RateLimit` buckets, scripted actions and `FaultRates`, keyed by the
request's *first* input (a batch is sent again as it was, so its Nth attempt meets the
same fate whatever the order). `ChatServer.answered` counts each input of a good reply.

What only embeddings do is set by `EmbeddingBehaviour`: how long vectors are, whether the
data comes back shuffled, which inputs get a 400 for their whole request (as OpenAI does
for a text over the model's context), and per-token vectors like llama.cpp's server.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

__all__ = ["EmbeddingBehaviour", "expected_vector"]

# Builds the server's error reply from (status, message): each server injects its own format.
ErrorReply = Callable[[int, str], web.Response]
_KEY_TAG = re.compile(r"\[key=[^\]]+\]")


@dataclass(frozen=True, kw_only=True)
class EmbeddingBehaviour:
    """How the test server answers ``/v1/embeddings``.

    Args:
        dimensions: vector length when the request names none.
        shuffle: send the data in a shuffled (seeded) order; clients must use ``index``.
        reject_marker: an input containing it makes its whole request a 400 that names it.
        max_input_chars: an input longer than this makes its whole request a 400.
        max_inputs: a request with more inputs than this is a 413 (Hugging Face's
            text-embeddings-inference refuses batches over its ``max_client_batch_size``
            so; other providers cap them at 10, 25 or 64 with a 400).
        ignore_dimensions: answer vectors of ``dimensions`` whatever the request asks (a
            model that cannot shorten them, served by a server that does not say so).
        per_token: answer a ``[tokens, dimensions]`` list per input (three token vectors
            around the text's vector), like llama.cpp's server with an unpooled model.
        topic: texts that hold the same ``[key=...]`` tag (or, given a regex, the same match
            of it) get vectors near one another
            (the tag's vector plus a small one of the text's own), so a text's nearest
            neighbours are its true matches (the semantic join's tests).
        seed: varies the vectors and the shuffles.
    """

    dimensions: int = 8
    shuffle: bool = True
    reject_marker: str | None = "<reject>"
    max_input_chars: int | None = None
    max_inputs: int | None = None
    ignore_dimensions: bool = False
    per_token: bool = False
    topic: bool | str = False
    seed: int = 0


def draw(text: str, dimensions: int, seed: int) -> npt.NDArray[np.float64]:
    """The text's vector as sent: six decimals (short JSON, like a real server's), from a hash.

    A hash stretched to the length (shake_128), not a seeded generator: a hundred times
    cheaper, so a benchmark's server keeps up with its clients.
    """
    raw = hashlib.shake_128(f"{seed}\0{text}".encode()).digest(2 * dimensions)
    return np.round(np.frombuffer(raw, dtype="<i2") / 16384.0, 6)


def _topic_vector(
    text: str, dimensions: int, seed: int, topic: bool | str
) -> npt.NDArray[np.float64]:
    pattern = _KEY_TAG if topic is True else re.compile(topic) if topic else None
    key = pattern.search(text) if pattern is not None else None
    if key is None:
        return draw(text, dimensions, seed)
    return np.round(draw(key.group(0), dimensions, seed) + 0.15 * draw(text, dimensions, seed), 6)


def expected_vector(text: str, dimensions: int = 8, *, seed: int = 0) -> npt.NDArray[np.float32]:
    """The vector the test server gives ``text``, as a float32 array (values in [-2, 2))."""
    return draw(text, dimensions, seed).astype(np.float32)


def rejection(inputs: list[str], behaviour: EmbeddingBehaviour) -> str | None:
    """Why the request is refused (the first bad input), or None."""
    for position, text in enumerate(inputs):
        if behaviour.reject_marker and behaviour.reject_marker in text:
            return f"input[{position}] is invalid: it contains {behaviour.reject_marker!r}"
        if behaviour.max_input_chars is not None and len(text) > behaviour.max_input_chars:
            return (
                f"input[{position}] is too long: {len(text)} characters, "
                f"the maximum is {behaviour.max_input_chars}"
            )
    return None


def _inputs(body: dict[str, Any]) -> list[str] | None:
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(text, str) for text in raw):
        return raw
    return None


def first_input(body: dict[str, Any]) -> str:
    """The text a request's scripted action and faults are keyed by."""
    inputs = _inputs(body)
    return inputs[0] if inputs else ""


def input_tokens(body: dict[str, Any]) -> int:
    """The tokens a request's inputs count for (about four characters a token)."""
    return sum(len(text) // 4 + 1 for text in _inputs(body) or ())


def answer(
    behaviour: EmbeddingBehaviour, body: dict[str, Any], error: ErrorReply
) -> tuple[web.Response, list[str] | None]:
    """The reply to an embeddings request the server already authorised, admitted and
    delayed, and the texts it answers (None for an error)."""
    inputs = _inputs(body)
    if inputs is None:
        return error(400, "'input' must be a string or a non-empty list of strings"), None
    if behaviour.max_inputs is not None and len(inputs) > behaviour.max_inputs:
        message = f"batch size {len(inputs)} > maximum allowed batch size {behaviour.max_inputs}"
        return error(413, message), None
    reason = rejection(inputs, behaviour)
    if reason is not None:
        return error(400, reason), None
    dimensions = body.get("dimensions", behaviour.dimensions)
    if behaviour.ignore_dimensions:
        dimensions = behaviour.dimensions
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        return error(400, f"dimensions must be a positive integer, got {dimensions!r}"), None
    data = []
    for position, text in enumerate(inputs):
        vector = _topic_vector(text, dimensions, behaviour.seed, behaviour.topic)
        embedding: Any = vector.tolist()
        if behaviour.per_token:
            embedding = [(vector - 0.25).tolist(), embedding, (vector + 0.25).tolist()]
        data.append({"object": "embedding", "index": position, "embedding": embedding})
    if behaviour.shuffle:
        random.Random(f"{behaviour.seed}\0{inputs[0]}\0{len(inputs)}").shuffle(data)
    tokens = input_tokens(body)
    reply = {
        "object": "list",
        "data": data,
        "model": body.get("model", "test-model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return web.Response(text=json.dumps(reply), content_type="application/json"), inputs
