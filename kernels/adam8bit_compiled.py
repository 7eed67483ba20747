"""The 8-bit AdamW update on the CPU as one inductor-compiled kernel per tensor (``torch.compile``).

:func:`adamw8bit_step_cpu_` is what ``peftfx.optim`` calls for CPU tensors. It runs :func:`_fused_update`,
compiled once by inductor (C++/OpenMP), over the tensor's whole 256-element blocks viewed ``[nb, 256]``:
one generated loop over blocks dequantizes both moments of a block (map lookups) into two 256-float local
buffers, takes the new block absmax, writes the parameter and requantizes (code-table lookups), the same ops as
:func:`peftfx.kernels.blockwise8bit.adamw8bit_step_reference` in the same order:

- ``m = fma(g, 1 - b1, map1[c1] * (absmax1 * b1))`` and ``v = fma((1 - b2) g, g, map2[c2] * (absmax2 * b2))``:
  eager ``add_(alpha=)`` and ``addcmul_`` are fused multiply-adds in ATen's vectorized CPU loops (checked in
  tests/optim), so the moments, the absmax and the codes are bit-identical to the eager reference;
- ``p = p * (1 - lr wd) + (-step_size * m) / (sqrt(v) + eps_hat)``: inductor's ``sqrt`` is correctly rounded
  while eager ``torch.sqrt`` on the CPU (MKL's vector math) is not always, so a parameter can differ from
  the eager reference in its last bit (bound in tests/optim/test_compiled_step.py).

A short last block (fewer than 256 elements) and tensors of fewer than two whole blocks run the eager
reference on their slice: blocks are independent, so the split is exact. Hyperparameters travel in a
float32 tensor (rounded as ATen rounds Python scalars), so a learning-rate schedule never recompiles; the
block count is dynamic (``mark_dynamic``), so tensor sizes do not either; a new parameter/gradient dtype
pair compiles once more (inductor's on-disk cache makes later processes fast).

``PEFTFX_OPTIM_COMPILE=0`` selects the eager path (:func:`peftfx.kernels.blockwise8bit.adamw8bit_step_`),
which is also used, with one warning, when compiling fails (no C++ compiler, an inductor error).
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import Tensor

from peftfx.kernels.blockwise8bit import (
    BLOCK, MIN_ABSMAX, AdamWHyper, adamw8bit_step_, adamw8bit_step_reference, tables,
)

__all__ = ["COMPILE_ENV", "compile_enabled", "reset_fallback", "hyper_tensor", "update_moments_and_param_", "sortable_keys",
           "code_words", "codes_as_int32", "adamw8bit_step_compiled_", "adamw8bit_step_cpu_"]

COMPILE_ENV = "PEFTFX_OPTIM_COMPILE"
# inductor bounds-checks every table lookup by default; the indices are in range by construction (uint8 codes
# into 256 entries, the high 16 bits of an int32 key plus 32768 into 65536), and the checks cost ~20%.
# 256-bit vectors (AVX2): each lookup is a per-lane loop over the vector, and 8 lanes ran 5-15% faster than
# AVX-512's 16 in interleaved A/B runs (128-bit was slower)
_INDUCTOR_OPTIONS = {"assert_indirect_indexing": False, "cpp.simdlen": 256}

_state: dict[str, object] = {"compiled": None, "failed": False}


def compile_enabled() -> bool:
    """Whether the CPU update runs compiled: ``$PEFTFX_OPTIM_COMPILE`` is not ``0``, no compile has failed, and
    dynamo is not disabled (``TORCHDYNAMO_DISABLE=1`` would run the graph function uncompiled, where
    ``prims.fma`` rounds twice: the eager path is the faithful one then)."""
    return (os.environ.get(COMPILE_ENV, "1") != "0" and not _state["failed"]
            and os.environ.get("TORCHDYNAMO_DISABLE", "0") != "1")


def reset_fallback() -> None:
    """Forget an earlier failed compile, so the next step tries again (after installing a C++ compiler; tests)."""
    _state["failed"] = False


def hyper_tensor(h: AdamWHyper) -> Tensor:
    """fp32 ``[7]``: beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr wd, -step_size, eps_hat (each computed in
    double and rounded once, as ATen rounds a Python scalar for an fp32 op)."""
    return torch.tensor([h.beta1, 1 - h.beta1, h.beta2, 1 - h.beta2, 1 - h.lr * h.weight_decay, -h.step_size(),
                         h.eps_hat()], dtype=torch.float32)


def update_moments_and_param_(p: Tensor, gf: Tensor, d1: Tensor, d2: Tensor, a1: Tensor, a2: Tensor,
                              hyper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The AdamW arithmetic of :func:`_fused_update` (shared with bench/optim_lookups' variants): the new
    moments ``m, v`` ``[nb, 256]`` from the decoded old ones ``d1, d2`` (map values) and their block absmax
    ``a1, a2`` ``[nb]``, their new absmax ``[nb]``, and ``p`` ``[nb, 256]`` written in place."""
    m = torch.ops.prims.fma(gf, hyper[1], d1 * (a1 * hyper[0])[:, None])
    v = torch.ops.prims.fma(gf * hyper[3], gf, d2 * (a2 * hyper[2])[:, None])
    # max(max|m|, 2**-126) as one reduction (no per-block pointwise node: those would break the block loop)
    new_a1 = torch.clamp_min(m.abs(), MIN_ABSMAX).amax(1)
    new_a2 = torch.clamp_min(v, MIN_ABSMAX).amax(1)
    pf = p.float() * hyper[4] + (hyper[5] * m) / (torch.sqrt(v) + hyper[6])
    # the condition is always true (absmax >= 2**-126); it indexes this node [block, element] like the
    # requantization, so inductor fuses both into the same loop over each block
    p.copy_(torch.where((new_a1 > 0)[:, None], pf, p.float()).to(p.dtype))
    return m, v, new_a1, new_a2


