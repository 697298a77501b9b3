"""Entity F1 by generation: parsing, normalising and scoring by hand, generation with a tiny random Llama."""

import itertools
import json
import random

import pytest
import torch
from conftest import UNINER, make_bpe_tokenizer, tiny_llama

from chatmask import conversations, metrics
from chatmask.errors import ChatmaskError
from chatmask.labels import renderer
from chatmask.metrics import first_list, generate_answers, ner_f1, ner_questions, normalize, parse_entities, score


def _ner(passage, *qa):
    msgs = [{"role": "user", "content": f"Text: {passage}"}, {"role": "assistant", "content": "I've read this text."}]
    for etype, answer in qa:
        msgs += [{"role": "user", "content": f"What describes {etype} in the text?"},
                 {"role": "assistant", "content": answer if isinstance(answer, str) else json.dumps(answer)}]
    return msgs


CONVS = [
    _ner("Ann met Bob in Paris.", ("person", ["Ann", "Bob"]), ("location", ["Paris"])),
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    _ner("Unity and Godot are engines.", ("software", ["Unity", "Godot"]), ("person", [])),
]


# ---------------------------------------------------------------- parse_entities


@pytest.mark.parametrize("text, want", [
    ('["Unity", "Godot"]', ["Unity", "Godot"]),
    ('  ["Unity", 3, null, ["x"], {"a": 1}, "Godot"]\n', ["Unity", "Godot"]),  # non-strings dropped
    ("I cannot find any entity.", []),
    ('["Unity", "Go', []),  # cut off by max_new_tokens: unparseable
    ('["Unity"]<|im_end|>', ["Unity"]),
    ('["Unity"]<|im_end|>\n<|im_start|>user\n["Godot"]', ["Unity"]),
    ('Sure! The entities are ["Unity"] and that is all.', ["Unity"]),
    ('[see note: ["Unity"]', ["Unity"]),  # a "[" that starts no JSON value is passed over
    ("[]", []),
    ("", []),
    ('{"a": ["Unity"]}', ["Unity"]),  # the first list in the text, wherever it is
])
def test_parse_entities(text, want):
    assert parse_entities(text) == want


def test_parse_entities_stops_at_the_given_marker():
    assert parse_entities('junk<|im_end|>["Godot"]', "<|im_end|>") == []
    assert parse_entities('junk<|im_end|>["Godot"]') == ["Godot"]
    assert parse_entities(None) == []


# ---------------------------------------------------------------- normalize and score


def test_normalize():
    assert normalize('  "Gaussian   Mixture\tModel". ') == "gaussian mixture model"
    assert normalize("U.S.") == "u.s"
    assert normalize("'Unity',") == "unity"
    assert normalize("C++") == "c++"
    assert normalize(" . ") == ""


def test_score_by_hand():
    pred = [["Unity", "unity ", "Godot"], [], ["X"]]  # duplicate after normalising counts once
    gold = [["Unity", "Blender"], ["A"], []]
    s = score(pred, gold, ["software", "software", "person"])
    # q0: tp unity, fp godot, fn blender; q1: fn a; q2: fp x
    assert (s["tp"], s["fp"], s["fn"], s["questions"]) == (1, 2, 2, 3)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(1 / 3)
    sw, pe = s["per_type"]["software"], s["per_type"]["person"]
    assert (sw["tp"], sw["fp"], sw["fn"], sw["questions"]) == (1, 1, 2, 2)
    assert (sw["precision"], sw["recall"]) == (pytest.approx(0.5), pytest.approx(1 / 3))
    assert sw["f1"] == pytest.approx(0.4)
    assert pe == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 0, "questions": 1}
    assert "per_type" not in score(pred, gold)


def test_score_pairs_are_per_question_and_zero_over_zero_is_zero():
    s = score([["a"], ["a"]], [["a"], []])  # the same string in two questions: two pairs
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0) and s["precision"] == 0.5 and s["recall"] == 1.0
    assert s["f1"] == pytest.approx(2 / 3)
    for pred, gold in (([], []), ([[]], [[]]), ([[""]], [[" "]])):
        z = score(pred, gold)
        assert (z["precision"], z["recall"], z["f1"], z["tp"], z["fp"], z["fn"]) == (0.0,) * 3 + (0,) * 3
    e = score([[], []], [["a", "b"], ["c"]])  # nothing predicted
    assert (e["precision"], e["recall"], e["f1"], e["fn"]) == (0.0, 0.0, 0.0, 3)
    with pytest.raises(ChatmaskError, match="one prediction"):
        score([["a"]], [])


# ---------------------------------------------------------------- ner_questions


