"""Where the compiled CPU 8-bit AdamW update spends its time: variants of its inductor kernel, in isolation.

Each variant is the update on one ``[nb, 256]`` fp32 tensor compiled by inductor with the product's options
(``peftfx.kernels.adam8bit_compiled``), timed interleaved with torch ``AdamW(foreach=True)`` over the same
number of parameters (``[1024, 1024]`` matrices), one thread:

- ``product``: ``adam8bit_compiled._fused_update`` (two 256-entry map lookups to decode, two 65536-entry
  code-table lookups to encode; inductor emits each lookup, and each float->int32 bitcast, as a per-lane
  scalar loop over the vector);
- ``byte-loads``: the product before it read the codes as int32 words (:func:`code_words`): uint8 codes
  loaded 8 lanes at a time, which inductor does through a filled stack buffer whose reload misses store
  forwarding;
- ``direct-converts``: ``byte-loads`` as it was before this bench existed: index ``uint8 -> int64`` and codes
  ``int32 -> uint8`` in one cast each, which vec256 has no vectorized conversion for (a stack-buffer round trip
  per vector); the product goes through int32 and fp32;
- ``arith-decode``: the map values computed with integer and float ops instead of looked up
  (:func:`arith_decode`, bit-identical to both dynamic maps: checked over all 256 codes before timing); it
  reads uint8 codes, so compare it with ``byte-loads`` (on int32 words inductor's vectorizer gave it up: 5x);
- ``vgather`` (``--vgather``): inductor's C++ code generator patched in this process to load ``table[idx]``
  with one AVX2 ``vpgatherdd`` (``at::vec::gather``) instead of the per-lane loop: an experiment, not a
  product path (it patches a private inductor method; inductor's caches are turned off for it);
- ablations that compute wrong values, to price each part: ``no-decode-lookup`` (codes scaled instead of
  looked up), ``no-lookups`` (no lookup at all), ``no-lookups-no-bitcast`` (and codes from a float->int
  conversion instead of the float's bits), ``memory-only`` (``p = p a + g b`` and codes + 1: the traffic).

    python -m bench.optim_lookups [--millions 10 50] [--reps 7] [--vgather] [--out RESULTS.md]
"""
from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch._inductor.inductor_prims  # registers prims.fma, which the variants use

from bench.common import RESULTS, machine_markdown, markdown_table, write_section
from peftfx.kernels import adam8bit_compiled as compiled_mod
from peftfx.kernels.blockwise8bit import (
    BLOCK,
    SIGNED_MAP,
    UNSIGNED_MAP,
    AdamWHyper,
    quantize_blockwise,
    tables,
)

__all__ = ["arith_decode", "main"]

_F32 = np.float32
_LIN_STEP = float(_F32(_F32(1.0) - _F32(0.1)))  # linspace(0.1, 1, n + 1)'s step times n, as fp32 computes it
_LIN_START = float(_F32(0.1))
_DECADES = [float(_F32(10.0 ** (i - 6))) for i in range(7)]  # the fp32 scale of decade i, as torch rounds it


