"""An OpenAI-compatible chat-completions server for tests, with scripted misbehaviour.

It is a real aiohttp server on 127.0.0.1 (the OS picks the port), so the code under test
goes through its whole HTTP stack. It answers ``POST {base_url}/chat/completions`` and
``GET {base_url}/models`` (and ``POST {base_url}/embeddings``, see `EmbeddingBehaviour`),
records what it saw, and can be told to fail::

    from nbtoolkit.testing import ChatServer, Reset, Status

    async def test_retries_a_429() -> None:
        async with ChatServer(latency=0.01) as server:
            server.script(Status(429, retry_after=0.1), Reset(), prompt="hi")
            ...  # call server.base_url; "hi" gets a 429, then a dropped connection, then a reply
            assert server.answered["hi"] == 1
            assert server.peak_in_flight <= 4

    def test_sync_entry_point() -> None:
        with ChatServer().run_in_thread() as server:  # its own thread and event loop
            ...

A request takes the first queued action for its prompt (the content of the last user
message), else the first action queued for any prompt, else ``Reply()``, unless `FaultRates`
picks a fault for it. Fault picks hash (seed, prompt, attempt number), so the Nth attempt at a
prompt meets the same fate whatever order concurrent requests arrive in.

With a `RateLimit`, a request first draws from OpenAI-style token buckets as it arrives; one
that finds them short gets a 429 and takes no action and no attempt number, so faults stay
reproducible however the limiter interleaves.

The machinery (scripts, faults, limits, counters, records) is `ScriptedServer`'s, shared with
`AnthropicServer` and `GeminiServer`; this module is only OpenAI's wire format.
"""

from __future__ import annotations

import hmac
import http
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from nbtoolkit.testing import _embeddings, _structured
from nbtoolkit.testing._actions import FaultRates, Reply, Status
from nbtoolkit.testing._batch import BatchAPI, BatchBehaviour
from nbtoolkit.testing._embeddings import EmbeddingBehaviour
from nbtoolkit.testing._lengths import CompletionLengths, SizedAnswers
from nbtoolkit.testing._ratelimit import RateLimit, Rejection, duration, seconds_header
from nbtoolkit.testing._scripted import Exchange, ScriptedServer, text_of, tokens
from nbtoolkit.testing._semantic import SemanticRules
from nbtoolkit.testing._structured import StructuredFaults

__all__ = ["ChatServer"]

Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]

# The completion tokens a request without max_tokens is charged for.
_DEFAULT_MAX_TOKENS = 16
_INVALID = "invalid_request_error"


def last_user_text(messages: Any) -> str:
    """The content of the last message with role "user", or "" when there is none."""
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return text_of(message.get("content"))
    return ""


