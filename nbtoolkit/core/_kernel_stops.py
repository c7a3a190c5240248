"""A stop pressed while the kernel served something else must still stop the run it was for.

ipykernel serves shell requests one at a time. A completion (Tab) can hold the kernel for
seconds while jedi infers a DataFrame, and a cell submitted meanwhile waits behind it while
the notebook already shows it as busy. A stop pressed then lands in the completion, where
IPython's completer catches every exception, KeyboardInterrupt included, and the queued run
starts afterwards as if nothing had been asked (ipykernel 7.4, IPython 9).

So, in a kernel, every SIGINT that arrives while the kernel is handling a request other than
a cell's execution is remembered. When a run then starts, a stop that was swallowed after
this cell was submitted is taken as meant for it: the run stops at once, before it sends
anything. A stop that reached a cell was that cell's (it raised there) and is not carried
over; neither is one pressed before this cell was submitted.
"""

from __future__ import annotations

import datetime
import signal
import sys
import threading
import time
from typing import Any

_lock = threading.Lock()
_swallowable: float | None = None  # wall time of the last stop that landed outside a cell
_watched: set[int] = set()


def watch() -> None:
    """In an ipykernel, remember stops that land outside cell executions; else nothing."""
    kernel = _kernel()
    if kernel is None or id(kernel) in _watched:
        return
    original = kernel.pre_handler_hook

    def pre_handler_hook() -> None:
        original()  # ipykernel's: saves its handler and installs default_int_handler
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _recording_int_handler)

    kernel.pre_handler_hook = pre_handler_hook
    _watched.add(id(kernel))


def stop_pending_for_this_cell() -> bool:
    """True (once) if a stop was swallowed after the running cell was submitted."""
    global _swallowable
    submitted = _submitted()
    with _lock:
        pressed, _swallowable = _swallowable, None
    return pressed is not None and submitted is not None and pressed >= submitted


def _recording_int_handler(signum: int, frame: Any) -> None:
    """Python's default handler (raise KeyboardInterrupt), noting stops outside a cell."""
    global _swallowable
    if _current_msg_type() != "execute_request":
        with _lock:
            _swallowable = time.time()
    raise KeyboardInterrupt


def _kernel() -> Any:
    # A kernel has imported IPython long before us: a script that has not is not in one, and
    # is spared IPython's import (half a second) at ``import nbtoolkit``.
    if "IPython" not in sys.modules:
        return None
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    return kernel if hasattr(kernel, "pre_handler_hook") else None


def _parent_header() -> dict[str, Any]:
    kernel = _kernel()
    try:
        parent = kernel.get_parent("shell") if kernel is not None else None
    except Exception:  # an ipykernel without get_parent(channel): nothing to go on
        return {}
    header = parent.get("header") if isinstance(parent, dict) else None
    return header if isinstance(header, dict) else {}


def _current_msg_type() -> str | None:
    msg_type = _parent_header().get("msg_type")
    return msg_type if isinstance(msg_type, str) else None


def _submitted() -> float | None:
    """When the frontend sent the request now running (its header's date), as wall time."""
    date = _parent_header().get("date")
    if isinstance(date, str):
        try:
            date = datetime.datetime.fromisoformat(date)
        except ValueError:
            return None
    if not isinstance(date, datetime.datetime):
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=datetime.UTC)
    return date.timestamp()
