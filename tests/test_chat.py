"""`chatmask chat`: the trained model answers from its run folder (LoRA adapters applied, or full weights),
with the training template; one --prompt, or an interactive session; a compare folder's arms."""

import io

import pytest

from chatmask import cli
from chatmask.config import DataConfig, TrainConfig
from chatmask.generation import generate_answers
from chatmask.train import train
from conftest import data_file, model_folder

ROWS = [{"messages": [{"role": "user", "content": f"Say {w} please"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")]
PROMPT = [{"role": "user", "content": "Say beta please"}]


@pytest.fixture
def data(tmp_path, monkeypatch):
    return data_file(tmp_path, monkeypatch, ROWS)


@pytest.fixture
def base_dir(tmp_path, bpe_tok):
    return model_folder(tmp_path / "base", bpe_tok)


def _train(data, base_dir, out, finetune, bpe_tok):
    """Train a few steps; the greedy answer of the trained model in memory, as the run ends."""
    seen = {}

    def on_end(model, holdout):
        seen["answer"] = generate_answers(model, bpe_tok, [PROMPT], max_new_tokens=8)[0]
        return {}

    tc = TrainConfig(model=base_dir, finetune=finetune, lr=0.02, steps=3, eval_every=3, save_every=3,
                     val_split=0.25, batch_size=2, tensorboard=False, lora_dropout=0.0)
    train(data, DataConfig(), tc, out, log=None, progress=False, on_end=on_end)
    return seen["answer"]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_chat_answers_like_the_trained_model(finetune, data, base_dir, tmp_path, bpe_tok, capsys):
    out = tmp_path / "run"
    want = _train(data, base_dir, out, finetune, bpe_tok)
    capsys.readouterr()
    assert cli.main(["chat", str(out), "--prompt", "Say beta please", "--temperature", "0",
                     "--max-new-tokens", "8"]) == 0
    got = capsys.readouterr().out.strip()
    assert got == want.strip()
    # the untrained base answers otherwise: the adapters / weights were applied, not the base alone
    assert cli.main(["chat", base_dir, "--prompt", "Say beta please", "--temperature", "0",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() != got


def test_interactive_session_keeps_history_and_resets(data, base_dir, tmp_path, bpe_tok, capsys, monkeypatch):
    out = tmp_path / "run"
    _train(data, base_dir, out, "lora", bpe_tok)
    seen = []
    import chatmask.chat as chat_mod

    real = chat_mod.reply

    def spy(chat, messages, cfg, on_text=None):
        seen.append([m["role"] for m in messages])
        return real(chat, messages, cfg, on_text)

    monkeypatch.setattr(chat_mod, "reply", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n\nSay beta please\n/reset\nHello\n"))
    assert cli.main(["chat", str(out), "--max-new-tokens", "4", "--seed", "1", "--system", "Be brief."]) == 0
    text = capsys.readouterr().out
    assert text.count("assistant> ") == 3 and "(conversation cleared)" in text
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]


def test_compare_folder_arms_and_mistakes(data, base_dir, tmp_path, bpe_tok, capsys):
    from chatmask.compare import compare
    from chatmask.config import CompareConfig

    tc = TrainConfig(model=base_dir, finetune="lora", lr=0.02, steps=2, eval_every=2, save_every=2, val_split=0.25,
                     batch_size=2, tensorboard=False)
    compare(data, DataConfig(), tc, CompareConfig(), tmp_path / "cmp", tokenizer=bpe_tok, log=None)
    for arm in ("masked", "unmasked"):
        assert cli.main(["chat", str(tmp_path / "cmp"), "--arm", arm, "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert cli.main(["chat", str(tmp_path / "cmp"), "--arm", "nope", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "masked-seed0" in err and "unmasked-seed0" in err and "--arm" in err
    assert cli.main(["chat", str(tmp_path / "cmp" / "runs" / "masked-seed0"), "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert cli.main(["chat", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_chat_renders_with_the_template_the_run_trained_with(data, tmp_path, capsys, monkeypatch):
    """A run trained with a built-in --template (chatml) that is not its tokenizer's own (zephyr): chat's prompt
    is rendered with the trained template, also where the run's saved tokenizer carries its own template."""
    from transformers import LlamaForCausalLM

    from chatmask import templates
    from chatmask.hub import load_tokenizer
    from conftest import make_bpe_tokenizer

    own = make_bpe_tokenizer("zephyr")
    tc = TrainConfig(model=model_folder(tmp_path / "base", own), finetune="full", lr=0.02, steps=1, eval_every=1,
                     save_every=1, val_split=0.25, batch_size=2, tensorboard=False, stop_prompts=0)
    train(data, DataConfig(template="chatml"), tc, tmp_path / "run", log=None, progress=False)
    saved = tmp_path / "run" / "model"
    assert load_tokenizer(str(saved)).chat_template == templates.get("chatml").jinja  # what other tools render
    # the tokenizer in the run folder with its own template again (as in a run saved before the template was)
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        (saved / name).unlink(missing_ok=True)
    own.save_pretrained(saved)
    assert load_tokenizer(str(saved)).chat_template == own.chat_template
    prompts = []
    real = LlamaForCausalLM.generate

    def spy(self, *args, **kw):
        prompts.append(own.decode(kw["input_ids"][0]))
        return real(self, *args, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy)
    assert cli.main(["chat", str(tmp_path / "run"), "--prompt", "Say beta please", "--max-new-tokens", "2"]) == 0
    assert len(prompts) == 1 and "<|user|>" not in prompts[0], prompts  # not zephyr's
    assert prompts[0].endswith("<|im_start|>user\nSay beta please<|im_end|>\n<|im_start|>assistant\n"), prompts


def test_session_reads_and_writes_through_the_callables_it_is_given(monkeypatch):
    """The prompt loop needs no terminal: lines come from `read`, everything said goes to `write`."""
    import chatmask.chat as chat_mod
    from chatmask.config import ChatConfig

    seen = []

    def fake_reply(chat, messages, cfg, on_text=None):
        seen.append([m["content"] for m in messages])
        on_text("ok")
        return "ok"

    monkeypatch.setattr(chat_mod, "reply", fake_reply)
    lines = iter(["Hi", "  ", "Again", "/reset", "New", "/exit", "never read"])
    written = []
    chat = chat_mod.Chat(None, None, None, None, "a fake")
    chat_mod.session(chat, ChatConfig(system="S"), read=lambda prompt: next(lines), write=written.append)
    assert seen == [["S", "Hi"], ["S", "Hi", "ok", "Again"], ["S", "New"]]
    text = "".join(written)
    assert text.startswith("chatting with a fake") and text.count("assistant> ok\n") == 3
    assert "(conversation cleared)" in text and next(lines) == "never read"
    written.clear()
    chat_mod.session(chat, ChatConfig(), prompt="One", read=None, write=written.append)
    assert seen[-1] == ["One"] and "".join(written) == "ok\n"
