"""The semantic operators on Anthropic's and Gemini's own APIs: each question goes to the
provider's endpoint in its format (no OpenAI ``response_format``), and answers as those models
give them in words (bare JSON, JSON in a code fence, a number as a string) are read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from nbtoolkit import ChatConfig, ConfigError
from nbtoolkit.core.endpoints._judge import read_answer, read_score
from nbtoolkit.testing import AnthropicServer, GeminiServer

KEY = "sk-SENTINEL-native-semantic-5c1d"
MARK = "[keep]"
TEXTS = ["a [keep] 91", "b 12", "c [keep] 55", "d 78"]


def _question(text: str) -> str:
    """What the responders answer: a verdict for a filter, a score for top_k."""
    if "Answer with JSON only" in text:
        return json.dumps({"answer": MARK in text})
    return json.dumps({"score": text.rsplit(" ", 1)[-1]})  # a number as a string


def _claude(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    return _question(str(messages[-1]["content"]))


def _gemini(contents: list[dict[str, Any]], body: dict[str, Any]) -> str:
    text = "".join(part.get("text", "") for part in contents[-1]["parts"])
    return "```json\n" + _question(text) + "\n```"  # as Gemini answers JSON asked in words


def _config(server: AnthropicServer | GeminiServer, provider: str, tmp_path: Path) -> ChatConfig:
    return ChatConfig(
        provider="anthropic" if provider == "anthropic" else "gemini",
        base_url=server.base_url,
        api_key=KEY,
        model="claude-sonnet-4-5" if provider == "anthropic" else "gemini-2.5-flash",
        cache=str(tmp_path / "cache.sqlite3"),
        progress=False,
    )


def _server(provider: str) -> AnthropicServer | GeminiServer:
    if provider == "anthropic":
        return AnthropicServer(api_key=KEY, responder=_claude)
    return GeminiServer(api_key=KEY, responder=_gemini)


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_filter_asks_the_native_endpoint_and_keeps_the_yes_rows(
    provider: str, tmp_path: Path
) -> None:
    """filter on a native provider posts to its own endpoint without OpenAI fields (short on
    Anthropic, uncapped on Gemini, whose thoughts count against the cap)."""
    frame = pd.DataFrame({"text": TEXTS}, index=[7, 3, 7, 1])
    with _server(provider).run_in_thread() as server:
        config = _config(server, provider, tmp_path)
        kept = frame.chat.filter("Is it marked? {text}", config=config)
        again = frame.chat.filter("Is it marked? {text}", config=config, keep="mask")
    assert kept["text"].tolist() == ["a [keep] 91", "c [keep] 55"]
    assert kept.index.tolist() == [7, 7]
    assert again.tolist() == [True, False, True, False]
    assert len(server.requests) == 4  # the second run is all cache hits
    body = server.requests[0].body
    assert "response_format" not in body and "logprobs" not in body
    if provider == "anthropic":
        assert server.requests[0].path == "/v1/messages" and body["max_tokens"] == 16
    else:
        # No short cap: a thinking model would spend it on thoughts and answer nothing.
        assert server.requests[0].path.endswith(":generateContent")
        assert "maxOutputTokens" not in body.get("generationConfig", {})


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_top_k_reads_native_scores(provider: str, tmp_path: Path) -> None:
    """top_k on a native provider reads each row's score (sent as a string) from its text."""
    frame = pd.DataFrame({"text": TEXTS})
    with _server(provider).run_in_thread() as server:
        best = frame.chat.top_k(2, "How good? {text}", config=_config(server, provider, tmp_path))
    assert best["text"].tolist() == ["a [keep] 91", "d 78"]
    assert best["score"].tolist() == [91.0, 78.0]
    assert len(server.requests) == 4


def test_join_on_gemini_embeds_with_gemini(tmp_path: Path) -> None:
    """join's candidates on Gemini come from batchEmbedContents, then one question per pair."""
    left = pd.DataFrame({"text": ["x [keep] 1", "y 2"]})
    right = pd.DataFrame({"text": ["z 3", "w 4"]})
    with _server("gemini").run_in_thread() as server:
        config = _config(server, "gemini", tmp_path)
        pairs = left.chat.join(
            right, "{left.text} {right.text}", config=config, embed_model="text-embedding-004"
        )
    paths = [r.path for r in server.requests]
    assert sum(p.endswith(":batchEmbedContents") for p in paths) == 2
    assert sum(p.endswith(":generateContent") for p in paths) == 4
    assert pairs["left_index"].tolist() == [0, 0]


def test_join_on_anthropic_says_it_has_no_embeddings_before_sending(tmp_path: Path) -> None:
    """join on Anthropic is a ConfigError naming the providers that embed, with 0 requests."""
    frame = pd.DataFrame({"text": TEXTS})
    with _server("anthropic").run_in_thread() as server:
        config = _config(server, "anthropic", tmp_path)
        with pytest.raises(ConfigError, match="no embeddings API"):
            frame.chat.join(frame, "{left.text} {right.text}", config=config, embed_model="e")
    assert server.requests == []


def test_answers_in_code_fences_and_numbers_as_strings_are_read() -> None:
    """A fenced JSON verdict or score and a score sent as a string are read; words are not."""
    assert read_answer('```json\n{"answer": true}\n```') is True
    assert read_answer('{"answer": "false"}') is False
    assert read_score('{"score": "87"}') == 87.0
    assert read_score('```\n{"score": 12.5}\n```') == 12.5
    assert read_score('{"score": "high"}') is None
    assert read_score('{"score": "nan"}') is None
