"""The dataset-wide audit that `prepare` writes as stats.json and `chatmask stats` prints and bounds.

`Tally` counts while prepare labels (rows kept and dropped by reason, tokens, trained tokens, answers
without a trained stop, lengths, and `tokens_by_role`, which `role_counts` reads off the same rows);
`summary_lines`, `stop_summary` and `drop_summary` say it in words; `parse_expr` and `failed_conditions`
are the `--fail-if` expressions.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import operator
import re

from . import controls, conversations, labels
from .errors import ChatmaskError
from .tokens import text_tokens

ROLES = ("system", "user", "assistant", "tool", "template")  # template: what the chat template writes itself
# tokens by role are counted over the rows of prepare's first batches up to this many rows (a sample as
# stats has always reported): counting looks at each rendering again, which on every row would cost prepare
# about half its time again (CrossNER, 5.6k rows: 0.52 s -> 0.80 s)
ROLE_ROWS = 2048

# what `stats --fail-if` can bound: the numeric statistics of stats.json (a test keeps this list equal to them)
STAT_NAMES = ("rows_read", "rows_kept", "rows_dropped", "rows_dropped_for_length", "rows_dropped_invalid",
              "dropped_fraction", "tokens", "trained_tokens", "trained_fraction", "truncated_rows",
              "rows_split_at_boundary", "tokens_split_at_boundary", "rows_without_trained_stop",
              "answers_without_trained_stop", "answers_cut_before_their_stop", "rows_stop_appended", "rows_labelled",
              "user_to_assistant", "tokens_by_role_rows", "rows_with_control_text", "control_texts_in_content")

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}


# ---------------------------------------------------------------- tokens by role


def role_counts(rows, tok, template=None, stop_tokens=(), end_of_turn=None,
                control_tokens="text") -> list[tuple[int, ...] | None]:
    """Per `(messages, source)` row, its rendering's tokens by role (in ROLES order): each token of the
    whole-text encoding goes to the message content its first character is in, else to the template.
    Counted before truncation; None for a row the template cannot render. The tokens come from the
    tokenizer's cached token view (`tokens.text_tokens`), warm from labelling the same rows just before; control
    tokens a content writes as --control-tokens encodes them."""
    plans, literal, tt = [], {}, text_tokens(tok)
    r = labels.renderer(tok, template, end_of_turn, stop_tokens)
    for messages, source in rows:
        try:
            text, spans = labels.content_spans(messages, tok, template, source, stop_tokens, end_of_turn)
        except ChatmaskError:
            plans.append(None)
            continue
        # content_spans checked each message (normalizing keeps their number and roles)
        plans.append((text, sorted((a, b, messages[i]["role"]) for i, (a, b) in spans.items())))
        if control_tokens == "text":
            msgs = labels.normalize_messages(messages, source)
            found = controls.find(lambda ms: r.training_text(ms, source=source), msgs, text, tt, source)
            if found:
                literal[len(plans) - 1] = found
    texts = [p[0] for p in plans if p is not None]
    encoded = tt.encode(texts)
    if literal:
        index = [k for k, p in enumerate(plans) if p is not None]
        at = {k: j for j, k in enumerate(index)}
        for k, row in zip(literal, controls.encode_rows(tt, [plans[k][0] for k in literal], list(literal.values()))):
            encoded[at[k]] = row
    encoded = iter(encoded)
    return [None if p is None else _count_roles(p[1], next(encoded)) for p in plans]


def _count_roles(spans, row) -> tuple[int, ...]:
    """Tokens by role of one encoded rendering: the tokens starting inside each content span, the rest the
    template's."""
    starts, runs = row
    firsts = list(itertools.accumulate((len(r.ids) for r in runs), initial=0))

    def tokens_before(c: int) -> int:  # tokens of the row whose first character is before character c
        k = bisect.bisect_right(starts, c) - 1
        if k < 0:
            return 0
        run = runs[k]
        return firsts[k] + (len(run.ids) if c >= run.end(starts[k]) else run.find(starts[k], c))

    counts = dict.fromkeys(ROLES, 0)
    for a, b, role in spans:
        counts[role if role in counts else "template"] += tokens_before(b) - tokens_before(a)
    counts["template"] += firsts[-1] - sum(counts.values())
    return tuple(counts.values())


