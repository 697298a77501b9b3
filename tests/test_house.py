"""The house as DESIGN.md draws it, read from the code: no import circle, arrows down the data flow, and the
size budgets (lines a module, a function, characters a line) with their short list of allowances."""

import ast
import functools
from pathlib import Path

import pytest

import chatmask

PKG = Path(chatmask.__file__).parent


def _graph() -> dict[str, set[str]]:
    """module -> the chatmask modules it imports (at top level or inside functions)."""
    g = {}
    for f in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatmask."):
                deps.add(node.module.split(".")[1])
        g[f.stem] = deps - {f.stem}
    return g


def test_graph_is_read():
    g = _graph()
    assert "labels" in g["prepare"] and "errors" in g["labels"]  # the reader sees both import styles' targets


def test_no_import_circle():
    g, state = _graph(), {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(g):
        visit(m, [])


def test_arrows_point_down_the_data_flow():
    g = _graph()
    # nothing but the command line imports the experiment or the training loop (configs live in config.py)
    assert {m for m, d in g.items() if "train" in d} <= {"cli", "compare"}
    assert {m for m, d in g.items() if "compare" in d} == {"cli"}
    # prepared data needs a tokenizer, never a model; reading rows needs nothing from the labelling engine
    engine = ("labels", "spans", "tokens", "markers", "sentinels", "truncation", "template_checks")
    for m in ("prepare", "audit", "view", "conversations", "sources", "hub", *engine):
        assert "models" not in g[m] and "train" not in g[m], m
    assert not g["conversations"] & {*engine, "prepare", "audit"}
    assert {m for m, d in g.items() if "cli" in d} <= {"__main__"}  # nothing imports the command line
    assert g["errors"] == set()
    # talking to a model and scoring it both generate through generation.py; neither uses the other
    assert "metrics" not in g["chat"] and "chat" not in g["metrics"] and "generation" in g["chat"] & g["metrics"]


def test_import_from_the_folder_that_holds_a_clone_named_chatmask(tmp_path):
    """A user clones into chatmask/ and runs the README's Python example from the folder above: the clone
    (no __init__.py) must not shadow the installed package as a namespace package."""
    import subprocess
    import sys

    (tmp_path / "chatmask" / "src").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", "import chatmask; print(chatmask.encode.__name__)"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "encode", r.stderr


# ---------------------------------------------------------------- budgets

ROOT = Path(__file__).resolve().parents[1]
MODULE_LINES, FUNCTION_LINES, LINE_LENGTH = 400, 60, 120  # LINE_LENGTH is also [tool.ruff] line-length
BUDGETED = (PKG, ROOT / "bench")  # the library and its benchmarks; test modules get the function budget only

# Exceptions to the size budgets, "module" or "module.function" (methods "module.Class.method") -> why it
# may be longer, e.g. "cli.build_parser": "one add_argument a flag". An entry that nothing needs any more
# fails test_no_stale_allowance, so the list only shrinks. A line that must pass LINE_LENGTH (a URL) says
# so itself, with a noqa comment for E501.
ALLOWANCE: dict[str, str] = {}


def _functions(tree, prefix):
    """(qualified name, lines from the def line to the last line, decorators excluded) of every function and
    method in `tree`, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}.{node.name}", node.end_lineno - node.lineno + 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _functions(node, f"{prefix}.{node.name}")


def over_budget(folder: Path, modules: bool = True) -> dict[str, int]:
    """name -> lines of every module (when `modules`) and function in `folder` past its budget."""
    over = {}
    for f in sorted(folder.glob("*.py")):
        text = f.read_text(encoding="utf-8")
        if modules and len(text.splitlines()) > MODULE_LINES:
            over[f.stem] = len(text.splitlines())
        over |= {name: n for name, n in _functions(ast.parse(text), f.stem) if n > FUNCTION_LINES}
    return over


def long_lines(*paths: Path, cwd: Path = ROOT) -> dict[str, list[int]]:
    """file (relative to `cwd`) -> its line numbers past LINE_LENGTH, as ruff counts them (E501)."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--quiet", "--select", "E501", "--line-length",
           str(LINE_LENGTH), "--output-format", "json", "--exit-zero", *map(str, paths)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found = {}
    for hit in json.loads(r.stdout or "[]"):
        found.setdefault(Path(hit["filename"]).resolve().relative_to(cwd.resolve()).as_posix(), []).append(
            hit["location"]["row"])
    return found


def _needs_ruff():
    import importlib.util

    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it): line lengths not checked")


@functools.cache
def _house_over_budget() -> dict[str, int]:
    over = {name: n for folder in BUDGETED for name, n in over_budget(folder).items()}
    return over | over_budget(ROOT / "tests", modules=False)


def test_modules_and_functions_keep_their_budgets():
    over = {name: n for name, n in _house_over_budget().items() if name not in ALLOWANCE}
    assert not over, (f"past the budget ({MODULE_LINES} lines a module, {FUNCTION_LINES} a function): {over}; "
                      "split it, or add an entry with its reason to ALLOWANCE in tests/test_house.py")


def test_no_stale_allowance():
    stale = set(ALLOWANCE) - set(_house_over_budget())
    assert not stale, f"within budget now: remove {sorted(stale)} from ALLOWANCE in tests/test_house.py"


def test_lines_keep_the_length():
    _needs_ruff()
    found = long_lines(ROOT / "src", ROOT / "tests", ROOT / "bench")
    assert not found, f"lines over {LINE_LENGTH} characters (file -> line numbers): {found}"


def test_the_budget_checks_see_what_they_check(tmp_path):
    """Each check run on planted offenders: a function one line too long (and a method), a module one line too
    long, a line one character too long; and what sits just inside each budget passes."""
    body = "".join(f"    x{k} = {k}\n" for k in range(FUNCTION_LINES - 1))  # with its def: a function at the budget
    method = body.replace("    ", "        ")
    (tmp_path / "long.py").write_text(f"def f():\n{body}    return 1\n\n\nclass C:\n    def m(self):\n{method}")
    ok = f"@decorated\n@twice\ndef g():\n{body}" + "\n" * (MODULE_LINES - FUNCTION_LINES - 2)
    assert len(ok.splitlines()) == MODULE_LINES
    (tmp_path / "ok.py").write_text(ok)  # a 60-line function under two decorators, in a 400-line module
    (tmp_path / "big.py").write_text("x = 1\n" * (MODULE_LINES + 1))
    assert over_budget(tmp_path) == {"long.f": FUNCTION_LINES + 1, "big": MODULE_LINES + 1}
    (tmp_path / "long.py").write_text(f"class C:\n    def m(self):\n{method}        return 1\n")
    assert over_budget(tmp_path, modules=False) == {"long.C.m": FUNCTION_LINES + 1}
    _needs_ruff()
    (tmp_path / "ok.py").write_text("x = '" + "a" * (LINE_LENGTH - 6) + "'\n")
    (tmp_path / "wide.py").write_text("y = 1\nx = '" + "a" * (LINE_LENGTH - 5) + "'\n")
    assert long_lines(tmp_path / "ok.py", tmp_path / "wide.py", cwd=tmp_path) == {"wide.py": [2]}
