"""The token stream: the tokenizer's encoding of the whole rendering, computed piecewise with a memo and
checked against whole-text encodings by ids; a token that straddles a prompt/answer boundary re-spelt as its
parts (counted in Example.respelt); the `segments` stream; tokenizers chatmask cannot use."""

import pytest
from tokenizers import AddedToken

import chatmask
from chatmask import IGNORE, TemplateError, tokens
from conftest import make_bpe_tokenizer

CONV = [
    {"role": "user", "content": "How can I restore my Unity?"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": "read this"},
]
# the generation prompt ends with a space that the answer's first word would merge with
SPACED = (
    "{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: {{ m.content }}</s>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
TEXTS = ["<s>Hi there</s>\n<|im_start|>user\nÜnïcödé ☃ 🙂<|im_end|>", "plain text  with  spaces\n\n\tend",
         " <|end|>\n\n<|user|> x", "a<|im_end|><|im_start|>b", "<|im_end|>", ""]


def whole(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_piecewise_equals_whole_text(bpe_tok):
    tt = tokens.text_tokens(bpe_tok)
    assert tt.piecewise
    for _ in range(2):  # cold, then from the memo
        assert [tokens.ids_of(p) for p in tt.encode(TEXTS)] == [whole(bpe_tok, t) for t in TEXTS]


def test_piecewise_mirrors_stripping_added_tokens():
    """Phi-3 ships <|end|> with rstrip: it swallows the newline after it, and the text after it is a piece."""
    tok = make_bpe_tokenizer(None)
    tok.backend_tokenizer.add_special_tokens([AddedToken("<|stop|>", rstrip=True, normalized=False, special=True),
                                              AddedToken("<|left|>", lstrip=True, normalized=False, special=True)])
    tt = tokens.TextTokens(tok)
    texts = ["answer<|stop|>\n\nnext", "a  <|left|>b", "x<|stop|>", " \n<|left|><|stop|> y"]
    assert tt.piecewise
    assert [tokens.ids_of(p) for p in tt.encode(texts)] == [whole(tok, t) for t in texts]


def test_a_wrong_memo_is_caught_by_ids_and_every_row_encoded_whole(bpe_tok):
    """Plant a bug in the piecewise encoding (a memoized piece with wrong ids): the whole-text check on the
    first rows of the call notices, and every row of it is encoded whole instead."""
    tok = make_bpe_tokenizer()
    tt = tokens.text_tokens(tok)
    rows = [(CONV, f"r{i}") for i in range(3)]
    good = chatmask.labels.encode_many(rows, tok)
    piece = "user\nHow can I restore my Unity?"
    assert piece in tt.memo
    tt.memo[piece] = tokens.Run([5, 6, 7], offs=[(0, 1), (1, 2), (2, len(piece))])
    got = chatmask.labels.encode_many(rows, tok)
    assert not tt.piecewise
    assert [e.input_ids for e in got] == [e.input_ids for e in good]


def test_straddling_token_is_respelt_and_counted():
    tok = make_bpe_tokenizer(None)
    R = chatmask.labels.renderer(tok, SPACED).render(CONV)
    ex = chatmask.encode(CONV, tok, template=SPACED)
    w = whole(tok, R)
    assert ex.respelt == 1 and ex.input_ids != w  # " read": one token in the rendering, cut at the boundary
    assert tok.decode(ex.input_ids) == R
    runs = [[t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]]
    assert tok.decode(runs[0]) == "Hello there</s>read this</s>"
    # the prompt before the second answer is exactly the tokens the model is given at inference
    G = chatmask.labels.renderer(tok, SPACED).render(CONV[:3], add_generation_prompt=True)
    assert ex.input_ids[: len(whole(tok, G))] == whole(tok, G)


def test_sentencepiece_straddle_is_respelt_with_its_own_pieces():
    sp = pytest.importorskip("sp_tokenizers")
    tok = sp.hf_tokenizer("llama", layout="llama-default")
    t = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST] "
         "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello world"}]
    R = chatmask.labels.renderer(tok, t).render(msgs)
    ex = chatmask.encode(msgs, tok, template=t)
    pieces = tok.convert_ids_to_tokens(ex.input_ids)
    trained = tok.convert_ids_to_tokens([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert ex.respelt == 1 and "".join(trained).replace("▁", " ") == "Hello world</s>"
    assert "".join(pieces).replace("▁", " ").lstrip() == R  # every character, none added
    assert "".join(tok.convert_ids_to_tokens(whole(tok, R))) == "".join(pieces)


def test_segments_stream_encodes_each_segment_alone():
    sp = pytest.importorskip("sp_tokenizers")
    tok = sp.hf_tokenizer("llama", layout="llama-legacy")
    t = chatmask.templates.get("mistral").jinja
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello world"}]
    R = chatmask.labels.renderer(tok, t).render(msgs)
    ex = chatmask.encode(msgs, tok, template=t)
    seg = chatmask.encode(msgs, tok, template=t, stream="segments")
    cut = R.index("[/INST]") + len("[/INST]")
    assert ex.input_ids == whole(tok, R)
    assert seg.input_ids == whole(tok, R[:cut]) + whole(tok, R[cut:])  # the answer gets its own dummy ▁
    assert tok.convert_ids_to_tokens(seg.input_ids)[len(whole(tok, R[:cut]))].startswith("▁")
    assert [lab != IGNORE for lab in seg.labels].count(True) == len(whole(tok, R[cut:]))


def test_encode_turns_prompt_is_the_generation_prompt_as_tokenized_at_inference():
    tok = make_bpe_tokenizer(None)
    r = chatmask.labels.renderer(tok, SPACED)
    exs = chatmask.encode_turns(CONV, tok, template=SPACED)
    for ex, i in zip(exs, (1, 3)):
        G = whole(tok, r.render(CONV[:i], add_generation_prompt=True))
        assert ex.input_ids[: len(G)] == G and all(lab == IGNORE for lab in ex.labels[: len(G)])
        assert tok.decode([t for t in ex.labels if t != IGNORE]) == CONV[i]["content"] + "</s>"


def test_a_tokenizer_without_offsets_is_a_clear_error():
    class SlowTokenizer:  # what transformers' MistralCommonBackend looks like to chatmask
        chat_template = None
        added_tokens_decoder = staticmethod(lambda: {})

        def __len__(self):
            return 10

    with pytest.raises(TemplateError, match="fast tokenizer"):
        chatmask.encode(CONV, SlowTokenizer())


def test_unknown_stream_is_a_config_error(bpe_tok):
    with pytest.raises(chatmask.ConfigError, match="stream"):
        chatmask.encode(CONV, bpe_tok, stream="vendor")


def test_view_shows_sentencepiece_spaces():
    """Decoding one SentencePiece token alone drops its leading space; the view shows the piece's text, so
    the rows spell the rendering and `▁I` differs visibly from `I`."""
    sp = pytest.importorskip("sp_tokenizers")
    from chatmask.view import rows

    tok = sp.hf_tokenizer("llama", layout="llama-default")
    t = chatmask.templates.get("mistral").jinja
    msgs = [{"role": "user", "content": "Hi there\n"}, {"role": "assistant", "content": "Hello world"}]
    R = chatmask.labels.renderer(tok, t).render(msgs)
    shown = rows(chatmask.encode(msgs, tok, template=t), tok)
    assert "".join(r.text for r in shown).replace("\\n", "\n") == R
    seg = rows(chatmask.encode(msgs, tok, template=t, stream="segments"), tok)
    assert [r.text for r in seg if r.trained][0].startswith(" ")
