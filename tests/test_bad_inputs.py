"""The catalogue of bad and unusual inputs, through `chatmask prepare` (in-process: exit code, one-line
error naming file and line, no traceback) and with --skip-invalid; kill -9 during prepare; security."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_main, run_cli, write_jsonl

OK = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
OKL = json.dumps(OK)


def _row(*messages) -> str:
    """A line of OpenAI-style rows whose messages are given as JSON text (so that they can be malformed)."""
    return f'{OKL}\n{{"messages": [{", ".join(messages)}]}}\n'


USER, ASSISTANT = '{"role": "user", "content": "x"}', '{"role": "assistant", "content": "y"}'

# name -> (file name, bytes, expected fragments of the error); line 2 is the bad one where it applies
BAD = {
    "invalid JSON": ("d.jsonl", f"{OKL}\n{{oops\n", ["d.jsonl:2", "invalid JSON"]),
    "cut-off array": ("d.json", f"[{OKL},\n{OKL},\n{OKL[:20]}", ["d.json", "ends early", "--salvage"]),
    "empty file": ("d.jsonl", "", ["d.jsonl", "empty"]),
    "top-level scalar": ("d.json", "42", ["d.json:1", "array"]),
    "no messages key": ("d.jsonl", f'{OKL}\n{{"text": "hello"}}\n', ["d.jsonl:2"]),
    "messages not a list": ("d.jsonl", f'{OKL}\n{{"messages": "hi"}}\n', ["d.jsonl:2", "list"]),
    "message without role": ("d.jsonl", _row('{"content": "x"}'), ["d.jsonl:2", "message 1", "role"]),
    "unknown role": ("d.jsonl", _row('{"role": "robot", "content": "x"}'), ["d.jsonl:2", "message 1", "robot"]),
    "null content": ("d.jsonl", _row('{"role": "user", "content": null}', ASSISTANT), ["d.jsonl:2", "message 1"]),
    "number content": ("d.jsonl", _row('{"role": "user", "content": 3}', ASSISTANT), ["d.jsonl:2", "message 1"]),
    "non-text parts": ("d.jsonl", _row('{"role": "user", "content": [{"type": "image", "url": "u"}]}', ASSISTANT),
                       ["d.jsonl:2", "message 1"]),
    "empty conversation": ("d.jsonl", _row(), ["d.jsonl:2", "empty"]),
    "no assistant turn": ("d.jsonl", _row(USER), ["d.jsonl:2", "assistant"]),
    "two assistants in a row": ("d.jsonl", _row(USER, ASSISTANT, '{"role": "assistant", "content": "z"}'),
                                ["d.jsonl:2", "message 3", "follows"]),
}


def _write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(p)


def prep(capsys, *argv):
    return cli_main(capsys, "prepare", *argv, "--quiet")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_clear_error_and_skippable(case, tmp_path, tok_dir, capsys):
    name, content, frags = BAD[case]
    f = _write(tmp_path, name, content)
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "o"))
    assert rc == 2, (case, out, err)
    assert "Traceback" not in err and err.count("\n") <= 3
    for frag in frags:
        assert frag in err, (case, frag, err)
    assert not (tmp_path / "o").exists()  # nothing half-written
    if case in ("empty file", "top-level scalar"):
        return  # nothing in the file can be kept
    extra = ["--salvage"] if case == "cut-off array" else ["--skip-invalid"]
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "o"), *extra)
    assert rc == 0, (case, err)
    if case == "cut-off array":  # salvage keeps the complete records before the cut
        assert "kept 2 complete records" in out and "2 rows" in out, out
    else:  # one bad row among good ones: dropped and counted
        assert "dropped 1 of 2 rows" in out and ": 1 rows," in out, out


def test_invalid_utf8_names_the_line(tmp_path, tok_dir, capsys):
    f = _write(tmp_path, "d.jsonl", OKL.encode() + b"\n" + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "o"))
    assert rc == 2 and "d.jsonl:2" in err and "UTF-8" in err and "Traceback" not in err
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "o"), "--skip-invalid")
    assert rc == 0 and "1 invalid UTF-8" in out


def test_unusual_but_valid_inputs_prepare(tmp_path, tok_dir, capsys):
    big = {"messages": [{"role": "user", "content": "word " * 200_000}, {"role": "assistant", "content": "ok"}]}
    cases = {
        "bom_crlf.jsonl": ("\ufeff" + OKL + "\r\n" + OKL + "\r\n").encode("utf-8"),
        "blank_lines.jsonl": ("\n\n" + OKL + "\n\n   \n" + OKL + "\n\n").encode(),
        "array.json": json.dumps([OK, OK], indent=2).encode(),
    }
    for name, content in cases.items():
        f = _write(tmp_path, name, content)
        rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / f"out-{name}"))
        assert rc == 0 and "2 rows" in out, (name, err)
    # a 1 MB message (a million tokens) is prepared
    f = write_jsonl(tmp_path / "big.jsonl", [OK, big])
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "big"), "--max-length", "100000000")
    assert rc == 0 and "2 rows" in out and "1,000,048 tokens" in out, err
    # a message ten times --max-length (2,048) is dropped by the truncation policy, its reason counted (the
    # million tokens again would only take longer); without --skip-invalid too: the length policy's outcome
    long = {"messages": [{"role": "user", "content": "word " * 4_000}, {"role": "assistant", "content": "ok"}]}
    f = write_jsonl(tmp_path / "long.jsonl", [OK, long])
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "big2"))
    assert rc == 0 and "1 first answer past max_length" in out and "raise --max-length" in out, out
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "big3"), "--truncation", "right")
    assert rc == 0 and "1 rows" in out  # cut at 2048 tokens, the answer lost: dropped and counted
    stats = json.loads((tmp_path / "big3" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"nothing trained within max_length": 1}
    assert stats["rows_dropped_for_length"] == 1 and stats["rows_dropped_invalid"] == 0


def test_template_problems(tmp_path, tok_dir, capsys, bpe_tok):
    from conftest import make_bpe_tokenizer

    bare = tmp_path / "bare"
    make_bpe_tokenizer(chat_template=None).save_pretrained(bare)
    f = _write(tmp_path, "d.jsonl", OKL + "\n")
    rc, out, err = prep(capsys, f, "--tokenizer", str(bare), "--out", str(tmp_path / "o"))
    assert rc == 2 and "no chat template" in err and "--template" in err and "chatml" in err
    no_system = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    sys_row = {"messages": [{"role": "system", "content": "be nice"}] + OK["messages"]}
    f = _write(tmp_path, "s.jsonl", OKL + "\n" + json.dumps(sys_row) + "\n")
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--template", no_system, "--out", str(tmp_path / "o"))
    assert rc == 2 and "s.jsonl:2" in err and "System role not supported" in err
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--template", no_system, "--out", str(tmp_path / "o"),
                        "--skip-invalid")
    assert rc == 0 and "1 template error" in out


def test_missing_path_and_unwritable_output(tmp_path, tok_dir, capsys):
    rc, out, err = prep(capsys, str(tmp_path / "nope.jsonl"), "--tokenizer", tok_dir, "--out", str(tmp_path / "o"))
    assert rc == 2 and "nope.jsonl" in err
    f = _write(tmp_path, "d.jsonl", OKL + "\n")
    (tmp_path / "file").write_text("x")
    rc, out, err = prep(capsys, f, "--tokenizer", tok_dir, "--out", str(tmp_path / "file" / "o"))
    assert rc == 2 and "cannot write" in err and "Traceback" not in err


def _hash(folder):
    import datasets

    ds = datasets.load_from_disk(str(folder))
    columns = [list(ds["input_ids"]), list(ds["labels"]), list(ds["source"])]
    return hashlib.sha256(json.dumps(columns).encode()).hexdigest()


@pytest.mark.slow  # a subprocess killed mid-run: seconds, not milliseconds
def test_kill_9_during_prepare_never_leaves_a_usable_partial_cache(tmp_path, tok_dir):
    rows = [{"messages": [{"role": "user", "content": f"question {k} " * 30},
                          {"role": "assistant", "content": f"answer {k} " * 20}]} for k in range(3000)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    env = {"CHATMASK_CACHE": str(tmp_path / "cache")}
    argv = ["prepare", f, "--tokenizer", tok_dir, "--quiet", "--out"]
    assert run_cli(*argv, tmp_path / "ref", env=env).returncode == 0
    ref = _hash(tmp_path / "ref")
    import random

    rnd = random.Random(0)
    for _ in range(3):
        cmd = [sys.executable, "-m", "chatmask", *argv, str(tmp_path / "o")]  # Popen: to kill it mid-run
        p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(2.0, 5.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        out = tmp_path / "o"
        if out.exists():  # only ever a complete folder
            assert _hash(out) == ref
    r = run_cli(*argv, tmp_path / "o", env=env)
    assert r.returncode == 0, r.stderr
    assert _hash(tmp_path / "o") == ref
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp-")]  # leftovers of killed runs removed


def test_pickled_checkpoint_is_refused(tmp_path):
    """Checkpoints are read with weights_only=True: a pickle that would run code is refused."""
    import torch

    from chatmask.checkpoints import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ck = tmp_path / "step-000001"
    ck.mkdir()
    from safetensors.torch import save_file

    save_file({}, str(ck / "weights.safetensors"))
    torch.save({"state": Evil()}, ck / "optimizer.pt")
    (ck / "state.json").write_text("{}")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(ck, torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1), None)
    assert not Path(tmp_path / "pwned").exists()
