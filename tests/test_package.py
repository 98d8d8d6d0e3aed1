"""The package installs and runs from a wheel, away from the checkout: the wheel is built from a copy of the
repository, installed with ``--no-deps`` (against this environment's torch, Lightning, ...) into a fresh target folder,
and its ``lightning-ar`` runs ``fit`` on the packaged debug config and the demo, from a folder outside the repository.
Also: every package the code imports is declared in ``pyproject.toml``."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "outputs", "lightning_logs", "__pycache__", "*.egg-info", "build",
                                "dist", ".pytest_cache", ".ruff_cache", ".hypothesis", ".ipynb_checkpoints")
# import name -> distribution name where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "torch_fidelity": "torch-fidelity"}


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = requirement.split("[")[0]
        for sep in "<>=!~; ":
            name = name.split(sep)[0]
        names.add(name.lower().replace("_", "-"))
    return names


def _imported_packages(folder: Path) -> set[str]:
    """Top-level third-party packages imported anywhere under ``folder`` (also inside functions)."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "lightning_ar"}


def test_every_imported_package_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    declared = base | extras["imagenet"]  # torch_fidelity is imported lazily, only for Inception (ImageNet)
    packages = _imported_packages(REPO / "lightning_ar")
    imported = {DISTRIBUTIONS.get(name, name).lower().replace("_", "-") for name in packages}
    assert imported <= declared, f"imported but not declared: {sorted(imported - declared)}"
    assert "torch-fidelity" not in base  # an extra: the digits/gmm path never needs Inception
    assert {"lightning-ar"} <= extras["dev"]  # dev pulls in the other extras (what `make install` gives the tests)
    assert any(r.startswith("lightning-ar[") and "imagenet" in r and "notebooks" in r for r in
               project["optional-dependencies"]["dev"])
    floors = {r.split(">=")[0]: r.split(">=")[1] for r in project["dependencies"] if ">=" in r}
    assert floors["lightning"] == "2.6.0" and floors["torch"] == "2.5"  # EMAWeightAveraging; safe_globals


def _run(args: list[str], env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """A wheel built from a copy of the repository, installed ``--no-deps`` into a fresh target folder."""
    root = tmp_path_factory.mktemp("package")
    source, wheels, target = root / "src", root / "wheels", root / "site"
    shutil.copytree(REPO, source, symlinks=True, ignore=IGNORE)  # the configs link travels as a link
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PIP_NO_INDEX="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels),
          str(source)], env, root)
    wheel, = wheels.glob("lightning_ar-*.whl")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], env, root)
    env["PYTHONPATH"] = str(target)  # this environment's dependencies, the installed lightning_ar
    return target, env, wheel


def test_wheel_holds_the_configs(installed) -> None:
    target, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"lightning_ar/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped <= names and "lightning_ar/configs/digits/mar.yaml" in names
    assert (target / "lightning_ar/configs/debug.yaml").is_file() and not (target / "lightning_ar/configs").is_symlink()


@pytest.mark.slow
def test_installed_copy_fits_the_packaged_debug_config_and_runs_the_demo(installed, tmp_path: Path) -> None:
    target, env, _ = installed
    cli = str(target / "bin" / "lightning-ar")
    where = _run([sys.executable, "-c", "import lightning_ar; print(lightning_ar.__file__)"], env, tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(target)  # not the checkout
    digits = _run([cli, "configs", "digits/mar.yaml"], env, tmp_path).stdout.strip()
    debug = _run([cli, "configs", "debug.yaml"], env, tmp_path).stdout.strip()
    assert Path(debug).is_relative_to(target)
    _run([cli, "fit", "--config", digits, "--config", debug, "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "fit")], env, tmp_path)
    assert list((tmp_path / "fit").rglob("*.ckpt"))
    _run([cli, "demo", "--debug", "--out", str(tmp_path / "demo"), "--trainer.enable_progress_bar=false"], env,
         tmp_path, timeout=600)
    assert "mar + refine=flow" in (tmp_path / "demo" / "results.md").read_text()
