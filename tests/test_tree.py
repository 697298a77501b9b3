"""--turns tree: one conversation's per-turn examples laid out as one tree-shaped row must train exactly what
the per-turn examples train: the same loss and gradients (fp32, 1e-5) on Qwen3-, DeepSeek-R1- and gpt-oss-style
templates that drop earlier turns' reasoning, with multi-turn reasoning and tool calls; on every batch path
(packed per example, packed with a mask, padded)."""

import json
import warnings

import pytest
import torch

import chatmask
from chatmask import batches, tree
from chatmask.config import DataConfig, TrainConfig
from chatmask.labels import IGNORE
from chatmask.prepare import prepare
from chatmask.train import token_loss_sum

from conftest import tiny_llama

# Qwen3's shape: <think> split off each answer; kept only for answers after the last user query (an agent's
# steps since the user spoke keep their reasoning); tool calls and results as Qwen3 writes them.
QWEN3 = (
    "{%- set ns = namespace(last=-1) -%}{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set c = m.content or '' -%}{%- set r = '' -%}"
    "{%- if '</think>' in c -%}{%- set r = c.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set c = c.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last -%}{{ '<think>\\n' + r + '\\n</think>\\n\\n' }}{%- endif -%}{{ c }}"
    "{%- for t in m.tool_calls or [] -%}{{ '\\n<tool_call>\\n{\"name\": \"' + t.function.name + '\", \"arguments\": '"
    " + (t.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' -%}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# DeepSeek-R1's shape: every answer's <think> dropped from the history; the generation prompt opens <think>
R1 = (
    "{{ bos_token }}{%- for m in messages -%}{%- if m.role == 'user' -%}{{ '<｜User｜>' + m.content }}"
    "{%- elif m.role == 'assistant' -%}{%- set c = m.content -%}"
    "{%- if '</think>' in c -%}{%- set c = c.split('</think>')[-1] -%}{%- endif -%}"
    "{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}"
    "{%- else -%}{{ m.content }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\\n' }}{%- endif -%}"
)
# gpt-oss's shape: the analysis channel (`thinking`) only for the last answer, tool calls on a commentary channel
# ended with <|call|> (the model's stop before a tool result)
GPT_OSS = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- if m.thinking and loop.last -%}{{ '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking"
    " + '<|end|>' }}{%- endif -%}"
    "{%- if m.tool_calls -%}{{ '<|start|>assistant<|channel|>commentary to=functions.'"
    " + m.tool_calls[0].function.name + '<|message|>' + m.content + (m.tool_calls[0].function.arguments | tojson)"
    " + '<|call|>' }}"
    "{%- else -%}{{ '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|end|>' }}{%- endif -%}"
    "{%- elif m.role == 'tool' -%}{{ '<|start|>functions.lookup to=assistant<|message|>' + m.content + '<|end|>' }}"
    "{%- else -%}{{ '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start|>assistant' }}{%- endif -%}"
)


def _call(name, **args):
    return [{"type": "function", "function": {"name": name, "arguments": args}}]


def conversation(style: str, turns: int = 3) -> list[dict]:
    """A multi-turn conversation with reasoning in every answer and a tool call and its result."""
    msgs = [{"role": "system", "content": "You answer briefly."}]
    for k in range(turns):
        msgs.append({"role": "user", "content": f"Question {k}: what is {k} plus {k + 1}?"})
        if k == 1:  # an agent step: reasoning, a tool call, its result, then the answer
            call = {"role": "assistant", "content": "" if style != "r1" else "<think>look it up</think>Looking.",
                    "tool_calls": _call("lookup", a=k, b=k + 1)}
            if style == "qwen3":
                call["content"] = "<think>\nI should look it up.\n</think>\n\n"
            if style == "gpt-oss":  # its template takes the call's reasoning from `thinking` or `content`, not both
                call.update(thinking="I should look it up.", content="")
            msgs += [call, {"role": "tool", "content": json.dumps({"sum": 2 * k + 1})}]
        thought = f"{k} and {k + 1} make {2 * k + 1}."
        answer = f"It is {2 * k + 1}."
        if style == "gpt-oss":
            msgs.append({"role": "assistant", "content": answer, "thinking": thought})
        else:
            msgs.append({"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{answer}"})
    if style == "r1":  # R1's template has no tool messages: the agent step is plain text there
        msgs = [m for m in msgs if m["role"] != "tool" and not m.get("tool_calls")]
    return msgs


STYLES = {"qwen3": QWEN3, "r1": R1, "gpt-oss": GPT_OSS}


@pytest.fixture(scope="module")
def tok(bpe_tok):
    import copy

    t = copy.deepcopy(bpe_tok)
    t.add_special_tokens({"additional_special_tokens": [
        "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|call|>", "<|return|>", "<｜User｜>",
        "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]})
    return t


STOPS = {"gpt-oss": ("<|return|>", "<|end|>", "<|call|>")}


def _turns(tok, style, k=3):
    return chatmask.encode_turns(conversation(style, k), tok, template=STYLES[style], stop_tokens=STOPS.get(style, ()))


@pytest.mark.parametrize("style", STYLES)
def test_every_example_is_a_path_of_the_tree(tok, style):
    exs = _turns(tok, style)
    assert len(exs) >= 3
    full = chatmask.encode(conversation(style), tok, template=STYLES[style], stop_tokens=STOPS.get(style, ()))
    assert not full.prefix_preserving  # the template rewrites earlier turns: the full rendering is not faithful
    row = tree.lay_out(exs)
    assert row is not None
    pos = tree.positions(row.ends)
    seen = tree.attends(row.ends)
    trained = 0
    for e, path in zip(exs, row.paths):
        assert [row.input_ids[i] for i in path] == e.input_ids  # the example's tokens, in order
        assert [pos[i] for i in path] == list(range(len(path)))  # at its own positions
        for d, i in enumerate(path):  # each attends to exactly its example's prefix
            assert seen[i].nonzero().flatten().tolist() == path[:d + 1]
            if e.labels[d] != IGNORE:  # trained here: right after its parent, so the one shift pairs them
                assert row.labels[i] == e.input_ids[d] and d and path[d - 1] == i - 1
                trained += 1
    assert trained == sum(1 for x in row.labels if x != IGNORE)  # nothing trained twice, nothing extra
    assert len(row.input_ids) < sum(len(e.input_ids) for e in exs)


def _loss_and_grads(model, batch_list, n_total):
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for b in batch_list:
        s, _ = token_loss_sum(model, b)
        (s / n_total).backward()
        total = total + s.detach()
    return float(total / n_total), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _pack(examples, attention):
    return batches.pack(examples, 0, attention=attention)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("how", ["varlen", "mask", "padded"])
def test_loss_and_gradients_equal_the_per_turn_examples(tok, style, how):
    from chatmask.attention import packed_attention

    model = tiny_llama(tok, layers=2)
    model.config.use_cache = False
    if how != "padded":
        assert packed_attention(model, "cpu") == "varlen"
    exs = _turns(tok, style)
    row = tree.lay_out(exs)
    per_turn = [{"input_ids": e.input_ids, "labels": e.labels} for e in exs]
    other = chatmask.encode(conversation("qwen3", 1), tok, template=QWEN3)  # a plain example beside the tree
    plain = {"input_ids": other.input_ids, "labels": other.labels}
    as_tree = {"input_ids": row.input_ids, "labels": row.labels, "tree_ends": row.ends}
    n = sum(e.num_trained for e in exs) + other.num_trained

    def batch(xs):
        return batches.collate(xs, 0) if how == "padded" else _pack(xs, "mask" if how == "mask" else how)

    want = _loss_and_grads(model, [batch(per_turn + [plain])], n)
    got = _loss_and_grads(model, [batch([plain, as_tree])], n)
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    assert want[1].keys() == got[1].keys()
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], atol=1e-5, rtol=1e-4, msg=k)


def test_unmasked_arm_trains_every_tree_token_once_from_its_parent(tok):
    row = tree.lay_out(_turns(tok, "qwen3"))
    x = {"input_ids": row.input_ids, "labels": row.labels, "tree_ends": row.ends}
    lab = batches.pack([x], 0, "all", attention="varlen")["labels"][0].tolist()
    opened = set(tree.after_leaf(row.ends))
    assert opened  # the history goes on after each branch
    assert [i for i, v in enumerate(lab) if v == IGNORE and i] == sorted(opened)  # (token 0: no prediction)


def test_a_tree_that_cannot_explain_the_examples_is_none():
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE, IGNORE, 3]}
    b = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, 3, 4]}  # trains token 3 after [1, 2] again
    assert tree.lay_out([a, b]) is None
    c = {"input_ids": [1, 2, 5], "labels": [IGNORE, IGNORE, 5]}  # two trained tokens after one prefix
    assert tree.lay_out([a, c]) is None
    d = {"input_ids": [1, 2, 4, 6], "labels": [IGNORE, IGNORE, IGNORE, 6]}
    row = tree.lay_out([a, d])
    assert row.input_ids == [1, 2, 3, 4, 6] and row.ends == [5, 5, 3, 5, 5]


