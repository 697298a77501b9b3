"""compare end to end on a tiny model: the work shared by all runs done once, both arms on the same validation
tokens, the intervals the bootstrap gives, the report files, finished runs reused and never runs made with
other settings; the CLI train/compare with a YAML run file; kill -9 and --resume."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli_main, run_cli, tiny_llama

import chatmask
from chatmask import metrics
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
ARMS = ("masked", "unmasked")
TC = TrainConfig(finetune="full", lr=5e-3, steps=4, eval_every=2, save_every=2, val_split=0.2, batch_size=4,
                 tensorboard=False)
CC = CompareConfig(seeds=2, metric="ner-f1", metric_questions=4)
COMMAND = "chatmask compare ner.json"


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


def _counting(mp, module, name, counts):
    real = getattr(module, name)

    def counted(*a, **kw):
        counts[name] += 1
        return real(*a, **kw)

    mp.setattr(module, name, counted)


@pytest.fixture(scope="module")
def study(tmp_path_factory, bpe_tok):
    """One 2-seed compare (4 runs) shared by the tests that read it: (out folder, metrics.json, the data
    file, how often the data was hashed, labelled and read as conversations)."""
    from chatmask import conversations, memory, prepare, workers

    tmp = tmp_path_factory.mktemp("study")
    data = tmp / "ner.json"
    data.write_text(json.dumps(NER))
    counts = dict.fromkeys(("_hash_source", "labelled", "load", "release"), 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATMASK_CACHE", str(tmp / "cache"))
        for module, name in ((prepare, "_hash_source"), (workers, "labelled"), (conversations, "load"),
                             (memory, "release")):
            _counting(mp, module, name, counts)
        res = compare(str(data), DataConfig(), TC, CC, tmp / "cmp", tokenizer=bpe_tok,
                      model_factory=tiny_factory(bpe_tok), log=None, command=COMMAND)
    m = json.loads((tmp / "cmp" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(res))
    return tmp / "cmp", m, str(data), counts


def test_the_data_is_prepared_once_and_the_questions_read_once(study):
    """Four runs: the data hashed and labelled once (every run trains on the prepared folder), read as
    conversations twice (to prepare it, and once for the validation rows' questions)."""
    *_, counts = study
    # and each of the 4 runs hands its memory back before the next (the second arm began 1.7 GB higher without it)
    assert counts == {"_hash_source": 1, "labelled": 1, "load": 2, "release": 4}


def test_both_arms_score_the_same_validation_tokens(study):
    _, m, _, _ = study
    for arm in ARMS:
        assert m[arm]["val_tokens"] > 0 and len(m[arm]["per_seed"]) == 2 and m[arm]["final_val_loss_mean"] > 0
    assert m["masked"]["val_tokens_sha256"] == m["unmasked"]["val_tokens_sha256"]
    assert m["masked"]["val_tokens"] == m["unmasked"]["val_tokens"]
    assert m["unmasked"]["trained_tokens"] > m["masked"]["trained_tokens"]


def test_step_0_is_scored_once_and_the_other_runs_take_it(study, ner_file, bpe_tok, tmp_path):
    """Every run starts from the same model, so step 0's validation loss is the first run's; a run scoring it
    itself gets the same number, and a run on other validation tokens scores its own."""
    from chatmask.train import train

    out, m, _, _ = study
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    firsts = [r["evals"][0] for r in runs]
    assert len(firsts) == 4 and sum(not e.get("shared") for e in firsts) == 1
    assert len({e["val_loss"] for e in firsts}) == 1 and all(e["step"] == 0 for e in firsts)
    unmasked = [r for r in runs if r["train_on"] == "all"][0]
    own = train(str(out.parent / "ner.json"), DataConfig(train_on="all"), dataclasses.replace(TC, steps=1),
                tmp_path / "own", tokenizer=bpe_tok, model=tiny_llama(bpe_tok), log=None, progress=False)
    assert own["evals"][0]["val_loss"] == pytest.approx(firsts[0]["val_loss"], abs=1e-6)
    assert not own["evals"][0].get("shared") and unmasked["val_tokens_sha256"] == own["val_tokens_sha256"]
    other = train(ner_file, DataConfig(), dataclasses.replace(TC, steps=1, val_split=0.3), tmp_path / "other",
                  tokenizer=bpe_tok, model=tiny_llama(bpe_tok), log=None, progress=False,
                  base_eval={"val_tokens_sha256": own["val_tokens_sha256"], "val_loss": 123.0})
    assert other["evals"][0]["val_loss"] != 123.0 and not other["evals"][0].get("shared")


def test_tokens_by_role_come_from_the_prepared_folder(study):
    """The report's tokens by role are the ones prepare counted over every row (stats.json), not a recount."""
    from chatmask.prepare import prepared_config

    out, m, _, _ = study
    folder = next(p for p in (out.parent / "cache" / "prepared").iterdir()
                  if (prepared_config(p) or {}).get("max_length") == DataConfig().max_length)
    stats = json.loads((folder / "stats.json").read_text())
    assert m["data_stats"] == {**stats["tokens_by_role"], "rows": len(NER),
                               "user_to_assistant": stats["user_to_assistant"]}
    assert m["data_stats"]["user_to_assistant"] > 1


def test_entity_f1_intervals_are_the_bootstrap_of_the_runs(study):
    _, m, _, _ = study
    assert list(m["metric"]) == ["heldout"]  # no --metric-data: one set
    runs = {arm: [s["metric"]["heldout"]["per_question"] for s in m[arm]["per_seed"]] for arm in ARMS}
    assert all(len(pq) == 4 for rs in runs.values() for pq in rs)
    ci = metrics.bootstrap_f1(runs)
    f1 = m["metric"]["heldout"]
    for arm in ARMS:
        assert (f1[arm]["questions"], f1[arm]["with_entities"]) == (4, 4)
        assert f1[arm]["f1_ci95"] == ci[arm]  # the seeds pooled, question by question
        pooled = metrics.prf({k: sum(q[i] for pq in runs[arm] for q in pq) for i, k in enumerate(("tp", "fp", "fn"))})
        assert f1[arm]["f1_pooled"] == pytest.approx(pooled["f1"])
        assert ci[arm][0] <= pooled["f1"] <= ci[arm][1]
        assert f1[arm]["parsed_fraction"] == pytest.approx(
            sum(s["metric"]["heldout"]["parsed"] for s in m[arm]["per_seed"]) / 8)
    lo, hi = f1["difference_ci95"]
    assert [lo, hi] == ci["difference"]
    assert lo <= f1["masked"]["f1_pooled"] - f1["unmasked"]["f1_pooled"] <= hi


def test_stop_rate_of_both_arms_on_the_same_prompts(study):
    _, m, _, _ = study
    for arm in ARMS:
        st = m[arm]["stop"]
        assert st["prompts"] > 0 and 0 <= st["stop_rate_mean"] <= 1 and st["stops"][0] == "<|im_end|>"
        assert st["stop_rate_mean"] + st["header_rate_mean"] + st["ran_on_rate_mean"] == pytest.approx(1.0)
        assert [s["stop"]["prompts"] for s in m[arm]["per_seed"]] == [st["prompts"]] * 2
    assert m["masked"]["stop"]["prompts_sha256"] == m["unmasked"]["stop"]["prompts_sha256"]


def test_report_files(study):
    out, m, _, _ = study
    for f in ("loss.png", "loss.svg", "report.md", "report.html"):
        assert (out / f).stat().st_size > 500, f
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    md = (out / "report.md").read_text()
    assert "masked" in md and COMMAND in md and f"{m['masked']['final_val_loss_mean']:.4f}" in md
    html = (out / "report.html").read_text()
    assert (out / "loss.svg").read_text().split("<svg", 1)[1] in html and "src=" not in html  # self-contained
    assert "## Answers side by side" in md and "Answers side by side" in html  # held-out questions, both arms
    assert "## Entity F1" in md and "Entity F1" in html
    for arm in ARMS:  # one row per arm in the report's stop table, one prompt sample per arm
        assert f"| {arm} | {m[arm]['stop']['prompts']} | " in md and len(m[arm]["stop"]["prompts_sha256"]) == 1
    assert "## Stop rate" in md and "Stop rate" in html and "ran into a header" in md and "ran into a header" in html
    zero = max(m["metric"]["heldout"][a]["f1_pooled"] for a in ARMS) < 0.005
    assert ("is 0: no run named a gold entity" if zero else "paired bootstrap over the 4 questions") in md


def _rerun(study, bpe_tok, data_cfg=DataConfig(), tc=TC, cc=CC, data=None):
    out, _, given, _ = study
    data = data or given

    def no_model():
        raise AssertionError("a finished run was trained again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATMASK_CACHE", str(out.parent / "cache"))
        return compare(data, data_cfg, tc, cc, out, tokenizer=bpe_tok, model_factory=no_model, log=None,
                       command=COMMAND)


def test_finished_runs_are_reused_not_retrained(study, bpe_tok):
    _, m, _, _ = study
    assert json.loads(json.dumps(_rerun(study, bpe_tok))) == m


def test_reuse_refuses_runs_made_with_another_lr_or_metric(study, bpe_tok):
    with pytest.raises(chatmask.ConfigError, match=r"masked-seed0 finished with other settings: --lr 0\.005 -> 0\.001"):
        _rerun(study, bpe_tok, tc=dataclasses.replace(TC, lr=1e-3))
    with pytest.raises(chatmask.ConfigError, match=r"metric computed otherwise: --metric-questions 4 -> 9"):
        _rerun(study, bpe_tok, cc=dataclasses.replace(CC, metric_questions=9))


@pytest.mark.parametrize("change, said", [({"max_length": 1024}, r"--max-length 2048 -> 1024"),
                                          ({"template": "llama3"}, r"--template None -> 'llama3'")])
def test_reuse_refuses_runs_made_with_other_data_settings(study, bpe_tok, change, said):
    """A data setting other than the path (the rows' length, their template) changes every run: the runs
    finished with the old one are not reported as the new one's."""
    with pytest.raises(chatmask.ConfigError, match=r"masked-seed0 finished with other settings: " + said):
        _rerun(study, bpe_tok, data_cfg=DataConfig(**change))


def test_reuse_refuses_runs_made_on_other_data(study, bpe_tok, tmp_path):
    """Another file (here the same rows less one) makes other runs, even into a finished --out."""
    other = tmp_path / "other.json"
    other.write_text(json.dumps(NER[:-1]))
    with pytest.raises(chatmask.ConfigError, match=r"masked-seed0 finished with other settings: .*other.json"):
        _rerun(study, bpe_tok, data=str(other))


def test_compare_scores_held_out_rows_and_an_unseen_set(ner_file, bpe_tok, tmp_path):
    unseen = tmp_path / "unseen.json"
    unseen.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": f"Text: Gamma{k} met Delta{k} in Rome."},
        {"from": "gpt", "value": "I've read this text."},
        {"from": "human", "value": "What describes person in the text?"},
        {"from": "gpt", "value": json.dumps([f"Gamma{k}", f"Delta{k}"] if k % 2 else [])},
    ]} for k in range(12)]))
    tc = dataclasses.replace(TC, steps=2)
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


