"""Token ids of a rendered text exactly as the tokenizer encodes the whole text, with character spans.

`TextTokens.encode(texts)` returns, per text, the ids that `tokenizer(text, add_special_tokens=False)`
gives, each with the character span it covers. It cuts the text where the tokenizer itself cuts it
first (at its added tokens: nothing is merged across one), and tokenizes each distinct piece once
(a memo: prompts repeat across rows). The piecewise result is checked against whole-text encodings on
probes when the tokenizer is first seen, and on sampled rows by the caller; a tokenizer that fails the
probe is encoded whole, row by row. `split_token` re-spells one token as two at a character boundary.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass

from .errors import TemplateError

_MEMO_CHARS = 4_000_000  # text whose token ids are kept (~50 MB at most), then started again
_MEMO_LONGEST = 4096  # longer pieces hardly ever repeat: not kept


@dataclass
class Encoded:
    """One text's tokens: `ids[k]` covers characters `spans[k]` of the text; `atomic` holds the indices of
    added tokens (never split), whose span is their content without the whitespace they strip."""

    ids: list[int]
    spans: list[tuple[int, int]]
    atomic: set[int]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are spelt in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte fallback


def _find_types(node, kind: str) -> list[dict]:
    """Every component of type `kind` in a tokenizer.json subtree (Sequence nodes included)."""
    if isinstance(node, dict):
        found = [node] if node.get("type") == kind else []
        for v in node.values():
            found += _find_types(v, kind)
        return found
    if isinstance(node, list):
        return [x for v in node for x in _find_types(v, kind)]
    return []


class TextTokens:
    """A tokenizer's whole-text encoding, computed piecewise between its added tokens and memoized."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise TemplateError(
                f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer, so chatmask cannot "
                "map its tokens to the rendered text; load the model's tokenizer.json with "
                "transformers.AutoTokenizer.from_pretrained(name) (or PreTrainedTokenizerFast) instead",
                reason="unsupported tokenizer",
            )
        conf = json.loads(self.backend.to_str())
        added = [a for a in conf.get("added_tokens") or [] if a.get("content")]
        self.added = {a["content"]: a for a in added}
        self.added_ids = {a["id"] for a in added}
        self._split_re = self._splitter(added)
        plain = [a for a in added if not (a.get("lstrip") or a.get("rstrip") or a.get("single_word"))]
        self.anchor = plain[0]["content"] if plain else None
        # how a piece of text is spelt in the vocabulary, to re-spell a token split at a boundary
        self.byte_level = bool(_find_types(conf.get("pre_tokenizer"), "ByteLevel"))
        meta = _find_types(conf.get("pre_tokenizer"), "Metaspace")
        repl = [r for r in _find_types(conf.get("normalizer"), "Replace") if r.get("content") == "▁"]
        self.space = meta[0].get("replacement", "▁") if meta else ("▁" if repl else None)
        self.memo: dict[tuple[str, bool], tuple[list[int], list[tuple[int, int]]]] = {}
        self.memo_chars = 0
        self._long: dict = {}  # this call's pieces too long for the memo
        self.piecewise = self._split_re is not None and self.anchor is not None and self._probe()

    # ---------------------------------------------------------------- pieces

    @staticmethod
    def _splitter(added):
        """A regex that finds the added tokens as the tokenizer does (longest first, with the whitespace an
        lstrip/rstrip token absorbs); None when there are none or one is matched on normalized text."""
        if not added:
            return None
        alts = []
        for a in sorted(added, key=lambda a: -len(a["content"])):
            if a.get("normalized") and not a.get("special"):
                return None  # matched after normalization: piecewise splitting cannot mirror it
            pat = ("(?P<l>\\s*)" if a.get("lstrip") else "") + "(?P<c>" + re.escape(a["content"]) + ")" + (
                "(?P<r>\\s*)" if a.get("rstrip") else "")
            if a.get("single_word"):
                pat = r"(?<!\w)" + pat + r"(?!\w)"
            alts.append(pat)
        # named groups may not repeat: number each alternative's groups; a look-ahead on the first
        # characters makes most positions fail at once
        alts = [re.sub(r"\(\?P<([lcr])>", lambda m, k=k: f"(?P<{m.group(1)}{k}>", p) for k, p in enumerate(alts)]
        first = {a["content"][0] for a in added}
        ws = r"\s" if any(a.get("lstrip") for a in added) else ""
        return re.compile("(?=[" + ws + "".join(re.escape(c) for c in sorted(first)) + "])(?:" + "|".join(alts) + ")")

    def _cut(self, text: str):
        """[(start, end, None)] for plain pieces and [(start, end, (token, core start, core end))] for added
        tokens, in order; spans include absorbed whitespace."""
        out, pos = [], 0
        for m in self._split_re.finditer(text):
            k = next(g for g, v in m.groupdict().items() if g[0] == "c" and v is not None)[1:]
            s, e = m.start(), m.end()
            if s > pos:
                out.append((pos, s, None))
            out.append((s, e, (m.group("c" + k), m.start("c" + k), m.end("c" + k))))
            pos = e
        if pos < len(text):
            out.append((pos, len(text), None))
        return out

    def _encode_pieces(self, keys: list[tuple[str, bool]]) -> None:
        """Fill the memo for (piece, first) keys: a first piece alone, any other after the anchor token, so
        that a dummy prefix is added exactly where the whole-text encoding adds one."""
        texts = [p if first else self.anchor + p for p, first in keys]
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        a = len(self.anchor or "")
        for (p, first), enc in zip(keys, encs):
            ids, offs = enc.ids, enc.offsets
            if not first:
                if not ids or ids[0] not in self.added_ids or offs[0] != (0, a):
                    raise TemplateError(f"the tokenizer does not keep {self.anchor!r} apart", reason="tokenizer")
                ids, offs = ids[1:], [(s - a, e - a) for s, e in offs[1:]]
            v = (list(ids), [(max(s, 0), max(e, 0)) for s, e in offs])
            if len(p) <= _MEMO_LONGEST:
                self.memo[(p, first)] = v
                self.memo_chars += len(p)
            else:
                self._long[(p, first)] = v

    def _piecewise(self, texts: list[str]) -> list[Encoded]:
        cuts = [self._cut(t) for t in texts]
        self._long = {}
        todo = list(dict.fromkeys((t[s:e], s == 0) for t, cut in zip(texts, cuts) for s, e, tok in cut
                                  if tok is None and (t[s:e], s == 0) not in self.memo))
        if self.memo_chars > _MEMO_CHARS:
            self.memo.clear()
            self.memo_chars = 0
            todo = list(dict.fromkeys((t[s:e], s == 0) for t, cut in zip(texts, cuts) for s, e, tok in cut if tok is None))
        if todo:
            self._encode_pieces(todo)
        out = []
        for t, cut in zip(texts, cuts):
            ids, spans, atomic = [], [], set()
            for s, e, tok in cut:
                if tok is None:
                    key = (t[s:e], s == 0)
                    p_ids, p_offs = self.memo.get(key) or self._long[key]
                    ids += p_ids
                    spans += [(s + a, s + b) for a, b in p_offs]
                else:
                    atomic.add(len(ids))
                    ids.append(self.added[tok[0]]["id"])
                    spans.append((tok[1], tok[2]))
            out.append(Encoded(ids, spans, atomic))
        self._long = {}
        return out

    def whole(self, texts: list[str]) -> list[Encoded]:
        """The tokenizer's own encoding of each whole text (the reference the piecewise one must equal)."""
        out = []
        for t, enc in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False)):
            atomic, spans = set(), []
            for k, (i, (s, e)) in enumerate(zip(enc.ids, enc.offsets)):
                if i in self.added_ids:
                    atomic.add(k)
                    c = self.backend.id_to_token(i)
                    j = t.find(c, s, e) if c else -1
                    if j >= 0:
                        s, e = j, j + len(c)
                spans.append((s, e))
            out.append(Encoded(list(enc.ids), spans, atomic))
        return out

    def encode(self, texts: list[str]) -> list[Encoded]:
        return self._piecewise(texts) if self.piecewise else self.whole(texts)

    def _probe(self) -> bool:
        """Whether the piecewise encoding equals the whole-text one on texts that exercise every added
        token beside spaces, newlines, letters and punctuation."""
        toks = list(self.added)[:64]
        probes = []
        for k, c in enumerate(toks):
            d = toks[(k + 1) % len(toks)]
            probes += [f"{c}Hi there{d}", f" {c} x\n{d}\n\nYes.", f"a{c}\n {d}  b", f"{c}{d} {c}", f"word {c}"]
        probes.append("Hello  world\n\n\tend")
        try:
            got = self._piecewise(probes)
        except TemplateError:
            return False
        finally:
            self.memo.clear()
            self.memo_chars = 0
        return all(a.ids == b.ids for a, b in zip(got, self.whole(probes)))

    def same_as_whole(self, texts: list[str], encoded: list[Encoded]) -> bool:
        """Check piecewise encodings against whole-text ones by ids (a sample of rows, by the caller)."""
        return all(a.ids == e.ids for a, e in zip(self.whole(texts), encoded))

    # ---------------------------------------------------------------- splitting one token

    def spell(self, text: str) -> str | None:
        """`text` as the vocabulary spells it inside a word (no dummy prefix), or None if unknown."""
        if self.byte_level:
            return "".join(_BYTE_CHARS[b] for b in text.encode("utf-8"))
        if self.space is not None:
            return text.replace(" ", self.space)
        return None

    def split_token(self, token_id: int, parts: list[str]) -> list[list[int]] | None:
        """The ids of each part of one token's text (the token cut at answer boundaries), spelt with the
        tokenizer's own model (its merges or pieces) so that they concatenate to the token's spelling;
        None where the spelling is unknown."""
        piece = self.backend.id_to_token(token_id)
        spelt = [self.spell(p) for p in parts]
        if piece is None or None in spelt:
            return None
        if piece != "".join(spelt):
            if self.space and piece == self.space + "".join(spelt):  # the dummy prefix goes with the first part
                spelt[0] = self.space + spelt[0]
            else:
                return None
        model = self.backend.model
        out = []
        for s in spelt:
            toks = model.tokenize(s) if s else []
            got = b"".join(bytes([int(t.value[3:5], 16)]) if _BYTE_TOKEN.fullmatch(t.value) else t.value.encode()
                           for t in toks)
            if got != s.encode():
                return None
            out.append([t.id for t in toks])
        return out

    def fragment_ids(self, text: str) -> list[int]:
        """`text` encoded as a piece that does not start the text (fallback for splitting a token)."""
        self._long = {}
        self._encode_pieces([(text, False)])
        ids = (self.memo.get((text, False)) or self._long[(text, False)])[0]
        self._long = {}
        return ids


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def text_tokens(tokenizer) -> TextTokens:
    """The cached TextTokens of a tokenizer (rebuilt when tokens are added to it)."""
    try:
        per = _cache.setdefault(tokenizer, {})
    except TypeError:
        per = {}
    n = len(tokenizer)
    t = per.get(n)
    if t is None:
        per.clear()
        t = per[n] = TextTokens(tokenizer)
    return t


def clear() -> None:
    _cache.clear()
