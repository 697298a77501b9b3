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

    def on_end(model, split):
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
