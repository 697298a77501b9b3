"""Read chat data into one message shape: `load(path_or_name) -> Iterator[Conversation]`.

Rows stream from `sources.rows` (JSONL, JSON arrays parsed incrementally, Parquet, a `datasets` folder,
a hub name); this module maps OpenAI, ShareGPT, Alpaca and prompt/completion rows to OpenAI-style
messages, validates them, counts what it drops, and tags each with its source ("data.jsonl:17").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

from .errors import FIX_ROW, ConfigError, ConversationError, short
from .messages import bad, check_message
from .sources import Cut
from .sources import rows as read_rows

FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "function_call": "assistant",
    "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool",
}  # fmt: skip


@dataclass
class Conversation:
    """One row as OpenAI-style messages, with where it came from ("data.jsonl:17")."""

    messages: list[dict]
    source: str


def drop_line(dropped: dict[str, int], first: dict[str, str], rows_read: int) -> str:
    """The one line that says what was dropped, by reading or by labelling:
    'dropped 3 of 1,000 rows read: 2 no assistant turn, 1 role order; e.g. d.jsonl:17: ...' (the example
    is the first row dropped for the commonest reason)."""
    if not dropped:
        return ""
    by_count = sorted(dropped.items(), key=lambda kv: -kv[1])
    counts = ", ".join(f"{n:,} {reason}" for reason, n in by_count)
    msg = first.get(by_count[0][0], "").split("\n")[0].replace(" " + FIX_ROW, "").rstrip(".")
    return f"dropped {sum(dropped.values()):,} of {rows_read:,} rows read: {counts}; e.g. {msg}"


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
        parts = [drop_line(self.dropped, self.first, self.rows_read)] if self.dropped else []
        if self.salvaged_from:
            parts.append(self.salvaged_from)
        return "; ".join(parts)


# ---------------------------------------------------------------- rows -> messages


def detect_format(row: dict, source: str = "") -> str:
    """The row format by its keys: "openai" | "sharegpt" | "alpaca" | "prompt_completion"."""
    where = source or "row"
    if not isinstance(row, dict):
        raise bad(where, f"a row must be a JSON object; found {short(row)}", "row not an object")
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
        f"Pass --format to name it. {FIX_ROW}",
        reason="unknown format",
    )


def _message_list(msgs, key: str, source: str, offset: int = 0) -> list[dict]:
    if not isinstance(msgs, list):
        raise bad(source, f"'{key}' must be a list of messages; found {short(msgs)}", "messages not a list")
    return [check_message(m, offset + i, source) for i, m in enumerate(msgs)]


def _get(row: dict, key: str, fmt: str, source: str):
    if key not in row:
        raise bad(source, f"no '{key}' key for the {fmt} format; found keys {short(list(row))}; "
                   "pass --format if this file is in another format", "missing key")
    return row[key]


def _sharegpt(row: dict, source: str) -> list[dict]:
    turns = _get(row, "conversations", "sharegpt", source)
    if not isinstance(turns, list):
        raise bad(source, f"'conversations' must be a list of turns; found {short(turns)}", "messages not a list")
    msgs = []
    if isinstance(row.get("system"), str) and row["system"]:  # LLaMA-Factory keeps the system prompt beside the turns
        msgs.append({"role": "system", "content": row["system"]})
    for i, t in enumerate(turns, start=len(msgs)):
        if not isinstance(t, dict):
            raise bad(source, f"expected a dict with 'from' and 'value'; found {short(t)}", "message not a dict", i)
        frm = t.get("from", t.get("role"))  # some ShareGPT exports use role/content keys
        role = SHAREGPT_ROLES.get(frm.lower()) if isinstance(frm, str) else None
        if role is None:
            what = "no 'from'" if frm is None else f"unknown speaker {short(frm)} in 'from'"
            raise bad(source, f"{what}; expected one of {', '.join(SHAREGPT_ROLES)}",
                       "missing role" if frm is None else "unknown role", i)
        m = {"role": role, "content": t.get("value", t.get("content"))}
        if "weight" in t:
            m["weight"] = t["weight"]
        msgs.append(check_message(m, i, source))
    return msgs


def _text(row: dict, key: str, fmt: str, source: str, optional: bool = False) -> str:
    v = row.get(key) if optional else _get(row, key, fmt, source)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise bad(source, f"'{key}' must be a string; found {type(v).__name__} {short(v)}", "bad content type")
    return v


def to_messages(row, fmt: str, source: str) -> list[dict]:
    """Map one raw row in format `fmt` to OpenAI-style messages, checking each message's shape.

    >>> to_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ...             "sharegpt", "data.json:2")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    if not isinstance(row, dict):
        raise bad(source, f"a row must be a JSON object; found {short(row)}", "row not an object")
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
                msgs.append(check_message({"role": role, "content": _text(row, key, fmt, source)}, len(msgs), source))
        return msgs
    raise ConfigError(f"format must be one of auto, {', '.join(FORMATS)}; not {fmt!r}")


def validate(messages, source: str) -> None:
    """Raise ConversationError unless `messages` can be trained on: shape, role order, an assistant turn
    with weight 1. A conversation may open with an assistant turn (after an optional system message)."""
    if not isinstance(messages, list):
        raise bad(source, f"messages must be a list; found {short(messages)}", "messages not a list")
    if not messages:
        raise bad(source, "empty conversation", "empty conversation")
    prev = None
    for i, m in enumerate(messages):
        role = check_message(m, i, source)["role"]
        if role == "system" and i > 0:
            raise bad(source, f"a system message must come first; found one after {prev!r}", "role order", i)
        if role == prev and role in ("user", "assistant"):
            expected = "'assistant'" if role == "user" else "'user' or 'tool'"
            raise bad(source, f"role {role!r} follows {prev!r}; expected {expected}", "role order", i)
        if role == "tool" and prev not in ("assistant", "tool"):
            raise bad(source, f"a tool message must follow an assistant or tool message; found it after "
                       f"{'the start' if prev is None else repr(prev)}", "role order", i)
        prev = role
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if not weights:
        raise bad(source, "no assistant turn; there is nothing to train on", "no assistant turn")
    if not any(weights):
        raise bad(source, "every assistant message has weight 0; there is nothing to train on", "all weights 0")


def load(path_or_name: str, *, format: str = "auto", salvage: bool = False, skip_invalid: bool = False,
         split: str = "train", report: LoadReport | None = None) -> Iterator[Conversation]:
    """Stream the conversations of a file, a `datasets` folder or a hub dataset, validated.

    format: "auto" detects it from the first row; salvage: keep the complete records of a cut-off JSON
    array; skip_invalid: drop bad rows and count them in `report` instead of raising.

    >>> report = LoadReport()
    >>> convs = list(load("data.jsonl", skip_invalid=True, report=report)); print(report.summary())
    dropped 1 of 3 rows read: 1 no assistant turn; e.g. data.jsonl:2: no assistant turn; there is nothing to train on
    """
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"format must be one of auto, {', '.join(FORMATS)}; not {format!r}")
    rows = read_rows(os.fspath(path_or_name), split)  # a missing file is reported here, not on first next()
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
    except Cut as cut:
        line, record, inside = cut.args
        name, kept = os.path.basename(os.path.normpath(target)), record - 1 if inside else record
        where = f"at line {line} {'inside' if inside else 'after'} record {record}"
        if not salvage:
            raise ConversationError(f"{name}: the JSON array ends early {where} (the file is cut off); pass --salvage "
                                    f"to keep the {kept} complete records", reason="cut off") from None
        report.salvaged_from = f"{name} ends early {where}; kept {kept} complete records"