def _write(tmp_path, convs):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return str(p)


def test_prepare_counts_tokens_per_conversation_and_writes_one_row(tmp_path, tok, tok_dir):
    data = _write(tmp_path, [conversation("qwen3", k) for k in (2, 3, 6)])
    cfg = DataConfig(tokenizer=tok_dir, template=QWEN3, max_length=None)
    stats = {}
    for turns in ("per-turn", "tree"):
        p = prepare(data, DataConfig(**{**cfg.__dict__, "turns": turns}), tmp_path / turns, tokenizer=tok,
                             progress=False)
        stats[turns] = p.stats
        ds = p.dataset()
        if turns == "tree":
            assert len(ds) == 3 and all(ds["tree_ends"])
        else:
            assert len(ds) == sum(len(_turns(tok, "qwen3", k)) for k in (2, 3, 6)) and not any(ds["tree_ends"])
    s = stats["tree"]
    assert s["turn_conversations"] == 3 and s["trees_fallen_back"] == 0
    assert s["tokens_per_conversation_per_turn"] == stats["per-turn"]["tokens_per_conversation_written"]
    assert s["tokens_per_conversation_written"] < s["tokens_per_conversation_per_turn"]
    assert s["trained_tokens"] == stats["per-turn"]["trained_tokens"]  # the same trained tokens
    assert s["conversations_full_counted"] == 3
    assert s["tokens_per_conversation_full"] == sum(
        len(chatmask.encode(conversation("qwen3", k), tok, template=QWEN3).input_ids) for k in (2, 3, 6)) / 3


