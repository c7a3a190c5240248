"""Drive a real IPython kernel over jupyter_client: start it, run cells, collect what they said.

Every wait here has a deadline, so a kernel that hangs fails the test instead of stalling it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

# Text that means an aiohttp session or an asyncio task was left behind by a run.
LEAK_MARKERS = ("Unclosed client session", "Unclosed connector", "Task was destroyed")


@dataclass
class CellRun:
    """What one execute request produced: its reply and its iopub output messages."""

    msg_id: str
    code: str
    reply: dict[str, Any] | None = None  # execute_reply content
    outputs: list[dict[str, Any]] = field(default_factory=list)  # iopub msgs, status excluded
    idle: bool = False  # iopub said "idle" for this request: nothing more will come
    replied_at: float | None = None  # time.monotonic() when the execute_reply arrived

    @property
    def done(self) -> bool:
        return self.reply is not None and self.idle

    @property
    def status(self) -> str | None:
        return None if self.reply is None else self.reply["status"]

    @property
    def error(self) -> dict[str, Any] | None:
        """The content of the cell's ``error`` message, if it raised."""
        for msg in self.outputs:
            if msg["header"]["msg_type"] == "error":
                return dict(msg["content"])
        return None

    def stream(self, name: str) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs
            if m["header"]["msg_type"] == "stream" and m["content"]["name"] == name
        )

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    def text(self) -> str:
        """Everything the cell showed, as text: streams, reprs, tracebacks."""
        parts: list[str] = []
        for msg in self.outputs:
            content = msg["content"]
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                parts.append(content["text"])
            elif kind in ("execute_result", "display_data", "update_display_data"):
                parts.append(str(content.get("data", {}).get("text/plain", "")))
            elif kind == "error":
                parts.append(f"{content['ename']}: {content['evalue']}")
                parts.extend(content.get("traceback", []))
        return "\n".join(parts)


class Kernel:
    """A started kernel and its client; routes every message to the request it answers."""

    def __init__(self, manager: KernelManager, client: BlockingKernelClient, log: Path) -> None:
        self.manager = manager
        self.client = client
        self.log = log  # the kernel process's own stdout and stderr
        # Keyed by parent msg_id: several cells may be in flight (one running, some queued).
        self.cells: dict[str, CellRun] = {}
        self.orphans: list[dict[str, Any]] = []  # iopub msgs with no parent we sent
        self._by_parent: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.replies: dict[str, dict[str, Any]] = {}  # other shell replies, by request

    def execute(self, code: str, *, stop_on_error: bool = True) -> str:
        """Send ``code`` without waiting; return the request's msg_id."""
        msg_id: str = self.client.execute(code, stop_on_error=stop_on_error)
        self.cells[msg_id] = CellRun(msg_id, code)
        return msg_id

    def wait(self, msg_id: str, timeout: float) -> CellRun:
        """Collect messages until the request ``msg_id`` is done; fail after ``timeout`` s."""
        cell = self.cells[msg_id]
        self.pump_until(lambda: cell.done, timeout, f"cell {cell.code[:60]!r} to finish")
        return cell

    def run(self, code: str, timeout: float = 30.0) -> CellRun:
        """Execute ``code`` and wait for it."""
        return self.wait(self.execute(code), timeout)

    def complete(self, code: str, timeout: float = 30.0) -> dict[str, Any]:
        """What Tab offers at the end of ``code``: the kernel's complete_reply content."""
        msg_id: str = self.client.complete(code, len(code))
        self.pump_until(lambda: msg_id in self.replies, timeout, f"completions of {code!r}")
        return self.replies.pop(msg_id)

    def pump_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Route incoming messages until ``condition()`` holds; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                seen = {c.code[:40]: (c.status, c.idle) for c in self.cells.values()}
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; {seen}")
            self.pump(0.02)

    def pump(self, poll: float = 0.02) -> None:
        """Route whatever the shell and iopub channels hold now, waiting at most ``poll`` s."""
        for channel, handle in (
            (self.client.shell_channel, self._on_shell),
            (self.client.iopub_channel, self._on_iopub),
        ):
            with contextlib.suppress(queue.Empty):
                handle(channel.get_msg(timeout=poll))
            while True:
                try:
                    handle(channel.get_msg(timeout=0))
                except queue.Empty:
                    break

    def all_text(self) -> str:
        """Every output of every cell, iopub messages that belonged to none, and the log."""
        orphan_text = [str(m["content"]) for m in self.orphans]
        log_text = self.log.read_text(errors="replace")
        return "\n".join([*(c.text() for c in self.cells.values()), *orphan_text, log_text])

    def _on_shell(self, msg: dict[str, Any]) -> None:
        cell = self.cells.get(msg["parent_header"].get("msg_id", ""))
        if cell is not None and msg["header"]["msg_type"] == "execute_reply":
            cell.reply = msg["content"]
            cell.replied_at = time.monotonic()
        elif cell is None:
            self.replies[msg["parent_header"].get("msg_id", "")] = msg["content"]

    def _on_iopub(self, msg: dict[str, Any]) -> None:
        cell = self.cells.get(msg["parent_header"].get("msg_id", ""))
        kind = msg["header"]["msg_type"]
        if cell is None:
            if kind not in ("status", "execute_input"):
                self.orphans.append(msg)
        elif kind == "status":
            cell.idle = cell.idle or msg["content"]["execution_state"] == "idle"
        elif kind != "execute_input":
            cell.outputs.append(msg)


@contextlib.contextmanager
def running_kernel(env: Mapping[str, str], log: Path) -> Iterator[Kernel]:
    """A python3 kernel whose environment is ours plus ``env``; shut down on the way out.

    The kernel process's own stdout and stderr (its log, anything written past ipykernel's
    capture) go to the file ``log``, so tests can search them too.
    """
    with log.open("wb") as sink:
        manager, client = start_new_kernel(
            startup_timeout=60,
            kernel_name="python3",
            env={**os.environ, **env},
            stdout=sink,
            stderr=sink,
        )
        try:
            yield Kernel(manager, client, log)
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds; return the seconds it took, AssertionError on timeout."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start
