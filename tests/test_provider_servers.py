"""The Anthropic and Gemini test servers speak their provider's format: the official SDKs,
as clients of our servers, read every reply (answers, errors, usage, headers) as they would
read the real API's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import numpy as np
import pydantic
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from nbtoolkit.testing import (
    AnthropicServer,
    GeminiServer,
    RateLimit,
    Reset,
    Status,
    StructuredFaults,
    expected_vector,
    schema_instance,
)

# google-genai subclasses aiohttp's ClientSession, which aiohttp warns about: not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)

ANTHROPIC_KEY = "sk-ant-test-SENTINEL-4c1d"
GEMINI_KEY = "gm-test-SENTINEL-77aa0e"
CLAUDE = "claude-sonnet-4-5"
GEMINI = "gemini-2.5-flash"


# The SDK clients the running test opened, closed by `_close_clients` on the test's loop.
_OPENED: list[anthropic.AsyncAnthropic | genai.Client] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Close every SDK client a test opened while its loop still runs."""
    yield
    while _OPENED:
        client = _OPENED.pop()
        if isinstance(client, anthropic.AsyncAnthropic):
            await client.close()
        else:
            await client.aio.aclose()


def claude(server: AnthropicServer, key: str = ANTHROPIC_KEY) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(api_key=key, base_url=server.base_url, max_retries=0)
    _OPENED.append(client)
    return client


def gemini(server: GeminiServer, key: str = GEMINI_KEY) -> genai.Client:
    options = genai_types.HttpOptions(base_url=server.base_url)
    client = genai.Client(api_key=key, http_options=options)
    _OPENED.append(client)
    return client


class Ticket(pydantic.BaseModel):
    topic: str
    urgency: int


async def test_anthropic_sdk_reads_a_message() -> None:
    """The anthropic SDK reads our reply: text block, end_turn, usage; we saw its headers."""
    async with AnthropicServer(api_key=ANTHROPIC_KEY) as server:
        message = await claude(server).messages.create(
            model=CLAUDE,
            max_tokens=50,
            system="Be brief.",
            messages=[{"role": "user", "content": "hi"}],
        )
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hi"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    seen = server.requests[0]
    assert seen.path == "/v1/messages"
    # Newer SDKs send the key as a bearer token; the API (and our server) take both forms.
    assert ANTHROPIC_KEY in (
        seen.headers.get("x-api-key"),
        seen.headers.get("Authorization", "")[7:],
    )
    assert seen.headers["anthropic-version"]
    assert seen.body["system"] == "Be brief."


async def test_anthropic_sdk_sees_each_error_as_its_own_type() -> None:
    """529 is the SDK's OverloadedError, 429 its RateLimitError (retry-after kept), a bad key
    its AuthenticationError, and the key is in no error body."""
    async with AnthropicServer(api_key=ANTHROPIC_KEY) as server:
        server.script(Status(529), Status(429, retry_after=3), prompt="x")
        client = claude(server)
        ask = {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            await client.messages.create(**ask)  # type: ignore[call-overload]
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(**ask)  # type: ignore[call-overload]
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await claude(server, key="sk-ant-wrong-key-0000").messages.create(**ask)  # type: ignore[call-overload]
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert limited.value.response.headers["retry-after"] == "3"
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "wrong-key" not in str(refused.value)
    assert [r.outcome for r in server.requests] == ["529", "429", "401"]


async def test_anthropic_sdk_gets_a_forced_tool_call_with_the_schema() -> None:
    """A forced tool's input is an instance of its input_schema; a refusal is a stop_reason."""
    schema = Ticket.model_json_schema()
    faults = StructuredFaults(refuse=frozenset({"no"}))
    async with AnthropicServer(structured=faults) as server:
        client = claude(server)
        tool = {"name": "answer", "description": "the fields", "input_schema": schema}
        reply = await client.messages.create(
            model=CLAUDE,
            max_tokens=100,
            tools=[tool],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "answer"},
            messages=[{"role": "user", "content": "printer on fire"}],
        )
        refused = await client.messages.create(
            model=CLAUDE, max_tokens=100, messages=[{"role": "user", "content": "no"}]
        )
    block = reply.content[0]
    assert reply.stop_reason == "tool_use" and block.type == "tool_use"
    assert Ticket.model_validate(block.input) == Ticket.model_validate(
        schema_instance(schema, "printer on fire")
    )
    assert refused.stop_reason == "refusal" and refused.content == []


