"""Registers ``ddf.chat`` once ``dask.dataframe`` is imported, without importing Dask itself.

``import nbtoolkit`` calls `register`. Importing ``dask.dataframe`` costs over a second and
``distributed`` another, so neither happens then: if ``dask.dataframe`` is not loaded yet, a
finder on ``sys.meta_path`` waits for its import and registers the accessor right after it.
Only then is `nbtoolkit.dask._accessor` (and with it ``distributed``, where the ledger
needs it) imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType


def register() -> None:
    """Register ``ddf.chat`` now if ``dask.dataframe`` is loaded, else as soon as it is."""
    if "dask.dataframe" in sys.modules:
        _register_now()
    elif not any(isinstance(f, _AfterDaskImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterDaskImport())


def _register_now() -> None:
    try:
        from dask.dataframe.extensions import (
            register_dataframe_accessor,
            register_series_accessor,
        )
    except ImportError:  # dask without its dataframe extra: nothing to register on
        return
    import warnings

    from nbtoolkit.dask._accessor import DaskChatAccessor

    with warnings.catch_warnings():  # re-registering on reload is fine
        warnings.simplefilter("ignore")
        register_dataframe_accessor("chat")(DaskChatAccessor)  # type: ignore[no-untyped-call]
        register_series_accessor("chat")(DaskChatAccessor)  # type: ignore[no-untyped-call]


class _AfterDaskImport(importlib.abc.MetaPathFinder):
    """Runs `_register_now` right after ``dask.dataframe`` has been imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "dask.dataframe":
            return None
        sys.meta_path.remove(self)  # once: the real finders do the finding
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute: Callable[[ModuleType], None] = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _register_now()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