def test_ner_questions():
    convs = CONVS + [
        _ner("x", ("person", "not json")),  # skipped: answer not a JSON list
        _ner("x", ("person", [1, "a"])),  # skipped: not all strings
        [{"role": "user", "content": "  What describes person in the text?\n"},
         {"role": "assistant", "content": '["B"]'}],
    ]
    qs = ner_questions(convs)
    assert [(len(p), t, g) for p, t, g in qs] == [
        (3, "person", ["Ann", "Bob"]), (5, "location", ["Paris"]),
        (3, "software", ["Unity", "Godot"]), (5, "person", []), (1, "person", ["B"]),
    ]
    assert qs[1][0] == CONVS[0][:5] and qs[1][0][-1]["content"] == "What describes location in the text?"
    conv = conversations.Conversation(CONVS[0], "x.json:1")
    assert [t for _, t, _ in ner_questions([conv])] == ["person", "location"]


@pytest.mark.skipif(not UNINER.exists(), reason="../shared/data/uniner absent")
def test_ner_questions_on_crossner_rows():
    rows = list(itertools.islice(conversations.load(str(UNINER / "CrossNER_AI.json")), 20))
    qs = ner_questions(rows)
    assert len(qs) == 20 and all(p[-1]["role"] == "user" and p[0]["content"].startswith("Text: ") for p, _, _ in qs)
    assert any(g for _, _, g in qs)


# ---------------------------------------------------------------- generation


def _tiny_llama():
    # initializer_range 0.2 (not 0.02): at the default a random model gives every prompt the same answer
    return tiny_llama(TOK, initializer_range=0.2)


TOK = make_bpe_tokenizer()


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


def test_generate_answers_batched_equals_one_by_one(model):
    prompts = [p for p, _, _ in ner_questions(CONVS)]  # four prompts of different lengths
    batched = generate_answers(model, TOK, prompts, max_new_tokens=8, batch_size=4)
    single = generate_answers(model, TOK, prompts, max_new_tokens=8, batch_size=1)
    assert len(batched) == 4 and all(isinstance(a, str) for a in batched)
    assert len(set(batched)) > 1  # the answers depend on the prompt, so a padding error would show
    assert batched == single


def test_ner_f1_end_to_end(model):
    res = ner_f1(model, TOK, CONVS, max_new_tokens=8, batch_size=3)
    qs = ner_questions(CONVS)
    raw = generate_answers(model, TOK, [p for p, _, _ in qs], max_new_tokens=8)
    want = score([parse_entities(a) for a in raw], [g for _, _, g in qs], [t for _, t, _ in qs])
    want.update(with_entities=sum(bool(g) for _, _, g in qs), parsed=sum(first_list(a) is not None for a in raw),
                questions_sha256=res["questions_sha256"])
    assert res["questions_sha256"] != ner_f1(model, TOK, CONVS[1:], max_new_tokens=2)["questions_sha256"]
    assert {k: v for k, v in res.items() if k != "examples"} == want
    assert res["questions"] == 4 and set(res["per_type"]) == {"person", "location", "software"}
    assert all(0.0 <= res[k] <= 1.0 for k in ("precision", "recall", "f1"))
    assert [e["raw"] for e in res["examples"]] == raw
    assert res["examples"][0]["type"] == "person" and res["examples"][0]["gold"] == ["Ann", "Bob"]
    assert ner_f1(model, TOK, CONVS, max_questions=2, max_new_tokens=2)["questions"] == 2


def test_generate_answers_with_a_peft_model():
    from peft import LoraConfig, get_peft_model

    prompts = [p for p, _, _ in ner_questions(CONVS[:1])]
    plain = generate_answers(_tiny_llama(), TOK, prompts, max_new_tokens=6)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(_tiny_llama(), lora)
    peft_model.train()
    assert generate_answers(peft_model, TOK, prompts, max_new_tokens=6) == plain  # LoRA B starts at zero
    assert peft_model.training  # the caller's mode is restored


