"""The stop (README, "The stop"): every trained answer of every real template (tests/data/templates, with
manifest.json saying what each model's tokenizer has) ends with its stop, on a tokenizer with the
template's tokens and on one without them; an answer trained without one is counted, never silent."""

import copy
import json
import warnings
from pathlib import Path

import pytest

import chatmask
from chatmask import IGNORE
from chatmask.config import DataConfig
from chatmask.errors import ChatmaskWarning
from chatmask.prepare import prepare
from conftest import make_bpe_tokenizer
from conftest import trained_runs as runs

TEMPLATES = Path(__file__).parent / "data" / "templates"
MANIFEST = json.loads((TEMPLATES / "manifest.json").read_text(encoding="utf-8"))
CONV = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
VARIANTS = ("tokens", "tokens+model", "plain", "plain+eos")
"""tokens: the template's tokens added (eos stays </s>); +model: the model's eos and stop list too; plain: a
base tokenizer (the template's tokens are text); +eos: the model's eos added to it as its one special token."""


@pytest.fixture(scope="module")
def blank_tok():
    return make_bpe_tokenizer(None)


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def tokenizer(name, variant, blank_tok, base_tok):
    """(tokenizer, the model's stop list) of one variant."""
    m = MANIFEST[name]
    tok = copy.deepcopy(blank_tok if variant.startswith("tokens") else base_tok)
    if variant.startswith("tokens"):
        tok.add_special_tokens({"additional_special_tokens": m["special_tokens"]})
    if variant.endswith(("model", "eos")) and m.get("eos_token"):
        tok.add_special_tokens({"eos_token": m["eos_token"]})
    return tok, tuple(m.get("generation_stop") or ()) if variant == "tokens+model" else ()




def texts(tok, ex):
    return [tok.decode(run) for run in runs(ex)]  # byte-level BPE: a run decodes exactly


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_real_template_trains_each_answer_through_its_stop(name, blank_tok, base_tok):
    """Each trained run holds its answer and ends with a stop (or is counted in `unstopped`, with a
    warning), never reaching into the next message's header; the appended stop is the rendering's end."""
    for variant in VARIANTS:
        tok, stops = tokenizer(name, variant, blank_tok, base_tok)
        r = chatmask.labels.renderer(tok, template(name), stop_tokens=stops)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ex = chatmask.encode(CONV, tok, template=template(name), stop_tokens=stops)
        got = texts(tok, ex)
        assert len(got) == 2, (variant, got)
        headers = [h.strip() for h in r.headers.values() if h.strip() and h.strip() not in r.stops]
        missing = 0
        for run, answer in zip(got, ("The capital of France is Paris.", "Rome.")):
            assert answer in run, (variant, run)
            tail = run.split(answer, 1)[1]
            assert not any(h in tail for h in headers), (variant, run, headers)
            missing += not any(tail.rstrip().endswith(s) for s in r.stops)
        assert missing == ex.unstopped, (variant, got, r.stops)
        if ex.unstopped:
            assert any(issubclass(w.category, ChatmaskWarning) and "stop" in str(w.message) for w in seen) \
                or r.warned, variant
        rendering = r.render(CONV)
        assert tok.decode(ex.input_ids) == rendering + (r.append if ex.stop_appended else ""), variant


def test_qwen15_writes_no_end_after_the_last_message_and_trains_every_im_end(blank_tok, base_tok):
    """Qwen1.5-Chat's original template writes <|im_end|> after every message but the last: every answer
    still trains it (the last one's appended, as the model writes it at inference)."""
    for variant in ("tokens", "tokens+model", "plain"):
        tok, stops = tokenizer("qwen1.5-chat", variant, blank_tok, base_tok)
        ex = chatmask.encode(CONV, tok, template=template("qwen1.5-chat"), stop_tokens=stops)
        assert texts(tok, ex) == ["The capital of France is Paris.<|im_end|>", "Rome.<|im_end|>"], variant
        assert ex.stop_appended and ex.unstopped == 0
    assert ex.input_ids[-1] != tok.convert_tokens_to_ids("<|im_end|>")  # plain: '<|im_end|>' is text
    tok, _ = tokenizer("qwen1.5-chat", "tokens", blank_tok, base_tok)
    ex = chatmask.encode(CONV, tok, template=template("qwen1.5-chat"))
    assert ex.input_ids[-1] == ex.labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert any("is appended" in n for n in chatmask.check_template(tok, template("qwen1.5-chat")))


