"""Training: the label-sparse loss equals the full one, packing equals padding, normalisation over the
accumulation window, the same validation tokens for every arm, and exact resume."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import chatmask
from chatmask import IGNORE, batches, checkpoints, devices, evaluation
from chatmask.batches import global_batch
from chatmask.checkpoints import LoopState
from chatmask.config import DataConfig
from chatmask.errors import ConfigError
from chatmask.labels import apply_train_on
from chatmask.train import TrainConfig, token_loss_sum, train
from conftest import data_file, model_folder, tiny_llama

ROWS = [{"messages": [{"role": "user", "content": f"What is {k} plus {k}? Tell me please."},
                      {"role": "assistant", "content": f"It is {2 * k}."},
                      {"role": "user", "content": "And twice that?"},
                      {"role": "assistant", "content": f"{4 * k}."}]} for k in range(48)]


def tiny(tok, seed=0, layers=2):
    return tiny_llama(tok, seed=seed, layers=layers)


@pytest.fixture()
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    return str(p)


def encoded(tok, k=3):
    import chatmask

    return [{"input_ids": e.input_ids, "labels": e.labels} for e in
            (chatmask.encode(r["messages"], tok) for r in ROWS[:k])]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_sparse_loss_equals_full_loss_and_gradients(bpe_tok, lora):
    model = tiny(bpe_tok)
    if lora:
        from chatmask.models import add_lora

        model = add_lora(model, r=4, alpha=8, dropout=0.0)
    b = batches.collate(encoded(bpe_tok), bpe_tok.pad_token_id)
    out = {}
    for sparse in (False, True):
        model.zero_grad()
        s, n = token_loss_sum(model, b, sparse)
        (s / n).backward()
        out[sparse] = (float(s / n), grads(model))
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-5)
    # and equals transformers' own loss (mean over shifted labels)
    ref = model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert out[True][0] == pytest.approx(float(ref), abs=1e-5)
    for name, g in out[False][1].items():
        assert torch.allclose(out[True][1][name], g, atol=1e-5), name


@pytest.mark.parametrize("attention", ["mask", "varlen"])
@pytest.mark.parametrize("budget", [10_000, 40])  # one packed row; (mask) several rows with padding tails
def test_packed_loss_and_gradients_equal_unpacked_and_no_cross_attention(bpe_tok, attention, budget):
    from chatmask.attention import packed_attention

    model = tiny(bpe_tok)
    if attention == "varlen":
        assert packed_attention(model) == "varlen"  # switches the model to chatmask's per-example attention
    rows = encoded(bpe_tok, 4)
    pad = batches.collate(rows, bpe_tok.pad_token_id)
    packed = batches.pack(rows, bpe_tok.pad_token_id, max_tokens=budget, attention=attention)
    # per-example attention packs everything into one row without padding; the mask packs per budget
    assert (packed["input_ids"].shape[0] == 1) == (budget == 10_000 or attention == "varlen")
    assert (attention == "mask") or packed["input_ids"].numel() == sum(len(r["input_ids"]) for r in rows)
    out = []
    for b in (pad, packed):
        model.zero_grad()
        s, n = token_loss_sum(model, b)
        (s / n).backward()
        out.append((n, float(s / n), grads(model)))
    assert out[0][0] == out[1][0] and out[0][1] == pytest.approx(out[1][1], abs=1e-5)
    for name, g in out[0][2].items():
        assert torch.allclose(out[1][2][name], g, atol=1e-5), name
    # change the first example's tokens: the logits of the later examples must not move
    altered = [dict(rows[0], input_ids=[(t + 7) % len(bpe_tok) for t in rows[0]["input_ids"]])] + rows[1:]
    p2 = batches.pack(altered, bpe_tok.pad_token_id, max_tokens=budget, attention=attention)
    n0 = len(rows[0]["input_ids"])
    with torch.no_grad():
        a = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        b = model(**{k: v for k, v in p2.items() if k != "labels"}).logits
    assert not torch.allclose(a[0, :n0], b[0, :n0], atol=1e-3)  # the change is visible where it is
    assert torch.allclose(a[0, n0:], b[0, n0:], atol=1e-6) and torch.allclose(a[1:], b[1:], atol=1e-6)


@pytest.mark.parametrize("attention", ["mask", "varlen"])
@pytest.mark.parametrize("train_on", ["all", "last_assistant"])
def test_packing_trains_the_arm_it_is_given(bpe_tok, attention, train_on):
    """The unmasked arm packed trains what it trains padded: the same tokens, the same loss (a pack that kept
    the stored assistant labels would train the masked arm under both names)."""
    from chatmask.attention import packed_attention

    model = tiny(bpe_tok)
    if attention == "varlen":
        assert packed_attention(model) == "varlen"
    rows = encoded(bpe_tok, 4)
    pad = batches.collate(rows, bpe_tok.pad_token_id, train_on=train_on)
    packed = batches.pack(rows, bpe_tok.pad_token_id, train_on=train_on, max_tokens=64, attention=attention)
    assistant = batches.collate(rows, bpe_tok.pad_token_id)
    with torch.no_grad():
        (s0, n0), (s1, n1), (_, na) = (token_loss_sum(model, b) for b in (pad, packed, assistant))
    assert n0 == n1 != na and float(s1) == pytest.approx(float(s0), rel=1e-5)


def test_varlen_packs_one_row_without_padding_and_boundaries_cover_it(bpe_tok):
    rows = encoded(bpe_tok, 5)
    p = batches.pack(rows, bpe_tok.pad_token_id, max_tokens=40, attention="varlen")
    assert p["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    cu = p["cu_seq_lens_q"].tolist()
    assert [y - x for x, y in zip(cu, cu[1:])] == [len(r["input_ids"]) for r in rows]
    assert p["max_length_q"] == max(len(r["input_ids"]) for r in rows)
    assert (p["position_ids"][0, cu[1]:cu[2]] == torch.arange(cu[2] - cu[1])).all()


def test_varlen_attention_on_cpu_is_causal_attention_per_segment_over_several_rows():
    from chatmask.attention import _varlen_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, requires_grad=True)  # (B, H, T, D)
    k, v = (torch.randn(2, 2, 6, 8, generator=g, requires_grad=True) for _ in range(2))  # grouped kv heads
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    cu = torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32)  # rows of 6: [2, 4] and [3, 3]
    out, _ = _varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4)
    assert out.shape == (2, 6, 4, 8)

    def alone(b, t0, t1):  # (1, H, n, D): causal sdpa over one segment, grouped heads repeated
        return torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, :, t0:t1], *(x[b:b + 1, :, t0:t1].repeat_interleave(2, dim=1) for x in (k, v)), is_causal=True)

    ref = torch.cat([torch.cat([alone(0, 0, 2), alone(0, 2, 6)], dim=2),
                     torch.cat([alone(1, 0, 3), alone(1, 3, 6)], dim=2)]).transpose(1, 2)  # (B, T, H, D)
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn(out.shape, generator=g)
    grads = [torch.autograd.grad((y * w).sum(), (q, k, v)) for y in (out, ref)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))  # backward: one cat, same gradients
    for bad in ([0, 2, 7, 12], [0, 2, 6, 9]):  # crosses a row; leaves a row uncovered
        with pytest.raises(ValueError, match="packed segment"):
            _varlen_attention(module, q, k, v, None, cu_seq_lens_q=torch.tensor(bad), max_length_q=5)


def test_packing_probe_catches_attention_that_ignores_boundaries(bpe_tok):
    from chatmask.attention import _isolates, packed_attention

    model = tiny(bpe_tok)  # plain sdpa: boundaries alone are ignored, the 4D mask is honoured
    assert not _isolates(model, "varlen")
    assert _isolates(model, "mask")
    eager = tiny(bpe_tok)
    eager.set_attn_implementation("eager")
    assert packed_attention(eager) == "varlen"
    from chatmask.models import add_lora

    assert packed_attention(add_lora(tiny(bpe_tok), r=4, alpha=8)) == "varlen"  # through peft's wrapper


def test_packed_training_runs_and_matches_padded_first_step(data, bpe_tok, tmp_path):
    a = _run(data, bpe_tok, tmp_path / "pad", steps=2, max_grad_norm=0)
    b = _run(data, bpe_tok, tmp_path / "pack", steps=2, max_grad_norm=0, packing=True, pack_tokens=64)
    assert a["train_losses"][0] == pytest.approx(b["train_losses"][0], abs=1e-5)
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-4)


def test_pack_respects_budget_and_cuts_first_labels(bpe_tok):
    rows = encoded(bpe_tok, 6)
    n = max(len(r["input_ids"]) for r in rows)
    p = batches.pack(rows, bpe_tok.pad_token_id, max_tokens=n + 5)
    assert p["input_ids"].shape[1] <= n + 5 and p["input_ids"].shape[0] >= 3
    starts = (p["position_ids"] == 0)
    assert (p["labels"][starts] == IGNORE).all()


def test_apply_train_on_makes_each_arm_from_assistant_labels():
    ids = [1, 2, 3, 4, 5, 6, 7]
    lab = [IGNORE, 2, 3, IGNORE, IGNORE, 6, IGNORE]
    assert apply_train_on(ids, lab, "assistant") == lab
    assert apply_train_on(ids, lab, "all") == ids
    assert apply_train_on(ids, lab, "last_assistant") == [IGNORE] * 5 + [6, IGNORE]
    assert apply_train_on(ids, [IGNORE] * 7, "last_assistant") == [IGNORE] * 7


def test_train_on_is_one_rule_for_encode_and_for_training(bpe_tok):
    """`encode(train_on=X)` (what view shows) and training's arm X made from prepared assistant labels train
    the same tokens, also when the last answer has weight 0 and when truncation cut the last answer off."""
    conv = [{"role": "user", "content": "Hello! How are you today?"}, {"role": "assistant", "content": "I am fine."},
            {"role": "user", "content": "The quick brown fox?"},
            {"role": "assistant", "content": "Jumps over the lazy dog."}]
    last_w0 = [*conv[:3], {**conv[3], "weight": 0}]
    full = len(chatmask.encode(conv, bpe_tok).input_ids)
    cases = [(conv, None), (last_w0, None), (conv, full - 3)]  # the last: turns truncation drops the last answer
    for train_on in ("assistant", "all", "last_assistant"):
        for msgs, max_length in cases:
            shown = chatmask.encode(msgs, bpe_tok, train_on=train_on, max_length=max_length)
            kept = chatmask.encode(msgs, bpe_tok, max_length=max_length)
            batch = batches.collate([{"input_ids": kept.input_ids, "labels": kept.labels}], 0, train_on)
            assert batch["labels"][0].tolist() == shown.labels, (train_on, max_length)
    last = chatmask.encode(last_w0, bpe_tok, train_on="last_assistant")
    assert bpe_tok.decode([t for t in last.labels if t != IGNORE]) == "I am fine.<|im_end|>"


def test_global_batches_cover_epochs_in_seeded_order():
    cfg = TrainConfig(batch_size=3, grad_accum=2)
    seen = [i for s in range(4) for i in global_batch(12, cfg, s, 1)]
    assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:]) == list(range(12))
    assert global_batch(12, cfg, 1, 1) == global_batch(12, cfg, 1, 1)
    assert global_batch(12, TrainConfig(batch_size=3, grad_accum=2, seed=1), 0, 1) != global_batch(12, cfg, 0, 1)


def test_group_by_length_keeps_epochs_and_cuts_padding():
    lengths = [(k * 37) % 100 + 5 for k in range(512)]
    cfg = TrainConfig(batch_size=4, group_by_length=True)
    steps = [global_batch(512, cfg, s, 1, lengths) for s in range(128)]
    assert sorted(r for b in steps for r in b) == list(range(512))  # still one epoch, every row once

    def padding(bs):
        return sum(max(lengths[r] for r in b) * len(b) - sum(lengths[r] for r in b) for b in bs)

    plain = [global_batch(512, TrainConfig(batch_size=4), s, 1) for s in range(128)]
    assert padding(steps) < padding(plain) / 5
    assert steps == [global_batch(512, cfg, s, 1, lengths) for s in range(128)]  # deterministic


def _run(data, tok, out, **kw):
    cfg = TrainConfig(**{"steps": 6, "eval_every": 3, "save_every": 2, "val_split": 0.1, "batch_size": 4,
                         "finetune": "full", "lr": 1e-2, "tensorboard": False, **kw})
    return train(data, DataConfig(), cfg, out, tokenizer=tok, model=tiny(tok), progress=False, log=None)


def test_sparse_head_is_checked_on_a_probe_and_training_falls_back_to_full_logits(data, bpe_tok, tmp_path):
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from chatmask.models import add_lora, sparse_head_works

    class IntOnlyHead(LlamaForCausalLM):  # takes logits_to_keep but slices positions the pre-mask way
        def forward(self, input_ids=None, logits_to_keep=0, use_cache=None, **kw):
            h = self.model(input_ids=input_ids, **kw).last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            return CausalLMOutputWithPast(logits=self.lm_head(h[:, keep, :]))

    class IgnoresIt(LlamaForCausalLM):  # swallows it in **kwargs: full logits come back
        def forward(self, input_ids=None, **kw):
            kw.pop("logits_to_keep", None)
            return super().forward(input_ids=input_ids, **kw)

    assert sparse_head_works(tiny(bpe_tok)) and sparse_head_works(add_lora(tiny(bpe_tok), r=4, alpha=8))
    base = tiny(bpe_tok)
    for cls in (IntOnlyHead, IgnoresIt):
        odd = cls(base.config)
        odd.load_state_dict(base.state_dict())
        assert not sparse_head_works(odd)
    notes = []
    cfg = TrainConfig(steps=2, eval_every=2, save_every=2, val_split=0.1, batch_size=4, finetune="full", lr=1e-2,
                      tensorboard=False)
    odd = IntOnlyHead(base.config)
    odd.load_state_dict(base.state_dict())
    r = train(data, DataConfig(), cfg, tmp_path / "odd", tokenizer=bpe_tok, model=odd, progress=False, log=notes.append)
    same = train(data, DataConfig(), cfg, tmp_path / "ref", tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False,
                 log=None)
    assert any("computing full logits" in str(n) for n in notes)
    assert r["train_losses"] == pytest.approx(same["train_losses"], abs=1e-5)  # the full path, the same loss


def test_training_lowers_loss_and_saves(data, bpe_tok, tmp_path):
    r = _run(data, bpe_tok, tmp_path / "o", steps=12, eval_every=6)
    assert r["evals"][-1]["val_loss"] < r["evals"][0]["val_loss"] and r["train_losses"][-1] < r["train_losses"][0]
    assert (tmp_path / "o" / "model" / "config.json").exists()
    lines = (tmp_path / "o" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 13 and "val_loss" in json.loads(lines[5])
    stop = json.loads(lines[-1])  # the stop rate, measured once at the end
    assert stop["step"] == 12 and stop["prompts"] == r["stop"]["prompts"] and "stop_rate" in stop


def test_accumulation_window_normalisation(data, bpe_tok, tmp_path):
    a = _run(data, bpe_tok, tmp_path / "a", steps=2, batch_size=4, grad_accum=1, max_grad_norm=0)
    b = _run(data, bpe_tok, tmp_path / "b", steps=2, batch_size=2, grad_accum=2, max_grad_norm=0)
    # same weights at step 1: the loss of 4 rows = the loss of 2 x 2 rows (sum / all trained targets)
    assert a["train_losses"][0] == pytest.approx(b["train_losses"][0], abs=1e-6)
    # a mean of per-micro-batch means would differ: the micro-batches hold different numbers of targets
    # later steps agree up to float summation order, which AdamW's first steps amplify
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-4)


def test_every_arm_scores_the_same_validation_tokens(data, bpe_tok, tmp_path):
    res = {}
    for arm in ("assistant", "all"):
        cfg = TrainConfig(steps=2, eval_every=2, save_every=2, val_split=0.1, finetune="full", tensorboard=False)
        res[arm] = train(data, DataConfig(train_on=arm), cfg, tmp_path / arm, tokenizer=bpe_tok, model=tiny(bpe_tok),
                         progress=False, log=None)
    assert res["assistant"]["val_tokens"] == res["all"]["val_tokens"] > 0
    assert res["assistant"]["val_tokens_sha256"] == res["all"]["val_tokens_sha256"]
    assert res["all"]["trained_tokens"] > 2 * res["assistant"]["trained_tokens"]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_resume_is_exact(data, bpe_tok, tmp_path, finetune):
    kw = dict(steps=6, save_every=2, finetune=finetune, lora_r=4, lora_dropout=0.1)
    whole = _run(data, bpe_tok, tmp_path / "whole", **kw)
    cfg = TrainConfig(**{"eval_every": 3, "val_split": 0.1, "batch_size": 4, "lr": 1e-2, "tensorboard": False, **kw})
    part = train(data, DataConfig(), cfg, tmp_path / "part", tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False,
                 log=None, stop_after=3)
    assert part == {"stopped_at": 3}  # checkpoint at step 2; step 3 is lost as in a kill
    cfg = TrainConfig(**{**cfg.__dict__, "resume": True})
    # full: every weight comes from the checkpoint, so start from other random weights; LoRA: the same base
    resumed = train(data, DataConfig(), cfg, tmp_path / "part", tokenizer=bpe_tok,
                    model=tiny(bpe_tok, seed=5 if finetune == "full" else 0),
                    progress=False, log=None)
    assert resumed["train_losses"] == pytest.approx(whole["train_losses"], abs=1e-6)
    assert resumed["final_val_loss"] == pytest.approx(whole["final_val_loss"], abs=1e-6)


def test_varlen_model_generates_and_scores_padded_batches_as_sdpa(bpe_tok):
    """After packed_attention switches a model, unpacked work (left-padded generation for ner-f1,
    right-padded evaluation) is exactly transformers' sdpa."""
    import copy

    from chatmask.attention import packed_attention

    model = tiny(bpe_tok)
    ref = copy.deepcopy(model)
    assert packed_attention(model) == "varlen"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    att = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    kw = {"input_ids": ids, "attention_mask": att, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**kw), ref.generate(**kw))
    b = batches.collate(encoded(bpe_tok, 3), bpe_tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, ref(**b).logits)


