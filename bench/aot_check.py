"""Compile every fused-kernel launch for sm_80 and sm_90 without a GPU and check that it can launch.

    python -m bench.aot_check --json OUT.json [--subset default|wide|full] [--results bench/RESULTS.md]
    python -m bench.aot_check --triton-venv /tmp/t36 --subset default --json OUT36.json
    python -m bench.aot_check --subset full --jobs 2 --budget-s 5400 --json OUT.json   # stops, lists the rest

Writes one object per compiled case (keys: kernel, target, dtype, format, double_quant, M, N, K, r,
direction, config, shared_bytes, spill_bytes, registers, mma, fits, plus the model estimate and static
per-element numbers) and, with ``--results``, the section ``aot_check_<subset>_triton<version>`` of
bench/RESULTS.md. Exit code 1 when a case
breaks a rule: shared memory over the target's limit, spills on a bf16/fp16 path, or no tensor-core MMA
in the main loop (the base product).

Subsets (cases x configs surviving pruning; compiles are cached under ``$PEFTFX_AOT_CACHE``):

- ``default``: the representative cases of the test suite (the tightest keys: NF4 + double quant on
  A100 at M = 4096, decode M = 1, fp32, every format once, r = 128; each kernel on each target);
- ``wide``: every kernel, dtype, format, double quant, M and target at N = K = 4096, r = 16 (620
  cases, 536 distinct compiles, ~40 CPU-minutes cold);
- ``full``: additionally r in {8, 64, 128} and (N, K) in {(4096, 11008), (11008, 4096)} (issue 19's
  whole grid: 7440 cases, 3560 distinct compiles, ~2 hours wall with --jobs 2 on two busy cores).

Cases are deduplicated by their real specialisation key (``aot_cases.case_key``) and compiled in
:func:`priority` order; ``--budget-s`` stops starting compiles after that many seconds and the cases
left out are written to ``OUT.not_run.json`` and named in the RESULTS section.

``--triton-venv DIR`` reruns this command under ``DIR/bin/python`` (another Triton version); the venv
must import torch and triton; peftfx is imported from this working tree through a shim path.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def subset(name: str):
    from peftfx.kernels import aot_cases as ac

    if name == "default":
        out = []
        out += ac.cases(targets=("sm_80",), dtypes=("bf16",), formats=(("nf4", True),), ranks=(16,), ms=(4096,),
                        nks=((4096, 4096),))
        out += ac.cases(targets=("sm_90",), dtypes=("bf16",), formats=(("nf4", True),), ranks=(16,), ms=(1,),
                        nks=((4096, 4096),), kernels=("gemv",))
        out += ac.cases(targets=("sm_90",), dtypes=("fp32",), formats=(("nf4", True),), ranks=(16,), ms=(4096,),
                        nks=((4096, 4096),), kernels=("forward",))
        out += ac.cases(targets=("sm_80",), dtypes=("fp16",), formats=(("int8-zeropoint", False),), ranks=(128,),
                        ms=(16,), nks=((4096, 11008),), kernels=("gemv",))
        out += ac.cases(targets=("sm_90",), dtypes=("bf16",), formats=(("llm-int8", False), ("none", False)),
                        ranks=(16,), ms=(4096,), nks=((4096, 4096),), kernels=("forward",))
        # dx on H100/H200 at the widest LoRA epilogue: the key where ptxas once spilled (spills_with_rank)
        out += ac.cases(targets=("sm_90",), dtypes=("bf16",), formats=(("none", False),), ranks=(128,), ms=(1,),
                        nks=((4096, 4096),), kernels=("dx",))
        return out
    if name == "wide":
        return ac.cases(ranks=(16,), nks=((4096, 4096),))
    if name == "full":
        return ac.cases()
    raise SystemExit(f"unknown subset {name!r}; expected default, wide or full")


def violations(rec: dict) -> list[str]:
    """The rules of issue 19 that record ``rec`` breaks."""
    out = []
    if not rec["fits"]:
        out.append(f"shared {rec['shared_bytes']} B / {rec['registers']} registers do not fit {rec['target']}")
    if rec["dtype"] in ("bf16", "fp16") and rec["spill_bytes"]:
        out.append(f"spills {rec['spill_bytes']} B")
    if not rec["mma"]:
        out.append("no tensor-core MMA")
    elif not rec.get("loop_mma"):  # the LoRA epilogue's dot alone would put mma in the PTX
        out.append("no tensor-core MMA in the main loop (the base product)")
    return out


def _table(records: list[dict], elapsed: float) -> str:
    """Markdown for bench/RESULTS.md: per kernel/target/dtype the worst config, and compile times."""
    import triton

    groups = defaultdict(list)
    for r in records:
        groups[(r["kernel"], r["target"], r["dtype"], r["format"] + ("+dq" if r["double_quant"] else ""))].append(r)
    lines = [
        f"## Ahead-of-time compile check (Triton {triton.__version__}, no GPU): {len(records)} cases, "
        f"{sum(not violations(r) for r in records)} pass; {elapsed:.0f} s wall (cached compiles are free)", "",
        "Per kernel / target / dtype / format: the configs that survive pruning (any M, N, K, r of the sweep), "
        "max shared memory and registers over them, spills, MMA kind, loop SASS instructions per decoded "
        "weight element (per thread, hottest loop, MMA included), and the mean compile time of one config.", "",
        "| kernel | target | dtype | format | configs | max shared B | limit B | max regs | spill B | mma "
        "| instr/elem | compile s | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    from peftfx.kernels.triton_aot import TARGETS

    for (kernel, target, dtype, fmt), rs in sorted(groups.items()):
        cfgs = sorted({(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])
                       for c in (r["config"] for r in rs)})
        cfg_txt = " ".join("x".join(map(str, c[:3])) + f"w{c[3]}s{c[4]}" for c in cfgs)
        lines.append(
            f"| {kernel} | {target} | {dtype} | {fmt} | {cfg_txt} | {max(r['shared_bytes'] for r in rs)} "
            f"| {TARGETS[target].shared_limit} | {max(r['registers'] for r in rs)} "
            f"| {max(r['spill_bytes'] for r in rs)} | {'/'.join(sorted({r['mma'] for r in rs}))} "
            f"| {min(r['loop_instructions_per_w_element'] for r in rs)}-"
            f"{max(r['loop_instructions_per_w_element'] for r in rs)} "
            f"| {sum(r['compile_s'] for r in rs) / len(rs):.1f} | {'yes' if not any(map(violations, rs)) else 'NO'} |")
    return "\n".join(lines) + "\n"


def _records_table(records: list[dict]) -> str:
    """One row per compiled case: the registers and shared memory of every candidate config."""
    lines = ["| kernel | target | dtype | format | M | N | K | r | config | shared B | regs | spill B | mma "
             "| instr/elem | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        c = r["config"]
        lines.append(f"| {r['kernel']} | {r['target']} | {r['dtype']} | {r['format']}{'+dq' if r['double_quant'] else ''} "
                     f"| {r['M']} | {r['N']} | {r['K']} | {r['r']} | {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} "
                     f"w{c['num_warps']} s{c['num_stages']} sub{c['SUB']} split{c['SPLIT_K']} | {r['shared_bytes']} "
                     f"| {r['registers']} | {r['spill_bytes']} | {r['mma']} | {r['loop_instructions_per_w_element']} "
                     f"| {r['compile_s']} |")
    return "\n".join(lines) + "\n"


def _run_in_venv(venv: str, argv: list[str]) -> int:
    """Rerun this module under ``venv``'s python with peftfx importable from this tree."""
    shim = Path(tempfile.mkdtemp()) / "shim"
    (shim / "peftfx").mkdir(parents=True)
    for f in (ROOT / "rewriter").iterdir():
        (shim / "peftfx" / f.name).symlink_to(f)
    (shim / "peftfx" / "kernels").symlink_to(ROOT / "kernels")
    (shim / "peftfx" / "passes").symlink_to(ROOT / "passes")
    env = dict(os.environ, PYTHONPATH=f"{shim}:{ROOT}", TRITON_INTERPRET="0")
    return subprocess.call([f"{venv}/bin/python", "-m", "bench.aot_check", *argv], cwd=ROOT, env=env)


