"""prompt_tuning: a soft prompt ``[P, hidden]`` in front of the token embeddings.

The rewrite, on an exported graph with a dynamic sequence dim S:

1. find the ``aten.embedding`` whose indices come from the ``input_ids`` placeholder (through
   views / reshapes / dtype casts) by data flow, so tied or renamed weights do not matter;
2. concatenate the :class:`~peftfx.kernels.prompt_modules.SoftPrompt` (``prompt_encoder``) in
   front of its output: ``[B, S, hidden] -> [B, P+S, hidden]``;
3. redirect every use of the sequence length to S+P: each ``aten.sym_size`` of an input whose
   value is S gets ``S + P`` everywhere except on the path from ``input_ids`` to the embedding
   (positions, masks, RoPE, views all read those sizes);
4. lengthen the other inputs that carry S: ``attention_mask`` gets P leading ones,
   ``token_type_ids`` zeros, ``labels`` -100 (ignored by the loss, as PEFT does, so a computed
   loss equals PEFT's);
5. slice every output dim of size S back to its last S positions (the prompt sits in front).

This equals running the model on ``inputs_embeds = cat(prompt, embed(input_ids))`` with the
lengthened mask/labels, then slicing (PEFT's semantics, also for BERT's CLS pooling, which then
reads the first prompt token).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from peftfx.errors import RewriteError
from peftfx.graph import get_attr_value, set_submodule, stamp, unique_attr_name
from peftfx.kernels.prompt_modules import SoftPrompt
from peftfx.pass_manager import PassContext, PassResult, register_pass, shared_module
from peftfx.trace import owner_fqn

__all__ = ["prompt_tuning", "prompt_init"]

aten = torch.ops.aten
_PASS = "prompt_tuning"
# ops an index tensor may pass through between the input_ids placeholder and the embedding
_ID_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype, aten.to.device,
           aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
           aten.alias.default, aten.slice.Tensor, aten.expand.default}
# how each sequence-carrying input is lengthened (value of the P leading positions)
_FILL = {"attention_mask": 1, "token_type_ids": 0, "labels": -100, "decoder_attention_mask": None}


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, (torch.Tensor, torch.SymInt)) else None


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else size


def _id_placeholders(gm: GraphModule, ctx: PassContext) -> list[Node]:
    """The ``input_ids`` placeholder and any input export merged with it (the same tensor object)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ex = ctx.example_inputs if isinstance(ctx.example_inputs, dict) else {}
    ids = ex.get("input_ids")
    names = {"input_ids"} | {k for k, v in ex.items() if ids is not None and v is ids}
    found = [n for n in placeholders if n.name in names or n.target in names]
    if not found and placeholders and not ex:  # positional call: the first input is the ids
        found = placeholders[:1]
    return found


def _index_path(emb: Node, sources: set[Node]) -> list[Node] | None:
    """Nodes from an ids placeholder to ``emb``'s indices through view-like ops, or None."""
    node, path = emb.args[1], [emb]
    while isinstance(node, Node):
        path.append(node)
        if node in sources:
            return path
        if node.op != "call_function" or node.target not in _ID_OPS:
            return None
        node = node.args[0]
    return None


