"""Read chat data into one message shape: `load(path_or_name) -> Iterator[Conversation]`.

Streams JSONL, JSON arrays (parsed incrementally, so a cut-off file still yields its complete records),
Parquet, a `datasets` folder or a hub name; maps OpenAI, ShareGPT, Alpaca and prompt/completion rows to
OpenAI-style messages, validates them, and tags each with its source ("data.jsonl:17").
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

from .errors import ConfigError, ConversationError, short
from .labels import ROLES

FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "function_call": "assistant",
    "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool",
}  # fmt: skip
_FIX = "Fix the row, or pass --skip-invalid to drop such rows and count them."
_CHUNK = 1 << 20  # bytes read at a time from a JSON array; tests shrink it to cut records and characters
_DECODER = json.JSONDecoder(strict=False)  # raw tabs/newlines inside strings are common and unambiguous
_WS = re.compile(r"[ \t\r\n]*")
# What may be left at a cut: part of a number or literal (an unterminated string is told by json's message).
_PARTIAL = re.compile(r"[ \t\r\n]*(?:-?[0-9]*\.?[0-9]*(?:[eE][-+]?[0-9]*)?|t(?:ru?)?|f(?:a(?:ls?)?)?|n(?:ul?)?)\Z")
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns invalid UTF-8 bytes into


@dataclass
class Conversation:
    """One row as OpenAI-style messages, with where it came from ("data.jsonl:17")."""

    messages: list[dict]
    source: str


@dataclass
class LoadReport:
    """What `load` read, kept and dropped; filled in as the iterator is consumed."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """reason -> number of rows dropped for it (with skip_invalid)"""
    first: dict[str, str] = field(default_factory=dict)
    """reason -> the first error message of that reason"""
    salvaged_from: str | None = None
    """set when salvage kept the complete records of a cut-off JSON array: what was cut and what kept"""

    def summary(self) -> str:
        """One line for the user, "" when nothing was dropped or salvaged."""
        parts = []
        if self.dropped:
            by_count = sorted(self.dropped.items(), key=lambda kv: -kv[1])
            counts = ", ".join(f"{n:,} {reason}" for reason, n in by_count)
            first = self.first.get(by_count[0][0], "").replace(" " + _FIX, "").rstrip(".")
            parts.append(f"dropped {sum(self.dropped.values()):,} of {self.rows_read:,} rows: {counts}; first: {first}")
        if self.salvaged_from:
            parts.append(self.salvaged_from)
        return "; ".join(parts)


# ---------------------------------------------------------------- rows -> messages


def _bad(source: str, what: str, reason: str, index: int | None = None) -> ConversationError:
    where = source if index is None else f"{source}, message {index}"
    return ConversationError(f"{where}: {what}. {_FIX}", reason=reason)


def detect_format(row: dict, source: str = "") -> str:
    """The row format by its keys: "openai" | "sharegpt" | "alpaca" | "prompt_completion"."""
    where = source or "row"
    if not isinstance(row, dict):
        raise _bad(where, f"a row must be a JSON object; found {short(row)}", "row not an object")
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise ConversationError(
        f"{where}: cannot tell the row format from its keys {short(list(row))}; expected 'messages' (OpenAI), "
        "'conversations' (ShareGPT), 'instruction' + 'output' (Alpaca) or 'prompt' + 'completion'. "
        f"Pass --format to name it. {_FIX}",
        reason="unknown format",
    )


def _message(m, i: int, source: str) -> dict:
    """Check one OpenAI-style message; a copy without None-valued keys (Parquet fills absent fields)."""
    if not isinstance(m, dict):
        raise _bad(source, f"expected a dict with 'role' and 'content'; found {short(m)}", "message not a dict", i)
    role = m.get("role")
    if role not in ROLES:
        what = "no 'role'" if role is None else f"unknown role {short(role)}"
        reason = "missing role" if role is None else "unknown role"
        raise _bad(source, f"{what}; expected one of {', '.join(ROLES)}", reason, i)
    content = m.get("content")
    if isinstance(content, list):
        for k, p in enumerate(content):
            if not (isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str)):
                raise _bad(source, f"content part {k} is not a text part; found {short(p)}; only "
                           "{'type': 'text', 'text': ...} parts can be trained on", "non-text content", i)
    elif content is None:
        if not (role == "assistant" and m.get("tool_calls")):
            raise _bad(source, f"{role} content is missing or null; give it a string", "null content", i)
    elif not isinstance(content, str):
        raise _bad(source, f"content must be a string or a list of text parts; found {type(content).__name__} "
                   f"{short(content)}", "bad content type", i)
    if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
        raise _bad(source, f"tool_calls must be a list; found {short(m['tool_calls'])}", "bad tool_calls", i)
    out = {k: v for k, v in m.items() if v is not None}
    out["content"] = content
    if "weight" in out:
        w = out["weight"]
        if not (isinstance(w, (int, float)) and w in (0, 1)):
            raise _bad(source, f"weight must be 0 or 1; found {short(w)}", "bad weight", i)
        out["weight"] = int(w)
    return out


def _message_list(msgs, key: str, source: str, offset: int = 0) -> list[dict]:
    if not isinstance(msgs, list):
        raise _bad(source, f"'{key}' must be a list of messages; found {short(msgs)}", "messages not a list")
    return [_message(m, offset + i, source) for i, m in enumerate(msgs)]


def _get(row: dict, key: str, fmt: str, source: str):
    if key not in row:
        raise _bad(source, f"no '{key}' key for the {fmt} format; found keys {short(list(row))}; "
                   "pass --format if this file is in another format", "missing key")
    return row[key]


def _sharegpt(row: dict, source: str) -> list[dict]:
    turns = _get(row, "conversations", "sharegpt", source)
    if not isinstance(turns, list):
        raise _bad(source, f"'conversations' must be a list of turns; found {short(turns)}", "messages not a list")
    msgs = []
    if isinstance(row.get("system"), str) and row["system"]:  # LLaMA-Factory keeps the system prompt beside the turns
        msgs.append({"role": "system", "content": row["system"]})
    for i, t in enumerate(turns, start=len(msgs)):
        if not isinstance(t, dict):
            raise _bad(source, f"expected a dict with 'from' and 'value'; found {short(t)}", "message not a dict", i)
        frm = t.get("from", t.get("role"))  # some ShareGPT exports use role/content keys
        role = SHAREGPT_ROLES.get(frm.lower()) if isinstance(frm, str) else None
        if role is None:
            what = "no 'from'" if frm is None else f"unknown speaker {short(frm)} in 'from'"
            raise _bad(source, f"{what}; expected one of {', '.join(SHAREGPT_ROLES)}",
                       "missing role" if frm is None else "unknown role", i)
        m = {"role": role, "content": t.get("value", t.get("content"))}
        if "weight" in t:
            m["weight"] = t["weight"]
        msgs.append(_message(m, i, source))
    return msgs


def _text(row: dict, key: str, fmt: str, source: str, optional: bool = False) -> str:
    v = row.get(key) if optional else _get(row, key, fmt, source)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise _bad(source, f"'{key}' must be a string; found {type(v).__name__} {short(v)}", "bad content type")
    return v


def to_messages(row, fmt: str, source: str) -> list[dict]:
    """Map one raw row in format `fmt` to OpenAI-style messages, checking each message's shape.

    >>> to_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ...             "sharegpt", "data.json:2")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    if not isinstance(row, dict):
        raise _bad(source, f"a row must be a JSON object; found {short(row)}", "row not an object")
    if fmt == "openai":
        return _message_list(_get(row, "messages", fmt, source), "messages", source)
    if fmt == "sharegpt":
        return _sharegpt(row, source)
    if fmt == "alpaca":
        system, user = _text(row, "system", fmt, source, True), _text(row, "instruction", fmt, source)
        extra = _text(row, "input", fmt, source, True)
        user = f"{user}\n\n{extra}" if extra else user
        msgs = [{"role": "system", "content": system}] if system else []
        answer = _text(row, "output", fmt, source)
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if fmt == "prompt_completion":
        msgs = []
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            v = _get(row, key, fmt, source)
            if isinstance(v, list):  # TRL's conversational form: message lists
                msgs += _message_list(v, key, source, len(msgs))
            else:
                msgs.append(_message({"role": role, "content": _text(row, key, fmt, source)}, len(msgs), source))
        return msgs
    raise ConfigError(f"format must be one of auto, {', '.join(FORMATS)}; not {fmt!r}")


