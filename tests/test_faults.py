"""What a long run survives, each fault injected on a short real run through the CLI: a signal (the step
finished and saved, exit 128 + N, the resumed run equal to the uninterrupted one; a second signal at once), a
checkpoint cut short (resumed from the one before), a NaN in the data path (stopped naming the rows), a full
disk (one line, the previous checkpoint kept), two runs into one folder, two prepares of the same data."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from chatmask import guards, paths
from chatmask.config import DataConfig
from chatmask import train as train_mod
from conftest import cli_main, model_folder
from test_train import ROWS, data  # noqa: F401  (the fixture: 48 short conversations)

FLAGS = ["--finetune", "full", "--lr", "0.01", "--steps", "6", "--eval-every", "3", "--save-every", "2",
         "--val-split", "0.1", "--batch-size", "4", "--no-tensorboard", "--stop-prompts", "0"]


@pytest.fixture()
def model_dir(tmp_path, bpe_tok):
    return model_folder(tmp_path / "tiny", bpe_tok)


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _steps_logged(out: Path) -> int:
    return sum(1 for x in (out / "log.jsonl").read_text().splitlines() if "train_loss" in x)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_the_resumed_run_equals_the_whole(data, model_dir, tmp_path, capsys,
                                                                               monkeypatch, sig):
    rc, _, err = cli_main(capsys, "train", data, "--model", model_dir, *FLAGS, "--out", str(tmp_path / "whole"))
    assert rc == 0, err
    seen = []
    before = signal.signal(sig, lambda *a: seen.append(a))  # if chatmask set no handler, this one notes it
    try:
        out = tmp_path / "cut"
        rc, said, err = _interrupted(capsys, monkeypatch, [data, "--model", model_dir, *FLAGS, "--out", str(out)], 3,
                                     sig)
        assert not seen and signal.getsignal(sig) is not before  # chatmask's handler took it, then gave it back
    finally:
        signal.signal(sig, before)
    k = _steps_logged(out)
    assert rc == 128 + sig and 0 < k < 6, err
    assert f"stopped by {sig.name} after step {k}: checkpoint {out / 'checkpoints' / f'step-{k:06d}'} written" in err
    assert "--resume" in err and "Traceback" not in err and "finishing this step" in said
    assert not (out / "result.json").exists() and not (out / "model").exists()
    rc, said, err = cli_main(capsys, "train", data, "--out", str(out), "--resume")
    assert rc == 0, err
    assert f"resumed from {out / 'checkpoints' / f'step-{k:06d}'} (step {k})" in said
    whole = _result(tmp_path / "whole")
    assert _result(out)["train_losses"] == pytest.approx(whole["train_losses"], abs=1e-6)
    assert _result(out)["final_val_loss"] == pytest.approx(whole["final_val_loss"], abs=1e-6)


def test_a_second_signal_ends_the_process_at_once():
    script = textwrap.dedent("""
        import os, signal, time
        from chatmask.guards import Signals
        with Signals() as s:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("noted", s.received, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("not stopped", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGTERM and f"noted {int(signal.SIGTERM)}" in p.stdout, (p.stdout, p.stderr)
    assert "not stopped" not in p.stdout


def _interrupted(capsys, monkeypatch, argv, at_forward: int, sig=signal.SIGTERM, command="train"):
    """`chatmask COMMAND ARGV` sent `sig` inside its `at_forward`-th training forward: (exit code, stdout, stderr)."""
    calls, real = [], train_mod.token_loss_sum

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == at_forward:
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "token_loss_sum", signalled)
    try:
        return cli_main(capsys, command, *argv)
    finally:
        monkeypatch.setattr(train_mod, "token_loss_sum", real)


@pytest.mark.parametrize("damage", ["cut", "missing"])
def test_a_damaged_checkpoint_is_named_and_the_one_before_resumes(data, model_dir, tmp_path, capsys, monkeypatch,
                                                                  damage):
    rc, _, err = cli_main(capsys, "train", data, "--model", model_dir, *FLAGS, "--out", str(tmp_path / "whole"))
    assert rc == 0, err
    out = tmp_path / "k"
    rc, _, err = _interrupted(capsys, monkeypatch, [data, "--model", model_dir, *FLAGS, "--out", str(out)], 4)
    assert rc == 143 and "after step 4" in err, err  # checkpoints at steps 2 and 4
    newest = out / "checkpoints" / "step-000004"
    if damage == "cut":
        w = newest / "weights.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    else:
        (newest / "optimizer.pt").unlink()
    rc, said, err = cli_main(capsys, "train", data, "--out", str(out), "--resume")
    assert rc == 0, err
    assert f"checkpoint {newest} cannot be read" in said and "Traceback" not in err + said
    assert f"resumed from {out / 'checkpoints' / 'step-000002'} (step 2), past the unreadable step-000004" in said
    assert _result(out)["train_losses"] == pytest.approx(_result(tmp_path / "whole")["train_losses"], abs=1e-6)


def test_no_readable_checkpoint_is_one_error_line(data, model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "k"
    rc, _, err = _interrupted(capsys, monkeypatch, [data, "--model", model_dir, *FLAGS, "--out", str(out)], 4)
    assert rc == 143, err
    for w in (out / "checkpoints").glob("step-*/weights.safetensors"):
        w.write_bytes(b"")
    rc, _, err = cli_main(capsys, "train", data, "--out", str(out), "--resume")
    assert rc == 2 and "no checkpoint in" in err and "can be read (step-000004, step-000002)" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_nan_stops_the_run_before_its_step_naming_the_rows(bpe_tok, tmp_path, capsys, monkeypatch):
    """A token only one row holds has NaN embeddings: the step that trains that row stops the run with its
    file:line and the last good checkpoint; no step with it is applied or saved."""
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    rows = ROWS[:20] + [{"messages": [{"role": "user", "content": "Spell zyzzyva backwards."},
                                      {"role": "assistant", "content": "avyzzyz."}]}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[20:24]))
    ids = [set(bpe_tok(bpe_tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"]) for r in rows]
    only_last = ids[-1] - set().union(*ids[:-1])
    assert only_last, "the last row shares all its tokens"
    m = model_folder(tmp_path / "m", bpe_tok)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(m)
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(only_last)] = float("nan")
    model.save_pretrained(m)
    out = tmp_path / "o"
    rc, _, err = cli_main(capsys, "train", str(src), "--model", m, "--finetune", "lora", "--steps", "10",
                          "--batch-size", "2", "--save-every", "1", "--seed", "1", "--eval-every", "100", "--val-data",
                          str(tmp_path / "val.jsonl"), "--no-tensorboard", "--stop-prompts", "0", "--out", str(out))
    assert rc == 2, err
    k = _steps_logged(out) + 1  # seed 1 orders the NaN row into step 3
    assert rc == 2 and f"NonFinite: step {k}: the loss nan is not finite, on the rows " in err, err
    assert f"{src.name}:21" in err and sum(x.startswith("chatmask:") for x in err.splitlines()) == 1
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved[-1] == f"step-{k - 1:06d}" and f"last good checkpoint is {out / 'checkpoints' / saved[-1]}" in err
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / saved[-1] / "weights.safetensors")
               .values())
    assert not (out / "model").exists() and not (out / "result.json").exists()


def test_a_folder_a_running_train_holds_is_refused_until_it_ends(data, model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    with guards.run_lock(out):
        rc, _, err = cli_main(capsys, "train", data, "--model", model_dir, *FLAGS, "--out", str(out))
    assert rc == 2 and f"{out} is in use by a running chatmask run (pid {os.getpid()}, started" in err
    assert not (out / "config.json").exists()  # refused before anything was written
    # a holder killed with kill -9 leaves its lock file, which binds nobody
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from chatmask "
                               "import guards\nwith guards.run_lock(Path(sys.argv[1])):\n print('held', flush=True)"
                               "\n time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert (out / guards.LOCK).exists()
    rc, _, err = cli_main(capsys, "train", data, "--model", model_dir, *FLAGS, "--out", str(out))
    assert rc == 0, err
    assert not (out / guards.LOCK).exists()


def test_two_prepares_of_the_same_data_at_once_both_succeed_into_one_folder(tmp_path, tok_dir):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(ROWS[k % 48]) + "\n" for k in range(3000)))
    go = tmp_path / "go"
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from chatmask.config import DataConfig
        from chatmask.hub import load_tokenizer
        from chatmask.prepare import prepare_cached
        tok = load_tokenizer(sys.argv[2])
        while not Path(sys.argv[3]).exists():
            time.sleep(0.01)
        p = prepare_cached(sys.argv[1], DataConfig(), tok, progress=False, log=None)
        print(p.path, len(p.dataset()))
    """)
    env = {**os.environ, "CHATMASK_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(src), tok_dir, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(2)  # both have imported
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    assert outs[0][0] == outs[1][0] and outs[0][0].split()[1] == "3000"
    assert [p.name for p in (tmp_path / "cache" / "prepared").iterdir()] == [Path(outs[0][0].split()[0]).name]


def test_a_prepare_that_finds_its_twin_finished_first_keeps_it(tmp_path, bpe_tok, monkeypatch):
    """The other process's folder lands between this one's labelling and its swap: both calls succeed, one
    folder, the twin's, stays."""
    from chatmask import prepare
    from chatmask.config import DataConfig

    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    real, twins = prepare._finish_layout, []

    def twin_first(*a, **k):
        real(*a, **k)
        if not twins:
            twins.append(None)  # the twin's own labelling runs this too
            twins[0] = prepare.prepare_cached(str(src), DataConfig(), bpe_tok, progress=False, log=None)

    monkeypatch.setattr(prepare, "_finish_layout", twin_first)
    mine = prepare.prepare_cached(str(src), DataConfig(), bpe_tok, progress=False, log=None)
    assert mine.path == twins[0].path and len(mine.dataset()) == len(ROWS)
    assert [p.name for p in (tmp_path / "cache" / "prepared").iterdir()] == [mine.path.name]


