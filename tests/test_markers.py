"""End-of-turn markers found exactly: each trained answer ends with its own turn's terminator and never
takes text the template writes for the next message, whether the marker is a special token or plain text
(a base model's tokenizer given a chat template), and whatever the template writes after the last answer."""

import copy
import warnings

import pytest

import chatmask
from chatmask import TemplateError
from conftest import make_bpe_tokenizer
from conftest import trained_runs as runs

CONV = [
    {"role": "user", "content": "How can I restore my Unity?"},
    {"role": "assistant", "content": "I've read this text."},
    {"role": "user", "content": "What describes software in the text?"},
    {"role": "assistant", "content": '["Unity"]'},
]

# gpt-oss's shape: answers end with <|end|>, the last one with <|return|>; the model writes its channel
GPT_OSS = (
    "{% for m in messages %}<|start|>{{ m.role }}{% if m.role == 'assistant' %}<|channel|>final{% endif %}"
    "<|message|>{{ m.content }}{% if m.role == 'assistant' and loop.last %}<|return|>{% else %}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
GPT_OSS_STRICT = (  # the same, refusing two answers in a row (so no rendering shows the assistant header twice)
    "{% for m in messages %}{% if loop.index0 % 2 == 0 and m.role != 'user' %}{{ raise_exception('alternate') }}"
    "{% endif %}{% endfor %}" + GPT_OSS
)
# OLMo-3's shape: <|im_end|> after earlier answers, eos after the last
OLMO = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'assistant' and loop.last %}{{ eos_token }}{% else %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PHI3 = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
PHI3_STRICT = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('alternate') }}"
    "{% endif %}{% endfor %}" + PHI3
)
CODELLAMA70B = (  # CodeLlama-70B-Instruct's shape: ' <step> ' between turns, its header text after it
    "{{ bos_token }}{% for m in messages %}{{ 'Source: ' + m.role + '\n\n ' + m.content | trim + ' <step> ' }}"
    "{% endfor %}{{ 'Source: assistant\nDestination: user\n\n ' }}"
)
CHATML_EOS = ("{{ bos_token }}" + chatmask.templates.get("chatml").jinja
              + "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}")




def trained_texts(tok, ex):
    return [tok.decode(r) for r in runs(ex)]  # byte-level BPE: decoding is exact


def with_tokens(*tokens):
    tok = make_bpe_tokenizer(None)
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tok


def test_gpt_oss_last_answer_ends_with_return():
    tok = with_tokens("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>")
    r = chatmask.labels.renderer(tok, GPT_OSS)
    assert r.markers["user"] == "<|end|>" and r.markers["last"] == "<|return|>"
    ex = chatmask.encode(CONV, tok, template=GPT_OSS)
    assert trained_texts(tok, ex) == ["<|channel|>final<|message|>I've read this text.<|end|>",
                                      '<|channel|>final<|message|>["Unity"]<|return|>']
    assert ex.respelt == 0 and ex.input_ids == tok(r.render(CONV), add_special_tokens=False)["input_ids"]


def test_olmo_last_answer_ends_with_eos(bpe_tok):
    ex = chatmask.encode(CONV, bpe_tok, template=OLMO)
    assert trained_texts(bpe_tok, ex) == ["I've read this text.<|im_end|>", '["Unity"]</s>']


@pytest.mark.parametrize("template", [PHI3, PHI3_STRICT])
def test_plain_text_marker_stops_before_next_header(base_tok, template):
    """Phi-3's template on a tokenizer without its tokens: `<|end|>` is plain text, and so is the `<|` of
    the next `<|user|>`; the trained run must stop at `<|end|>` (found from the generation prompt, or where
    the template refuses two answers in a row, from the header in front of the first message)."""
    r = chatmask.labels.renderer(base_tok, template)
    assert set(r.markers.values()) == {"<|end|>"}
    with pytest.warns(UserWarning, match="add_template_tokens"):
        chatmask.labels.renderer(base_tok, template).warned = False
        ex = chatmask.encode(CONV, base_tok, template=template)
    texts = ["".join(base_tok.decode([t]) for t in run) for run in runs(ex)]
    # a token may straddle the marker's end (">" + "\n" merged): re-spelt, and counted
    assert texts == ["I've read this text.<|end|>", '["Unity"]<|end|>']
    rendered = r.render(CONV)
    if ex.respelt == 0:
        assert ex.input_ids == base_tok(rendered, add_special_tokens=False)["input_ids"]
    assert base_tok.decode(ex.input_ids) == rendered


