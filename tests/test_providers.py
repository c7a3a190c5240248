"""Each provider, pointed at as docs_providers.md says, against the test server in its mode.

One test (or two) per row of the providers table: the claim in the table is what it asserts.
"""

from __future__ import annotations

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit import ChatConfig, ChatRequest, ChatRun, ConfigError
from nbtoolkit.testing import ChatServer, HeaderFamily, RateLimit, Status
from tests.conftest import FAST_RETRY, MODEL

AZURE_KEY = "azure-key-SENTINEL-5b7d01"
DEPLOYMENT = "my-gpt-4o-mini"
API_VERSION = "2024-10-21"


def rows(n: int) -> list[ChatRequest]:
    return [ChatRequest(({"role": "user", "content": f"p{i}"},)) for i in range(n)]


async def run_against(
    server: ChatServer, n: int = 60, **settings: object
) -> tuple[ChatRun, list[nbtoolkit.RowResult]]:
    options: dict[str, object] = {"base_url": server.base_url, "model": MODEL, "cache": False}
    options.update(settings)
    run = ChatRun(nbtoolkit.config.merge(ChatConfig(max_parallel=20), **options))
    return run, await run.execute(rows(n))


def azure_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", endpoint)
    monkeypatch.setenv("OPENAI_API_VERSION", API_VERSION)


def test_openai_from_its_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI: OPENAI_API_KEY (and OPENAI_BASE_URL) are read; the key goes as a bearer token."""
    df = pd.DataFrame({"review": ["a", "b"]})
    with ChatServer(api_key="sk-openai").run_in_thread() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
        out = df.chat.complete("review", model=MODEL, progress=False)
    assert list(out["response"]) == ["echo: a", "echo: b"]
    assert {r.headers["Authorization"] for r in server.requests} == {"Bearer sk-openai"}


async def test_openai_headers_are_read_per_minute() -> None:
    """OpenAI: x-ratelimit-* limits are per minute; the run learns the server's rate."""
    async with ChatServer(rate_limit=RateLimit(40, 20, tokens_per_minute=60_000)) as server:
        run, results = await run_against(server)
    assert all(r.ok for r in results)
    learned = run.governor.learned()
    assert learned["requests"]["rate_per_second"] == pytest.approx(40, rel=0.1)
    assert learned["requests"]["window_seconds"] == pytest.approx(60, rel=0.1)
    assert learned["tokens"]["limit"] == 60_000
    assert learned["requests"]["headers"] == "x-ratelimit"


def test_azure_from_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Azure: AZURE_OPENAI_API_KEY, AZURE_OPENAI_ENDPOINT and OPENAI_API_VERSION are enough."""
    df = pd.DataFrame({"review": ["a", "b", "c"]})
    with ChatServer(azure=True, api_key=AZURE_KEY, model_names=[DEPLOYMENT]).run_in_thread() as (
        server
    ):
        azure_environment(monkeypatch, server.azure_endpoint)
        out = df.chat.complete("review", model=DEPLOYMENT, progress=False)
    assert list(out["response"]) == ["echo: a", "echo: b", "echo: c"]
    for request in server.requests:
        assert request.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
        assert request.query == {"api-version": API_VERSION}
        assert request.headers["api-key"] == AZURE_KEY
        assert "Authorization" not in request.headers


async def test_azure_v1_form_needs_no_api_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Azure v1: an endpoint ending in /openai/v1 gets the model in the body, no api-version."""
    monkeypatch.setenv("OPENAI_API_VERSION", API_VERSION)  # not sent to the v1 API
    async with ChatServer(azure=True, api_key=AZURE_KEY) as server:
        v1 = f"{server.azure_endpoint}/openai/v1"
        _, results = await run_against(
            server, 3, base_url=None, azure_endpoint=v1, api_key=AZURE_KEY, model=DEPLOYMENT
        )
        # The openai SDK's way for v1: OpenAI(base_url=.../openai/v1, api_key=...), a bearer.
        _, as_sdk = await run_against(server, 3, base_url=v1, api_key=AZURE_KEY)
    assert all(r.ok for r in results + as_sdk)
    first, last = server.requests[0], server.requests[-1]
    assert (first.path, first.query, first.body["model"]) == (
        "/openai/v1/chat/completions",
        {},
        DEPLOYMENT,
    )
    assert first.headers["api-key"] == AZURE_KEY
    assert last.headers["Authorization"] == f"Bearer {AZURE_KEY}"


def test_azure_without_an_api_version_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Azure: a deployment URL with no API version is a ConfigError before anything is sent."""
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.openai.azure.com")
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_VERSION"):
        ChatConfig(model=DEPLOYMENT).resolved()


def test_a_base_url_wins_over_the_azure_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base_url given anywhere is used as is, even with AZURE_OPENAI_ENDPOINT set."""
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.openai.azure.com")
    config = ChatConfig(base_url="http://127.0.0.1:9/v1", api_key="k", model=MODEL).resolved()
    assert config.endpoint == "http://127.0.0.1:9/v1/chat/completions"
    assert config.request_headers()["Authorization"] == "Bearer k"


