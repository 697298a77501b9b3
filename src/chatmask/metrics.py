"""Task metrics by generation: entity F1 on UniversalNER-style questions, `ner_f1(model, tokenizer, convs)`.

Each `What describes <type> in the text?` turn whose answer is a JSON list of entities becomes one question;
the model answers it greedily from the conversation so far, exactly as rendered at inference, and its answer
is scored against the gold list by micro precision / recall / F1 over normalised entity strings.
`pick_questions` samples them so that most have entities; `bootstrap_f1` gives confidence intervals by
resampling questions, for one arm and for the difference of two arms scored on the same questions
(`paired_bootstrap`, which the validation loss's interval over rows uses too).
"""

from __future__ import annotations

import hashlib
import json
import random
import re

from .errors import ChatmaskError
from .generation import generate_answers, renderer, stop_ids  # noqa: F401 (metrics.stop_ids stays importable)

QUESTION = re.compile(r"^What describes (.+) in the text\?$")
_DECODER = json.JSONDecoder()
_EDGE = " \t\n\"'`.,;:!?"  # quotes and sentence punctuation around an entity, not part of it


def ner_questions(conversations) -> list[tuple[list[dict], str, list[str]]]:
    """`(prompt messages, entity type, gold entities)` for every assistant turn that answers a
    `What describes <type> in the text?` question with a JSON list of strings; other turns are skipped.
    `conversations`: message lists, or `conversations.Conversation`s."""
    out = []
    for conv in conversations:
        msgs = getattr(conv, "messages", conv)
        for i in range(1, len(msgs)):
            prev, m = msgs[i - 1], msgs[i]
            if not (isinstance(prev, dict) and isinstance(m, dict)):
                continue
            if prev.get("role") != "user" or m.get("role") != "assistant":
                continue
            q, a = prev.get("content"), m.get("content")
            match = QUESTION.match(q.strip()) if isinstance(q, str) else None
            if match is None or not isinstance(a, str):
                continue
            try:
                gold = json.loads(a)
            except ValueError:
                continue
            if isinstance(gold, list) and all(isinstance(e, str) for e in gold):
                out.append((list(msgs[:i]), match.group(1), gold))
    return out


def pick_questions(questions: list, n: int | None, *, with_entities: float = 0.8, seed: int = 0) -> list:
    """At most `n` of `questions` (from `ner_questions`), a fixed seeded sample in their original order:
    a `with_entities` share whose gold list is not empty, the rest empty, keeping that ratio when either
    kind runs short (UniversalNER asks for every type, so most gold lists are empty, and a sample of
    those says little about extraction). `n` None: all.

    >>> qs = [([], "t", ["a"] if k % 5 == 0 else []) for k in range(100)]  # 20 with entities
    >>> picked = pick_questions(qs, 10)
    >>> len(picked), sum(bool(g) for _, _, g in picked)
    (10, 8)
    >>> len(pick_questions(qs, 100))  # 20 with entities, then 5 empty to keep 4:1
    25
    """
    if n is None:
        return list(questions)
    if not 0 < with_entities <= 1:
        raise ChatmaskError(f"with_entities must be in (0, 1]; got {with_entities}")
    pos = [k for k, q in enumerate(questions) if q[2]]
    neg = [k for k, q in enumerate(questions) if not q[2]]
    k_pos = min(len(pos), round(n * with_entities))
    k_neg = min(len(neg), n - k_pos)
    if with_entities < 1 and k_pos < round(n * with_entities):  # entities ran short: keep the ratio
        k_neg = min(k_neg, round(k_pos * (1 - with_entities) / with_entities))
    elif k_neg < n - k_pos:  # empty ones ran short: more with entities
        k_pos = min(len(pos), n - k_neg)
    rng = random.Random(seed)
    keep = sorted(rng.sample(pos, k_pos) + rng.sample(neg, k_neg))
    return [questions[k] for k in keep]