def test_a_full_disk_in_a_checkpoint_is_one_line_and_keeps_the_one_before(data, model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    import errno

    import safetensors.torch

    real, saves = safetensors.torch.save_file, []

    def fills(tensors, path, *a, **k):
        saves.append(path)
        if len(saves) == 2:  # the second checkpoint: part written, then the disk is full
            Path(path).write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", fills)
    out = tmp_path / "o"
    rc, _, err = cli_main(capsys, "train", data, "--model", model_dir, *FLAGS, "--out", str(out))
    ck = out / "checkpoints"
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"DiskFull: no space left on the device for {ck / 'step-000004'}: 0.0 MB written" in err
    assert "it needs about" in err and "Traceback" not in err
    assert [p.name for p in ck.iterdir()] == ["step-000002"]  # the one before, whole; nothing half-written
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    rc, said, err = cli_main(capsys, "train", data, "--out", str(out), "--resume")
    assert rc == 0 and "resumed from" in said and "(step 2)" in said, err


def test_a_full_disk_while_preparing_is_one_line_and_leaves_no_folder(data, tok_dir, tmp_path, capsys, monkeypatch):
    import errno

    from chatmask import prepare

    def fills(tmp, *a, **k):
        (Path(tmp) / "data-00000-of-00001.arrow").write_bytes(b"x" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare, "_label_into", fills)
    rc, _, err = cli_main(capsys, "prepare", data, "--tokenizer", tok_dir, "--out", str(tmp_path / "p"))
    assert rc == 2 and f"DiskFull: no space left on the device for {tmp_path / 'p'}" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".p", "p"))]


