"""Block-wise 8-bit optimizer state (Dettmers et al., "8-bit Optimizers via Block-wise Quantization").

A state tensor ``s`` of ``n`` elements is stored as codes (uint8, ``[n]``) and absmax (fp32,
``[ceil(n / 256)]``): block ``b`` holds elements ``[256 b, 256 (b + 1))`` (the last block may be short)
and ``s[i] ~= map[codes[i]] * absmax[i // 256]``. The first moment uses the signed dynamic map, the second
the unsigned one (:func:`peftfx.kernels.formats.dynamic_map`, byte-identical to bitsandbytes').

Rounding is to the nearest map value: ``code(x) = #{k : mid[k] < x}`` with ``mid[k] = (map[k] + map[k+1]) / 2``
(a tie goes down). The oracle computes it with ``torch.searchsorted`` (~40 ns/element on one CPU core); the
fast paths (the CPU update below, the Triton kernel) with one load from a 65536-entry int32 table
(:func:`code_table`) indexed by the high 16 bits of ``x``'s sortable key (its fp32 bits, negatives flipped so
integer order is float order): a bucket of floats sharing those bits holds at most one midpoint (checked when
the table is built), so ``code(x) = (T[bucket] + key) >> 16`` exactly, with no branch and no second load.

State layout of one parameter: ``codes`` uint8 ``[2, n]`` and ``absmax`` fp32 ``[2, ceil(n / 256)]``, row 0 the
first moment (signed map), row 1 the second (unsigned map).

The AdamW step on one tensor (all in fp32; ``bc1 = 1 - beta1**t``, ``bc2 = 1 - beta2**t``)::

    m  = map1[c1] * (absmax1 * beta1) + (1 - beta1) * g
    v  = map2[c2] * (absmax2 * beta2) + (1 - beta2) * g * g
    p  = p * (1 - lr * wd)
    p  = p - (lr * sqrt(bc2) / bc1) * m / (sqrt(v) + eps * sqrt(bc2))      # == torch.optim.AdamW's update
    absmax1' = max(max|m| over the block, 2**-126);  c1' = code1(m * (1 / absmax1'))
    absmax2' = max(max v  over the block, 2**-126);  c2' = code2(v * (1 / absmax2'))

:func:`adamw8bit_step_reference` is the plain oracle; :func:`adamw8bit_step_` the eager CPU path (the same ops,
in cache-sized chunks, into preallocated buffers; the fallback when inductor is off or unavailable);
``adam8bit_compiled`` the CPU product path (these ops compiled by inductor into one loop over blocks);
``adam8bit_triton`` the CUDA kernel.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels.formats import dynamic_map

__all__ = ["BLOCK", "MIN_8BIT_NUMEL", "MIN_ABSMAX", "SIGNED_MAP", "UNSIGNED_MAP", "AdamWHyper", "sortable_bits",
           "code_table", "lookup_codes", "tables", "n_state_blocks", "new_state", "quantize_blockwise",
           "dequantize_blockwise", "adamw8bit_step_reference", "adamw8bit_step_", "adamw32_step_"]

BLOCK = 256  # elements per absmax, as bitsandbytes' blockwise optimizers
MIN_8BIT_NUMEL = 4096  # smaller tensors keep fp32 state, as bitsandbytes (min_8bit_size)
MIN_ABSMAX = 2.0**-126  # smallest normal fp32: 1 / absmax stays finite for an all-zero block
SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)
CHUNK = 1 << 16  # elements per step of the CPU update: its buffers (~2 MiB) stay in a core's L2 (measured best)


def n_state_blocks(numel: int) -> int:
    """Number of 256-element absmax blocks of a tensor of ``numel`` elements."""
    return -(-numel // BLOCK)


def _midpoints(qmap: Tensor) -> Tensor:
    return (qmap[:-1] + qmap[1:]) / 2


def sortable_bits(x: Tensor) -> Tensor:
    """int32 keys ordered like the fp32 values ``x``: ``w ^ ((w >> 31) & 0x7FFFFFFF)`` (negatives flipped)."""
    w = x.float().view(torch.int32)
    return w ^ ((w >> 31) & 0x7FFFFFFF)


def _from_sortable(k: Tensor) -> Tensor:
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).view(torch.float32)  # the transform is its own inverse


def code_table(qmap: Tensor) -> Tensor:
    """int32 ``[65536]`` table with ``code(x) = (T[(k >> 16) + 32768] + k) >> 16``, ``k = sortable_bits(x)``.

    Bucket ``b = k >> 16`` holds the floats with keys ``b << 16 .. (b << 16) | 0xFFFF``. Its codes are
    ``base`` (the code of its smallest member) plus one past the single midpoint inside it, if any: with
    ``t`` the low 16 bits of that midpoint's key (0xFFFF if none), ``code = base + (lo16(k) > t)``, which
    ``(base * 65536 + 0xFFFF - t + lo16(k)) >> 16`` computes without a branch; ``T`` folds ``- (b << 16)`` in
    so that adding the whole key ``k`` adds ``lo16(k)``. Raises if a bucket held two midpoints (the dynamic
    maps' relative spacing exceeds 2**-7, so none does). NaN buckets get 0 (non-finite input is refused).
    """
    mids = _midpoints(qmap.float())
    b = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int64)
    small = _from_sortable((b << 16).to(torch.int32))
    large = _from_sortable(((b << 16) | 0xFFFF).to(torch.int32))
    base = torch.searchsorted(mids, small)
    inside = torch.searchsorted(mids, large) - base  # midpoints m with small <= m < large
    finite = ~(small.isnan() | large.isnan())
    if int(inside[finite].max()) > 1:
        raise KernelError("code_table: a 16-bit bucket holds two midpoints; the map is too fine for this table")
    mid_key = sortable_bits(mids[base.clamp_max(mids.numel() - 1)]).long() & 0xFFFF
    t = torch.where(inside > 0, mid_key, torch.full_like(mid_key, 0xFFFF))
    table = base * 65536 + 0xFFFF - t - (b << 16)
    return torch.where(finite, table, torch.zeros_like(table)).to(torch.int32)


def lookup_codes(k: Tensor, table: Tensor) -> Tensor:
    """Nearest codes (uint8) of the sortable keys ``k`` through ``table`` (:func:`code_table`); any shape."""
    return ((table.to(k.device)[(k.long() >> 16) + 32768] + k) >> 16).to(torch.uint8)


_TABLES: dict[str, tuple[Tensor, Tensor]] = {}


def tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """``(maps fp32 [512], code tables int32 [131072])``: moment 1's (signed) then moment 2's (unsigned), per device.

    Moment ``j`` (0 or 1) reads ``maps[256 j + code]`` and ``code_tables[65536 j + bucket]``.
    """
    key = str(device)
    if key not in _TABLES:
        maps = torch.cat([SIGNED_MAP, UNSIGNED_MAP])
        codes = torch.cat([code_table(SIGNED_MAP), code_table(UNSIGNED_MAP)])
        _TABLES[key] = (maps.to(device), codes.to(device))
    return _TABLES[key]


# ---------------------------------------------------------------------------------------------- oracle
def quantize_blockwise(x: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    """Oracle: ``x`` (any shape, float) -> ``(codes uint8 [numel], absmax fp32 [ceil(numel/256)])``."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.zeros(n_state_blocks(n) * BLOCK, device=flat.device)
    padded[:n] = flat
    absmax = padded.view(-1, BLOCK).abs().amax(1).clamp_min(MIN_ABSMAX)
    scaled = padded.view(-1, BLOCK) * (1 / absmax)[:, None]
    codes = torch.searchsorted(_midpoints(qmap.to(flat.device)), scaled.reshape(-1)[:n].contiguous())
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """Oracle: fp32 ``[numel]`` values ``qmap[codes[i]] * absmax[i // 256]``."""
    n = codes.numel()
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return qmap.to(codes.device)[codes.long()] * scale


class AdamWHyper:
    """The scalars of one AdamW step on one tensor (``step`` counts from 1)."""

    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay", "step")

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int):
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)
        self.weight_decay, self.step = float(weight_decay), int(step)

    def step_size(self) -> float:
        return self.lr * math.sqrt(1 - self.beta2**self.step) / (1 - self.beta1**self.step)

    def eps_hat(self) -> float:
        return self.eps * math.sqrt(1 - self.beta2**self.step)


