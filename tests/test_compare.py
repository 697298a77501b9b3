"""compare end to end on a tiny model: both arms, the same validation tokens, report files, metric,
finished runs reused; the CLI train/compare with a YAML run file; kill -9 and --resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import chatmask
from conftest import tiny_llama

from chatmask.compare import CompareConfig, compare
from chatmask.config import DataConfig
from chatmask.train import TrainConfig

NER = [{"conversations": [
    {"from": "human", "value": f"Text: The band Alpha{k} played in Paris with Beta{k}."},
    {"from": "gpt", "value": "I've read this text."},
    {"from": "human", "value": "What describes band in the text?"},
    {"from": "gpt", "value": json.dumps([f"Alpha{k}", f"Beta{k}"])},
    {"from": "human", "value": "What describes location in the text?"},
    {"from": "gpt", "value": json.dumps(["Paris"])},
]} for k in range(30)]


def tiny_factory(tok):
    def make():
        return tiny_llama(tok)
    return make


@pytest.fixture()
def ner_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "ner.json"
    p.write_text(json.dumps(NER))
    return str(p)


def test_compare_writes_report_with_same_validation_tokens(ner_file, bpe_tok, tmp_path):
    tc = TrainConfig(finetune="full", lr=5e-3, steps=4, eval_every=2, save_every=2, val_split=0.2, batch_size=4,
                     tensorboard=False)
    cc = CompareConfig(seeds=2, metric="ner-f1", metric_questions=4)
    out = tmp_path / "cmp"
    res = compare(ner_file, DataConfig(), tc, cc, out, tokenizer=bpe_tok, model_factory=tiny_factory(bpe_tok), log=None,
                  command="chatmask compare ner.json")
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(res))
    for arm in ("masked", "unmasked"):
        assert m[arm]["val_tokens"] > 0 and len(m[arm]["per_seed"]) == 2
        assert m[arm]["final_val_loss_mean"] > 0
        f1 = m["metric"]["heldout"][arm]  # the validation rows' questions, seeds pooled
        assert f1["questions"] == 4 and f1["with_entities"] == 4
        assert f1["f1_ci95"][0] <= f1["f1_pooled"] <= f1["f1_ci95"][1]
        assert 0 <= f1["parsed_fraction"] <= 1
        for s in m[arm]["per_seed"]:
            assert len(s["metric"]["heldout"]["per_question"]) == 4
    assert list(m["metric"]) == ["heldout"]  # no --metric-data: one set
    lo, hi = m["metric"]["heldout"]["difference_ci95"]
    assert lo <= hi
    assert m["masked"]["val_tokens_sha256"] == m["unmasked"]["val_tokens_sha256"]
    assert m["masked"]["val_tokens"] == m["unmasked"]["val_tokens"]
    # the stop rate of both arms, on the same prompts, per seed and pooled
    for arm in ("masked", "unmasked"):
        st = m[arm]["stop"]
        assert st["prompts"] > 0 and 0 <= st["stop_rate_mean"] <= 1 and st["stops"][0] == "<|im_end|>"
        assert st["stop_rate_mean"] + st["header_rate_mean"] + st["ran_on_rate_mean"] == pytest.approx(1.0)
        assert [s["stop"]["prompts"] for s in m[arm]["per_seed"]] == [st["prompts"]] * 2
    assert m["masked"]["stop"]["prompts_sha256"] == m["unmasked"]["stop"]["prompts_sha256"]
    assert m["unmasked"]["trained_tokens"] > m["masked"]["trained_tokens"]
    assert m["data_stats"]["user_to_assistant"] > 1
    for f in ("loss.png", "loss.svg", "report.md", "report.html"):
        assert (out / f).stat().st_size > 500, f
    md = (out / "report.md").read_text()
    assert "masked" in md and "chatmask compare ner.json" in md and f"{m['masked']['final_val_loss_mean']:.4f}" in md
    html = (out / "report.html").read_text()
    assert "<svg" in html and "src=" not in html  # self-contained
    assert "## Answers side by side" in md and "Answers side by side" in html  # held-out questions, both arms
    assert "## Entity F1" in md and "Entity F1" in html
    for arm in ("masked", "unmasked"):  # one row per arm in the report's stop table, one prompt sample per arm
        assert f"| {arm} | {m[arm]['stop']['prompts']} | " in md and len(m[arm]["stop"]["prompts_sha256"]) == 1
    assert "## Stop rate" in md and "Stop rate" in html and "ran into a header" in md and "ran into a header" in html
    zero = max(m["metric"]["heldout"][a]["f1_pooled"] for a in ("masked", "unmasked")) < 0.005
    assert ("is 0: no run named a gold entity" if zero else "paired bootstrap over the 4 questions") in md
    # finished runs are reused, not retrained
    t = time.perf_counter()
    again = compare(ner_file, DataConfig(), tc, cc, out, tokenizer=bpe_tok, model_factory=None, log=None)
    assert again["masked"]["final_val_loss_mean"] == m["masked"]["final_val_loss_mean"]
    assert time.perf_counter() - t < 10
    # ... but never runs made with other settings, reported as if they were these
    import dataclasses

    with pytest.raises(chatmask.ConfigError, match=r"masked-seed0 finished with other settings: --lr 0\.005 -> 0\.001"):
        compare(ner_file, DataConfig(), dataclasses.replace(tc, lr=1e-3), cc, out, tokenizer=bpe_tok, log=None)
    with pytest.raises(chatmask.ConfigError, match=r"metric computed otherwise: --metric-questions 4 -> 9"):
        compare(ner_file, DataConfig(), tc, dataclasses.replace(cc, metric_questions=9), out, tokenizer=bpe_tok, log=None)


def test_compare_scores_held_out_rows_and_an_unseen_set(ner_file, bpe_tok, tmp_path):
    unseen = tmp_path / "unseen.json"
    unseen.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": f"Text: Gamma{k} met Delta{k} in Rome."},
        {"from": "gpt", "value": "I've read this text."},
        {"from": "human", "value": "What describes person in the text?"},
        {"from": "gpt", "value": json.dumps([f"Gamma{k}", f"Delta{k}"] if k % 2 else [])},
    ]} for k in range(12)]))
    tc = TrainConfig(finetune="full", lr=5e-3, steps=2, eval_every=2, save_every=2, val_split=0.2, batch_size=4,
                     tensorboard=False)
    cc = CompareConfig(seeds=1, metric="ner-f1", metric_questions=5, metric_data=str(unseen))
    m = compare(ner_file, DataConfig(), tc, cc, tmp_path / "c", tokenizer=bpe_tok, model_factory=tiny_factory(bpe_tok),
                log=None)
    assert list(m["metric"]) == ["heldout", "unseen"]
    u = m["metric"]["unseen"]["masked"]
    assert u["questions"] == 5 and u["with_entities"] == 4  # 4 of 5 with entities: the default 0.8
    md = (tmp_path / "c" / "report.md").read_text()
    assert "never trained on: 5 (4 with entities)" in md and "held-out rows of the training domains" in md
    assert "(1 seed)" in md


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tok):
    d = tmp_path_factory.mktemp("tiny")
    tiny_factory(bpe_tok)().save_pretrained(d)
    bpe_tok.save_pretrained(d)
    return str(d)


def cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "chatmask", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_compare_with_run_file(ner_file, model_dir, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  finetune: full\n  steps: 2\n  eval_every: 1\n  val_split: 0.2\n  tensorboard: false\n"
                   "compare:\n  seeds: 1\n")
    r = cli("compare", ner_file, "--model", model_dir, "--config", str(run), "--set", "train.batch_size=2",
            "--out", str(tmp_path / "c"), env={"CHATMASK_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["train_config"]["batch_size"] == 2 and m["train_config"]["steps"] == 2
    r = cli("compare", ner_file, "--model", model_dir, "--set", "train.nope=1", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "unknown key(s) nope" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # a subprocess killed mid-run: seconds, not milliseconds
def test_kill_9_then_resume_matches_uninterrupted(ner_file, model_dir, tmp_path):
    env = {"CHATMASK_CACHE": str(tmp_path / "cache")}
    common = ["--model", model_dir, "--finetune", "full", "--lr", "0.005", "--steps", "40", "--eval-every", "40",
              "--save-every", "4", "--val-split", "0.2", "--batch-size", "2", "--no-tensorboard"]
    whole = cli("train", ner_file, *common, "--out", str(tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    p = subprocess.Popen([sys.executable, "-m", "chatmask", "train", ner_file, *common, "--out", str(tmp_path / "k")],
                         env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "k" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 10):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "k" / "result.json").exists(), "the run finished before it was killed"
    r = cli("train", ner_file, *common, "--resume", "--out", str(tmp_path / "k"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "result.json").read_text())
    b = json.loads((tmp_path / "k" / "result.json").read_text())
    assert b["train_losses"] == pytest.approx(a["train_losses"], abs=1e-6)
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], abs=1e-6)


def test_resume_takes_the_saved_settings_and_refuses_changes(ner_file, model_dir, tmp_path, capsys):
    """`train DATA --out OUT --resume` (the README's form, no other flags) continues the run as it was
    started; a flag that changes the run is refused with the list of differences; more --steps is allowed
    and said."""
    from chatmask import cli as cm

    out = str(tmp_path / "r")
    flags = ["--model", model_dir, "--finetune", "full", "--lr", "0.005", "--steps", "6", "--eval-every", "3",
             "--save-every", "2", "--val-split", "0.2", "--batch-size", "2", "--no-tensorboard"]
    dc, tc, _ = cm._run_configs(cm.build_parser().parse_args(["train", ner_file, *flags, "--out", out]))
    from chatmask.train import train

    assert train(ner_file, dc, tc, out, log=None, progress=False, stop_after=2) == {"stopped_at": 2}  # "killed"
    assert cm.main(["train", ner_file, "--out", out, "--resume"]) == 0
    assert "train (assistant): 6/6 steps (100%)" in capsys.readouterr().out  # not a terminal: plain progress lines
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train_config"]
    assert len(result["train_losses"]) == 6 and (saved["steps"], saved["batch_size"], saved["lr"]) == (6, 2, 0.005)
    capsys.readouterr()
    rc = cm.main(["train", ner_file, "--out", out, "--resume", "--batch-size", "4", "--lr", "0.001"])
    err = capsys.readouterr().err
    assert rc == 2 and "--batch-size 2 -> 4" in err and "--lr 0.005 -> 0.001" in err and "another --out" in err
    assert cm.main(["train", ner_file, "--out", out, "--resume", "--steps", "3"]) == 2
    assert "past the 3 steps of this run" in capsys.readouterr().err
    assert cm.main(["train", ner_file, "--out", out, "--resume", "--steps", "8"]) == 0
    assert "--steps 6 -> 8" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "r" / "result.json").read_text())["train_losses"]) == 8
    other = tmp_path / "other.json"
    other.write_text(json.dumps(NER[:-1]))
    assert cm.main(["train", str(other), "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "started with other settings: data " in err and "other.json" in err
    # the same folder without --resume: not silently mixed with the saved run (its checkpoints would win a resume)
    assert cm.main(["train", ner_file, "--out", out, "--model", model_dir]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_metric_on_data_without_ner_questions_says_so(tmp_path, bpe_tok):
    from types import SimpleNamespace

    from chatmask.compare import _metric_hook

    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {k}"},
                                                   {"role": "assistant", "content": "hello"}]}) for k in range(4)))
    hook = _metric_hook(str(p), DataConfig(), TrainConfig(), CompareConfig(metric="ner-f1", metric_data=str(p)), bpe_tok)
    split = SimpleNamespace(val={"source": [f"chat.jsonl:{k}" for k in range(1, 5)]})
    assert hook(None, split) == {"error": "no `What describes <type> in the text?` questions in the validation rows "
                                          "or --metric-data"}
