"""Chat rows to messages (conversations.py): every row format, validation and its error catalogue, the
drop report of --skip-invalid, and random rows (hypothesis) that either load or raise ConversationError.
Reading the files themselves: test_sources.py (which uses the helpers here)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmask import ConversationError
from chatmask import conversations as cv
from chatmask.conversations import LoadReport, detect_format, load, to_messages, validate
from conftest import write_jsonl

U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
OK = {"messages": [U, A]}


def jsonl(tmp_path, rows, name="data.jsonl") -> str:
    return write_jsonl(tmp_path / name, rows)


def write(tmp_path, data, name="data.json"):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(p)


def one_error(path, **kw) -> ConversationError:
    with pytest.raises(ConversationError) as e:
        list(load(path, **kw))
    return e.value


# ---------------------------------------------------------------- formats


SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
    {"from": "user", "value": "Call it"}, {"from": "function_call", "value": '{"name": "f"}'},
    {"from": "observation", "value": "42"}, {"from": "chatgpt", "value": "It is 42.", "weight": 0},
    {"from": "human", "value": "Thanks"}, {"from": "bard", "value": "Bye"},
]}  # fmt: skip


def test_sharegpt_roles_map_and_weight_is_kept():
    msgs = to_messages(SHAREGPT, "sharegpt", "s:1")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "tool", "assistant",
                                         "user", "assistant"]
    assert msgs[4]["content"] == '{"name": "f"}'
    assert msgs[6] == {"role": "assistant", "content": "It is 42.", "weight": 0}
    validate(msgs, "s:1")


def test_sharegpt_unknown_speaker_lists_the_known_ones():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]}
    want = r"s:1, message 2: unknown speaker 'robot' in 'from'; expected one of human, user, gpt"
    with pytest.raises(ConversationError, match=want) as e:
        to_messages(row, "sharegpt", "s:1")
    assert e.value.reason == "unknown role"


def test_alpaca():
    row = {"instruction": "Add", "input": "1 + 1", "output": "2", "system": "Be exact."}
    assert to_messages(row, "alpaca", "a") == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add\n\n1 + 1"},
        {"role": "assistant", "content": "2"},
    ]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca", "a") == [U, A]


def test_prompt_completion_strings_and_message_lists():
    assert to_messages({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", "p") == [U, A]
    sys = {"role": "system", "content": "S"}
    assert to_messages({"prompt": [sys, U], "completion": [A]}, "prompt_completion", "p") == [sys, U, A]


@pytest.mark.parametrize("row,fmt", [
    (OK, "openai"), (SHAREGPT, "sharegpt"), ({"instruction": "x", "output": "y"}, "alpaca"),
    ({"prompt": "x", "completion": "y"}, "prompt_completion"), ({"messages": [], "conversations": []}, "openai"),
])  # fmt: skip
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detection_is_per_file_and_format_overrides(tmp_path):
    both = {"messages": "not used", "conversations": SHAREGPT["conversations"]}
    assert len(list(load(jsonl(tmp_path, [both]), format="sharegpt"))[0].messages) == 9
    e = one_error(jsonl(tmp_path, [both]))  # detected as openai from its 'messages' key
    assert e.reason == "messages not a list"
    e = one_error(jsonl(tmp_path, [SHAREGPT, OK]))  # the first row fixed the format: ShareGPT
    assert str(e).startswith("data.jsonl:2: no 'conversations' key for the sharegpt format")
    assert e.reason == "missing key"
    e = one_error(jsonl(tmp_path, [{"text": "x"}]))
    assert "cannot tell the row format from its keys ['text']" in str(e) and "--format" in str(e)


def test_content_parts_kept_and_non_text_parts_rejected():
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    assert to_messages({"messages": [U, {"role": "assistant", "content": parts}]}, "openai", "x")[1]["content"] == parts
    bad = [U, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ConversationError, match="x, message 2: content part 0 is not a text part") as e:
        to_messages({"messages": bad}, "openai", "x")
    assert e.value.reason == "non-text content"


def test_tool_messages_and_fields_are_kept(tmp_path):
    call = [{"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    msgs = [U, {"role": "assistant", "content": None, "tool_calls": call},
            {"role": "tool", "content": "2", "name": "add", "tool_call_id": "c1"}, A]  # fmt: skip
    (conv,) = load(jsonl(tmp_path, [{"messages": msgs}]))
    assert conv.messages == msgs


def test_weights(tmp_path):
    msgs = [U, dict(A, weight=0), U, dict(A, weight=True)]
    assert [m.get("weight") for m in next(load(jsonl(tmp_path, [{"messages": msgs}]))).messages] == [None, 0, None, 1]
    assert one_error(jsonl(tmp_path, [{"messages": [U, dict(A, weight=0)]}])).reason == "all weights 0"
    assert one_error(jsonl(tmp_path, [{"messages": [U, dict(A, weight=0.5)]}])).reason == "bad weight"


# ---------------------------------------------------------------- the error catalogue


S = {"role": "system", "content": "S"}
CATALOGUE = [
    ({"messages": "Hi"}, "messages not a list", "'messages' must be a list of messages; found 'Hi'"),
    ({"messages": [U, "Hello"]}, "message not a dict", "message 2: expected a dict with 'role' and 'content'"),
    ({"messages": [{"content": "Hi"}, A]}, "missing role", "message 1: no 'role'; expected one of system, user"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role", "message 1: unknown role 'bot'"),
    ({"messages": [U, {"role": "assistant", "content": None}]}, "null content",
     "message 2: assistant content is missing"),
    ({"messages": [U, {"role": "assistant"}]}, "null content", "message 2: assistant content is missing"),
    ({"messages": [U, {"role": "assistant", "content": 42}]}, "bad content type", "found int 42"),
    ({"messages": []}, "empty conversation", "data.jsonl:1: empty conversation"),
    ({"messages": [S, U]}, "no assistant turn", "no assistant turn"),
    ({"messages": [U, A, A]}, "role order",
     "data.jsonl:1, message 3: role 'assistant' follows 'assistant'; expected 'user' or 'tool'."),
    ({"messages": [U, U, A]}, "role order", "message 2: role 'user' follows 'user'; expected 'assistant'"),
    ({"messages": [U, S, A]}, "role order", "message 2: a system message must come first"),
    ({"messages": [{"role": "tool", "content": "x"}, A]}, "role order",
     "message 1: a tool message must follow an assistant"),
    ({"messages": [U, {"role": "tool", "content": "x"}, A]}, "role order", "found it after 'user'"),
    ({"instruction": "x", "output": None}, "bad content type", "'output' must be a string; found NoneType"),
    ([OK], "row not an object", "a row must be a JSON object"),
    ("{oops", "invalid JSON", "data.jsonl:1: invalid JSON: Expecting property name"),
]  # fmt: skip


@pytest.mark.parametrize("row,reason,text", CATALOGUE)
def test_error_catalogue(tmp_path, row, reason, text):
    e = one_error(jsonl(tmp_path, [row]))
    assert e.reason == reason and text in str(e), str(e)
    assert str(e).startswith("data.jsonl:1")
    assert str(e).endswith("pass --skip-invalid to drop such rows and count them.")


def test_conversation_may_open_with_the_assistant():
    validate([S, A, U, A], "x")
    validate([A], "x")


def test_invalid_json_on_a_line_and_skip_invalid_counts(tmp_path):
    path = jsonl(tmp_path, [OK, '{"messages": [', OK, {"messages": [U]}, {"messages": [U, A, A]}, {"messages": [U]}])
    e = one_error(path)
    assert str(e).startswith("data.jsonl:2: invalid JSON: Expecting value at column 15.")
    report = LoadReport()
    convs = list(load(path, skip_invalid=True, report=report))
    assert [c.source for c in convs] == ["data.jsonl:1", "data.jsonl:3"]
    assert (report.rows_read, report.rows_kept) == (6, 2)
    assert report.dropped == {"invalid JSON": 1, "no assistant turn": 2, "role order": 1}
    assert report.first["no assistant turn"].startswith("data.jsonl:4: no assistant turn")
    assert report.summary() == (
        "dropped 4 of 6 rows read: 2 no assistant turn, 1 invalid JSON, 1 role order; "
        "e.g. data.jsonl:4: no assistant turn; there is nothing to train on"
    )
    assert LoadReport(rows_read=5, rows_kept=5).summary() == ""


# ---------------------------------------------------------------- random rows


KEYS = ["messages", "conversations", "role", "content", "from", "value", "weight", "tool_calls", "type", "text",
        "instruction", "input", "output", "system", "prompt", "completion", "name"]  # fmt: skip
ROLE_VALUES = ["system", "user", "assistant", "tool", "human", "gpt", "observation", "bot"]
scalars = (st.none() | st.booleans() | st.integers(-2, 2) | st.floats(allow_nan=False) | st.text(max_size=5)
           | st.sampled_from(ROLE_VALUES))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLE_VALUES), "content": st.text(max_size=5) | scalars},
                                optional={"weight": st.sampled_from([0, 1, 2, None]),
                                          "from": st.sampled_from(ROLE_VALUES), "value": scalars})  # fmt: skip
row = (st.dictionaries(st.sampled_from(KEYS), values, max_size=4)
       | st.builds(lambda m: {"messages": m}, st.lists(message, max_size=5))
       | st.builds(lambda m: {"conversations": m}, st.lists(message, max_size=5)) | values)  # fmt: skip
BAD_LINE = object()  # stands for a line that is not JSON


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row | st.just(BAD_LINE), min_size=1, max_size=4), fmt=st.sampled_from(["auto", *cv.FORMATS]))
def test_random_rows_load_or_raise_conversation_error(tmp_path, rows, fmt):
    lines = ["{not json" if r is BAD_LINE else json.dumps(r) for r in rows]  # a str row too is written as JSON
    path = write(tmp_path, "".join(line + "\n" for line in lines), "data.jsonl")
    try:
        for conv in load(path, format=fmt):
            validate(conv.messages, conv.source)
    except ConversationError:
        pass
    report = LoadReport()
    kept = list(load(path, format=fmt, skip_invalid=True, report=report))  # every row is kept or counted
    assert report.rows_read == len(rows) == report.rows_kept + sum(report.dropped.values())
    assert len(kept) == report.rows_kept
