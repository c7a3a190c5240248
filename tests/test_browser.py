"""The notebook as a user sees it: JupyterLab in headless Chromium, the bar, the stop button.

Starts JupyterLab on 127.0.0.1 (a free port, a token, a temporary root and settings), opens a
notebook in Debian's Chromium through playwright (``executable_path``: nothing is downloaded),
runs a cell against a `ChatServer` on a thread, watches the progress widget move and finish,
presses Tab after ``short["q"].chat.``, then presses the toolbar's stop button during a
longer run and reads what the cell shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from nbtoolkit.testing import ChatServer

CHROMIUM = os.environ.get("NBTOOLKIT_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("jupyterlab", reason="jupyterlab is in the test extra; not installed here")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is in the test extra; not installed here"
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LATENCY = 0.1
SHORT_ROWS = 80  # 80 rows, 4 at a time, 0.1 s each: 2 s, long enough to see the bar move
LONG_ROWS = 800  # 20 s: the stop button comes long before the end
CELLS = [
    "import pandas as pd\nimport nbtoolkit",
    f'short = pd.DataFrame({{"q": [f"short {{i}}" for i in range({SHORT_ROWS})]}})\n'
    'out = short.chat.complete("q", model="test-model", max_parallel=4)\n'
    'print("answered", out["response"].notna().sum())',
    f'long = pd.DataFrame({{"q": [f"long {{i}}" for i in range({LONG_ROWS})]}})\n'
    'out2 = long.chat.complete("q", model="test-model", max_parallel=4)',
    'short["q"].chat.',  # never run: Tab at its end (see _tab_offers)
]
WAIT_MS = 30_000  # generous: a loaded CI machine starts JupyterLab and a kernel slowly


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _jupyterlab(root: Path, env: dict[str, str]) -> Iterator[str]:
    """JupyterLab serving ``root``; yields its base URL with the token, stops it on the way out."""
    port, token = _free_port(), secrets.token_hex(16)
    home = root.parent / "jupyter"
    env = {
        **os.environ,
        **env,
        # Its own config, settings and workspaces: nothing of the user's, nothing left over.
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    # No "get Jupyter news?" toast: answering it would make JupyterLab fetch from the web.
    notification = home / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log = (root.parent / "jupyterlab.log").open("wb")
    lab = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.disable_check_xsrf=True",
            "--allow-root",  # CI runs as root
            "--LabApp.extension_manager=readonly",  # no look-ups on PyPI
            "--LabApp.news_url=",  # no fetching of Jupyter news
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its kernels too, so one signal to the group stops them all
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if lab.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "JupyterLab did not start:\n" + Path(log.name).read_text()
                    ) from None
                time.sleep(0.2)
        yield f"{base}/lab/tree/run.ipynb?token={token}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait()
        log.close()


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer(latency=LATENCY).run_in_thread() as running:
        yield running


def _run_cell(page: Any, index: int) -> Any:
    """Select cell ``index`` (0-based), press the toolbar's run button, return the cell.

    Returns once the cell is queued or running: its prompt shows ``[*]`` or a number.
    Buttons, not keys: a key pressed before the editor has focus is silently lost.
    """
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputPrompt").click()
    sync_api.expect(cell).to_have_class(re.compile(r"\bjp-mod-selected\b"))
    page.locator("[data-command='notebook:run-cell-and-select-next']").first.click()
    sync_api.expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[(\*|\d+)\]"))
    return cell


def _progress(cell: Any) -> tuple[int, int] | None:
    """The progress widget's "done/total" in ``cell``, or None while it has none."""
    labels = cell.locator(".widget-hprogress ~ .widget-html .widget-html-content")
    if labels.count() == 0:
        labels = cell.locator(".widget-html-content")
    for text in labels.all_inner_texts():
        found = re.search(r"(\d+)/(\d+)", text)
        if found:
            return int(found.group(1)), int(found.group(2))
    return None


