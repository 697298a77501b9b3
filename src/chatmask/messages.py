"""The message shape every module shares: `{"role", "content", ...}` dicts as chat templates eat them.

`normalize_messages(messages, source)` checks a conversation's shape and returns plain dicts (content
parts joined, `None` values and `weight` dropped); `weights(messages)` reads the per-message 0/1 weights.
The ground floor: it imports nothing of chatmask but its errors.
"""

from __future__ import annotations

from .errors import FIX_ROW, ConversationError, short

ROLES = ("system", "user", "assistant", "tool")
REASONING_FIELDS = ("thinking", "reasoning_content", "reasoning")
"""The fields reasoning templates read an answer's reasoning from (gpt-oss, Qwen3 / GLM, others)."""


def bad(source: str, what: str, reason: str, index: int | None = None) -> ConversationError:
    """The error for a bad row or message: where (file:line, message number counted from 1 like lines),
    what, and the fix. `index` is 0-based."""
    where = source if index is None else f"{source}, message {index + 1}"
    return ConversationError(f"{where}: {what}. {FIX_ROW}", reason=reason)


def check_message(m, i: int, source: str) -> dict:
    """Check one message ({"role", "content", ...}); a copy without None-valued keys (Parquet fills absent
    fields), `weight` as an int. Raises ConversationError naming the message."""
    if not isinstance(m, dict):
        raise bad(source, f"expected a dict with 'role' and 'content'; found {short(m)}", "message not a dict", i)
    role = m.get("role")
    if role not in ROLES:
        what = "no 'role'" if role is None else f"unknown role {short(role)}"
        reason = "missing role" if role is None else "unknown role"
        raise bad(source, f"{what}; expected one of {', '.join(ROLES)}", reason, i)
    content = m.get("content")
    if isinstance(content, (list, tuple)):
        for k, p in enumerate(content):
            if not (isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str)):
                raise bad(source, f"content part {k} is not a text part; found {short(p)}; only "
                          "{'type': 'text', 'text': ...} parts can be trained on", "non-text content", i)
    elif content is None:
        if not (role == "assistant" and m.get("tool_calls")):
            raise bad(source, f"{role} content is missing or null; give it a string", "null content", i)
    elif not isinstance(content, str):
        raise bad(source, f"content must be a string or a list of text parts; found {type(content).__name__} "
                  f"{short(content)}", "bad content type", i)
    if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
        raise bad(source, f"tool_calls must be a list; found {short(m['tool_calls'])}", "bad tool_calls", i)
    out = {k: v for k, v in m.items() if v is not None}
    out["content"] = content
    if "weight" in out:
        w = out["weight"]
        if not (isinstance(w, (int, float)) and w in (0, 1)):
            raise bad(source, f"weight must be 0 or 1; found {short(w)}", "bad weight", i)
        out["weight"] = int(w)
    return out


def normalize_messages(messages, source: str = "") -> list[dict]:
    """Check a conversation's shape (`check_message` on each) and return plain dicts as templates expect
    them: content parts joined, `None` values and `weight` removed, but a tool call's `content: None` kept (as
    apply_chat_template passes it: DeepSeek-R1's template renders a call only then). Raises ConversationError."""
    where = source or "conversation"
    if not isinstance(messages, (list, tuple)):
        raise bad(where, f"messages must be a list of {{'role', 'content'}} dicts, found {short(messages)}",
                  "messages not a list")
    if not messages:
        raise ConversationError(f"{where}: empty conversation", reason="empty conversation")
    out = []
    for i, m in enumerate(messages):
        d = check_message(m, i, where)
        d.pop("weight", None)
        if isinstance(d["content"], (list, tuple)):
            d["content"] = "".join(p["text"] for p in d["content"])
        out.append(d)
    return out


def check_rendered(msgs, rendering: str, source: str) -> bool:
    """Raise where the template leaves out what an answer holds, which would silently go untrained: a last
    message's reasoning field (a template renders the last answer's reasoning if it renders any; an answer
    before a later user message may lose it by the template's rule), or any answer's tool calls. True where
    the template drops the last answer's <think> block from its content (the caller warns once)."""
    last = len(msgs) - 1 if msgs and msgs[-1]["role"] == "assistant" else None
    for key in REASONING_FIELDS if last is not None else ():
        text = msgs[last].get(key)
        if isinstance(text, str) and text.strip() and text.strip()[:60] not in rendering:
            raise bad(source, f"its {key!r} is not in the rendering: this chat template does not read {key!r}, "
                      "so that reasoning would not be trained; put it where the template reads reasoning (e.g. "
                      f"<think>...</think> at the start of the content), use a template that renders {key!r}, or drop "
                      "the field to train the answers without it", "reasoning not rendered", last)
    content = msgs[last].get("content") if last is not None else None
    thought = content.split("</think>")[0].replace("<think>", "").strip() if isinstance(content, str) and \
        "</think>" in content else ""
    dropped = bool(thought) and thought[:60] not in rendering
    for i, m in enumerate(msgs):
        for call in m.get("tool_calls") or () if m["role"] == "assistant" else ():
            name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
            if isinstance(name, str) and name and name not in rendering:
                raise bad(source, f"its tool call {name!r} is not in the rendering: this chat template does not "
                          "render it (some render no tool calls, gpt-oss's only a message's first), so it would "
                          "not be trained; use the model's template with tool support, one call a message",
                          "tool call not rendered", i)
    return dropped


def weights(messages) -> list[int]:
    return [int(m.get("weight", 1)) if isinstance(m, dict) else 1 for m in messages]
