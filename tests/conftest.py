"""Offline fixtures: tokenizers built in-process in milliseconds, tiny random models, and the helpers every
test file shares: data files (`write_jsonl`, `data_file`), a saved tokenizer folder (`tok_dir`), the CLI run
in-process (`cli_main`) or as a user's shell runs it (`run_cli`)."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from chatmask import templates  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
UNINER = SHARED / "data" / "uniner"

CORPUS = [
    "Text: Q:\n\nHow can I restore my Unity? I've read this text.",
    "What describes software in the text? [\"Unity\"] The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you. Ünïcödé ☃ 日本語 🙂 tabs\tand\nnewlines.",
    "def f(x):\n    return x + 1  # code, JSON {\"a\": [1, 2]} and <html> tags",
]

ALL_SPECIALS = sorted({s for t in templates.BUILTIN.values() for s in t.special_tokens}
                      | {"<s>", "</s>", "<unk>", "<pad>"})


def make_bpe_tokenizer(chat_template="chatml"):
    """A byte-level BPE (any text encodes) trained on a few sentences, with every built-in template's
    special tokens, bos `<s>`, eos `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=ALL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[s for s in ALL_SPECIALS if s not in ("<s>", "</s>", "<unk>", "<pad>")],
    )
    fast.chat_template = templates.get(chat_template).jinja if chat_template else None
    return fast


# The post's table (Gemma ids): a word-level tokenizer with exactly those tokens, hand-checkable.
POST_VOCAB = {
    "<eos>": 1, "<bos>": 2, "<|im_start|>": 256000, "<|im_end|>": 256001, "user": 1645, "assistant": 105776,
    "\n": 108, "\n\n": 109, "Text": 1637, ":": 235292, " Q": 1274, "How": 2299, " can": 798, " I": 590,
    " restore": 9825, " my": 970, " Unity": 11823, "?": 235336, "I": 235285, "'": 235303, "ve": 524,
    " read": 1682, " this": 736, " text": 2793, ".": 235265, "What": 1841, " describes": 19306,
    " software": 6815, " in": 575, " the": 573, '["': 3681, "Unity": 45737, '"]': 4437, "<unk>": 3,
}


def make_post_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=POST_VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[^\sA-Za-z]+|\s+"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    # ChatML with the <bos>/<eos> that the post's Gemma tokenizer added around the rendered text
    fast.chat_template = ("{{ bos_token }}" + templates.get("chatml").jinja
                          + "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}")
    return fast


@pytest.fixture(scope="session")
def bpe_tok():
    return make_bpe_tokenizer()


@pytest.fixture(scope="session")
def post_tok():
    return make_post_tokenizer()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, bpe_tok) -> str:
    """`bpe_tok` saved in a folder, as `--tokenizer` takes it (shared by the session: copy it to change it)."""
    d = tmp_path_factory.mktemp("tok")
    bpe_tok.save_pretrained(d)
    return str(d)


def make_base_bpe_tokenizer():
    """A byte-level BPE with only <s>, </s>, <unk>, <pad>: a base model's tokenizer before a chat
    template's tokens are added (the post's situation), so template markers are plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def base_tok():
    return make_base_bpe_tokenizer()


def tiny_llama(tok, seed: int = 0, layers: int = 2, hidden: int = 32, **config):
    """The one tiny model of the tests: a random 2-layer Llama (hidden 32) sized to `tok`'s vocabulary;
    `config` overrides LlamaConfig fields (e.g. initializer_range, pad_token_id)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **config}))


def write_jsonl(path, rows, extra_lines=()) -> str:
    """`rows` one JSON object a line in `path` (a str row is written as it is: a line that is not JSON on
    purpose), then `extra_lines` as they are; returns the path as a str."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows] + list(extra_lines)
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def data_file(tmp_path, monkeypatch, rows) -> str:
    """`rows` as tmp_path/d.jsonl, with chatmask's cache in tmp_path too (nothing shared between tests)."""
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    return write_jsonl(tmp_path / "d.jsonl", rows)


def cli_main(capsys, *argv) -> tuple[int, str, str]:
    """`chatmask ARGV` in this process (no interpreter to start): (exit code, stdout, stderr)."""
    from chatmask import cli

    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_cli(*argv, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`chatmask ARGV` in a fresh interpreter, as a user's shell runs it (what needs its own process: an
    environment read at import, a kill, the imports a command makes). `env` is laid over this process's
    environment; a value None removes that variable. The result has returncode, stdout, stderr as text."""
    e = {**os.environ, **(env or {})}
    e = {k: v for k, v in e.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "chatmask", *map(str, argv)], capture_output=True, text=True,
                          env=e, timeout=timeout)


def model_folder(folder, tok, **kw) -> str:
    """`tiny_llama(tok, **kw)` and `tok` saved in `folder`: a model a run or the CLI can load by path. Its
    config names the tokenizer's bos and eos, as a real model's does (its generation_config.json is the
    model's stop list that labelling reads)."""
    kw = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, **kw}
    tiny_llama(tok, **kw).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def trained_runs(ex) -> list[list[int]]:
    """The trained runs of an example (maximal stretches of labels that are not -100), as id lists."""
    out, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])