def _tab_offers(page: Any, index: int) -> list[str]:
    """Press Tab at the end of cell ``index``; the names the completer lists, then close it."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+End")
    names = page.locator(".jp-Completer .jp-Completer-item .jp-Completer-match")
    # JupyterLab drops a kernel's completions that take over a second (its provider
    # timeout), and a kernel's first completion loads Jedi, which can take longer: then the
    # popup does not open and, as a user would, we press Tab again.
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        page.keyboard.press("Tab")
        try:
            names.first.wait_for(timeout=3_000)
            break
        except sync_api.TimeoutError:
            assert time.monotonic() < deadline, "Tab never opened the completer"
            page.keyboard.press("Escape")
            cell.locator(".cm-content").click()
            page.keyboard.press("Control+End")
    offered: list[str] = names.all_inner_texts()
    page.keyboard.press("Escape")
    assert cell.locator(".cm-content").inner_text().strip() == 'short["q"].chat.'
    return offered


@pytest.mark.timeout(180)
def test_bar_moves_and_stop_button_shows_one_line(server: ChatServer, tmp_path: Path) -> None:
    """In JupyterLab the bar moves and finishes; the stop button shows one RunInterrupted line."""
    root = tmp_path / "notebooks"
    root.mkdir()
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source) for source in CELLS],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    nbformat.write(notebook, root / "run.ipynb")
    shots = tmp_path / "screenshots"
    env = {"OPENAI_BASE_URL": server.base_url}

    with (
        _jupyterlab(root, env) as url,
        sync_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        sync_api.expect.set_options(timeout=WAIT_MS)
        try:
            page.goto(url)
            page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for()
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
            sync_api.expect(
                page.locator(".jp-StatusBar-Widget", has_text="Idle").first
            ).to_be_visible()

            imports = _run_cell(page, 0)
            sync_api.expect(imports.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[1\]"))
            short = _run_cell(page, 1)
            seen: set[tuple[int, int]] = set()
            deadline = time.monotonic() + WAIT_MS / 1000
            while (SHORT_ROWS, SHORT_ROWS) not in seen:
                assert time.monotonic() < deadline, f"the bar never finished; saw {seen}"
                if (now := _progress(short)) is not None:
                    seen.add(now)
                page.wait_for_timeout(40)
            moving = {done for done, total in seen if total == SHORT_ROWS and 0 < done < total}
            assert moving, f"the bar jumped straight to the end: {sorted(seen)}"
            short.locator(".jp-OutputArea-output", has_text=f"answered {SHORT_ROWS}").wait_for()
            page.screenshot(path=str(shots / "1-finished.png"))

            # Tab after an item of the frame (Jedi alone offered nothing there).
            offered = _tab_offers(page, 3)
            assert {"complete", "embed", "extract", "classify"} <= set(offered), offered

            long = _run_cell(page, 2)
            deadline = time.monotonic() + WAIT_MS / 1000
            while (now := _progress(long)) is None or now[0] < 8:
                assert time.monotonic() < deadline, "the long run's bar never moved"
                page.wait_for_timeout(40)
            before = server.request_count
            page.locator(
                "jp-toolbar-button[data-command='notebook:interrupt-kernel'], "
                "[data-command='notebook:interrupt-kernel']"
            ).first.click()

            error = long.locator(
                ".jp-OutputArea-output[data-mime-type*='stderr']", has_text="RunInterrupted"
            )
            error.wait_for()
            page.screenshot(path=str(shots / "2-stopped.png"))
            shown = error.inner_text().strip()
            assert re.fullmatch(r"RunInterrupted: interrupted: \d+ ok, .*\.partial\)\.", shown), (
                shown
            )
            everything = long.locator(".jp-OutputArea").inner_text()
            for internal in ("Traceback", "nest_asyncio2", "selectors", "KeyboardInterrupt"):
                assert internal not in everything, everything
            assert server.request_count < before + LONG_ROWS // 2  # stopped, not finished
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shots / "failure.png"))
            raise
        finally:
            browser.close()