def test_a_swap_leaves_the_old_folder_or_the_new_one_at_every_instant(tmp_path, monkeypatch):
    final = tmp_path / "model"
    paths.atomic_dir(final, lambda t: (t / "w").write_text("old"))
    seen = []
    real = paths._exchange

    def watched(a, b):
        seen.append((final / "w").read_text())
        ok = real(a, b)
        seen.append((final / "w").read_text())
        return ok

    monkeypatch.setattr(paths, "_exchange", watched)
    paths.atomic_dir(final, lambda t: (t / "w").write_text("new"))
    assert seen == ["old", "new"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def _ner_file(tmp_path, entities: bool) -> str:
    from test_compare import NER

    rows = json.loads(json.dumps(NER))
    if not entities:
        for r in rows:
            for t in r["conversations"][3::2]:
                t["value"] = "[]"
    p = tmp_path / "ner.json"
    p.write_text(json.dumps(rows))
    return str(p)


def test_a_metric_with_no_gold_entity_to_score_is_refused_before_any_training(tmp_path, model_dir, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "c"
    rc, _, err = cli_main(capsys, "compare", _ner_file(tmp_path, entities=False), "--model", model_dir, "--finetune",
                          "full", "--steps", "2", "--metric", "ner-f1", "--metric-questions", "16", "--out", str(out))
    assert rc == 2 and sum(x.startswith("chatmask:") for x in err.splitlines()) == 1, err
    assert "--metric ner-f1 has no question with a gold entity to score (the 1 validation rows (--val-split 0.02) " \
           "hold 2, 0 with a gold entity)" in err
    for flag in ("--val-split", "--metric-data", "--metric-with-entities"):
        assert flag in err
    assert not (out / "runs").exists()  # nothing trained


def test_fewer_questions_than_asked_are_said_before_training_and_in_the_report(tmp_path, bpe_tok, monkeypatch):
    from test_compare import TC, tiny_factory

    from chatmask.compare import CompareConfig, compare

    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    said = []
    cc = CompareConfig(seeds=1, metric="ner-f1", metric_questions=16)
    compare(_ner_file(tmp_path, entities=True), DataConfig(), TC, cc, tmp_path / "c", tokenizer=bpe_tok,
            model_factory=tiny_factory(bpe_tok), log=said.append)
    why = ("12 of the 16 questions asked for: the 6 validation rows (--val-split 0.2) hold 12 `What describes "
           "<type> in the text?` questions, 12 with a gold entity")
    assert any(why in x for x in said[:3])  # before the first run trains
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["metric_plan"]["heldout"]["scored"] == m["metric"]["heldout"]["masked"]["questions"] == 12
    assert "12 of the 16 questions asked for were scored: the 6 validation rows" in (tmp_path / "c" / "report.md") \
        .read_text()


def test_a_metric_that_fails_after_training_still_writes_the_report(tmp_path, bpe_tok, monkeypatch):
    from test_compare import TC, tiny_factory

    from chatmask import metrics
    from chatmask.compare import CompareConfig, compare

    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))

    def fails(*a, **k):
        raise RuntimeError("the generation ran out of memory")

    monkeypatch.setattr(metrics, "ner_f1_questions", fails)
    cc = CompareConfig(seeds=1, metric="ner-f1", metric_questions=4)
    m = compare(_ner_file(tmp_path, entities=True), DataConfig(), TC, cc, tmp_path / "c", tokenizer=bpe_tok,
                model_factory=tiny_factory(bpe_tok), log=None)
    assert m["masked"]["final_val_loss_mean"] is not None and m["metric"] == {}
    md = (tmp_path / "c" / "report.md").read_text()
    assert "Not computed: RuntimeError: the generation ran out of memory." in md
    assert "Not computed: RuntimeError" in (tmp_path / "c" / "report.html").read_text()


