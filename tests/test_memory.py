"""Training memory: the micro-batch token budget (same losses, every process the same number of micro-batches),
recomputation for a row over it, the heap bounded while it runs, and the estimate said before training."""

import pytest
import torch

from chatmask import IGNORE, batches, config, evaluation, memory
from chatmask.config import DataConfig
from chatmask.errors import ConfigError
from chatmask.train import TrainConfig, train
from conftest import cli_main, tiny_llama
from test_train import data  # noqa: F401  (the fixture: 48 short conversations)


def _run(data, tok, out, model=None, log=None, **kw):
    cfg = TrainConfig(**{"steps": 4, "eval_every": 2, "save_every": 4, "val_split": 0.1, "batch_size": 4,
                         "finetune": "full", "lr": 1e-2, "tensorboard": False, "stop_prompts": 0, **kw})
    return train(data, DataConfig(), cfg, out, tokenizer=tok, model=model or tiny_llama(tok), progress=False, log=log)


def _ex(n):
    return {"input_ids": list(range(1, n + 1)), "labels": [IGNORE] * (n // 2) + list(range(n // 2 + 1, n + 1))}


def test_rows_are_cut_in_order_at_the_budget_a_longer_row_alone():
    rows = [_ex(n) for n in (100, 100, 300, 600, 50, 60)]
    L = [len(x["input_ids"]) for x in rows]
    sizes = lambda runs: [[len(rows[i]["input_ids"]) for i in r] for r in runs]  # noqa: E731
    assert sizes(batches.by_tokens(L, 256, padded=False)) == [[100, 100], [300], [600], [50, 60]]
    # padded: a run costs rows x its longest (50 + 60 padded is 120; 100 + 100 is 200)
    assert sizes(batches.by_tokens(L, 200, padded=True)) == [[100, 100], [300], [600], [50, 60]]
    assert sizes(batches.by_tokens(L, 110, padded=True)) == [[100], [100], [300], [600], [50], [60]]
    assert sizes(batches.by_tokens(L, None, padded=False)) == [[100, 100, 300, 600, 50, 60]]


@pytest.mark.parametrize("packing", [False, True])
def test_a_budget_trains_the_same_run_in_more_micro_batches(data, bpe_tok, tmp_path, monkeypatch, packing):
    calls = []
    real = batches.micro_batches

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out[0])
        return out

    monkeypatch.setattr(batches, "micro_batches", spy)
    scored = []
    real_sums = evaluation.row_loss_sums
    monkeypatch.setattr(evaluation, "row_loss_sums", lambda m, b, *a: scored.append(b["input_ids"].shape) or
                        real_sums(m, b, *a))
    whole = _run(data, bpe_tok, tmp_path / "whole", micro_batch_tokens=0, packing=packing)
    assert {len(c) for c in calls} == {1}
    calls.clear()
    scored.clear()
    cut = _run(data, bpe_tok, tmp_path / "cut", micro_batch_tokens=200, packing=packing)
    assert min(len(c) for c in calls) >= 2
    assert all(mb["input_ids"].numel() <= 200 for c in calls for mb, _, _ in c)
    assert scored and all(b * t <= memory.eval_budget(200) or b == 1 for b, t in scored)  # and evaluation its own
    assert cut["train_losses"] == pytest.approx(whole["train_losses"], abs=1e-5)
    assert cut["final_val_loss"] == pytest.approx(whole["final_val_loss"], abs=1e-5)
    assert cut["input_tokens"] == whole["input_tokens"]


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_every_process_gets_as_many_micro_batches_and_fillers_train_nothing(bpe_tok, train_on):
    import datasets

    ds = datasets.Dataset.from_list([_ex(n) for n in (40, 40, 40, 10, 90, 0)][:5])
    cfg = TrainConfig(batch_size=3, packing=True)
    one = [batches.micro_batches(ds, [0, 1, 2, 3, 4, 0], cfg, r, 2, 0, train_on, torch.float32, "varlen", 50)
           for r in (0, 1)]
    # rank 0 holds 40, 40, 40 (three micro-batches under 50), rank 1 10, 90, 40: [10], [90], [40], three too;
    # then rank 1 holds 10, 10, 10: one micro-batch, and two fillers to match rank 0's three
    two = [batches.micro_batches(ds, [0, 1, 2, 3, 3, 3], cfg, r, 2, 0, train_on, torch.float32, "varlen", 50)
           for r in (0, 1)]
    assert len(one[0][0]) == len(one[1][0]) == 3 and one[0][1] == one[1][1]
    assert len(two[0][0]) == len(two[1][0]) == 3
    assert two[1][0][0][1] == 30
    filler, n_tok, rows = two[1][0][-1]
    assert filler["input_ids"].numel() == 1 and n_tok == 0 and not rows and (filler["labels"] == IGNORE).all()
    assert [r for _, _, r in two[1][0][:1]] == [[3, 3, 3]]  # the rows a micro-batch holds, by index
    no_budget = batches.micro_batches(ds, [0, 1, 2, 3, 3, 3], cfg, 0, 2, 0, train_on, torch.float32, "varlen")
    assert two[0][1] == no_budget[1]  # fillers add no trained target to the step's count


def test_a_row_over_the_budget_is_recomputed_and_trains_the_same(data, bpe_tok, tmp_path, monkeypatch):
    seen, heap = [], []
    monkeypatch.setattr(memory, "_mallopt", lambda p, v: heap.append(v) or True)
    monkeypatch.setattr(memory, "HEAP_TOKENS", 0)  # the rows here are short: every recomputed one bounds the heap

    def model_seen():
        m = tiny_llama(bpe_tok)
        m.model.layers[0].register_forward_pre_hook(
            lambda mod, a: seen.append(bool(mod.gradient_checkpointing)) if torch.is_grad_enabled() else None)
        return m

    plain = _run(data, bpe_tok, tmp_path / "plain", micro_batch_tokens=0, model=model_seen())
    assert seen and not any(seen) and not heap
    seen.clear()
    # the rows are 84-92 tokens: a budget of 88 leaves some rows over it (recomputed), some under
    over = _run(data, bpe_tok, tmp_path / "over", micro_batch_tokens=88, model=model_seen())
    assert any(seen) and not all(seen)
    assert heap.count(memory.HEAP_MMAP_BYTES) == sum(seen)  # the heap bounded for each recomputed micro-batch
    seen.clear()
    heap.clear()
    never = _run(data, bpe_tok, tmp_path / "never", micro_batch_tokens=88, gradient_checkpointing=False,
                 model=model_seen())
    assert seen and not any(seen) and not heap
    seen.clear()
    always = _run(data, bpe_tok, tmp_path / "always", micro_batch_tokens=0, gradient_checkpointing=True,
                  model=model_seen())
    assert seen and all(seen) and heap.count(memory.HEAP_MMAP_BYTES) == len(seen)
    for r in (over, never, always):
        assert r["train_losses"] == pytest.approx(plain["train_losses"], abs=1e-5)


def test_where_memory_is_tight_a_cpu_step_returns_the_heap_after_each_forward_and_backward(data, bpe_tok,
                                                                                          tmp_path, monkeypatch):
    trims, mbs, said, real = [], [], [], batches.micro_batches
    monkeypatch.setattr(memory, "_malloc_trim", lambda: trims.append(1))
    monkeypatch.setattr(batches, "micro_batches", lambda *a, **k: mbs.append(len((out := real(*a, **k))[0])) or out)
    monkeypatch.setattr(memory, "available_gb", lambda: 1000.0)
    _run(data, bpe_tok, tmp_path / "room", micro_batch_tokens=200, log=said.append)
    assert min(mbs) >= 2 and not trims  # room to spare: the heap is kept (faster)
    assert not any("tight" in x for x in said)
    monkeypatch.setattr(memory, "available_gb", lambda: 0.001)  # less than the estimate's share: tight
    mbs.clear()
    _run(data, bpe_tok, tmp_path / "tight", micro_batch_tokens=200, log=said.append)
    assert min(mbs) >= 2 and len(trims) == 2 * sum(mbs)  # between forward and backward, and after the backward
    assert any("tight: each micro-batch returns the heap it freed" in x for x in said)
    trims.clear()
    memory.trim(torch.device("cuda"))  # no glibc heap to speak of on a GPU: nothing to return
    memory.trim(torch.device("cpu"))
    assert trims == [1]


def test_the_heap_is_bounded_inside_a_recomputed_micro_batch_and_restored_after(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda p, v: calls.append((p, v)) or True)
    with memory.bounded_heap():
        assert calls == [(-3, memory.HEAP_MMAP_BYTES)]
    assert calls[-1] == (-3, 32 << 20)


def test_only_long_recomputed_micro_batches_on_a_cpu_bound_the_heap(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda p, v: calls.append(v) or True)
    model = torch.nn.Linear(2, 2)
    cpu, n = torch.device("cpu"), memory.HEAP_TOKENS
    for mode, tokens, device, bounded in [("over budget", n + 1, cpu, True), ("over budget", n, cpu, False),
                                          ("always", n + 1, cpu, True), ("never", 10 * n, cpu, False),
                                          ("over budget", 10 * n, torch.device("cuda"), False)]:
        calls.clear()
        with memory.micro_batch(model, mode, tokens, 512, device):
            pass
        assert (memory.HEAP_MMAP_BYTES in calls) == bounded, (mode, tokens, device)
    switched = []
    monkeypatch.setattr(memory, "set_recompute", lambda m, on, share=1.0: switched.append(on))
    for tokens in (512, 513):  # a micro-batch of exactly the budget is not over it
        with memory.micro_batch(model, "over budget", tokens, 512, cpu):
            pass
    assert switched == [True, False]


def test_mallopt_reaches_glibc():
    import ctypes.util

    if not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL("libc.so.6"), "mallopt"):
        pytest.skip("not glibc")
    assert memory._mallopt(-3, memory.HEAP_MMAP_BYTES) and memory._mallopt(-3, 32 << 20)


