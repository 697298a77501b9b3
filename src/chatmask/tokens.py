"""Token ids of a rendered text exactly as the tokenizer encodes the whole text, with character spans.

`TextTokens.encode(texts)` returns, per text, the ids that `tokenizer(text, add_special_tokens=False)`
gives, each with the character span it covers. It cuts the text where the tokenizer itself cuts it
first (at its added tokens: nothing is merged across one), and tokenizes each distinct piece once
(a memo: prompts repeat across rows). The piecewise result is checked against whole-text encodings on
probes when the tokenizer is first seen, and on the rows `due_for_check` picks (the caller compares);
a tokenizer that fails either is encoded whole, row by row. `split_token` re-spells one token as its
parts at character boundaries.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
import weakref

from .errors import TemplateError

_MEMO_CHARS = 4_000_000  # text whose token ids are kept (~50 MB at most), then started again
_MEMO_LONGEST = 4096  # longer pieces hardly ever repeat: not kept
CHECK_FIRST, CHECK_EVERY = 32, 128  # rows whose ids are checked against a whole-text encoding


class Run:
    """The tokens of one piece of a text as the tokenizer returned them: a piece between added tokens
    (`ids` without the anchor token that led it: `skip` tokens, `shift` characters), or one added token
    (`atomic`, its span the token's content without the whitespace it strips). A text's encoding is a
    Row: (starts, runs), run k placed at character starts[k]. Offsets are read from the encoding only
    where a boundary falls (keeping them as Python tuples for every piece would feed the GC)."""

    __slots__ = ("ids", "enc", "skip", "shift", "_offs", "atomic", "_cuts")

    def __init__(self, ids, enc=None, skip=0, shift=0, offs=None, atomic=False):
        self.ids, self.enc, self.skip, self.shift, self._offs, self.atomic = ids, enc, skip, shift, offs, atomic
        self._cuts = None

    def cut(self, x: int) -> int | None:
        """Where a boundary x characters into this run falls: the index of the first token at or after it,
        or None when a token straddles it. Remembered per run: memoized pieces meet the same boundaries
        again (every CrossNER answer starts at the same place of `assistant\nI've read this text.`)."""
        if x == 0:
            return 0
        c = self._cuts
        if c is None:
            c = self._cuts = {}
        j = c.get(x, -1)
        if j == -1:
            j = self.find(0, x)
            if j > 0 and self.span(0, j - 1)[1] > x:
                j = None
            c[x] = j
        return j

    @property
    def offs(self) -> list[tuple[int, int]]:
        if self._offs is None:
            self._offs = self.enc.offsets
        return self._offs

    def span(self, start: int, j: int) -> tuple[int, int]:
        """Characters of token j of this run placed at `start`."""
        s, e = self.enc.token_to_chars(j + self.skip) if self._offs is None else self._offs[j + self.skip]
        d = start - self.shift
        return s + d, e + d

    def end(self, start: int) -> int:
        return self.span(start, len(self.ids) - 1)[1] if self.ids else start

    def find(self, start: int, c: int) -> int:
        """Index of the first token that starts at or after character c (this run placed at `start`)."""
        x = c - start + self.shift
        if self._offs is None:  # the encoding answers in O(log n) without converting every offset
            enc = self.enc
            k = enc.char_to_token(x)
            if k is not None and k >= self.skip:
                s = enc.token_to_chars(k)[0]
                while k > self.skip and enc.token_to_chars(k - 1)[0] >= x:  # tokens sharing a character
                    k -= 1
                return k - self.skip + (s < x)
        return bisect.bisect_left(self.offs, x, lo=self.skip, key=_first) - self.skip


_EMPTY = Run([], offs=[])
Row = tuple  # (starts, runs): Run k placed at character starts[k] of the text, in order


def _first(o):
    return o[0]


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
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if isinstance(tokenizer, str):
            raise TemplateError(f"a tokenizer object is needed, not the name {tokenizer!r}: load it with "
                                f"chatmask.load_tokenizer({tokenizer!r})", reason="unsupported tokenizer")
        if self.backend is None:
            name = type(tokenizer).__name__
            why = ("it encodes conversations with mistral-common, not with a chat template the rendering can be "
                   "checked against" if name == "MistralCommonBackend" else
                   "it is not a fast (Rust `tokenizers`) tokenizer, so its tokens cannot be mapped to the rendered "
                   "text")
            raise TemplateError(
                f"{name} cannot be used for labels: {why}. Load the model's fast tokenizer instead, e.g. "
                "transformers.AutoTokenizer.from_pretrained(name) or PreTrainedTokenizerFast.from_pretrained(name) "
                "(with a chat template: the model's own, or --template mistral); --stream segments then encodes "
                "prompts and answers the way mistral-common does",
                reason="unsupported tokenizer",
            )
        added = [{"id": i, "content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word,
                  "normalized": t.normalized, "special": t.special}
                 for i, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.content]
        self.added = {a["content"]: a for a in added}
        self.added_ids = {a["id"] for a in added}
        self._split_re = self._splitter(added)
        plain = [a for a in added if not (a["lstrip"] or a["rstrip"] or a["single_word"])]
        self.anchor = plain[0]["content"] if plain else None
        # how a piece of text is spelt in the vocabulary, to re-spell a token split at a boundary
        pre = _state(self.backend.pre_tokenizer)
        self.byte_level = bool(_find_types(pre, "ByteLevel"))
        meta = _find_types(pre, "Metaspace")
        repl = [r for r in _find_types(_state(self.backend.normalizer), "Replace") if r.get("content") == "▁"]
        self.space = meta[0].get("replacement", "▁") if meta else ("▁" if repl else None)
        self.memo: dict[str, Run] = {}  # piece -> its Run, for pieces that do not start the text
        self.memo_first: dict[str, Run] = {}  # the same for pieces that start it
        self.memo_chars = 0
        self.rows_seen = 0
        # the Run of each added token as the text holds it (stripped whitespace: looked up by _core)
        self._atomic = {c: self._atomic_run(c) for c in self.added}
        self.piecewise = self._split_re is not None and self.anchor is not None and self._probe()

    # ---------------------------------------------------------------- pieces

    @staticmethod
    def _splitter(added):
        """A regex that splits a text at the added tokens as the tokenizer does (longest first, with the
        whitespace an lstrip/rstrip token absorbs); None when piecewise encoding cannot mirror it."""
        if not added:
            return None
        alts = []
        for a in sorted(added, key=lambda a: -len(a["content"])):
            c = a["content"]
            if (a["normalized"] and not a["special"]) or ((a["lstrip"] or a["rstrip"]) and c != c.strip()):
                return None  # matched after normalization, or its own whitespace is ambiguous with stripping
            pat = (r"\s*" if a["lstrip"] else "") + re.escape(c) + (r"\s*" if a["rstrip"] else "")
            if a["single_word"]:
                pat = r"(?<!\w)" + pat + r"(?!\w)"
            alts.append(pat)
        return re.compile("(" + "|".join(alts) + ")")

    def _core(self, m: str) -> tuple[str, int]:
        """The added token in a match and where it starts in it (a match may hold stripped whitespace)."""
        if m in self.added:
            return m, 0
        c = m.strip()
        return c, len(m) - len(m.lstrip())

    def _encode_pieces(self, keys: list[tuple[str, bool]]) -> dict:
        """Encode (piece, first) keys: a first piece alone, any other after the anchor token, so that a dummy
        prefix is added exactly where the whole-text encoding adds one. Memoized unless long."""
        texts = [p if first else self.anchor + p for p, first in keys]
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        a = len(self.anchor or "")
        fresh = {}
        for key, enc in zip(keys, encs):
            p, first = key
            ids = enc.ids
            if first:
                v = Run(ids, enc)
            else:
                if not ids or ids[0] not in self.added_ids or enc.token_to_chars(0) != (0, a):
                    raise TemplateError(f"the tokenizer does not keep {self.anchor!r} apart", reason="tokenizer")
                v = Run(ids[1:], enc, 1, a)
            fresh[key] = v
            if len(p) <= _MEMO_LONGEST:
                (self.memo_first if first else self.memo)[p] = v
                self.memo_chars += len(p)
        return fresh

    def _piecewise(self, texts: list[str]) -> list[Row]:
        if self.memo_chars > _MEMO_CHARS:
            self.memo.clear()
            self.memo_first.clear()
            self.memo_chars = 0
        memo, memo_first, atomic, split = self.memo, self.memo_first, self._atomic, self._split_re.split
        rows, todo = [], {}
        for t in texts:
            parts = split(t)  # text, token, text, token, ..., text: Runs for each, empty texts included
            starts = list(itertools.accumulate(map(len, parts), initial=0))
            starts.pop()
            runs = parts[:]
            runs[0::2] = [memo.get(x) or (todo.setdefault((x, False), None) or (x, False)) if x else _EMPTY
                          for x in parts[0::2]]
            first = parts[0]
            if first:
                runs[0] = memo_first.get(first) or (todo.setdefault((first, True), None) or (first, True))
            toks = [atomic.get(x) for x in parts[1::2]]
            if None in toks:  # a token with the whitespace it strips: its content starts later
                for k, x in enumerate(parts[1::2]):
                    if toks[k] is None:
                        c, off = self._core(x)
                        toks[k] = atomic[c]
                        starts[2 * k + 1] += off
            runs[1::2] = toks
            rows.append((starts, runs))
        if todo:
            fresh = self._encode_pieces(list(todo))
            for _, runs in rows:
                for k in range(0, len(runs), 2):
                    if type(runs[k]) is tuple:
                        runs[k] = fresh[runs[k]]
        return rows

    def _atomic_run(self, content: str) -> Run:
        return Run([self.added[content]["id"]], offs=[(0, len(content))], atomic=True)

    def whole(self, texts: list[str]) -> list[Row]:
        """The tokenizer's own encoding of each whole text (the reference the piecewise one must equal), in
        runs: runs of ordinary tokens, and each added token alone with the span of its content."""
        out = []
        for t, enc in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False)):
            starts, runs, run, run_offs = [], [], [], []
            for i, (s, e) in zip(enc.ids, enc.offsets):
                if i in self.added_ids:
                    if run:
                        starts.append(0)
                        runs.append(Run(run, offs=run_offs))
                        run, run_offs = [], []
                    c = self.backend.id_to_token(i)
                    j = t.find(c, s, e) if c else -1
                    if j >= 0:
                        s, e = j, j + len(c)
                    starts.append(s)
                    runs.append(Run([i], offs=[(0, e - s)], atomic=True))
                else:
                    run.append(i)
                    run_offs.append((s, e))
            if run:
                starts.append(0)
                runs.append(Run(run, offs=run_offs))
            out.append((starts, runs))
        return out

    def whole_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: list[str]) -> list[Row]:
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
            self.memo_first.clear()
            self.memo_chars = 0
        return all(ids_of(a) == b for a, b in zip(got, self.whole_ids(probes)))

    def due_for_check(self) -> bool:
        """Whether the next row's piecewise ids are compared with its whole-text encoding: the first
        CHECK_FIRST rows a tokenizer labels, then every CHECK_EVERY-th (besides the probes)."""
        self.rows_seen += 1
        return self.rows_seen <= CHECK_FIRST or self.rows_seen % CHECK_EVERY == 0

    def same_as_whole(self, texts: list[str], encoded: list[Row]) -> bool:
        """Check piecewise encodings against whole-text ones by ids (a sample of rows, by the caller)."""
        return all(a == ids_of(e) for a, e in zip(self.whole_ids(texts), encoded))

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
        return self._piecewise([self.anchor + text])[0][1][2].ids if self.piecewise else self.whole_ids([text])[0]


def _state(component) -> dict | None:
    """A normalizer's or pre-tokenizer's settings as tokenizer.json writes them."""
    return json.loads(component.__getstate__()) if component is not None else None


def ids_of(row: Row) -> list[int]:
    return list(itertools.chain.from_iterable(r.ids for r in row[1]))


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def text_tokens(tokenizer) -> TextTokens:
    """The cached TextTokens of a tokenizer (rebuilt when tokens are added to it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return TextTokens(tokenizer)  # raises the TemplateError that says what to load instead
    try:
        per = _cache.setdefault(tokenizer, {})
    except TypeError:
        per = {}
    n = backend.get_vocab_size(with_added_tokens=True)
    t = per.get(n)
    if t is None:
        per.clear()
        t = per[n] = TextTokens(tokenizer)
    return t


def clear() -> None:
    _cache.clear()
