"""Shared fixtures: a real OpenAI-compatible server on 127.0.0.1, and fast retry settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import nbtoolkit
import nbtoolkit.config as config_module
from nbtoolkit.testing import ChatServer

# Tiny waits through config, never by patching sleep: retries stay real but fast.
FAST_RETRY = nbtoolkit.RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05, jitter=0.01)
MODEL = "test-model"


@pytest.fixture
def server() -> Iterator[ChatServer]:
    """A test server on its own thread, so sync entry points can call it without deadlock."""
    with ChatServer().run_in_thread() as running:
        yield running


@pytest.fixture
async def aserver() -> AsyncIterator[ChatServer]:
    """A test server on the test's own loop, for async entry points."""
    async with ChatServer() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real API, no other test's configure(), and a fresh response cache for each test."""
    monkeypatch.setenv("NBTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    # A developer's Azure settings would send every test without a base_url to Azure.
    for name in ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION"):
        monkeypatch.delenv(name, raising=False)
    # Nor would a developer's Anthropic or Gemini key (which alone selects that provider).
    for name in (
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_GEMINI_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config_module, "_global_config", nbtoolkit.ChatConfig())


def settings(server: ChatServer, **overrides: object) -> dict[str, object]:
    """The keyword arguments that point a call at ``server`` with fast retries, no bar."""
    base: dict[str, object] = {
        "model": MODEL,
        "base_url": server.base_url,
        "retry": FAST_RETRY,
        "progress": False,
    }
    base.update(overrides)
    return base
