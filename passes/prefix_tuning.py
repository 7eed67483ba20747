"""prefix_tuning: learned K/V prefixes on every ``aten.scaled_dot_product_attention`` call.

For each SDPA node ``sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa=)`` (q, k,
v ``[B, H, S, D]``) a :class:`~peftfx.kernels.prompt_modules.PrefixKV` registered as
``<attention module>.prefix`` returns K/V with P prefix positions in front (dim -2) and the mask
with P leading columns (True / 0.0); ``is_causal=True`` becomes an explicit mask (see
:func:`~peftfx.kernels.prompt_modules.extend_attention_mask`).

**K/V heads.** Prefixes are stored ``[n_kv_heads, P, D]``. GQA models repeat K/V to the query
heads before SDPA (``repeat_kv``: ``reshape(expand(x[:, :, None], [B, n_kv, n_rep, S, D]),
[B, n_kv*n_rep, S, D])``); when K reaches SDPA through that pattern we read ``n_kv`` and
``n_rep`` off the 5-d expand and repeat the prefix the same way. Otherwise ``n_kv`` is K's head
count (also with ``enable_gqa=True``, where SDPA repeats internally).

**Positions.** Real tokens take positions P..P+S-1, as behind a KV cache of length P (PEFT).
Positions are found by what they compute: a counter along the sequence dim whose values flow
into an SDPA's query or key (through a position-embedding lookup or rotary cos/sin). Three
computations count positions, and each is shifted by P:

* an ``arange`` of the sequence length (Llama-family RoPE, GPT-2's ``wpe``): ``arange + P``;
* a slice of a ``*position*`` buffer (BERT's ``position_ids``): the slice starts P later;
* a ``cumsum`` along the sequence of the attention mask (OPT's and BioGPT's learned positions
  ``cumsum(mask) * mask - 1``, RoBERTa's ``cumsum(ids != pad) * mask + pad``): ``cumsum + P``, which
  is exactly the cumsum over PEFT's mask with P leading ones, so padded tokens keep their position.

Only edges that lead to an SDPA's q/k are shifted, so masks built from the same lengths are
untouched; the pass notes list each shifted node (``positions_shifted``). Relative position
biases (T5) live in the float mask and get 0.0 prefix columns. Not handled: ALiBi (Bloom,
Falcon), whose position bias is built from the mask's cumsum into the float mask, not into q/k.

**Reparametrization** (``reparametrize = true``): one :class:`PrefixEncoder` (``prefix_encoder``)
computes all calls' K/V in PEFT's ``prompt_embeddings`` layout; :func:`fold_prefix_encoder` turns
it into plain :class:`PrefixKV` tensors, :func:`prefix_prompt_embeddings` returns
``[P, L*2*n_kv*D]`` (call order = graph order) for export.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from peftfx.errors import RewriteError
from peftfx.graph import get_attr_value, set_submodule, stamp, unique_attr_name
from peftfx.kernels.prompt_modules import PrefixEncoder, PrefixKV, ReparamPrefixKV
from peftfx.pass_manager import PassContext, PassResult, register_pass, shared_module
from peftfx.trace import owner_fqn

__all__ = ["prefix_tuning", "fold_prefix_encoder", "prefix_prompt_embeddings", "load_prefix_prompt_embeddings"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_MARK = "peftfx.prefix"
_PASS = "prefix_tuning"


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _kv_heads(k: Node) -> tuple[int, int]:
    """(n_kv_heads, n_rep) of SDPA's key input, recognizing ``repeat_kv`` in front of it."""
    heads = int(_val(k).shape[1])
    if k.op == "call_function" and k.target in _RESHAPES:
        src = k.args[0]
        if isinstance(src, Node) and src.target == aten.expand.default:
            inner, outer = _val(src.args[0]), _val(src)
            if inner is not None and outer is not None and inner.dim() == 5 and inner.shape[2] == 1:
                n_kv, n_rep = int(inner.shape[1]), int(outer.shape[2])
                if n_kv * n_rep == heads:
                    return n_kv, n_rep
    return heads, 1