def arith_decode(c: torch.Tensor, signed: bool) -> torch.Tensor:
    """``dynamic_map(signed)[c]`` for uint8 codes ``c`` (any shape) with no table: fp32, bit-identical.

    The map (bitsandbytes' create_dynamic_map) is ``D_i * ((b[j] + b[j+1]) / 2)`` over decades ``i`` with
    ``b = linspace(0.1, 1, n + 1)`` in fp32, ``n = 2**i`` values per sign (``2**(i+1)`` unsigned); linspace
    computes ``b[k] = fma(step, k, 0.1)`` below ``n / 2`` and ``fma(-step, n - k, 1.0)`` above. With
    ``r = |c - 127|`` (signed) or ``c + 1`` (unsigned), ``n`` is the highest power of two <= r and ``j = r - n``.
    Needs ``prims.fma`` compiled (eager prims.fma rounds twice).
    """
    ci = c.to(torch.int32)
    r = (ci - 127).abs() if signed else ci + 1
    t = r | (r >> 1)
    t = t | (t >> 2)
    t = t | (t >> 4)
    if not signed:
        t = t | (t >> 8)
    n = (t + 1) >> 1
    nf, jf = n.float(), (r - n).float()
    step, half = _LIN_STEP / nf, nf * 0.5
    lo, one = torch.tensor(_LIN_START), torch.tensor(1.0)

    def bound(k: torch.Tensor) -> torch.Tensor:
        return torch.where(k < half, torch.ops.prims.fma(step, k, lo), torch.ops.prims.fma(-step, nf - k, one))

    mean = (bound(jf) + bound(jf + 1)) * 0.5
    first = 0 if signed else 1  # decade i holds n = 2**(i + first) values per sign
    scale = torch.full_like(mean, _DECADES[0])
    for i in range(1, 7):
        scale = torch.where(n >= 2 ** (i + first), _DECADES[i], scale)
    v = scale * mean
    v = torch.where(r == (128 if signed else 256), 1.0, v)
    v = torch.where(r == (0 if signed else 1), 0.0, v)
    return torch.where(ci < 127, -v, v) if signed else v


def _variant(decode: str, encode: str, direct_converts: bool = False, words: bool = True) -> Callable:
    """The update with the decode ``lookup|arith|none`` and the encode ``lookup|none|float``; with ``words`` the
    codes come as int32 words (the product's :func:`code_words`), else as uint8; with ``direct_converts`` the
    index is ``uint8 -> int64`` and the codes ``int32 -> uint8`` in one cast each (the product before it went
    through int32 / fp32: no vectorized ATen conversion exists for those pairs)."""

    def to_codes(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.uint8) if direct_converts else x.float().to(torch.uint8)

    def to_index(c: torch.Tensor, offset: int) -> torch.Tensor:
        return c.reshape(-1).long() + offset if direct_converts else (c.reshape(-1).to(torch.int32) + offset).long()

    def update(p, g, c1, c2, a1, a2, maps, code_tables, hyper):
        nb = g.shape[0]
        gf = g.float()
        if words:
            c1, c2 = compiled_mod.codes_as_int32(c1), compiled_mod.codes_as_int32(c2)
        if decode == "lookup":
            d1 = torch.gather(maps, 0, to_index(c1, 0)).view(nb, BLOCK)
            d2 = torch.gather(maps, 0, to_index(c2, 256)).view(nb, BLOCK)
        elif decode == "arith":
            d1, d2 = arith_decode(c1, True), arith_decode(c2, False)
        else:
            d1, d2 = (c1.to(torch.int32) - 127).float() * (1 / 127), c2.float() * (1 / 255)
        m, v, new_a1, new_a2 = compiled_mod.update_moments_and_param_(p, gf, d1, d2, a1, a2, hyper)
        if encode == "float":
            q1 = (m * (127 / new_a1)[:, None]).to(torch.int32) + 127
            q2 = (v * (255 / new_a2)[:, None]).to(torch.int32)
            return to_codes(q1), to_codes(q2), new_a1, new_a2
        k1, k2 = compiled_mod.sortable_keys(m, v, new_a1, new_a2)
        if encode == "lookup":
            t1 = torch.gather(code_tables, 0, ((k1 >> 16) + 32768).reshape(-1).long()).view(nb, BLOCK)
            t2 = torch.gather(code_tables, 0, ((k2 >> 16) + (65536 + 32768)).reshape(-1).long()).view(nb, BLOCK)
        else:
            t1, t2 = k1 >> 3, k2 >> 3
        return to_codes((t1 + k1) >> 16), to_codes((t2 + k2) >> 16), new_a1, new_a2

    return update


def _memory_only(p, g, c1, c2, a1, a2, maps, code_tables, hyper):
    p.copy_(p * hyper[4] + g * hyper[5])
    return c1 + 1, c2 + 1, a1 + 1, a2 + 1


