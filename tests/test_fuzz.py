"""Fuzzing the loaders and the labeller (slow): random bytes edits of valid files, random JSON rows, and
random conversations through load + encode must give Conversations / Examples or the error bad data may
raise (ConversationError; TemplateError where a template refuses a conversation), never another one; and
enough of the cases must get through to the checks for a pass to mean something.
`python -m pytest -m slow tests/test_fuzz.py` (about a minute)."""

import json
import random
from collections import Counter

import pytest
from conftest import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatmask
from chatmask import conversations
from chatmask.errors import ConversationError, TemplateError

pytestmark = pytest.mark.slow

VALID = [{"messages": [{"role": "user", "content": f"q{k} ünï ☃"}, {"role": "assistant", "content": f"a{k}"}]}
         for k in range(6)] + [{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]
ROLES = ("system", "user", "assistant", "tool")


def _consume(path) -> list:
    """What load keeps of the file, each kept conversation valid, every row kept or counted; [] where the
    whole file is refused, with the one error that bad data may raise."""
    report = conversations.LoadReport()
    try:
        convs = list(conversations.load(path, skip_invalid=True, salvage=True, report=report))
    except ConversationError:
        return []
    for c in convs:
        conversations.validate(c.messages, c.source)
        assert all(m["role"] in ROLES for m in c.messages) and any(m["role"] == "assistant" for m in c.messages)
    assert report.rows_kept == len(convs)
    if not report.salvaged_from:  # a salvaged array counts only the complete records it kept
        assert report.rows_read == report.rows_kept + sum(report.dropped.values()), report
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
    # ConversationError (any other exception fails the test above)
    assert outcomes["rows kept"] > 100 and outcomes["nothing kept"] > 100, outcomes


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda ch: st.lists(ch, max_size=4) | st.dictionaries(
                         st.sampled_from(["role", "content", "messages", "conversations", "from", "value", "weight",
                                          "type", "text", "prompt", "completion", "instruction", "output", "x"]),
                         ch, max_size=4), max_leaves=12)
_pairs = st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), min_size=1, max_size=3)
# a row of each format, which random JSON then may overwrite a key of: the loader's paths past the shape check
_row = st.one_of(
    _pairs.map(lambda ps: {"messages": [{"role": r, "content": c} for q, a in ps
                                        for r, c in (("user", q), ("assistant", a))]}),
    _pairs.map(lambda ps: {"conversations": [{"from": r, "value": c} for q, a in ps
                                             for r, c in (("human", q), ("gpt", a))]}),
    st.fixed_dictionaries({"instruction": st.text(max_size=8), "output": st.text(max_size=8)},
                          optional={"input": st.text(max_size=8), "system": st.text(max_size=8)}),
    st.fixed_dictionaries({"prompt": st.text(max_size=8), "completion": st.text(max_size=8)}),
)
_row = st.tuples(_row, st.dictionaries(st.sampled_from(["messages", "content", "output", "x"]), _json, max_size=1))
_row = _row.map(lambda r: {**r[0], **r[1]})
MIN_CHECKED = 0.25  # of the examples: kept conversations checked (about half are; a pass with none means nothing)


def test_random_json_rows(tmp_path):
    seen = Counter()

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(_row | _json, min_size=1, max_size=5))
    def check(rows):
        seen["examples"] += 1
        seen["checked"] += bool(_consume(write_jsonl(tmp_path / "d.jsonl", rows)))

    check()
    assert seen["checked"] >= MIN_CHECKED * seen["examples"], seen


_content = (st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
            | st.sampled_from(["<|im_end|>", "<|im_start|>assistant\n", " \n ", "", "\ue000"]))


def _message(role):
    return st.fixed_dictionaries({"role": role, "content": _content}, optional={"weight": st.sampled_from([0, 1])})


# random role orders (mostly refused by load) and conversations in a valid order (mostly encoded)
_messages = st.lists(_message(st.sampled_from(ROLES)), max_size=6) | st.tuples(
    st.lists(_message(st.just("system")), max_size=1),
    st.lists(st.tuples(_message(st.just("user")), _message(st.just("assistant"))), min_size=1, max_size=3),
).map(lambda t: t[0] + [m for pair in t[1] for m in pair])


def test_random_conversations_load_and_encode(bpe_tok, tmp_path):
    seen = Counter()

    @settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
    @given(msgs=_messages, name=st.sampled_from([None, "chatml", "llama3", "gemma", "llama2", "deepseek"]))
    def check(msgs, name):
        seen["examples"] += 1
        for c in _consume(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])):
            try:
                ex = chatmask.encode(c.messages, bpe_tok, template=name)
            except (ConversationError, TemplateError) as e:  # a template that refuses it; an answer cut to nothing
                seen[f"{type(e).__name__}: {e.reason}"] += 1
                continue
            assert len(ex.input_ids) == len(ex.labels) and ex.num_trained > 0
            seen["checked"] += 1

    check()
    assert seen["checked"] >= MIN_CHECKED * seen["examples"], seen