def priority(case) -> tuple:
    """Sweep order, most informative first, so a run stopped by ``--budget-s`` has compiled the cases that
    matter: the wide grid (r = 16, N = K = 4096), then r = 128 (the largest epilogue), 64, 8; within each,
    N = K = 4096 before the 11008 shapes, bf16 before fp16 and fp32."""
    from peftfx.kernels.aot_cases import DTYPES

    rank = {16: 1, 128: 2, 64: 3, 8: 4}.get(case.r, 5)
    square = (case.N, case.K) == (4096, 4096)
    return (0 if case.r == 16 and square else rank, not square, DTYPES.index(case.dtype), case.target)


def _compile_one(case) -> None:
    from peftfx.kernels.aot_cases import compile_case

    compile_case(case)


def compile_distinct(todo: list, jobs: int, budget_s: float | None, no_cache: bool) -> tuple[int, int]:
    """Compile each distinct compilation of ``todo`` once (priority order, ``jobs`` processes), until
    ``budget_s`` seconds have passed; returns (distinct compiles, compiles started)."""
    from concurrent.futures import ProcessPoolExecutor, wait
    import multiprocessing

    from peftfx.kernels.aot_cases import case_key, compile_case

    distinct: dict[str, object] = {}
    for c in sorted(todo, key=priority):
        distinct.setdefault(case_key(c), c)
    order = list(distinct.values())
    deadline = time.perf_counter() + budget_s if budget_s is not None else float("inf")
    started = 0
    if jobs <= 1:
        for c in order:
            if time.perf_counter() >= deadline:
                break
            compile_case(c, use_cache=not no_cache)
            started += 1
            if started % 50 == 0:
                print(f"[{started}/{len(order)} distinct compiles] {c}", flush=True)
        return len(order), started
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = set()
        it = iter(order)
        while True:
            while len(pending) < 2 * jobs and time.perf_counter() < deadline:
                c = next(it, None)
                if c is None:
                    break
                pending.add(pool.submit(_compile_one, c))
                started += 1
            if not pending:
                break
            done, pending = wait(pending, timeout=5, return_when="FIRST_COMPLETED")
            for f in done:
                f.result()
            if started % 50 == 0 and done:
                print(f"[{started}/{len(order)} distinct compiles]", flush=True)
    return len(order), started


