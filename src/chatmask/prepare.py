"""A whole dataset into training-ready rows: `prepare(data_path, cfg, out) -> Prepared`.

Conversations stream from `conversations.load`, are labelled in batches by `labels.encode_many` (in
N processes with `num_proc`, output identical for any N), and are written as a `datasets` folder
(Arrow shards + `stats.json` + `config.json`) into a temporary folder renamed at the end. The folder
is also a cache: its key covers the data's bytes, the tokenizer, the template, every option and
FORMAT_VERSION, and a rerun with the same key returns at once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from . import config as cfgmod
from . import conversations, labels, tokens
from .config import DataConfig
from .errors import FIX_ROW, ChatmaskError, ConfigError, ConversationError

FORMAT_VERSION = 4  # 2: input_ids are the whole-text encoding of the rendering; 3: drops by length counted;
# 4: every answer's stop trained (README, "The stop"), the last one's appended where the template writes none
BATCH = 512  # conversations labelled per tokenizer call
SHARD_ROWS = 50_000  # rows per Arrow file: bounded memory whatever the input size
_FEATURES = None


def features():
    global _FEATURES
    if _FEATURES is None:
        import datasets

        _FEATURES = datasets.Features({
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "source": datasets.Value("string"),
        })
    return _FEATURES


@dataclass
class Prepared:
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


# ---------------------------------------------------------------- labelling in workers

_worker_tok = None


def _init_worker(tok):
    global _worker_tok
    _worker_tok = tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


class Labelled(NamedTuple):
    """A row that became an example, as a worker sends it back (plain data: cheap to pickle)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: int
    split: int
    unstopped: int
    appended: bool


class Dropped(NamedTuple):
    """A row that did not: the reason it is counted under, and the message that names it."""

    reason: str
    message: str


def _label_batch(batch, cfg: DataConfig, tok=None) -> list[Labelled | Dropped]:
    """[(messages, source)] -> one Labelled or Dropped per row, in order."""
    from .hub import stop_tokens

    tok = tok or _worker_tok
    out = []
    for r in labels.encode_many(batch, tok, train_on=cfg.train_on, max_length=cfg.max_length,
                                template=cfg.template, truncation=cfg.truncation, end_of_turn=cfg.end_of_turn,
                                stream=cfg.stream, stop_tokens=stop_tokens(cfg, tok)):
        if isinstance(r, ChatmaskError):
            out.append(Dropped(r.reason, str(r)))
        else:
            out.append(Labelled(r.input_ids, r.labels, r.source, r.truncated, r.split, r.unstopped, r.stop_appended))
    return out


def _batches(data: str, cfg: DataConfig, report):
    batch = []
    n = 0
    for conv in conversations.load(data, format=cfg.format, salvage=cfg.salvage, skip_invalid=cfg.skip_invalid,
                                   split=cfg.split, report=report):
        if cfg.limit is not None and n >= cfg.limit:
            break
        batch.append((conv.messages, conv.source))
        n += 1
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _labelled(data, cfg, tok, report):
    """Labelled batches in input order; with num_proc > 1 at most 2*num_proc batches are in flight."""
    if cfg.num_proc <= 1:
        for b in _batches(data, cfg, report):
            yield _label_batch(b, cfg, tok)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(cfg.num_proc, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(tok,)) as pool:
        window = collections.deque()
        for b in _batches(data, cfg, report):
            window.append(pool.submit(_label_batch, b, cfg))
            if len(window) >= 2 * cfg.num_proc:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


# ---------------------------------------------------------------- statistics


