"""The library's shape: small modules and functions, no printing outside the CLI, no private names imported
across modules, the transforms independent of the model."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "plrd_jax"
MODULES = sorted(ROOT.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_modules_and_functions_are_small():
    too_long = [f"{p.relative_to(ROOT)}: {n} lines" for p in MODULES
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, too_long


def test_only_the_cli_prints():
    printing = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in MODULES if "cli" not in p.parts
                for node in ast.walk(_tree(p))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert not printing, printing


def test_no_private_name_is_imported_across_modules():
    private = [f"{p.relative_to(ROOT)}:{node.lineno} {alias.name} from {node.module}" for p in MODULES
               for node in ast.walk(_tree(p)) if isinstance(node, ast.ImportFrom) and node.module
               and node.module.startswith("plrd_jax") for alias in node.names if alias.name.startswith("_")]
    assert not private, private


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "transforms").glob("*.py")
                                          if p.name not in ("calibrate.py", "sequential.py")))
def test_transforms_do_not_import_the_model(module):
    """Transforms are functions of param trees; only calibration (which runs the model) may import it."""
    imports = [node.module for node in ast.walk(_tree(ROOT / "transforms" / module))
               if isinstance(node, ast.ImportFrom) and node.module]
    assert "plrd_jax.nn.model" not in imports
