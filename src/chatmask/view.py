"""See what you train: an Example's tokens, ids and labels as the post's table.

`rows(example, tokenizer)` gives plain data; `print_table` writes it to a terminal (ANSI colours in a
terminal, plain text when piped) and `html_page` makes a self-contained HTML page. Trained tokens are
highlighted, special tokens marked, token boundaries visible, and the tokens that spell a control token written
inside a message's content (Example.control_text) flagged with `!`; a --turns tree row (tree.py) shows each
token's position id and its branches, each drawn after the history token it forks from. `labelled_rows` reads
the Examples to show from a file or a prepared folder; nothing here feeds back into the data.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from . import config, tree
from .config import DataConfig
from .errors import ChatmaskError
from .labels import IGNORE
from .tokens import text_tokens


@dataclass
class TokenRow:
    index: int
    text: str  # the token's text with whitespace made visible
    id: int
    label: int
    special: bool
    control: bool = False  # spells (or is) a control token that a message's content writes
    pos: int | None = None  # a tree row's position id (its depth)
    branch: int | None = None  # a tree row's token in a branch: the history token the branch forks from
    opens: bool = False  # the branch's first token

    @property
    def trained(self) -> bool:
        return self.label != IGNORE


_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def visible(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def rows(example, tokenizer) -> list[TokenRow]:
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    dec = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {i for i, t in dec.items() if getattr(t, "special", False)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    space = text_tokens(tokenizer).space if backend is not None else None
    if space is not None:  # SentencePiece: decoding one token alone drops its leading space; show the piece
        texts = [_piece_text(backend.id_to_token(i) or "", space) for i in example.input_ids]
    elif backend is not None:
        texts = backend.decode_batch([[i] for i in example.input_ids], skip_special_tokens=False)
    else:
        texts = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in example.input_ids]
    control = {k for a, b in getattr(example, "control_text", ()) for k in range(a, b)}
    out = [TokenRow(k, visible(t), i, lab, i in specials, k in control)
           for k, (t, i, lab) in enumerate(zip(texts, example.input_ids, example.labels))]
    ends = getattr(example, "tree_ends", None)
    if ends:
        for r, pos in zip(out, tree.positions(ends)):
            r.pos = pos
        for first, end, fork in tree.branches(ends):
            out[first].opens = True
            for r in out[first:end]:
                r.branch = fork
    return out


def _piece_text(piece: str, space: str) -> str:
    """A SentencePiece piece as text: its space marks as spaces, a byte-fallback piece as its character
    when it is one (`<0x0A>` is a newline); other bytes of a longer character stay as `<0xE2>`."""
    if _BYTE.fullmatch(piece):
        b = int(piece[3:5], 16)
        return chr(b) if b < 128 else piece
    return piece.replace(space, " ")


def summary_line(example) -> str:
    n, t = len(example.input_ids), example.num_trained
    pp = "" if example.prefix_preserving else "; template rewrites earlier turns (see encode_turns)"
    c = len(getattr(example, "control_text", ()))
    ct = f"; its content writes {c} control token{'s' * (c != 1)} (! below)" if c else ""
    ends = getattr(example, "tree_ends", None)
    if ends:
        k = len(tree.branches(ends))
        pp = (f"; a tree: the history once, {k} branch{'es' * (k != 1)} (each trained answer as at inference, "
              "attending to the history up to its fork)")
    return f"{example.source or 'example'}: {n} tokens, {t} trained ({t / max(n, 1):.1%}){pp}{ct}"


def print_table(example, tokenizer, console=None) -> None:
    """The token / id / label table; trained rows green, special tokens bold magenta."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=summary_line(example), show_lines=False, header_style="bold")
    rs = rows(example, tokenizer)
    is_tree = bool(rs) and rs[0].pos is not None
    cols = (("#", "right"), *((("pos", "right"),) if is_tree else ()), ("token", "left"), ("id", "right"),
            ("label", "right"))
    for col, just in cols:
        table.add_column(col, justify=just)
    for k, r in enumerate(rs):
        token = f"[{r.text}]"  # brackets make token boundaries and leading spaces visible
        if is_tree:
            resumes = r.branch is None and k and rs[k - 1].branch is not None
            token = (f"┌ after #{r.branch}: {token}" if r.opens else f"│ {token}" if r.branch is not None
                     else f"└ after #{rs[k - 1].branch}: {token}" if resumes else token)
        style = "bold green" if r.trained else "dim" if not r.special else ""
        if r.special:
            token += " ★"
        if r.control:
            token += " !"
            style = "bold red underline" if r.trained else "red"  # underlined: trained
        cells = (str(r.index), *((str(r.pos),) if is_tree else ()), token, str(r.id), str(r.label))
        table.add_row(*cells, style=style or None)
    console.print(table, markup=False, highlight=False)
    if is_tree:
        console.print("┌ │ = a branch: a turn's answer as trained, attending to the history up to the token it "
                      "comes after (its positions continue from there); └ = the history goes on from that token",
                      highlight=False)
    console.print("green = trained (label = input id), ★ = special token, -100 = not trained, ! = a control token "
                  "written inside a message's content (--control-tokens)", highlight=False)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.2em} .sum{color:#555;margin-bottom:1em}
.flow{font-family:ui-monospace,monospace;line-height:2.1;white-space:pre-wrap;word-break:break-all;
  border:1px solid #ccc;padding:.6em}
.t{border:1px solid #bbb;border-radius:3px;padding:1px 2px;margin:0 1px;background:#f4f4f4}
.t.tr{background:#b9f6b9;border-color:#2a8a2a;font-weight:600} .t.sp{color:#8a2be2}
.t.ct{border:2px dashed #c00;color:#c00} tr.ct td.tok{color:#c00;text-decoration:underline wavy}
table{border-collapse:collapse;font-family:ui-monospace,monospace;font-size:.9em;margin-top:1em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} td.tok{text-align:left}
tr.tr td{background:#b9f6b9} tr.sp td.tok{color:#8a2be2;font-weight:600}
.legend span{margin-right:1.5em}
.br{display:block;margin:.3em 0 .3em 2em;padding-left:.5em;border-left:3px solid #2a8a2a;background:#f6fff6}
.fork{color:#555;font-size:.8em;margin-right:.5em}
"""


def html_page(examples, tokenizer, title: str = "chatmask: what is trained") -> str:
    """A self-contained HTML page (no scripts, no external files) for one or more Examples."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<div class='legend'><span class='t tr'>trained</span><span class='t'>not trained (-100)</span>"
             "<span class='t sp'>special token</span><span class='t ct'>a control token written inside a message's "
             "content (--control-tokens)</span></div>"]
    for ex in examples if isinstance(examples, (list, tuple)) else [examples]:
        rs = rows(ex, tokenizer)
        parts.append(f"<h2 class='sum'>{html.escape(summary_line(ex))}</h2><div class='flow'>")
        for k, r in enumerate(rs):
            if k and rs[k - 1].branch is not None and (r.branch is None or r.opens):
                parts.append("</span>")
            if r.opens:
                parts.append(f"<span class='br'><span class='fork'>branch after #{r.branch} (position "
                             f"{rs[r.branch].pos}):</span>")
            cls = "t" + (" tr" if r.trained else "") + (" sp" if r.special else "") + (" ct" if r.control else "")
            title = f"#{r.index} id {r.id} label {r.label}" + (f" position {r.pos}" if r.pos is not None else "")
            parts.append(f"<span class='{cls}' title='{title}'>{html.escape(r.text)}</span>")
        if rs and rs[-1].branch is not None:
            parts.append("</span>")
        parts.append("</div><table><tr><th>#</th><th>token</th><th>id</th><th>label</th></tr>")
        for r in rs:
            cls = ("tr " if r.trained else "") + ("sp " if r.special else "") + ("ct" if r.control else "")
            parts.append(f"<tr class='{cls.strip()}'><td>{r.index}</td><td class='tok'>{html.escape(r.text)}</td>"
                         f"<td>{r.id}</td><td>{r.label}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def labelled_rows(data: str, cfg: DataConfig, *, first: int = 0, count: int = 1, model: str | None = None):
    """(tokenizer, Examples) of rows first..first+count of `data`: read from a folder prepare wrote (its tokenizer
    and template unless `cfg` names others), else labelled now by `cfg` (invalid rows passed over, as prepare does)."""
    from itertools import islice

    from . import conversations
    from .hub import data_tokenizer, stop_tokens
    from .labels import Example, encode
    from .prepare import prepared_config

    if first < 0 or count < 1:
        raise ChatmaskError(f"--row must be 0 or more and --rows 1 or more, not --row {first} --rows {count}")
    conf = prepared_config(data)
    if conf is not None:
        import datasets

        dc = config.build(DataConfig, None, base=conf, tokenizer=cfg.tokenizer, template=cfg.template,
                          add_template_tokens=cfg.add_template_tokens or None)
        ds = datasets.load_from_disk(str(data))
        if first >= len(ds):
            raise ChatmaskError(f"{data}: no row {first}; it has {len(ds)} rows")
        picked = ds.select(range(first, min(len(ds), first + count)))
        return data_tokenizer(dc), [Example(r["input_ids"], r["labels"], r["source"],
                                            control_text=_pairs(r.get("control_text") or []),
                                            tree_ends=r.get("tree_ends") or []) for r in picked]
    tok = data_tokenizer(cfg, model)
    stops = stop_tokens(cfg, tok)
    convs = list(islice(conversations.load(data, format=cfg.format, salvage=cfg.salvage, skip_invalid=True),
                        first, first + count))
    if not convs:
        raise ChatmaskError(f"{data}: no row {first} (the data has fewer valid rows)")
    if cfg.turns != "full":
        return tok, [e for c in convs for e in _turn_examples(c, tok, cfg, stops)]
    return tok, [encode(c.messages, tok, template=cfg.template, train_on=cfg.train_on, source=c.source,
                        end_of_turn=cfg.end_of_turn, stream=cfg.stream, stop_tokens=stops,
                        control_tokens=cfg.control_tokens) for c in convs]


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return list(zip(flat[0::2], flat[1::2]))


def _turn_examples(conv, tok, cfg: DataConfig, stops) -> list:
    got = tree.turn_rows(conv.messages, conv.source, tok, cfg, stops)
    if isinstance(got, ChatmaskError):
        raise got
    return [e for e, _, _ in got]
