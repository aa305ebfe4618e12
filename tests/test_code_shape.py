"""Shape rules a newcomer relies on (issue 27): no function over ~60 lines without a reason written
next to it, and the training loop's helpers take their settings by keyword."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
REASON = "Over 60 lines for a reason:"
# Modules held to the rule; add a module here once it meets it.
MODULES = ["matryoshka_plugin/training.py"]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _start(node: ast.AST) -> int:
    return min([node.lineno] + [d.lineno for d in node.decorator_list])


@pytest.mark.parametrize("module", MODULES)
def test_no_long_function_without_a_reason(module):
    lines = (ROOT / module).read_text().splitlines()
    too_long = []
    for fn in _functions(ast.parse("\n".join(lines))):
        start = _start(fn)
        n = fn.end_lineno - start + 1
        above = "\n".join(lines[max(0, start - 4) : start - 1])
        if n > MAX_LINES and REASON not in above:
            too_long.append(f"{fn.name} ({n} lines, line {start})")
    assert not too_long, f"{module}: over {MAX_LINES} lines with no '{REASON}' comment above: {too_long}"


def test_training_helpers_take_keywords():
    """Beyond the subject (the run, the context), every private function of training.py takes its
    settings by keyword: no call reads as a row of positional values."""
    tree = ast.parse((ROOT / "matryoshka_plugin/training.py").read_text())
    positional = []
    for fn in tree.body:  # module-level functions only: methods and trainSAE's own signature differ
        if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("_") or fn.name.startswith("__"):
            continue
        if len(fn.args.posonlyargs) + len(fn.args.args) > 2:
            positional.append(f"{fn.name}({', '.join(a.arg for a in fn.args.args)})")
    assert not positional, f"private functions with more than two positional parameters: {positional}"
