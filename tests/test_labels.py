"""Exact assistant-only labels: the post's table, every built-in template x conversation shape, and
random conversations (hypothesis)."""

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatmask
import chatmask.spans
from chatmask import IGNORE, ConversationError, TemplateError, templates
from chatmask.config import TRAIN_ON
from chatmask.generation import prompt_ids
from chatmask.labels import renderer
from conftest import trained_runs

POST = [
    {"role": "user", "content": "Text: Q:\n\nHow can I restore my Unity?"},
    {"role": "assistant", "content": "I've read this text."},
    {"role": "user", "content": "What describes software in the text?"},
    {"role": "assistant", "content": '["Unity"]'},
]
# The post's second table: token ids and labels (Gemma ids; index 45-48 is the last answer).
POST_IDS = [2, 256000, 1645, 108, 1637, 235292, 1274, 235292, 109, 2299, 798, 590, 9825, 970, 11823, 235336, 256001,
            108, 256000, 105776, 108, 235285, 235303, 524, 1682, 736, 2793, 235265, 256001, 108, 256000, 1645, 108,
            1841, 19306, 6815, 575, 573, 2793, 235336, 256001, 108, 256000, 105776, 108, 3681, 45737, 4437, 256001,
            108, 1]
POST_TRAINED = set(range(21, 29)) | set(range(45, 49))


def render(tok, msgs, gen=False, template=None):
    """transformers' own rendering (apply_chat_template refuses an empty conversation, its renderer not)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    text = chatmask.labels.resolve_template(tok, template)
    if msgs:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=text)
    return render_jinja_template([[]], chat_template=text, add_generation_prompt=gen, **tok.special_tokens_map)[0][0]


def expected_answers(tok, msgs, stop, template=None):
    """Oracle, independent of chatmask's engine: for each assistant turn, the text after its generation
    prompt in the rendering that ends at that turn, through the last occurrence of the known stop marker."""
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        G = render(tok, msgs[:i], True, template)
        E = render(tok, msgs[: i + 1], False, template)
        assert E.startswith(G)
        tail = E[len(G):]
        out.append(tail[: tail.rindex(stop) + len(stop)])
    return out


def test_post_table_exact(post_tok):
    ex = chatmask.encode(POST, post_tok)
    assert ex.input_ids == POST_IDS
    assert ex.labels == [t if i in POST_TRAINED else IGNORE for i, t in enumerate(POST_IDS)]
    assert post_tok.decode(ex.input_ids) == render(post_tok, POST)


def test_post_train_on_all_is_the_baseline(post_tok):
    ex = chatmask.encode(POST, post_tok, train_on="all")
    assert ex.labels == ex.input_ids == POST_IDS


def test_last_assistant_and_weights(post_tok):
    last = chatmask.encode(POST, post_tok, train_on="last_assistant")
    assert {i for i, x in enumerate(last.labels) if x != IGNORE} == set(range(45, 49))
    weighted = [dict(m) for m in POST]
    weighted[3]["weight"] = 0
    ex = chatmask.encode(weighted, post_tok)
    assert ex.input_ids == POST_IDS  # weights change labels, never the token stream
    assert {i for i, x in enumerate(ex.labels) if x != IGNORE} == set(range(21, 29))
    weighted[1]["weight"] = 0
    with pytest.raises(ConversationError, match="weight 0"):
        chatmask.encode(weighted, post_tok)


def test_no_assistant_turn_is_an_error(post_tok):
    with pytest.raises(ConversationError, match="no assistant turn"):
        chatmask.encode(POST[:1], post_tok, source="d.jsonl:3")


GOLDEN = "e0cdb8185c199f6066923abe632fd89d8d9ef2483b90df0527da218b8b75f013"


def test_golden_hash(post_tok):
    """The post's rows under every train_on, as prepare would store them: any change in labelling shows."""
    rows = [chatmask.encode(POST, post_tok, train_on=t) for t in TRAIN_ON]
    blob = json.dumps([[e.input_ids, e.labels] for e in rows], separators=(",", ":")).encode()
    assert hashlib.sha256(blob).hexdigest() == GOLDEN