def test_a_tree_longer_than_max_length_is_written_as_trees_that_fit(tmp_path, tok, tok_dir):
    """--max-length bounds the rows written: a conversation whose tree passes it becomes several trees of
    consecutive turns, each within it, training the same tokens as the per-turn rows."""
    conv = conversation("qwen3", 6)
    exs = _turns(tok, "qwen3", 6)
    limit = max(len(e.input_ids) for e in exs) + 10
    assert len(tree.lay_out(exs).input_ids) > limit  # the whole tree does not fit
    data = _write(tmp_path, [conv])
    cfg = DataConfig(tokenizer=tok_dir, template=QWEN3, max_length=limit)
    got = {t: prepare(data, DataConfig(**{**cfg.__dict__, "turns": t}), tmp_path / t, tokenizer=tok,
                      progress=False) for t in ("per-turn", "tree")}
    ds = got["tree"].dataset()
    assert 1 < len(ds) < len(exs) and any(ds["tree_ends"])
    assert all(len(ids) <= limit for ids in ds["input_ids"])
    assert got["tree"].stats["trained_tokens"] == got["per-turn"].stats["trained_tokens"]
    paths = [[ids[i] for i in p] for ids, ends in zip(ds["input_ids"], ds["tree_ends"]) for p in tree.paths(ends)]
    paths += [ids for ids, ends in zip(ds["input_ids"], ds["tree_ends"]) if not ends]
    assert all(p in [e.input_ids for e in exs] for p in paths)  # each leaf's path a per-turn example


def test_the_full_rendering_is_counted_on_the_rows_counted_by_role(tmp_path, tok, tok_dir, monkeypatch):
    """Encoding each conversation a second time only for stats would cost every row: the first batches only."""
    from chatmask import audit, workers

    monkeypatch.setattr(workers, "BATCH", 2)
    monkeypatch.setattr(audit, "ROLE_ROWS", 1)  # the first batch of 2 is counted
    data = _write(tmp_path, [conversation("qwen3", k) for k in (2, 3, 4, 5)])
    s = prepare(data, DataConfig(tokenizer=tok_dir, template=QWEN3, max_length=None, turns="tree"), tmp_path / "o",
                tokenizer=tok, progress=False).stats
    assert s["turn_conversations"] == 4 and s["conversations_full_counted"] == 2
    assert s["tokens_per_conversation_full"] == sum(
        len(chatmask.encode(conversation("qwen3", k), tok, template=QWEN3).input_ids) for k in (2, 3)) / 2
    assert "full rendering (its first 2)" in audit.turns_line(s)