def validate(messages, source: str) -> None:
    """Raise ConversationError unless `messages` can be trained on: shape, role order, an assistant turn
    with weight 1. A conversation may open with an assistant turn (after an optional system message)."""
    if not isinstance(messages, list):
        raise _bad(source, f"messages must be a list; found {short(messages)}", "messages not a list")
    if not messages:
        raise _bad(source, "empty conversation", "empty conversation")
    prev = None
    for i, m in enumerate(messages):
        role = _message(m, i, source)["role"]
        if role == "system" and i > 0:
            raise _bad(source, f"a system message must come first; found one after {prev!r}", "role order", i)
        if role == prev and role in ("user", "assistant"):
            expected = "'assistant'" if role == "user" else "'user' or 'tool'"
            raise _bad(source, f"role {role!r} follows {prev!r}; expected {expected}", "role order", i)
        if role == "tool" and prev not in ("assistant", "tool"):
            raise _bad(source, f"a tool message must follow an assistant or tool message; found it after "
                       f"{'the start' if prev is None else repr(prev)}", "role order", i)
        prev = role
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if not weights:
        raise _bad(source, "no assistant turn; there is nothing to train on", "no assistant turn")
    if not any(weights):
        raise _bad(source, "every assistant message has weight 0; there is nothing to train on", "all weights 0")