class _Stats:
    def __init__(self):
        self.kept = 0
        self.dropped = collections.Counter()
        self.first = {}
        self.tokens = 0
        self.trained = 0
        self.truncated_rows = 0
        self.split_rows = 0
        self.split_tokens = 0
        self.unstopped_rows = 0
        self.unstopped = 0
        self.cut_answers = 0
        self.appended = 0
        self.first_unstopped = None
        self.lengths = collections.Counter()

    def add(self, row: Labelled | Dropped):
        if isinstance(row, Dropped):
            self.dropped[row.reason] += 1
            self.first.setdefault(row.reason, row.message)
            return
        ids, labs, source, truncated, split, unstopped, appended = row
        self.split_rows += bool(split)
        self.split_tokens += split
        self.kept += 1
        self.tokens += len(ids)
        t = len(labs) - labs.count(labels.IGNORE)  # C-level count: this runs for every row
        self.trained += t
        self.truncated_rows += bool(truncated)
        self.lengths[min(len(ids) // 256, 32)] += 1
        self.appended += appended
        if unstopped:
            self.cut_answers += bool(truncated) and labs[-1] != labels.IGNORE  # cut inside an answer
            self.unstopped_rows += 1
            self.unstopped += unstopped
            self.first_unstopped = self.first_unstopped or source

    def as_dict(self, report) -> dict:
        read = self.kept + sum(self.dropped.values())
        dropped = collections.Counter(report.dropped) + self.dropped
        first = {**report.first, **self.first}
        return {
            "rows_read": report.rows_read,
            "rows_kept": self.kept,
            "rows_dropped": sum(dropped.values()),
            # by --max-length / --truncation (always dropped and counted), and as invalid (--skip-invalid)
            "rows_dropped_for_length": sum(dropped[r] for r in labels.LENGTH_REASONS),
            "rows_dropped_invalid": sum(n for r, n in dropped.items() if r not in labels.LENGTH_REASONS),
            "dropped_fraction": sum(dropped.values()) / report.rows_read if report.rows_read else 0.0,
            "dropped_by_reason": dict(dropped.most_common()),
            "first_dropped": first,
            "salvaged": report.salvaged_from,
            "tokens": self.tokens,
            "trained_tokens": self.trained,
            "trained_fraction": self.trained / self.tokens if self.tokens else 0.0,
            "truncated_rows": self.truncated_rows,
            # rows whose input_ids are not exactly the tokenizer's encoding of their rendering: a token
            # straddled a prompt/answer boundary and was re-spelt as two
            "rows_split_at_boundary": self.split_rows,
            "tokens_split_at_boundary": self.split_tokens,
            # answers whose trained run ends without a stop (the template writes none there, or truncation
            # cut it off): they do not teach the model to stop
            "rows_without_trained_stop": self.unstopped_rows,
            "answers_without_trained_stop": self.unstopped,
            "answers_cut_before_their_stop": self.cut_answers,  # of those, by --max-length (--truncation right)
            "first_without_trained_stop": self.first_unstopped,
            # conversations ending with an answer after which the template writes no end of turn: its stop appended
            "rows_stop_appended": self.appended,
            "length_histogram": {f"{k * 256}-{k * 256 + 255}" if k < 32 else f"{32 * 256}+": v
                                 for k, v in sorted(self.lengths.items())},
            "rows_labelled": read,
        }


def stop_summary(stats: dict) -> str:
    """One line: the rows with an answer trained without its stop, and why."""
    n, rows, cut = stats["rows_without_trained_stop"], stats["rows_kept"], stats.get("answers_cut_before_their_stop", 0)
    other = stats["answers_without_trained_stop"] - cut
    why = ([f"{cut:,} cut by --max-length before their stop (--truncation turns keeps whole answers)"] if cut else []) \
        + ([f"{other:,} after which the template writes no stop (`chatmask check` says where; --stop-tokens names "
            "the model's stop list)"] if other else [])
    return (f"note: {n:,} of {rows:,} rows have an answer trained without a stop: {'; '.join(why)}; first: "
            f"{stats['first_without_trained_stop']}. Such answers do not teach the model to end its turn")


def drop_summary(stats: dict) -> str:
    """One line: what reading and labelling dropped (conversations.drop_line)."""
    return conversations.drop_line(stats["dropped_by_reason"], stats["first_dropped"], stats["rows_read"])


# ---------------------------------------------------------------- writing


def _write_shards(tmp: Path, rows_iter, stats: _Stats, progress, skip_invalid: bool) -> int:
    from datasets.arrow_writer import ArrowWriter

    shard, n_shards, writer, in_shard = 0, 0, None, 0
    cols = {"input_ids": [], "labels": [], "source": []}

    def flush():
        if cols["source"]:
            writer.write_batch(cols)
            for v in cols.values():
                v.clear()

    for batch in rows_iter:
        for row in batch:
            stats.add(row)
            if isinstance(row, Dropped):
                if not skip_invalid and row.reason not in labels.LENGTH_REASONS:
                    raise ChatmaskError(f"{row.message}\n  Fix the row, or pass --skip-invalid to drop such rows and "
                                        "count them.", reason=row.reason)
                continue
            if writer is None:
                writer = ArrowWriter(features=features(), path=str(tmp / f"shard-{shard:05d}.arrow"))
                n_shards += 1
            cols["input_ids"].append(row.input_ids)
            cols["labels"].append(row.labels)
            cols["source"].append(row.source)
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


def _finish_layout(tmp: Path, n_shards: int, key: str, data: str) -> None:
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
    from .paths import temp_dir

    from .hub import stop_tokens

    tok = data_tokenizer(cfg, None, tokenizer)
    cfg = with_stops(cfg, tok)
    tokens.text_tokens(tok)  # an unusable tokenizer, a missing or broken template fail here, before any work
    r = labels.renderer(tok, cfg.template, cfg.end_of_turn, stop_tokens(cfg, tok))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder (it is created if missing)")
    key = cache_key(data, cfg, tok)
    done = _cached(out, key)
    if done is not None:
        return done
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = temp_dir(out.parent, f".{out.name}.tmp-{os.getpid()}-")
    except OSError as e:
        raise ConfigError(f"cannot write the output folder {out}: {e.strerror}") from None
    try:
        report = conversations.LoadReport()
        stats = _Stats()
        bar = None
        if progress:
            from .progress import progress as progress_bar

            bar = progress_bar(cfg.limit, "labelling", "conversations")
        t0 = time.perf_counter()
        try:
            n_shards = _write_shards(tmp, _labelled(data, cfg, tok, report), stats, bar, cfg.skip_invalid)
        finally:
            if bar is not None:
                bar.close()
        s = stats.as_dict(report)
        s["seconds"] = round(time.perf_counter() - t0, 3)
        if n_shards == 0:
            why = drop_summary(s).split("; e.g. ")[0] or "the data has no rows"
            each = "".join(f"\n  {reason}: {msg.splitlines()[0].replace(' ' + FIX_ROW, '')}"
                           for reason, msg in s["first_dropped"].items())
            err = ConversationError(f"{data}: no row became an example: {why}{each}", reason="no rows")
            err.stats = s  # `stats` still reports them (and --fail-if can bound them)
            raise err
        _finish_layout(tmp, n_shards, key, data)
        resolved = {"data": str(data), "cache_key": key, "format_version": FORMAT_VERSION,
                    "tokenizer_fingerprint": tokenizer_fingerprint(tok), "end_of_turn_marker": r.marker,
                    "stops": list(r.stops), "appended_stop": r.append,
                    "template": r.text, **cfgmod.to_dict(cfg)}
        (tmp / "config.json").write_text(json.dumps(resolved, indent=2))
        (tmp / "stats.json").write_text(json.dumps(s, indent=2))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log:
        for line in (drop_summary(s) if s["rows_dropped"] else "", stop_summary(s) if s["rows_without_trained_stop"]
                     else "", s["salvaged"] or ""):
            if line:
                log(line)
    return Prepared(out, s, False)


def _remove_stale(out: Path) -> None:
    """Temporary folders left by killed runs (their process is gone) are deleted; a live run's are kept."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name[len(out.name) + 6:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def prepare_cached(data: str, cfg: DataConfig, tok, **kw) -> Prepared:
    """`prepare` into chatmask's cache folder, named by the cache key (what train and stats use)."""
    from .paths import cache_dir

    cfg = with_stops(cfg, tok)
    return prepare(data, cfg, cache_dir() / "prepared" / cache_key(data, cfg, tok)[:24], tokenizer=tok, **kw)


def _cached(out: Path, key: str) -> Prepared | None:
    conf = prepared_config(out)
    if conf is None or conf.get("cache_key") != key:
        return None
    try:
        return Prepared(out, json.loads((out / "stats.json").read_text()), True)
    except (OSError, ValueError):
        return None


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` folder; a kill at any moment leaves either the old complete
    folder, or none (and a hidden .tmp folder that the next run ignores), never a half-written one."""
    if out.exists():
        if prepared_config(out) is None and any(out.iterdir()):
            raise ConfigError(f"{out} exists and is not a chatmask prepared folder; choose another --out")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------- audit


def role_tokens(data: str, cfg: DataConfig, tok, *, max_rows: int | None = None) -> dict:
    """Tokens by role (system, user, assistant, tool, template) over the rows of `data` that label
    cleanly: each token of the whole rendering goes to the message content its first character is in,
    else to the template."""
    import bisect

    from .hub import stop_tokens

    counts = collections.Counter()
    report = conversations.LoadReport()
    stops = stop_tokens(cfg, tok)
    n = 0
    for conv in conversations.load(data, format=cfg.format, salvage=cfg.salvage, skip_invalid=True,
                                   split=cfg.split, report=report):
        if (max_rows is not None and n >= max_rows) or (cfg.limit is not None and n >= cfg.limit):
            break
        try:
            R, spans = labels.content_spans(conv.messages, tok, cfg.template, conv.source, stops)
        except ChatmaskError:
            continue
        n += 1
        order = sorted((a, b, conv.messages[i]["role"]) for i, (a, b) in spans.items())
        starts = [a for a, _, _ in order]
        enc = tok.backend_tokenizer.encode(R, add_special_tokens=False) if hasattr(tok, "backend_tokenizer") else None
        offsets = enc.offsets if enc is not None else tok(R, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for a, _b in offsets:
            k = bisect.bisect_right(starts, a) - 1
            counts[order[k][2] if k >= 0 and a < order[k][1] else "template"] += 1
    out = {r: counts.get(r, 0) for r in ("system", "user", "assistant", "tool", "template")}
    out["rows"] = n
    a = out["assistant"]
    out["user_to_assistant"] = out["user"] / a if a else None
    return out
