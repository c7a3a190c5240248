"""The exceptions nbtoolkit raises.

::

    NbToolkitError
    ├── ConfigError(NbToolkitError, ValueError)   bad arguments, missing column, model or URL
    ├── APIError                .status, .body (never the key)
    │   ├── RateLimitError      429; .retry_after in seconds, when the server said
    │   ├── ServerError         5xx, 408, 409
    │   ├── AuthError           401 / 403: a bad or missing key; stops the run
    │   ├── NotFoundError       404: wrong base URL or model; stops the run
    │   ├── QuotaExhausted      out of credit, said other than as a 429 (Anthropic's 400); stops it
    │   └── BadRequestError     other 4xx, never retried
    │       └── SchemaRefused   the provider refuses the schema itself (a keyword); stops it
    ├── TransportError          connection refused/reset, timeouts (raised from the aiohttp error)
    │   └── RequestTimeout      the connect or total timeout ran out
    ├── MalformedResponse       a 200 whose body is not a chat completion (retried)
    ├── AnswerError             a 200 that is the row's outcome: sent once, billed once
    │   ├── NoText              no text came back (content null, a tool call)
    │   ├── Refused             the model refused (``message.refusal``)
    │   ├── Truncated           cut at max_tokens where a whole answer was needed
    │   └── SchemaError         the answer does not fit the schema, after every re-ask
    ├── UnsendableRow           a row that cannot be encoded as JSON (a lone surrogate)
    ├── IgnoredParameter        the server ignored what the run asked (dimensions=); stops it
    └── RunAborted              a systemic failure stopped the run; .partial keeps what finished

    RunInterrupted(KeyboardInterrupt)   Ctrl-C or the stop button; .partial keeps what finished
    ImportInterrupted(KeyboardInterrupt)  Ctrl-C or the stop button during ``import nbtoolkit``

Row-level failures (everything but the last two) never escape a run: the row comes back as
None and the exception is summarised in the run report. Only `RunAborted` and
`RunInterrupted` reach the caller, and both carry the partial result.

In IPython (a notebook, the terminal) `ConfigError`, `RunAborted` and `RunInterrupted` show as
one line through `_render_traceback_`: the traceback would show only nbtoolkit's and asyncio's
internals (an interrupt lands in a selector deep in the event loop), never the user's mistake.
"""

from __future__ import annotations

from typing import Any

_ROWS_ARE_KEPT = (
    "The finished rows are in nbtoolkit.last_run().output (and in this exception's .partial)."
)


def _one_line(exc: BaseException) -> list[str]:
    """What IPython shows for ``exc``: its class name and message, and where its rows are."""
    message = str(exc)
    if getattr(exc, "partial", None) is not None and "last_run()" not in message:
        message = f"{message} {_ROWS_ARE_KEPT}"
    return [f"{type(exc).__name__}: {message}"]


class NbToolkitError(Exception):
    """Base class of every nbtoolkit error."""


class ConfigError(NbToolkitError, ValueError):
    """Bad arguments: a missing column, an unknown template field, a missing model, ..."""

    def _render_traceback_(self) -> list[str]:
        return _one_line(self)


class APIError(NbToolkitError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, *, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        # The response body, cut short; the client has scrubbed the key from it.
        self.body = body[:2000]
        self.limits: Any = None  # the reply's x-ratelimit-* headers (a limits.ServerLimits)


class RateLimitError(APIError):
    """429 Too Many Requests."""

    def __init__(
        self, message: str, *, status: int = 429, body: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx, 408 or 409: the server's trouble, worth another try."""

    def __init__(
        self, message: str, *, status: int, body: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class AuthError(APIError):
    """401 or 403: the key is missing, wrong, or not allowed this model."""


class NotFoundError(APIError):
    """404: the base URL or the model name is wrong."""


class QuotaExhausted(APIError):
    """The account is out of credit, said as a refusal rather than a 429 (Anthropic answers
    "Your credit balance is too low" with a 400): no retry and no other row can succeed."""


class BadRequestError(APIError):
    """Any other 4xx: this request is wrong and will stay wrong; never retried."""


class SchemaRefused(BadRequestError):
    """The provider refuses the JSON Schema itself (a keyword it does not take), not JSON mode.

    Every row carries the same schema, so the run stops. ``keyword`` is the schema keyword
    the provider named, when it named one.
    """

    def __init__(self, message: str, *, status: int, body: str = "", keyword: str | None) -> None:
        super().__init__(message, status=status, body=body)
        self.keyword = keyword


class TransportError(NbToolkitError):
    """The request never got a complete HTTP answer: refused, reset, or cut."""

    def __init__(self, message: str, *, elapsed: float = 0.0) -> None:
        super().__init__(message)
        self.elapsed = elapsed  # seconds the failed attempt took (a timeout: all of it)


class RequestTimeout(TransportError):
    """The connect or total timeout ran out."""


class MalformedResponse(NbToolkitError):
    """A 200 reply whose body is not a chat completion (bad JSON, no choices, no content)."""


class RunAborted(NbToolkitError):
    """A systemic failure (bad key, wrong URL or model) stopped the whole run.

    Attributes:
        partial: what finished before the stop: for the DataFrame accessor the output frame
            with None in every row that did not finish; for the engine the list of results.
        cause: the row error that showed the failure is systemic.
    """

    def __init__(self, message: str, *, partial: Any = None, cause: BaseException | None = None):
        super().__init__(message)
        self.partial = partial
        self.cause = cause

    def _render_traceback_(self) -> list[str]:
        return _one_line(self)


class ImportInterrupted(KeyboardInterrupt):
    """Ctrl-C or the stop button while ``import nbtoolkit`` ran: import it again.

    The interrupt lands wherever the import is (pandas, aiohttp, importlib's frames); its
    traceback says nothing the user can act on, so IPython shows this one line instead.
    """

    def _render_traceback_(self) -> list[str]:
        return _one_line(self)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or the notebook's stop button ended a run early.

    A KeyboardInterrupt, so it stops a script and a cell as an interrupt should; it carries
    what had finished in ``partial`` (the same value ``nbtoolkit.last_run().output`` holds).
    """

    def __init__(self, message: str, *, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial

    def _render_traceback_(self) -> list[str]:
        return _one_line(self)


class AnswerError(NbToolkitError):
    """A complete reply whose answer is unusable for this row; sending it again would not help."""


class NoText(AnswerError):
    """The reply carried no text: ``content`` null, or a tool call instead of an answer."""


class Refused(AnswerError):
    """The model refused to answer (the reply's ``message.refusal``)."""


class Truncated(AnswerError):
    """The answer was cut off at ``max_tokens`` (``finish_reason: "length"``)."""


class SchemaError(AnswerError):
    """The answer does not match the requested schema, even after asking the model to fix it."""


class UnsendableRow(NbToolkitError):
    """A row whose request cannot be encoded (a lone surrogate in its text, say)."""


class IgnoredParameter(NbToolkitError):
    """The server answered, but not what was asked: vectors of another length than
    ``dimensions=``. Every row would get the same, so the run stops (nothing is cached)."""
