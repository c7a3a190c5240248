"""``provider=`` per call: every accessor method that sends to a provider takes it, the
request goes to that provider's endpoint in its format, and nothing of the process-wide
provider (its key, URL, headers, model) goes with it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit import ConfigError
from nbtoolkit.frame._options import METHOD_OPTIONS
from nbtoolkit.testing import AnthropicServer, ChatServer, GeminiServer
from tests.test_options import NO_COLUMN_FIRST, REQUIRED

OPENAI_KEY = "sk-openai-SENTINEL-3e9a07"
ANTHROPIC_KEY = "sk-ant-SENTINEL-per-call-51b2"
GEMINI_KEY = "gm-SENTINEL-per-call-c04d"
GATEWAY_HEADER = "gateway-secret-SENTINEL-77aa"
CLAUDE = "claude-sonnet-4-5"
GEMINI = "gemini-2.5-flash"
FRAME = pd.DataFrame({"value": ["a", "b"]})


@pytest.fixture
def openai_default() -> Iterator[ChatServer]:
    """An OpenAI-compatible server set process-wide, with its key, a header and a model."""
    with ChatServer().run_in_thread() as server:
        nbtoolkit.configure(
            base_url=server.base_url,
            api_key=OPENAI_KEY,
            headers={"X-Gateway": GATEWAY_HEADER},
            model="gpt-4o-mini",
            progress=False,
            cache=False,
        )
        yield server


def seen_secrets(server: AnthropicServer | GeminiServer) -> str:
    """Every header and body the server saw, as one string."""
    return repr([(dict(r.headers), r.body) for r in server.requests])


def test_complete_with_provider_anthropic_reaches_the_messages_api(
    openai_default: ChatServer,
) -> None:
    """complete(provider="anthropic") posts /v1/messages with the call's key; the configured
    OpenAI server gets nothing and its key and header go nowhere."""
    with AnthropicServer(api_key=ANTHROPIC_KEY).run_in_thread() as server:
        out = FRAME.chat.complete(
            "value", provider="anthropic", model=CLAUDE, base_url=server.base_url,
            api_key=ANTHROPIC_KEY,
        )  # fmt: skip
    assert list(out["response"]) == ["echo: a", "echo: b"]
    assert [r.path for r in server.requests] == ["/v1/messages", "/v1/messages"]
    assert server.requests[0].headers["x-api-key"] == ANTHROPIC_KEY
    assert server.requests[0].body["model"] == CLAUDE
    assert OPENAI_KEY not in seen_secrets(server) and GATEWAY_HEADER not in seen_secrets(server)
    assert openai_default.request_count == 0


def test_provider_switch_takes_key_and_root_from_that_providers_environment(
    openai_default: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """provider="gemini" with no base_url or key uses GOOGLE_API_KEY and its base URL, never
    the configured OpenAI key, URL or headers."""
    with GeminiServer(api_key=GEMINI_KEY).run_in_thread() as server:
        monkeypatch.setenv("GOOGLE_API_KEY", GEMINI_KEY)
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.base_url)
        out = FRAME.chat.complete("value", provider="gemini", model=GEMINI)
    assert list(out["response"]) == ["echo: a", "echo: b"]
    assert server.requests[0].path.endswith(f"/models/{GEMINI}:generateContent")
    assert server.requests[0].headers["x-goog-api-key"] == GEMINI_KEY
    assert OPENAI_KEY not in seen_secrets(server) and GATEWAY_HEADER not in seen_secrets(server)
    assert openai_default.request_count == 0


def test_provider_switch_does_not_send_the_configured_model(openai_default: ChatServer) -> None:
    """A GPT model configured process-wide is not sent to Anthropic: no model is a ConfigError
    before any request."""
    with (
        AnthropicServer(api_key=ANTHROPIC_KEY).run_in_thread() as server,
        pytest.raises(ConfigError, match="no model"),
    ):
        FRAME.chat.complete(
            "value", provider="anthropic", base_url=server.base_url, api_key=ANTHROPIC_KEY
        )
    assert server.requests == [] and openai_default.request_count == 0


def test_same_provider_per_call_keeps_the_configured_settings(
    openai_default: ChatServer,
) -> None:
    """provider="openai" when the config speaks OpenAI changes nothing: same server, key, model."""
    out = FRAME.chat.complete("value", provider="openai")
    assert list(out["response"]) == ["echo: a", "echo: b"]
    assert openai_default.requests[0].headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert openai_default.requests[0].body["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_extract_and_classify_take_provider_per_call(
    provider: str, openai_default: ChatServer
) -> None:
    """extract and classify with a per-call provider send that provider's structured request
    (a forced tool / a responseSchema) and fill typed columns."""
    server_type = AnthropicServer if provider == "anthropic" else GeminiServer
    key = ANTHROPIC_KEY if provider == "anthropic" else GEMINI_KEY
    model = CLAUDE if provider == "anthropic" else GEMINI
    with server_type(api_key=key).run_in_thread() as server:
        where = {"provider": provider, "base_url": server.base_url, "api_key": key, "model": model}
        typed = FRAME.chat.extract("value", schema={"stars": int}, **where)
        labelled = FRAME.chat.classify("value", labels=["pos", "neg"], **where)
    assert str(typed["stars"].dtype) == "Int64" and typed["stars"].notna().all()
    assert list(labelled["label"].cat.categories) == ["pos", "neg"]
    assert labelled["label"].notna().all()
    bodies = [r.body for r in server.requests]
    if provider == "anthropic":
        assert {b["tool_choice"]["type"] for b in bodies} == {"tool"}
    else:
        assert all("responseSchema" in b["generationConfig"] for b in bodies)
    assert openai_default.request_count == 0


def test_embed_with_provider_gemini_and_anthropic(openai_default: ChatServer) -> None:
    """embed(provider="gemini") posts batchEmbedContents; embed(provider="anthropic") is a
    ConfigError naming the providers that embed, before any request."""
    with GeminiServer(api_key=GEMINI_KEY).run_in_thread() as server:
        out = FRAME.chat.embed(
            "value", provider="gemini", model="gemini-embedding-001", base_url=server.base_url,
            api_key=GEMINI_KEY,
        )  # fmt: skip
    assert len(out["embedding"][0]) > 0
    assert server.requests[0].path.endswith(":batchEmbedContents")
    with (
        AnthropicServer(api_key=ANTHROPIC_KEY).run_in_thread() as claude,
        pytest.raises(ConfigError, match=r"provider='openai'.*provider='gemini'"),
    ):
        FRAME.chat.embed(
            "value", provider="anthropic", model="m", base_url=claude.base_url,
            api_key=ANTHROPIC_KEY,
        )  # fmt: skip
    assert claude.requests == [] and openai_default.request_count == 0


def test_submit_batch_with_provider_anthropic_is_a_message_batch(
    openai_default: ChatServer, tmp_path: Any
) -> None:
    """submit_batch(provider="anthropic") creates a Message Batch and maps its results."""
    with AnthropicServer(api_key=ANTHROPIC_KEY).run_in_thread() as server:
        job = FRAME.chat.submit_batch(
            "value", provider="anthropic", model=CLAUDE, base_url=server.base_url,
            api_key=ANTHROPIC_KEY, cache=str(tmp_path / "c.sqlite3"),
            batch=nbtoolkit.BatchOptions(poll_initial=0.05, poll_max=0.2),
        )  # fmt: skip
        job.wait(progress=False)
        out = job.result()
        lines_run = dict(server.batch.lines_run)
    assert list(out["response"]) == ["echo: a", "echo: b"]
    assert server.batch.creates == 1 and lines_run == {"a": 1, "b": 1}
    assert server.request_count == 0  # no row went to /v1/messages one by one
    assert openai_default.request_count == 0


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_semantic_operators_take_provider_per_call(
    provider: str, openai_default: ChatServer
) -> None:
    """filter, top_k and aggregate with a per-call provider all post to its endpoint."""
    server_type = AnthropicServer if provider == "anthropic" else GeminiServer
    key = ANTHROPIC_KEY if provider == "anthropic" else GEMINI_KEY
    model = CLAUDE if provider == "anthropic" else GEMINI
    with server_type(api_key=key).run_in_thread() as server:
        where = {"provider": provider, "base_url": server.base_url, "api_key": key, "model": model}
        FRAME.chat.filter("Is {value} a letter?", **where)
        FRAME.chat.top_k(1, "How good is {value}?", **where)
        FRAME.chat.aggregate("Sum up {value}", **where)
    paths = {r.path for r in server.requests}
    expected = (
        "/v1/messages" if provider == "anthropic" else f"/v1beta/models/{model}:generateContent"
    )
    assert paths == {expected}
    assert len(server.requests) >= 5  # 2 questions, 2 scores, at least 1 summary
    assert openai_default.request_count == 0


def test_join_with_provider_gemini_embeds_and_asks_gemini(openai_default: ChatServer) -> None:
    """join(provider="gemini") embeds both sides and asks about pairs on Gemini only."""
    right = pd.DataFrame({"value": ["c"]})
    with GeminiServer(api_key=GEMINI_KEY).run_in_thread() as server:
        FRAME.chat.join(
            right, "{left.value} {right.value}", provider="gemini", model=GEMINI,
            embed_model="gemini-embedding-001", base_url=server.base_url, api_key=GEMINI_KEY,
        )  # fmt: skip
    paths = [r.path for r in server.requests]
    assert any(p.endswith(":batchEmbedContents") for p in paths)
    assert any(p.endswith(":generateContent") for p in paths)
    assert openai_default.request_count == 0


def test_dask_passes_provider_to_every_partition(openai_default: ChatServer) -> None:
    """ddf.chat.complete(provider="anthropic") sends every partition's rows to /v1/messages."""
    frame = pd.DataFrame({"value": [f"q{i}" for i in range(8)]})
    with AnthropicServer(api_key=ANTHROPIC_KEY).run_in_thread() as server:
        lazy = dd.from_pandas(frame, npartitions=2, sort=True).chat.complete(
            "value", provider="anthropic", model=CLAUDE, base_url=server.base_url,
            api_key=ANTHROPIC_KEY,
        )  # fmt: skip
        out = lazy.compute(scheduler="threads")
    assert list(out["response"]) == [f"echo: q{i}" for i in range(8)]
    assert {r.path for r in server.requests} == {"/v1/messages"}
    assert openai_default.request_count == 0


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_a_bad_provider_name_is_a_config_error_before_any_request(
    method: str, openai_default: ChatServer
) -> None:
    """provider="claude" is a ConfigError naming the valid providers; nothing is sent."""
    args = () if method in NO_COLUMN_FIRST else ("value",)
    call = getattr(FRAME.chat, method)
    with pytest.raises(ConfigError, match=r"one of \['openai', 'anthropic', 'gemini'\]"):
        call(*args, provider="claude", **REQUIRED[method])
    assert openai_default.request_count == 0
