"""The stop rate: a fixed sample of validation prompts, greedy answers, each one stopped, run into the next
message's header, or run on; its counts add up, its prompts are the same for every model."""

import datasets
import pytest
import torch
from conftest import tiny_llama

import chatmask
from chatmask import evaluation
from chatmask.generation import renderer

ROWS = [[{"role": "user", "content": f"What is {k} plus {k}?"}, {"role": "assistant", "content": f"It is {2 * k}."},
         {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}] for k in range(6)]


@pytest.fixture(scope="module")
def val(bpe_tok):
    rows = [chatmask.encode(m, bpe_tok) for m in ROWS]
    return datasets.Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in rows])


def test_first_answer_is_the_prompt_and_the_first_trained_run(bpe_tok, val):
    prompt, ref = evaluation.first_answer(val[0]["input_ids"], val[0]["labels"])
    assert bpe_tok.decode(prompt).endswith("<|im_start|>assistant\n") and bpe_tok.decode(ref) == "It is 0.<|im_end|>"
    assert evaluation.first_answer([1, 2], [-100, -100]) is None


@pytest.mark.parametrize("text, stopped, want", [
    ("It is 2.<|im_end|>", True, ("stopped", None)),
    # a stop after the header: still a run into it
    ("It is 2.<|im_start|>user\nmore<|im_end|>", True, ("header", "<|im_start|>user")),
    ("It is 2. It is 2. It is", False, ("ran on", None)),
])
def test_each_answer_has_one_outcome(text, stopped, want):
    stops, headers = ("<|im_end|>", "</s>"), ("<|im_start|>user", "<|im_start|>assistant")
    assert evaluation.outcome(text, stopped, stops, headers) == want


def test_stop_rate_on_a_tiny_random_model(bpe_tok, val):
    r = renderer(bpe_tok)
    a = evaluation.stop_rate(tiny_llama(bpe_tok, seed=0), bpe_tok, val, r, prompts=4, max_new_tokens=12, batch_size=3)
    b = evaluation.stop_rate(tiny_llama(bpe_tok, seed=1), bpe_tok, val, r, prompts=4, max_new_tokens=12)
    refs = [len(evaluation.first_answer(val[k]["input_ids"], val[k]["labels"])[1]) for k in range(4)]
    for res in (a, b):
        assert res["prompts"] == 4 and res["stopped"] + res["header"] + res["ran_on"] == 4
        assert res["stop_rate"] + res["header_rate"] + res["ran_on_rate"] == pytest.approx(1.0)
        assert 0 < res["mean_new_tokens"] <= 12 and res["mean_reference_tokens"] == pytest.approx(sum(refs) / 4)
        assert len(res["examples"]) == 3 and res["examples"][0]["reference"] == "It is 0.<|im_end|>"
        assert {e["outcome"] for e in res["examples"]} <= {"stopped", "header", "ran on"}
    assert a["prompts_sha256"] == b["prompts_sha256"]  # the same prompts for every model
    assert evaluation.stop_rate(tiny_llama(bpe_tok), bpe_tok, val, r, prompts=2)["prompts"] == 2
    line = evaluation.describe(a)
    assert line.startswith(f"stop rate: {a['stopped']}/4 answers ended with ") and "within 12 tokens" in line


def test_no_short_enough_answer_is_a_reason_not_an_exception(bpe_tok, val):
    res = evaluation.stop_rate(tiny_llama(bpe_tok), bpe_tok, val, renderer(bpe_tok), prompts=4, max_new_tokens=3)
    assert res["prompts"] == 0 and "--stop-max-new-tokens" in res["error"] and "shortest 7 tokens" in res["error"]
    assert evaluation.describe(res).startswith("stop rate: not measured: none of the 6 validation rows")


class _HeaderLM(torch.nn.Module):
    """Answers, then writes the next user header and more, never the stop: a model that was not taught it."""

    def __init__(self, tok):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids = tok("It is 2.<|im_start|>user\nAnd", add_special_tokens=False)["input_ids"]

    def generate(self, input_ids, max_new_tokens, **kw):
        row = (self.ids * max_new_tokens)[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([row] * len(input_ids))], 1)


def test_a_model_that_writes_the_next_header_is_counted_so(bpe_tok, val):
    res = evaluation.stop_rate(_HeaderLM(bpe_tok), bpe_tok, val, renderer(bpe_tok), prompts=3, max_new_tokens=20)
    assert (res["stopped"], res["header"], res["ran_on"]) == (0, 3, 0) and res["headers_hit"] == {"<|im_start|>user": 3}
    assert "3 ran into '<|im_start|>user'" in evaluation.describe(res)