def test_budget_and_checkpointing_resolve_by_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert memory.budget(TrainConfig(), cpu) == memory.CPU_BUDGET and memory.budget(TrainConfig(), gpu) is None
    assert memory.budget(TrainConfig(micro_batch_tokens=0), cpu) is None
    assert memory.budget(TrainConfig(micro_batch_tokens=900), gpu) == 900
    assert memory.checkpointing(TrainConfig(), 512) == "over budget"
    assert memory.checkpointing(TrainConfig(), None) == "never"
    assert memory.checkpointing(TrainConfig(gradient_checkpointing=True), None) == "always"
    assert memory.checkpointing(TrainConfig(gradient_checkpointing=False), 512) == "never"
    with pytest.raises(ConfigError, match="--micro-batch-tokens must be 0"):
        config.check(TrainConfig(micro_batch_tokens=-1))


def test_largest_micro_batch():
    lengths = [10, 700, 300, 200, 100]
    assert memory.largest_micro_batch(lengths, 3, True, None) == 1200  # packed: the three longest
    assert memory.largest_micro_batch(lengths, 3, False, None) == 2100  # padded: 3 x the longest
    assert memory.largest_micro_batch(lengths, 3, True, 512) == 700  # the longest row alone, over the budget
    assert memory.largest_micro_batch([100] * 9, 8, True, 512) == 512
    assert memory.largest_micro_batch([], 8, True, 512) == 0