def test_codellama70b_step_marker(base_tok):
    r = chatmask.labels.renderer(base_tok, CODELLAMA70B)
    assert r.markers["user"] == " <step>" and r.markers["last"] == " <step>"
    ex = chatmask.encode(CONV, base_tok, template=CODELLAMA70B)
    assert ["".join(base_tok.decode([t]) for t in run) for run in runs(ex)] == \
        ["I've read this text. <step>", '["Unity"] <step>']  # the header's ' ' before the content is not trained


def test_post_chatml_on_a_base_tokenizer_does_not_train_the_final_eos(base_tok):
    """The post's setup before the ChatML tokens are added: <|im_end|> is plain text; the eos the template
    writes after the last turn is not part of the answer."""
    ex = chatmask.encode(CONV, base_tok, template=CHATML_EOS)
    assert ["".join(base_tok.decode([t]) for t in run) for run in runs(ex)] == \
        ["I've read this text.<|im_end|>", '["Unity"]<|im_end|>']


def test_gpt_oss_as_plain_text_reads_the_user_header_from_the_first_message(base_tok):
    """gpt-oss's shape as plain text, with a template that allows no answer after an answer: the header
    `<|start|>user<|message|>` in front of the first message tells where `<|end|><|start|>user<|message|>`
    splits into the end of the turn and the next header."""
    r = chatmask.labels.renderer(base_tok, GPT_OSS_STRICT)
    assert r.markers["user"] == "<|end|>" and r.markers["last"] == "<|return|>"
    assert r.headers["user"] == "<|start|>user<|message|>"
    ex = chatmask.encode(CONV, base_tok, template=GPT_OSS_STRICT)
    texts = ["".join(base_tok.decode([t]) for t in run) for run in runs(ex)]
    assert texts[0].endswith("I've read this text.<|end|>") and texts[1].endswith('["Unity"]<|return|>')


# no header in front of the first message, no special token, no stop, and only user messages follow an
# answer: nothing tells where the turn ends
HEADLESS = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('alternate') }}{% endif %}"
            "{% if loop.first %}{{ m.content }}{% else %}{{ ' || ' + m.role + ': ' + m.content }}{% endif %}"
            "{% endfor %}")


def test_ambiguous_marker_is_an_error_naming_the_fix(base_tok):
    with pytest.raises(TemplateError, match="ambiguous") as e:
        chatmask.encode(CONV, base_tok, template=HEADLESS)
    assert "add_template_tokens" in str(e.value) and "--end-of-turn" in str(e.value)
    ex = chatmask.encode(CONV, base_tok, template=HEADLESS, end_of_turn=" ||")
    texts = ["".join(base_tok.decode([t]) for t in run) for run in runs(ex)]
    assert texts == ["I've read this text. ||", '["Unity"] ||']  # the last one's stop is appended
    assert ex.stop_appended and ex.unstopped == 0


def test_end_of_turn_that_does_not_follow_answers_is_an_error(bpe_tok):
    with pytest.raises(TemplateError, match="does not follow"):
        chatmask.encode(CONV, bpe_tok, template="chatml", end_of_turn="<|eot_id|>")


def test_special_marker_needs_no_warning(bpe_tok):
    chatmask.labels.renderer(bpe_tok, "chatml").warned = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chatmask.encode(copy.deepcopy(CONV), bpe_tok, template="chatml")


# Command-R7B's shape: the template always ends with the chatbot header (add_generation_prompt or not), the
# model writes <|START_RESPONSE|> ... <|END_RESPONSE|> and then the eos <|END_OF_TURN_TOKEN|>
COMMAND_R = (
    "{{ bos_token }}{% for m in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if m.role == 'user' %}<|USER_TOKEN|>{{ m.content }}<|END_OF_TURN_TOKEN|>"
    "{% else %}<|CHATBOT_TOKEN|><|START_RESPONSE|>{{ m.content }}<|END_RESPONSE|><|END_OF_TURN_TOKEN|>{% endif %}"
    "{% endfor %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
)


def test_command_r_trains_what_follows_its_always_rendered_header_and_its_eos():
    tok = with_tokens("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                      "<|START_RESPONSE|>", "<|END_RESPONSE|>")
    tok.add_special_tokens({"eos_token": "<|END_OF_TURN_TOKEN|>"})
    ex = chatmask.encode(CONV, tok, template=COMMAND_R)
    assert trained_texts(tok, ex) == [
        "<|START_RESPONSE|>I've read this text.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
        '<|START_RESPONSE|>["Unity"]<|END_RESPONSE|><|END_OF_TURN_TOKEN|>']
    assert any("always ends with the assistant header" in n for n in chatmask.check_template(tok, COMMAND_R))
