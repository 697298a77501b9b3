"""The examples in chatmask's docstrings run as written (doctest), on the tests' tokenizers and tiny model."""

import doctest

import pytest
from conftest import make_base_bpe_tokenizer, make_bpe_tokenizer, tiny_llama, write_jsonl

from chatmask import conversations, labels, metrics, templates


@pytest.mark.parametrize("module", [conversations, labels, metrics, templates], ids=lambda m: m.__name__)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    write_jsonl(tmp_path / "data.jsonl", rows)
    monkeypatch.chdir(tmp_path)  # the examples name "data.jsonl"
    base = make_base_bpe_tokenizer()  # templates.add_template_tokens: a base model's tokenizer
    tok = base if module is templates else make_bpe_tokenizer()
    result = doctest.testmod(module, extraglobs={"tok": tok, "model": tiny_llama(base)},
                             optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
