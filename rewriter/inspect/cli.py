"""``peftfx`` command line: ``inspect`` what a plan rewrites, ``estimate`` what it costs, list ``passes``.

MODEL is one of:

* ``package.module:function``: a function returning ``(model, example_inputs)``;
* a local Hugging Face model folder (``config.json`` + weights; nothing is downloaded);
* a ``config.json`` path: random init from the config (``architectures`` picks the class).

Exit codes: 0 ok, 2 bad usage or plan (:class:`~peftfx.errors.PlanError`), 3 the model could not
be traced (:class:`~peftfx.errors.TraceError`), 1 any other failure. Errors print one line plus
a hint, never a traceback (``PEFTFX_DEBUG=1`` shows it).

Example::

    $ peftfx inspect tests/data/llama/config.json --plan plan.toml --pass swap_linear
    $ peftfx estimate llama-7b/config.json --plan qlora.toml --batch 4 --seq 2048 --json
    $ peftfx estimate llama-7b/config.json --plan qlora.toml --seq 2048 --train-device cuda --fit 24GiB
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import peftfx
from peftfx.errors import PeftfxError, PlanError, TraceError
from peftfx.inspect.model_source import UsageError, model_from_spec
from peftfx.optim import OPTIMIZER_NAMES  # torch-free: the package exports lazily
from peftfx.scaling.cli import add_scaling_parser
from peftfx.serve.generate_cli import add_generate_command  # the command's code lives in peftfx.serve

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TRACE = 0, 1, 2, 3


# ---------------------------------------------------------------- commands


def _cmd_inspect(args) -> int:
    from peftfx.inspect.reporting import build_report, pass_diff, render_report, write_graph  # lazy: start-up

    plan = _load_plan(args.plan)
    model, inputs, name = model_from_spec(args.model, device="cpu", batch=args.batch, seq=args.seq)
    gm = peftfx.compile(model, plan, example_inputs=inputs)
    rep = build_report(gm, model=name)
    diff = pass_diff(gm, args.pass_name) if args.pass_name else None
    if args.graph:
        write_graph(gm, args.graph)
    if args.json:
        if diff is not None:
            rep["diff"] = {"pass": args.pass_name, "text": diff}
        print(json.dumps(rep, indent=2, default=str))
    elif diff is not None:
        print(f"pass {args.pass_name}: graph code before/after\n{diff}")
    else:
        print(render_report(rep))
    if args.graph and not args.json:
        print(f"graph written to {args.graph}")
    return EXIT_OK


def _cmd_estimate(args) -> int:
    from peftfx.inspect.estimate import estimate  # lazy: CLI start-up time

    plan = _load_plan(args.plan) if args.plan else None
    model, inputs, name = model_from_spec(args.model, device=args.device, batch=args.batch, seq=args.seq)
    if args.world_size:  # per rank under FSDP2 (peftfx.distributed.shard): see inspect/fsdp_estimate.py
        from peftfx.inspect.fsdp_estimate import estimate_sharded  # lazy: CLI start-up time

        if plan is None:
            raise UsageError("--world-size needs --plan (the sharded estimate is of the plan's training step)")
        sharded = estimate_sharded(model, plan, world_size=args.world_size, batch=args.batch or 2, seq=args.seq or 8,
                                   optimizer=args.optimizer, dtype=args.dtype, train_device=args.train_device)
        print(json.dumps({**sharded.to_dict(), "model": name}, indent=2) if args.json
              else f"peftfx estimate: {name}\n{sharded.render()}")
        return EXIT_OK
    est = estimate(model, plan, example_inputs=inputs, optimizer=args.optimizer, dtype=args.dtype,
                   train_device=args.train_device, fit=args.fit)
    est.model = name
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.render())
    return EXIT_OK


def _cmd_passes(args) -> int:
    import peftfx.passes  # noqa: F401  (lazy for CLI start-up time; importing it registers the passes)
    from peftfx.pass_manager import registered_passes  # lazy: CLI start-up time

    specs = registered_passes()
    if args.json:
        print(json.dumps([{"name": s.name, "sections": s.section.split("|"), "order": i, "after": list(s.after),
                           "before": list(s.before), "doc": s.doc} for i, s in enumerate(specs, 1)], indent=2))
        return EXIT_OK
    print(f"{'#':>2}  {'pass':<18} {'plan sections':<22} what it does")
    for i, s in enumerate(specs, 1):
        sections = "(always)" if s.section == "*" else ", ".join(s.section.split("|"))
        print(f"{i:>2}  {s.name:<18} {sections:<22} {s.doc}")
    return EXIT_OK


def _load_plan(path: str):
    from peftfx.api import as_plan  # lazy: CLI start-up time

    if not os.path.isfile(path):
        raise UsageError(f"plan file {path!r} does not exist")
    return as_plan(path)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftfx", description="Inspect what a peftfx plan rewrites and "
                                     "estimate the memory of training with it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,estimate,passes,generate,scaling}")
    model_help = "package.module:function returning (model, example_inputs), a HF model folder, or a config.json"

    p = sub.add_parser("inspect", help="show what each pass did to MODEL under PLAN")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--plan", required=True, help="plan file (.toml or .json)")
    p.add_argument("--pass", dest="pass_name", metavar="NAME", help="show this pass's graph code as a diff")
    p.add_argument("--json", action="store_true", help="machine-readable report (schema_version inside)")
    p.add_argument("--graph", metavar="FILE", help="write the rewritten graph as .dot (or .svg with pydot)")
    p.add_argument("--batch", type=_positive, help="batch of generated inputs (default 2)")
    p.add_argument("--seq", type=_positive, help="sequence length of generated inputs (default 8)")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("estimate", help="memory of one training step before and after PLAN")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--plan", help="plan file (.toml or .json); without it only full fine-tuning is estimated")
    p.add_argument("--batch", type=_positive, help="batch size (default 2)")
    p.add_argument("--seq", type=_positive, help="sequence length (default 8)")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adamw",
                   help="whose state to count: torch AdamW, SGD, or peftfx.optim's (paged) AdamW8bit / PagedAdamW")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="training dtype (default: model's)")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="build the model on meta (nothing allocated, default) or cpu (real weights)")
    p.add_argument("--train-device", choices=("cpu", "cuda"), default="cpu",
                   help="where the optimizer step runs (sets its temporaries: single-tensor vs foreach AdamW)")
    p.add_argument("--world-size", type=_positive, metavar="W",
                   help="per-rank peak when FSDP2 shards the model (and its packed base) over W ranks")
    p.add_argument("--fit", metavar="SIZE", help="also find the cheapest [memory] settings and the largest batch "
                   "whose peak fits in SIZE (e.g. 24GiB, 48GB; needs --plan)")
    p.add_argument("--json", action="store_true", help="machine-readable estimate")
    p.set_defaults(fn=_cmd_estimate)

    p = sub.add_parser("passes", help="list the registered passes and the plan sections they serve")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_passes)


    add_generate_command(sub, _positive)
    add_scaling_parser(sub)  # `peftfx scaling fit runs.csv`
    return parser


_HINTS = {
    EXIT_USAGE: "check the command line and the plan (see `peftfx --help`; plan keys are in the README)",
    EXIT_TRACE: "the model could not be captured by torch.export; try use_cache=False, sdpa attention, "
                "batch >= 2 and seq >= 2 example inputs",
    EXIT_ERROR: "set PEFTFX_DEBUG=1 for the full traceback",
}


def _fail(exc: BaseException, code: int) -> int:
    if os.environ.get("PEFTFX_DEBUG"):
        raise exc
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    print(f"peftfx: error: {text or type(exc).__name__}", file=sys.stderr)
    print(f"hint: {_HINTS[code]}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad usage/plan, 3 trace failure, 1 other)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its usage line already
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        return args.fn(args)
    except PlanError as exc:
        return _fail(exc, EXIT_USAGE)
    except TraceError as exc:
        return _fail(exc, EXIT_TRACE)
    except PeftfxError as exc:
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        return _fail(exc, EXIT_ERROR)
