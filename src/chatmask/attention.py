"""Attention for packs (`batches.pack`): examples concatenated into one sequence must not attend to each other.

`packed_attention(model, device) -> "varlen" | "mask"` chooses how, and checks it on a probe: `VARLEN`,
an attention function registered with transformers (torch's flash varlen kernel on a GPU, sdpa once per
example on CPU; plain sdpa for unpacked batches), or the block-diagonal mask `batches.pack` builds.
`require_tree_attention(model, attention)` checks the same for --turns tree rows (tree.py) on a probe.
"""

from __future__ import annotations

import functools
import itertools

from .errors import ConfigError

VARLEN = "chatmask_varlen"
"""attention implementation registered with transformers: attention per packed example (torch's varlen
kernel on a GPU, sdpa once per example on CPU), plain sdpa for unpacked batches"""


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                      max_length_q=None, tree_chains=None, **kwargs):
    """Attention kept inside each example of a pack, the examples' boundaries read from
    `cu_seq_lens_q` over the flattened (B*T) tokens: torch's flash varlen kernel on a GPU (fp16/bf16),
    else sdpa (is_causal) once per example. Nothing crosses an example and attention costs sum(n_i^2)
    instead of a block-diagonal mask's T^2. `tree_chains` (per segment, `batches.pack`): a tree row's segment
    attends chain by chain (`_tree_attention`; no varlen kernel takes a tree). Without boundaries (padded
    batches, generation) it is transformers' sdpa, unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, T, D = query.shape  # key, value (B, H_kv, T, D)
    if cu_seq_lens_q is None or key.shape[2] != T:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kernel = _varlen_kernel(query.device.type, query.dtype, D, scaling, dropout)
    if kernel is not None and not any(m is not None for m in tree_chains or ()):
        q = query.transpose(1, 2).reshape(B * T, H, D)  # (B*T, H, D)
        k, v = (x.transpose(1, 2).reshape(B * T, -1, D).repeat_interleave(H // x.shape[1], dim=1)
                for x in (key, value))  # (B*T, H, D): grouped kv heads repeated as transformers' repeat_kv does
        n = max_length_q if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        return kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_q, n, n).view(B, T, H, D), None
    bounds = cu_seq_lens_q.tolist()
    lens: list[list[int]] = [[] for _ in range(B)]  # per pack, its examples' lengths
    for s, e in itertools.pairwise(bounds):
        b = s // T
        if e - b * T > T or e <= s:
            raise ValueError(f"packed segment [{s}, {e}) crosses a pack of {T} tokens")
        lens[b].append(e - s)
    if any(sum(n) != T for n in lens):
        raise ValueError(f"packed segments {bounds} do not cover {B} pack(s) of {T} tokens")
    plans = iter(tree_chains or itertools.repeat(None))
    outs = []
    for b in range(B):  # split, not slices: its backward is one cat, not a zero-filled pack per example
        q, k, v = ((x if B == 1 else x[b:b + 1]).split(lens[b], dim=2) for x in (query, key, value))
        outs.append(torch.cat([_tree_attention(module, *qkv, plan, dropout, scaling) if plan is not None else
                               sdpa_attention_forward(module, *qkv, None, dropout=dropout, scaling=scaling,
                                                      is_causal=True)[0]
                               for qkv, plan in zip(zip(q, k, v), plans)], dim=1))
    return outs[0] if B == 1 else torch.cat(outs, dim=0), None  # (B, T, H, D)


def _tree_attention(module, query, key, value, chains, dropout, scaling):
    """Attention of one tree row (1, H, n, D), chain by chain (`batches._chains`): each chain's queries against
    its ancestors' keys and its own (causal), one sdpa call a chain: what the tree needs, not n^2."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sizes = [c[0] for c in chains]
    idx = torch.cat([c[1] for c in chains])
    gathered = [x.index_select(2, idx).split([len(c[1]) for c in chains], dim=2) for x in (key, value)]
    outs = []
    for q, k, v, kp, vp, (n, prefix, mask) in zip(*(x.split(sizes, dim=2) for x in (query, key, value)),
                                                  *gathered, chains):
        if not len(prefix):
            outs.append(sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                               is_causal=True)[0])
        else:
            outs.append(sdpa_attention_forward(module, q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), mask,
                                               dropout=dropout, scaling=scaling)[0])
    return torch.cat(outs, dim=1)  # (1, n, H, D)


@functools.cache  # called in every layer of every forward
def _varlen_kernel(device_type: str, dtype, head_dim: int, scaling=None, dropout=0.0):
    """torch.nn.attention.varlen.varlen_attn as a causal f(q, k, v, cu_q, cu_k, max_q, max_k), where it can
    run this call (CUDA, fp16/bf16, no dropout, a scale it takes), else None."""
    import torch

    if not (device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and dropout == 0.0):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}  # torch 2.10 / later
    if scaling is not None and "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim ** -0.5) > 1e-9:
        return None
    return functools.partial(varlen_attn, **kw)


def _register_varlen():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN, _varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)  # unpacked batches get sdpa's usual masks