def _compile(fn: Callable, name: str) -> Callable:
    """``fn`` compiled as the product compiles its update; a fresh code object per variant (dynamo caches per
    code object)."""
    clone = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__,
                               fn.__closure__)
    return torch.compile(clone, dynamic=False, fullgraph=True, options=compiled_mod._INDUCTOR_OPTIONS)


_VGATHER = {"on": False}


def _install_vgather() -> None:
    """Patch inductor's CppVecKernel so a vectorized ``table[idx]`` load of fp32/int32 (one int64 index vector,
    8 lanes) becomes ``at::vec::gather<4>`` while ``_VGATHER['on']``; everything else is unchanged."""
    from torch._inductor.codegen import cpp
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    original = cpp.CppVecKernel._load_or_store_non_contiguous

    def load(self, var, index, dtype, buffer=None, store_value=None, accu_store=False):
        syms = [s for s in index.free_symbols if symbol_is_type(s, SymT.TMP)]
        if (_VGATHER["on"] and var is not None and store_value is None and self._load_mask is None
                and dtype in (torch.float32, torch.int32) and len(syms) == 1 and index == syms[0]
                and self.tiling_factor == 8):
            idx = self.cse.varname_map[syms[0].name]
            if idx.is_vec and idx.dtype == torch.int64:
                line = (f"at::vec::gather<4>(reinterpret_cast<const float*>({var}), "
                        f"at::vec::convert<int32_t,1,int64_t,2>({idx}))")
                if dtype == torch.int32:
                    line = f"at::vec::cast<int32_t>({line})"
                out = self.cse.generate(self.loads if buffer is None else buffer, line, dtype=dtype)
                out.is_vec = True
                return out
        return original(self, var, index, dtype, buffer, store_value, accu_store)

    cpp.CppVecKernel._load_or_store_non_contiguous = load


def _with_vgather(fn: Callable) -> Callable:
    """``fn`` compiled and run with the patch on and inductor's caches off (the patched kernel must not be
    served from, or stored as, the product's cache entry)."""
    from torch._inductor import config

    def run(*args):
        _VGATHER["on"] = True
        try:
            with config.patch(force_disable_caches=True):
                return fn(*args)
        finally:
            _VGATHER["on"] = False
    return run


def _check_arith_decode() -> None:
    codes = torch.arange(256, dtype=torch.uint8).repeat(2, 1)
    for signed, qmap in ((True, SIGNED_MAP), (False, UNSIGNED_MAP)):
        got = torch.compile(lambda c, s=signed: arith_decode(c, s), fullgraph=True, dynamic=False)(codes)
        if not torch.equal(got.view(torch.int32), qmap.expand(2, 256).view(torch.int32)):
            raise AssertionError(f"arith_decode(signed={signed}) differs from the dynamic map")


