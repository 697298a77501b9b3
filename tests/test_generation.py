"""Generation stops where the answers were trained to stop: one-token stops as ids, longer ones as stop
strings; every saved model (full weights, LoRA adapters) carries its stops and its chat template, so that
plain transformers stops there too."""

import json

import pytest
import torch
from conftest import data_file, make_base_bpe_tokenizer, model_folder

from chatmask import templates
from chatmask.config import ChatConfig, DataConfig, TrainConfig
from chatmask.generation import answer_text, cut, generate_ids, renderer, stop_ids, stop_tokens_of, stopping

WORDS = ("alpha", "beta", "gamma", "delta")
ROWS = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in WORDS] * 4


def test_one_token_stops_are_ids_and_longer_ones_stop_strings(bpe_tok, base_tok):
    special = renderer(bpe_tok, "chatml")  # <|im_end|> is a token of this tokenizer
    assert stop_ids(bpe_tok, special) == [bpe_tok.convert_tokens_to_ids("<|im_end|>"), bpe_tok.eos_token_id]
    assert stopping(bpe_tok, special).strings == ()
    plain = renderer(base_tok, "chatml")  # ... and plain text of several tokens of this one
    st = stopping(base_tok, plain)
    assert stop_ids(base_tok, plain) == [base_tok.eos_token_id] and st.strings == ("<|im_end|>",)
    assert st.kwargs(base_tok) == {"eos_token_id": [base_tok.eos_token_id], "pad_token_id": base_tok.pad_token_id,
                                   "stop_strings": ["<|im_end|>"], "tokenizer": base_tok}
    assert stop_tokens_of("<|a|>,<|b|>") == ("<|a|>", "<|b|>") and stop_tokens_of(None) == ()


def test_an_answer_is_cut_after_its_first_stop(base_tok):
    st = stopping(base_tok, renderer(base_tok, "chatml"))
    enc = lambda t: base_tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, stopped = cut(base_tok, st, enc("Hello<|im_end|>\nmore text") + [base_tok.eos_token_id])
    assert base_tok.decode(ids) == "Hello<|im_end|>" and stopped  # the stop string before the eos wins
    assert answer_text(base_tok, st, ids) == "Hello"  # a plain-text stop is not part of the answer
    ids, stopped = cut(base_tok, st, enc("Hi") + [base_tok.eos_token_id, base_tok.pad_token_id])
    assert ids == enc("Hi") + [base_tok.eos_token_id] and stopped
    assert cut(base_tok, st, enc("no stop here")) == (enc("no stop here"), False)


class _ScriptLM(torch.nn.Module):
    """Writes `script` after every prompt, then padding; records what generate was given."""

    def __init__(self, script):
        super().__init__()
        self.w, self.script, self.calls = torch.nn.Parameter(torch.zeros(1)), script, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kw):
        self.calls.append(kw)
        row = (self.script + [pad_token_id] * max_new_tokens)[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([row] * len(input_ids))], 1)


def test_generate_ids_passes_stop_strings_and_cuts_each_row(base_tok):
    st = stopping(base_tok, renderer(base_tok, "chatml"))
    lm = _ScriptLM(base_tok("Hi<|im_end|>junk", add_special_tokens=False)["input_ids"])
    got = generate_ids(lm, base_tok, st, [[5, 6, 7], [5]], max_new_tokens=30, batch_size=2)
    assert [(base_tok.decode(ids), stopped) for ids, stopped in got] == [("Hi<|im_end|>", True)] * 2
    assert lm.calls[0]["stop_strings"] == ["<|im_end|>"] and lm.calls[0]["tokenizer"] is base_tok


def test_a_generation_config_transformers_would_refuse_to_save_keeps_its_valid_part(tmp_path, bpe_tok):
    from transformers import GenerationConfig

    from chatmask.generation import save_generation_config
    from conftest import tiny_llama

    model = tiny_llama(bpe_tok)
    model.generation_config = GenerationConfig(temperature=0.2, top_p=0.9, max_new_tokens=77)  # no do_sample
    got = save_generation_config(tmp_path, model, bpe_tok, renderer(bpe_tok))
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert got["dropped"] == ["temperature", "top_p"] and saved["max_new_tokens"] == 77 and "temperature" not in saved
    assert saved["eos_token_id"] == [bpe_tok.convert_tokens_to_ids("<|im_end|>"), bpe_tok.eos_token_id]
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.2)  # valid: kept whole
    assert save_generation_config(tmp_path, model, bpe_tok, renderer(bpe_tok))["dropped"] == []
    assert json.loads((tmp_path / "generation_config.json").read_text())["temperature"] == 0.2


def _train(tmp_path, monkeypatch, finetune, steps, **kw):
    """A tiny Llama trained with ChatML, its tokens added to a base tokenizer: (OUT, the tokenizer)."""
    from chatmask.train import train

    tok = make_base_bpe_tokenizer()
    data = data_file(tmp_path, monkeypatch, ROWS)
    base = model_folder(tmp_path / "base", tok)
    tc = TrainConfig(model=base, finetune=finetune, lr=1e-2, steps=steps, eval_every=steps, save_every=steps,
                     val_split=0.25, batch_size=4, warmup=0.0, lora_dropout=0.0, tensorboard=False, **kw)
    out = tmp_path / "run"
    res = train(data, DataConfig(template="chatml", add_template_tokens=True), tc, out, log=None, progress=False)
    return out, res


def test_a_saved_model_stops_where_it_was_trained_to_with_plain_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatmask.chat import load_chat, reply

    out, res = _train(tmp_path, monkeypatch, "full", 80)
    assert res["stop"]["stop_rate"] == 1.0  # the stop rate saw it too
    folder = out / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == templates.get("chatml").jinja  # the template it was trained with
    end = tok.convert_tokens_to_ids("<|im_end|>")
    gc = json.loads((folder / "generation_config.json").read_text())
    assert gc["eos_token_id"] == [end, tok.eos_token_id] and gc["pad_token_id"] == tok.pad_token_id
    msgs = [{"role": "user", "content": "Say gamma"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**enc, max_new_tokens=20)[0, enc["input_ids"].shape[1]:].tolist()  # no stop given
    assert new[-1] == end and len(new) < 20 and end not in new[:-1]
    assert tok.decode(new, skip_special_tokens=True) == "gamma gamma"
    chat = load_chat(str(out))
    assert reply(chat, msgs, ChatConfig(temperature=0, max_new_tokens=20)) == "gamma gamma"


def test_saved_lora_adapters_carry_their_stops_and_template(tmp_path, monkeypatch):
    out, res = _train(tmp_path, monkeypatch, "lora", 2)
    folder = out / "model"
    assert (folder / "adapter_config.json").exists() and not (folder / "config.json").exists()
    gc = json.loads((folder / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == templates.get("chatml").jinja  # and the template's tokens, added by the run:
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    assert gc["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    assert "stop" in res and res["stop"]["prompts"] == 4  # 4 validation rows


@pytest.mark.slow  # what plain transformers makes of an adapter folder on a local base: a finding, kept checked
def test_plain_transformers_on_an_adapter_folder_whose_run_grew_the_embeddings(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out, _ = _train(tmp_path, monkeypatch, "lora", 2)
    with pytest.raises(Exception):  # the base has fewer embedding rows than the tokenizer: chatmask chat grows them
        AutoModelForCausalLM.from_pretrained(out / "model")
