"""--max-length and --truncation (truncation.py): whole leading turns, a cut at the limit, or the row dropped
and counted by reason; an answer that ends exactly at the limit fits."""

import pytest

import chatmask
from chatmask import IGNORE, ConversationError
from chatmask.truncation import FIRST_ANSWER, TOO_LONG, truncate

MULTI_TURN = [m for k in range(4) for m in (
    {"role": "user", "content": f"question {k}?"}, {"role": "assistant", "content": f"answer number {k}."})]


def answer_ends(ex) -> list[int]:
    """The token index just past each trained run (an answer through its stop)."""
    lab = ex.labels
    return [i + 1 for i in range(len(lab)) if lab[i] != IGNORE and (i + 1 == len(lab) or lab[i + 1] == IGNORE)]


def test_truncation_policies(bpe_tok):
    full = chatmask.encode(MULTI_TURN, bpe_tok)
    ends = answer_ends(full)
    ex = chatmask.encode(MULTI_TURN, bpe_tok, max_length=ends[1] + 3)
    assert ex.input_ids == full.input_ids[: ends[1]]  # whole turns only, marker kept
    ex = chatmask.encode(MULTI_TURN, bpe_tok, max_length=ends[1] + 3, truncation="right")
    assert ex.input_ids == full.input_ids[: ends[1] + 3]
    with pytest.raises(ConversationError, match="longer than max_length") as err:
        chatmask.encode(MULTI_TURN, bpe_tok, max_length=ends[1], truncation="drop")
    assert err.value.reason == TOO_LONG
    with pytest.raises(ConversationError, match="first trained answer") as err:
        chatmask.encode(MULTI_TURN, bpe_tok, max_length=ends[0] - 1)
    assert err.value.reason == FIRST_ANSWER


def test_an_answer_that_ends_exactly_at_max_length_is_kept_whole(bpe_tok):
    """Under `turns`, an answer whose stop is the max_length-th token fits: the row keeps it, stop and all,
    and nothing is counted as cut; one token less and that answer goes, whole."""
    full = chatmask.encode(MULTI_TURN, bpe_tok)
    ends = answer_ends(full)
    exact = chatmask.encode(MULTI_TURN, bpe_tok, max_length=ends[1])
    assert exact.input_ids == full.input_ids[: ends[1]] and exact.labels == full.labels[: ends[1]]
    assert answer_ends(exact) == ends[:2] and exact.unstopped == 0
    assert exact.truncated == len(full.input_ids) - ends[1]
    shorter = chatmask.encode(MULTI_TURN, bpe_tok, max_length=ends[1] - 1)
    assert shorter.input_ids == full.input_ids[: ends[0]] and answer_ends(shorter) == ends[:1]


def test_unknown_truncation_is_a_config_error(bpe_tok):
    with pytest.raises(chatmask.ConfigError, match="truncation must be one of turns, right, drop"):
        chatmask.encode(MULTI_TURN, bpe_tok, max_length=8, truncation="left")
    ex = chatmask.encode(MULTI_TURN, bpe_tok)
    with pytest.raises(chatmask.ConfigError, match="truncation must be one of turns, right, drop, not 'left'"):
        truncate(ex, 8, "left", [len(ex.input_ids)])