def test_train_on_tree_rows_equals_per_turn_rows(tmp_path, tok, tok_dir):
    """Two full steps on a tiny model: the tree rows and the per-turn rows give the same losses."""
    from chatmask.train import train

    convs = [conversation(s, 3) for s in ("qwen3",) * 4]
    data = _write(tmp_path, convs)
    model_dir = tmp_path / "m"
    tiny_llama(tok, layers=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    got = {}
    for turns in ("per-turn", "tree"):
        dc = DataConfig(tokenizer=str(model_dir), template=QWEN3, max_length=None, turns=turns)
        rows = 4 if turns == "tree" else sum(len(_turns(tok, "qwen3")) for _ in convs)
        tc = TrainConfig(model=str(model_dir), finetune="full", steps=1, batch_size=rows, packing=True, lr=1e-3,
                         val_split=0.0, val_data=data, val_rows=1, stop_prompts=0, tensorboard=False, warmup=0.0)
        got[turns] = train(data, dc, tc, tmp_path / f"run-{turns}", log=None, progress=False)
    assert got["tree"]["train_losses"] == pytest.approx(got["per-turn"]["train_losses"], abs=1e-5)


# ---------------------------------------------------------------- the vendors' own templates (tests/data/templates)

# template -> the conversation's style (tool calls as OpenAI's messages hold them; each template writes its own)
VENDOR = {"qwen3": "qwen3", "qwq-32b": "qwen3", "deepseek-r1-distill-qwen": "qwen3", "gpt-oss": "gpt-oss",
          "glm-4.6": "qwen3", "nemotron-nano-v2": "qwen3"}


def _vendor(name, bpe_tok):
    import copy
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "templates"
    m = json.loads((folder / "manifest.json").read_text())[name]
    t = copy.deepcopy(bpe_tok)
    t.add_special_tokens({"additional_special_tokens": m["special_tokens"]})
    return t, (folder / f"{name}.jinja").read_text(encoding="utf-8"), tuple(m["generation_stop"])


def _as_field(conv, key):
    """The conversation with each answer's <think> block moved into the message field `key`."""
    out = []
    for m in conv:
        if m["role"] == "assistant" and "</think>" in m.get("content", ""):
            thought, answer = m["content"].split("</think>")
            m = {**m, key: thought.replace("<think>", "").strip(), "content": answer.strip()}
        out.append(m)
    return out


# the reasoning as datasets hold it in a message field, for the templates that read that field
FIELD = {"qwen3-reasoning_content": ("qwen3", "reasoning_content"), "glm-4.6-reasoning_content": (
    "glm-4.6", "reasoning_content")}


@pytest.mark.parametrize("name", list(VENDOR) + list(FIELD))
def test_vendor_reasoning_templates_train_per_turn_losses_in_one_tree_row(bpe_tok, name):
    name, key = FIELD.get(name, (name, None))
    tok, template, stops = _vendor(name, bpe_tok)
    conv = conversation(VENDOR[name], 3)
    if key:
        conv = _as_field(conv, key)
        assert not any("<think>" in m.get("content", "") for m in conv)
    assert any(m.get("tool_calls") for m in conv)
    if name == "deepseek-r1-distill-qwen":  # its template renders calls only without content, arguments as
        for m in conv:  # text, and ends the call block only after a second call
            if m.get("tool_calls"):
                args = json.dumps(m["tool_calls"][0]["function"]["arguments"])
                m.update(content=None, tool_calls=[{"type": "function", "function": {"name": n, "arguments": args}}
                                                   for n in ("lookup", "check")])
    kw = dict(template=template, stop_tokens=stops, control_tokens="parse")  # <think> is the model's own token
    exs = chatmask.encode_turns(conv, tok, **kw)
    assert not chatmask.encode(conv, tok, **kw).prefix_preserving
    row = tree.lay_out(exs)
    assert row is not None and len(row.input_ids) < sum(len(e.input_ids) for e in exs)
    for e, path in zip(exs, row.paths):
        assert [row.input_ids[i] for i in path] == e.input_ids
    model = tiny_llama(tok, layers=2)
    model.config.use_cache = False
    from chatmask.attention import packed_attention

    assert packed_attention(model, "cpu") == "varlen"
    n = sum(e.num_trained for e in exs)
    want = _loss_and_grads(model, [_pack([{"input_ids": e.input_ids, "labels": e.labels} for e in exs], "varlen")], n)
    got = _loss_and_grads(model, [_pack([{"input_ids": row.input_ids, "labels": row.labels,
                                          "tree_ends": row.ends}], "varlen")], n)
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], atol=1e-5, rtol=1e-4, msg=k)


