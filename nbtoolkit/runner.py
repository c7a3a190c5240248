"""`run_sync`: the only bridge from sync code to the async engine, aware of notebook loops.

- No running loop (a script, a plain REPL): ``asyncio.run``. Its SIGINT handler turns
  Ctrl-C into a cancellation of our task, so the engine cleans up before KeyboardInterrupt.
- A running loop that nest_asyncio2 can patch (a Jupyter kernel): patch once, lazily, then
  ``asyncio.run``, which nest_asyncio2 makes re-entrant. Its ``run`` cancels and awaits the
  task when an interrupt lands, so no request keeps running on the kernel's loop after the
  stop button. (A bare ``loop.run_until_complete`` would leave it running.)
- A running loop that cannot be patched (uvloop): a private loop on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_patch_lock = threading.Lock()
_patched_loops: set[int] = set()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, whether or not a loop is already running."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    if _patch(loop):
        with _ctrl_c_raises():
            return asyncio.run(coro)
    return run_on_private_thread(coro)


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """Let Ctrl-C raise KeyboardInterrupt for the length of a nested run.

    An outer ``asyncio.run`` answers SIGINT by cancelling its own task, which is blocked in
    our nested run and would only see it once the whole job is done. A kernel already has
    Python's default handler in place, in which case this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: leave it alone
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _patch(loop: asyncio.AbstractEventLoop) -> bool:
    """Make ``loop`` re-entrant with nest_asyncio2; False when this kind of loop can't be."""
    if not isinstance(loop, asyncio.BaseEventLoop):
        return False  # uvloop and other C loops: nest_asyncio2 patches only the pure-Python loop
    with _patch_lock:
        if id(loop) not in _patched_loops:
            import nest_asyncio2  # imported late: scripts never need it

            try:
                nest_asyncio2.apply(loop)
            except (ValueError, RuntimeError):
                return False
            _patched_loops.add(id(loop))
    return True


def run_on_private_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new loop in a worker thread; Ctrl-C here cancels it there first."""
    loop = asyncio.new_event_loop()
    task_ready = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            task = loop.create_task(coro)
            box["task"] = task
            task_ready.set()
            box["result"] = loop.run_until_complete(task)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc
        finally:
            task_ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=target, name="nbtoolkit-loop", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)  # short joins keep the main thread responsive to Ctrl-C
    except KeyboardInterrupt:
        task_ready.wait()
        if (task := box.get("task")) is not None:
            loop.call_soon_threadsafe(task.cancel)
        thread.join()
        raise
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result