def new_state(numel: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Zero 8-bit AdamW state of a tensor: ``codes`` uint8 ``[2, numel]`` (row 0 the first moment, row 1 the
    second; code 127 of the signed and code 0 of the unsigned map are 0.0) and ``absmax`` fp32 ``[2, nblocks]``."""
    codes = torch.empty(2, numel, dtype=torch.uint8, device=device)
    codes[0].fill_(int(torch.searchsorted(SIGNED_MAP, torch.tensor(0.0))))
    codes[1].fill_(0)
    return codes, torch.full((2, n_state_blocks(numel)), MIN_ABSMAX, device=device)


def adamw8bit_step_reference(p: Tensor, g: Tensor, codes: Tensor, absmax: Tensor, h: AdamWHyper) -> None:
    """Oracle of the fused update (module docstring), in place on ``p``, ``codes`` [2, n] and ``absmax`` [2, nb]."""
    pf, gf = p.detach().reshape(-1).float(), g.reshape(-1).float()
    m = dequantize_blockwise(codes[0], absmax[0] * h.beta1, SIGNED_MAP)
    m.add_(gf, alpha=1 - h.beta1)
    v = dequantize_blockwise(codes[1], absmax[1] * h.beta2, UNSIGNED_MAP)
    v.addcmul_(gf, gf, value=1 - h.beta2)
    if h.weight_decay:
        pf.mul_(1 - h.lr * h.weight_decay)
    denom = v.sqrt().add_(h.eps_hat())
    pf.addcdiv_(m, denom, value=-h.step_size())
    c1, a1 = quantize_blockwise(m, SIGNED_MAP)
    c2, a2 = quantize_blockwise(v, UNSIGNED_MAP)
    codes.copy_(torch.stack([c1, c2])), absmax.copy_(torch.stack([a1, a2]))
    p.detach().copy_(pf.view_as(p))


def adamw32_step_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: AdamWHyper) -> None:
    """The same update with fp32 state ``m``, ``v`` (tensors under MIN_8BIT_NUMEL), in place."""
    pf = p.detach() if p.dtype == torch.float32 else p.detach().float()
    gf = g if g.dtype == torch.float32 else g.float()
    m.mul_(h.beta1).add_(gf, alpha=1 - h.beta1)
    v.mul_(h.beta2).addcmul_(gf, gf, value=1 - h.beta2)
    if h.weight_decay:
        pf.mul_(1 - h.lr * h.weight_decay)
    pf.addcdiv_(m, v.sqrt().add_(h.eps_hat()), value=-h.step_size())
    if pf is not p:
        p.detach().copy_(pf)


# ---------------------------------------------------------------------------------------------- CPU path
class _Workspace:
    """Preallocated chunk buffers, reused across tensors and steps: ``s`` holds [m; v] of one chunk."""

    def __init__(self, device: torch.device) -> None:
        f32 = dict(device=device, dtype=torch.float32)
        self.s = torch.empty(2 * CHUNK, **f32)
        self.t = torch.empty(2 * CHUNK, **f32)
        self.g = torch.empty(CHUNK, **f32)
        self.p = torch.empty(CHUNK, **f32)
        self.i = torch.empty(2 * CHUNK, dtype=torch.int32, device=device)
        self.a = torch.empty(2, CHUNK // BLOCK, **f32)
        self.a2 = torch.empty(CHUNK // BLOCK, **f32)
        self.betas = torch.empty(2, 1, **f32)
        maps, code_tables = tables(device)
        self.map1, self.map2 = maps[:256], maps[256:]
        # m's buckets run from -32768 (indexed + 32768); v's from 0 index the unsigned table from its middle
        self.table1, self.table2 = code_tables[:65536], code_tables[65536 + 32768:]
        self._views: dict[int, _ChunkViews] = {}

    def views(self, L: int) -> "_ChunkViews":
        """The views of a chunk of ``L`` elements (built once per length: slicing costs a dispatch each)."""
        v = self._views.get(L)
        if v is None:
            if len(self._views) > 64:  # tails of many tensor sizes: keep the cache small
                self._views.clear()
            v = self._views[L] = _ChunkViews(self, L)
        return v


class _ChunkViews:
    """Every workspace view one chunk of ``L`` elements uses (``nb`` blocks, padded to ``Lp = nb * 256``)."""

    def __init__(self, ws: _Workspace, L: int) -> None:
        nb = n_state_blocks(L)
        Lp = nb * BLOCK
        self.nb, self.padded = nb, L != Lp
        self.S = ws.s[:2 * Lp].view(2, Lp)  # [m; v]
        self.Sb = self.S.view(2, nb, BLOCK)
        self.S0, self.S1, self.Sb0 = self.S[0], self.S[1], self.Sb[0]
        self.m, self.v, self.S_tail = self.S[0, :L], self.S[1, :L], self.S[:, L:]
        self.idx = ws.i[:2 * Lp].view(2, Lp)
        self.idx0, self.idx1, self.idx_L, self.idx_tail = self.idx[0], self.idx[1], self.idx[:, :L], self.idx[:, L:]
        self.k = self.S.view(torch.int32)  # sortable keys, in place of [m; v]
        self.k0 = self.k[0]
        self.out = ws.t[:2 * Lp].view(torch.int32).view(2, Lp)  # ws.t is free once p is updated
        self.out0, self.out1, self.out_L = self.out[0], self.out[1], self.out[:, :L]
        self.t, self.g, self.p = ws.t[:L], ws.g[:L], ws.p[:L]
        self.a, self.a0, self.amin = ws.a[:, :nb], ws.a[0, :nb], ws.a2[:nb]
        self.scale = self.a.unsqueeze(2)  # the new absmax [2, nb, 1], broadcast over its blocks


_WORKSPACES: dict[str, _Workspace] = {}


def adamw8bit_step_(p: Tensor, g: Tensor, codes: Tensor, absmax: Tensor, h: AdamWHyper) -> None:
    """The fused update on CPU (module docstring), in place; equals :func:`adamw8bit_step_reference` bit for bit.

    Both moments go through most ops together (one dispatch per op and chunk): the chunk's ``[m; v]`` is one
    ``[2, nb * 256]`` buffer; every workspace view is built once per chunk length (:class:`_ChunkViews`).

    Args:
        p: parameter (fp32/bf16/fp16, contiguous) with ``n`` elements. g: its gradient, same shape, contiguous.
        codes: uint8 ``[2, n]``. absmax: fp32 ``[2, ceil(n / 256)]``.
    """
    pd = p.detach()
    if not pd.is_contiguous() or not g.is_contiguous():
        raise KernelError("adamw8bit_step_: parameter and gradient must be contiguous")
    ws = _WORKSPACES.get(str(p.device))
    if ws is None:
        ws = _WORKSPACES[str(p.device)] = _Workspace(p.device)
    pf, gf = pd.view(-1), g.view(-1)
    decay = 1 - h.lr * h.weight_decay
    step_size, eps_hat = h.step_size(), h.eps_hat()
    fp32_param, fp32_grad = p.dtype == torch.float32, g.dtype == torch.float32
    ws.betas[0], ws.betas[1] = h.beta1, h.beta2
    # per-chunk views of the tensor's own arrays, each list from one call; the old absmax scaled once
    scales = torch.mul(absmax, ws.betas).unsqueeze(2).split(CHUNK // BLOCK, dim=1)
    chunks = zip(gf.split(CHUNK), pf.split(CHUNK), codes.split(CHUNK, dim=1), absmax.split(CHUNK // BLOCK, dim=1),
                 scales)
    for g_c, p_c, codes_c, absmax_c, scale_c in chunks:
        L = g_c.shape[0]
        V = ws.views(L)
        g32 = g_c if fp32_grad else V.g.copy_(g_c)
        # dequantize: [m; v] = [map1; map2][codes] * (absmax * [beta1; beta2])
        V.idx_L.copy_(codes_c)
        if V.padded:  # short last block: code 0 past the end, then zeros (they leave the absmax alone)
            V.idx_tail.zero_()
        torch.index_select(ws.map1, 0, V.idx0, out=V.S0)
        torch.index_select(ws.map2, 0, V.idx1, out=V.S1)
        if V.padded:
            V.S_tail.zero_()
        V.Sb.mul_(scale_c)
        V.m.add_(g32, alpha=1 - h.beta1)
        V.v.addcmul_(g32, g32, value=1 - h.beta2)
        # p = p * (1 - lr wd) - step_size * m / (sqrt(v) + eps_hat)
        p32 = p_c if fp32_param else V.p.copy_(p_c)
        if h.weight_decay:
            p32.mul_(decay)
        p32.addcdiv_(V.m, torch.sqrt(V.v, out=V.t).add_(eps_hat), value=-step_size)
        if not fp32_param:
            p_c.copy_(p32)
        _quantize_into(V, ws, absmax_c, codes_c)


def _quantize_into(V: _ChunkViews, ws: _Workspace, absmax_out: Tensor, codes_out: Tensor) -> None:
    """Block absmax of the chunk's [m; v] (clobbered) into ``absmax_out`` ([2, nb]) and its nearest codes into
    ``codes_out`` ([2, L] uint8)."""
    torch.amax(V.Sb, dim=2, out=V.a)
    torch.amin(V.Sb0, dim=1, out=V.amin)  # max |m| = max(amax, -amin): cheaper than abs() or an inf-norm
    torch.maximum(V.a0, V.amin.neg_(), out=V.a0)
    torch.clamp(V.a, min=MIN_ABSMAX, out=absmax_out)
    torch.reciprocal(absmax_out, out=V.a)
    V.Sb.mul_(V.scale)  # V.scale is V.a viewed [2, nb, 1]
    # sortable key of m in place; v >= +0 already is its own key (it is never -0.0 or NaN)
    torch.bitwise_right_shift(V.k0, 31, out=V.idx0).bitwise_and_(0x7FFFFFFF)
    V.k0.bitwise_xor_(V.idx0)
    torch.bitwise_right_shift(V.k, 16, out=V.idx)
    V.idx0.add_(32768)
    torch.index_select(ws.table1, 0, V.idx0, out=V.out0)
    torch.index_select(ws.table2, 0, V.idx1, out=V.out1)
    V.out.add_(V.k).bitwise_right_shift_(16)
    codes_out.copy_(V.out_L)
