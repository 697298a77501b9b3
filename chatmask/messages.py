"""The message shape every module shares: `{"role", "content", ...}` dicts as chat templates eat them.

`normalize_messages(messages, source)` checks a conversation's shape and returns plain dicts (content
parts joined, `None` values and `weight` dropped); `weights(messages)` reads the per-message 0/1 weights.
The ground floor: it imports nothing of chatmask but its errors.
"""

from __future__ import annotations

from .errors import ConversationError, short

ROLES = ("system", "user", "assistant", "tool")


def normalize_messages(messages, source: str = "") -> list[dict]:
    """Check the message shape and return plain dicts as templates expect them (content parts joined,
    `None` values and `weight` removed). Raises ConversationError naming the message."""
    where = f"{source}: " if source else ""
    if not isinstance(messages, (list, tuple)):
        raise ConversationError(
            f"{where}messages must be a list of {{'role', 'content'}} dicts, found {short(messages)}",
            reason="messages not a list",
        )
    if not messages:
        raise ConversationError(f"{where}empty conversation", reason="empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(
                f"{where}message {i}: expected a dict with 'role' and 'content', found {short(m)}",
                reason="message not a dict",
            )
        role = m.get("role")
        if role not in ROLES:
            what = "no 'role'" if role is None else f"unknown role {short(role)}"
            raise ConversationError(
                f"{where}message {i}: {what}; expected one of {', '.join(ROLES)}",
                reason="missing role" if role is None else "unknown role",
            )
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for k, p in enumerate(content):
                if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                    parts.append(p["text"])
                else:
                    raise ConversationError(
                        f"{where}message {i}: content part {k} is not a text part, found {short(p)}; "
                        "only {'type': 'text', 'text': ...} parts can be trained on",
                        reason="non-text content",
                    )
            content = "".join(parts)
        elif content is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise ConversationError(
                    f"{where}message {i} ({role}): content is missing or null", reason="null content"
                )
        elif not isinstance(content, str):
            raise ConversationError(
                f"{where}message {i} ({role}): content must be a string or a list of text parts, "
                f"found {type(content).__name__} {short(content)}",
                reason="bad content type",
            )
        w = m.get("weight", 1)
        if w not in (0, 1) or isinstance(w, float) and w not in (0.0, 1.0):
            raise ConversationError(
                f"{where}message {i}: weight must be 0 or 1, found {short(w)}", reason="bad weight"
            )
        d = {k: v for k, v in m.items() if v is not None and k != "weight"}
        if content is not None:
            d["content"] = content
        out.append(d)
    return out


def weights(messages) -> list[int]:
    return [int(m.get("weight", 1)) if isinstance(m, dict) else 1 for m in messages]
