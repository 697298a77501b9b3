"""The post's whole recipe: QLoRA (4-bit), gradient checkpointing, the attention implementation, epochs,
template tokens added to a base tokenizer, each with packing and the label-sparse head; and the post's
config file trained as written with only the model swapped for a tiny random Gemma."""

import json
from pathlib import Path

import pytest
import torch

from chatmask import cli
from chatmask.config import DataConfig, TrainConfig
from chatmask.train import train
from conftest import data_file, model_folder

ROWS = [{"messages": [{"role": "user", "content": f"What is {k} plus {k}? Tell me please."},
                      {"role": "assistant", "content": f"It is {2 * k}."},
                      {"role": "user", "content": "And twice that?"},
                      {"role": "assistant", "content": f"{4 * k}."}]} for k in range(24)]
POST = Path(__file__).resolve().parents[1] / "examples" / "post" / "post.yaml"


@pytest.fixture
def data(tmp_path, monkeypatch):
    return data_file(tmp_path, monkeypatch, ROWS)


@pytest.fixture
def model_dir(tmp_path, bpe_tok):
    return model_folder(tmp_path / "tiny", bpe_tok, hidden=64)  # 64 wide: bitsandbytes' CPU kernels


def run(data, out, **kw):
    base = dict(lr=0.01, steps=3, eval_every=3, save_every=3, val_split=0.2, batch_size=4, tensorboard=False)
    return train(data, DataConfig(), TrainConfig(**{**base, **kw}), out, log=None, progress=False)


@pytest.mark.parametrize("finetune, packing, sparse", [("lora", True, True), ("full", True, True),
                                                       ("lora", False, False)])
def test_gradient_checkpointing_gives_the_same_run(finetune, packing, sparse, data, model_dir, tmp_path):
    """Recomputing activations changes memory and time, never the numbers (dropout included: the RNG is
    restored for the recomputation)."""
    kw = dict(model=model_dir, finetune=finetune, packing=packing, sparse_loss=sparse, lora_dropout=0.1)
    plain = run(data, tmp_path / "plain", **kw)
    ckpt = run(data, tmp_path / "ckpt", gradient_checkpointing=True, **kw)
    assert ckpt["train_losses"] == pytest.approx(plain["train_losses"], abs=1e-5)
    assert ckpt["final_val_loss"] == pytest.approx(plain["final_val_loss"], abs=1e-5)


def test_gradient_checkpointing_is_on(model_dir):
    from chatmask.models import checkpoint_activations, load_model

    m = load_model(model_dir)
    checkpoint_activations(m)
    assert getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing


