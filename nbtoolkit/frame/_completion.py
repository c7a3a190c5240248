"""Tab after ``df["review"].chat.`` offers the accessor's methods in IPython and Jupyter.

IPython completes attributes with Jedi by default, and Jedi works out ``df["review"]`` from
pandas' source, not from the live object: it sees a `Series` class without the ``chat``
accessor (pandas adds it at run time), so Tab offered nothing there, while ``df.chat.`` and
``df.review.chat.`` worked. IPython's own attribute completer would find it, but it stands
aside while Jedi is on.

So on import inside IPython, nbtoolkit adds one matcher to the shell's completer. It acts
only on text ending in ``.chat.`` (and a partial name): it evaluates what comes before
with IPython's guarded evaluation, under the completer's own policy (``evaluation``:
"limited" by default, which reads a DataFrame's item but calls nothing else), and offers
the public methods of the ``chat`` accessor it finds, if that accessor is nbtoolkit's.
Nothing else changes; outside IPython, nothing is imported or added.
"""

from __future__ import annotations

import ast
import re
import sys
from typing import Any

# What precedes ".chat.<partial name>" at the end of the text before the cursor.
_CHAT_ATTRIBUTE = re.compile(r"\.chat\.(?P<partial>[A-Za-z_]\w*)?$")


def register_tab_completion() -> None:
    """Add the matcher to the running IPython shell's completer, once (none: do nothing)."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has it already
    shell = ipython.get_ipython() if ipython is not None else None
    completer = getattr(shell, "Completer", None)
    matchers = getattr(completer, "custom_matchers", None)
    api = sys.modules.get("IPython.core.completer")
    if not isinstance(matchers, list) or not hasattr(api, "SimpleCompletion"):
        return  # no shell, or an IPython before 8.6 (no matcher API v2)
    if any(getattr(m, "__name__", "") == _chat_matcher.__name__ for m in matchers):
        return
    matchers.append(_chat_matcher)


def accessor_names(line: str, namespace: dict[str, Any], policy: str) -> tuple[str, list[str]]:
    """The partial name after ``.chat.`` at the end of ``line``, and the accessor's public
    names that start with it; no names when the line does not end so, or what precedes
    ``.chat`` cannot be evaluated under ``policy`` or is not an nbtoolkit accessor."""
    found = _CHAT_ATTRIBUTE.search(line)
    if found is None:
        return "", []
    partial = found["partial"] or ""
    accessor = _evaluate(_expression_before(line[: found.start()]) + ".chat", namespace, policy)
    if accessor is None or not type(accessor).__module__.startswith("nbtoolkit."):
        return partial, []
    names = [n for n in dir(type(accessor)) if not n.startswith("_") and n.startswith(partial)]
    return partial, names


def _expression_before(text: str) -> str:
    """The longest tail of ``text`` that is a Python expression (``x = df["a"]`` -> ``df["a"]``)."""
    for start in range(len(text)):
        tail = text[start:]
        if tail[:1].isspace():
            continue
        try:
            ast.parse(tail, mode="eval")
        except SyntaxError:
            continue
        return tail
    return ""


def _evaluate(expression: str, namespace: dict[str, Any], policy: str) -> Any:
    if expression == ".chat":
        return None
    try:
        from IPython.core.guarded_eval import EvaluationContext, guarded_eval
    except ImportError:  # an IPython without guarded evaluation: offer nothing
        return None
    context = EvaluationContext(
        globals=namespace,
        locals=namespace,
        evaluation=policy,  # type: ignore[arg-type]  # the completer's, as it is set
    )
    try:
        return guarded_eval(expression, context)
    except Exception:  # anything the policy refuses, or a name not defined yet
        return None


def _chat_matcher(context: Any) -> dict[str, Any]:
    """IPython's matcher API v2: completions for ``<expression>.chat.<partial>``."""
    from IPython import get_ipython
    from IPython.core.completer import SimpleCompletion

    shell = get_ipython()
    policy = getattr(getattr(shell, "Completer", None), "evaluation", "limited")
    namespace = getattr(shell, "user_ns", {})
    partial, names = accessor_names(context.text_until_cursor, namespace, policy)
    return {
        "completions": [SimpleCompletion(text=name, type="function") for name in names],
        "matched_fragment": partial,
        "suppress": False,
    }


_chat_matcher.matcher_api_version = 2  # type: ignore[attr-defined]  # IPython's marker
