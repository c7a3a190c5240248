"""nbtoolkit: enrich pandas DataFrames with chat-completion calls, from a notebook cell.

Importing it registers the ``df.chat`` and ``series.chat`` accessors::

    import nbtoolkit
    out = df.chat.complete("review", model="gpt-4o-mini", max_parallel=32)
    nbtoolkit.last_run().errors      # why each None is None
"""

from nbtoolkit import accessor as _accessor  # noqa: F401  (registers df.chat / series.chat)
from nbtoolkit._dask import last_dask_run
from nbtoolkit._dask import register as _register_dask
from nbtoolkit.batch import BatchJob, BatchOptions, BatchStatus, batch_jobs
from nbtoolkit.cache import CacheInfo, cache_info, clear_cache
from nbtoolkit.config import ChatConfig, RetryPolicy, Timeouts, configure, get_config
from nbtoolkit.embeddings import to_matrix
from nbtoolkit.engine import ChatRun
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
    ServerError,
    TransportError,
    Truncated,
    UnsendableRow,
)
from nbtoolkit.report import RunReport, last_run
from nbtoolkit.rows import ChatRequest, RowError, RowResult, RunStats

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