def packed_attention(model, device=None, keep: bool = False) -> str:
    """How packs keep their examples apart in `model`, checked on a probe, never assumed:
    'varlen' (attention per example: flash-attention's varlen kernel when the model runs flash-attention,
    else `VARLEN`) or 'mask' (a 4D block-diagonal mask, T^2 per pack). `device`: where training runs (default:
    where the model is); on a GPU `VARLEN` is used only where torch's varlen kernel can run (fp16/bf16), as
    sdpa once per example would cost a kernel launch per example and layer. Call before wrapping the model
    (accelerate, DDP). `keep`: the user chose the attention implementation (--attn-implementation): it is
    kept, and packing uses whichever of boundaries or the mask it honours. Raises ConfigError when neither
    keeps examples apart."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    weight = model.get_input_embeddings().weight
    on = torch.device(device) if device is not None else weight.device
    want_varlen = (str(before).startswith("flash_attention") or on.type == "cpu"
                   or _varlen_kernel(on.type, weight.dtype, 0) is not None)
    if keep:
        for how in ("varlen", "mask"):
            if _isolates(model, how):
                return how
        raise ConfigError(f"--attn-implementation {before} lets packed examples attend to each other (it honours "
                          "neither boundaries nor a block-diagonal mask): drop --attn-implementation or --packing")
    if want_varlen and not str(before).startswith("flash_attention"):
        try:
            _register_varlen()
            base.set_attn_implementation(VARLEN)
        except (ValueError, KeyError, ImportError, AttributeError, TypeError):
            pass  # a model without transformers' attention interface (old remote code): the mask below
    if want_varlen and _isolates(model, "varlen"):
        return "varlen"
    if getattr(base.config, "_attn_implementation", None) != before:
        base.set_attn_implementation(before)
    if _isolates(model, "mask"):
        return "mask"
    raise ConfigError(f"{type(base).__name__} lets packed examples attend to each other with both boundaries and a "
                      "block-diagonal mask; train without --packing")


def _isolates(model, attention: str) -> bool:
    """True when the second of two packed examples gets the logits it gets alone, whatever the first is."""
    import torch

    from .batches import pack, to_device
    from .models import logits_close, probing, vocab_rows

    p0 = next(model.parameters())
    V = vocab_rows(model)
    g = torch.Generator().manual_seed(0)
    a, a2, b = (torch.randint(V, (n,), generator=g).tolist() for n in (5, 5, 7))
    try:
        with probing(model):
            alone = model(input_ids=torch.tensor([b], device=p0.device)).logits[0]  # (7, V)
            got = []
            for first in (a, a2):
                batch = pack([{"input_ids": first, "labels": first}, {"input_ids": b, "labels": b}], 0,
                             dtype=p0.dtype, attention=attention)
                batch.pop("labels")
                got.append(model(**to_device(batch, p0.device)).logits[0, 5:])  # (7, V)
    except (TypeError, ValueError, RuntimeError):
        return False
    return all(logits_close(x, alone, p0.dtype) for x in got)


def require_tree_attention(model, attention: str | None, turns: str = "tree") -> None:
    """With --turns tree: ConfigError unless `model` keeps a tree row's branches apart (`tree_attention_works`)."""
    if turns == "tree" and not tree_attention_works(model, attention):
        raise ConfigError(f"{type(model).__name__} does not keep a --turns tree row's branches apart (a probe's "
                          "paths got other logits than alone): train with --turns per-turn instead")


def tree_attention_works(model, attention: str | None) -> bool:
    """True when each path of a tree row (tree.py) gets, in `model`, the logits it gets alone: packed
    (`attention` "varlen" or "mask", beside another example) or padded (None: collate's 4D mask)."""
    import torch

    from . import tree
    from .batches import collate, pack, to_device
    from .models import logits_close, probing, vocab_rows

    p0 = next(model.parameters())
    g = torch.Generator().manual_seed(1)
    prefix, x, y, z, other = (torch.randint(vocab_rows(model), (n,), generator=g).tolist() for n in (4, 3, 2, 3, 5))
    seqs = [prefix + x, prefix + y + z]  # two turns: the second's history forks from the first's answer
    row = tree.lay_out([{"input_ids": s, "labels": [-100] * (len(s) - 1) + s[-1:]} for s in seqs])
    if row is None:
        return False
    as_tree = {"input_ids": row.input_ids, "labels": row.labels, "tree_ends": row.ends}
    plain = {"input_ids": other, "labels": other}
    try:
        with probing(model):
            alone = [model(input_ids=torch.tensor([s], device=p0.device)).logits[0] for s in seqs]
            batch = (collate([as_tree, plain], 0, dtype=p0.dtype) if attention is None
                     else pack([plain, as_tree], 0, dtype=p0.dtype, attention=attention))
            batch.pop("labels")
            out = model(**to_device(batch, p0.device)).logits
            flat = out[0] if attention is None else out[0, len(other):]
    except (TypeError, ValueError, RuntimeError):
        return False
    return all(logits_close(flat[path], want, p0.dtype) for path, want in zip(row.paths, alone))
