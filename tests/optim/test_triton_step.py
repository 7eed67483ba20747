"""The Triton 8-bit AdamW kernel vs the CPU reference (interpreter on the CPU, natively on a GPU), and its
ahead-of-time compile for sm_80 / sm_90 (shared memory, registers, no spills) without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import given, strategies as st

from peftfx.errors import KernelError
from peftfx.kernels.adam8bit_triton import adamw8bit_step_triton
from peftfx.kernels.blockwise8bit import (
    SIGNED_MAP, UNSIGNED_MAP, AdamWHyper, adamw8bit_step_, dequantize_blockwise, new_state, quantize_blockwise,
)

from tests.kernels.triton_env import DEVICE, INTERPRET, NO_DEVICE, NO_DEVICE_REASON

needs_device = pytest.mark.skipif(NO_DEVICE, reason=NO_DEVICE_REASON)


def _case(n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype)
    grad = (torch.randn(n, generator=g) * 10 ** torch.empty(1).uniform_(-4, 0, generator=g)).to(dtype)
    c1, a1 = quantize_blockwise(torch.randn(n, generator=g) * 1e-2, SIGNED_MAP)
    c2, a2 = quantize_blockwise(torch.rand(n, generator=g) * 1e-4, UNSIGNED_MAP)
    return p, grad, torch.stack([c1, c2]), torch.stack([a1, a2])


@needs_device
@given(n=st.integers(1, 3000), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       wd=st.sampled_from([0.0, 0.01]), step=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_triton_step_matches_the_cpu_reference(n, dtype, wd, step, seed):
    """fp32 math is the CPU path's op for op (tl.fma where torch fuses, div_rn, sqrt_rn), so state bytes are
    equal; the parameter is equal in fp32 and within one ulp of its dtype otherwise (the interpreter rounds
    fp32 -> bf16/fp16 toward zero, CUDA to nearest even)."""
    p, grad, codes, absmax = _case(n, dtype, seed)
    h = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, wd, step)
    ref = [p.clone(), grad, codes.clone(), absmax.clone()]
    adamw8bit_step_(*ref, h)
    got = [t.clone().to(DEVICE) for t in (p, grad, codes, absmax)]
    adamw8bit_step_triton(*got, h)
    got = [t.cpu() for t in got]
    assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
    if dtype == torch.float32:
        assert torch.equal(got[0], ref[0])
    else:
        ulp = torch.finfo(dtype).eps * ref[0].float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert torch.all((got[0].float() - ref[0].float()).abs() <= ulp)


@needs_device
def test_triton_step_refuses_mismatched_state():
    p = torch.randn(1000, device=DEVICE)
    codes, absmax = new_state(999, DEVICE)
    with pytest.raises(KernelError, match="do not fit a parameter of 1000"):
        adamw8bit_step_triton(p, torch.randn_like(p), codes, absmax, AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0, 1))


@needs_device
def test_triton_state_dequantizes_near_the_fp32_moments():
    """From zero state, one step's moments are (1-beta1) g and (1-beta2) g^2, up to the block quantization."""
    g = torch.randn(5000) * 1e-3
    p = torch.randn(5000)
    codes, absmax = new_state(5000)
    t = [p.to(DEVICE), g.to(DEVICE), codes.to(DEVICE), absmax.to(DEVICE)]
    adamw8bit_step_triton(*t, AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.0, 1))
    codes, absmax = t[2].cpu(), t[3].cpu()
    m = dequantize_blockwise(codes[0], absmax[0], SIGNED_MAP)
    v = dequantize_blockwise(codes[1], absmax[1], UNSIGNED_MAP)
    assert torch.allclose(m, 0.1 * g, rtol=0.1, atol=1e-3 * float(g.abs().max()))
    assert torch.allclose(v, 0.001 * g * g, rtol=0.1, atol=1e-3 * float((g * g).max()))


_AOT = r"""
import json, os, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peftfx.kernels import adam8bit_triton as K

scalars = ["beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "decay", "neg_step_size", "eps_hat", "min_absmax"]
out = {}
for dtype in ("bf16",):  # the usual parameter dtype; fp32 differs only in the load/store width
    sig = {"p_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "codes_ptr": "*u8", "absmax_ptr": "*fp32", "maps_ptr": "*fp32",
           "tables_ptr": "*i32", "n": "i32", "nb": "i32", **{s: "fp32" for s in scalars},
           "ROWS": "constexpr", "BLOCK": "constexpr"}
    for cc in (80, 90):
        src = ASTSource(K.adamw8bit_kernel, sig, constexprs={"ROWS": K.ROWS, "BLOCK": 256})
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"enable_fp_fusion": False})
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        os.unlink(f.name)
        line = next(l for l in res.splitlines() if "REG:" in l)
        fields = dict(x.split(":") for x in line.split())
        out[f"{dtype}-sm{cc}"] = {"shared": k.metadata.shared, "warps": k.metadata.num_warps,
                                  "regs": int(fields["REG"]), "local": int(fields["LOCAL"]),
                                  "static_shared": int(fields["SHARED"])}
print(json.dumps(out))
"""


def test_kernel_compiles_ahead_of_time_for_sm80_and_sm90_without_spills():
    """No GPU needed: Triton compiles to a cubin for a named target; cuobjdump reads its resources. A launch
    needs registers * threads <= 64K per SM, no local memory (spills) and shared memory well under 48 KiB."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "cuobjdump" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this Triton build ships no cuobjdump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"bf16-sm80", "bf16-sm90"}
    for target, r in report.items():
        assert r["local"] == 0, f"{target} spills: {r}"
        assert r["regs"] <= 255 and r["regs"] * 32 * r["warps"] <= 65536, f"{target}: {r}"
        assert r["shared"] + r["static_shared"] <= 48 * 1024, f"{target}: {r}"