def echo(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The default responder: ``"echo: <the last user message>"``."""
    return "echo: " + last_user_text(messages)


def _error(code: int, message: str, *, type_: str, err_code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": err_code}}
    return web.json_response(body, status=code)


class ChatServer(ScriptedServer):
    """An OpenAI-compatible ``/chat/completions`` server on 127.0.0.1 for tests.

    Args:
        latency: Seconds every successful reply waits before it is sent.
        api_key: When set, any other ``Authorization: Bearer`` value gets a 401.
        responder: Builds the reply text from (messages, request body); the default echoes
            the last user message as ``"echo: <text>"``.
        faults: Random but reproducible faults for requests without a scripted action.
        record: False keeps no per-request list (for big benchmarks); counters still work.
        model_names: When given, other models get a 404 ``model_not_found``.
        rate_limit: Request (and token) buckets, and the rate headers to describe them;
            see `RateLimit`.
        azure: Speak Azure OpenAI's conventions instead of OpenAI's: the key comes in an
            ``api-key`` header (401 otherwise), and requests go to
            ``/openai/deployments/{deployment}/chat/completions?api-version=...`` (a 404
            without ``api-version``; the deployment is the model) or to the v1 form
            ``/openai/v1/chat/completions`` (which also takes ``Authorization: Bearer``).
            `azure_endpoint` is the resource URL to give the client.
        embeddings: how ``/v1/embeddings`` answers; see `EmbeddingBehaviour`.
        batch: how the Batch API (``/files``, ``/batches``) behaves; see `BatchBehaviour`.
            Its files, batches and counters are on ``server.batch``.
        structured: how answers to a JSON Schema go wrong; see `StructuredFaults`. A
            request with a schema always gets a valid instance (`schema_instance`) otherwise.
        lengths: answers whose length varies by row (seeded, long-tailed), with reasoning
            tokens and a prompt cache reported in ``usage``; see `CompletionLengths`.

    Counters (`request_count`, `in_flight`, `peak_in_flight`, `answered`, `statuses`) are
    only written by the server's loop, so reading them from another thread is safe.
    `statuses` counts the `RecordedRequest.outcome` of each finished request.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        responder: Responder | None = None,
        faults: FaultRates | None = None,
        record: bool = True,
        model_names: Iterable[str] | None = None,
        rate_limit: RateLimit | None = None,
        azure: bool = False,
        embeddings: EmbeddingBehaviour | None = None,
        batch: BatchBehaviour | None = None,
        structured: StructuredFaults | None = None,
        lengths: CompletionLengths | None = None,
        semantic: SemanticRules | None = None,
    ) -> None:
        super().__init__(
            latency=latency,
            api_key=api_key,
            faults=faults,
            record=record,
            rate_limit=rate_limit,
        )
        self._sized = None if lengths is None else SizedAnswers(lengths)
        self.azure = azure
        self.embeddings = embeddings or EmbeddingBehaviour()
        self._responder = responder or echo
        self._structured = structured
        self._semantic = semantic
        self._models = None if model_names is None else tuple(model_names)
        self._ids = itertools.count(1)
        self.batch = BatchAPI(
            batch or BatchBehaviour(),
            responder=self._responder,
            completion=lambda model, messages, text: (
                self._completion(model, messages, text).text or ""
            ),
            authorized=self._authorized,
            auth_error=self._auth_error,
        )

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the OpenAI ``base_url`` to give the client.

        In `azure` mode, the v1 form: ``http://127.0.0.1:PORT/openai/v1``.
        """
        if self.azure:
            return f"{self.azure_endpoint}/openai/v1"
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the resource URL, as in ``$AZURE_OPENAI_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def _routes(self, app: web.Application) -> None:
        if self.azure:
            app.router.add_post("/openai/v1/chat/completions", self._chat)
            app.router.add_post("/openai/v1/embeddings", self._embed)
            app.router.add_get("/openai/v1/models", self._list_models)
            app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
            app.router.add_post("/openai/deployments/{deployment}/embeddings", self._embed)
        else:
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/v1/embeddings", self._embed)
            app.router.add_get("/v1/models", self._list_models)
        self.batch.add_routes(app)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "embeddings")

    def _prompt(self, body: dict[str, Any], kind: str) -> str:
        if kind == "embeddings":
            return _embeddings.first_input(body)
        return last_user_text(body.get("messages"))

    def _precheck(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        deployment = request.match_info.get("deployment")
        if deployment is not None and not request.query.get("api-version"):
            # What Azure answers a deployment URL without its api-version.
            msg = "Resource not found: deployment URLs need an api-version query parameter"
            return _error(404, msg, type_=_INVALID, err_code="404")
        if body is None:
            return None
        model = deployment or body.get("model", "test-model")
        if self._models is not None and model not in self._models:
            msg = f"The model `{model}` does not exist"
            return _error(404, msg, type_=_INVALID, err_code="model_not_found")
        return None

    def _bad_body(self) -> web.Response:
        msg = "We could not parse the JSON body of your request."
        return _error(400, msg, type_=_INVALID, err_code=None)

    def _refuse(self, body: dict[str, Any], kind: str) -> web.Response | None:
        refused = _structured.rejection(body, self._structured)
        if refused is None:
            return None
        return _error(refused.status, refused.message, type_=refused.type, err_code=None)

    def _token_cost(self, body: dict[str, Any], kind: str) -> float:
        if kind == "embeddings":  # its inputs, and no completion
            return float(_embeddings.input_tokens(body))
        messages = body.get("messages")
        prompt = (
            sum(tokens(text_of(m.get("content"))) for m in messages if isinstance(m, dict))
            if isinstance(messages, list)
            else 0
        )
        completion = body.get("max_completion_tokens", body.get("max_tokens"))
        if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
            completion = _DEFAULT_MAX_TOKENS
        return float(prompt + completion)

    def _rate_limited(self, rejection: Rejection) -> web.Response:
        kind, what, wait = rejection
        message = f"Rate limit reached for {what}. Please try again in {duration(wait)}."
        response = _error(429, message, type_=kind, err_code="rate_limit_exceeded")
        if self.rate_limit is not None and self.rate_limit.retry_after:
            response.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000 - 1e-6)))
            response.headers["Retry-After"] = str(max(1, math.ceil(wait - 1e-6)))
        return response

    def _answer(
        self, request: web.Request, ex: Exchange, body: dict[str, Any], action: Reply
    ) -> web.Response:
        if ex.kind == "embeddings":
            response, ex.inputs = _embeddings.answer(self.embeddings, body, _plain_error)
            return response
        model = request.match_info.get("deployment") or body.get("model", "test-model")
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        if self._semantic is not None and action.text is None:
            too_long = self._semantic.too_long(messages)
            if too_long is not None:
                return _error(400, too_long, type_=_INVALID, err_code="context_length_exceeded")
            text, logprobs = self._semantic.answer(model, messages, body)
            return self._completion(model, messages, text, logprobs=logprobs)
        shaped = _structured.answer(body, self._structured) if action.text is None else None
        if shaped is not None:
            return self._completion(model, messages, shaped.text, *shaped[1:])
        if self._sized is not None and action.text is None:
            return self._sized_completion(model, messages, body, ex.prompt)
        text = action.text if action.text is not None else self._responder(messages, body)
        return self._completion(model, messages, text)

    def _sized_completion(
        self, model: Any, messages: list[dict[str, Any]], body: dict[str, Any], prompt: str
    ) -> web.Response:
        """A reply of the length `CompletionLengths` draws for this prompt, usage and all."""
        assert self._sized is not None
        counts = [tokens(text_of(m.get("content"))) for m in messages if isinstance(m, dict)]
        prefix = json.dumps(messages[:-1], sort_keys=True).encode()
        text, finish, usage = self._sized.reply(
            prompt=prompt,
            prompt_tokens=sum(counts),
            prefix_tokens=sum(counts[:-1]),
            prefix=prefix,
            body=body,
        )
        return self._completion(model, messages, text, finish, usage=usage)

    def _authorized(self, request: web.Request) -> bool:
        if self._api_key is None:
            return True
        bearer = f"Bearer {self._api_key}".encode()
        given = request.headers.get("Authorization", "").encode()
        if self.azure:
            key = request.headers.get("api-key", "").encode()
            if hmac.compare_digest(key, self._api_key.encode()):
                return True
            # Azure's v1 API also takes the key as a bearer token, as the openai SDK sends it.
            return request.path.startswith("/openai/v1/") and hmac.compare_digest(given, bearer)
        return hmac.compare_digest(given, bearer)

    def _auth_error(self, request: web.Request | None = None) -> web.Response:
        # Never echo the key the client sent: tests check that it cannot leak through errors.
        if self.azure:
            msg = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            )
            return _error(401, msg, type_=_INVALID, err_code="401")
        msg = "Incorrect API key provided."
        return _error(401, msg, type_=_INVALID, err_code="invalid_api_key")

    def _status_response(self, action: Status) -> web.Response:
        if action.error_type is not None:
            type_ = action.error_type
        elif action.code == 429:
            type_ = "requests"
        else:
            type_ = "server_error" if action.code >= 500 else _INVALID
        message = action.message or status_phrase(action.code)
        response = _error(action.code, message, type_=type_, err_code=action.error_code)
        response.headers.update(action.headers)
        if action.retry_after is not None:
            response.headers["Retry-After"] = seconds_header(action.retry_after)
        if action.retry_after_ms is not None:
            response.headers["retry-after-ms"] = str(action.retry_after_ms)
        return response

    def _completion(
        self,
        model: Any,
        messages: list[dict[str, Any]],
        text: str | None,
        finish_reason: str = "stop",
        refusal: str | None = None,
        *,
        usage: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> web.Response:
        prompt_tokens = sum(
            tokens(text_of(m.get("content"))) for m in messages if isinstance(m, dict)
        )
        completion_tokens = tokens(text or refusal or "")
        message = {"role": "assistant", "content": text}
        if refusal is not None:
            message["refusal"] = refusal
        usage = usage or {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        body = {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        return web.json_response(body)

    async def _list_models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._auth_error(request)
        names = self._models or ("test-model",)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "nbtoolkit"} for n in names]
        return web.json_response({"object": "list", "data": data})


def _plain_error(code: int, message: str) -> web.Response:
    return _error(code, message, type_=_INVALID, err_code=None)


def status_phrase(code: int) -> str:
    """The standard reason phrase of an HTTP status, or ``Error 529`` for one without."""
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return f"Error {code}"
