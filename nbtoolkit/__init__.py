"""nbtoolkit: enrich pandas DataFrames with chat-completion calls, from a notebook cell.

Importing it registers the ``df.chat`` and ``series.chat`` accessors::

    import nbtoolkit
    out = df.chat.complete("review", model="gpt-4o-mini", max_parallel=32)
    nbtoolkit.last_run().errors      # why each None is None
    df.chat.complete("review", model="gpt-4o-mini", dry_run=True, pilot=20)  # the bill first
"""

from typing import TYPE_CHECKING, Any

from nbtoolkit.errors import (
    AnswerError,
    APIError,
    AuthError,
    BadRequestError,
    ConfigError,
    IgnoredParameter,
    ImportInterrupted,
    MalformedResponse,
    NbToolkitError,
    NoText,
    NotFoundError,
    QuotaExhausted,
    RateLimitError,
    Refused,
    RequestTimeout,
    RunAborted,
    RunInterrupted,
    SchemaError,
    SchemaRefused,
    ServerError,
    TransportError,
    Truncated,
    UnsendableRow,
)

# A stop pressed while the rest imports (a few seconds in a busy kernel) would show the
# frames of every module on the way (pandas, aiohttp, importlib): one line says what to do.
try:
    from nbtoolkit.config import ChatConfig, RetryPolicy, Timeouts, configure, get_config
    from nbtoolkit.core._engine import ChatRun
    from nbtoolkit.core._pricing import Price, price_table
    from nbtoolkit.core._rows import ChatRequest, RowError, RowResult, RunStats
    from nbtoolkit.core.store._cache import CacheInfo, cache_info, clear_cache
    from nbtoolkit.dask._hook import register as _register_dask
    from nbtoolkit.frame import _accessor as _accessor
    from nbtoolkit.frame._batch import BatchJob, BatchOptions, BatchStatus, batch_jobs
    from nbtoolkit.frame._estimate import CostEstimate
    from nbtoolkit.frame._report import RunReport, last_run
    from nbtoolkit.frame._vectors import to_matrix
except KeyboardInterrupt:
    raise ImportInterrupted(
        "import nbtoolkit was interrupted before it finished; run the import again"
    ) from None

__version__ = "0.1.0"

if TYPE_CHECKING:
    from nbtoolkit.dask._report import last_dask_run


def __getattr__(name: str) -> Any:
    """`last_dask_run`, imported on first use: the Dask side loads only when it is needed."""
    if name == "last_dask_run":
        from nbtoolkit.dask._report import last_dask_run

        return last_dask_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_dask()  # ddf.chat, once dask.dataframe is imported (if it is installed)

__all__ = [
    "APIError",
    "AnswerError",
    "AuthError",
    "BadRequestError",
    "BatchJob",
    "BatchOptions",
    "BatchStatus",
    "CacheInfo",
    "ChatConfig",
    "ChatRequest",
    "ChatRun",
    "ConfigError",
    "CostEstimate",
    "IgnoredParameter",
    "ImportInterrupted",
    "MalformedResponse",
    "NbToolkitError",
    "NoText",
    "NotFoundError",
    "Price",
    "QuotaExhausted",
    "RateLimitError",
    "Refused",
    "RequestTimeout",
    "RetryPolicy",
    "RowError",
    "RowResult",
    "RunAborted",
    "RunInterrupted",
    "RunReport",
    "RunStats",
    "SchemaError",
    "SchemaRefused",
    "ServerError",
    "Timeouts",
    "TransportError",
    "Truncated",
    "UnsendableRow",
    "batch_jobs",
    "cache_info",
    "clear_cache",
    "configure",
    "get_config",
    "last_dask_run",
    "last_run",
    "price_table",
    "to_matrix",
]