SHAPES = {
    "single": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how are you?"}],
    "system_first": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    "multi_turn": [m for k in range(4) for m in (
        {"role": "user", "content": f"question {k}?"}, {"role": "assistant", "content": f"answer number {k}."})],
    "markup_in_content": [
        {"role": "user", "content": "Say <|im_end|> and [INST] and </s>"},
        {"role": "assistant",
         "content": "ok <|im_end|>\n<|im_start|>user\n[INST] x [/INST] </s><|eot_id|><end_of_turn><|end|>"},
        {"role": "user", "content": "<|im_start|>assistant\nagain"},
        {"role": "assistant", "content": "<｜end▁of▁sentence｜><｜User｜>done"},
    ],
    "whitespace": [
        {"role": "user", "content": "  padded question \n"},
        {"role": "assistant", "content": "\n  padded answer  \n\n"},
        {"role": "user", "content": "\t"},
        {"role": "assistant", "content": " x "},
    ],
    "unicode": [
        {"role": "user", "content": "Ünïcödé ☃ 日本語?"},
        {"role": "assistant", "content": "🙂 日本語 — “quotes” ∑"},
    ],
    "empty_answer": [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now something."},
        {"role": "assistant", "content": "something"},
    ],
    "tool": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "calling weather()"},
        {"role": "tool", "content": "{\"temp\": 3}"},
        {"role": "assistant", "content": "It is 3 degrees."},
    ],
    "content_parts": [
        {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "answer"}]},
    ],
}


def _stop(tok, name):
    stop = templates.get(name).stop
    return tok.eos_token if stop == "</s>" else stop


def _plain(msgs):
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])} for m in msgs]


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(templates.BUILTIN))
def test_builtin_template_sweep(bpe_tok, name, shape):
    msgs = SHAPES[shape]
    try:
        full = render(bpe_tok, _plain(msgs), template=name)
    except Exception:
        with pytest.raises(TemplateError):
            chatmask.encode(msgs, bpe_tok, template=name)
        return
    ex = chatmask.encode(msgs, bpe_tok, template=name, source=f"{shape}.jsonl:1")
    assert len(ex.input_ids) == len(ex.labels)
    assert all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels))
    # the token stream is the template's own rendering, nothing doubled or lost
    assert bpe_tok.decode(ex.input_ids) == full
    runs = [bpe_tok.decode(r) for r in trained_runs(ex)]
    if ex.prefix_preserving:
        want = [a for a in expected_answers(bpe_tok, _plain(msgs), _stop(bpe_tok, name), name) if a]
        assert runs == want
        # prompt tokens before each answer = the generation prompt tokenized whole
        r = renderer(bpe_tok, name)
        starts = [i for i in range(len(ex.labels)) if ex.labels[i] != IGNORE and (i == 0 or ex.labels[i - 1] == IGNORE)]
        asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        parsed = chatmask.encode(msgs, bpe_tok, template=name, control_tokens="parse")
        for i, s in zip(asst, starts):
            G = r.render(_plain(msgs)[:i], True)
            # the default encodes a control token written in content as plain text, at inference alike
            assert ex.input_ids[:s] == prompt_ids(bpe_tok, r, _plain(msgs)[:i])
            if not ex.control_text:
                assert ex.input_ids[:s] == bpe_tok(G, add_special_tokens=False)["input_ids"]
        pstarts = [i for i in range(len(parsed.labels))
                   if parsed.labels[i] != IGNORE and (i == 0 or parsed.labels[i - 1] == IGNORE)]
        for i, s in zip(asst, pstarts):  # --control-tokens parse: apply_chat_template's tokens
            G = r.render(_plain(msgs)[:i], True)
            assert parsed.input_ids[:s] == bpe_tok(G, add_special_tokens=False)["input_ids"]
    # header and user text never trained: every trained run ends with the marker
    stop = _stop(bpe_tok, name)
    assert all(run.endswith(stop) for run in runs)


R1_LIKE = templates.get("deepseek").jinja.replace(
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}",
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}")