def first_list(text: str, marker: str = "") -> list[str] | None:
    """The string items of the first JSON list in a model's answer, cut at its end-of-turn `marker`;
    None when the answer holds no JSON list.

    >>> first_list('["Unity", 3, "Godot"]<|im_end|>'), first_list("The text mentions Unity.")
    (['Unity', 'Godot'], None)
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    if marker and marker.strip():
        text = text.split(marker.strip(), 1)[0].strip()  # the answer ends at its first end-of-turn
    for k in (k for k, c in enumerate(text) if c == "["):
        try:
            value, _ = _DECODER.raw_decode(text, k)
        except ValueError:
            continue
        if isinstance(value, list):
            return [e for e in value if isinstance(e, str)]
    return None


def parse_entities(text: str, marker: str = "") -> list[str]:
    """`first_list`, with `[]` when there is none (the UniversalNER convention: unparseable output
    predicts nothing).

    >>> parse_entities('["Unity", 3, "Godot"]<|im_end|>'), parse_entities("no list")
    (['Unity', 'Godot'], [])
    """
    return first_list(text, marker) or []


def normalize(entity: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding quotes and punctuation: `' "Gaussian  Model".'`
    -> `'gaussian model'`."""
    return " ".join(entity.lower().split()).strip(_EDGE)


def _counts(pred: set, gold: set) -> dict:
    return {"tp": len(pred & gold), "fp": len(pred - gold), "fn": len(gold - pred)}


def prf(c: dict) -> dict:
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, **c}


def score(pred: list[list[str]], gold: list[list[str]], types: list[str] | None = None) -> dict:
    """Micro precision / recall / F1 over (question, normalised entity) pairs: each question's entities
    are a set (duplicates count once, empty strings not at all). 0/0 is 0.0. With `types` (one per
    question) also `per_type`: {type: the same keys}."""
    if len(pred) != len(gold) or (types is not None and len(types) != len(gold)):
        lens = f"{len(pred)} predictions, {len(gold)} gold lists" + (
            f", {len(types)} types" if types is not None else "")
        raise ChatmaskError(f"score needs one prediction (and type) per gold list; found {lens}")
    total = {"tp": 0, "fp": 0, "fn": 0, "questions": 0}
    by_type: dict[str, dict] = {}
    per_question = []
    for i, (p, g) in enumerate(zip(pred, gold)):
        c = _counts({normalize(e) for e in p} - {""}, {normalize(e) for e in g} - {""})
        per_question.append([c["tp"], c["fp"], c["fn"]])
        accs = [total] if types is None else [total, by_type.setdefault(types[i], dict.fromkeys(total, 0))]
        for acc in accs:
            acc["questions"] += 1
            for k in c:
                acc[k] += c[k]
    out = prf(total)
    out["per_question"] = per_question
    if types is not None:
        out["per_type"] = {t: prf(c) for t, c in by_type.items()}
    return out


def _f1_of(sums):
    """F1 from (..., 3) summed [tp, fp, fn]."""
    import numpy as np

    tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den, dtype=float), where=den > 0)


def ratio_of(sums):
    """sum / count from (..., 2) summed [sum, count]: a mean loss."""
    return sums[..., 0] / sums[..., 1]


MIN_BOOTSTRAP_ITEMS = 10  # below this a percentile bootstrap understates the noise: no interval is given