def _not_run_summary(missing: list) -> str:
    groups = defaultdict(int)
    for c in missing:
        groups[(c.r, f"{c.N}x{c.K}", c.dtype)] += 1
    return "; ".join(f"r={r} N x K={nk} {dt}: {n}" for (r, nk, dt), n in sorted(groups.items()))


def decode_cases() -> list:
    """The cases of the decode before/after table: NF4 + double quant (bf16; fp16 FP4 once), r = 16,
    N = K = 4096, the first candidate config of each kernel and target at M = 4096 and M = 1."""
    from peftfx.kernels import aot_cases as ac

    out = []
    for fmt, dtype in ((("nf4", True), "bf16"), (("fp4", False), "fp16")):
        for target in ("sm_90", "sm_80"):
            for m in (4096, 1):
                seen = set()
                for c in ac.cases(targets=(target,), dtypes=(dtype,), formats=(fmt,), ranks=(16,), ms=(m,),
                                  nks=((4096, 4096),)):
                    if c.kernel not in seen and (dtype == "bf16" or c.kernel != "dx"):
                        seen.add(c.kernel)
                        out.append(c)
    return out


def decode_compare() -> str:
    """Markdown: loop SASS instructions per decoded weight element, select tree (ASM_DECODE=False, the
    interpreter's decode) vs inline-PTX prmt decode (what a GPU launch compiles), same configs."""
    from peftfx.kernels.aot_cases import compile_case

    lines = ["| kernel | target | dtype | format | M | config | tree instr/elem | prmt instr/elem | ratio "
             "| regs tree -> prmt | shared B | spill B (prmt) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in decode_cases():
        tree, asm = compile_case(c, asm_decode=False), compile_case(c, asm_decode=True)
        cfg = "x".join(map(str, c.config[:3])) + f" w{c.config[3]} s{c.config[4]}"
        t, a = tree["loop_instructions_per_w_element"], asm["loop_instructions_per_w_element"]
        lines.append(f"| {c.kernel} | {c.target} | {c.dtype} | {c.format}{'+dq' if c.double_quant else ''} | {c.M} "
                     f"| {cfg} | {t} | {a} | {a / t:.2f} | {tree['registers']} -> {asm['registers']} "
                     f"| {asm['shared_bytes']} | {asm['spill_bytes']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the case records here")
    ap.add_argument("--subset", default="default", choices=("default", "wide", "full"))
    ap.add_argument("--results", help="write the summary as a section of this markdown file (bench/RESULTS.md)")
    ap.add_argument("--dtypes", help="comma-separated dtypes to keep (e.g. bf16): run a subset in parts")
    ap.add_argument("--triton-venv", help="run under this venv's python (another Triton version)")
    ap.add_argument("--no-cache", action="store_true", help="recompile even when cached")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--budget-s", type=float, help="stop starting compiles after this many seconds (0: report "
                    "only what the cache holds); cases left out are listed in OUT.not_run.json")
    ap.add_argument("--decode-compare", action="store_true", help="only write the select-tree vs inline-PTX "
                    "decode table (section aot_decode_sass_triton<version> with --results)")
    args = ap.parse_args(argv)
    if args.decode_compare:
        import triton

        from bench.common import write_section

        table = decode_compare()
        print(table)
        if args.results:
            write_section(f"aot_decode_sass_triton{triton.__version__}",
                          f"### Decode instructions per element, select tree vs prmt (Triton {triton.__version__})\n\n"
                          + table, Path(args.results))
        Path(args.json).write_text(json.dumps({"table": table}))
        return 0
    if args.triton_venv:
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = rest.index("--triton-venv")
        return _run_in_venv(args.triton_venv, rest[:i] + rest[i + 2:])
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("aot_check compiles for real GPUs: run it with TRITON_INTERPRET unset or 0")
    from peftfx.kernels.aot_cases import compile_case

    todo = subset(args.subset)
    if args.dtypes:
        todo = [c for c in todo if c.dtype in args.dtypes.split(",")]
    t0 = time.perf_counter()
    n_distinct, n_started = compile_distinct(todo, args.jobs, args.budget_s, args.no_cache)
    print(f"{len(todo)} cases, {n_distinct} distinct compiles, {n_started} compiled or read this run", flush=True)
    records, missing = [], []
    for case in sorted(todo, key=priority):
        rec = compile_case(case, cache_only=True)
        if rec is None:
            missing.append(case)
            continue
        records.append(rec)
        bad = violations(rec)
        if bad:
            print(f"{case}: {'; '.join(bad)}", flush=True)
    elapsed = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(records, indent=1))
    not_run = Path(args.json).with_suffix(".not_run.json")
    if missing:
        import dataclasses

        not_run.write_text(json.dumps([dataclasses.asdict(c) for c in missing], indent=1))
    elif not_run.exists():
        not_run.unlink()
    n_bad = sum(bool(violations(r)) for r in records)
    table = _table(records, elapsed)
    table = table.replace(" cases, ", f" cases ({n_distinct} distinct compiles), ", 1)
    if missing:
        table += (f"\n**Not run** (compile budget spent): {len(missing)} of {len(todo)} cases, "
                  f"by r / shape / dtype: {_not_run_summary(missing)}.\n")
    print(table)
    if args.results:
        import triton

        from bench.common import write_section

        if args.subset == "default":
            table += "\nEvery candidate config of the default subset:\n\n" + _records_table(records)
        key = f"aot_check_{args.subset}{'_' + args.dtypes.replace(',', '_') if args.dtypes else ''}"
        write_section(f"{key}_triton{triton.__version__}", table, Path(args.results))
    print(f"{len(records)} cases, {n_bad} violate a rule, {len(missing)} not run, {elapsed:.0f} s", flush=True)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
