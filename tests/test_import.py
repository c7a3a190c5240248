"""What ``import nbtoolkit`` costs: no Dask, no validator, no model runtime until a call needs them.

Each test runs a fresh interpreter (``sys.modules`` of this one holds everything the suite
imported), and the notebook-facing one a real Jupyter kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
# Heavy, and needed only by some calls: none may be imported by `import nbtoolkit`.
DEFERRED = (
    "distributed",
    "dask",
    "jsonschema",
    "rfc3987_syntax",
    "pydantic",
    "xllamacpp",
    "IPython",
    "aiohttp",
)


def fresh_python(code: str) -> Any:
    """Run ``code`` in a new interpreter (this worktree's nbtoolkit); its last line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def loaded(*names: str) -> str:
    """Code printing which of ``names`` (top-level packages) are in sys.modules, as JSON."""
    return (
        "import json, sys\n"
        f"print(json.dumps(sorted(n for n in {list(names)!r} if n in sys.modules)))\n"
    )


def test_import_nbtoolkit_loads_no_dask_validator_or_model_runtime() -> None:
    """After `import nbtoolkit`: no dask, distributed, jsonschema, pydantic, aiohttp, xllamacpp."""
    assert fresh_python("import nbtoolkit\n" + loaded(*DEFERRED)) == []


def test_importing_dask_dataframe_afterwards_registers_ddf_chat() -> None:
    """`import dask.dataframe` after nbtoolkit gives ddf.chat, and last_dask_run is there."""
    pytest.importorskip("dask.dataframe", reason="the dask extra is not installed")
    code = (
        "import nbtoolkit, pandas as pd\n"
        "import dask.dataframe as dd\n"
        "ddf = dd.from_pandas(pd.DataFrame({'a': ['x']}), npartitions=1)\n"
        "from nbtoolkit.dask._accessor import DaskChatAccessor\n"
        "assert isinstance(ddf.chat, DaskChatAccessor), type(ddf.chat)\n"
        "assert isinstance(ddf['a'].chat, DaskChatAccessor)\n"
        "assert nbtoolkit.last_dask_run() is None\n" + loaded("dask")
    )
    assert fresh_python(code) == ["dask"]


def test_a_json_schema_dict_imports_jsonschema_without_its_slow_format_module() -> None:
    """Validating a JSON Schema dict imports jsonschema, not rfc3987_syntax; iri still checks."""
    pytest.importorskip("rfc3987_syntax", reason="rfc3987_syntax (JupyterLab's) not installed")
    code = (
        "import json, sys\n"
        "import nbtoolkit\n"
        "from nbtoolkit.core.endpoints._schema import normalise\n"
        "schema = normalise({'type': 'object', 'properties': {'a': {'type': 'string'}}})\n"
        "after_schema = sorted(n for n in ('jsonschema', 'rfc3987_syntax') if n in sys.modules)\n"
        "import jsonschema\n"
        "checker = jsonschema.FormatChecker()\n"
        "iri = [checker.conforms('https://example.org/a', 'iri'), checker.conforms('::', 'iri')]\n"
        "print(json.dumps([after_schema, iri, 'rfc3987_syntax' in sys.modules]))\n"
    )
    after_schema, iri, slow_loaded_by_the_check = fresh_python(code)
    assert after_schema == ["jsonschema"]
    assert iri == [True, False]  # the format check works: it imported the module when called
    assert slow_loaded_by_the_check


def test_a_pydantic_model_schema_still_works_without_importing_pydantic_first() -> None:
    """A field -> type mapping imports pydantic when normalised; a model class is recognised."""
    code = (
        "import json, sys\n"
        "import nbtoolkit\n"
        "from nbtoolkit.core.endpoints._schema import normalise\n"
        "before = 'pydantic' in sys.modules\n"
        "by_types = normalise({'stars': int})\n"
        "import pydantic\n"
        "class Review(pydantic.BaseModel):\n"
        "    stars: int\n"
        "by_model = normalise(Review)\n"
        "print(json.dumps([before, by_types.strict, by_model.check('{\"stars\": 3}')]))\n"
    )
    before, by_types, checked = fresh_python(code)
    assert before is False
    assert by_types["properties"]["stars"]["type"] == "integer"
    assert checked == {"stars": 3}


# Makes the stop land half-way through `import nbtoolkit`, as a user's Ctrl-C or the stop
# button would: the first time the engine module is looked for, KeyboardInterrupt.
_STOP_IN_IMPORT = """\
import sys

class StopHere:
    def find_spec(self, name, path=None, target=None):
        if name == "nbtoolkit.core._engine":
            sys.meta_path.remove(self)
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, StopHere())
"""


def test_a_stop_during_import_shows_one_line_in_a_kernel_and_the_next_import_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted `import nbtoolkit` in a kernel: a one-line error; importing again succeeds."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(_STOP_IN_IMPORT),
        nbformat.v4.new_code_cell("import nbtoolkit"),
        nbformat.v4.new_code_cell("import nbtoolkit\nprint(nbtoolkit.ChatRun.__name__)"),
    ]
    # The kernel inherits this process's environment when nbclient starts it.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *sys.path]))
    client = NotebookClient(
        nb,
        timeout=90,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    stopped = nb.cells[1].outputs
    assert [out["output_type"] for out in stopped] == ["error"]
    assert stopped[0]["ename"] == "ImportInterrupted"
    assert stopped[0]["traceback"] == [
        "ImportInterrupted: import nbtoolkit was interrupted before it finished; "
        "run the import again"
    ]
    assert nb.cells[2].outputs[0]["text"] == "ChatRun\n"


def test_a_stop_during_import_in_a_script_ends_in_one_kind_of_error() -> None:
    """In a plain interpreter the interrupted import raises ImportInterrupted, a KeyboardInterrupt,
    with no chained traceback of the modules it was importing."""
    code = (
        _STOP_IN_IMPORT + "import json\n"
        "try:\n"
        "    import nbtoolkit\n"
        "except KeyboardInterrupt as exc:\n"
        "    print(json.dumps([type(exc).__name__, exc.__cause__ is None,"
        " exc.__suppress_context__]))\n"
    )
    assert fresh_python(code) == ["ImportInterrupted", True, True]
