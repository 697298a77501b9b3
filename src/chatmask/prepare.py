"""A whole dataset into training-ready rows: `prepare(data_path, cfg, out) -> Prepared`.

Conversations stream from `conversations.load`, are labelled in batches (`workers`: `labels.encode_many`, or
per turn with --turns; in N processes with `num_proc`, output identical for any N) and counted by
`audit.Tally` (stats.json, tokens by role included), and are written as a `datasets` folder (Arrow shards +
`stats.json` + `config.json`) beside `out` and swapped in when complete. The folder is also a cache: its key
covers the data's bytes, the tokenizer, the template, every option and FORMAT_VERSION, and a rerun with the same
key returns at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import audit, conversations, labels, tokens, workers
from . import config as cfgmod
from .config import DataConfig
from .errors import FIX_ROW, ChatmaskError, ConfigError, ConversationError

# 2: input_ids the whole-text encoding of the rendering; 3: drops by length counted; 4: every answer's stop trained
# (README, "The stop"), the last one's appended where the template writes none; 5: tokens by role in stats.json;
# 6: control tokens in content encoded by --control-tokens (default: as plain text), a control_text column;
# 7: --turns, a tree_ends column (tree.py)
FORMAT_VERSION = 7
SHARD_ROWS = 50_000  # rows per Arrow file: bounded memory whatever the input size


@functools.cache
def features():
    """The columns of a prepared folder."""
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    # control_text: Example.control_text flattened, [first, end) token ranges of the content's control tokens
    # tree_ends: tree.py's ends of a --turns tree row; [] for a plain row
    return datasets.Features({"input_ids": ints, "labels": ints, "source": datasets.Value("string"),
                              "control_text": ints, "tree_ends": ints})


@dataclass
class Prepared:
    """A prepared folder, its stats.json, and whether it was there already (a cache hit)."""

    path: Path
    stats: dict
    cached: bool

    def dataset(self):
        import datasets

        return datasets.load_from_disk(str(self.path))


# ---------------------------------------------------------------- cache key


def _hash_source(path: str, h) -> None:
    p = Path(path)
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            _hash_file(f, h)
    elif p.is_file():
        _hash_file(p, h)
    else:  # a hub name: the name (and split) is all we know before loading
        h.update(f"hub:{path}".encode())


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(json.dumps(getattr(tok, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


def with_stops(cfg: DataConfig, tok) -> DataConfig:
    """`cfg` with --stop-tokens resolved (the model's own stop list read once, not per batch or worker), so
    the cache key and the written config name what labelled the rows."""
    from .hub import stop_tokens

    if cfg.stop_tokens is not None:
        return cfg
    return cfgmod.replace(cfg, stop_tokens=",".join(stop_tokens(cfg, tok)) or "none")


def cache_key(data: str, cfg: DataConfig, tok) -> str:
    h = hashlib.sha256()
    _hash_source(data, h)
    h.update(tokenizer_fingerprint(tok).encode())
    h.update(labels.resolve_template(tok, cfg.template).encode())
    opts = {k: v for k, v in cfgmod.to_dict(cfg).items() if k not in ("num_proc", "tokenizer")}
    h.update(json.dumps(opts, sort_keys=True).encode())
    h.update(f"format={FORMAT_VERSION}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- writing


def _write_shards(tmp: Path, rows_iter, tally: audit.Tally, progress, skip_invalid: bool) -> int:
    from datasets.arrow_writer import ArrowWriter

    shard, n_shards, writer, in_shard = 0, 0, None, 0
    cols = {"input_ids": [], "labels": [], "source": [], "control_text": [], "tree_ends": []}

    def flush():
        if cols["source"]:
            writer.write_batch(cols)
            for v in cols.values():
                v.clear()

    for batch in rows_iter:
        for row in batch:
            if isinstance(row, workers.Dropped):
                tally.drop(row.reason, row.message)
                if not skip_invalid and row.reason not in labels.LENGTH_REASONS:
                    raise ChatmaskError(f"{row.message}\n  Fix the row, or pass --skip-invalid to drop such rows and "
                                        "count them.", reason=row.reason)
                continue
            tally.keep(row)
            if writer is None:
                writer = ArrowWriter(features=features(), path=str(tmp / f"shard-{shard:05d}.arrow"))
                n_shards += 1
            cols["input_ids"].append(row.input_ids)
            cols["labels"].append(row.labels)
            cols["source"].append(row.source)
            cols["control_text"].append(row.control_text)
            cols["tree_ends"].append(row.tree_ends)
            in_shard += 1
            if len(cols["source"]) >= 1000:
                flush()
            if in_shard >= SHARD_ROWS:
                flush()
                writer.finalize()
                writer, in_shard, shard = None, 0, shard + 1
        if progress is not None:
            progress.update(len(batch))
    if writer is not None:
        flush()
        writer.finalize()
    return n_shards


def _label_into(tmp: Path, data: str, cfg: DataConfig, tok, progress: bool) -> tuple[int, dict]:
    """Label `data` into Arrow shards in `tmp`: (number of shards, stats.json)."""
    report, tally, bar = conversations.LoadReport(), audit.Tally(), None
    if progress:
        from .progress import progress as progress_bar

        bar = progress_bar(cfg.limit, "labelling", "conversations")
    t0 = time.perf_counter()
    try:
        n_shards = _write_shards(tmp, workers.labelled(data, cfg, tok, report), tally, bar, cfg.skip_invalid)
    finally:
        if bar is not None:
            bar.close()
    stats = tally.as_dict(report)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return n_shards, stats


def _no_rows(data: str, stats: dict) -> ConversationError:
    """The error when no row became an example: why, one line per reason, the counts attached."""
    why = audit.drop_summary(stats).split("; e.g. ")[0] or "the data has no rows"
    each = "".join(f"\n  {reason}: {msg.splitlines()[0].replace(' ' + FIX_ROW, '')}"
                   for reason, msg in stats["first_dropped"].items())
    err = ConversationError(f"{data}: no row became an example: {why}{each}", reason="no rows")
    err.stats = stats  # `stats` still reports them (and --fail-if can bound them)
    return err


def _finish_layout(tmp: Path, n_shards: int, key: str) -> None:
    """Name the shards and write the two JSON files `datasets.load_from_disk` reads."""
    import datasets

    names = []
    for k in range(n_shards):
        name = f"data-{k:05d}-of-{n_shards:05d}.arrow"
        os.replace(tmp / f"shard-{k:05d}.arrow", tmp / name)
        names.append({"filename": name})
    state = {"_data_files": names, "_fingerprint": key[:16], "_format_columns": None, "_format_kwargs": {},
             "_format_type": None, "_output_all_columns": False, "_split": None}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    datasets.DatasetInfo(features=features()).write_to_directory(str(tmp))


def prepare(data: str, cfg: DataConfig, out: str | os.PathLike, *, tokenizer=None, progress: bool = True,
            log=print) -> Prepared:
    """Label every conversation of `data` and write a `datasets` folder at `out` (a cache: the same
    inputs return at once). Bad rows raise ConversationError unless `cfg.skip_invalid`."""
    from .hub import data_tokenizer

    tok = data_tokenizer(cfg, None, tokenizer)
    cfg = with_stops(cfg, tok)
    return _prepare(data, cfg, Path(out), tok, cache_key(data, cfg, tok), progress, log)


def prepare_cached(data: str, cfg: DataConfig, tok, *, progress: bool = True, log=print) -> Prepared:
    """`prepare` into chatmask's cache folder, named by the cache key (what train, compare and stats use)."""
    from .hub import data_tokenizer
    from .paths import cache_dir

    tok = data_tokenizer(cfg, None, tok)
    cfg = with_stops(cfg, tok)
    key = cache_key(data, cfg, tok)  # the data is read (hashed) once: the key names the folder and is checked in it
    return _prepare(data, cfg, cache_dir() / "prepared" / key[:24], tok, key, progress, log)


def dataset_stats(data: str, cfg: DataConfig, tok, *, progress: bool = True, log=print) -> dict:
    """The audit of `data` (`chatmask stats`): its stats.json, prepared into the cache with rows that fail
    dropped and counted; when every row is dropped, their counts still, and a warning through `log`."""
    cfg = cfgmod.replace(cfg, skip_invalid=True)
    try:
        return dict(prepare_cached(data, cfg, tok, progress=progress, log=None).stats)
    except ChatmaskError as e:
        if getattr(e, "stats", None) is None:
            raise
        log(f"warning: {str(e).splitlines()[0]}")
        return dict(e.stats)


def _prepare(data: str, cfg: DataConfig, out: Path, tok, key: str, progress: bool, log) -> Prepared:
    """`prepare` with the tokenizer, the resolved config and the cache key in hand."""
    from .hub import stop_tokens
    from .paths import put_once, room_for, swap_in

    tokens.text_tokens(tok)  # an unusable tokenizer, a missing or broken template fail here, before any work
    r = labels.renderer(tok, cfg.template, cfg.end_of_turn, stop_tokens(cfg, tok))
    done = _cached(out, key)
    if done is not None:
        return done
    tmp = _temp_beside(out)
    try:
        with room_for(out, tmp):
            n_shards, s = _label_into(tmp, data, cfg, tok, progress)
            if n_shards == 0:
                raise _no_rows(data, s)
            _finish_layout(tmp, n_shards, key)
            resolved = {"data": str(data), "cache_key": key, "format_version": FORMAT_VERSION,
                        "tokenizer_fingerprint": tokenizer_fingerprint(tok), "end_of_turn_marker": r.marker,
                        "stops": list(r.stops), "appended_stop": r.append, "template": r.text, **cfgmod.to_dict(cfg)}
            (tmp / "config.json").write_text(json.dumps(resolved, indent=2))
            (tmp / "stats.json").write_text(json.dumps(s, indent=2))
        if _cached(out, key) is None and out.exists():
            swap_in(tmp, out)  # a folder of another key or format there: replaced
        elif not put_once(tmp, out):  # another process prepared the same data meanwhile: its folder is kept
            return _cached(out, key) or Prepared(out, s, True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes = (audit.drop_summary(s) if s["rows_dropped"] else "", audit.control_summary(s, cfg.control_tokens),
             audit.stop_summary(s) if s["rows_without_trained_stop"] else "", s["salvaged"] or "")
    for line in notes if log else ():
        if line:
            log(line)
    return Prepared(out, s, False)


def _temp_beside(out: Path) -> Path:
    """A new temporary folder beside `out` for the rows (swapped in when complete), after checking that
    `out` can be replaced; the ones killed runs left are deleted first."""
    from .paths import remove_stale, temp_dir

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder (it is created if missing)")
    if out.is_dir() and prepared_config(out) is None and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a chatmask prepared folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        return temp_dir(out.parent, f".{out.name}.tmp-{os.getpid()}-")  # the pid tells a live run's from a dead one's
    except OSError as e:
        raise ConfigError(f"cannot write the output folder {out}: {e.strerror}") from None


def prepared_config(folder) -> dict | None:
    """The resolved config of a folder written by `prepare`, or None when `folder` is not one (the one
    test of "is this a prepared folder": cli, train and the cache all ask it)."""
    p = Path(str(folder))
    try:
        if not (p / "state.json").exists():
            return None
        return json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _cached(out: Path, key: str) -> Prepared | None:
    conf = prepared_config(out)
    if conf is None or conf.get("cache_key") != key:
        return None
    try:
        return Prepared(out, json.loads((out / "stats.json").read_text()), True)
    except (OSError, ValueError):
        return None