def _inputs(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    nb = n // BLOCK
    c1, a1 = quantize_blockwise(torch.randn(nb * BLOCK, generator=g) * 1e-3, SIGNED_MAP)
    c2, a2 = quantize_blockwise(torch.rand(nb * BLOCK, generator=g) * 1e-6, UNSIGNED_MAP)
    ts = [torch.randn(nb, BLOCK, generator=g), torch.randn(nb, BLOCK, generator=g) * 1e-3,
          c1.view(nb, BLOCK), c2.view(nb, BLOCK), a1, a2]
    for t in ts:
        torch._dynamo.mark_dynamic(t, 0)  # as the product: one kernel for every block count
    return ts


_BYTE_VARIANTS = ("byte-loads", "direct-converts", "arith-decode", "memory-only")  # they take uint8 codes, the others int32 words


def _as_taken(name: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``inputs`` (uint8 codes) as variant ``name`` takes them: every variant but the byte-loading ones reads
    the codes as int32 words, as the product does (:func:`peftfx.kernels.adam8bit_compiled.code_words`)."""
    if name in _BYTE_VARIANTS:
        return inputs
    words = [c.view(torch.int32) for c in inputs[2:4]]
    for w in words:
        torch._dynamo.mark_dynamic(w, 0)
    return [*inputs[:2], *words, *inputs[4:]]


def _check_same(variants: dict[str, Callable], inputs: list[torch.Tensor], *tables_hyper: torch.Tensor) -> None:
    """The variants that claim the product's results (byte-loads, direct-converts, arith-decode, vgather) give
    them bit for bit."""
    want_p = inputs[0].clone()
    torch._dynamo.mark_dynamic(want_p, 0)  # no static recompile
    want = variants["product"](*_as_taken("product", [want_p, *inputs[1:]]), *tables_hyper)
    for name in ("byte-loads", "direct-converts", "arith-decode", "vgather"):
        if name in variants:
            p = inputs[0].clone()
            torch._dynamo.mark_dynamic(p, 0)
            got = variants[name](*_as_taken(name, [p, *inputs[1:]]), *tables_hyper)
            if not (torch.equal(p, want_p) and all(torch.equal(a, b) for a, b in zip(got, want))):
                raise AssertionError(f"variant {name} does not reproduce the product's update")


def run(millions: float, reps: int, vgather: bool) -> list[list[object]]:
    count = max(1, round(millions * 1e6 / 2**20))
    n = count * 2**20
    maps, code_tables = tables(torch.device("cpu"))
    hyper = compiled_mod.hyper_tensor(AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.01, 10))
    variants = {"product": _compile(compiled_mod._fused_update, "product"),
                "byte-loads": _compile(_variant("lookup", "lookup", words=False), "byte_loads"),
                "direct-converts": _compile(_variant("lookup", "lookup", True, words=False), "direct_converts"),
                "arith-decode": _compile(_variant("arith", "lookup", words=False), "arith_decode_update")}
    if vgather:
        variants["vgather"] = _with_vgather(_compile(compiled_mod._fused_update, "vgather_update"))
    variants.update({"no-decode-lookup": _compile(_variant("none", "lookup"), "no_decode_lookup"),
                     "no-lookups": _compile(_variant("none", "none"), "no_lookups"),
                     "no-lookups-no-bitcast": _compile(_variant("none", "float"), "no_bitcast"),
                     "memory-only": _compile(_memory_only, "memory_only")})
    inputs = _inputs(n)
    fns: dict[str, Callable[[], object]] = {}
    for name, fn in variants.items():
        args = [t.clone() for t in inputs]
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
        args = _as_taken(name, args)
        fns[name] = lambda fn=fn, args=args: fn(*args, maps, code_tables, hyper)
    params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adamw = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    fns["torch AdamW(foreach)"] = adamw.step
    for fn in fns.values():  # compiles, then one warm-up call each
        fn()
        fn()
    _check_same(variants, inputs, maps, code_tables, hyper)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    base, product = med["torch AdamW(foreach)"], med["product"]
    return [[f"{count}M", name, s * 1e3, s / base, s / product] for name, s in med.items()]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--millions", type=float, nargs="+", default=[10])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--vgather", action="store_true", help="also time the patched-inductor vpgatherdd variant")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _check_arith_decode()
    if args.vgather:
        _install_vgather()
    rows = []
    for millions in args.millions:
        rows += run(millions, args.reps, args.vgather)
    table = markdown_table(["params", "variant", "ms (median)", "/ torch AdamW", "/ product"], rows)
    print(table)
    body = (f"## optim_lookups (cpu): the compiled 8-bit AdamW kernel's variants, in isolation\n\n"
            f"{machine_markdown()}\nMedian of {args.reps} interleaved rounds, one thread, one [nb, 256] tensor per "
            "variant against torch AdamW(foreach) over the same parameter count (bench/optim_lookups.py's "
            "docstring says what each variant is; the ablations compute wrong values and only price a part). "
            "The machine is shared: other jobs ran (load average above).\n\n" + table)
    write_section("optim_lookups", body, args.out)
    return body


if __name__ == "__main__":
    main()
