"""Built-in chat templates for tokenizers that ship none (base models).

A template is data: its Jinja text plus the special tokens it writes. `get(name)` returns one;
`add_template_tokens` adds a template's tokens to a tokenizer (and resizes a model's embeddings), as
the post's experiment does when it puts ChatML on Gemma. The Jinja texts are written for chatmask in
the published formats; each renders messages exactly as the model family expects at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TemplateError


@dataclass(frozen=True)
class Template:
    name: str
    jinja: str
    """The Jinja text, rendered like transformers' apply_chat_template renders tokenizer templates."""
    special_tokens: tuple[str, ...]
    """Tokens the template writes that must be single (special) tokens in the tokenizer."""
    stop: str
    """The end-of-turn marker the model must learn to emit (generation stops on it)."""


_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_QWEN = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + _CHATML
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 2 / Mistral style: a system prompt is folded into the first user turn.
_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

_MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

_GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# DeepSeek-V3 / R1 style; like R1 it keeps only the answer after a `</think>` in earlier assistant turns.
_DEEPSEEK = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] == 'tool' %}{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

BUILTIN: dict[str, Template] = {
    t.name: t
    for t in (
        Template("chatml", _CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
        Template("qwen", _QWEN, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
        Template(
            "llama3",
            _LLAMA3,
            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "<|eot_id|>",
        ),
        Template("llama2", _LLAMA2, ("<s>", "</s>"), "</s>"),
        Template("mistral", _MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"), "</s>"),
        Template("gemma", _GEMMA, ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
        Template("phi3", _PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
        Template("zephyr", _ZEPHYR, ("<|system|>", "<|user|>", "<|assistant|>", "</s>"), "</s>"),
        Template(
            "deepseek",
            _DEEPSEEK,
            ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>",
             "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"),
            "<｜end▁of▁sentence｜>",
        ),
    )
}


def get(name: str) -> Template:
    """The built-in template called `name` (see `BUILTIN`)."""
    try:
        return BUILTIN[name]
    except KeyError:
        raise TemplateError(
            f"unknown template {name!r}; built-in templates are {', '.join(sorted(BUILTIN))}, "
            "or pass the Jinja text itself"
        ) from None


def is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def add_template_tokens(tokenizer, template: str, model=None) -> int:
    """Add the built-in `template`'s special tokens to `tokenizer`, set it as the tokenizer's chat template
    and, if `model` is given, resize its embeddings. Returns how many tokens were new.

    >>> add_template_tokens(tok, "chatml", model)   # a base model + ChatML, as the post does for Gemma
    2
    """
    t = get(template)
    new = [s for s in t.special_tokens if s not in tokenizer.get_vocab()]
    added = tokenizer.add_special_tokens({"additional_special_tokens": new}) if new else 0
    tokenizer.chat_template = t.jinja
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return added
