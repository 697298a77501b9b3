"""Where rows come from: `rows(target, split) -> Iterator[(source, row)]`, streamed.

JSONL line by line; a JSON array parsed incrementally in 1 MB chunks, so a cut-off file still yields
its complete records (`Cut` marks where it ends); Parquet, a `datasets` folder or a hub name through
`datasets`; a folder of data files in file-name order. Each row carries its source ("data.jsonl:17",
"data.json:12 (record 5)"); a row that cannot be read comes as a ConversationError in its place.
"""

from __future__ import annotations

import codecs
import json
import os
import re

from .errors import FIX_ROW, ConversationError, short

_CHUNK = 1 << 20  # bytes read at a time from a JSON array; tests shrink it to cut records and characters
_DECODER = json.JSONDecoder(strict=False)  # raw tabs/newlines inside strings are common and unambiguous
_WS = re.compile(r"[ \t\r\n]*")
# What may be left at a cut: part of a number or literal (an unterminated string is told by json's message).
_PARTIAL = re.compile(r"[ \t\r\n]*(?:-?[0-9]*\.?[0-9]*(?:[eE][-+]?[0-9]*)?|t(?:ru?)?|f(?:a(?:ls?)?)?|n(?:ul?)?)\Z")
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns invalid UTF-8 bytes into


class Cut(Exception):
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
                    raise Cut(self.line + self.buf.count("\n", self.pos), record, True) from None
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
                                    f"re-encode it (e.g. iconv -t utf-8). {FIX_ROW}", reason="invalid UTF-8")
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
                except Cut:
                    raise s.error("the file ends inside this row (cut off?)", s.pos) from None
                yield f"{name}:{line}", err or v
                c = s.peek()
        elif c == "[":
            s.pos += 1
            k, c = 0, s.peek()
            while c != "]":
                if c == "":
                    raise Cut(s.line, k, False)
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
                                             f"re-encode it (e.g. iconv -t utf-8). {FIX_ROW}", reason="invalid UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield src, _DECODER.decode(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                hint = " (a JSON array? name the file .json)" if n == 1 and text.lstrip().startswith("[") else ""
                yield src, ConversationError(f"{src}: invalid JSON: {e.msg} at column {e.colno}{hint}. {FIX_ROW}",
                                             reason="invalid JSON")
    if not seen:
        raise ConversationError(f"{name}: file is empty; expected one JSON object (a row) per line",
                                reason="empty file")


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
            what = ("cannot read as Parquet" if os.path.isfile(path)
                    else "cannot read as a datasets folder (save_to_disk)")
        raise ConversationError(f"{target}: {what}: {type(e).__name__}: {e}", reason="unreadable source") from e


def _looks_like_path(s: str) -> bool:
    # A hub name is "name" or "owner/name"; anything else with a separator or a data suffix is a path.
    if s.lower().endswith((".json", ".jsonl", ".ndjson", ".parquet")):
        return True
    return s.startswith((".", "~", os.sep)) or s.count("/") > 1 or (os.sep != "/" and os.sep in s)


def rows(target: str, split: str):
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
        return (row for f in files for row in rows(os.path.join(path, f), split))
    return _read_library(target, path, name, split)