# ---------------------------------------------------------------- sources -> rows


class _Cut(Exception):
    """A JSON array ends before its closing bracket; args: (line, record number, inside the record?)."""


class _JsonStream:
    """Pulls JSON values from a file one at a time, holding about one record (or one chunk) of text."""

    def __init__(self, f, name: str):
        self.f, self.name = f, name
        # surrogateescape keeps bad bytes as markers, so one bad record can be reported (and skipped) alone
        self.dec = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def fill(self, want: int = 0) -> bool:
        if self.eof:
            return False
        data = self.f.read(max(_CHUNK, want))
        self.eof = not data
        self.buf = self.buf[self.pos :] + self.dec.decode(data, final=self.eof)
        self.pos = 0
        return True

    def peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            end = _WS.match(self.buf, self.pos).end()
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            if end < len(self.buf):
                return self.buf[end]
            if not self.fill():
                return ""

    def error(self, what: str, pos: int) -> ConversationError:
        line = self.line + self.buf.count("\n", self.pos, pos)
        return ConversationError(f"{self.name}:{line}: invalid JSON: {what}", reason="invalid JSON")

    def value(self, record: int):
        """The value at the cursor as (value, start line, error or None); the cursor moves past it."""
        want = 0
        while True:
            try:
                v, end = _DECODER.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof or self.buf[self.pos] in '{["':
                    break
                # a bare number at the end of the buffer may go on in the next chunk
            except json.JSONDecodeError as e:
                # Near the end of the buffer an error may only mean "read on"; at the end of the file,
                # an unfinished string, number, literal or escape means the file is cut off.
                near = e.msg.startswith("Unterminated string") or len(self.buf) - e.pos < 16
                unfinished = e.msg.startswith(("Unterminated string", "Invalid \\u")) or _PARTIAL.match(self.buf, e.pos)
                if self.eof and near and unfinished:
                    raise _Cut(self.line + self.buf.count("\n", self.pos), record, True) from None
                if self.eof or not near:
                    raise self.error(e.msg, e.pos) from None
            self.fill(want)
            want = 2 * (len(self.buf) - self.pos)  # doubling keeps re-parsing a huge record linear
        line, bad = self.line, _BAD_BYTE.search(self.buf, self.pos, end)
        err = None
        if bad:
            at = line + self.buf.count("\n", self.pos, bad.start())
            byte = bad.group().encode("utf-8", "surrogateescape")
            err = ConversationError(f"{self.name}:{at}: invalid UTF-8 (byte {byte!r}); the file must be UTF-8: "
                                    f"re-encode it (e.g. iconv -t utf-8). {_FIX}", reason="invalid UTF-8")
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end
        return v, line, err