async def test_openrouter_attribution_headers_and_its_rate_headers() -> None:
    """OpenRouter: headers= sends HTTP-Referer and X-Title; X-RateLimit-* are read."""
    attribution = {"HTTP-Referer": "https://example.org/app", "X-Title": "My notebook"}
    limit = RateLimit(40, 20, headers="openrouter")
    async with ChatServer(api_key="sk-or-v1-x", rate_limit=limit) as server:
        run, results = await run_against(server, api_key="sk-or-v1-x", headers=attribution)
    assert all(r.ok for r in results)
    assert all(r.headers["X-Title"] == "My notebook" for r in server.requests)
    assert all(r.headers["HTTP-Referer"] == "https://example.org/app" for r in server.requests)
    learned = run.governor.learned()["requests"]
    assert learned["headers"] == "openrouter"
    assert learned["rate_per_second"] == pytest.approx(40, rel=0.1)


async def test_groq_requests_per_day() -> None:
    """Groq: x-ratelimit-limit-requests counts per day; it never reads as per minute."""
    limit = RateLimit(40, 20, tokens_per_minute=60_000, headers="groq")
    async with ChatServer(rate_limit=limit) as server:
        run, results = await run_against(server)
    assert all(r.ok for r in results)
    learned = run.governor.learned()
    assert learned["requests"]["window_seconds"] == pytest.approx(86400, rel=0.1)
    assert learned["tokens"]["window_seconds"] == pytest.approx(60, rel=0.1)


@pytest.mark.parametrize("family", ["ietf", "ietf-structured"])
async def test_ietf_ratelimit_fields(family: HeaderFamily) -> None:
    """IETF RateLimit / RateLimit-Policy (either draft): the stated window is used."""
    async with ChatServer(rate_limit=RateLimit(40, 20, headers=family, window=1)) as server:
        run, results = await run_against(server)
    assert all(r.ok for r in results)
    learned = run.governor.learned()["requests"]
    assert (learned["basis"], learned["window_seconds"]) == ("stated window", 1)


async def test_azure_remaining_counts_alone_teach_no_rate() -> None:
    """Azure's headers (remaining counts only) set no pace: 429s and their Retry-After do,
    and a rate the run learned says it came from the 429s, not from a header."""
    limit = RateLimit(40, 20, headers="azure")
    async with ChatServer(azure=True, rate_limit=limit) as server:
        run, results = await run_against(server, base_url=server.base_url, retry_attempts=30)
    assert all(r.ok for r in results)
    learned = run.governor.learned()
    assert set(learned) <= {"requests"}  # no token rate: remaining counts teach none
    for limit_learned in learned.values():
        assert limit_learned["headers"] == "none"
        assert str(limit_learned["basis"]).startswith("429s")
    assert server.statuses["429"] > 0  # what paced the run


@pytest.mark.parametrize(
    ("provider", "api_key", "params"),
    [
        ("vllm", "token-abc123", {"top_k": 20, "repetition_penalty": 1.05}),
        ("llama.cpp", None, {"cache_prompt": True}),
        ("ollama", None, {"top_k": 20}),
    ],
)
async def test_local_servers(provider: str, api_key: str | None, params: dict[str, object]) -> None:
    """vLLM, llama.cpp, Ollama: no key needed, no rate headers, their own parameters pass."""
    async with ChatServer(api_key=api_key) as server:
        run, results = await run_against(server, 20, api_key=api_key, params=params)
    assert all(r.ok for r in results), provider
    sent = server.requests[0]
    assert ("Authorization" in sent.headers) == (api_key is not None)
    assert {k: sent.body[k] for k in params} == params
    assert run.governor.learned() == {}  # nothing to learn, nothing held back


async def test_query_parameters_reach_every_request() -> None:
    """query= adds parameters to every request URL, after the base URL's own."""
    async with ChatServer() as server:
        _, results = await run_against(
            server, 3, base_url=server.base_url + "?tenant=t1", query={"key": "gateway-secret"}
        )
    assert all(r.ok for r in results)
    assert {tuple(sorted(r.query.items())) for r in server.requests} == {
        (("key", "gateway-secret"), ("tenant", "t1"))
    }


def test_headers_and_query_stay_out_of_reprs_and_cache_keys() -> None:
    """Custom headers and query values are secrets as far as reprs and cache keys go."""
    config = ChatConfig(
        base_url="https://gateway.example/v1",
        headers={"X-Gateway-Key": "gw-SENTINEL-1"},
        query={"key": "q-SENTINEL-2"},
    )
    shown = repr(config) + repr(nbtoolkit.configure(headers={"X-Gateway-Key": "gw-SENTINEL-1"}))
    assert "SENTINEL" not in shown
    assert config.key_url("/chat/completions") == "https://gateway.example/v1/chat/completions"
    assert config.url("/embeddings") == "https://gateway.example/v1/embeddings?key=q-SENTINEL-2"
    with pytest.raises(ConfigError, match="headers must map names to strings"):
        ChatConfig(headers={"X-Retries": 3})  # type: ignore[dict-item]


async def test_secret_headers_and_query_echoed_in_errors_are_redacted() -> None:
    """A server that repeats a custom header or query value in an error shows ***."""
    secret_header, secret_query = "gw-SENTINEL-header-1", "q-SENTINEL-query-2"
    async with ChatServer() as server:
        server.script(Status(400, message=f"bad {secret_header} / {secret_query}"))
        _, results = await run_against(
            server,
            1,
            headers={"X-Gateway-Key": secret_header},
            query={"key": secret_query},
            retry=FAST_RETRY,
        )
    error = results[0].error
    assert error is not None
    assert error.message.endswith("bad *** / ***")
