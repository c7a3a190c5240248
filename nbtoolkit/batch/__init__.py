"""Batch APIs as a transport: the engine's endpoints written to a file, submitted, read back.

No pandas here (a script or a Dask partition may use it as it is); the frame's face is
`nbtoolkit.frame._batch`. The modules, bottom up::

    _http       every Batch API call through the engine's client, retries and timeouts
    _provider   one provider's URLs, request lines and result records (OpenAI, Azure)
    _files      custom ids, splitting lines into files, result lines through endpoint.parse
    _plan       rows -> keyed requests, the options, the worst case against the budget
    _job        a submitted job: status, wait, cancel, collect its answers into the cache
    _submit     submit a job, or re-attach to the one already submitted
"""

from nbtoolkit.batch._job import BatchStatus, Job
from nbtoolkit.batch._plan import BatchOptions
from nbtoolkit.batch._provider import (
    AnthropicBatches,
    AzureBatches,
    BatchProvider,
    OpenAIBatches,
    provider_for,
)
from nbtoolkit.batch._submit import submit

__all__ = [
    "AnthropicBatches",
    "AzureBatches",
    "BatchOptions",
    "BatchProvider",
    "BatchStatus",
    "Job",
    "OpenAIBatches",
    "provider_for",
    "submit",
]
