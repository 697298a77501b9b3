"""The `chatmask` command: prepare | view | stats | check | train | compare | demo.

Every ChatmaskError becomes one line on stderr and exit status 2, never a traceback (`--debug` shows
one). `main(argv)` is the entry point.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ChatmaskError

# The post's example (Universal-NER), the conversation of its label tables.
POST_EXAMPLE = [
    {"role": "user", "content": "Text: Q:\n\nHow can I restore my Unity?"},
    {"role": "assistant", "content": "I've read this text."},
    {"role": "user", "content": "What describes software in the text?"},
    {"role": "assistant", "content": '["Unity"]'},
]


def _tokenizer(args):
    from .models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(getattr(args, "tokenizer", None) or getattr(args, "model", None) or DEFAULT_MODEL)


def cmd_demo(args) -> int:
    """Label the post's example conversation with the embedded tokenizer and show the token/label table."""
    from . import encode
    from .view import html_page, print_table

    tok = _tokenizer(args)
    ex = encode(POST_EXAMPLE, tok, template=args.template, train_on=args.train_on, source="the post's example")
    print_table(ex, tok)
    if args.html:
        _write(args.html, html_page([ex], tok))
        print(f"wrote {args.html}")
    return 0


def cmd_check(args) -> int:
    """Report how a tokenizer's chat template can be trained (prefix-preserving, end-of-turn marker, ...)."""
    from .labels import check_template, renderer

    tok = _tokenizer(args)
    r = renderer(tok, args.template)
    notes = check_template(tok, args.template)
    print(f"end-of-turn marker: {r.marker!r}" if r.marker else "end-of-turn marker: none")
    for n in notes:
        print(f"- {n}")
    if not notes:
        print("ok: prefix-preserving, and the end-of-turn marker is trained")
    return 0


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ChatmaskError(f"cannot write {path}: {e.strerror}") from None


def _common(p: argparse.ArgumentParser, *, tokenizer=True) -> None:
    if tokenizer:
        p.add_argument("--tokenizer", help="tokenizer: hub name, local folder, .gguf file or 'smollm2' (default)")
        p.add_argument("--model", help="take the tokenizer of this model (same forms as --tokenizer)")
    p.add_argument("--template", help="chat template: a built-in name (chatml, llama3, ...) or Jinja text; "
                                      "default: the tokenizer's own")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatmask", description="Fine-tune chat LLMs with the loss on assistant tokens only.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    _common(p)
    p.add_argument("--train-on", default="assistant", choices=("assistant", "all", "last_assistant"))
    p.add_argument("--html", help="also write the table as a self-contained HTML page")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check", help=cmd_check.__doc__)
    _common(p)
    p.set_defaults(func=cmd_check)

    return ap


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args) or 0
    except ChatmaskError as e:
        if args.debug:
            raise
        print(f"chatmask: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatmask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
