"""nbtoolkit: enrich pandas DataFrames with chat-completion calls, from a notebook cell.

Importing it registers the ``df.chat`` and ``series.chat`` accessors::

    import nbtoolkit
    out = df.chat.complete("review", model="gpt-4o-mini", max_parallel=32)
    nbtoolkit.last_run().errors      # why each None is None
"""

from nbtoolkit.config import ChatConfig, RetryPolicy, Timeouts, configure, get_config
from nbtoolkit.core._engine import ChatRun
from nbtoolkit.core._rows import ChatRequest, RowError, RowResult, RunStats
from nbtoolkit.core.store._cache import CacheInfo, cache_info, clear_cache
from nbtoolkit.dask._accessor import last_dask_run
from nbtoolkit.dask._accessor import register as _register_dask
from nbtoolkit.errors import (
    AnswerError,
    APIError,
    AuthError,
    BadRequestError,
    ConfigError,
    IgnoredParameter,
    MalformedResponse,
    NbToolkitError,
    NoText,
    NotFoundError,
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
from nbtoolkit.frame import _accessor as _accessor
from nbtoolkit.frame._batch import BatchJob, BatchOptions, BatchStatus, batch_jobs
from nbtoolkit.frame._report import RunReport, last_run
from nbtoolkit.frame._vectors import to_matrix

__version__ = "0.1.0"

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
    "IgnoredParameter",
    "MalformedResponse",
    "NbToolkitError",
    "NoText",
    "NotFoundError",
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
    "to_matrix",
]