def test_command_r7b_trains_the_eos_after_its_plain_text_end_of_response(blank_tok, base_tok):
    """Its turns end <|END_RESPONSE|><|END_OF_TURN_TOKEN|>; on a tokenizer whose only special token is the
    eos <|END_OF_TURN_TOKEN|>, the eos (what stops generation) is trained too."""
    tok, _ = tokenizer("command-r7b", "plain+eos", blank_tok, base_tok)
    ex = chatmask.encode(CONV, tok, template=template("command-r7b"))
    eos = tok.convert_tokens_to_ids("<|END_OF_TURN_TOKEN|>")
    assert [t[-1] for t in runs(ex)] == [eos, eos]
    assert all(t.endswith("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>") for t in texts(tok, ex))


def test_gpt_oss_on_a_tokenizer_without_its_tokens_is_not_refused(blank_tok, base_tok):
    tok, _ = tokenizer("gpt-oss", "plain", blank_tok, base_tok)
    r = chatmask.labels.renderer(tok, template("gpt-oss"))
    assert (r.markers["user"], r.markers["last"]) == ("<|end|>", "<|return|>")
    assert r.headers["user"] == "<|start|>user<|message|>"
    assert [t[-len("<|return|>"):] for t in texts(tok, chatmask.encode(CONV, tok, template=template("gpt-oss")))] \
        == ["sParis.<|end|>"[-len("<|return|>"):], "<|return|>"]