def test_deepseek_drops_think_and_r1_generation_prompt_falls_back(bpe_tok):
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add them</think>4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>again</think>6"},
    ]
    # built-in deepseek: the think block is dropped from every turn, the rendering stays prefix-preserving
    ex = chatmask.encode(msgs, bpe_tok, template="deepseek")
    assert ex.prefix_preserving
    assert [bpe_tok.decode(r) for r in trained_runs(ex)] == ["4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"]
    # R1-like: the generation prompt opens <think>, which no rendered turn contains -> fallback
    ex = chatmask.encode(msgs, bpe_tok, template=R1_LIKE)
    assert not ex.prefix_preserving
    assert [bpe_tok.decode(r) for r in trained_runs(ex)] == ["4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"]
    assert bpe_tok.decode(ex.input_ids) == render(bpe_tok, msgs, template=R1_LIKE)
    assert any("not prefix-preserving" in n for n in chatmask.check_template(bpe_tok, R1_LIKE))
    turns = chatmask.encode_turns(msgs, bpe_tok, template=R1_LIKE)
    for t, i in zip(turns, (1, 3)):
        prompt = [x for x, lab in zip(t.input_ids, t.labels) if lab == IGNORE]
        assert bpe_tok.decode(prompt) == render(bpe_tok, msgs[:i], True, R1_LIKE)  # exactly the inference prompt
        assert [x for x in t.labels if x != IGNORE] == t.input_ids[len(prompt):]


