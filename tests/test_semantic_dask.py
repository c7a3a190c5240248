"""ddf.chat.filter on Dask's threaded scheduler: every partition's rows right, one limit for the
whole computation; the whole-frame operators say what to do instead."""

from __future__ import annotations

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.testing import ChatServer, SemanticRules
from tests.conftest import MODEL

dd = pytest.importorskip("dask.dataframe")
pytest.importorskip("distributed")

MARK = "<match>"


def test_filter_per_partition_keeps_the_yes_rows_in_order_under_one_limit() -> None:
    """400 rows in 8 partitions on 8 threads: the yes rows, in order; <= 6 in flight in all."""
    df = pd.DataFrame({"q": [f"row {i} {MARK if i % 3 == 0 else ''}" for i in range(400)]})
    with ChatServer(latency=0.02, semantic=SemanticRules(marker=MARK)).run_in_thread() as server:
        mine = df.head(3).chat.filter("{q}", model=MODEL, base_url=server.base_url, cache=False)
        report = nbtoolkit.last_run()
        out = dd.from_pandas(df, npartitions=8, sort=True).chat.filter(
            "{q}", model=MODEL, base_url=server.base_url, max_parallel=6, cache=False
        )
        result = out.compute(scheduler="threads", num_workers=8)
    assert server.peak_in_flight <= 6
    expected = df[df["q"].str.contains(MARK, regex=False)]
    assert list(result.index) == list(expected.index)  # Dask's own string dtype aside
    assert list(result["q"]) == list(expected["q"])
    assert list(mine.index) == [0]
    assert nbtoolkit.last_run() is report  # the partitions' runs are not the user's last run
    dask_report = nbtoolkit.last_dask_run()
    assert dask_report is not None and dask_report.rows == {"ok": 400}


def test_the_cascade_and_whole_frame_operators_are_refused_while_building() -> None:
    """cheap_model=, top_k, aggregate and join on Dask: a ConfigError that says what to do."""
    ddf = dd.from_pandas(pd.DataFrame({"q": ["a", "b"]}), npartitions=1)
    with pytest.raises(nbtoolkit.ConfigError, match="leave cheap_model out on Dask"):
        ddf.chat.filter("{q}", model=MODEL, cheap_model="small")
    for method in ("top_k", "aggregate", "join"):
        with pytest.raises(nbtoolkit.ConfigError, match=rf"ddf.compute\(\).chat.{method}"):
            getattr(ddf.chat, method)("{q}")