GLM_TOOL = CONV[:2] + [{"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]


def test_glm_trains_the_stop_that_opens_the_next_message(blank_tok, base_tok):
    """GLM writes no end of turn: the answer ends where <|user|> or <|observation|> opens the next message,
    and those are the model's own stops; after the last answer the template writes nothing, so the stop
    is appended."""
    for variant in ("tokens+model", "tokens"):  # without the stop list: the header's token, with a note
        tok, stops = tokenizer("glm-4.6", variant, blank_tok, base_tok)
        ex = chatmask.encode(CONV, tok, template=template("glm-4.6"), stop_tokens=stops)
        assert [t[-1] for t in runs(ex)] == [tok.convert_tokens_to_ids("<|user|>")] * 2, variant
        ex = chatmask.encode(GLM_TOOL, tok, template=template("glm-4.6"), stop_tokens=stops)
        assert [t[-1] for t in runs(ex)] == [tok.convert_tokens_to_ids(s) for s in ("<|observation|>", "<|user|>")]
        r = chatmask.labels.renderer(tok, template("glm-4.6"), stop_tokens=stops)
        assert {"<|user|>", "<|observation|>"} <= set(r.stops) and r.append == "<|user|>"
    assert any("<|user|>" in n and "--stop-tokens" in n for n in r.notes)


def test_glm_as_plain_text_warns_and_counts_answers_without_a_stop(tmp_path, base_tok):
    tok = copy.deepcopy(base_tok)
    with pytest.warns(ChatmaskWarning, match="no stop ends an answer before a "):
        ex = chatmask.encode(CONV, tok, template=template("glm-4.6"))
    assert ex.unstopped == 1 and ex.stop_appended  # the first answer; the last gets the eos appended
    assert texts(tok, ex)[1].endswith("Rome.</s>")
    rows = [{"messages": CONV}, {"messages": CONV[:2]}, {"messages": CONV}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = prepare(str(data), DataConfig(template=template("glm-4.6")), tmp_path / "o", tokenizer=tok,
                    progress=False, log=None).stats
    assert (s["rows_without_trained_stop"], s["answers_without_trained_stop"], s["rows_stop_appended"]) == (2, 2, 3)
    assert s["first_without_trained_stop"].endswith("d.jsonl:1")


def test_an_answer_cut_by_right_truncation_is_counted_without_its_stop(bpe_tok):
    full = chatmask.encode(CONV, bpe_tok, template="chatml")
    assert full.unstopped == 0
    last = len(full.labels) - 2  # inside the last answer, before its <|im_end|>
    ex = chatmask.encode(CONV, bpe_tok, template="chatml", max_length=last, truncation="right")
    assert ex.unstopped == 1 and ex.labels[-1] != IGNORE
    ex = chatmask.encode(CONV, bpe_tok, template="chatml", max_length=last, truncation="turns")
    assert ex.unstopped == 0


def test_the_models_stop_list_is_read_beside_its_tokenizer(tmp_path, blank_tok, base_tok):
    """A folder with generation_config.json: its eos_token_id list is the stop list prepare labels with
    (and names in its config.json); --stop-tokens overrides it, 'none' drops it."""
    tok, _ = tokenizer("glm-4.6", "tokens+model", blank_tok, base_tok)
    tok.chat_template = template("glm-4.6")
    tok.save_pretrained(tmp_path / "tok")
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    loaded = chatmask.hub.load_tokenizer(str(tmp_path / "tok"))
    assert chatmask.hub.model_stop_tokens(loaded) == ("<|endoftext|>", "<|user|>", "<|observation|>")
    assert chatmask.hub.stop_tokens(DataConfig(stop_tokens="<|user|>, <|x|>"), loaded) == ("<|user|>", "<|x|>")
    assert chatmask.hub.stop_tokens(DataConfig(stop_tokens="none"), loaded) == ()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONV}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(str(data), DataConfig(tokenizer=str(tmp_path / "tok")), tmp_path / "o", progress=False, log=None)
    conf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert conf["stop_tokens"] == "<|endoftext|>,<|user|>,<|observation|>" and "<|user|>" in conf["stops"]
    assert p.stats["rows_without_trained_stop"] == 0


def test_check_names_the_stops_and_stats_can_fail_on_missing_ones(tmp_path, base_tok, capsys):
    from chatmask import cli

    tok = copy.deepcopy(base_tok)
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "glm.jinja").write_text(template("glm-4.6"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONV}))
    args = ["--tokenizer", str(tmp_path / "tok"), "--template", template("glm-4.6")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["check", *args]) == 0
        out = capsys.readouterr().out
        assert "stops (what generation stops on): '</s>'" in out and "appended" in out
        assert cli.main(["stats", str(data), *args, "--quiet", "--fail-if", "rows_without_trained_stop>0"]) == 1
    assert "rows with an answer trained without its stop: 1" in capsys.readouterr().out


AGENT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "thinking": "I should look it up.",
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny.", "thinking": "The tool says sunny."},
]


def test_gpt_oss_tool_call_trains_through_its_call_stop_and_the_answer_after_it_from_its_channel(blank_tok,
                                                                                                base_tok):
    """The call turn ends with <|call|> (the model's stop before a tool result; the template's plain stand-in
    for it is refused: a tool message needs a call before it). After the tool result the template drops the
    call's analysis from the rendering, not from the prompt: the next answer still trains its <|channel|>."""
    tok, stops = tokenizer("gpt-oss", "tokens+model", blank_tok, base_tok)
    kw = dict(template=template("gpt-oss"), stop_tokens=stops)
    call = ' to=functions.weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
    assert texts(tok, chatmask.encode(AGENT, tok, **kw)) == [
        call, "<|channel|>analysis<|message|>The tool says sunny.<|end|><|start|>assistant<|channel|>final"
              "<|message|>It is sunny.<|return|>"]
    turns = chatmask.encode_turns(AGENT, tok, **kw)
    assert [texts(tok, e) for e in turns] == [
        ["<|channel|>analysis<|message|>I should look it up.<|end|><|start|>assistant" + call],
        ["<|channel|>analysis<|message|>The tool says sunny.<|end|><|start|>assistant<|channel|>final"
         "<|message|>It is sunny.<|return|>"]]
    assert tok.decode(turns[1].input_ids).count("I should look it up.") == 1  # the prompt as inference shows it