def test_qlora_4bit_trains_with_packing_sparse_head_and_checkpointing(data, model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    r = run(data, tmp_path / "q", model=model_dir, finetune="lora", quantize="4bit", packing=True,
            gradient_checkpointing=True, steps=4, eval_every=2, lr=0.02)
    plain = run(data, tmp_path / "p", model=model_dir, finetune="lora", packing=True, steps=4, eval_every=2, lr=0.02)
    assert all(torch.isfinite(torch.tensor(r["train_losses"])))
    assert r["evals"][-1]["val_loss"] < r["evals"][0]["val_loss"]  # it learns
    # NF4 weights are not the fp32 ones, but the model is the same one: the starting losses agree roughly
    assert r["evals"][0]["val_loss"] == pytest.approx(plain["evals"][0]["val_loss"], rel=0.05)
    saved = tmp_path / "q" / "model"
    assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()


def test_quantized_model_layers_are_4bit(model_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from chatmask.models import load_model

    m = load_model(model_dir, quantize="4bit")
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4" and q.weight.quant_state.nested


@pytest.mark.parametrize("argv, message", [
    (["--finetune", "full", "--quantize", "4bit"], "full fine-tuning of a quantized model is not possible"),
    (["--quantize", "4bit", "--merge-lora"], "cannot merge adapters into quantized weights"),
    (["--steps", "5", "--epochs", "2"], "give one of them"),
    (["--epochs", "0"], "--epochs must be more than 0"),
    (["--attn-implementation", "no_such_kernel"], "--attn-implementation"),
    (["--add-template-tokens"], "--add-template-tokens adds a built-in template's tokens"),
])
def test_mistakes_are_clear_errors(argv, message, data, model_dir, tmp_path, capsys):
    rc = cli.main(["train", data, "--model", model_dir, "--out", str(tmp_path / "o"), "--no-tensorboard", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_flash_attention_where_it_cannot_run_is_a_clear_error(data, model_dir, tmp_path, capsys):
    rc = cli.main(["train", data, "--model", model_dir, "--out", str(tmp_path / "o"), "--no-tensorboard",
                   "--attn-implementation", "flash_attention_2", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "flash_attention_2" in err and "Traceback" not in err, err


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_chosen_attention_is_kept_and_packing_still_keeps_examples_apart(impl, data, model_dir, tmp_path):
    from chatmask.attention import packed_attention
    from chatmask.models import load_model

    m = load_model(model_dir, attn_implementation=impl)
    assert packed_attention(m, keep=True) in ("varlen", "mask")
    assert m.config._attn_implementation == impl  # not swapped for chatmask's own
    packed = run(data, tmp_path / "pk", model=model_dir, finetune="full", packing=True, attn_implementation=impl)
    padded = run(data, tmp_path / "pd", model=model_dir, finetune="full", attn_implementation=impl)
    assert packed["train_losses"] == pytest.approx(padded["train_losses"], abs=1e-4)


def test_epochs_make_the_steps(data, model_dir, tmp_path):
    r = run(data, tmp_path / "e", model=model_dir, finetune="full", steps=None, epochs=1.5, batch_size=4,
            eval_every=100, save_every=100)
    conf = json.loads((tmp_path / "e" / "config.json").read_text())
    # 24 rows, 5 held out: 19 train; 1.5 epochs of 19 rows at 4 a step = ceil(7.125) = 8 steps
    assert r["train_rows"] == 19 and r["steps"] == 8 and conf["steps"] == 8
    assert conf["train_config"]["epochs"] == 1.5 and conf["train_config"]["steps"] is None
    assert [e["step"] for e in r["evals"]] == [0, 8]  # evaluation follows: at the start and at the end


def test_epochs_resume_exactly(data, model_dir, tmp_path):
    kw = dict(model=model_dir, finetune="full", steps=None, epochs=1.0, batch_size=4, save_every=2, eval_every=100)
    whole = run(data, tmp_path / "w", **kw)
    tc = TrainConfig(**{**dict(lr=0.01, val_split=0.2, tensorboard=False), **kw})
    train(data, DataConfig(), tc, tmp_path / "k", log=None, progress=False, stop_after=2)
    import dataclasses

    resumed = train(data, DataConfig(), dataclasses.replace(tc, resume=True), tmp_path / "k", log=None, progress=False)
    assert resumed["train_losses"] == pytest.approx(whole["train_losses"], abs=1e-6)


def test_added_template_tokens_grow_the_model_and_train_their_rows(data, tmp_path, base_tok):
    """A base tokenizer without ChatML tokens, as the post's Gemma: --add-template-tokens adds them, the
    model's embeddings grow, and LoRA trains the new rows (peft trainable tokens), saved with the adapters."""
    d = model_folder(tmp_path / "base", base_tok, hidden=64)
    assert "<|im_end|>" not in base_tok.get_vocab()
    dc = DataConfig(template="chatml", add_template_tokens=True)
    tc = TrainConfig(model=d, finetune="lora", lr=0.05, steps=3, eval_every=3, save_every=3, val_split=0.2,
                     batch_size=4, tensorboard=False, packing=True)
    r = train(data, dc, tc, tmp_path / "run", log=None, progress=False)
    assert r["trained_tokens"] > 0
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "model" / "adapter_model.safetensors"))
    assert any("trainable_tokens" in k for k in saved), sorted(saved)[:5]
    tok_saved = json.loads((tmp_path / "run" / "model" / "tokenizer.json").read_text())
    assert {"<|im_start|>", "<|im_end|>"} <= {t["content"] for t in tok_saved["added_tokens"]}
    # the run answers through chat (the base grown to the saved tokenizer before the adapters go on)
    assert cli.main(["chat", str(tmp_path / "run"), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0


def _tiny_gemma_dir(tmp_path) -> Path:
    """A random Gemma-architecture model with a local SentencePiece tokenizer in Gemma's layout, without
    ChatML tokens (as google/gemma-2b's)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from sp_tokenizers import hf_tokenizer

    tok = hf_tokenizer("gemma", layout="gemma")
    d = tmp_path / "tiny-gemma"
    tok.save_pretrained(d)
    torch.manual_seed(0)
    # every projection 64 wide: bitsandbytes' CPU kernels work in blocks of 64
    GemmaForCausalLM(GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(d)
    return d


def test_the_posts_config_trains_as_written_with_a_tiny_gemma(data, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    d = _tiny_gemma_dir(tmp_path)
    rc = cli.main(["train", data, "--config", str(POST), "--set", f"train.model={d}", "--out", str(tmp_path / "post"),
                   "--set", "train.epochs=null", "--steps", "2", "--set", "train.val_rows=4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    conf = json.loads((tmp_path / "post" / "config.json").read_text())
    tc = conf["train_config"]
    quantized = (tc["quantize"], tc["gradient_checkpointing"], tc["dtype"], tc["packing"])
    assert quantized == ("4bit", True, "bfloat16", True)
    assert conf["data_config"]["add_template_tokens"] and "embeddings grown" in captured.out
    result = json.loads((tmp_path / "post" / "result.json").read_text())
    assert result["steps"] == 2 and result["val_tokens"] > 0