def paired_bootstrap(per_item: dict, stat, *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap of `stat` over items (questions, validation rows). `per_item`: {arm: (Q, k)
    array of per-item sums, the same items in the same order for every arm}; `stat` maps (..., k) sums to
    the statistic. Returns {arm: [lo, hi]} and, with two arms, `difference`: [lo, hi] of stat(first) -
    stat(second), paired (one resample of items for both)."""
    import numpy as np

    arms = list(per_item)
    sums = {a: np.asarray(per_item[a], dtype=float) for a in arms}
    q = {v.shape for v in sums.values()}
    if len(q) != 1 or 0 in next(iter(q)):
        raise ChatmaskError(f"bootstrap: every arm must score the same items; found shapes {sorted(q)}")
    n = sums[arms[0]].shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (B, Q)
    values = {a: stat(sums[a][idx].sum(axis=1)) for a in arms}  # (B,) each
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {a: [float(np.percentile(values[a], lo)), float(np.percentile(values[a], hi))] for a in arms}
    if len(arms) == 2:
        d = values[arms[0]] - values[arms[1]]
        out["difference"] = [float(np.percentile(d, lo)), float(np.percentile(d, hi))]
    return out


def bootstrap_f1(per_question: dict[str, list], **kw) -> dict:
    """`paired_bootstrap` of micro F1 over questions. `per_question`: {arm: runs}, each run a list of
    [tp, fp, fn] per question, the same questions in the same order in every run (seeds are pooled: a
    question's counts are summed over its runs).

    >>> one = [[1, 0, 0]] * 8 + [[0, 1, 1]] * 2
    >>> out = bootstrap_f1({"a": [one], "b": [[[0, 0, 1]] * 10]})
    >>> out["b"], out["difference"][0] > 0
    ([0.0, 0.0], True)
    """
    import numpy as np

    pooled = {}
    for arm, runs in per_question.items():
        runs = [np.asarray(r, dtype=float).reshape(-1, 3) for r in runs]
        if not runs or any(r.shape != runs[0].shape for r in runs):
            raise ChatmaskError(f"bootstrap: arm {arm!r} needs runs over the same questions; found "
                                f"{[len(r) for r in runs]} questions per run")
        pooled[arm] = sum(runs)  # (Q, 3)
    return paired_bootstrap(pooled, _f1_of, **kw)


def _passage(prompt: list[dict], chars: int = 160) -> str:
    first = next((m.get("content") for m in prompt if m.get("role") == "user"), "") or ""
    text = " ".join(str(first).split())
    return text if len(text) <= chars else text[:chars - 1] + "…"


def ner_f1(model, tokenizer, conversations, *, max_questions=None, with_entities=0.8, **kw) -> dict:
    """Entity F1 of `model` on the NER questions of `conversations`, `max_questions` of them picked by
    `pick_questions`: `ner_f1_questions` of those (`kw`: its options).

    >>> res = ner_f1(model, tok, conversations.load("CrossNER_AI.json"), max_questions=200)  # doctest: +SKIP
    >>> print(f"{res['f1']:.3f} over {res['questions']} questions")  # doctest: +SKIP
    0.412 over 200 questions
    """
    qs = pick_questions(ner_questions(conversations), max_questions, with_entities=with_entities)
    return ner_f1_questions(model, tokenizer, qs, **kw)


def ner_f1_questions(model, tokenizer, questions, *, template=None, end_of_turn=None, stop_tokens=(),
                     max_new_tokens=64, batch_size=8, progress: bool = False, control_tokens="text") -> dict:
    """Entity F1 of `model` on `questions` (`(prompt, type, gold)` from `ner_questions`; compare picks them
    once per experiment): `score`'s keys with `per_type` and `per_question`, plus `with_entities`
    (questions whose gold list is not empty), `parsed` (answers holding a JSON list), `questions_sha256`
    (what was asked: runs compared question by question must match) and `examples`: the first 8 questions
    as {passage, type, gold, predicted, raw} (the passage: the start of the conversation's first user
    message, for a person to read beside the answers)."""
    qs = questions
    raw = generate_answers(model, tokenizer, [p for p, _, _ in qs], template=template, end_of_turn=end_of_turn,
                           stop_tokens=stop_tokens, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, control_tokens=control_tokens)
    marker = renderer(tokenizer, template, end_of_turn, stop_tokens).marker
    lists = [first_list(a, marker) for a in raw]
    pred = [p or [] for p in lists]
    out = score(pred, [g for _, _, g in qs], [t for _, t, _ in qs])
    out["with_entities"] = sum(bool(g) for _, _, g in qs)
    out["parsed"] = sum(p is not None for p in lists)
    out["questions_sha256"] = hashlib.sha256(json.dumps(qs, sort_keys=True, default=str).encode()).hexdigest()
    out["examples"] = [{"passage": _passage(prompt), "type": t, "gold": g, "predicted": p, "raw": a}
                       for (prompt, t, g), p, a in list(zip(qs, pred, raw))[:8]]
    return out