def _describe_attention(gm: GraphModule) -> str:
    """What attention the graph computes instead of SDPA, for the error message."""
    softmax = [n for n in gm.graph.nodes if n.op == "call_function"
               and n.target in (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)]
    if softmax:
        owners = sorted({owner_fqn(n) or "?" for n in softmax})
        return f"eager attention (matmul + softmax) in {', '.join(owners[:3])}{' ...' if len(owners) > 3 else ''}"
    names = {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "attention" in str(n.target)}
    return f"attention ops {sorted(names)}" if names else "no attention at all"


def _check_no_sdpa(gm: GraphModule, ctx: PassContext) -> None:
    impl = getattr(getattr(ctx.model, "config", None), "_attn_implementation", None)
    raise RewriteError(
        f"prefix tuning found no aten.scaled_dot_product_attention call in the graph; it found "
        f"{_describe_attention(gm)}" + (f" (config attn_implementation={impl!r})" if impl else "") + ". "
        "Load the model with attn_implementation='sdpa' (from_pretrained(..., attn_implementation='sdpa') "
        "or model.set_attn_implementation('sdpa')) or call F.scaled_dot_product_attention in your module."
    )


def _qk_ancestors(sdpas: list[Node]) -> set[Node]:
    """Nodes that feed some SDPA's query or key without passing through another SDPA."""
    seen: set[Node] = set()
    stack = [a for n in sdpas for a in n.args[:2] if isinstance(a, Node)]
    while stack:
        node = stack.pop()
        if node in seen or (node.op == "call_function" and node.target == _SDPA):
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _shift_positions(gm: GraphModule, sdpas: list[Node], tokens: int) -> list[str]:
    """Shift position sources feeding q/k by ``tokens``; returns what was shifted."""
    graph = gm.graph
    seq = {_expr(_val(n.args[0]).shape[-2]) for n in sdpas}
    feeds_qk = _qk_ancestors(sdpas)
    shifted = []
    for node in list(graph.nodes):
        if node not in feeds_qk or node.op != "call_function" or _val(node) is None:
            continue
        val = node.meta["val"]
        counts = (node.target in _ARANGES and val.dim() == 1 and _expr(val.shape[0]) in seq) or (
            node.target == aten.cumsum.default and val.dim() >= 2 and node.args[1] in (1 - val.dim(), val.dim() - 1)
            and _expr(val.shape[-1]) in seq)
        if counts:  # arange(S) or cumsum(mask, seq dim): add P on the edges into q/k
            users = [u for u in node.users if u in feeds_qk]
            with graph.inserting_after(node):
                add = stamp(graph.call_function(aten.add.Tensor, (node, tokens)), _PASS, owner_fqn(node), like=node)
            for u in users:
                u.replace_input_with(node, add)
            kind = "arange" if node.target in _ARANGES else "cumsum along the sequence"
            shifted.append(f"{node.name} ({kind} in {owner_fqn(node) or 'the model'}, +{tokens})")
        elif (node.target == aten.slice.Tensor and node.args[0].op == "get_attr"
              and "position" in node.args[0].target and _expr(node.meta["val"].shape[-1]) in seq):
            dim = node.args[1] if len(node.args) > 1 else 0
            start = node.args[2] if len(node.args) > 2 else 0
            end = node.args[3] if len(node.args) > 3 else None
            if dim not in (-1, node.meta["val"].dim() - 1) or not isinstance(start, int) or end is None:
                continue
            with graph.inserting_before(node):
                new_end = graph.call_function(operator.add, (end, tokens)) if isinstance(end, Node) else end + tokens
            node.args = (node.args[0], dim, start + tokens, new_end, *node.args[4:])
            shifted.append(f"{node.name} ({node.args[0].target}[{tokens}:])")
    return shifted