# ---------------------------------------------------------------- counting while prepare writes


class Tally:
    """The statistics of one prepare pass: `keep(row)` for each labelled row (prepare's `Labelled`),
    `drop(reason, message)` for each row that became no example, then `as_dict(load_report)`."""

    def __init__(self):
        self.kept = 0
        self.dropped = collections.Counter()
        self.first = {}
        self.tokens = 0
        self.trained = 0
        self.truncated_rows = 0
        self.respelt_rows = 0
        self.respelt_tokens = 0
        self.unstopped_rows = 0
        self.unstopped = 0
        self.cut_answers = 0
        self.appended = 0
        self.first_unstopped = None
        self.lengths = collections.Counter()
        self.by_role = [0] * len(ROLES)
        self.role_rows = 0
        self.control_rows = self.controls = 0
        self.first_control = None
        self.turns = [0, 0, 0, 0, 0]  # --turns: conversations, tokens full / per-turn / as written, trees fallen back
        self.full_counted = 0  # conversations whose full rendering was counted (the first ROLE_ROWS, one example)

    def drop(self, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        self.first.setdefault(reason, message)

    def keep(self, row) -> None:
        ids, labs = row.input_ids, row.labels
        self.kept += 1
        self.respelt_rows += bool(row.respelt)
        self.respelt_tokens += row.respelt
        self.tokens += len(ids)
        self.trained += len(labs) - labs.count(labels.IGNORE)  # C-level count: this runs for every row
        self.truncated_rows += bool(row.truncated)
        self.lengths[min(len(ids) // 256, 32)] += 1
        self.appended += row.appended
        if row.unstopped:
            self.cut_answers += bool(row.truncated) and labs[-1] != labels.IGNORE  # cut inside an answer
            self.unstopped_rows += 1
            self.unstopped += row.unstopped
            self.first_unstopped = self.first_unstopped or row.source
        if row.control_text:
            self.control_rows += 1
            self.controls += len(row.control_text) // 2  # flattened [first, end) pairs
            self.first_control = self.first_control or row.source
        if row.turns is not None:
            full, expanded, written, fell_back = row.turns
            self.turns = [a + b for a, b in zip(self.turns, (1, full or 0, expanded, written, fell_back))]
            self.full_counted += full is not None
        if row.by_role is not None:
            self.role_rows += 1
            self.by_role = [x + y for x, y in zip(self.by_role, row.by_role)]

    def as_dict(self, report) -> dict:
        """stats.json: these counts with what reading dropped (`report`: the conversations.LoadReport)."""
        dropped = collections.Counter(report.dropped) + self.dropped
        n_dropped = sum(dropped.values())
        by_role = dict(zip(ROLES, self.by_role))
        return {
            "rows_read": report.rows_read,
            "rows_kept": self.kept,
            "rows_dropped": n_dropped,
            # by --max-length / --truncation (always dropped and counted), and as invalid (--skip-invalid)
            "rows_dropped_for_length": sum(dropped[r] for r in labels.LENGTH_REASONS),
            "rows_dropped_invalid": sum(n for r, n in dropped.items() if r not in labels.LENGTH_REASONS),
            "dropped_fraction": n_dropped / report.rows_read if report.rows_read else 0.0,
            "dropped_by_reason": dict(dropped.most_common()),
            "first_dropped": {**report.first, **self.first},
            "salvaged": report.salvaged_from,
            "tokens": self.tokens,
            "trained_tokens": self.trained,
            "trained_fraction": self.trained / self.tokens if self.tokens else 0.0,
            "truncated_rows": self.truncated_rows,
            # rows whose input_ids are not exactly the tokenizer's encoding of their rendering: a token
            # straddled a prompt/answer boundary and was re-spelt as two
            "rows_split_at_boundary": self.respelt_rows,
            "tokens_split_at_boundary": self.respelt_tokens,
            # answers whose trained run ends without a stop (the template writes none there, or truncation
            # cut it off): they do not teach the model to stop
            "rows_without_trained_stop": self.unstopped_rows,
            "answers_without_trained_stop": self.unstopped,
            "answers_cut_before_their_stop": self.cut_answers,  # of those, by --max-length (--truncation right)
            "first_without_trained_stop": self.first_unstopped,
            # conversations ending with an answer after which the template writes no end of turn: its stop appended
            "rows_stop_appended": self.appended,
            "length_histogram": {f"{k * 256}-{k * 256 + 255}" if k < 32 else f"{32 * 256}+": v
                                 for k, v in sorted(self.lengths.items())},
            "rows_labelled": self.kept + sum(self.dropped.values()),
            # the renderings of the rows kept in the first ROLE_ROWS rows, before truncation (role_counts)
            "tokens_by_role": by_role,
            "tokens_by_role_rows": self.role_rows,
            "user_to_assistant": by_role["user"] / by_role["assistant"] if by_role["assistant"] else None,
            # rows kept whose content writes a control token (<|im_end|>, [INST]), encoded by --control-tokens;
            # under refuse such rows are dropped instead (dropped_by_reason: controls.REFUSED)
            "rows_with_control_text": self.control_rows,
            "control_texts_in_content": self.controls,
            "first_with_control_text": self.first_control,
            **self._turns(),
        }

    def _turns(self) -> dict:
        """--turns per-turn / tree: tokens per conversation of the full rendering, the per-turn examples and the
        rows written (the tree's where it is one)."""
        n, full, expanded, written, fell_back = self.turns
        if not n:
            return {}
        return {"turn_conversations": n, "tokens_per_conversation_full": full / max(self.full_counted, 1),
                "tokens_per_conversation_per_turn": expanded / n, "tokens_per_conversation_written": written / n,
                "conversations_full_counted": self.full_counted, "trees_fallen_back": fell_back}


# ---------------------------------------------------------------- in words


def stop_summary(stats: dict) -> str:
    """One line: the rows with an answer trained without its stop, and why."""
    n, rows = stats["rows_without_trained_stop"], stats["rows_kept"]
    cut = stats.get("answers_cut_before_their_stop", 0)
    other = stats["answers_without_trained_stop"] - cut
    why = [f"{cut:,} cut by --max-length before their stop (--truncation turns keeps whole answers)"] if cut else []
    if other:
        why.append(f"{other:,} after which the template writes no stop (`chatmask check` says where; --stop-tokens "
                   "names the model's stop list)")
    return (f"note: {n:,} of {rows:,} rows have an answer trained without a stop: {'; '.join(why)}; first: "
            f"{stats['first_without_trained_stop']}. Such answers do not teach the model to end its turn")


def control_summary(stats: dict, policy: str) -> str:
    """One line, where rows kept write a control token inside a message's content: how many, how encoded."""
    n = stats.get("rows_with_control_text", 0)
    if not n:
        return ""
    how = ("encoded as plain text (--control-tokens text), as the vendors' encoders encode content"
           if policy == "text" else
           "encoded as the control tokens themselves (--control-tokens parse): such text can forge turn boundaries")
    return (f"note: {n:,} of {stats['rows_kept']:,} rows write a control token inside a message's content "
            f"({stats['control_texts_in_content']:,} in all; first: {stats['first_with_control_text']}): {how}; "
            "`chatmask view` marks them with !")


def drop_summary(stats: dict) -> str:
    """One line: what reading and labelling dropped (conversations.drop_line)."""
    return conversations.drop_line(stats["dropped_by_reason"], stats["first_dropped"], stats["rows_read"])


def summary_lines(s: dict) -> list[str]:
    """The audit as `chatmask stats` prints it."""
    lines = [f"rows: {s['rows_kept']:,} kept of {s['rows_read']:,} read"]
    if s["rows_dropped"]:
        lines.append("  " + drop_summary(s))
    lines.append(f"tokens: {s['tokens']:,}, trained {s['trained_tokens']:,} ({s['trained_fraction']:.2%})")
    by_role = s.get("tokens_by_role")
    if by_role is not None:
        total = sum(by_role.values()) or 1
        lines.append(f"tokens by role (its first {s['tokens_by_role_rows']:,} rows kept): "
                     + ", ".join(f"{k} {v:,} ({v / total:.1%})" for k, v in by_role.items()))
        ua = s["user_to_assistant"]
        lines.append(f"user:assistant tokens = {ua:.2f} : 1" if ua is not None else
                     "user:assistant: no assistant tokens")
    lines.append(f"truncated rows: {s['truncated_rows']:,}; rows with an answer trained without its stop: "
                 f"{s['rows_without_trained_stop']:,}; rows whose last stop was appended: {s['rows_stop_appended']:,}")
    if s.get("rows_with_control_text"):
        lines.append(f"rows whose content writes a control token: {s['rows_with_control_text']:,} "
                     f"({s['control_texts_in_content']:,} in all; first: {s['first_with_control_text']})")
    if s.get("rows_split_at_boundary"):
        lines.append(f"rows whose input_ids are not exactly the tokenizer's encoding of the rendering: "
                     f"{s['rows_split_at_boundary']:,} ({s['tokens_split_at_boundary']:,} tokens straddled a "
                     "prompt/answer boundary and were re-spelt as two)")
    if s.get("turn_conversations"):
        lines.append(turns_line(s))
    lines.append("lengths: " + ", ".join(f"{k}: {v:,}" for k, v in s["length_histogram"].items()))
    return lines


def turns_line(s: dict) -> str:
    """--turns: tokens per conversation for the full rendering, per-turn expansion and what was written."""
    full, per_turn, written = (s[f"tokens_per_conversation_{k}"] for k in ("full", "per_turn", "written"))
    back = s["trees_fallen_back"]
    counted = s["conversations_full_counted"]
    of = f" (its first {counted:,})" if counted < s["turn_conversations"] else ""
    return (f"tokens per conversation ({s['turn_conversations']:,}): full rendering{of} {full:,.0f}, per-turn examples "
            f"{per_turn:,.0f}, as written {written:,.0f} ({per_turn / max(written, 1):.2f}x fewer than per-turn)"
            + (f"; {back:,} conversation(s) the tree could not lay out trained as per-turn examples" if back else ""))


# ---------------------------------------------------------------- --fail-if


def parse_expr(expr: str) -> tuple[str, str, float]:
    """(name, operator, number) of a --fail-if expression such as 'trained_fraction<0.02', checked before
    anything is computed."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.eE+-]+)\s*", expr)
    if not m:
        raise ChatmaskError(f"--fail-if {expr!r}: expected NAME OP NUMBER, e.g. 'trained_fraction<0.02'")
    name, op, value = m.groups()
    if name not in STAT_NAMES:
        raise ChatmaskError(f"--fail-if {expr!r}: unknown statistic {name!r}; known: {', '.join(STAT_NAMES)}")
    try:
        number = float(value)
    except ValueError:
        raise ChatmaskError(f"--fail-if {expr!r}: {value!r} is not a number") from None
    return name, op, number


def failed_conditions(stats: dict, exprs) -> list[str]:
    """The --fail-if expressions of `exprs` that hold for `stats`, in order (a statistic that is None, such
    as user_to_assistant without assistant tokens, holds nothing)."""
    held = []
    for expr in exprs:
        name, op, number = parse_expr(expr)
        if stats.get(name) is not None and _OPS[op](stats[name], number):
            held.append(expr)
    return held
