"""Whole datasets: prepare writes a datasets folder that caches, counts what it drops, and trains
unchanged under transformers.Trainer and TRL's SFTTrainer; the CLI around it; the HTML view."""

import hashlib
import json
import shutil
import subprocess

import pytest
from conftest import run_cli, write_jsonl

import chatmask
from chatmask import IGNORE, cli
from chatmask.config import DataConfig
from chatmask.prepare import prepare

ROWS = [
    {"messages": [{"role": "user", "content": f"What is {k}+{k}?"}, {"role": "assistant", "content": f"It is {2 * k}."},
                  {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}]}
    for k in range(40)
]


def folder_hash(path):
    import datasets

    ds = datasets.load_from_disk(str(path))
    rows = [list(ds["input_ids"]), list(ds["labels"]), list(ds["source"])]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_prepare_writes_a_datasets_folder_equal_to_encode(tmp_path, bpe_tok):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    p = prepare(data, DataConfig(), tmp_path / "out", tokenizer=bpe_tok, progress=False)
    ds = p.dataset()
    assert len(ds) == len(ROWS) and ds.column_names == ["input_ids", "labels", "source", "control_text", "tree_ends"]
    for k in (0, 17, 39):
        ex = chatmask.encode(ROWS[k]["messages"], bpe_tok, source=f"d.jsonl:{k + 1}")
        assert (ds[k]["input_ids"], ds[k]["labels"], ds[k]["source"]) == (ex.input_ids, ex.labels, f"d.jsonl:{k + 1}")
    s = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert s["rows_kept"] == 40 and s["trained_tokens"] == sum(sum(1 for x in r if x != IGNORE) for r in ds["labels"])
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["train_on"] == "assistant" and conf["end_of_turn_marker"] == "<|im_end|>"


def test_cache_hit_and_invalidation(tmp_path, bpe_tok):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "out"
    assert not prepare(data, DataConfig(), out, tokenizer=bpe_tok, progress=False).cached
    h = folder_hash(out)
    assert prepare(data, DataConfig(), out, tokenizer=bpe_tok, progress=False).cached
    assert not prepare(data, DataConfig(train_on="all"), out, tokenizer=bpe_tok, progress=False).cached
    assert folder_hash(out) != h
    assert not prepare(data, DataConfig(), out, tokenizer=bpe_tok, progress=False).cached
    assert folder_hash(out) == h  # back to the same bytes
    write_jsonl(tmp_path / "d.jsonl", ROWS[:-1])
    assert not prepare(data, DataConfig(), out, tokenizer=bpe_tok, progress=False).cached
    assert not prepare(data, DataConfig(template="llama3"), out, tokenizer=bpe_tok, progress=False).cached
    assert not prepare(data, DataConfig(template="llama3", stream="segments"), out, tokenizer=bpe_tok,
                       progress=False).cached
    assert not prepare(data, DataConfig(template="llama3", end_of_turn="<|eot_id|>"), out, tokenizer=bpe_tok,
                       progress=False).cached
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no temporary folders left


def test_skip_invalid_counts_by_reason(tmp_path, bpe_tok):
    bad = [json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
           "{not json",
           json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * 400}]})]
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:5], bad)
    with pytest.raises(chatmask.ConversationError, match=r"d\.jsonl:6"):
        prepare(data, DataConfig(), tmp_path / "o", tokenizer=bpe_tok, progress=False)
    p = prepare(data, DataConfig(skip_invalid=True, max_length=64), tmp_path / "o", tokenizer=bpe_tok, progress=False)
    s = p.stats
    assert s["rows_kept"] == 5 and s["rows_dropped"] == 3
    assert s["dropped_by_reason"] == {"no assistant turn": 1, "invalid JSON": 1, "first answer past max_length": 1}
    assert (s["rows_dropped_for_length"], s["rows_dropped_invalid"], s["dropped_fraction"]) == (1, 2, 3 / 8)
    assert "d.jsonl:8" in s["first_dropped"]["first answer past max_length"]
    # every row dropped: the error says why, in the same one line
    with pytest.raises(chatmask.ConversationError, match=r"no row became an example: dropped 8 of 8 rows read: 6 "
                       r"first answer past max_length, 1 no assistant turn, 1 invalid JSON"):
        prepare(data, DataConfig(skip_invalid=True, max_length=4), tmp_path / "o2", tokenizer=bpe_tok, progress=False)


