"""Per-token costs of the generation step graph that are not math: no-op nodes, and the op layer around linears.

The step graph runs once per new token, so per-call Python that a training step does not notice is
a few percent of a decode step here (the bench Llama at batch 8: ~45 ms a step, of which ~3.5 ms
was this). Two rewrites, both bit-identical in their results:

**No-op nodes.** ``torch.export`` keeps, for a float32 model, every ``x.to(torch.float32)`` of transformers' code (RMSNorm,
rotary, the attention mask) as an ``aten.to`` node plus an ``aten._assert_tensor_metadata`` check in
front of it. On the compiled training graph they run once per step; the generation step graph runs
once per new token, a few hundred Python-level dispatches of a few microseconds each, for nothing:
``aten.to`` without a change of dtype, device or layout returns its input itself, and the checks
re-assert dtypes the graph was captured with (:mod:`peftfx.compiled_module` already refuses a cast
that would change them).

:func:`drop_no_op_nodes` removes both kinds, using the dtypes export recorded in each node's
``meta["val"]``; a ``to`` that does change anything, or whose input or output has no recorded value,
stays.

**Linears.** A quantized / LoRA linear is a ``call_module`` of :class:`~peftfx.kernels.modules.QLoRALinear`,
whose ``forward`` resolves its compute dtype, checks storage and goes through the
``peftfx::qlora_linear`` custom op (dispatcher, autograd wrapper, backend choice) to
:func:`peftfx.kernels.cpu_gemm.qlora_forward`: ~90 us a call on one core, 28 calls a token in the
bench. :func:`call_linears_directly` makes each such node a call of :func:`step_linear`, which, when
nothing but that math can happen (no autograd, eval mode, the ``cpu`` backend, no hooks on the
layer, contiguous storage), calls :func:`~peftfx.kernels.cpu_gemm.qlora_forward` with exactly the
arguments the op would pass it; otherwise it calls the module, so training, Triton, the reference
backend and every error message stay the module's.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from peftfx.kernels import cpu_gemm
from peftfx.kernels.backend import backend_for
from peftfx.kernels.dtypes import resolve_compute_dtype
from peftfx.kernels.modules import LoRALinear, QLoRALinear

__all__ = ["drop_no_op_nodes", "call_linears_directly", "step_linear"]

_aten = torch.ops.aten
_TO_OPS = (_aten.to.dtype, _aten.to.dtype_layout, _aten.to.device)
_COPYING_KWARGS = ("copy", "memory_format", "non_blocking")


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_identity_to(node: Node) -> bool:
    """An ``aten.to`` that returns its input: same dtype, device and layout, no copy asked for."""
    if node.target not in _TO_OPS or any(node.kwargs.get(k) for k in _COPYING_KWARGS):
        return False
    src, out = _val(node.args[0]), _val(node)
    return (src is not None and out is not None and src.dtype == out.dtype and src.device == out.device
            and src.layout == out.layout)


def _recompiled(gm: GraphModule, changes: int) -> int:
    if changes:
        gm.graph.lint()
        gm.recompile()
    return changes


def drop_no_op_nodes(gm: GraphModule) -> int:
    """Remove identity ``aten.to`` nodes and unused ``_assert_tensor_metadata`` checks; returns how many."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
        elif _is_identity_to(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    return _recompiled(gm, dropped)


def _storage(m: QLoRALinear) -> tuple[Tensor | None, ...]:
    return m.weight, m.weight_scales, m.weight_scales2, m.weight_offset


def step_linear(m: QLoRALinear, x: Tensor) -> Tensor:
    """``m(x)``: the op's own CPU math when only that can happen, else the module (see the module docstring)."""
    if (torch.is_grad_enabled() or m.training or m._forward_hooks or m._forward_pre_hooks
            or backend_for(x) != "cpu" or not all(t is None or t.is_contiguous() for t in _storage(m))):
        return m(x)
    # what peftfx::qlora_linear's cpu branch receives: the weight described with the input's dtype
    weight = m.weight if m.format == "none" else dataclasses.replace(m.quantized_weight(), dtype=x.dtype)
    return cpu_gemm.qlora_forward(x, weight, m.bias, m.lora_A, m.lora_B, float(m.scaling), None,
                                  resolve_compute_dtype(getattr(m, "compute_dtype", None), x.device))


def call_linears_directly(gm: GraphModule) -> int:
    """Turn every ``call_module`` of a QLoRALinear / LoRALinear into ``step_linear(module, x)``; returns how many."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) not in (QLoRALinear, LoRALinear) \
                or len(node.args) != 1 or node.kwargs:
            continue
        with gm.graph.inserting_before(node):
            module = gm.graph.get_attr(node.target)
            direct = gm.graph.call_function(step_linear, (module, node.args[0]))
        direct.meta = dict(node.meta)
        node.replace_all_uses_with(direct)
        gm.graph.erase_node(node)
        changed += 1
    return _recompiled(gm, changed)
