"""``df.chat`` and ``series.chat``: the accessors, made of one mixin per family of methods.

Where each method lives:

    complete, submit_batch           nbtoolkit.frame._chat_methods
    extract, classify                nbtoolkit.frame._typed_methods
    embed                            nbtoolkit.frame._embed_methods
    filter, top_k, aggregate, join   nbtoolkit.frame.semantic._methods

Each method checks its options (`nbtoolkit.frame._options`), builds its requests from the
rows (`nbtoolkit.frame._prompts`) and hands a plan to `nbtoolkit.frame._run`. The
caller's frame is never modified; the accessors keep no state between calls.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from nbtoolkit.core._engine import RunHooks
from nbtoolkit.frame._chat_methods import ChatMethods
from nbtoolkit.frame._completion import register_tab_completion
from nbtoolkit.frame._embed_methods import EmbedMethods
from nbtoolkit.frame._report import RunReport
from nbtoolkit.frame._typed_methods import TypedMethods
from nbtoolkit.frame.semantic._methods import (
    FrameSemanticMethods,
    SemanticMethods,
    operator_blocking,
)


class _ChatAccessorBase(ChatMethods, TypedMethods, EmbedMethods, SemanticMethods):
    """Shared by the DataFrame and Series accessors: every method of both."""

    # The semantic operators (frame/semantic): their sync twins, as for every a... method.
    filter = operator_blocking(SemanticMethods.afilter)
    top_k = operator_blocking(SemanticMethods.atop_k)
    aggregate = operator_blocking(SemanticMethods.aaggregate)


@pd.api.extensions.register_dataframe_accessor("chat")
class ChatAccessor(_ChatAccessorBase, FrameSemanticMethods):
    """``df.chat``: chat completions over the rows of a DataFrame."""

    def __init__(
        self,
        frame: pd.DataFrame,
        *,
        hooks: RunHooks | None = None,
        report_to: Callable[[RunReport], object] | None = None,
    ) -> None:
        self._obj = frame
        self._seams(hooks, report_to)

    def _frame(self) -> pd.DataFrame:
        return self._obj

    def _owner(self) -> object:
        return self._obj

    def _as_series(self) -> bool:
        return False

    def _default_column(self) -> str | None:
        return None

    join = operator_blocking(FrameSemanticMethods.ajoin)


@pd.api.extensions.register_series_accessor("chat")
class SeriesChatAccessor(_ChatAccessorBase):
    """``series.chat``: chat completions over a Series; a Series of answers comes back.

    In a template, the value is ``{value}`` (or ``{<series name>}``).
    """

    def __init__(
        self,
        series: pd.Series,
        *,
        hooks: RunHooks | None = None,
        report_to: Callable[[RunReport], object] | None = None,
    ) -> None:
        self._obj = series
        self._seams(hooks, report_to)

    def _owner(self) -> object:
        return self._obj

    def _frame(self) -> pd.DataFrame:
        frame = self._obj.to_frame(name="value")
        if isinstance(self._obj.name, str) and self._obj.name != "value":
            frame[self._obj.name] = frame["value"]
        return frame

    def _as_series(self) -> bool:
        return True

    def _default_column(self) -> str | None:
        return "value"


# Tab after df["review"].chat. in IPython and Jupyter (see frame/_completion.py).
register_tab_completion()
