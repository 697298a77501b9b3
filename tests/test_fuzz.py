"""Fuzzing the loaders and the labeller (slow): random bytes edits of valid files, random JSON rows, and
random conversations through load + encode must give Conversations / Examples or a ChatmaskError,
never another exception. `python -m pytest -m slow tests/test_fuzz.py` (about a minute)."""

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatmask
from chatmask import conversations

pytestmark = pytest.mark.slow

VALID = [{"messages": [{"role": "user", "content": f"q{k} ünï ☃"}, {"role": "assistant", "content": f"a{k}"}]}
         for k in range(6)] + [{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]


def _consume(path):
    report = conversations.LoadReport()
    try:
        convs = list(conversations.load(path, skip_invalid=True, salvage=True, report=report))
    except chatmask.ChatmaskError:
        return []
    for c in convs:
        conversations.validate(c.messages, c.source)
    return convs


def test_byte_mutations_of_valid_files(tmp_path):
    rnd = random.Random(1234)
    seeds = {"d.jsonl": "\n".join(json.dumps(r) for r in VALID).encode(),
             "d.json": json.dumps(VALID, indent=1, ensure_ascii=False).encode()}
    outcomes = {"rows kept": 0, "nothing kept": 0}
    for _ in range(1500):
        name, data = rnd.choice(sorted(seeds.items()))
        b = bytearray(data)
        for _ in range(rnd.randint(1, 8)):
            op = rnd.random()
            i = rnd.randrange(len(b) + 1)
            if op < 0.4 and b:
                del b[i % len(b): i % len(b) + rnd.randint(1, 20)]
            elif op < 0.8:
                b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 6)))
            else:
                b = b[: rnd.randrange(len(b) + 1)]
        p = tmp_path / name
        p.write_bytes(bytes(b))
        outcomes["rows kept" if _consume(str(p)) else "nothing kept"] += 1
    # the edits exercised both paths: files that still give conversations, and files rejected with a
    # ChatmaskError (any other exception fails the test above)
    assert outcomes["rows kept"] > 100 and outcomes["nothing kept"] > 100, outcomes


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda ch: st.lists(ch, max_size=4) | st.dictionaries(
                         st.sampled_from(["role", "content", "messages", "conversations", "from", "value", "weight",
                                          "type", "text", "prompt", "completion", "instruction", "output", "x"]),
                         ch, max_size=4), max_leaves=12)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(_json, min_size=1, max_size=5))
def test_random_json_rows(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("f") / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    for c in _consume(str(p)):  # what load keeps is a valid conversation in the one message shape
        assert all(m["role"] in ("system", "user", "assistant", "tool") for m in c.messages)
        assert any(m["role"] == "assistant" for m in c.messages)


_msg = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool"]),
    "content": st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
    | st.sampled_from(["<|im_end|>", "<|im_start|>assistant\n", " \n ", "", "\ue000"]),
}, optional={"weight": st.sampled_from([0, 1])})


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(_msg, max_size=6), name=st.sampled_from([None, "chatml", "llama3", "gemma", "llama2", "deepseek"]))
def test_random_conversations_load_and_encode(bpe_tok, tmp_path_factory, msgs, name):
    p = tmp_path_factory.mktemp("c") / "d.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    for c in _consume(str(p)):
        try:
            ex = chatmask.encode(c.messages, bpe_tok, template=name)
        except chatmask.ChatmaskError:
            continue
        assert len(ex.input_ids) == len(ex.labels) and ex.num_trained > 0