def _site_info(sdpa: Node) -> dict:
    q, k = sdpa.args[0], sdpa.args[1]
    if _val(q) is None or _val(k) is None or _val(k).dim() != 4:
        raise RewriteError(f"SDPA call {sdpa.name} ({owner_fqn(sdpa)}) has no 4-d key shape; prefix tuning needs "
                           "q/k/v as [batch, heads, seq, head_dim]")
    n_kv, n_rep = _kv_heads(k)
    return {"n_kv": n_kv, "n_rep": n_rep, "head_dim": int(_val(k).shape[-1]), "device": _val(k).device,
            "is_causal": bool(_arg(sdpa, 5, "is_causal", False)), "owner": owner_fqn(sdpa) or "attention"}


def _rewire(gm: GraphModule, sdpa: Node, module_name: str, extra: tuple) -> None:
    """sdpa(q, k, v, mask, ...) -> sdpa(q, k', v', mask', ..., is_causal=False)."""
    graph = gm.graph
    q, k, v = sdpa.args[:3]
    mask = _arg(sdpa, 3, "attn_mask", None)
    with graph.inserting_before(sdpa):
        call = stamp(graph.call_module(module_name, (q, k, v, mask, *extra)), _PASS, module_name, like=sdpa)
        outs = [stamp(graph.call_function(operator.getitem, (call, i)), _PASS, module_name, like=sdpa)
                for i in range(3)]
    for node in (call, *outs):
        node.meta.pop("val", None)
    args = list(sdpa.args)
    args[1], args[2] = outs[0], outs[1]
    kwargs = dict(sdpa.kwargs)
    if len(args) > 3:
        args[3] = outs[2]
    else:
        kwargs["attn_mask"] = outs[2]
    if len(args) > 5:
        args[5] = False
    else:
        kwargs["is_causal"] = False
    sdpa.args, sdpa.kwargs = tuple(args), kwargs
    sdpa.meta[_MARK] = module_name