def test_checkpoint_restores_every_rng_a_step_draws_from(monkeypatch, tmp_path):
    """A resumed run draws the same dropout masks only if every generator comes back: the CPU one, Python's,
    and on a GPU each device's (faked here: this machine has none)."""
    import random

    gpu = {"state": [torch.tensor([1, 2, 3], dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in gpu["state"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: gpu.update(state=list(s)))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(0)
    random.seed(0)
    path = checkpoints.save_checkpoint(tmp_path, 1, model, opt, sched, LoopState(step=1), keep=1)
    want = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(1)
    random.seed(1)
    gpu["state"] = [torch.tensor([9, 9, 9], dtype=torch.uint8)]
    checkpoints.load_checkpoint(path, model, opt, sched)
    assert (torch.rand(3).tolist(), random.random()) == want
    assert gpu["state"][0].tolist() == [1, 2, 3]


def test_tensorboard_writer_and_eval_mode_survive_every_exit(data, bpe_tok, tmp_path, monkeypatch):
    """The TensorBoard writer is closed when a run finishes, stops early, or fails in a step; evaluation
    gives the model back in the mode it found it, even when it raises."""
    from chatmask import train as train_mod

    closed = []

    class Writer:
        def add_scalar(self, *a):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(train_mod, "_tensorboard", lambda *a: Writer())
    cfg = TrainConfig(steps=2, eval_every=2, val_split=0.1, batch_size=4, lora_r=4)
    assert train(data, DataConfig(), cfg, tmp_path / "a", tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False,
                 log=None, stop_after=1) == {"stopped_at": 1}
    assert closed == [True]

    def boom(run):
        raise RuntimeError("a failing step")

    monkeypatch.setattr(train_mod, "_step", boom)
    with pytest.raises(RuntimeError, match="failing step"):
        train(data, DataConfig(), cfg, tmp_path / "b", tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False, log=None)
    assert closed == [True, True]

    model = tiny(bpe_tok)
    model.train()
    monkeypatch.setattr(evaluation, "_evaluate_loss", lambda *a: (_ for _ in ()).throw(RuntimeError("eval failed")))
    with pytest.raises(RuntimeError, match="eval failed"):
        evaluation.evaluate(model, [], 0, 8)
    assert model.training


def test_a_step_descends_the_mean_loss_over_the_steps_trained_tokens(data, bpe_tok, tmp_path, monkeypatch):
    """The gradient of one optimizer step is that of (sum of token losses) / (trained tokens of the whole
    step), over every micro-batch of the accumulation window: with plain SGD at lr 1 the update is exactly
    minus that gradient (AdamW would hide a wrong scale)."""
    import datasets

    from chatmask import train as train_mod

    monkeypatch.setattr(train_mod, "adamw", lambda params, **kw: torch.optim.SGD(params, lr=1.0))
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=2, finetune="full", max_grad_norm=0.0, val_split=0.1,
                      eval_every=1, save_every=1, tensorboard=False, warmup=0.0, schedule="constant")
    model = tiny(bpe_tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(data, DataConfig(), cfg, tmp_path / "o", tokenizer=bpe_tok, model=model, progress=False, log=None)
    after = dict(model.named_parameters())

    # the same step by hand: the rows of step 0, every micro-batch's token losses summed, divided once
    ref = tiny(bpe_tok)
    ds = datasets.load_from_disk(str(next((tmp_path / "cache").glob("prepared/*"))))
    holdout = evaluation.hold_out(ds, cfg)
    indices = batches.global_batch(len(holdout.train), cfg, 0, 1)
    mbs, n_total = batches.micro_batches(holdout.train, indices, cfg, 0, 1, bpe_tok.pad_token_id, "assistant",
                                         torch.float32, "mask")
    assert len(mbs) == 2  # two micro-batches: the division must span both
    total = sum(token_loss_sum(ref, mb)[0] for mb, _, _ in mbs)
    (total / n_total).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(before[n] - after[n].detach(), p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("busy, cores, have, want", [
    (None, 2, 2, 2),  # load unknown (not Linux): left alone
    (0.1, 2, 2, 2), (0.7, 4, 4, 4),  # a quiet machine: left alone
    (0.75, 2, 2, 1), (1.0, 2, 2, 1), (1.0, 4, 4, 3), (2.6, 4, 4, 1),  # one thread per core left free
    (6.0, 4, 4, 1),  # every core taken: still one thread
    (1.0, 8, 4, 4),  # more cores free than torch's threads: never more threads than it has
])
def test_threads_for_each_load(busy, cores, have, want):
    assert devices.threads_for(busy, cores, have) == want


def test_threads_follow_the_cores_other_processes_leave(monkeypatch):
    """On a core another process holds, every parallel op waits for a descheduled thread (1.75x slower
    here, bench/README.md): training takes one thread per free core, or --threads. The load is faked: the
    test does not depend on what else runs on the machine."""
    said, before = [], torch.get_num_threads()
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 4)
    try:
        for busy, want in [(None, 4), (0.2, 4), (1.0, 3), (2.0, 2), (3.4, 1), (5.0, 1)]:
            torch.set_num_threads(4)
            monkeypatch.setattr(devices, "busy_cores_elsewhere", lambda b=busy: b)
            devices.cpu_threads(TrainConfig(), said.append)
            assert torch.get_num_threads() == want, busy
        assert len(said) == 4 and "1.0 of 4 cores busy: training on 3 thread(s) instead of 4" in said[0]
        devices.cpu_threads(TrainConfig(threads=2), said.append)  # --threads wins, whatever the load
        assert torch.get_num_threads() == 2 and len(said) == 4
    finally:
        torch.set_num_threads(before)


def test_busy_cores_are_the_busy_jiffies_of_other_processes(monkeypatch):
    """From two samples of (every core's jiffies, idle ones, this process's own): (busy - ours) / all, times
    the cores. The samples are faked; the real /proc read only has to give a number or None."""
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 4)
    samples = iter([(1000, 600, 50), (1400, 800, 150)])  # 400 jiffies: 200 idle, 100 ours, 100 others'
    assert devices.busy_cores_elsewhere(0, sample=lambda: next(samples)) == pytest.approx(1.0)

    def unreadable():
        raise OSError("no /proc here")

    assert devices.busy_cores_elsewhere(0, sample=unreadable) is None
    real = devices.busy_cores_elsewhere(0.01)
    assert real is None or real >= 0


def test_a_bf16_accelerator_earlier_in_the_process_does_not_leak_into_training(data, bpe_tok, tmp_path):
    """accelerate keeps one state per process: a Trainer run with bf16 before chatmask's train() (a
    notebook) must not make chatmask autocast to bf16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = TrainConfig(steps=2, batch_size=4, finetune="full", val_split=0.1, eval_every=2, save_every=2,
                      tensorboard=False)
    plain = train(data, DataConfig(), cfg, tmp_path / "a", tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False,
                  log=None)
    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision="bf16")
    after = train(data, DataConfig(), cfg, tmp_path / "b", tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False,
                  log=None)
    AcceleratorState._reset_state()
    assert after["train_losses"] == pytest.approx(plain["train_losses"], abs=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_evaluate_rows_are_each_rows_own_loss(bpe_tok, sparse):
    """Per-row validation losses (for the bootstrap over rows) equal each row evaluated alone, in the
    validation set's order, and sum to what evaluate's mean is made of."""
    import datasets

    model = tiny(bpe_tok)
    val = datasets.Dataset.from_list(encoded(bpe_tok, k=5))
    table = evaluation.evaluate_rows(model, val, bpe_tok.pad_token_id, batch_size=2, sparse=sparse)  # (5, 2)
    assert table.shape == (5, 2)
    for i in range(5):
        b = batches.collate([val[i]], bpe_tok.pad_token_id)
        s, n = token_loss_sum(model.eval(), b, sparse)
        assert table[i, 1] == n and abs(float(table[i, 0]) - float(s)) < 1e-4
    mean = evaluation.evaluate(model, val, bpe_tok.pad_token_id, batch_size=5, sparse=sparse)
    assert abs(mean - float(table[:, 0].sum() / table[:, 1].sum())) < 1e-6


# ---------------------------------------------------------------- the loop state, resume and saving

STATE_KEYS = {"step", "history", "evals", "trained_tokens", "input_tokens", "seconds", "val_row_losses"}


def test_an_old_checkpoints_state_json_still_resumes(tmp_path):
    """state.json's keys are the loop state's: one written before val_row_losses existed reads back through
    the path resume takes (checkpoints.read_state, Python's random state restored), and what is written now
    has the same keys (plus Python's random state, kept apart)."""
    import random

    pr = random.getstate()
    old = {"step": 4, "history": [{"step": 4, "train_loss": 2.5, "lr": 1e-3, "trained_tokens": 30, "tokens_per_s": 9}],
           "evals": [{"step": 0, "val_loss": 3.0, "seconds": 0.1}], "trained_tokens": 120, "input_tokens": 300,
           "seconds": 1.5, "python_random": [pr[0], list(pr[1]), pr[2]]}
    (tmp_path / "state.json").write_text(json.dumps(old))
    want = random.random()
    random.seed(1)
    state = checkpoints.read_state(tmp_path)
    assert random.random() == want
    assert (state.step, state.trained_tokens, state.input_tokens, state.val_row_losses) == (4, 120, 300, None)
    assert state.to_json() == {k: v for k, v in old.items() if k != "python_random"}
    state.val_row_losses = [[1.5, 3]]
    assert set(state.to_json()) == STATE_KEYS and LoopState.from_json(state.to_json()) == state


def _short(**kw):
    return TrainConfig(**{"steps": 4, "eval_every": 2, "save_every": 2, "val_split": 0.1, "batch_size": 4,
                          "finetune": "full", "lr": 1e-2, "tensorboard": False, "stop_prompts": 0, **kw})


@pytest.mark.parametrize("change, said", [({"max_length": 64}, "--max-length 2048 -> 64"),
                                          ({"template": "zephyr"}, "--template None -> 'zephyr'"),
                                          ({"truncation": "right"}, "--truncation 'turns' -> 'right'")])
def test_resume_refuses_a_changed_data_setting_other_than_the_path(data, bpe_tok, tmp_path, change, said):
    out = tmp_path / "o"
    assert train(data, DataConfig(), _short(), out, tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False,
                 log=None, stop_after=2) == {"stopped_at": 2}
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert set(state) == STATE_KEYS | {"python_random"}
    with pytest.raises(ConfigError, match=re.escape(said) + ".*another --out"):
        train(data, DataConfig(**change), _short(resume=True), out, tokenizer=bpe_tok, model=tiny(bpe_tok),
              progress=False, log=None)


def test_a_prepared_folder_is_recorded_as_its_source_and_its_settings(data, bpe_tok, tmp_path, monkeypatch):
    """A run on a folder written by `prepare` records the folder's source and the settings it was prepared
    with (not the DataConfig passed beside it): resume from a copy of the folder continues, resume from a
    folder prepared with another --max-length is refused for that setting, and the folder's shards are not
    read to tell which data it holds."""
    from chatmask import prepare as prep

    a = prep.prepare(data, DataConfig(), tmp_path / "a", tokenizer=bpe_tok, progress=False, log=None).path
    out = tmp_path / "o"
    train(str(a), DataConfig(train_on="all"), _short(), out, tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False,
          log=None, stop_after=2)
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"] == data and saved["prepared"] == str(a)
    made = json.loads((a / "config.json").read_text())  # the folder's settings, its stop list resolved
    assert saved["data_config"] == {**{k: made[k] for k in saved["data_config"]}, "train_on": "all"}
    assert made["stop_tokens"] and made["train_on"] == "assistant"
    short = prep.prepare(data, DataConfig(max_length=64, truncation="right"), tmp_path / "b", tokenizer=bpe_tok,
                         progress=False, log=None).path
    with pytest.raises(ConfigError, match=re.escape("--max-length 2048 -> 64")):
        train(str(short), DataConfig(train_on="all"), _short(resume=True), out, tokenizer=bpe_tok,
              model=tiny(bpe_tok), progress=False, log=None)
    monkeypatch.setattr(prep, "_hash_source", lambda *a: pytest.fail("a prepared folder's files were hashed"))
    assert checkpoints.data_id(a) == checkpoints.data_id(data)
    copy = shutil.copytree(a, tmp_path / "elsewhere")
    r = train(str(copy), DataConfig(train_on="all"), _short(resume=True), out, tokenizer=bpe_tok, model=tiny(bpe_tok),
              progress=False, log=None)
    assert r["steps"] == 4 and r["train_on"] == "all"


def test_a_save_cut_off_midway_leaves_the_previous_model_whole(data, bpe_tok, tmp_path):
    """OUT/model is written beside and swapped in: a save that fails after writing part of the new model
    (a full disk, a kill) leaves the previous OUT/model complete and loadable, and result.json as it was."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    train(data, DataConfig(), _short(steps=2), out, tokenizer=bpe_tok, model=tiny(bpe_tok), progress=False, log=None)
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    result = (out / "result.json").read_text()
    model = tiny(bpe_tok, seed=3)

    def cut_off(path, **kw):
        type(model).save_pretrained(model, path, **kw)
        (Path(path) / "model.safetensors").write_bytes(b"cut off")
        raise OSError("No space left on device")

    model.save_pretrained = cut_off
    with pytest.raises(OSError, match="No space left"):
        train(data, DataConfig(), _short(resume=True), out, tokenizer=bpe_tok, model=model, progress=False, log=None)
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == before
    assert (out / "result.json").read_text() == result
    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written left beside


def test_a_checkpoint_cut_off_midway_leaves_the_previous_ones(tmp_path, monkeypatch):
    import safetensors.torch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoints.save_checkpoint(tmp_path, 2, model, opt, sched, LoopState(step=2), keep=2)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}

    def cut_off(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"cut off")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", cut_off)
    with torch.no_grad():
        model.weight.add_(1.0)
    for step in (4, 2):  # the next checkpoint, and the same step written again
        with pytest.raises(OSError, match="No space left"):
            checkpoints.save_checkpoint(tmp_path, step, model, opt, sched, LoopState(step=step), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    latest = checkpoints.latest_checkpoint(tmp_path)
    assert checkpoints.load_checkpoint(latest, model, opt, sched).step == 2
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())


def test_quantize_trains_lora_on_bitsandbytes_4bit_layers(tmp_path, monkeypatch, bpe_tok):
    """--quantize 4bit: the model that trained holds bitsandbytes' Linear4bit layers with LoRA adapters on
    them, and the adapters moved (a loss that goes down would not notice the quantization skipped)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import LoraLayer

    data = data_file(tmp_path, monkeypatch, ROWS[:24])
    model_dir = model_folder(tmp_path / "tiny", bpe_tok, hidden=64)  # 64 wide: bitsandbytes' CPU kernels
    seen = {}

    def look(model, holdout):
        lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
        seen["4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        seen["lora on 4bit"] = sum(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in lora)
        seen["lora moved"] = all(bool(m.lora_B["default"].weight.abs().sum() > 0) for m in lora)
        return {}

    cfg = _short(model=model_dir, finetune="lora", quantize="4bit", steps=2, val_split=0.2, lr=0.02)
    train(data, DataConfig(), cfg, tmp_path / "q", on_end=look, progress=False, log=None)
    projections = 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers; the head stays unquantized
    assert seen == {"4bit": projections, "lora on 4bit": projections, "lora moved": True}


def test_a_prepared_folder_trains_with_its_own_tokenizer_and_template(tmp_path, monkeypatch):
    """`chatmask train FOLDER` (no tokenizer given) takes the folder's tokenizer settings: a folder prepared
    with a built-in template whose tokens were added trained on the model's tokenizer would index past its
    embeddings (was an IndexError)."""
    from conftest import make_base_bpe_tokenizer

    from chatmask import prepare as prep
    from chatmask.hub import data_tokenizer

    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    base = make_base_bpe_tokenizer()
    mdir = model_folder(tmp_path / "m", base)
    rows = [{"messages": [{"role": "user", "content": f"What is {k} plus {k}?"},
                          {"role": "assistant", "content": f"It is {2 * k}."}]} for k in range(24)]
    d = tmp_path / "d.jsonl"
    d.write_text("\n".join(json.dumps(r) for r in rows))
    dc = DataConfig(template="chatml", add_template_tokens=True)
    tok = data_tokenizer(dc, mdir)
    assert len(tok) > len(base)
    folder = prep.prepare(str(d), dc, tmp_path / "p", tokenizer=tok, progress=False).path
    cfg = TrainConfig(model=mdir, steps=1, eval_every=1, save_every=1, val_split=0.2, batch_size=4, finetune="full",
                      tensorboard=False, stop_prompts=0)
    r = train(str(folder), DataConfig(), cfg, tmp_path / "o", progress=False, log=None)
    assert r["steps"] == 1 and math.isfinite(r["final_val_loss"])