def sortable_keys(m: Tensor, v: Tensor, new_a1: Tensor, new_a2: Tensor) -> tuple[Tensor, Tensor]:
    """int32 keys ``[nb, 256]`` of the normalized moments that order like their float values (the
    code tables are indexed by their high 16 bits)."""
    k1 = (m * (1 / new_a1)[:, None]).view(torch.int32)
    k1 = k1 ^ ((k1 >> 31) & 0x7FFFFFFF)  # sortable key; v >= +0 is its own key
    k2 = (v * (1 / new_a2)[:, None]).view(torch.int32)
    return k1, k2


def code_words(codes: Tensor, whole: int) -> tuple[Tensor, Tensor]:
    """Each moment's first ``whole`` uint8 codes (``codes`` ``[2, n]``) as int32 words ``[whole // 256, 64]``, four
    codes to a word: views, except a row that starts mid-word (row 1 when ``n % 4 != 0``), which is copied."""
    rows = [codes[i, :whole] for i in range(2)]
    rows = [row if row.storage_offset() % 4 == 0 else row.clone() for row in rows]
    return tuple(row.view(torch.int32).view(-1, BLOCK // 4) for row in rows)


def codes_as_int32(words: Tensor) -> Tensor:
    """Codes packed four to an int32 word, ``[nb, 64]`` (:func:`code_words`), unpacked to int32 ``[nb, 256]``.

    Why not ``codes.to(torch.int32)`` on uint8 ``[nb, 256]``: inductor loads 8 uint8 lanes with
    ``Vectorized<uint8_t>::loadu(ptr, 8)``, which copies them into a filled 32-byte stack buffer and reloads it
    whole; that reload misses store forwarding on every vector, a stall of the whole loop (with it the kernel
    took 1.15-1.28x as long at 10M parameters, interleaved A/B in bench/optim_lookups). Here each lane loads
    its word from the cache line and shifts its byte out. Same values, bit for bit.
    """
    nb = words.shape[0]
    expanded = words.unsqueeze(-1).expand(nb, BLOCK // 4, 4).reshape(nb, BLOCK)
    byte = torch.arange(BLOCK, device=words.device, dtype=torch.int32) % 4  # which byte of its word a code is
    shifts = byte * 8 if sys.byteorder == "little" else 24 - byte * 8
    return (expanded >> shifts) & 0xFF


def _fused_update(p: Tensor, g: Tensor, w1: Tensor, w2: Tensor, a1: Tensor, a2: Tensor, maps: Tensor,
                  code_tables: Tensor, hyper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One fused step on whole blocks: ``p`` in place, returns the new ``(c1, c2, a1, a2)``.

    p, g: ``[nb, 256]`` (fp32/bf16/fp16); w1, w2: the codes of the first and second moment as int32 words
    ``[nb, 64]`` (:func:`code_words`); a1, a2: fp32
    ``[nb]``; maps fp32 ``[512]`` and code_tables int32 ``[131072]`` (:func:`peftfx.kernels.blockwise8bit.tables`);
    hyper: :func:`hyper_tensor`. The codes and absmax come back as new tensors (the caller copies them into the
    state): written in place, inductor 2.13 cannot keep ``m`` and ``v`` in per-block local buffers.
    """
    nb = g.shape[0]
    gf = g.float()
    # gather on flat indices: inductor lowers it without negative-index wrapping. int32 -> int64 is vectorized
    d1 = torch.gather(maps, 0, codes_as_int32(w1).reshape(-1).long()).view(nb, BLOCK)
    d2 = torch.gather(maps, 0, (codes_as_int32(w2) + 256).reshape(-1).long()).view(nb, BLOCK)
    m, v, new_a1, new_a2 = update_moments_and_param_(p, gf, d1, d2, a1, a2, hyper)
    k1, k2 = sortable_keys(m, v, new_a1, new_a2)
    t1 = torch.gather(code_tables, 0, ((k1 >> 16) + 32768).reshape(-1).long()).view(nb, BLOCK)
    t2 = torch.gather(code_tables, 0, ((k2 >> 16) + (65536 + 32768)).reshape(-1).long()).view(nb, BLOCK)
    # int32 -> uint8 through fp32 (exact for codes 0..255): vec256 converts int32 -> float -> uint8 in registers but
    # int32 -> uint8 only through the generic stack-buffer fallback
    return ((t1 + k1) >> 16).float().to(torch.uint8), ((t2 + k2) >> 16).float().to(torch.uint8), new_a1, new_a2


def _compiled():
    if _state["compiled"] is None:
        import torch._inductor.inductor_prims  # noqa: F401  (function-level: registers prims.fma, loads inductor)

        _state["compiled"] = torch.compile(_fused_update, dynamic=False, fullgraph=True, options=_INDUCTOR_OPTIONS)
    return _state["compiled"]


def adamw8bit_step_compiled_(p: Tensor, g: Tensor, codes: Tensor, absmax: Tensor, h: AdamWHyper) -> None:
    """The fused update through the compiled kernel, in place (contract of ``blockwise8bit.adamw8bit_step_``).

    Args:
        p: contiguous CPU parameter (fp32/bf16/fp16), ``n`` elements. g: its gradient, same shape, contiguous.
        codes: uint8 ``[2, n]``. absmax: fp32 ``[2, ceil(n / 256)]``.
    """
    pf, gf = p.detach().view(-1), g.view(-1)
    n = pf.numel()
    nb = n // BLOCK
    whole = nb * BLOCK if nb >= 2 else 0  # one block would be specialized by dynamo (size 1): eager does it
    if whole:
        maps, code_tables = tables(p.device)
        views = (pf[:whole].view(nb, BLOCK), gf[:whole].view(nb, BLOCK), *code_words(codes, whole), absmax[0, :nb],
                 absmax[1, :nb])
        for t in views:
            torch._dynamo.mark_dynamic(t, 0)
        new_c1, new_c2, new_a1, new_a2 = _compiled()(*views, maps, code_tables, hyper_tensor(h))
        for state, new in zip((codes[0, :whole], codes[1, :whole], absmax[0, :nb], absmax[1, :nb]),
                              (new_c1.view(-1), new_c2.view(-1), new_a1, new_a2)):
            state.copy_(new)
    if whole < n:
        adamw8bit_step_reference(pf[whole:], gf[whole:], codes[:, whole:], absmax[:, whole // BLOCK:], h)


def adamw8bit_step_cpu_(p: Tensor, g: Tensor, codes: Tensor, absmax: Tensor, h: AdamWHyper) -> None:
    """The CPU update: compiled when :func:`compile_enabled`, else (or if compiling fails, with one warning)
    the eager :func:`peftfx.kernels.blockwise8bit.adamw8bit_step_`. Same arguments, in place."""
    if compile_enabled():
        try:
            adamw8bit_step_compiled_(p, g, codes, absmax, h)
            return
        except Exception as e:  # inductor/C++ compiler missing or failing: compilation runs before any write
            _state["failed"] = True
            warnings.warn(f"peftfx.optim: compiling the CPU 8-bit AdamW update failed ({type(e).__name__}: "
                          f"{str(e)[:200]}); using the eager update (slower, same state). Set {COMPILE_ENV}=0 to "
                          "skip the attempt", RuntimeWarning, stacklevel=3)
    adamw8bit_step_(p, g, codes, absmax, h)