def _feeds_embedding(node: Node) -> bool:
    """Whether ``node`` reaches an ``aten.embedding``'s indices (seq2seq labels -> decoder ids)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target == aten.embedding.default and u.args[1] is n:
                return True
            if u not in seen and u.op == "call_function":
                seen.add(u)
                stack.append(u)
    return False


def prompt_init(weight: torch.Tensor, tokens: int, spec, tokenizer=None) -> torch.Tensor:
    """The initial prompt ``[P, hidden]``: random vocabulary rows, or a text's token embeddings.

    Args:
        weight: the token embedding table ``[vocab, hidden]``.
        tokens: P.
        spec: the plan's ``PromptTuningSpec`` (``init``, ``init_text``, ``init_token_ids``).
        tokenizer: a Hugging Face tokenizer, needed for ``init_text`` without ``init_token_ids``.

    Returns:
        ``[P, hidden]`` in fp32: the ids repeated or truncated to P, as PEFT does.
    """
    vocab = weight.shape[0]
    if spec.init == "random":
        ids = torch.randint(0, vocab, (tokens,))
    else:
        ids_list = spec.init_token_ids
        if ids_list is None:
            if tokenizer is None:
                raise RewriteError(f"prompt.init = 'text' with init_text={spec.init_text!r} needs a tokenizer: pass "
                                   "peftfx.compile(..., tokenizer=tok), or give prompt.init_token_ids instead")
            ids_list = tokenizer(spec.init_text, add_special_tokens=False)["input_ids"]
            if not ids_list:
                raise RewriteError(f"prompt.init_text {spec.init_text!r} tokenizes to no tokens")
        bad = [i for i in ids_list if not 0 <= i < vocab]
        if bad:
            raise RewriteError(f"prompt.init_token_ids {bad[:5]} are outside the vocabulary (size {vocab})")
        reps = -(-tokens // len(ids_list))
        ids = torch.tensor((list(ids_list) * reps)[:tokens])
    return weight.detach()[ids.to(weight.device)].float().clone()


def _pad_front(graph, node: Node, dim: int, tokens: int, value) -> Node:
    ndim = _val(node).dim()
    pad = [0, 0] * (ndim - 1 - dim) + [tokens, 0]
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]  # keep the placeholders together
    with graph.inserting_after(last):
        return stamp(graph.call_function(aten.constant_pad_nd.default, (node, pad, value)), _PASS, None, like=node)


# after swap_linear (the soft prompt is trained, never quantized); after prefix_tuning: both widen the
# attention mask and shift positions, and one fixed order keeps the graph the same from run to run
@register_pass("prompt", after=("swap_linear", "prefix_tuning"))
def prompt_tuning(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Soft prompt in front of the embedding fed by ``input_ids``; sequence length S -> S+P; outputs sliced."""
    spec = ctx.plan.prompt
    tokens = spec.tokens
    graph = gm.graph
    if any(n.op == "call_module" and isinstance(get_attr_value(gm, n.target), SoftPrompt) for n in graph.nodes):
        return PassResult(gm, False)  # already rewritten
    sources = set(_id_placeholders(gm, ctx))
    ex = ctx.example_inputs if isinstance(ctx.example_inputs, dict) else {}
    aliased_labels = ex.get("labels") is not None and ex.get("labels") is ex.get("input_ids")
    embeddings = [n for n in graph.nodes if n.op == "call_function" and n.target == aten.embedding.default]
    paths = [(e, p) for e in embeddings if (p := _index_path(e, sources)) is not None]
    if not paths:
        fed = sorted({str(e.args[1]) for e in embeddings})
        raise RewriteError(
            "prompt tuning found no aten.embedding fed by the input_ids input "
            f"(inputs: {[n.name for n in graph.nodes if n.op == 'placeholder']}; embeddings read {fed or 'nothing'}). "
            "Call the model with input_ids (not inputs_embeds) in example_inputs.")
    emb, id_path = paths[0]
    ids = id_path[-1]
    ids_val = _val(ids)
    if ids_val is None or ids_val.dim() < 2:
        raise RewriteError(f"input {ids.name} must be [batch, seq] for prompt tuning")
    seq = ids_val.shape[1]
    if not isinstance(seq, torch.SymInt) or seq.node.expr.is_number:
        raise RewriteError(
            f"the sequence dim of {ids.name} is static ({int(seq)}) in the captured graph; prompt tuning lengthens "
            "it, so it must be dynamic: capture with a sequence length >= 2 in example_inputs and make sure the "
            "model does not specialize it (no shape-dependent branches on the sequence length)")
    s_expr = seq.node.expr
    keep = set(id_path)

    # 1-2: the prompt module after the embedding
    weight = emb.args[0]
    if weight.op != "get_attr":
        raise RewriteError(f"the token embedding {emb.name} reads a computed weight ({weight.name}); prompt init "
                           "needs the table as a parameter")
    table = get_attr_value(gm, weight.target)
    name = unique_attr_name(gm, "prompt_encoder")
    set_submodule(gm, name, shared_module(ctx, name, lambda: SoftPrompt(
        prompt_init(table, tokens, spec, ctx.options.get("tokenizer")).to(table.device))))
    with graph.inserting_after(emb):
        cat = stamp(graph.call_module(name, (emb,)), _PASS, owner_fqn(emb), like=emb)
    cat.meta.pop("val", None)
    emb.replace_all_uses_with(cat, delete_user_cb=lambda u: u is not cat)

    # 3: inputs carrying S get P leading positions (labels: any 2-d token labels not feeding a decoder)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    lengthened, padded_dims = {}, set()
    for ph in placeholders:
        val = _val(ph)
        if not isinstance(val, torch.Tensor) or ph in sources:
            continue
        if ph.name == "labels":  # token labels [B, S] of a decoder-only model (a decoder's labels feed its ids)
            token_labels = val.dim() >= 2 and isinstance(val.shape[1], torch.SymInt)
            dims = [1] if token_labels and not _feeds_embedding(ph) else []
        else:
            dims = [d for d, size in enumerate(val.shape) if _expr(size) == s_expr]
        # export's _guards_fn checks the caller's inputs: it keeps the originals
        users = [u for u in ph.users if u.target != aten.sym_size.int and u.op != "call_module"]
        if not dims or not users:
            continue
        if _FILL.get(ph.name) is None or len(dims) != 1:
            raise RewriteError(
                f"input {ph.name!r} has the sequence length and prompt tuning does not know how to lengthen it "
                f"(it lengthens {sorted(k for k, v in _FILL.items() if v is not None)}); leave it out of the inputs")
        fill = bool(_FILL[ph.name]) if val.dtype == torch.bool else _FILL[ph.name]
        padded = _pad_front(graph, ph, dims[0], tokens, fill)
        for u in users:
            u.replace_input_with(ph, padded)
        lengthened[ph.name] = fill
        padded_dims.add((ph, dims[0]))
    for ph in sources:
        users = [u for u in ph.users if u not in keep and u.target != aten.sym_size.int and u.op != "call_module"]
        if users and not aliased_labels:
            raise RewriteError(f"input {ph.name!r} feeds {users[0].name} besides the token embedding; prompt tuning "
                               "cannot lengthen token ids (compute that from attention_mask instead)")
        if users:  # export merged labels into input_ids (the same tensor object): those uses are the labels
            padded = _pad_front(graph, ph, 1, tokens, -100)
            for u in users:
                u.replace_input_with(ph, padded)
            lengthened[ph.name] = -100

    # 4: every read of a lengthened size (a sym_size of an input) becomes size + P off the ids path
    redirected = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.sym_size.int or node.args[0] not in placeholders:
            continue
        ph, dim = node.args[0], node.args[1]
        dim = dim % _val(ph).dim()
        if not ((ph, dim) in padded_dims or (_val(node) is not None and _expr(node.meta["val"]) == s_expr)):
            continue
        users = [u for u in node.users if u not in keep]
        if not users:
            continue
        with graph.inserting_after(node):
            longer = stamp(graph.call_function(operator.add, (node, tokens)), _PASS, None)
        for u in users:
            u.replace_input_with(node, longer)
        redirected += 1

    # 5: outputs of length S+P keep their last S positions
    out = next(n for n in graph.nodes if n.op == "output")
    sliced = []

    def slice_back(node):
        val = _val(node)
        if not isinstance(node, Node) or not isinstance(val, torch.Tensor):
            return node
        for d, size in enumerate(val.shape):
            if _expr(size) == s_expr:
                with graph.inserting_before(out):
                    node = stamp(graph.call_function(aten.slice.Tensor, (node, d, tokens, 2**63 - 1)), _PASS, None)
                sliced.append(f"{node.args[0].name}[dim {d}]")
        return node

    out.args = (torch.fx.node.map_aggregate(out.args[0], slice_back),)
    ctx.note(module=name, tokens=tokens, embedding=owner_fqn(emb) or emb.name, init=spec.init,
             sequence_reads_redirected=redirected, inputs_lengthened=lengthened, outputs_sliced=sliced)
    return PassResult(gm, True)