def test_a_signal_in_compare_ends_it_and_the_same_command_finishes_the_study(tmp_path, model_dir, capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    argv = [_ner_file(tmp_path, entities=True), "--model", model_dir, "--finetune", "full", "--steps", "4",
            "--save-every", "2", "--val-split", "0.2", "--stop-prompts", "0"]
    rc, _, err = cli_main(capsys, "compare", *argv, "--out", str(tmp_path / "whole"))
    assert rc == 0, err
    out = tmp_path / "c"
    rc, _, err = _interrupted(capsys, monkeypatch, [*argv, "--out", str(out)], 6, command="compare")
    assert rc == 143 and "stopped by SIGTERM after step 3" in err and "run the same command (its runs resume" in err
    assert not (out / "runs" / "masked-seed0" / "result.json").exists() and not (out / "metrics.json").exists()
    rc, _, err = cli_main(capsys, "compare", *argv, "--out", str(out))
    assert rc == 0, err
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", out))
    assert b["unmasked"]["final_val_loss_mean"] == pytest.approx(a["unmasked"]["final_val_loss_mean"], abs=1e-6)


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from chatmask import cli, paths
what, argv = sys.argv[1], sys.argv[2:]
real = paths.atomic_dir if what != "prepare" else None

def killed(final, write, **kw):  # the save dies with half its files written
    if Path(final).name.startswith(what):
        def half(tmp):
            try:
                write(tmp)
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(final, half, **kw)
    return real(final, write, **kw)

if what == "prepare":
    from chatmask import prepare
    label = prepare._label_into
    def half_labelled(tmp, *a, **k):
        label(tmp, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    prepare._label_into = half_labelled
else:
    paths.atomic_dir = killed
    import chatmask.checkpoints as ck
    ck.atomic_dir = killed
sys.exit(cli.main(argv))
"""


@pytest.mark.slow  # three processes killed with kill -9, each importing torch
@pytest.mark.parametrize("what", ["step-000004", "model", "prepare"])
def test_a_kill_inside_a_save_leaves_the_previous_version(data, model_dir, tmp_path, what):
    """kill -9 inside writing a checkpoint, OUT/model or the prepared cache: what was there before stays whole
    and is used; the next run goes on as if the killed save had never started."""
    env = {**os.environ, "CHATMASK_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "o"
    argv = ["train", data, "--model", model_dir, *FLAGS, "--out", str(out)]
    if what == "model":  # a finished run, then a longer one whose final save dies
        assert subprocess.run([sys.executable, "-m", "chatmask", *argv], env=env, capture_output=True).returncode == 0
        before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
        argv = [*argv, "--resume", "--steps", "8"]
    p = subprocess.run([sys.executable, "-c", KILLED_SAVE, what, *argv], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-1500:]
    if what == "model":
        assert {q.name: q.read_bytes() for q in (out / "model").iterdir()} == before
    if what == "step-000004":
        assert [q.name for q in (out / "checkpoints").glob("step-*")] == ["step-000002"]
    if what == "prepare":
        assert not list((tmp_path / "cache" / "prepared").glob("[!.]*"))  # no folder a reader would take
    again = argv if what != "step-000004" else [*argv, "--resume"]
    r = subprocess.run([sys.executable, "-m", "chatmask", *again], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert _result(out)["steps"] == (8 if what == "model" else 6)
    assert not [str(q) for q in out.rglob(".*.tmp-*")]  # the killed writer's half folder is cleared by the next


@pytest.mark.slow  # a real full disk: a 1.1 MB tmpfs in a user and mount namespace of its own
def test_a_real_full_disk_at_a_checkpoint(data, model_dir, tmp_path):
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("no unshare here to mount a small filesystem")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a small filesystem here (no user namespaces)")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "CHATMASK_CACHE": str(tmp_path / "cache")}
    cmd = (f"mount -t tmpfs -o size=1100k tmpfs {disk} && {sys.executable} -m chatmask train {data} --model "
           f"{model_dir} {' '.join(FLAGS)} --out {disk}/o; echo rc=$?; ls {disk}/o/checkpoints")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)
    err = [x for x in p.stderr.splitlines() if x.startswith("chatmask:")]
    assert "rc=2" in p.stdout and len(err) == 1 and "DiskFull: no space left on the device for" in err[0], \
        (p.stdout, p.stderr[-2000:])
    kept = p.stdout.split("rc=2")[1].split()
    assert kept and all(k.startswith("step-") for k in kept)  # the checkpoints before, nothing half-written


def test_a_save_clears_what_a_killed_writer_left_beside_it(tmp_path):
    """A writer killed mid-save leaves its half folder (`.NAME.tmp-PID-*`); the next save of NAME deletes it, and
    never a live writer's."""
    from chatmask.paths import atomic_dir

    dead, live = tmp_path / ".m.tmp-999999999-ab", tmp_path / f".m.tmp-{os.getpid()}-cd"
    dead.mkdir()
    live.mkdir()
    atomic_dir(tmp_path / "m", lambda t: (t / "f").write_text("x"))
    assert not dead.exists() and live.exists() and (tmp_path / "m" / "f").read_text() == "x"


def test_a_saved_folder_is_readable_as_the_umask_allows(tmp_path):
    """safetensors writes 0600; a saved model folder gets the permissions any new file gets (a service account
    serving it can read it)."""
    import safetensors.torch
    import torch

    from chatmask.paths import atomic_dir

    umask = os.umask(0o022)
    try:
        atomic_dir(tmp_path / "m", lambda t: safetensors.torch.save_file({"w": torch.zeros(2)}, str(t / "w.st")))
    finally:
        os.umask(umask)
    assert oct((tmp_path / "m" / "w.st").stat().st_mode & 0o777) == "0o644"