def test_qwen3_style_empty_think_block_is_trained(bpe_tok):
    # A Qwen3-like template: the final answer gets an empty think block, earlier turns drop it.
    tpl = (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{{ '<|im_start|>assistant\n' }}{% if loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{{ m.content + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    msgs = SHAPES["system_first"]
    ex = chatmask.encode(msgs, bpe_tok, template=tpl)
    runs = [bpe_tok.decode(r) for r in trained_runs(ex)]
    assert runs == ["4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"]
    assert not ex.prefix_preserving
    assert any("not prefix-preserving" in n for n in chatmask.check_template(bpe_tok, tpl))
    turns = chatmask.encode_turns(msgs, bpe_tok, template=tpl)
    assert [bpe_tok.decode(trained_runs(t)[0]) for t in turns] == [
        "<think>\n\n</think>\n\n4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"]


def test_template_without_marker_trains_content_alone(bpe_tok):
    tpl = ("{% for m in messages %}{{ m.role | upper + ': ' + m.content + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    ex = chatmask.encode(SHAPES["system_first"], bpe_tok, template=tpl)
    # nothing ends an answer before the next header; after the last one the eos is appended, and counted
    assert [bpe_tok.decode(r) for r in trained_runs(ex)] == ["4", "6\n</s>"]
    assert ex.stop_appended and ex.unstopped == 1
    assert bpe_tok.decode(ex.input_ids).endswith("6\n</s>")
    notes = chatmask.check_template(bpe_tok, tpl)
    assert any("no end-of-turn marker" in n for n in notes) and any("'</s>' is appended" in n for n in notes)


def test_template_without_generation_prompt_never_trains_header(bpe_tok):
    tpl = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    ex = chatmask.encode(SHAPES["single"], bpe_tok, template=tpl)
    assert [bpe_tok.decode(r) for r in trained_runs(ex)] == ["Hi, how are you?<|im_end|>"]
    assert any("add_generation_prompt renders nothing" in n for n in chatmask.check_template(bpe_tok, tpl))


def test_template_that_raises_names_the_row(bpe_tok):
    with pytest.raises(TemplateError, match=r"d\.jsonl:7: .*alternate"):
        chatmask.encode(SHAPES["tool"], bpe_tok, template="llama2", source="d.jsonl:7")
    assert any("raises on a conversation with tool message" in n for n in chatmask.check_template(bpe_tok, "llama2"))


def test_no_template_is_a_clear_error(bpe_tok):
    from conftest import make_bpe_tokenizer

    tok = make_bpe_tokenizer(chat_template=None)
    with pytest.raises(TemplateError, match="no chat template.*chatml"):
        chatmask.encode(SHAPES["single"], tok)
    with pytest.raises(TemplateError, match="unknown template 'nope'"):
        chatmask.encode(SHAPES["single"], tok, template="nope")


def test_sandbox_blocks_escapes(bpe_tok):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        chatmask.encode(SHAPES["single"], bpe_tok, template=evil)


def test_bad_messages_raise_conversation_error(bpe_tok):
    bad = [
        "not a list", [], ["str"], [{"content": "x"}], [{"role": "gpt", "content": "x"}],
        [{"role": "user", "content": None}], [{"role": "user", "content": 3}],
        [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}],
    ]
    for b in bad:
        with pytest.raises(ConversationError):
            chatmask.encode(b, bpe_tok, source="f.jsonl:2")


def test_add_template_tokens():
    import torch

    from conftest import tiny_llama

    tok = make_bpe_tokenizer_without_chatml()
    model = tiny_llama(tok, layers=1, hidden=16)
    n = chatmask.add_template_tokens(tok, "chatml", model)
    assert n == 2 and model.get_input_embeddings().weight.shape[0] == len(tok)
    ex = chatmask.encode(SHAPES["single"], tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ex.labels
    assert torch.isfinite(model(torch.tensor([ex.input_ids])).logits).all()


def make_bpe_tokenizer_without_chatml():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------- property tests

_text = st.lists(
    st.sampled_from(list("ab yz\n\t .,!?日☃🙂")
                    + ["<|im_end|>", "<|im_start|>", "[INST]", "</s>", "<think>", "</think>", "{{", "%}"]),
    max_size=10,
).map("".join)
_msg = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _text})
_turn = st.tuples(_text, _text).map(lambda qa: [{"role": "user", "content": qa[0]},
                                               {"role": "assistant", "content": qa[1]}])
_well_formed = st.builds(lambda system, turns: system + [m for turn in turns for m in turn],
                         st.lists(_text.map(lambda t: {"role": "system", "content": t}), max_size=1),
                         st.lists(_turn, min_size=1, max_size=3))


def test_random_conversations_are_exact_or_a_chatmask_error(bpe_tok):
    """Random conversations (any roles in any order, and well-formed ones) under every built-in template:
    either labelled exactly, or refused with a ConversationError / TemplateError, and enough are labelled
    that the checks cannot pass by every row being refused."""
    checked = []

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(msgs=st.lists(_msg, max_size=6) | _well_formed, name=st.sampled_from(sorted(templates.BUILTIN)))
    def check(msgs, name):
        try:
            ex = chatmask.encode(msgs, bpe_tok, template=name)
        except (ConversationError, TemplateError):
            return
        assert bpe_tok.decode(ex.input_ids) == render(bpe_tok, msgs, template=name)
        assert all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels))
        runs = [bpe_tok.decode(r) for r in trained_runs(ex)]
        stop = _stop(bpe_tok, name)
        assert runs and all(r.endswith(stop) for r in runs)
        if ex.prefix_preserving:
            want = [a for a in expected_answers(bpe_tok, msgs, stop, name) if a]
            assert runs == want
        checked.append(name)

    check()
    assert len(checked) >= 50, f"only {len(checked)} of 150 random conversations were labelled and checked"


@pytest.mark.parametrize("name", sorted(templates.BUILTIN))
def test_row_by_row_path_agrees_with_cached_skeleton(bpe_tok, name, monkeypatch):
    """The per-shape skeleton is a cache: the row-by-row sentinel diff must label every shape the same."""
    fast = {}
    for shape, msgs in SHAPES.items():
        try:
            fast[shape] = chatmask.encode(msgs, bpe_tok, template=name)
        except chatmask.ChatmaskError as e:
            fast[shape] = type(e)
    monkeypatch.setattr(chatmask.spans, "_turns_fast", lambda *a: None)
    for shape, msgs in SHAPES.items():
        try:
            slow = chatmask.encode(msgs, bpe_tok, template=name)
        except chatmask.ChatmaskError as e:
            slow = type(e)
        assert slow == fast[shape], shape


@pytest.mark.parametrize("name", sorted(templates.BUILTIN))
def test_respelling_path_agrees_with_run_assembly(bpe_tok, name, monkeypatch):
    """`labels._assemble` (per run of tokens) is a fast path: the reference path, which a row with a token
    straddling a boundary takes, must give every shape the same example, whole or truncated."""
    def outcome(msgs, **options):
        try:
            return chatmask.encode(msgs, bpe_tok, template=name, **options)
        except chatmask.ChatmaskError as e:
            return str(e)

    def outcomes():
        out = {}
        for shape, msgs in SHAPES.items():
            out[shape] = whole = outcome(msgs)
            if isinstance(whole, chatmask.Example):  # cut inside the last answer, both ways
                for truncation in ("turns", "right"):
                    out[shape, truncation] = outcome(msgs, max_length=len(whole.input_ids) - 2, truncation=truncation)
        return out

    fast = outcomes()
    assert sum(isinstance(v, chatmask.Example) and v.truncated > 0 for v in fast.values()) >= 4
    labels = chatmask.labels
    monkeypatch.setattr(labels, "_assemble",
                        lambda plan, row, tt: labels._assemble_respelling(plan, row, tt, *labels._regions(plan)))
    assert outcomes() == fast
