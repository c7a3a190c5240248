"""The objects that existed before a run are left out of the garbage collector's walks while
it goes.

A run allocates several objects per row (its request, the row's item, its result); every few
thousand of them CPython's collector walks its oldest generation, which is everything the
process holds: in a notebook, pandas and IPython, the user's frames, and the last run's
report with one result per row. On a re-run of 100,000 rows answered from the cache, those
walks were a third of the run's CPU. `gc.freeze` moves what exists now out of the collector's
sight (nothing is freed or moved in memory; reference counting still frees what is dropped),
so the walks cover only what the run itself made; `gc.unfreeze` puts it all back when the last
run that froze it ends. Cycles among objects made before the run, if any become garbage
meanwhile, are collected then instead of during the run.

Runs may overlap (two notebook tasks, Dask partitions on threads): the first to start
freezes, the last to end unfreezes. A freeze someone else made (a server that froze its heap
before forking workers) is left alone: then nothing here freezes or unfreezes.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_runs = 0  # runs going now
_frozen_here = False  # whether the heap's freeze is ours to undo


@contextlib.contextmanager
def older_objects_frozen() -> Iterator[None]:
    """Keep the objects that exist now out of the collector's walks until the block ends
    (and every other such block that began meanwhile)."""
    global _runs, _frozen_here
    with _lock:
        if _runs == 0 and gc.get_freeze_count() == 0 and gc.isenabled():
            gc.freeze()
            _frozen_here = True
        _runs += 1
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0 and _frozen_here:
                gc.unfreeze()
                _frozen_here = False
