"""Talk to a trained model with the chat template it was trained with: `chatmask chat RUN_OR_MODEL`.

`load_chat(name)` takes a folder `train` wrote (OUT/model: LoRA adapters on the base model, or full weights;
the run's --template and --end-of-turn), one arm's run of a `compare` folder, or any model. `reply(chat,
messages)` streams one answer to a callback and stops where the run was trained to stop; `session(chat)` is
the interactive prompt around it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .config import ChatConfig
from .errors import ConfigError
from .generation import answer_text, cut, inference, prompt_ids, renderer, stopping


@dataclass
class Chat:
    model: object
    tokenizer: object
    template: str | None
    end_of_turn: str | None
    what: str
    """what was loaded, for the user: 'run out/ (LoRA adapters on smollm2)'"""
    stop_tokens: tuple = ()
    """the model's own stop list the run was trained with (--stop-tokens), if any"""
    control_tokens: str = "text"
    """how the run encoded a control token written inside content (--control-tokens; runs older than the
    option were labelled as `parse`)"""


def find_run(path: str, arm: str | None = None, seed: int = 0) -> Path | None:
    """The run folder to load from `path`: itself when `train` wrote it, one arm's run when `compare`
    wrote it (--arm, default masked; --seed), None when `path` is no run folder (a model name or folder)."""
    p = Path(path)
    runs = p / "runs"
    if runs.is_dir() and not (p / "model").is_dir():
        name = f"{arm or 'masked'}-seed{seed}"
        have = sorted(d.name for d in runs.iterdir() if (d / "config.json").exists())
        if name not in have:
            raise ConfigError(f"{path} is a compare folder without a run {name}; it has: {', '.join(have) or 'none'}"
                              " (choose with --arm and --seed)")
        return runs / name
    if arm is not None:
        raise ConfigError(f"--arm picks a run of a folder `chatmask compare` wrote; {path} is not one")
    if (p / "config.json").exists() and "train_config" in _json(p / "config.json"):
        return p
    return None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_chat(name: str, *, arm: str | None = None, seed: int = 0, dtype=None) -> Chat:
    """The model, tokenizer and template to talk to `name` (see the module's docstring)."""
    from types import SimpleNamespace

    from .hub import load_tokenizer, stop_tokens
    from .models import grow_embeddings, load_model

    run = find_run(name, arm, seed)
    if run is None:
        return Chat(load_model(name, dtype=dtype), load_tokenizer(name), None, None, f"model {name}")
    conf = _json(run / "config.json")
    tc, dc = conf.get("train_config", {}), conf.get("data_config", {})
    folder = run / "model"
    if not (folder / "tokenizer_config.json").exists():
        raise ConfigError(f"{run} has no finished model yet ({folder} is missing): finish the run with "
                          f"`chatmask train ... --out {run} --resume`")
    tok = load_tokenizer(str(folder))
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base = load_model(tc.get("model", "smollm2"), dtype=dtype)
        grow_embeddings(base, tok)  # the run added template tokens
        model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
        what = f"run {run} (LoRA adapters on {tc.get('model')}, merged)"
    else:
        model = load_model(str(folder), dtype=dtype)
        what = f"run {run} ({'full fine-tuning' if tc.get('finetune') == 'full' else 'merged adapters'})"
    # the stop list the rows were labelled with: --stop-tokens, else the model's (OUT/model's generation_config)
    stops = stop_tokens(SimpleNamespace(stop_tokens=dc.get("stop_tokens")), tok)
    return Chat(model, tok, dc.get("template"), dc.get("end_of_turn"), what, stops, dc.get("control_tokens", "parse"))


class _Stream:
    """A transformers streamer: decoded text handed to `on_text` as words complete, and kept; a stop
    written as plain text (several tokens here) is not shown."""

    def __init__(self, tokenizer, on_text, strings=()):
        from transformers import TextStreamer

        outer = self

        class S(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                if stream_end:  # the streamer holds back the last word, so a trailing stop arrives here
                    text = next((text.rstrip()[: -len(s)] for s in strings if text.rstrip().endswith(s)), text)
                outer.text += text
                if on_text is not None:
                    on_text(text)

        self.text = ""
        self.streamer = S(tokenizer, skip_prompt=True, skip_special_tokens=True)


def reply(chat: Chat, messages: list[dict], cfg: ChatConfig = ChatConfig(), on_text=None) -> str:
    """One answer to `messages` (ending with a user turn), rendered as in training with the generation
    prompt; sampled unless cfg.temperature is 0; stops where the run was trained to stop (or eos)."""
    import torch

    tok, model = chat.tokenizer, chat.model
    r = renderer(tok, chat.template, chat.end_of_turn, chat.stop_tokens)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tok, r, messages, chat.control_tokens)], device=device)  # (1, T)
    st = stopping(tok, r)
    stream = _Stream(tok, on_text, st.strings)
    sample = cfg.temperature > 0
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    with inference(model):
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if sample else {}
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                             do_sample=sample, num_beams=1, use_cache=True, streamer=stream.streamer,
                             **st.kwargs(tok), **sampling)
    return answer_text(tok, st, cut(tok, st, gen[0, ids.shape[1]:].tolist())[0]).strip()


HELLO = "an empty line does nothing, /reset starts over, Ctrl-D or /exit ends"


def session(chat: Chat, cfg: ChatConfig = ChatConfig(), *, prompt: str | None = None, read=input,
            write=partial(print, end="", flush=True)) -> None:
    """Talk to `chat`: one answer to `prompt`, or without it a conversation read line by line from `read`
    (called with the prompt text; EOFError ends it). Answers stream to `write` as they are generated."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if prompt is not None:
        reply(chat, system + [{"role": "user", "content": prompt}], cfg, on_text=write)
        write("\n")
        return
    write(f"chatting with {chat.what}; {HELLO}\n")
    history = list(system)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = list(system)
            write("(conversation cleared)\n")
        elif line.strip():
            history.append({"role": "user", "content": line})
            write("assistant> ")
            answer = reply(chat, history, cfg, on_text=write)
            write("\n")
            history.append({"role": "assistant", "content": answer})