def test_truncation_keeps_whole_turns_and_counts(tmp_path, bpe_tok):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    full = chatmask.encode(ROWS[0]["messages"], bpe_tok)
    first_end = next(i for i in range(len(full.labels) - 1)
                     if full.labels[i] != IGNORE and full.labels[i + 1] == IGNORE) + 1
    p = prepare(data, DataConfig(max_length=first_end + 2), tmp_path / "o", tokenizer=bpe_tok, progress=False)
    ds = p.dataset()
    assert ds[0]["input_ids"] == full.input_ids[:first_end]
    assert p.stats["truncated_rows"] == 3 and p.stats["rows_without_trained_stop"] == 0


def test_unwritable_output_is_a_clear_error(tmp_path, bpe_tok):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(chatmask.ChatmaskError, match="cannot write the output folder"):
        prepare(data, DataConfig(), blocker / "out", tokenizer=bpe_tok, progress=False)


def test_num_proc_output_identical(tmp_path, bpe_tok, monkeypatch):
    from chatmask import workers

    monkeypatch.setattr(workers, "BATCH", 7)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    prepare(data, DataConfig(), tmp_path / "one", tokenizer=bpe_tok, progress=False)
    prepare(data, DataConfig(num_proc=2), tmp_path / "two", tokenizer=bpe_tok, progress=False)
    assert folder_hash(tmp_path / "one") == folder_hash(tmp_path / "two")


def _tiny_model(tok):
    from conftest import tiny_llama

    return tiny_llama(tok, pad_token_id=tok.pad_token_id)


def test_folder_trains_under_transformers_trainer(tmp_path, bpe_tok):
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:8])
    prepare(data, DataConfig(), tmp_path / "o", tokenizer=bpe_tok, progress=False)
    ds = datasets.load_from_disk(str(tmp_path / "o"))
    model = _tiny_model(bpe_tok)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1)
    tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(bpe_tok, padding=True))
    out = tr.train()
    assert out.global_step == 2 and out.training_loss > 0


def test_folder_trains_under_trl_sfttrainer(tmp_path, bpe_tok):
    trl = pytest.importorskip("trl")
    import datasets

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:8])
    prepare(data, DataConfig(), tmp_path / "o", tokenizer=bpe_tok, progress=False)
    ds = datasets.load_from_disk(str(tmp_path / "o"))
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                        use_cpu=True, save_strategy="no", max_length=None)
    tr = trl.SFTTrainer(model=_tiny_model(bpe_tok), args=cfg, train_dataset=ds, processing_class=bpe_tok)
    batch = tr.data_collator([ds[0], ds[1]])
    n = len(ds[0]["labels"])
    assert batch["labels"][0, :n].tolist() == ds[0]["labels"]  # our labels, untouched
    assert tr.train().global_step == 2


# ---------------------------------------------------------------- CLI