def test_the_estimate_is_said_before_training_and_warns_where_it_would_not_fit(data, bpe_tok, tmp_path,
                                                                                monkeypatch):
    lines = []
    _run(data, bpe_tok, tmp_path / "a", log=lines.append, steps=1)
    said = [x for x in lines if x.startswith("memory: about")]
    assert len(said) == 1 and "micro-batches of up to" in said[0] and "warning" not in said[0]
    monkeypatch.setattr(memory, "available_gb", lambda: 1e-6)
    lines.clear()
    _run(data, bpe_tok, tmp_path / "b", log=lines.append, steps=1)
    said = next(x for x in lines if x.startswith("memory: about"))
    assert "warning: this run may not fit in memory" in said and "--micro-batch-tokens" in said


def test_activation_estimate_grows_with_tokens_and_falls_with_recomputation():
    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    full = memory.activation_gb(c, 1024, False, 4)
    assert 0.8 < full < 1.6  # SmolLM2-135M measured ~1.2 GB for 1k tokens in fp32 (bench/README.md)
    assert memory.activation_gb(c, 2048, False, 4) == pytest.approx(2 * full)
    assert memory.activation_gb(c, 1024, True, 4) < full / 5


def test_the_estimate_counts_the_logits_at_scored_positions(data, bpe_tok):
    import datasets

    from test_train import encoded

    rows = datasets.Dataset.from_list(encoded(bpe_tok, k=6))
    flat = [t for r in rows["labels"] for t in r]
    share = memory.trained_share(rows, "assistant", True)
    assert share == pytest.approx(sum(t != IGNORE for t in flat) / len(flat)) and 0 < share < 1
    assert memory.trained_share(rows, "all", True) == memory.trained_share(rows, "assistant", False) == 1.0
    # a recomputed 4k-token ShareGPT row (70% trained) on SmolLM2's 49,152 entries: ~1.6 GB of logits
    assert memory.logits_gb(49152, 0.7 * 4096) == pytest.approx(1.58, abs=0.02)
    model = tiny_llama(bpe_tok, vocab_size=50_000)
    few, _, _ = memory.estimate_line(model, 4096, "never", None, 0, share=0.01)
    every, _, _ = memory.estimate_line(model, 4096, "never", None, 0, share=1.0)
    gb = lambda line: float(line.split("activations and logits ~")[1].split(" GB")[0])  # noqa: E731
    assert gb(every) - gb(few) == pytest.approx(memory.logits_gb(50_000, 0.99 * 4096), abs=0.11)
    assert gb(every) - gb(few) > 2