def _read_json(path: str, name: str):
    with open(path, "rb") as f:
        s = _JsonStream(f, name)
        c = s.peek()
        if c == "":
            raise ConversationError(f"{name}: file is empty; expected a JSON array of rows", reason="empty file")
        if c == "{":  # one row; or several objects in a row (JSON Lines saved as .json)
            while c == "{":
                try:
                    v, line, err = s.value(1)
                except _Cut:
                    raise s.error("the file ends inside this row (cut off?)", s.pos) from None
                yield f"{name}:{line}", err or v
                c = s.peek()
        elif c == "[":
            s.pos += 1
            k, c = 0, s.peek()
            while c != "]":
                if c == "":
                    raise _Cut(s.line, k, False)
                k += 1
                v, line, err = s.value(k)
                yield f"{name}:{line} (record {k})", err or v
                c = s.peek()
                if c == ",":
                    s.pos += 1
                    c = s.peek()
                    if c == "]":
                        raise s.error("a comma before ']'", s.pos)
                elif c not in ("]", ""):
                    found = short(s.buf[s.pos : s.pos + 20])
                    raise s.error(f"expecting ',' or ']' after record {k}; found {found}", s.pos)
            s.pos += 1
            c = s.peek()
        else:
            raise ConversationError(f"{name}:{s.line}: expected a JSON array of rows or one row object; found "
                                    f"{short(s.buf[s.pos : s.pos + 40])}", reason="not an array")
        if c != "":
            raise s.error(f"extra data after the rows; found {short(s.buf[s.pos : s.pos + 20])}", s.pos)


def _read_jsonl(path: str, name: str):
    seen = False
    with open(path, "rb") as f:  # binary: split on b"\n" only; "\r" is JSON whitespace
        for n, b in enumerate(f, 1):
            src = f"{name}:{n}"
            seen = seen or bool(b.strip())
            try:
                text = b.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield src, ConversationError(f"{src}: invalid UTF-8 at byte {e.start + 1} of the line; found "
                                             f"{short(b[max(0, e.start - 8) : e.end + 8])}; the file must be UTF-8: "
                                             f"re-encode it (e.g. iconv -t utf-8). {_FIX}", reason="invalid UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield src, _DECODER.decode(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                hint = " (a JSON array? name the file .json)" if n == 1 and text.lstrip().startswith("[") else ""
                yield src, ConversationError(f"{src}: invalid JSON: {e.msg} at column {e.colno}{hint}. {_FIX}",
                                             reason="invalid JSON")
    if not seen:
        raise ConversationError(f"{name}: file is empty; expected one JSON object (a row) per line", reason="empty file")


def _read_library(target: str, path: str, name: str, split: str):
    """Rows of a Parquet file, a `datasets` folder or a hub dataset, through pyarrow or datasets."""
    try:
        if os.path.isfile(path):
            import pyarrow.parquet as pq
            batches = pq.ParquetFile(path).iter_batches(batch_size=256)
            rows, label = (row for b in batches for row in b.to_pylist()), f"{name} row"
        elif os.path.isdir(path):
            import datasets
            rows, label = datasets.load_from_disk(path), f"{name} row"
            if isinstance(rows, datasets.DatasetDict):
                if split not in rows:
                    raise ConversationError(f"{target}: no split {split!r}; found {', '.join(rows)}; pass --split",
                                            reason="no split")
                rows = rows[split]
        else:
            import datasets
            rows, label = datasets.load_dataset(target, split=split, streaming=True), f"hub:{target} row"
        for i, row in enumerate(rows):
            yield f"{label} {i}", row
    except ConversationError:
        raise
    except Exception as e:  # pyarrow, datasets and fsspec raise many types; the user needs the message
        what = "is no file or folder here, and loading it from the Hugging Face Hub failed"
        if os.path.exists(path):
            what = "cannot read as Parquet" if os.path.isfile(path) else "cannot read as a datasets folder (save_to_disk)"
        raise ConversationError(f"{target}: {what}: {type(e).__name__}: {e}", reason="unreadable source") from e


def _looks_like_path(s: str) -> bool:
    # A hub name is "name" or "owner/name"; anything else with a separator or a data suffix is a path.
    if s.lower().endswith((".json", ".jsonl", ".ndjson", ".parquet")):
        return True
    return s.startswith((".", "~", os.sep)) or s.count("/") > 1 or (os.sep != "/" and os.sep in s)


def _rows(target: str, split: str):
    path = os.path.expanduser(target)
    name, ext = os.path.basename(os.path.normpath(path)), os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and ext in (".jsonl", ".ndjson", ".json"):
        return (_read_json if ext == ".json" else _read_jsonl)(path, name)
    if os.path.isfile(path) and ext != ".parquet":
        raise ConversationError(f"{target}: unsupported file type {ext or '(none)'}; expected .jsonl, .json, .parquet "
                                "or a folder written by datasets' save_to_disk", reason="unsupported file")
    if not os.path.exists(path) and _looks_like_path(target):
        raise ConversationError(f"no such file: {target}", reason="no such file")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "dataset_info.json")) \
            and not os.path.exists(os.path.join(path, "dataset_dict.json")):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith((".json", ".jsonl", ".ndjson", ".parquet")))
        if not files:
            raise ConversationError(f"{target}: a folder with no .json/.jsonl/.parquet file and not a datasets folder",
                                    reason="unreadable source")
        # a folder of data files (e.g. several domains): their rows in file-name order, one format for all
        return (row for f in files for row in _rows(os.path.join(path, f), split))
    return _read_library(target, path, name, split)


