"""A config dataclass as command-line flags: one flag a field (`max_length` -> `--max-length`), its choices
the field's Literal, its --help the docstring written under the field.

`add_arguments(parser, cls)` is the main function; `config.build` / `config.resolve` read the flags back.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache
from typing import get_args, get_type_hints

from .config import NONE, field_kind, flag


@lru_cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(getattr(b, "value", None), ast.Constant) and isinstance(b.value.value, str):
                out[a.target.id] = b.value.value.strip()
    return out


def _number_or_none(kind):
    """An argparse type for an optional number: NONE is None (config.build turns it into None)."""
    def parse(text: str):
        return NONE if text.strip().lower() == NONE else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid int value: 'x'"
    return parse


def help_text(doc: str, default) -> str:
    """A field's --help: its docstring, with the default appended unless the docstring says it already."""
    if "default:" in doc or (default is None and "none:" not in doc):
        return doc
    return f"{doc} (default: {NONE if default is None else default})"


def add_arguments(parser, cls, *, skip=(), only=None, defaults_none=False) -> None:
    """Add one flag per field of dataclass `cls` (or the fields named in `only`), with its docstring as help.
    `defaults_none`: every flag defaults to None (not given), so that a YAML file or a saved run can set it."""
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        tp, choices = field_kind(hints[f.name])
        default = None if defaults_none else f.default
        help_ = help_text(docs.get(f.name, ""), f.default)
        if tp is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        kind = tp if tp in (int, float, str) else str
        if type(None) in get_args(hints[f.name]) and kind in (int, float):
            kind = _number_or_none(kind)
        parser.add_argument(flag(f.name), type=kind, choices=choices, default=default, help=help_,
                            metavar=None if choices else f.name.upper())
