"""The engine, with no pandas: rows in, row results out.

Layers, lowest first (import-linter keeps the arrows pointing down; see pyproject.toml):

- ``_rows``: what a request and its result are; ``_runner``: sync <-> async, interrupts;
- ``_client`` and ``_limits``: one HTTP exchange, error mapping, redaction, every rate-header
  family; ``_retry``, ``_breaker``, ``_budget``: when to try again, when to stop, when to spend;
- ``endpoints/``: how rows become a request body and a reply becomes row results;
- ``store/``: the response cache, its vectors file and the batch-job records;
- ``_engine``: the bounded queue of workers that runs any endpoint over any rows.

A partition of a distributed frame calls the engine as it is: nothing here knows pandas.

State that outlives a run is kept on purpose, each piece with its scope said where it lives:
what a server taught the process (`endpoints._structured.LEARNED_SHAPES`: the
structured-output shape per (URL, model), cleared by ``forget_learned_shapes``), what a
local server on a port serves (``store._cache.register_local_server``, while it runs), the
event loops made re-entrant (``_runner``, held weakly) and a stop pressed between cells
(``_kernel_stops``). Everything else a run learns (rate limits, a server's inputs per
request, the budget) lives on its `_engine.ChatRun` and goes with it.
"""
