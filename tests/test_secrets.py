"""The API key never shows: not in a repr, an exception, a log line, the bar or the report."""

from __future__ import annotations

import logging
import traceback

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.testing import ChatServer, Echo, Status
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
        parts += [str(message) for message in report.rows["message"]]  # not cut to a width
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


@pytest.mark.parametrize("kind", ["complete", "embed"])
def test_a_200_that_echoes_the_request_is_redacted(kind: str) -> None:
    """A 200 whose body is the request's headers and URL (not a completion) reaches the row's
    error and the report with the key, a secret header and a query key shown as ***."""
    df = pd.DataFrame({"review": ["a", "b"]})
    query_key = "qk-nbtoolkit-QUERYSECRET-5e6f"
    header_key = "hk-nbtoolkit-HEADERSECRET-9a8b"
    with ChatServer(api_key=SECRET).run_in_thread() as server:
        server.script(*[Echo()] * FAST_RETRY.attempts, prompt="a")
        # One text per request: "b" is answered on its own.
        options = {"batch_size": 1} if kind == "embed" else {}
        call = df.chat.complete if kind == "complete" else df.chat.embed
        out = call(
            "review",
            model=MODEL,
            base_url=f"{server.base_url}?key={query_key}",
            api_key=SECRET,
            headers={"X-Gateway-Key": header_key},
            retry=FAST_RETRY,
            progress=False,
            cache=False,
            **options,
        )
        echoed = [r for r in server.requests if r.outcome == "malformed"]
    # The server really echoed all three secrets, on every attempt.
    assert len(echoed) == FAST_RETRY.attempts
    assert echoed[0].headers["X-Gateway-Key"] == header_key
    assert echoed[0].query["key"] == query_key
    column = "response" if kind == "complete" else "embedding"
    assert out[column].isna().tolist() == [True, False]
    said = everything_said(None)
    assert "MalformedResponse" in said
    assert "Bearer ***" in said  # the echo is there, scrubbed
    for secret in (SECRET, query_key, header_key):
        assert secret not in said


def test_a_key_in_the_base_url_query_is_never_shown() -> None:
    """A key passed in base_url's query is masked in repr(ChatConfig) and absent from the
    errors of a run that cannot reach its server."""
    query_key = "qk-nbtoolkit-QUERYSECRET-5e6f"
    config = nbtoolkit.ChatConfig(
        base_url=f"http://127.0.0.1:9/v1?key={query_key}&api-version=2024-10-21", model=MODEL
    )
    configured = nbtoolkit.configure(base_url=config.base_url)
    shown = repr(config) + str(config.resolved()) + repr(configured)
    assert query_key not in shown
    assert "key=***" in shown and "api-version=2024-10-21" in shown
    df = pd.DataFrame({"review": ["a", "b"]})
    with pytest.raises(nbtoolkit.RunAborted) as caught:
        df.chat.complete(
            "review",
            model=MODEL,
            base_url=config.base_url,
            retry=FAST_RETRY,
            progress=False,
            max_parallel=1,
        )
    said = everything_said(caught.value)
    assert "could not be reached" in said
    assert query_key not in said
