"""The study's files: its run files build valid configs (the GPU sizing on top, as run.sh applies it), and
make_results.py writes a results page from metrics files with the F1 table, the intervals and no path
of the machine that ran it."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from chatmask import config
from chatmask.config import CompareConfig, DataConfig, TrainConfig
from test_report import _result

STUDY = Path(__file__).resolve().parents[1] / "examples" / "study"


def _gpu_sets():
    """The --set items run.sh makes of gpu.yaml."""
    return [f"{sec}.{k}={v}" for sec, kv in yaml.safe_load((STUDY / "gpu.yaml").read_text()).items()
            for k, v in kv.items()]


def test_run_files_build_valid_configs():
    for name, sets in (("ner.yaml", ()), ("ner.yaml", _gpu_sets()), ("chat.yaml", ())):
        doc = config.load_yaml(str(STUDY / name), sets)
        dc, tc = config.build(DataConfig, doc.get("data")), config.build(TrainConfig, doc.get("train"))
        cc = config.build(CompareConfig, doc.get("compare"))
        assert cc.seeds == 3 and dc.max_length and tc.steps
        if sets:
            assert tc.dtype == "bfloat16" and tc.steps == 400 and cc.metric_questions == 300
            assert tc.val_rows < 0.05 * 15_000  # the held-out rows come out of ~15,700 training conversations
    ner = config.load_yaml(str(STUDY / "ner.yaml"))
    assert ner["compare"]["metric"] == "ner-f1" and ner["train"]["finetune"] == "full"


def test_make_results_writes_a_portable_page(tmp_path, monkeypatch):
    out, docs = tmp_path / "study-out", tmp_path / "docs"
    for name in ("ner", "chat"):
        (out / name).mkdir(parents=True)
        r = _result(seeds=3, f1=0.6 if name == "ner" else 0.0, unmasked_f1=0.3,
                    data=str(tmp_path / "study-out" / "ner-train"))
        if name == "chat":
            r["metric"] = {}
        r["train_config"] = {"model": "smollm2", "finetune": "full", "lr": 0.0002, "steps": 80, "batch_size": 16,
                             "packing": True}
        r["compare_config"] = {"seeds": 3}
        r["command"] = f"chatmask compare {out}/ner-train --out {out}/{name}"
        (out / name / "metrics.json").write_text(json.dumps(r))
        (out / name / "loss.png").write_bytes(b"png")
    monkeypatch.chdir(tmp_path)
    res = subprocess.run([sys.executable, str(STUDY / "make_results.py"), str(out), str(docs)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    page = (docs / "results.md").read_text()
    assert str(tmp_path) not in page and "chatmask compare study-out/ner-train --out study-out/ner" in page
    assert "## Entity F1" in page and "F1, seeds pooled [95% CI]" in page
    assert "the arms differ beyond this noise" in page
    assert "Training: smollm2, full fine-tuning, lr 0.0002, 80 steps of 16 rows (packed), seeds 3." in page
    assert (docs / "results-ner-loss.png").exists() and (docs / "results-chat-loss.png").exists()
