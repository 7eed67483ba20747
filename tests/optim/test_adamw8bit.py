"""peftfx.optim.AdamW8bit: memory, one-step accuracy, training, bad input and torch.optim integration."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from peftfx.errors import CheckpointError, KernelError, PlanError
from peftfx.kernels.blockwise8bit import SIGNED_MAP, UNSIGNED_MAP, dequantize_blockwise
from peftfx.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, optimizer_state_bytes
from tests.optim.quant_bound import quantization_bound


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 8))


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 32, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
def test_state_is_at_most_2_05_bytes_per_param_for_large_tensors(cls):
    params = [nn.Parameter(torch.randn(n)) for n in (4096, 5000, 65536 + 3, 300_000)]
    opt = cls(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:  # measured: every tensor the optimizer holds for p, the step counter included
        per_param = sum(t.numel() * t.element_size() for t in opt.state[p].values()) / p.numel()
        assert per_param <= 2.05, (p.numel(), per_param)
    assert _state_bytes(opt) / sum(p.numel() for p in params) <= 2.05


def test_small_tensors_keep_fp32_state():
    big, small = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(4095))
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert set(opt.state[big]) == {"step", "codes", "absmax"}
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[small]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("name,cls", [("adamw-8bit", AdamW8bit), ("paged-adamw-8bit", PagedAdamW8bit),
                                      ("paged-adamw", PagedAdamW)])
def test_estimate_formula_equals_measured_state_within_2_percent(name, cls):
    model = _mlp()
    opt = cls(model.parameters())
    _step(model, opt, 0)
    estimated = optimizer_state_bytes(list(model.parameters()), name)
    assert abs(estimated - _state_bytes(opt)) <= 0.02 * _state_bytes(opt)


def test_peftfx_estimate_reports_the_8bit_state():
    """``peftfx estimate --optimizer adamw-8bit`` (full fine-tuning of a small model) counts what AdamW8bit holds,
    and ``paged-adamw-8bit`` exists: the same bytes when training on the CPU; on CUDA nothing resident, three
    tensors' state staged during the step."""
    from peftfx.inspect.estimate import estimate

    model = _mlp()
    inputs = (torch.randn(2, 32),)
    opt = AdamW8bit(model.parameters())
    _step(model, opt, 0)
    measured = _state_bytes(opt)
    figure = estimate(model, None, example_inputs=inputs, optimizer="adamw-8bit").before.optimizer_state
    assert abs(figure - measured) <= 0.02 * measured, (figure, measured)
    paged = estimate(model, None, example_inputs=inputs, optimizer="paged-adamw-8bit")
    assert paged.before.optimizer_state == figure
    on_gpu = estimate(model, None, example_inputs=inputs, optimizer="paged-adamw-8bit", train_device="cuda")
    largest = max(sum(t.numel() * t.element_size() for n, t in s.items() if n != "step") for s in opt.state.values())
    assert on_gpu.before.optimizer_state == 0  # in pinned host memory
    assert on_gpu.before.optimizer_transient == 3 * largest  # staged: updating, arriving, leaving


def test_cli_estimate_accepts_every_optimizer_name():
    from peftfx.inspect.cli import build_parser

    for name in ("adamw-8bit", "paged-adamw-8bit", "paged-adamw"):
        assert build_parser().parse_args(["estimate", "m", "--optimizer", name]).optimizer == name