# after swap_linear: the prefix encoder's own linears are trained, never quantized
@register_pass("prefix", after=("swap_linear",))
def prefix_tuning(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Learned K/V prefixes in front of every SDPA call (positions shifted by P)."""
    spec = ctx.plan.prefix
    tokens = spec.tokens
    graph = gm.graph
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target == _SDPA]
    if not sdpas:
        _check_no_sdpa(gm, ctx)
    if any(_MARK in n.meta for n in sdpas):  # already rewritten: running twice changes nothing
        return PassResult(gm, False)
    sites = [_site_info(n) for n in sdpas]
    shifted = _shift_positions(gm, sdpas, tokens)
    encoder_node = None
    if spec.reparametrize:
        shapes = {(s["n_kv"], s["head_dim"]) for s in sites}
        if len(shapes) != 1:
            raise RewriteError(f"prefix.reparametrize needs every attention call to share (kv heads, head_dim), "
                               f"found {sorted(shapes)}; set reparametrize = false")
        (n_kv, head_dim), = shapes
        enc_name = unique_attr_name(gm, "prefix_encoder")
        set_submodule(gm, enc_name, shared_module(ctx, enc_name, lambda: PrefixEncoder(
            tokens, len(sites), n_kv, head_dim, spec.hidden, device=sites[0]["device"])))
        with graph.inserting_before(sdpas[0]):
            encoder_node = stamp(graph.call_module(enc_name, ()), _PASS, enc_name)
        ctx.note(encoder=enc_name, hidden=spec.hidden, prompt_embeddings=[tokens, len(sites) * 2 * n_kv * head_dim])
    for layer, (sdpa, site) in enumerate(zip(sdpas, sites)):
        name = unique_attr_name(gm, f"{site['owner']}.prefix")
        if encoder_node is None:
            mod = PrefixKV(site["n_kv"], tokens, site["head_dim"], n_rep=site["n_rep"], is_causal=site["is_causal"],
                           device=site["device"])
        else:
            mod = ReparamPrefixKV(layer, len(sites), site["n_kv"], site["head_dim"], n_rep=site["n_rep"],
                                  is_causal=site["is_causal"])
        set_submodule(gm, name, shared_module(ctx, name, lambda mod=mod: mod))
        _rewire(gm, sdpa, name, () if encoder_node is None else (encoder_node,))
        ctx.note(site=sdpa.name, module=name, kv_heads=site["n_kv"], n_rep=site["n_rep"], head_dim=site["head_dim"],
                 tokens=tokens, causal_flag=site["is_causal"])
    ctx.note(positions_shifted=shifted or "none found (no absolute positions feed q/k)")
    return PassResult(gm, True)


def _sites(gm: GraphModule) -> list[tuple[Node, str]]:
    """(SDPA node, prefix module name) in graph order."""
    return [(n, n.meta[_MARK]) for n in gm.graph.nodes if n.op == "call_function" and _MARK in n.meta]


def fold_prefix_encoder(gm: GraphModule) -> GraphModule:
    """Replace the reparametrization MLP by the plain per-call tensors it computes (in place).

    Outputs are unchanged; the new :class:`PrefixKV` parameters are trainable, the encoder is gone.
    Returns ``gm`` (a no-op when it has no :class:`PrefixEncoder`).
    """
    encoders = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(get_attr_value(gm, n.target),
                                                                                    PrefixEncoder)]
    if not encoders:
        return gm
    enc_node = encoders[0]
    encoder = get_attr_value(gm, enc_node.target)
    with torch.no_grad():
        table = encoder()
    for call in list(enc_node.users):
        site = get_attr_value(gm, call.target)
        pk, pv = encoder.layer_kv(table, site.layer)
        set_submodule(gm, call.target, PrefixKV(site.n_kv_heads, pk.shape[1], site.head_dim, n_rep=site.n_rep,
                                                is_causal=site.is_causal, key=pk, value=pv))
        call.args = call.args[:4]
    gm.graph.erase_node(enc_node)
    gm.delete_submodule(enc_node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def prefix_prompt_embeddings(gm: GraphModule) -> torch.Tensor:
    """PEFT's ``prompt_embeddings`` ``[P, L*2*n_kv*D]`` of a compiled module (detached).

    Layout: ``view(P, L*2, n_kv, D)``; index ``2l`` holds call l's keys, ``2l+1`` its values, calls
    in graph order (= layer order). Computed through the encoder when reparametrized.
    """
    sites = _sites(gm)
    if not sites:
        raise RewriteError("this module has no prefix-tuned attention (plan has no prefix section)")
    mods = [get_attr_value(gm, name) for _, name in sites]
    with torch.no_grad():
        if isinstance(mods[0], ReparamPrefixKV):
            enc = next(m for m in gm.modules() if isinstance(m, PrefixEncoder))
            return enc().detach().clone()
        shapes = {(m.n_kv_heads, m.head_dim) for m in mods}
        if len(shapes) != 1:
            raise RewriteError(f"attention calls differ in (kv heads, head_dim): {sorted(shapes)}; PEFT's "
                               "prompt_embeddings layout needs them equal")
        kv = torch.stack([t for m in mods for t in (m.key, m.value)])  # [L*2, n_kv, P, D]
        return kv.permute(2, 0, 1, 3).reshape(kv.shape[2], -1).detach().clone()


def load_prefix_prompt_embeddings(gm: GraphModule, table: torch.Tensor) -> None:
    """Copy a PEFT ``prompt_embeddings`` ``[P, L*2*n_kv*D]`` into the (folded) prefixes of ``gm``."""
    fold_prefix_encoder(gm)
    mods = [get_attr_value(gm, name) for _, name in _sites(gm)]
    n_kv, head_dim, tokens = mods[0].n_kv_heads, mods[0].head_dim, mods[0].tokens
    want = (tokens, len(mods) * 2 * n_kv * head_dim)
    if tuple(table.shape) != want:
        raise RewriteError(f"prompt_embeddings has shape {tuple(table.shape)}, this module expects {want} "
                           f"(P={tokens}, {len(mods)} attention calls, {n_kv} kv heads, head_dim {head_dim})")
    kv = table.view(tokens, len(mods) * 2, n_kv, head_dim).permute(1, 2, 0, 3)
    with torch.no_grad():
        for i, m in enumerate(mods):
            m.key.copy_(kv[2 * i])
            m.value.copy_(kv[2 * i + 1])
