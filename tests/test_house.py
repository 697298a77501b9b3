"""The house as DESIGN.md draws it, read from the code: no import circle, arrows down the data flow."""

import ast
from pathlib import Path

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
    for m in ("prepare", "labels", "spans", "tokens", "markers", "view", "conversations", "sources", "hub"):
        assert "models" not in g[m] and "train" not in g[m], m
    assert not g["conversations"] & {"labels", "spans", "tokens", "markers", "prepare"}
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