def test_cli_compare_with_run_file(ner_file, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  finetune: full\n  steps: 2\n  eval_every: 1\n  val_split: 0.2\n  tensorboard: false\n"
                   "  stop_prompts: 0\ncompare:\n  seeds: 1\n")
    rc, _, err = cli_main(capsys, "compare", ner_file, "--model", model_dir, "--config", str(run), "--set",
                          "train.batch_size=2", "--out", str(tmp_path / "c"))
    assert rc == 0, err[-2000:]
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["train_config"]["batch_size"] == 2 and m["train_config"]["steps"] == 2
    rc, _, err = cli_main(capsys, "compare", ner_file, "--model", model_dir, "--set", "train.nope=1", "--out",
                          str(tmp_path / "d"))
    assert rc == 2 and "unknown key(s) nope" in err and "Traceback" not in err


@pytest.mark.slow  # a subprocess killed mid-run: seconds, not milliseconds
def test_kill_9_then_resume_matches_uninterrupted(ner_file, model_dir, tmp_path):
    import os

    env = {"CHATMASK_CACHE": str(tmp_path / "cache")}
    common = ["--model", model_dir, "--finetune", "full", "--lr", "0.005", "--steps", "40", "--eval-every", "40",
              "--save-every", "4", "--val-split", "0.2", "--batch-size", "2", "--no-tensorboard"]
    whole = run_cli("train", ner_file, *common, "--out", tmp_path / "whole", env=env)
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
    r = run_cli("train", ner_file, *common, "--resume", "--out", tmp_path / "k", env=env)
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
    from chatmask import config

    out = str(tmp_path / "r")
    flags = ["--model", model_dir, "--finetune", "full", "--lr", "0.005", "--steps", "6", "--eval-every", "3",
             "--save-every", "2", "--val-split", "0.2", "--batch-size", "2", "--no-tensorboard"]
    dc, tc, _ = config.resolve(cm.build_parser().parse_args(["train", ner_file, *flags, "--out", out]))
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

    from chatmask.compare import QuestionSets, _metric_hook

    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {k}"},
                                                   {"role": "assistant", "content": "hello"}]}) for k in range(4)))
    cc = CompareConfig(metric="ner-f1", metric_data=str(p))
    hook = _metric_hook(QuestionSets(str(p), DataConfig(), TrainConfig(), cc), DataConfig(), TrainConfig(), cc, bpe_tok)
    holdout = SimpleNamespace(val={"source": [f"chat.jsonl:{k}" for k in range(1, 5)]})
    assert hook(None, holdout) == {"error": "no `What describes <type> in the text?` questions in the validation rows "
                                            "or --metric-data"}


def test_question_sets_are_read_once_for_the_same_validation_rows(ner_file, monkeypatch):
    """Every run of an experiment holds out the same rows: their questions are read and picked once."""
    from chatmask import conversations
    from chatmask.compare import QuestionSets

    val = [c.source for c in conversations.load(ner_file)][:2]
    counts = {"load": 0}
    _counting(monkeypatch, conversations, "load", counts)
    qs = QuestionSets(ner_file, DataConfig(), TrainConfig(), CompareConfig(metric="ner-f1", metric_questions=3,
                                                                            metric_data=ner_file))
    first = qs.get(val)
    assert [len(first[k]) for k in ("heldout", "unseen")] == [3, 3] and counts["load"] == 2
    assert qs.get(list(reversed(val))) == first and counts["load"] == 2
    assert {p[0]["content"] for p, _, _ in first["heldout"]} == {f"Text: The band Alpha{k} played in Paris with "
                                                                  f"Beta{k}." for k in (0, 1)}
