"""On a GPU: torch's flash varlen kernel keeps packed examples apart and gives the padded loss and
gradients; the FSDP example config trains, resumes exactly from its sharded checkpoints and saves full
weights. Skipped without CUDA (CI, laptops); run on a GPU machine with `pytest tests/test_gpu.py`."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from chatmask import batches
from chatmask.attention import _varlen_kernel, packed_attention
from chatmask.train import token_loss_sum

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_bf16():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)


def rows(k=5):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(k):
        ids = torch.randint(512, (30 + 17 * i,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:]})
    return out


@pytest.mark.skipif(_varlen_kernel("cuda", torch.bfloat16, 32) is None, reason="torch has no varlen kernel")
def test_varlen_kernel_equals_padded_and_keeps_examples_apart():
    model = tiny_bf16()
    assert packed_attention(model) == "varlen"
    rs = rows()
    out = []
    for b in (batches.collate(rs, 0), batches.pack(rs, 0, attention="varlen")):
        b = batches.to_device(b, "cuda")
        model.zero_grad()
        s, n = token_loss_sum(model, b)
        (s / n).backward()
        out.append((n, float(s / n), {k: p.grad.float().clone() for k, p in model.named_parameters()}))
    assert out[0][0] == out[1][0] and out[0][1] == pytest.approx(out[1][1], rel=2e-2)
    for name, g in out[0][2].items():
        assert torch.allclose(out[1][2][name], g, atol=5e-2 * (1 + float(g.abs().max()))), name
    packed = batches.pack(rs, 0, attention="varlen")
    altered = batches.pack([dict(rs[0], input_ids=[(t + 7) % 512 for t in rs[0]["input_ids"]])] + rs[1:], 0,
                           attention="varlen")
    n0 = len(rs[0]["input_ids"])
    with torch.no_grad():
        a, b = (model(**batches.to_device({k: v for k, v in p.items() if k != "labels"}, "cuda")).logits
                for p in (packed, altered))
    assert not torch.allclose(a[0, :n0], b[0, :n0], atol=1e-2)
    assert torch.allclose(a[0, n0:], b[0, n0:], atol=1e-5) and torch.allclose(a[1:], b[1:], atol=1e-5)


def test_fp32_on_gpu_packs_with_the_mask():
    model = tiny_bf16().float()
    assert packed_attention(model) == "mask"  # no fp32 varlen kernel; sdpa once per example would be slow


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="no accelerate launcher")
def test_fsdp_run_resumes_from_sharded_checkpoints_and_saves_full_weights(tmp_path, bpe_tok):
    """The FSDP example config (one GPU here): checkpoints go through accelerate's save_state, --resume
    continues the loss curve exactly, and OUT/model holds the full gathered weights."""
    from test_compare import NER, tiny_factory
    from transformers import AutoModelForCausalLM

    d = tmp_path / "tiny"
    tiny_factory(bpe_tok)().save_pretrained(d)
    bpe_tok.save_pretrained(d)
    data = tmp_path / "ner.json"
    data.write_text(json.dumps(NER))
    example = (Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp_gpu.yaml").read_text()
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(example.replace("num_processes: 8", "num_processes: 1").replace("mixed_precision: bf16",
                                                                                   "mixed_precision: 'no'"))
    env = {**os.environ, "CHATMASK_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    cmd = [shutil.which("accelerate"), "launch", "--config_file", str(cfg), "--main_process_port", "29531", "-m",
           "chatmask", "train", str(data), "--model", str(d), "--finetune", "full", "--lr", "0.002", "--steps", "4",
           "--eval-every", "2", "--save-every", "2", "--val-split", "0.2", "--batch-size", "4", "--no-tensorboard",
           "--debug", "--out", str(out)]

    def run(*extra):
        r = subprocess.run(cmd + list(extra), env=env, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "result.json").read_text())

    first = run()
    assert "FSDP" in json.loads((out / "config.json").read_text())["distributed_type"]
    assert (out / "checkpoints" / "step-000002" / "accelerate").is_dir()
    weights = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(out / "model").state_dict().items()}
    start = tiny_factory(bpe_tok)().state_dict()
    assert weights.keys() == start.keys() and all(weights[k].shape == start[k].shape for k in start)
    assert any(not torch.equal(weights[k], start[k]) for k in start)  # trained, and saved whole
    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "result.json").unlink()
    resumed = run("--resume")
    assert resumed["train_losses"] == pytest.approx(first["train_losses"], abs=1e-5)
    again = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for k, v in weights.items():
        assert torch.allclose(again[k], v, atol=1e-5), k


def test_post_recipe_on_a_gpu(tmp_path, bpe_tok):
    """The post's recipe on a GPU (#14): QLoRA 4-bit + gradient checkpointing + bf16 + packing (torch's flash
    varlen kernel) on a random Gemma-shaped model, from examples/post/post.yaml with only the model swapped;
    prints its tokens/s (pytest -s) for bench/README.md."""
    pytest.importorskip("bitsandbytes")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_recipe import POST, ROWS, _tiny_gemma_dir

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    d = _tiny_gemma_dir(tmp_path)
    env = {**os.environ, "CHATMASK_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["python", "-m", "chatmask", "train", str(data), "--config", str(POST), "--set",
                        f"train.model={d}", "--set", "train.epochs=null", "--steps", "6", "--set", "train.val_rows=4",
                        "--out", str(tmp_path / "post")], env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "post" / "result.json").read_text())
    print(f"post recipe on {torch.cuda.get_device_name(0)}: {res['input_tokens'] / res['train_seconds']:.0f} tok/s")
    assert res["steps"] == 6 and all(x == x for x in res["train_losses"])
