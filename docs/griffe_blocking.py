"""A Griffe extension for the API reference: ``complete = blocking(acomplete)`` is a method.

Each sync accessor method is made from its ``a...`` twin by ``blocking`` (or
``operator_blocking``) in the class body, so read from the source alone it is an attribute:
the reference showed ``complete = blocking(acomplete)``, with no parameters and no text.
This turns each such attribute into a method with its twin's parameters, return type and
docstring, as ``blocking`` does at run time (`nbtoolkit.frame._run.blocking`). Inspecting
the live objects instead would also inspect every other class on the page, and dataclass
fields would show ``bool``'s own docstring.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# ``blocking(acomplete)`` or ``operator_blocking(SemanticMethods.afilter)``.
_MADE_BY = re.compile(r"^(?:operator_)?blocking\((?:(\w+)\.)?(a\w+)\)$")


class BlockingMethods(griffe.Extension):
    """Sync twins made by ``blocking(...)`` become methods in the reference."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "nbtoolkit":
            return
        for module in _modules(pkg["frame"]):
            for cls in module.classes.values():
                _as_methods(module, cls)


def _modules(module: griffe.Module) -> list[griffe.Module]:
    found = [module]
    for sub in module.modules.values():
        found += _modules(sub)
    return found


def _as_methods(module: griffe.Module, cls: griffe.Class) -> None:
    for name, member in list(cls.members.items()):
        if not isinstance(member, griffe.Attribute):
            continue
        made_by = _MADE_BY.match(str(member.value))
        if made_by is None:
            continue
        owner, twin_name = made_by.groups()
        home = cls if owner is None else module[owner]
        twin = home.members[twin_name]
        if isinstance(twin, griffe.Alias):
            twin = twin.final_target
        if not isinstance(twin, griffe.Function):
            continue  # not made from a method: left as the attribute it is
        method = griffe.Function(
            name,
            lineno=member.lineno,
            endlineno=member.endlineno,
            parameters=twin.parameters,
            returns=twin.returns,
        )
        if twin.docstring is not None:
            method.docstring = griffe.Docstring(
                twin.docstring.value,
                lineno=twin.docstring.lineno,
                endlineno=twin.docstring.endlineno,
                parent=method,
            )
        cls.set_member(name, method)