def test_cli_prepare_view_stats(tmp_path, tok_dir, capsys, monkeypatch):
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:6])
    out = tmp_path / "o"
    assert cli.main(["prepare", data, "--tokenizer", tok_dir, "--out", str(out), "--quiet"]) == 0
    assert "6 rows" in capsys.readouterr().out
    assert cli.main(["prepare", data, "--tokenizer", tok_dir, "--out", str(out), "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out
    html = tmp_path / "v.html"
    assert cli.main(["view", data, "--tokenizer", tok_dir, "--row", "2", "--html", str(html)]) == 0
    text = capsys.readouterr().out
    assert "d.jsonl:3" in text and "-100" in text and "<|im_end|>" in text
    assert "class='t tr'" in html.read_text()
    assert cli.main(["view", str(out), "--row", "1"]) == 0
    assert "d.jsonl:2" in capsys.readouterr().out
    assert cli.main(["stats", data, "--tokenizer", tok_dir, "--json", "--quiet"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows_kept"] == 6 and s["tokens_by_role"]["user"] > 0 and s["user_to_assistant"] > 0
    assert cli.main(["stats", data, "--tokenizer", tok_dir, "--quiet", "--fail-if", "trained_fraction<0.99"]) == 1
    assert cli.main(["stats", data, "--tokenizer", tok_dir, "--quiet", "--fail-if", "trained_fraction<0.01"]) == 0
    assert cli.main(["stats", data, "--tokenizer", tok_dir, "--quiet", "--fail-if", "nonsense<1"]) == 2
    capsys.readouterr()
    assert cli.main(["stats", data, "--tokenizer", tok_dir, "--quiet", "--fail-if", "trained_fraction<0.99",
                     "--fail-if", "rows_kept<7", "--fail-if", "rows_kept<2"]) == 1
    held = [line for line in capsys.readouterr().err.splitlines() if line.endswith("holds")]
    assert held == [f"chatmask stats: --fail-if {e!r} holds" for e in ("trained_fraction<0.99", "rows_kept<7")]
    for where in (data, str(out)):  # a mistyped row is a one-line error, never an internal one
        assert cli.main(["view", where, "--tokenizer", tok_dir, "--row", "-1"]) == 2
        assert "--row must be 0 or more" in capsys.readouterr().err
    # a template whose generation prompt ends in a space that merges with the answer's first word
    spaced = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: "
              "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
    capsys.readouterr()
    assert cli.main(["stats", data, "--tokenizer", tok_dir, "--template", spaced, "--json", "--quiet"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows_split_at_boundary"] == 6 and s["tokens_split_at_boundary"] >= 6
    assert cli.main(["stats", data, "--tokenizer", tok_dir, "--template", spaced, "--quiet",
                     "--fail-if", "rows_split_at_boundary>0"]) == 1
    assert cli.main(["view", data, "--tokenizer", tok_dir, "--template", spaced, "--stream", "segments",
                     "--end-of-turn", "<|im_end|>"]) == 0


def test_cli_errors_have_no_traceback(tmp_path, tok_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"messages": [{"role": "gpt", "content": "x"}]}) + "\n")
    r = run_cli("prepare", str(bad), "--tokenizer", tok_dir, "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.jsonl:2" in r.stderr and "message 1" in r.stderr and "--skip-invalid" in r.stderr
    r = run_cli("prepare", str(tmp_path / "missing.jsonl"), "--tokenizer", tok_dir, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_html_view_in_a_real_browser(tmp_path, bpe_tok):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium (.ci/run installs Debian's chromium)")
    from chatmask.view import html_page

    ex = chatmask.encode(ROWS[0]["messages"], bpe_tok, source="d.jsonl:1")
    page = tmp_path / "v.html"
    page.write_text(html_page([ex], bpe_tok))
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'ud'}", "--window-size=900,700", f"--screenshot={shot}",
                    page.as_uri()],
                   capture_output=True, timeout=60)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    green = sum(n for n, (r, g, b) in colours if (r, g, b) == (0xB9, 0xF6, 0xB9))  # trained tokens' background
    assert green > 500, "trained tokens are not highlighted in the rendered page"


def test_every_option_that_changes_rows_is_in_the_cache_key(tmp_path, bpe_tok):
    """The prepared folder is a cache: an option the key ignored would hand back rows made another way."""
    import dataclasses

    from chatmask.prepare import cache_key

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    other = {"template": "llama3", "train_on": "all", "max_length": 77, "truncation": "right", "end_of_turn": "</s>",
             "stream": "segments", "format": "openai", "split": "test", "skip_invalid": True, "salvage": True,
             "limit": 3, "stop_tokens": "<|im_end|>", "control_tokens": "parse", "turns": "per-turn",
             "add_template_tokens": None}
    other.pop("add_template_tokens")
    base = cache_key(data, DataConfig(), bpe_tok)
    fields = {f.name for f in dataclasses.fields(DataConfig)} - {"tokenizer", "num_proc"}  # num_proc: same rows
    assert fields == set(other) | {"add_template_tokens"}, "a new DataConfig field: say here how it changes the rows"
    for name, value in other.items():
        assert cache_key(data, DataConfig(**{name: value}), bpe_tok) != base, name
    # --add-template-tokens changes the tokenizer (its fingerprint) and needs a built-in template
    assert cache_key(data, DataConfig(template="chatml", add_template_tokens=True), bpe_tok) != \
        cache_key(data, DataConfig(template="chatml"), bpe_tok)
    assert cache_key(data, DataConfig(num_proc=2), bpe_tok) == base


# ---------------------------------------------------------------- the audit (audit.py)


SPACED = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% elif m.role == 'system' %}"
          "{{ m.content }}\n\n{% else %}Assistant: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}Assistant: {% endif %}")  # its answers' first word merges with a space


def _roles_by_offsets(messages, tok, template=None):
    """The reference count of tokens by role: the whole rendering encoded with offsets, each token given to
    the message content its first character is in, else to the template (the definition stats.json states)."""
    from chatmask.audit import ROLES
    from chatmask.labels import content_spans

    text, spans = content_spans(messages, tok, template)
    counts = dict.fromkeys(ROLES, 0)
    for a, _ in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]:
        inside = [messages[i]["role"] for i, (s, e) in spans.items() if s <= a < e]
        counts[inside[0] if inside else "template"] += 1
    return counts


@pytest.mark.parametrize("template", [None, SPACED])
def test_tokens_by_role_are_counted_in_prepares_own_pass(tmp_path, bpe_tok, template):
    """stats.json's tokens by role equal the reference count over every row kept, with a system message,
    rows of other lengths, and tokens that straddle a content's edge; a row dropped is not counted."""
    system = [{"role": "system", "content": "Be brief."}]
    rows = [{"messages": system * (k % 2) + r["messages"][: 2 + 2 * (k % 3 > 0)]} for k, r in enumerate(ROWS[:9])]
    unanswered = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    data = write_jsonl(tmp_path / "d.jsonl", rows, [unanswered])
    cfg = DataConfig(skip_invalid=True, template=template)
    s = prepare(data, cfg, tmp_path / "o", tokenizer=bpe_tok, progress=False).stats
    want = {}
    for r in rows:
        for role, n in _roles_by_offsets(r["messages"], bpe_tok, template).items():
            want[role] = want.get(role, 0) + n
    assert want["system"] > 0 and want["template"] > 0
    assert s["tokens_by_role"] == want and s["tokens_by_role_rows"] == len(rows) and s["rows_dropped"] == 1
    assert s["user_to_assistant"] == pytest.approx(want["user"] / want["assistant"])


def test_tokens_by_role_with_an_end_of_turn_given(tmp_path, base_tok):
    """--end-of-turn reaches the role count too: a template only it makes trainable was counted as no rows."""
    from test_markers import HEADLESS

    rows = [{"messages": r["messages"][:2]} for r in ROWS[:6]]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    s = prepare(data, DataConfig(template=HEADLESS, end_of_turn=" ||"), tmp_path / "o", tokenizer=base_tok,
                progress=False).stats
    assert s["rows_kept"] == 6 and s["tokens_by_role_rows"] == 6
    assert s["tokens_by_role"]["user"] > 0 and s["tokens_by_role"]["assistant"] > 0


def test_tokens_by_role_count_the_first_batches_only(tmp_path, bpe_tok, monkeypatch):
    """Counting by role looks at each rendering again: only the batches that start within audit.ROLE_ROWS
    rows pay for it, and stats.json says over how many rows (the same counts as those rows alone give)."""
    from chatmask import audit
    from chatmask import workers

    monkeypatch.setattr(workers, "BATCH", 3)
    monkeypatch.setattr(audit, "ROLE_ROWS", 4)  # batches start at rows 0, 3, 6: the first two are counted
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:9])
    s = prepare(data, DataConfig(), tmp_path / "o", tokenizer=bpe_tok, progress=False).stats
    first = prepare(write_jsonl(tmp_path / "f.jsonl", ROWS[:6]), DataConfig(), tmp_path / "f", tokenizer=bpe_tok,
                    progress=False).stats
    assert s["rows_kept"] == 9 and s["tokens_by_role_rows"] == 6
    assert s["tokens_by_role"] == first["tokens_by_role"] and first["tokens_by_role_rows"] == 6