def test_the_flags_reach_training(capsys):
    with pytest.raises(SystemExit):
        cli_main(capsys, "train", "--help")
    out = capsys.readouterr().out
    assert "--micro-batch-tokens" in out and "--no-gradient-checkpointing" in out
    rc, _, err = cli_main(capsys, "train", "x.jsonl", "--out", "o", "--micro-batch-tokens=-5")
    assert rc == 2 and "--micro-batch-tokens must be 0 (no limit) or more, not -5" in err


def test_evaluation_batches_hold_the_budget_and_score_the_same(bpe_tok):
    import datasets

    from chatmask import evaluation

    assert evaluation._batches([50, 10, 30, 20], 3, None) == [[1, 3, 2], [0]]
    assert evaluation._batches([50, 10, 30, 20], 3, 60) == [[1, 3], [2], [0]]  # 3 x 30 = 90 > 60
    assert evaluation._batches([500, 10], 8, 60) == [[1], [0]]  # a row over the budget alone
    from test_train import encoded

    val = datasets.Dataset.from_list(encoded(bpe_tok, k=6))
    model = tiny_llama(bpe_tok)
    whole = evaluation.evaluate_rows(model, val, bpe_tok.pad_token_id, 8)
    cut = evaluation.evaluate_rows(model, val, bpe_tok.pad_token_id, 8, max_tokens=100)
    assert torch.allclose(whole, cut, atol=1e-5) and whole[:, 1].sum() > 0


def test_training_scores_in_batches_of_the_evaluation_budget(data, bpe_tok, tmp_path, monkeypatch):
    from chatmask import evaluation

    assert memory.eval_budget(256) == 256 * memory.EVAL_FACTOR and memory.eval_budget(None) is None
    seen = []
    real = evaluation._batches
    monkeypatch.setattr(evaluation, "_batches", lambda lengths, bs, mt: seen.append(mt) or real(lengths, bs, mt))
    cfg = TrainConfig(model="tiny-llama", steps=1, micro_batch_tokens=64, val_rows=4, stop_prompts=0,
                      tensorboard=False)
    train(str(data), DataConfig(), cfg, tmp_path / "o", tokenizer=bpe_tok, model=tiny_llama(bpe_tok), log=None,
          progress=False)
    assert seen and set(seen) == {64 * memory.EVAL_FACTOR}


def test_a_micro_batch_over_the_budget_recomputes_only_the_share_of_layers_it_must(bpe_tok):
    """Over the budget, the first 1 - budget/tokens of the layers recompute; the others keep their activations,
    about what a micro-batch of the budget keeps (a 1,024-token row at 512: half the layers)."""
    from chatmask.models import checkpoint_activations

    model = tiny_llama(bpe_tok, layers=4)
    checkpoint_activations(model)
    memory.set_recompute(model, False)
    with memory.micro_batch(model, "over budget", 1024, 512, torch.device("cpu")):
        assert [bool(x.gradient_checkpointing) for x in model.model.layers] == [True, True, False, False]
    assert not any(x.gradient_checkpointing for x in model.model.layers)
    with memory.micro_batch(model, "over budget", 4096, 512, torch.device("cpu")):
        assert [bool(x.gradient_checkpointing) for x in model.model.layers] == [True] * 4  # 7/8 of 4: all
    memory.set_recompute(model, True)
    assert all(x.gradient_checkpointing for x in model.model.layers)
