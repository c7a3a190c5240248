"""``python -m benchmarks.import_cost [--repeat N]``: what ``import nbtoolkit`` adds to pandas.

Fresh interpreters, interleaved (``import pandas``, then ``import pandas, nbtoolkit``, then
again), so a slow moment on a shared machine lands on both. Each process times its own
imports (``time.perf_counter`` around them; the interpreter's start is the same for both and
left out), with bytecode caching on as in any install, and says whether Dask, distributed,
jsonschema, pydantic, aiohttp or a model runtime got imported. Prints the medians and their
ratio; the target (issue #20) is at most 1.5 x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks.harness import ROOT

HEAVY = ("dask", "distributed", "jsonschema", "pydantic", "xllamacpp", "IPython", "aiohttp")
_CHILD = """\
import json, sys, time
started = time.perf_counter()
{imports}
seconds = time.perf_counter() - started
print(json.dumps([seconds, sorted(m for m in {heavy!r} if m in sys.modules)]))
"""


def one(imports: str) -> tuple[float, list[str]]:
    """Seconds a fresh interpreter spends on ``imports``, and the heavy modules it loaded."""
    # Bytecode written and reused, as in a user's install (pandas' is compiled at install;
    # with PYTHONDONTWRITEBYTECODE set, every process would compile nbtoolkit's 80 modules).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    code = _CHILD.format(imports=imports, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    seconds, loaded = json.loads(done.stdout.splitlines()[-1])
    return float(seconds), list(loaded)


def main() -> int:
    """Measure and print."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_cost", description=__doc__)
    parser.add_argument("--repeat", type=int, default=15, help="processes of each (default 15)")
    args = parser.parse_args()
    one("import pandas, nbtoolkit")  # warm the file cache and the .pyc files
    alone: list[float] = []
    both: list[float] = []
    loaded: set[str] = set()
    for _ in range(args.repeat):
        alone.append(one("import pandas")[0])
        seconds, heavy = one("import pandas, nbtoolkit")
        both.append(seconds)
        loaded.update(heavy)
    pandas_s, both_s = statistics.median(alone), statistics.median(both)
    print(
        f"import pandas: {pandas_s:.3f} s; import pandas, nbtoolkit: {both_s:.3f} s "
        f"({both_s / pandas_s:.2f} x; medians of {args.repeat} interleaved fresh processes, "
        f"load average {os.getloadavg()[0]:.1f}); heavy modules imported: "
        f"{', '.join(sorted(loaded)) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
