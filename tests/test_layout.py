"""Where things live (issue 24): llama2.py stands alone, dependencies point one way (stage scripts
import shared modules, never each other), and no function outside tests/ is longer than 100
lines. Static checks with ast: nothing is imported or run."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what llama2.py may import: the standard library, torch, numpy, sentencepiece, safetensors and
# the optional compiled kernels; so a student can copy it (with llama2_kernels.py) into a project
MODEL_DEPS = {"torch", "numpy", "sentencepiece", "safetensors", "llama2_kernels", "llama2_C"}
MAX_LINES = 100


def imports(path: Path) -> set[str]:
    """The top-level names of every module `path` imports, at any depth (late imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def source_files() -> list[Path]:
    """Every Python file outside tests/: the repository root, bench/ and scripts/."""
    return sorted([*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py")])


def test_llama2_imports_only_the_stdlib_torch_numpy_sentencepiece_safetensors_and_the_kernels():
    extra = {m for m in imports(ROOT / "llama2.py")
             if m not in sys.stdlib_module_names and m not in MODEL_DEPS and m != "__future__"}
    assert not extra, f"llama2.py imports {sorted(extra)}: it must stand alone"


def test_no_stage_script_imports_another():
    stages = {p.stem for p in ROOT.glob("train_*.py")}
    assert {"train_pretrain", "train_sft", "train_rm", "train_rlhf"} <= stages
    for name in sorted(stages):
        others = imports(ROOT / f"{name}.py") & (stages - {name})
        assert not others, f"{name}.py imports {sorted(others)}: share through a shared module"


def test_shared_modules_do_not_reach_into_scripts_or_ghost_attention():
    # the report reads finished runs; it does not build the pipeline
    assert "pipeline" not in imports(ROOT / "report.py")
    # sampling lives in sampling.py; gatt.py is Ghost Attention's data construction only
    for name in ("evaluate", "train_rm", "train_rlhf", "sampling", "training", "sft_data"):
        assert "gatt" not in imports(ROOT / f"{name}.py"), f"{name}.py imports gatt"
    # no shared module imports a stage script
    stages = {p.stem for p in ROOT.glob("train_*.py")}
    for name in ("training", "sft_data", "sampling", "evaluate", "gatt", "world", "report"):
        assert not imports(ROOT / f"{name}.py") & stages, f"{name}.py imports a stage script"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_100_lines(path):
    long = [f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, f"{path.name}: a function over {MAX_LINES} lines is two ideas: " + "; ".join(long)