# a tool-call turn written `...<|call|><|end|>`, a tool result only after a call (so a plain stand-in is refused)
CALL_THEN_END = (
    "{%- for m in messages -%}{%- if m.role == 'assistant' and m.tool_calls -%}"
    "{{ '<|start|>assistant<|message|>' + m.tool_calls[0].function.name + (m.tool_calls[0].function.arguments"
    " | tojson) + '<|call|><|end|>' }}{%- elif m.role == 'tool' -%}"
    "{%- if not messages[loop.index0 - 1].tool_calls -%}{{ raise_exception('a tool result needs a call') }}"
    "{%- endif -%}{{ '<|start|>tool<|message|>' + m.content + '<|end|>' }}"
    "{%- else -%}{{ '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start|>assistant' }}{%- endif -%}"
)


def test_a_tool_call_turn_ends_at_the_first_stop_after_it(blank_tok, base_tok):
    """Generation stops at the first stop the model writes: <|call|>, not the <|end|> the template adds."""
    tok, _ = tokenizer("gpt-oss", "tokens", blank_tok, base_tok)
    msgs = [{k: v for k, v in m.items() if k != "thinking"} for m in AGENT]
    got = texts(tok, chatmask.encode(msgs, tok, template=CALL_THEN_END, stop_tokens=("<|end|>", "<|call|>")))
    assert got == ['<|message|>weather{"city": "Paris"}<|call|>', "<|message|>It is sunny.<|end|>"]


def test_nemotron_tool_call_trains_its_own_end_of_turn(blank_tok, base_tok):
    """Nemotron writes a conversation's last tool call as a block of its own, `...</TOOLCALL><SPECIAL_12>`,
    unlike an answer's `\n<SPECIAL_12>`: the call is located with its structure kept, not by a plain stand-in
    that the template ends otherwise; earlier calls end like answers."""
    tok, stops = tokenizer("nemotron-nano-v2", "tokens+model", blank_tok, base_tok)
    msgs = [{k: v for k, v in m.items() if k != "thinking"} for m in AGENT]
    msgs[1]["content"] = "Checking."
    kw = dict(template=template("nemotron-nano-v2"), stop_tokens=stops)
    call = '<TOOLCALL>[{"name": "weather", "arguments": {"city": "Paris"}}]</TOOLCALL>'
    assert texts(tok, chatmask.encode(msgs, tok, **kw))[0] == f"Checking.\n{call}\n<SPECIAL_12>"
    first = chatmask.encode_turns(msgs, tok, **kw)[0]
    assert texts(tok, first)[0].endswith(f"\n<SPECIAL_11>Assistant\n{call}<SPECIAL_12>")
    # a call alone: its prompt opens <think> (inference), its rendering does not; trained from <TOOLCALL>
    msgs[1]["content"] = ""
    assert texts(tok, chatmask.encode_turns(msgs, tok, **kw)[0]) == [f"{call}<SPECIAL_12>"]


