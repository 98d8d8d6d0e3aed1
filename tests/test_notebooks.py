"""The theory-verification notebooks execute (FAST budgets) with nbclient and produce their figures.

The notebooks are committed with the outputs of a full (non-FAST) run, so that a reader sees the evidence (each under
1 MB, without error outputs). Here each one runs top to bottom in a ``python3`` kernel of this interpreter, with
``LIGHTNING_AR_NOTEBOOK_FAST=1`` (tiny budgets) and ``LIGHTNING_AR_NOTEBOOK_OUT`` pointing at a temporary folder shared
by them (notebook 01 trains the digits generator there; 02 and 03 reuse it when they run after it, and train it
themselves otherwise). Together they take a few minutes on two CPU cores: marked ``slow``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run in; a dev dependency, never skipped)
import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
KERNEL = "python3"
MAX_EXECUTED_BYTES = 300_000
MAX_COMMITTED_BYTES = 1_000_000
COMMITTED_EXECUTED = {"01", "02", "03", "04", "05"}  # committed with a full run's outputs (04, 05 read JSON)


def _ensure_kernelspec() -> None:
    """Make the ``python3`` kernel resolvable: install ipykernel's spec into this environment if none is found.

    Idempotent: nothing is written when a ``python3`` spec already resolves (jupyter_client also falls back to
    ipykernel's built-in spec for this interpreter when ipykernel is importable).
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(user=False, prefix=sys.prefix, kernel_name=KERNEL)


def _execute(nb, cwd: Path) -> None:
    _ensure_kernelspec()
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}})
    client.execute()


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


@pytest.fixture(scope="module")
def notebook_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder shared by the notebooks of this module (cached generator checkpoint, figures)."""
    return tmp_path_factory.mktemp("notebooks_out")


def test_notebooks_exist_and_are_committed_small_and_without_errors() -> None:
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"], NOTEBOOKS
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert path.stat().st_size < MAX_COMMITTED_BYTES, f"{path.name} is {path.stat().st_size} bytes"
        errors = [out for out in _outputs(nb) if out.get("output_type") == "error"]
        assert not errors, f"{path.name} is committed with an error output: {errors[0].get('ename')}"


def test_executed_notebooks_are_committed_with_their_outputs() -> None:
    """Notebooks whose evidence a reader should see without running them are committed executed, and small."""
    for path in NOTEBOOKS:
        if path.name[:2] not in COMMITTED_EXECUTED:
            continue
        nb = nbformat.read(path, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert all(cell.get("execution_count") for cell in code), f"{path.name} is not fully executed"
        assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"], path.name
        assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), path.name
        assert path.stat().st_size < MAX_EXECUTED_BYTES, f"{path.name} is {path.stat().st_size} bytes"


def test_kernel_runs_this_interpreter(tmp_path: Path) -> None:
    """``python3`` resolves to a kernel of this environment (same ``sys.prefix``), so it sees ``lightning_ar``."""
    source = "import json, sys\nimport lightning_ar\nprint('KERNEL=' + json.dumps([sys.prefix, lightning_ar.__file__]))"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    _execute(nb, tmp_path)
    text = "".join(out.get("text", "") for out in _outputs(nb) if out.get("name") == "stdout")
    line = next((ln for ln in text.splitlines() if ln.startswith("KERNEL=")), None)
    assert line is not None, f"unexpected kernel output: {_outputs(nb)}"
    prefix, package = json.loads(line[len("KERNEL=") :])
    assert Path(prefix).resolve() == Path(sys.prefix).resolve(), f"kernel runs {prefix}, tests run {sys.prefix}"
    assert Path(package).resolve().is_relative_to(REPO)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_in_fast_mode(path: Path, notebook_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_AR_NOTEBOOK_FAST", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("LIGHTNING_AR_NOTEBOOK_OUT", str(notebook_out))
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    try:
        _execute(nb, REPO)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s in FAST mode")

    outputs = _outputs(nb)
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{path.name} produced no image/png output"
    prefix = path.name[:2]
    assert sorted(notebook_out.glob(f"{prefix}_*.png")), f"{path.name} wrote no {prefix}_*.png to the output folder"
    size = len(json.dumps(nbformat.from_dict(nb)))
    assert size < MAX_EXECUTED_BYTES, f"{path.name} with outputs is {size} bytes (limit {MAX_EXECUTED_BYTES})"