def test_fail_if_names_every_numeric_statistic_and_checks_it(tmp_path, bpe_tok):
    from chatmask import audit

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    s = prepare(data, DataConfig(), tmp_path / "o", tokenizer=bpe_tok, progress=False).stats
    numeric = {k for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"seconds"}
    assert set(audit.STAT_NAMES) == numeric
    held = audit.failed_conditions(s, ["rows_kept<4", "rows_kept<5", "trained_fraction>0"])
    assert held == ["rows_kept<5", "trained_fraction>0"]
    assert audit.failed_conditions(s, ["rows_kept>4", "rows_dropped!=0", "tokens<=3"]) == []
    assert audit.failed_conditions({**s, "user_to_assistant": None}, ["user_to_assistant<1e9"]) == []
    for bad, said in (("rows_kept", "expected NAME OP NUMBER"), ("nonsense<1", "unknown statistic 'nonsense'"),
                      ("rows_kept<1.2.3", "'1.2.3' is not a number")):
        with pytest.raises(chatmask.ChatmaskError, match=said):
            audit.parse_expr(bad)
    lines = "\n".join(audit.summary_lines(s))
    assert "rows: 4 kept of 4 read" in lines
    assert f"tokens by role (its first 4 rows kept): system 0 (0.0%), user {s['tokens_by_role']['user']:,} (" in lines
