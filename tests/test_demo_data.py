"""The demo's data shipped in the package (src/chatmask/data): small, licensed, loadable, the post's case
(the user says far more than the assistant), what examples/demo_data.py makes, and inside a built wheel."""

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from chatmask import ChatmaskError, conversations, demo

ROOT = Path(__file__).resolve().parents[1]
UNINER = ROOT.parent / "shared" / "data" / "uniner"  # examples/demo_data.py's default source
DATA = ROOT / "src" / "chatmask" / "data"
SHIPPED = ("crossner_demo.jsonl", "LICENSE-UniversalNER", "README.md")


def rows() -> list[dict]:
    return [json.loads(s) for s in Path(demo.crossner_path()).read_text(encoding="utf-8").splitlines()]


def test_the_sample_is_about_a_megabyte_and_carries_the_mit_licence():
    path = Path(demo.crossner_path())
    assert path.parent == DATA and 900_000 <= path.stat().st_size <= 1_050_000
    licence = (DATA / "LICENSE-UniversalNER").read_text(encoding="utf-8")
    head, _, text = licence.partition("\n\n")
    assert "crossner_demo.jsonl" in head and "UniversalNER" in head and len(head.splitlines()) <= 4
    assert text.startswith("MIT License\n\nCopyright (c) 2023 universal-ner\n")
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_every_row_loads_with_nothing_dropped_and_the_domains_take_turns():
    path = demo.crossner_path()
    report = conversations.LoadReport()
    convs = list(conversations.load(path, report=report))  # no skip_invalid: one bad row raises
    lines = Path(path).read_text(encoding="utf-8").count("\n")
    assert len(convs) == lines == report.rows_kept and not report.dropped
    domains = [r["domain"] for r in rows()]
    assert domains[:8] == ["ai", "literature", "music", "politics"] * 2  # interleaved, not one file after another
    counts = {d: domains.count(d) for d in set(domains)}
    assert set(counts) == {"ai", "literature", "music", "politics"} and max(counts.values()) - min(counts.values()) <= 1


def test_the_user_says_several_times_what_the_assistant_says():
    msgs = [m for r in rows() for m in r["messages"]]
    user, answer = (sum(len(m["content"]) for m in msgs if m["role"] == role) for role in ("user", "assistant"))
    assert user > 5 * answer  # 258 against 33 characters a row when written: the post's NER case


def test_a_missing_sample_is_an_error_that_names_the_file(tmp_path, monkeypatch):
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(ChatmaskError, match="crossner_demo.jsonl"):
        demo.crossner_path()


def load_maker():
    spec = importlib.util.spec_from_file_location("demo_data", ROOT / "examples" / "demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_whose_turns_do_not_alternate_are_left_out():
    alternates = load_maker().alternates
    h, g = ({"from": "human", "value": "Text: x"}, {"from": "gpt", "value": "[]"})
    assert alternates([h, g]) and alternates([h, g, h, g])
    blank, no_text = {"from": "gpt", "value": " "}, {"from": "gpt"}
    for bad in ([h, h, g, g], [g, h], [h, g, h], [h], [], None, [h, blank], [h, no_text]):
        assert not alternates(bad), bad


@pytest.fixture
def maker(tmp_path, monkeypatch):
    """examples/demo_data.py as a module, writing into tmp_path instead of the package."""
    if not (UNINER / "CrossNER_AI.json").is_file():
        pytest.skip(f"no UniversalNER folder at {UNINER}")
    module = load_maker()
    monkeypatch.setattr(module, "DATA", tmp_path)
    return module


def check(maker, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["demo_data.py", "--check", "--uniner", str(UNINER)])
    with pytest.raises(SystemExit) as exit_:
        maker.main()
    return exit_.value.code


def test_the_shipped_files_are_what_the_script_makes_and_check_sees_a_change(maker, tmp_path, monkeypatch):
    assert check(maker, monkeypatch) == 1  # nothing written yet
    monkeypatch.setattr(sys, "argv", ["demo_data.py", "--uniner", str(UNINER)])
    maker.main()
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name}: run examples/demo_data.py"
    assert check(maker, monkeypatch) == 0
    (tmp_path / "README.md").write_text((tmp_path / "README.md").read_text() + " ")
    assert check(maker, monkeypatch) == 1


def test_a_wheel_ships_the_demo_data(tmp_path):
    pytest.importorskip("setuptools")
    clone = tmp_path / "clone"  # a copy: a build in the clone itself would leave build/ and egg-info behind
    shutil.copytree(ROOT / "src", clone / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, clone / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    subprocess.run(cmd, cwd=clone, check=True, capture_output=True, timeout=120)
    (wheel,) = tmp_path.glob("chatmask-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in SHIPPED:
            assert z.read(f"chatmask/data/{name}") == (DATA / name).read_bytes()
