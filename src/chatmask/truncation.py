"""Rows over --max-length: `truncate(example, max_length, policy, turn_ends) -> Example`, or the row dropped.

`turns` keeps the leading whole turns that fit (an answer that ends exactly at max_length fits, its stop
included), `right` cuts at the limit, `drop` drops the row. A dropped row raises a ConversationError whose
reason is one of LENGTH_REASONS: the outcome of the settings, counted, never an error of the data.
"""

from __future__ import annotations

import dataclasses

from .config import TRUNCATION
from .errors import ConfigError, ConversationError

TOO_LONG, FIRST_ANSWER, NOTHING_TRAINED = "longer than max_length", "first answer past max_length", \
    "nothing trained within max_length"
LENGTH_REASONS = (TOO_LONG, FIRST_ANSWER, NOTHING_TRAINED)
"""Why truncation drops a row: the outcome of --max-length and --truncation, not a bad row, so such rows
are always dropped and counted (never an error), by prepare, train, compare and demo alike."""


def truncate(ex, max_length: int, policy: str, turn_ends, train_on: str = "assistant"):
    """`ex` (a labels.Example holding assistant labels) cut to `max_length` tokens by `policy`, one of
    config.TRUNCATION (labels checks the spelling where it is entered); raises ConversationError when the
    row must be dropped. `turn_ends`: (token index just past an answer, whether it is trained, whether its
    end holds a stop), in order. `train_on="all"` trains every token, so any answer that fits will do."""
    where = f"{ex.source}: " if ex.source else ""
    n = len(ex.input_ids)
    if policy == "drop":
        raise ConversationError(f"{where}{n:,} tokens, longer than max_length {max_length:,}: raise --max-length, "
                                "or --truncation turns keeps the leading turns that fit", reason=TOO_LONG)
    if policy == "turns":
        fits = [(end, trained or train_on == "all") for end, trained, _ in turn_ends if end <= max_length]
        if not any(trained for _, trained in fits):
            first = next((end for end, trained, _ in turn_ends if trained or train_on == "all"), n)
            raise ConversationError(f"{where}the first trained answer ends at token {first:,}, past max_length "
                                    f"{max_length:,}: raise --max-length to keep the row", reason=FIRST_ANSWER)
        cut = max(end for end, _ in fits)
    elif policy == "right":
        cut = max_length
    else:
        raise ConfigError(f"truncation must be one of {', '.join(TRUNCATION)}, not {policy!r}")
    kept = [stopped for end, trained, stopped in turn_ends if end <= cut and trained]
    # labels equal the ids where trained: an answer runs on past the cut, and its stop is cut off
    cut_answer = ex.labels[cut - 1] == ex.input_ids[cut - 1] and cut not in {e for e, t, _ in turn_ends if t}
    out = dataclasses.replace(ex, input_ids=ex.input_ids[:cut], labels=ex.labels[:cut], truncated=n - cut,
                              stop_appended=ex.stop_appended and cut == n, unstopped=kept.count(False) + cut_answer,
                              control_text=[(a, min(b, cut)) for a, b in ex.control_text if a < cut])
    if out.num_trained == 0 and train_on != "all":
        raise ConversationError(f"{where}no trained token in the first {max_length:,} tokens: raise --max-length "
                                "to keep the row", reason=NOTHING_TRAINED)
    return out
