"""Each stage in dvc.yaml depends on exactly the code it runs: its module and every module of
the package that module imports, directly or through others. A missing dep lets `dvc repro`
skip a stage whose code changed; an extra one reruns stages for nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PACKAGE = "softmaxlab"
SRC = ROOT / "src"


def _file_of(module: str) -> Path:
    """The file that defines `module`: a module's .py, or a package's __init__.py."""
    package = SRC / Path(*module.split("."))
    return package / "__init__.py" if package.is_dir() else package.with_suffix(".py")


def _imported(module: str) -> set[str]:
    """Modules of the package that `module` imports anywhere (top level or inside a function:
    a stage runs those too)."""
    path = _file_of(module)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            for a in node.names:  # `from softmaxlab import io`: a module, not a name
                if (SRC / Path(*node.module.split("."), a.name).with_suffix(".py")).is_file():
                    found.add(f"{node.module}.{a.name}")
    return {m for m in found if m != PACKAGE}


def code_of(module: str) -> set[str]:
    """The package's files that `python -m <module>` executes: the module, transitively what it
    imports, and the __init__ of every package on the way (importing softmaxlab.core.io runs
    softmaxlab/__init__.py and softmaxlab/core/__init__.py first)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _imported(m)
    parts = {".".join(m.split(".")[:i]) for m in seen for i in range(1, m.count(".") + 2)}
    return {str(_file_of(m).relative_to(ROOT)) for m in parts}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(stages()))
def test_stage_depends_on_exactly_the_code_it_runs(stage):
    spec = stages()[stage]
    module = re.fullmatch(r"python -m (\S+)", spec["cmd"]).group(1)
    listed = {d for d in spec["deps"] if d.startswith("src/")}
    needed = code_of(module)
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r} ({module}): add to its deps {missing}, remove {extra}"
    )


def test_the_import_walk_sees_function_level_and_from_package_imports():
    # report imports plots only inside a function, and `from softmaxlab import evaluate`.
    files = code_of("softmaxlab.stages.report")
    assert {
        "src/softmaxlab/stages/plots.py",
        "src/softmaxlab/stages/evaluate.py",
        "src/softmaxlab/core/calibration.py",
    } <= files
    assert "src/softmaxlab/stages/train.py" not in files