def test_view_draws_the_branches_and_stats_counts_tokens_per_conversation(capsys, tmp_path, tok_dir, monkeypatch):
    """The README's commands: view --turns tree draws each branch after its fork; stats --turns tree says the
    tokens per conversation of the three layouts."""
    from pathlib import Path

    from conftest import cli_main

    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "150")
    data = str(Path(__file__).parent / "data" / "reasoning.jsonl")
    template = (Path(__file__).parent / "data" / "templates" / "qwen3.jinja").read_text(encoding="utf-8")
    rc, out, err = cli_main(capsys, "view", data, "--tokenizer", tok_dir, "--template", template, "--turns", "tree")
    assert rc == 0, err
    assert "a tree: the history once, 1 branch" in out and "┌ after #" in out and "└ after #" in out
    opened = [line for line in out.splitlines() if "┌ after #" in line][0]
    back = [line for line in out.splitlines() if "└ after #" in line][0]
    fork = opened.split("┌ after #")[1].split(":")[0]
    assert back.split("└ after #")[1].split(":")[0] == fork  # the history goes on from the same token
    assert opened.split("│")[2].strip() == back.split("│")[2].strip()  # at the same position
    rc, out, err = cli_main(capsys, "stats", data, "--tokenizer", tok_dir, "--template", template, "--turns", "tree",
                            "--quiet")
    assert rc == 0, err
    assert "tokens per conversation (1): full rendering" in out and "per-turn examples" in out
    with pytest.raises(SystemExit) as e:  # a mistyped value: argparse's usage error, naming the choices
        cli_main(capsys, "view", data, "--tokenizer", tok_dir, "--template", template, "--turns", "trie")
    assert e.value.code == 2 and "choose from 'full', 'per-turn', 'tree'" in capsys.readouterr().err


def test_tree_rows_are_the_same_with_two_processes(tmp_path, tok, tok_dir):
    import datasets

    data = _write(tmp_path, [conversation("qwen3", k) for k in (2, 3, 4)])
    cfg = dict(tokenizer=tok_dir, template=QWEN3, max_length=None, turns="tree")
    prepare(data, DataConfig(**cfg), tmp_path / "one", tokenizer=tok, progress=False)
    prepare(data, DataConfig(**cfg, num_proc=2), tmp_path / "two", tokenizer=tok, progress=False)
    one, two = (datasets.load_from_disk(str(tmp_path / k)) for k in ("one", "two"))
    assert len(one) == 3 and one.to_dict() == two.to_dict()


def test_a_reasoning_field_the_template_does_not_read_is_an_error_naming_the_message(bpe_tok, tmp_path):
    """QwQ's template reads reasoning from the content only: a `reasoning_content` field would go untrained
    without a word; it is an error naming the message and the fix, counted where rows may be skipped."""
    tok, template, stops = _vendor("qwq-32b", bpe_tok)
    conv = _as_field(conversation("qwen3", 2), "reasoning_content")
    for encode in (chatmask.encode, chatmask.encode_turns):
        with pytest.raises(chatmask.ConversationError, match=r"message \d+: its 'reasoning_content' is not in the "
                                                             r"rendering.*<think>"):
            encode(conv, tok, template=template, stop_tokens=stops, control_tokens="parse")


def test_an_answer_before_a_later_user_message_may_lose_its_reasoning_field_by_the_templates_rule(bpe_tok):
    """Qwen3 renders reasoning only after the last user message: a row ending with a user message loses the
    last answer's `reasoning_content` by that rule (what --turns is for), not because the field is unread."""
    tok, template, stops = _vendor("qwen3", bpe_tok)
    conv = _as_field(conversation("qwen3", 2), "reasoning_content") + [{"role": "user", "content": "And then?"}]
    ex = chatmask.encode(conv, tok, template=template, stop_tokens=stops, control_tokens="parse")
    assert ex.num_trained > 0


def test_a_template_that_drops_the_last_answers_reasoning_too_says_so(bpe_tok):
    """DeepSeek-R1-Distill's template strips the <think> block from every answer, the last included: no
    reasoning is trained whatever the layout, and chatmask says so; Qwen3's keeps the last answer's."""
    conv = conversation("qwen3", 2)
    conv = [m for m in conv if m["role"] != "tool" and not m.get("tool_calls")]
    for name, warns in (("deepseek-r1-distill-qwen", True), ("qwen3", False)):
        tok, template, stops = _vendor(name, bpe_tok)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            chatmask.encode_turns(conv, tok, template=template, stop_tokens=stops, control_tokens="parse")
        assert any("drops the <think> block of the last answer" in str(w.message) for w in seen) == warns, name