# DeepSeek-V3.2's shape: the user message writes the assistant header, the generation prompt opens with a user
# header of its own, and a tool result is closed after as many results as the call before it made
DS32 = (
    "{{ bos_token }}{%- if messages[0].role == 'system' -%}{{ messages[0].content }}{%- endif -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{{ '<|user|>' + m.content + '<|assistant|>' }}"
    "{%- elif m.role == 'assistant' -%}{{ m.content }}{%- if m.tool_calls -%}{{ '\\n<calls>' }}"
    "{%- for c in m.tool_calls -%}{{ '<call name=\"' + c.function.name + '\">' }}{%- for k, v in"
    " c.function.arguments.items() -%}{{ '<arg name=\"' + k + '\">' + v + '</arg>' }}{%- endfor -%}"
    "{{ '</call>' }}{%- endfor -%}{{ '</calls>' }}{%- endif -%}{{ eos_token }}"
    "{%- elif m.role == 'tool' -%}{{ '<results>' + m.content }}"
    "{%- if messages[loop.index0 - 1].tool_calls | length == 1 -%}{{ '</results>' }}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|user|>\\n<|assistant|>' }}{%- endif -%}"
)


def test_a_head_never_reaches_into_the_message_before_it(bpe_tok):
    """The generation prompt (`<|user|>\\n<|assistant|>`) is not a prefix of the rendering, and its first
    token occurs before the answer only as the user's own header: the user's text is never trained; a call
    is trained from its first tag, not from where its arguments first differ from a stand-in's."""
    tok = copy.deepcopy(bpe_tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    msgs = [{"role": "system", "content": "Be brief."}] + [
        {k: v for k, v in m.items() if k != "thinking"} for m in AGENT]
    msgs[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    want = ['\n<calls><call name="weather"><arg name="city">Paris</arg></call></calls></s>', "It is sunny.</s>"]
    assert texts(tok, chatmask.encode(msgs, tok, template=DS32)) == want
    assert [texts(tok, e)[0] for e in chatmask.encode_turns(msgs, tok, template=DS32)] == want


AGENT_CHAT = [{"role": "system", "content": "Sys prompt text."}, {"role": "user", "content": "User asks one."},
              {"role": "assistant", "content": "Answer one."}, {"role": "user", "content": "User asks two."},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
              {"role": "tool", "content": "Tool says rain."}, {"role": "assistant", "content": "Answer two."}]


def _agent_rows(name):
    """(the agent conversation as the template takes it: arguments as a dict, else as a JSON string, whether
    the template renders the call); None where the template refuses both (roles it does not allow)."""
    for args in ({"city": "Oslo"}, json.dumps({"city": "Oslo"})):
        msgs = copy.deepcopy(AGENT_CHAT)
        msgs[4]["tool_calls"][0]["function"]["arguments"] = args
        try:
            text = chatmask.labels.renderer(make_bpe_tokenizer(None), template(name)).render(msgs)
            return msgs, "weather" in text
        except chatmask.TemplateError:
            continue
    return None, False


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_real_template_trains_the_answers_and_tool_calls_and_nothing_else(name, blank_tok, base_tok):
    """An agent conversation (system, answers, a tool call, its result) on every real template that takes
    it: no trained run holds a character of a system, user or tool message; every answer is trained, and the
    call's arguments; per-turn examples train their last answer only. A template that drops the call is an
    error naming it, not an empty answer trained."""
    msgs, renders_calls = _agent_rows(name)
    if msgs is None:
        pytest.skip(f"{name} refuses a tool call and its result")
    tok, stops = tokenizer(name, "tokens+model", blank_tok, base_tok)
    kw = dict(template=template(name), stop_tokens=stops)
    if not renders_calls:
        for encode in (chatmask.encode, chatmask.encode_turns):
            with pytest.raises(chatmask.ConversationError, match="message 5: its tool call 'weather' is not in"):
                encode(msgs, tok, **kw)
        return
    others = ("Sys prompt", "User asks", "Tool says")
    full = "".join(texts(tok, chatmask.encode(msgs, tok, **kw)))
    assert not [o for o in others if o in full], full
    assert all(a in full for a in ("Answer one.", "Oslo", "Answer two.")), full
    for e, want in zip(chatmask.encode_turns(msgs, tok, **kw), ("Answer one.", "Oslo", "Answer two.")):
        trained = "".join(texts(tok, e))
        assert want in trained and not [o for o in others if o in trained], trained
