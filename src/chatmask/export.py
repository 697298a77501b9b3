"""Ship a trained model where it is served: `chatmask export RUN_OR_MODEL --out DIR [--gguf FILE] [--ollama DIR]`.

`export(name, out)` loads what `chatmask chat` loads (a `train` folder, one arm's run of a `compare` folder, or
any model; LoRA adapters merged onto the unquantized base, grown embeddings kept) and writes a Hugging Face
folder plain transformers loads: the weights (`dtype`), the tokenizer with the chat template the run was
trained with, and a generation config that stops at the trained end of turn and eos. `gguf=` writes the same
weights as one GGUF file (`gguf_file`), checked by reading it back; `ollama=` a folder with that file and a
Modelfile: FROM, a TEMPLATE equal to the trained template where Ollama's templates can say it (`go_template`),
and a `PARAMETER stop` for each trained stop.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ChatmaskError, ConfigError


@dataclass
class Exported:
    """What `export` wrote."""

    folder: Path
    """the Hugging Face folder"""
    gguf: Path | None = None
    modelfile: Path | None = None
    stops: tuple[str, ...] = ()
    """the trained stops (ends of turn, then eos) the outputs stop at"""
    notes: list[str] = field(default_factory=list)
    """what a user should know (a template Ollama cannot say, stops too long for one token)"""


def _refuse_existing(*paths) -> None:
    for p in paths:
        if p is not None and Path(p).exists() and (Path(p).is_file() or any(Path(p).iterdir())):
            raise ConfigError(f"{p} exists; export never writes over a file or folder: choose another path or "
                              "remove it first")


def _refuse_quantized(model, name: str) -> None:
    q = getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None)
    if q:
        raise ConfigError(f"{name} is a quantized model: export needs full-precision weights. Export the training "
                          "run (its adapters are merged onto the unquantized base, as `chatmask chat` does) or the "
                          "unquantized model")


def export(name: str, out, *, arm: str | None = None, seed: int = 0, dtype: str | None = None, gguf=None,
           gguf_type: str = "f16", ollama=None, template: str | None = None, say=print) -> Exported:
    """Write `name` as a merged Hugging Face folder `out`, and as GGUF / an Ollama folder when asked (see the
    module's docstring). `template`: for a model that is no run (a run ships the template it trained with).
    Nothing existing is written over; each output is written beside and renamed in."""
    import torch

    from .chat import find_run, load_chat
    from .generation import renderer, save_chat_template, save_generation_config, stopping
    from .gguf_file import QTYPES, architecture, read_gguf, write_gguf
    from .models import torch_dtype
    from .paths import atomic_dir

    if gguf_type not in QTYPES:
        raise ConfigError(f"--gguf-type must be one of {', '.join(QTYPES)}, not {gguf_type!r}")
    out = Path(out)
    gguf = Path(gguf) if gguf else (Path(ollama) / "model.gguf" if ollama else None)
    _refuse_existing(out, gguf, ollama)
    if template is not None and find_run(name, arm, seed) is not None:
        raise ConfigError(f"{name} is a training run: it ships the chat template it was trained with; --template is "
                          "for a model that is no run")
    chat = load_chat(name, arm=arm, seed=seed)
    chat.template = chat.template if template is None else template
    model, tok = chat.model, chat.tokenizer
    _refuse_quantized(model, name)
    if gguf is not None:
        architecture(model.config)  # refused before anything is written
    r = renderer(tok, chat.template, chat.end_of_turn, chat.stop_tokens)
    st = stopping(tok, r)
    done = Exported(out, stops=st.stops)
    if st.strings:
        done.notes.append(f"the stop(s) {', '.join(map(repr, st.strings))} are several tokens for this tokenizer: "
                          "the generation config and the GGUF stop at the one-token stops only; Ollama's Modelfile "
                          "lists them all")
    if gguf is not None:  # from the weights as trained (fp32), before --dtype casts them
        gguf.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(model, tok, gguf, template=r.text, stop_ids=st.ids, qtype=gguf_type, name=out.name)
        try:
            _check_gguf(read_gguf(gguf), model, r.text, st.ids, gguf)
        except ChatmaskError:
            gguf.unlink()  # a file that says something else than what was trained is not left to be served
            raise
        done.gguf = gguf
        say(f"wrote {gguf} ({gguf_type}, {gguf.stat().st_size / 2**20:,.1f} MB)")
    if dtype:
        model = model.to(torch_dtype(dtype))

    def write(tmp: Path) -> None:
        model.config.use_cache = True  # switched off for training; a served model answers with its cache
        model.save_pretrained(tmp)
        save_generation_config(tmp, model, tok, r)
        save_chat_template(tmp, tok, r.text)

    with torch.no_grad():
        atomic_dir(out, write)
    say(f"wrote {out} (Hugging Face folder, {chat.what})")
    if ollama is not None:
        _write_ollama(done, r, Path(ollama), gguf, say)
    return done


def _write_ollama(done: Exported, r, folder: Path, gguf: Path, say) -> None:
    from .paths import atomic_write_text

    text, note = modelfile(r, os.path.relpath(gguf, folder), done.stops)
    if note:
        done.notes.append(note)
    folder.mkdir(parents=True, exist_ok=True)
    done.modelfile = folder / "Modelfile"
    atomic_write_text(done.modelfile, text)
    say(f"wrote {done.modelfile}: ollama create NAME -f {done.modelfile}")


def _check_gguf(info: dict, model, template: str, stop_ids, path) -> None:
    """The file says what was meant: every weight, the template, the trained end of turn."""
    from .gguf_file import tensor_names

    problems = []
    missing = set(tensor_names(model, info["architecture"])) - set(info["tensors"])
    if missing:
        problems.append(f"{len(missing)} weights are missing ({', '.join(sorted(missing)[:3])}, ...)")
    if info["chat_template"] != template:
        problems.append("its chat template differs from the trained one")
    if stop_ids and info["eot"] != stop_ids[0]:
        problems.append(f"its end-of-turn id is {info['eot']}, not {stop_ids[0]}")
    if problems:
        raise ChatmaskError(f"{path} does not read back as written: {'; '.join(problems)}")


# ---------------------------------------------------------------- Ollama

_ROLES = ("system", "user", "assistant")
_PROBES = (("user",), ("user", "assistant"), ("user", "assistant", "user"), ("user", "assistant", "user", "assistant"),
           ("system",), ("system", "user"), ("system", "user", "assistant"), ("system", "user", "assistant", "user"))
_SLOT = re.compile("\ue010(\\d+)\ue011")


def _parts(r, roles, gen: bool, contents=None) -> list[str] | None:
    """The rendering of a conversation of `roles` cut at its contents (slots by default); None if it raises."""
    msgs = [{"role": ro, "content": contents[k] if contents else f"\ue010{k}\ue011"} for k, ro in enumerate(roles)]
    try:
        text = r.render(msgs, add_generation_prompt=gen)
    except ChatmaskError:
        return None
    if contents:
        return [text]
    parts = _SLOT.split(text)
    if parts[1::2] != [str(k) for k in range(len(roles))]:
        return None  # a content dropped, moved or repeated: not one piece per message
    return parts[0::2]


def _common_prefix(texts) -> str:
    return os.path.commonprefix(list(texts)) if texts else ""


def pieces(r) -> dict | None:
    """The trained template as fixed text around each message: {'pre', 'pre_system', 'header': {role}, 'footer':
    {role}, 'after_system': {role}, 'gen'}, when every probe conversation renders as pre + (header + content +
    footer)... + gen (pre_system before a first system message, pre before any other: a default system prompt;
    after_system: a role's header right after a system message, where it differs); else None."""
    seen = {(roles, g): _parts(r, roles, g) for roles in _PROBES for g in (False, True)}
    seen = {k: v for k, v in seen.items() if v is not None}
    after: dict[str, list[str]] = {}
    for (roles, _), p in seen.items():
        for k, ro in enumerate(roles):
            after.setdefault(ro, []).append(p[k + 1])
    footer = {ro: _common_prefix(v) for ro, v in after.items()}
    header: dict[str, set] = {}
    after_system: dict[str, set] = {}  # a template that folds the system message into the next turn
    for (roles, _), p in seen.items():
        for k, ro in enumerate(roles[1:], 1):
            into = after_system if roles[k - 1] == "system" else header
            into.setdefault(ro, set()).add(p[k][len(footer[roles[k - 1]]):])
    if "user" not in header or len(header["user"]) != 1:
        return None
    pre = {p[0][: len(p[0]) - len(h)] for (roles, _), p in seen.items() if roles[0] == "user"
           for h in header["user"] if p[0].endswith(h)}
    if len(pre) != 1:
        return None
    start = pre.pop()
    firsts = {p[0] for (roles, _), p in seen.items() if roles[0] != "user"}  # a role only ever first: system
    if len(firsts) > 1:
        return None
    pre_system = start
    if firsts:  # a default system prompt is in `start`; a system message replaces it
        first = firsts.pop()
        pre_system = start if first.startswith(start) else ""
        header.setdefault("system", set()).add(first[len(pre_system):])
    gen = {p[-1][len(footer[roles[-1]]):] for (roles, g), p in seen.items() if g and roles[-1] != "assistant"}
    if any(len(v) != 1 for v in [*header.values(), *after_system.values()]) or len(gen) != 1:
        return None
    header = {ro: v.pop() for ro, v in header.items()}
    after_system = {ro: h for ro, v in after_system.items() if (h := v.pop()) != header.get(ro)}
    return {"pre": start, "pre_system": pre_system, "header": header, "after_system": after_system,
            "footer": footer, "gen": gen.pop()}


def _rebuild(pc: dict, msgs) -> str | None:
    """A prompt as the pieces build it (what the Ollama TEMPLATE writes), for `msgs` ending with a user turn."""
    if any(m["role"] not in pc["header"] or m["role"] not in pc["footer"] for m in msgs):
        return None
    heads = [pc["after_system"].get(m["role"], pc["header"][m["role"]]) if k and msgs[k - 1]["role"] == "system"
             else pc["header"][m["role"]] for k, m in enumerate(msgs)]
    body = "".join(h + m["content"] + pc["footer"][m["role"]] for h, m in zip(heads, msgs))
    return pc["pre_system" if msgs[0]["role"] == "system" else "pre"] + body + pc["gen"]


_CHECKS = ["Hi there", "two words\nand a line", "a {{ brace }} and \"quotes\"", "last"]
_PADDED = [" padded ", "\nnew line first", "tab\t ", " x"]


def _equal_on(r, pc, contents) -> bool:
    for roles in _PROBES:
        if roles[-1] == "assistant" or "user" not in roles:  # prompts Ollama answers: a user turn last
            continue
        got = _parts(r, roles, True, [contents[k % len(contents)] for k in range(len(roles))])
        msgs = [{"role": ro, "content": contents[k % len(contents)]} for k, ro in enumerate(roles)]
        if got is not None and got[0] != _rebuild(pc, msgs):
            return False
    return True


def go_template(r) -> tuple[str | None, str]:
    """(an Ollama TEMPLATE equal to the trained template on prompts of system / user / assistant messages, or
    None; a note: why not, or where equal only)."""
    pc = pieces(r)
    why = ("the trained template is not fixed text around each message (a system message folded into the first "
           "user turn, a header that depends on the turn before, ...)")
    if pc is None or "user" not in pc["header"] or not _equal_on(r, pc, _CHECKS):
        return None, (f"Ollama: {why}; the Modelfile has no TEMPLATE, so Ollama takes the chat template from the "
                      "GGUF's tokenizer.chat_template (its own detection): check its prompts with `ollama show "
                      "--template`")
    note = "" if _equal_on(r, pc, _PADDED) else ("Ollama: the TEMPLATE equals the trained template for contents "
                                                 "without leading or trailing whitespace (the trained one trims them)")
    if any('"""' in t for t in [pc["pre"], pc["pre_system"], pc["gen"], *pc["header"].values(),
                                 *pc["after_system"].values(), *pc["footer"].values()]):
        return None, 'Ollama: the template writes """, which a Modelfile cannot quote; no TEMPLATE written'

    def lit(t: str) -> str:
        return t.replace("{{", '{{ "{{" }}')

    body = ["{{ $system := false }}" if pc["after_system"] else "",
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    if pc["pre"] == pc["pre_system"] and pc["pre"]:
        body.append(f"{{{{ if eq $i 0 }}}}{lit(pc['pre'])}{{{{ end }}}}")
    elif pc["pre"] != pc["pre_system"]:  # a default system prompt, unless the conversation brings its own
        body.append(f'{{{{ if eq $i 0 }}}}{{{{ if eq .Role "system" }}}}{lit(pc["pre_system"])}{{{{ else }}}}'
                    f'{lit(pc["pre"])}{{{{ end }}}}{{{{ end }}}}')
    for ro in _ROLES:
        if ro not in pc["header"] and ro not in pc["footer"]:
            continue
        foot = lit(pc["footer"].get(ro, ""))
        if ro == "assistant":
            foot = f"{{{{ if not $last }}}}{foot}{{{{ end }}}}"  # a last assistant message is continued, not closed
        head = lit(pc["header"].get(ro, ""))
        if ro in pc["after_system"]:  # right after a system message this role's header differs
            head = f'{{{{ if $system }}}}{lit(pc["after_system"][ro])}{{{{ else }}}}{head}{{{{ end }}}}'
        body.append(f'{{{{ if eq .Role "{ro}" }}}}{head}{{{{ .Content }}}}{foot}{{{{ end }}}}')
    body.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{lit(pc["gen"])}{{{{ end }}}}')
    body.append('{{ $system = eq .Role "system" }}{{ end }}' if pc["after_system"] else "{{ end }}")
    return "".join(body), note


def modelfile(r, gguf_rel: str, stops) -> tuple[str, str]:
    """(the Modelfile's text, a note or '')."""
    template, note = go_template(r)
    lines = ["# written by chatmask export", f"FROM ./{gguf_rel}" if not gguf_rel.startswith(("/", ".")) else
             f"FROM {gguf_rel}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    said = [s for s in stops if '"' not in s and "\n" not in s]
    lines += [f'PARAMETER stop "{s}"' for s in said]
    if len(said) < len(stops):  # a Modelfile string cannot hold them; the GGUF's end-of-turn id still stops
        note = " ".join(filter(None, [note, "Ollama: the stop(s) " + ", ".join(repr(s) for s in stops if s not in said)
                                      + " hold a quote or a line break, which a Modelfile cannot quote: not listed"]))
    return "\n".join(lines) + "\n", note