async def test_anthropic_sdk_reads_prompt_cache_usage() -> None:
    """A long system block with cache_control is written once, then read by later requests."""
    long_system = "Rules. " * 1200  # about 2,100 tokens
    async with AnthropicServer() as server:
        client = claude(server)
        usages = []
        for text in ("a", "b", "c"):
            reply = await client.messages.create(
                model=CLAUDE,
                max_tokens=10,
                system=[
                    {"type": "text", "text": long_system, "cache_control": {"type": "ephemeral"}}
                ],
                messages=[{"role": "user", "content": text}],
            )
            usages.append(reply.usage)
    assert usages[0].cache_creation_input_tokens > 2000
    assert usages[0].cache_read_input_tokens == 0
    assert [u.cache_read_input_tokens for u in usages[1:]] == [
        usages[0].cache_creation_input_tokens
    ] * 2
    assert all(u.input_tokens < 10 for u in usages)


async def test_anthropic_rate_headers_reach_the_sdk() -> None:
    """With the anthropic family, replies carry anthropic-ratelimit-* and a 429 retry-after."""
    limit = RateLimit(1, 1, headers="anthropic")
    async with AnthropicServer(rate_limit=limit) as server:
        client = claude(server)
        ask = {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        raw = await client.messages.with_raw_response.create(**ask)  # type: ignore[call-overload]
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(**ask)  # type: ignore[call-overload]
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "60"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_gemini_sdk_reads_generate_content() -> None:
    """google-genai reads our reply: text, usage; we saw x-goog-api-key and systemInstruction."""
    async with GeminiServer(api_key=GEMINI_KEY, thoughts_tokens=7) as server:
        reply = await gemini(server).aio.models.generate_content(
            model=GEMINI,
            contents="hi",
            config=genai_types.GenerateContentConfig(
                system_instruction="Be brief.", max_output_tokens=20, temperature=0.0
            ),
        )
    assert reply.text == "echo: hi"
    assert reply.candidates is not None
    assert reply.candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert reply.usage_metadata is not None
    assert reply.usage_metadata.thoughts_token_count == 7
    seen = server.requests[0]
    assert seen.path.endswith(f"/models/{GEMINI}:generateContent")  # the SDK's /v1 or /v1beta
    assert seen.headers["x-goog-api-key"] == GEMINI_KEY
    assert seen.body["systemInstruction"]["parts"][0]["text"] == "Be brief."
    assert seen.body["generationConfig"]["maxOutputTokens"] == 20


async def test_gemini_sdk_parses_a_json_answer_to_a_schema() -> None:
    """response_schema from a pydantic model: the SDK's .parsed is an instance of it."""
    async with GeminiServer() as server:
        reply = await gemini(server).aio.models.generate_content(
            model=GEMINI,
            contents="printer on fire",
            config=genai_types.GenerateContentConfig(
                response_mime_type="application/json", response_schema=Ticket
            ),
        )
    assert isinstance(reply.parsed, Ticket)
    assert reply.parsed.topic == "topic: printer on fire"


async def test_gemini_sdk_sees_quota_and_key_errors_in_googles_shape() -> None:
    """A 429 is RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo in the body; a wrong key is
    a 400 whose details say API_KEY_INVALID (and do not hold the key)."""
    async with GeminiServer(api_key=GEMINI_KEY) as server:
        server.script(Status(429, retry_after=2.5), prompt="x")
        with pytest.raises(genai_errors.ClientError) as limited:
            await gemini(server).aio.models.generate_content(model=GEMINI, contents="x")
        with pytest.raises(genai_errors.ClientError) as refused:
            await gemini(server, key="gm-wrong-key-123456").aio.models.generate_content(
                model=GEMINI, contents="x"
            )
    assert limited.value.code == 429 and limited.value.status == "RESOURCE_EXHAUSTED"
    details = limited.value.details["error"]["details"]
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"} in details
    assert "PerMinute" in details[0]["violations"][0]["quotaId"]
    assert "retry-after" not in {name.lower() for name in limited.value.response.headers}  # type: ignore[union-attr]
    assert refused.value.code == 400
    assert refused.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert "wrong-key" not in json.dumps(refused.value.details)


async def test_gemini_sdk_embeds_in_order_at_the_asked_length() -> None:
    """embed_content goes to batchEmbedContents; vectors come back in order, shortened."""
    texts = ["alpha", "beta", "gamma"]
    async with GeminiServer() as server:
        reply = await gemini(server).aio.models.embed_content(
            model="gemini-embedding-001",
            contents=texts,
            config=genai_types.EmbedContentConfig(output_dimensionality=16),
        )
    assert reply.embeddings is not None
    for text, embedding in zip(texts, reply.embeddings, strict=True):
        np.testing.assert_allclose(embedding.values or [], expected_vector(text, 16), atol=1e-6)
    assert server.requests[0].path.endswith("/models/gemini-embedding-001:batchEmbedContents")
    assert server.answered == {"alpha": 1, "beta": 1, "gamma": 1}


async def test_gemini_sdk_reads_blocked_and_cut_answers() -> None:
    """A blocked prompt has promptFeedback and no candidate; SAFETY and MAX_TOKENS end others."""
    faults = StructuredFaults(refuse=frozenset({"unsafe"}), truncate=frozenset({"long"}))
    async with GeminiServer(blocked={"blocked"}, structured=faults) as server:
        client = gemini(server).aio.models
        blocked = await client.generate_content(model=GEMINI, contents="blocked")
        unsafe = await client.generate_content(model=GEMINI, contents="unsafe")
        cut = await client.generate_content(model=GEMINI, contents="long")
    assert blocked.prompt_feedback is not None
    assert blocked.prompt_feedback.block_reason == genai_types.BlockedReason.SAFETY
    assert not blocked.candidates
    assert unsafe.candidates and unsafe.candidates[0].finish_reason == "SAFETY"
    assert cut.candidates and cut.candidates[0].finish_reason == "MAX_TOKENS"


async def test_gemini_refuses_schema_keywords_it_does_not_know() -> None:
    """A responseSchema with additionalProperties is a 400 naming it, as Gemini answers."""
    schema = {
        "type": "OBJECT",
        "properties": {"a": {"type": "STRING"}},
        "additionalProperties": False,
    }
    body = {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {"responseMimeType": "application/json", "responseSchema": schema},
    }
    async with GeminiServer() as server, aiohttp.ClientSession() as session:
        url = f"{server.base_url}/v1beta/models/{GEMINI}:generateContent"
        async with session.post(url, json=body) as reply:
            status, error = reply.status, (await reply.json())["error"]
    assert status == 400
    assert 'Unknown name "additionalProperties"' in error["message"]


async def test_both_servers_take_the_shared_scripted_faults() -> None:
    """A reset and a 503 reach each provider's server the same way as ChatServer's."""
    async with AnthropicServer() as claude_server, GeminiServer() as gemini_server:
        claude_server.script(Reset(), prompt="x")
        gemini_server.script(Status(503), prompt="x")
        with pytest.raises(anthropic.APIConnectionError):
            await claude(claude_server).messages.create(
                model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(genai_errors.ServerError) as unavailable:
            await gemini(gemini_server).aio.models.generate_content(model=GEMINI, contents="x")
    assert claude_server.statuses["reset"] == 1
    assert unavailable.value.status == "UNAVAILABLE"