class _EchoLM(torch.nn.Module):
    """Answers `["<number of real prompt tokens>"]`, then the end-of-turn marker, then padding."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kw):
        assert not self.training and not torch.is_grad_enabled()
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "eos": eos_token_id,
                           "pad": pad_token_id})
        rows = []
        for n in attention_mask.sum(1).tolist():
            ids = TOK(json.dumps([str(n)]), add_special_tokens=False)["input_ids"]
            ids = ids + [TOK.convert_tokens_to_ids("<|im_end|>")]
            rows.append(ids + [pad_token_id] * (max_new_tokens - len(ids)))
        return torch.cat([input_ids, torch.tensor(rows)], 1)


def test_generate_answers_left_pads_and_decodes_only_new_tokens():
    prompts = [p for p, _, _ in ner_questions(CONVS)]
    lm = _EchoLM()
    out = generate_answers(lm, TOK, prompts, max_new_tokens=12, batch_size=8)
    r = renderer(TOK)
    lengths = [len(TOK(r.render(p, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
               for p in prompts]
    assert out == [json.dumps([str(n)]) for n in lengths]  # in the caller's order, marker and padding skipped
    (call,) = lm.calls
    ids, mask = call["input_ids"], call["attention_mask"]
    assert mask[:, -1].all() and (ids[mask == 0] == TOK.pad_token_id).all()  # padding on the left
    assert call["eos"] == [TOK.convert_tokens_to_ids("<|im_end|>"), TOK.eos_token_id]  # the trained stop first
    assert call["pad"] == TOK.pad_token_id
    assert lm.training  # restored


def test_perfect_and_garbage_models(monkeypatch):
    qs = ner_questions(CONVS)

    def perfect(model, tok, prompts, **kw):
        return [json.dumps(next(g for pr, _, g in qs if pr == p)) + "<|im_end|>" for p in prompts]

    monkeypatch.setattr(metrics, "generate_answers", perfect)
    res = ner_f1(None, TOK, CONVS)
    assert (res["precision"], res["recall"], res["f1"], res["fp"], res["fn"]) == (1.0, 1.0, 1.0, 0, 0)
    assert res["examples"][0]["predicted"] == ["Ann", "Bob"]
    monkeypatch.setattr(metrics, "generate_answers", lambda model, tok, prompts, **kw: ["I don't know."] * len(prompts))
    res = ner_f1(None, TOK, CONVS)
    assert (res["f1"], res["tp"], res["fn"]) == (0.0, 0, 5)


def test_parsed_counts_answers_holding_a_list(monkeypatch):
    answers = iter(['["Ann"]', "Ann and Bob", "[]", "no list here"])
    monkeypatch.setattr(metrics, "generate_answers", lambda model, tok, prompts, **kw: [next(answers) for _ in prompts])
    res = ner_f1(None, TOK, CONVS)
    assert res["questions"] == 4 and res["parsed"] == 2 and res["tp"] == 1


def test_pick_questions_mostly_with_entities_and_fixed():
    qs = [([{"k": k}], "t", [f"e{k}"] if k % 4 == 0 else []) for k in range(200)]  # 50 with entities
    a = metrics.pick_questions(qs, 40)
    assert a == metrics.pick_questions(qs, 40)  # the same sample every time: every arm scores the same questions
    assert len(a) == 40 and sum(bool(g) for _, _, g in a) == 32
    assert [qs.index(q) for q in a] == sorted(qs.index(q) for q in a)  # original order kept
    b = metrics.pick_questions(qs, 100)  # 50 with entities: the 4:1 ratio keeps 12 or 13 empty ones
    assert sum(bool(g) for _, _, g in b) == 50 and len(b) - 50 == round(50 * 0.2 / 0.8)
    few_empty = [q for q in qs if q[2]] + qs[1:4]  # 3 empty ones: the rest with entities
    assert len(metrics.pick_questions(few_empty, 20)) == 20
    assert metrics.pick_questions(qs, None) == qs
    assert len(metrics.pick_questions(qs, 10, with_entities=1.0)) == 10
    with pytest.raises(metrics.ChatmaskError, match="with_entities"):
        metrics.pick_questions(qs, 10, with_entities=0)


def test_bootstrap_f1_intervals():
    rng = random.Random(0)
    good = [[1, 0, 0] if rng.random() < 0.7 else [0, 1, 1] for _ in range(200)]
    bad = [[1, 0, 0] if rng.random() < 0.3 else [0, 1, 1] for _ in range(200)]
    out = metrics.bootstrap_f1({"good": [good, good], "bad": [bad, bad]})
    f1 = lambda rows: 2 * sum(r[0] for r in rows) / sum(2 * r[0] + r[1] + r[2] for r in rows)  # noqa: E731
    for arm, rows in (("good", good), ("bad", bad)):
        lo, hi = out[arm]
        assert lo < f1(rows) < hi and hi - lo < 0.15
    assert out["difference"][0] > 0.2  # 0.7 vs 0.3 of 200: clearly apart
    same = metrics.bootstrap_f1({"a": [good], "b": [good]})
    assert same["difference"] == [0.0, 0.0]  # paired: the same answers never differ
    close = metrics.bootstrap_f1({"a": [good], "b": [good[:100] + bad[100:]]})
    assert close["difference"][0] < close["difference"][1]
    with pytest.raises(metrics.ChatmaskError, match="same items"):
        metrics.bootstrap_f1({"a": [good], "b": [good[:10]]})


def test_paired_bootstrap_of_a_mean_loss_over_rows():
    rows_a = [[2.0 * n, n] for n in range(1, 41)]  # every row's mean loss 2.0
    rows_b = [[2.5 * n, n] for n in range(1, 41)]  # 2.5
    out = metrics.paired_bootstrap({"a": rows_a, "b": rows_b}, metrics.ratio_of)
    assert out["a"] == [2.0, 2.0] and out["difference"] == [-0.5, -0.5]  # paired: no row-to-row noise
    noisy = [[(2.0 + (0.8 if k % 2 else -0.8)) * n, n] for k, n in enumerate(range(1, 41))]
    lo, hi = metrics.paired_bootstrap({"a": noisy, "b": rows_a}, metrics.ratio_of)["difference"]
    assert lo < 0 < hi  # the same mean loss give or take row noise: the interval holds 0
    with pytest.raises(metrics.ChatmaskError, match="same items"):
        metrics.paired_bootstrap({"a": rows_a, "b": rows_b[:5]}, metrics.ratio_of)