# ---------------------------------------------------------------------------------------------- one step
@given(rows=st.integers(16, 40), cols=st.integers(256, 400), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       step=st.integers(1, 30), wd=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**16))
def test_one_step_equals_fp32_adamw_on_the_dequantized_state_within_the_quantization_bound(rows, cols, dtype, step,
                                                                                          wd, seed):
    """Bound. Let m0, v0 be the dequantized moments before the step (exact fp32 values) and run torch's fp32
    AdamW from (p, m0, v0). AdamW8bit updates the parameter with the unquantized new moments, so the
    parameter differs only by fp32 rounding (a few ulp of the update; the two formulas move eps by
    sqrt(1 - beta2^t)) plus, for bf16, the final rounding to the dtype: <= 1 bf16 ulp. Then it requantizes:
    with a' the new block absmax and x = m / a' lying between map values q_k <= x <= q_{k+1}, nearest
    rounding gives |deq(m) - m| <= a' (q_{k+1} - q_k) / 2, the per-element quantization bound (likewise
    for v with the unsigned map); the signed map stops at -0.993, so an element at -a' is off by 0.007 a'.
    fp32 rounding of m itself adds ~1e-6 relative, covered by 1e-5 slack, except where b1 m0 and
    (1 - b1) g nearly cancel: there a few ulps of those terms, carried through the step, are allowed. Shapes [rows, cols] >= 4096
    elements (8-bit state) with arbitrary tails: the last 256-block is usually short."""
    n = rows * cols
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(rows, cols, generator=g).to(dtype)
    grad = (torch.randn(rows, cols, generator=g) * 1e-2).to(dtype)
    p = nn.Parameter(p0.clone())
    opt = AdamW8bit([p], lr=1e-2, weight_decay=wd)
    p.grad = (torch.randn(rows, cols, generator=g) * 1e-2).to(dtype)
    opt.step()  # a first step fills the state with something non-trivial
    state = opt.state[p]
    state["step"].fill_(step - 1)
    codes, absmax = state["codes"], state["absmax"]
    m0 = dequantize_blockwise(codes[0], absmax[0], SIGNED_MAP).view(rows, cols)
    v0 = dequantize_blockwise(codes[1], absmax[1], UNSIGNED_MAP).view(rows, cols)
    before = p.detach().float().clone()

    ref = nn.Parameter(before.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=wd, foreach=False)
    ref_opt.state[ref] = {"step": torch.tensor(float(step - 1)), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
    ref.grad = grad.float()
    ref_opt.step()
    p.grad = grad
    opt.step()

    update = (ref.detach() - before).abs()
    # m = b1 m0 + (1 - b1) g cancels when the two terms nearly cancel: a few fp32 ulps of the terms
    # (not of m) differ between the two formulas, and the step carries them through lr / (1 - b1^t) / denom
    eps32 = torch.finfo(torch.float32).eps
    denom = (ref_opt.state[ref]["exp_avg_sq"] / (1 - 0.999 ** step)).sqrt() + 1e-8
    cancel = 4 * eps32 * 1e-2 * (0.9 * m0.abs() + 0.1 * grad.float().abs()) / (1 - 0.9 ** step) / denom
    if dtype == torch.float32:
        fp32_ulps = 4 * eps32 * before.abs()
        assert torch.all((p.detach() - ref.detach()).abs() <= 1e-5 * update + fp32_ulps + cancel)
    else:
        ulp = torch.finfo(dtype).eps * ref.detach().abs().clamp_min(1e-30)
        assert torch.all((p.detach().float() - ref.detach()).abs() <= ulp + 1e-5 * update + cancel)
    m_ref, v_ref = (ref_opt.state[ref][k].reshape(-1) for k in ("exp_avg", "exp_avg_sq"))
    g32 = grad.float().reshape(-1)
    # the moments the two optimizers compute differ by a few fp32 ulps of their terms (not of the
    # result, which can cancel), and the nearest code of either may be taken: that much slack on top
    terms = (0.9 * m0.reshape(-1).abs() + 0.1 * g32.abs(), 0.999 * v0.reshape(-1) + 0.001 * g32 * g32)
    for row, qmap, exact in ((0, SIGNED_MAP, m_ref), (1, UNSIGNED_MAP, v_ref)):
        a = state["absmax"][row].repeat_interleave(256)[:n]
        deq = dequantize_blockwise(state["codes"][row], state["absmax"][row], qmap)
        bound = quantization_bound(exact, a, qmap)
        slack = 1e-5 * exact.abs() + 8 * eps32 * terms[row] + 1e-30
        assert torch.all((deq - exact).abs() <= bound * (1 + 1e-5) + slack)


# ---------------------------------------------------------------------------------------------- training
def _fine_tune(make_opt, steps: int = 200) -> float:
    """A small regression with label noise: the loss plateaus at the noise floor, so 1% is meaningful."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.3 * torch.randn(256, 1, generator=g)
    opt = make_opt(model.parameters())
    for s in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


def test_200_step_fine_tune_ends_within_1_percent_of_torch_adamw():
    torch_loss = _fine_tune(lambda p: torch.optim.AdamW(p, lr=3e-3))
    ours = _fine_tune(lambda p: AdamW8bit(p, lr=3e-3))
    assert abs(ours - torch_loss) <= 0.01 * torch_loss, (ours, torch_loss)


def test_paged_variants_on_cpu_are_the_unpaged_ones():
    a, b = _mlp(), _mlp()
    oa, ob = AdamW8bit(a.parameters()), PagedAdamW8bit(b.parameters())
    for s in range(3):
        _step(a, oa, s), _step(b, ob, s)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert all(torch.equal(sa["state"][k][n], sb["state"][k][n]) for n in sa["state"][k])
    c, d = _mlp(), _mlp()
    oc, od = PagedAdamW(c.parameters(), lr=1e-3), torch.optim.AdamW(d.parameters(), lr=1e-3)
    for s in range(3):
        _step(c, oc, s), _step(d, od, s)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(c.parameters(), d.parameters()))
    assert set(oc.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


# ---------------------------------------------------------------------------------------------- bad input
def test_sparse_gradients_are_refused_by_name():
    emb = nn.Embedding(5000, 4, sparse=True)
    opt = AdamW8bit(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(KernelError, match="'weight'.*sparse gradient"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_integer_and_complex_parameters_are_refused_by_name(dtype):
    bad = nn.Parameter(torch.zeros(8, dtype=dtype), requires_grad=False)
    with pytest.raises(KernelError, match=rf"'counts'.*{str(dtype).removeprefix('torch.')}"):
        AdamW8bit([("ok", nn.Parameter(torch.randn(8))), ("counts", bad)])
    opt = AdamW8bit([nn.Parameter(torch.randn(8))])
    with pytest.raises(KernelError, match="parameter #0"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1  # nothing half-added


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(weight_decay=-0.1)])
def test_bad_hyperparameters_are_plan_errors(kwargs):
    with pytest.raises(PlanError):
        AdamW8bit([nn.Parameter(torch.randn(8))], **kwargs)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_naming_the_parameter_and_changes_nothing(bad_value):
    model = _mlp()
    opt = AdamW8bit(model.named_parameters())
    _step(model, opt, 0)
    before_p = [p.detach().clone() for p in model.parameters()]
    before_s = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[2].weight.grad[3, 5] = bad_value
    with pytest.raises(KernelError, match=r"non-finite gradient.*'2\.weight'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_p, model.parameters()))
    after = opt.state_dict()["state"]
    assert all(torch.equal(before_s[k][n], after[k][n]) for k in before_s for n in before_s[k])


def test_skip_nonfinite_warns_skips_and_keeps_states_finite():
    model = _mlp()
    opt = AdamW8bit(model.named_parameters(), skip_nonfinite=True)
    _step(model, opt, 0)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].bias.grad[0] = float("nan")
    with pytest.warns(UserWarning, match=r"skipped the step.*'0\.bias'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for s in opt.state.values():
        assert int(s["step"]) == 1
        assert all(torch.isfinite(t.float()).all() for t in s.values())
    opt.zero_grad()
    _step(model, opt, 1)  # and training continues
    assert all(int(s["step"]) == 2 for s in opt.state.values())


def test_a_huge_but_finite_gradient_is_not_mistaken_for_overflow():
    p = nn.Parameter(torch.zeros(5000))
    opt = AdamW8bit([p])
    p.grad = torch.full((5000,), 1e18)  # g.g overflows fp32 (5e39); every g*g (1e36) is finite
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["absmax"]).all()


def test_a_gradient_whose_square_overflows_is_refused_by_name():
    p = nn.Parameter(torch.zeros(5000))
    opt = AdamW8bit([("huge", p)])
    p.grad = torch.zeros(5000)
    p.grad[7] = 1e20  # finite, but 1e40 is not: the second moment would become Inf
    with pytest.raises(KernelError, match="overflows fp32.*'huge'"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(5000))


# ---------------------------------------------------------------------------------------------- checkpoints
def _trained(cls=AdamW8bit, dtype=torch.float32):
    model = _mlp().to(dtype)
    opt = cls(model.parameters(), lr=1e-3)
    for s in range(3):
        _step(model, opt, s)
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bit_exact_and_training_continues_identically(dtype):
    model, opt = _trained(dtype=dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu")  # a device map location, as when moving GPU -> CPU
    clone = _mlp().to(dtype)
    clone.load_state_dict(saved["model"])
    opt2 = AdamW8bit(clone.parameters(), lr=1e-3)
    opt2.load_state_dict(saved["opt"])
    for k, entry in opt.state_dict()["state"].items():
        for name, t in entry.items():
            other = opt2.state_dict()["state"][k][name]
            assert other.dtype == t.dtype and other.device == t.device and torch.equal(other, t), (k, name)
    _step(model, opt, 7), _step(clone, opt2, 7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))


def test_load_state_dict_places_state_on_the_parameters_device_keeping_dtypes():
    """Loaded onto parameters on another device (here ``meta``: no second real device on this machine), each
    state tensor moves to its parameter's device with its dtype unchanged; torch's default load would cast
    the uint8 codes and the fp32 absmax / moments to a bf16 parameter's dtype. (The bytes themselves travel
    through torch.save / torch.load(map_location=...), tested above.)"""
    model, opt = _trained(dtype=torch.bfloat16)
    sd = opt.state_dict()
    target = _mlp().to(torch.bfloat16).to("meta")
    opt2 = AdamW8bit(target.parameters())
    opt2.load_state_dict(sd)
    for k, p in enumerate(target.parameters()):
        s, src = opt2.state[p], sd["state"][k]
        assert s["step"].device.type == "cpu" and float(s["step"]) == 3.0
        for name, t in s.items():
            if name != "step":
                assert t.device.type == "meta" and t.dtype == src[name].dtype and t.shape == src[name].shape
        assert {n: t.dtype for n, t in s.items() if n != "step"} in (
            {"codes": torch.uint8, "absmax": torch.float32}, {"exp_avg": torch.float32, "exp_avg_sq": torch.float32})


def test_load_state_dict_refuses_a_mismatched_checkpoint_and_loads_nothing():
    model, opt = _trained()
    sd = opt.state_dict()
    sd["state"][2]["codes"] = sd["state"][2]["codes"][:, :-1]
    fresh = AdamW8bit(_mlp().parameters())
    with pytest.raises(CheckpointError, match=r"parameter #2 .*state 'codes' is \(2, 9215\)"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0
    with pytest.raises(CheckpointError, match="keys"):
        AdamW8bit(_mlp().parameters(), min_8bit_size=10**9).load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------------------------------- integration
def test_param_groups_weight_decay_and_lr_scheduler():
    """Each group's lr and weight_decay apply to its own parameters; a scheduler's lr reaches the update."""
    torch.manual_seed(0)
    decayed, plain = nn.Parameter(torch.ones(5000)), nn.Parameter(torch.ones(5000))
    opt = AdamW8bit([{"params": [decayed], "weight_decay": 0.5}, {"params": [plain], "weight_decay": 0.0}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        decayed.grad, plain.grad = torch.zeros(5000), torch.zeros(5000)
        opt.step()
        sched.step()
    # zero gradients: only decoupled decay moves the parameters, by (1 - lr_t * wd) per step, lr 0.1 then 0.05
    assert torch.allclose(decayed.detach(), torch.full((5000,), (1 - 0.1 * 0.5) * (1 - 0.05 * 0.5)))
    assert torch.equal(plain.detach(), torch.ones(5000))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_clip_grad_norm_zero_grad_and_closure():
    model = _mlp()
    opt = AdamW8bit(model.parameters())
    x, y = torch.randn(16, 32), torch.randn(16, 8)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # no gradients: nothing happens
    assert all(int(s["step"]) == 1 for s in opt.state.values())


def test_amp_grad_scaler_unscales_and_skips_overflowing_steps():
    model = _mlp()
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 32), torch.randn(16, 8)
    ref_model = _mlp()
    ref_opt = AdamW8bit(ref_model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.mse_loss(ref_model(x), y).backward()
    ref_opt.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.parameters(), ref_model.parameters()))
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.mse_loss(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GradScaler skips the step itself: our check never fires
        scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0**10


def test_non_contiguous_parameters_update_in_place():
    base = torch.randn(128, 64)
    p = nn.Parameter(base.clone().t())  # a transposed (non-contiguous) parameter
    q = nn.Parameter(base.t().contiguous())
    op, oq = AdamW8bit([p]), AdamW8bit([q])
    g = torch.randn(64, 128)
    p.grad, q.grad = g.clone(), g.clone()
    op.step(), oq.step()
    assert not p.is_contiguous() and torch.equal(p.detach(), q.detach())
    assert math.isclose(float((p.detach() - base.t()).abs().max()), 1e-3, rel_tol=0.05)
