"""``jsonschema``, imported on first use, without building format checkers nobody asked for.

``import jsonschema`` registers its format checkers, and one of them imports
``rfc3987_syntax`` (where it is installed: JupyterLab brings it), which builds a parser for
RFC 3987 at import: 4 seconds on a 2-core machine, for the ``iri`` format that nbtoolkit
never checks (it passes no ``format_checker``). So while jsonschema is imported, that module
is stood in for by one whose functions import the real one on their first call: the check
is registered as usual and costs its import only when some code checks an ``iri``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

# Imported by jsonschema's format checkers at its import, and slow to import.
SLOW_FORMAT_MODULES = ("rfc3987_syntax",)


def jsonschema_module() -> types.ModuleType:
    """The ``jsonschema`` module, imported now if it was not yet (see the module's docstring)."""
    if (loaded := sys.modules.get("jsonschema")) is not None:
        return loaded
    stand_ins = {
        name: _Deferred(name)
        for name in SLOW_FORMAT_MODULES
        if name not in sys.modules and importlib.util.find_spec(name) is not None
    }
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("jsonschema")
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]  # the next import of it finds the real module


class _Deferred(types.ModuleType):
    """A module whose every public function imports the real module at its first call."""

    def __getattr__(self, attribute: str) -> Callable[..., Any]:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        name = self.__name__

        def deferred(*args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(name), attribute)(*args, **kwargs)

        return deferred
