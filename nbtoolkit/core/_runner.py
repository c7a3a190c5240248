"""`run_sync`: the only bridge from sync code to the async engine, aware of notebook loops.

- No running loop (a script, a plain REPL): ``asyncio.run``. Its SIGINT handler turns
  Ctrl-C into a cancellation of our task, so the engine cleans up before KeyboardInterrupt.
- A running loop that nest_asyncio2 can patch (a Jupyter kernel): patch once, lazily, then
  ``asyncio.run``, which nest_asyncio2 makes re-entrant. For the length of that nested run,
  Ctrl-C (the stop button) cancels our task instead of raising KeyboardInterrupt wherever the
  main thread happens to be: the nested loop runs whatever the kernel's loop has ready, not
  only our requests, and a KeyboardInterrupt raised in code that catches it (ipykernel's
  message dispatch and IPython's completer both do) is lost, and the run goes on to the end.
  The cancelled run cleans up, then KeyboardInterrupt is raised from here. (A bare
  ``loop.run_until_complete`` would leave our tasks running on the kernel's loop.) A stop
  that a slow completion swallowed after the cell was sent stops it too (`kernel_stops`).
- A running loop that cannot be patched (uvloop): a private loop on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from nbtoolkit.core import _kernel_stops as kernel_stops

T = TypeVar("T")

_patch_lock = threading.Lock()
# The loops nest_asyncio2 has made re-entrant, held weakly: a closed loop drops out, and a
# new loop is never taken for patched because it got a dead loop's id.
_patched_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
kernel_stops.watch()  # in a kernel, from import on: a stop swallowed before any run counts


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, whether or not a loop is already running."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    if _patch(loop):
        return _run_nested(loop, coro)
    return run_on_private_thread(coro)


class _CtrlC:
    """Turns Ctrl-C into a cancellation of one task on ``loop``; a second Ctrl-C raises."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: asyncio.Future[Any] | None = None  # set once the nested run has started it
        self.pressed = False  # Ctrl-C came during the run: it must end in KeyboardInterrupt

    def handle(self, signum: int, frame: object) -> None:
        if self.pressed:
            # The first press could not stop the run (the loop is stuck in sync code):
            # fall back to raising wherever the main thread is, as Python does by default.
            raise KeyboardInterrupt
        self.pressed = True
        if self.task is not None:
            # A signal handler runs between two bytecodes of whatever the main thread is
            # doing, maybe the loop itself: let the loop do the cancelling, not this frame.
            self.loop.call_soon_threadsafe(self.task.cancel)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` as a task that ``handle`` can cancel."""
        task = asyncio.ensure_future(coro)
        self.task = task
        if self.pressed:
            # Ctrl-C came before the task existed: cancel it at its first await, so the
            # run still starts, sends nothing, and reports itself interrupted.
            self.loop.call_soon(task.cancel)
        return await task


def _run_nested(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a patched running loop; Ctrl-C cancels the run, then raises."""
    ctrl_c = _CtrlC(loop)
    kernel_stops.watch()
    # A stop pressed while the kernel was busy elsewhere (a slow Tab completion) after this
    # cell was sent was swallowed there; it was meant for this run.
    ctrl_c.pressed = kernel_stops.stop_pending_for_this_cell()
    with _sigint_handler(ctrl_c.handle):
        try:
            result = asyncio.run(ctrl_c.run(coro))
        except asyncio.CancelledError:
            if ctrl_c.pressed:
                raise KeyboardInterrupt from None
            raise
    if ctrl_c.pressed:
        # The stop came as the run finished: the cell still stops, as the user asked.
        raise KeyboardInterrupt
    return result


@contextlib.contextmanager
def _sigint_handler(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install ``handler`` for SIGINT for the length of the block, where that is possible.

    It replaces a kernel's default handler, and an outer ``asyncio.run``'s, which would cancel
    the outer task, blocked in our nested run until the whole job is done. Only the main
    thread can set signal handlers, and a handler installed outside Python (None) is left
    alone: in both cases Ctrl-C keeps its usual effect.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        yield
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _patch(loop: asyncio.AbstractEventLoop) -> bool:
    """Make ``loop`` re-entrant with nest_asyncio2; False when this kind of loop can't be."""
    if not isinstance(loop, asyncio.BaseEventLoop):
        return False  # uvloop and other C loops: nest_asyncio2 patches only the pure-Python loop
    with _patch_lock:
        if loop not in _patched_loops:
            import nest_asyncio2  # imported late: scripts never need it

            try:
                nest_asyncio2.apply(loop)
            except (ValueError, RuntimeError):
                return False
            _patched_loops.add(loop)
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
