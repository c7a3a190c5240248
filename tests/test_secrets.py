"""The API key never shows: not in a repr, an exception, a log line, the bar or the report."""

from __future__ import annotations

import logging
import traceback

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.testing import ChatServer, Status
from tests.conftest import FAST_RETRY, MODEL

SECRET = "sk-nbtoolkit-SENTINEL-7f3a9c2e41"
WRONG = "sk-nbtoolkit-WRONGKEY-00b1d8e6"


def everything_said(exc: BaseException | None, *texts: str) -> str:
    parts = list(texts)
    if exc is not None:
        parts += traceback.format_exception(exc)
        parts += [repr(exc), str(getattr(exc, "partial", ""))]
    report = nbtoolkit.last_run()
    if report is not None:
        parts += [repr(report), report.rows.to_string(), report.summary(), repr(report.stats)]
        parts.append(report.output.to_string())
    return "\n".join(parts)


def test_config_repr_hides_the_key() -> None:
    """repr and str of a config never show the key, resolved from the environment or not."""
    config = nbtoolkit.ChatConfig(api_key=SECRET, model=MODEL)
    assert SECRET not in repr(config)
    assert SECRET not in str(config.resolved())
    assert SECRET not in repr(nbtoolkit.configure(api_key=SECRET))


def test_a_good_run_shows_no_key(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """With the bar on and every logger at DEBUG, a run's output holds no trace of the key."""
    caplog.set_level(logging.DEBUG)
    df = pd.DataFrame({"review": ["a", "b", "c"]})
    with ChatServer(api_key=SECRET).run_in_thread() as server:
        server.script(Status(500), Status(400))
        out = df.chat.complete(
            "review", model=MODEL, base_url=server.base_url, api_key=SECRET, retry=FAST_RETRY
        )
    assert out["response"].notna().sum() == 2  # authenticated, so the key was really sent
    captured = capsys.readouterr()
    said = everything_said(None, captured.out, captured.err, caplog.text)
    assert "ok=2" in said  # the bar was really drawn
    assert SECRET not in said


def test_a_rejected_key_is_not_repeated(caplog: pytest.LogCaptureFixture) -> None:
    """A 401 run's exception, traceback, partial frame and report do not show the key."""
    caplog.set_level(logging.DEBUG)
    df = pd.DataFrame({"review": ["a", "b"]})
    with (
        ChatServer(api_key=SECRET).run_in_thread() as server,
        pytest.raises(nbtoolkit.RunAborted) as caught,
    ):
        df.chat.complete(
            "review", model=MODEL, base_url=server.base_url, api_key=WRONG, progress=False
        )
    said = everything_said(caught.value, caplog.text)
    assert "HTTP 401" in said
    assert WRONG not in said


def test_a_server_that_echoes_the_key_is_redacted() -> None:
    """Error bodies that repeat the key (some proxies do) are scrubbed before anyone sees them."""
    df = pd.DataFrame({"review": ["a", "b"]})
    with ChatServer().run_in_thread() as server:
        server.script(Status(400, message=f"bad header Authorization: Bearer {SECRET}"), prompt="a")
        df.chat.complete(
            "review", model=MODEL, base_url=server.base_url, api_key=SECRET, progress=False
        )
        first = everything_said(None)
        assert "Authorization: Bearer ***" in first
        assert SECRET not in first
        server.script(Status(401, message=f"Incorrect API key provided: {SECRET}"))
        with pytest.raises(nbtoolkit.RunAborted) as caught:
            df.chat.complete(
                "review",
                model=MODEL,
                base_url=server.base_url,
                api_key=SECRET,
                progress=False,
                max_parallel=1,
            )
    said = everything_said(caught.value)
    assert "Incorrect API key provided: ***" in said
    assert SECRET not in said
    assert SECRET not in caught.value.cause.body  # type: ignore[union-attr]


def test_an_azure_key_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Azure's api-key header, echoed by the server or refused, never shows anywhere."""
    df = pd.DataFrame({"review": ["a", "b"]})
    with ChatServer(azure=True, api_key=SECRET).run_in_thread() as server:
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.azure_endpoint)
        monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
        config = nbtoolkit.configure(api_key=SECRET, model=MODEL)
        assert SECRET not in repr(config) + repr(config.resolved())
        server.script(Status(400, message=f"bad header api-key: {SECRET}"), prompt="a")
        df.chat.complete("review", progress=False)
        first = everything_said(None)
        assert "api-key: ***" in first
        with pytest.raises(nbtoolkit.RunAborted) as caught:
            df.chat.complete("review", api_key=WRONG, progress=False)
    said = first + everything_said(caught.value)
    assert "HTTP 401" in said
    assert SECRET not in said
    assert WRONG not in said