def load(path_or_name: str, *, format: str = "auto", salvage: bool = False, skip_invalid: bool = False,
         split: str = "train", report: LoadReport | None = None) -> Iterator[Conversation]:
    """Stream the conversations of a file, a `datasets` folder or a hub dataset, validated.

    format: "auto" detects it from the first row; salvage: keep the complete records of a cut-off JSON
    array; skip_invalid: drop bad rows and count them in `report` instead of raising.

    >>> report = LoadReport()
    >>> convs = list(load("data.jsonl", skip_invalid=True, report=report)); print(report.summary())
    dropped 1 of 3 rows: 1 no assistant turn; first: data.jsonl:2: no assistant turn; there is nothing to train on
    """
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"format must be one of auto, {', '.join(FORMATS)}; not {format!r}")
    rows = _rows(os.fspath(path_or_name), split)  # a missing file is reported here, not on first next()
    return _conversations(rows, None if format == "auto" else format, salvage, skip_invalid,
                          report if report is not None else LoadReport(), os.fspath(path_or_name))


def _conversations(rows, fmt, salvage, skip_invalid, report: LoadReport, target: str):
    try:
        for source, row in rows:
            report.rows_read += 1
            try:
                if isinstance(row, ConversationError):
                    raise row
                fmt = fmt or detect_format(row, source)  # per file, from the first row that has one
                messages = to_messages(row, fmt, source)
                validate(messages, source)
            except ConversationError as e:
                if not skip_invalid:
                    raise
                report.dropped[e.reason] = report.dropped.get(e.reason, 0) + 1
                report.first.setdefault(e.reason, str(e))
                continue
            report.rows_kept += 1
            yield Conversation(messages, source)
    except _Cut as cut:
        line, record, inside = cut.args
        name, kept = os.path.basename(os.path.normpath(target)), record - 1 if inside else record
        where = f"at line {line} {'inside' if inside else 'after'} record {record}"
        if not salvage:
            raise ConversationError(f"{name}: the JSON array ends early {where} (the file is cut off); pass --salvage "
                                    f"to keep the {kept} complete records", reason="cut off") from None
        report.salvaged_from = f"{name} ends early {where}; kept {kept} complete records"
