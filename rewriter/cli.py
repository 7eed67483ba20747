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
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Sequence

from peftfx.errors import PeftfxError, PlanError, TraceError

__all__ = ["main", "load_model", "build_parser"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TRACE = 0, 1, 2, 3


class UsageError(PlanError):
    """A bad command-line argument (exit code 2, like a bad plan)."""


# ---------------------------------------------------------------- models


def _from_config(path: str, device: str):
    """A randomly initialized model from a config.json (class from ``architectures``)."""
    import torch
    import transformers

    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not valid JSON ({exc})") from None
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise UsageError(f"{path} has no 'model_type': is it a Hugging Face config.json?")
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise UsageError(f"{path}: transformers cannot build a {model_type!r} config ({exc})") from None
    config.use_cache = False
    config._attn_implementation = "sdpa"
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    with torch.device(device):
        if cls is not None:
            return cls(config)
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            return transformers.AutoModel.from_config(config)


def _from_folder(path: str, device: str):
    """A Hugging Face model folder: weights loaded locally on cpu, config only on meta."""
    if device == "meta" or not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        return _from_config(os.path.join(path, "config.json"), device)
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)),
               transformers.AutoModelForCausalLM)
    model = cls.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _from_factory(spec: str, device: str):
    import torch

    module_name, _, fn_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # console scripts do not put the working directory on the path
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"MODEL {spec!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"MODEL {spec!r}: {module_name} has no function {fn_name!r}")
    try:
        with torch.device(device) if device == "meta" else _nullcontext():
            result = fn()
    except PeftfxError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise UsageError(f"MODEL {spec!r}: the factory raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"MODEL {spec!r}: the factory must return (model, example_inputs), got "
                         f"{type(result).__name__}")
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_model(spec: str, *, device: str = "cpu", batch: int | None = None, seq: int | None = None
               ) -> tuple[Any, Any, str]:
    """``(model, example_inputs, display name)`` for a MODEL argument (see the module docstring)."""
    from peftfx.estimate import default_inputs

    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise UsageError(f"MODEL folder {spec!r} has no config.json")
        model, inputs = _from_folder(spec, device), None
    elif os.path.isfile(spec):
        if not spec.endswith(".json"):
            raise UsageError(f"MODEL file {spec!r} is not a config.json")
        model, inputs = _from_config(spec, device), None
    elif ":" in spec:
        model, inputs = _from_factory(spec, device)
        if (batch or seq) and isinstance(inputs, dict) and "input_ids" in inputs:
            ids = inputs["input_ids"]
            fresh = default_inputs(model, batch or ids.shape[0], seq or ids.shape[1], device=ids.device)
            inputs = {**inputs, **{k: v for k, v in fresh.items() if k in inputs}}
    else:
        raise UsageError(f"MODEL {spec!r} is neither a file, a folder nor package.module:function")
    if inputs is None:
        import torch

        with torch.device(device):
            inputs = default_inputs(model, batch or 2, seq or 8, device=device)
    return model, inputs, type(model).__name__


# ---------------------------------------------------------------- commands


def _cmd_inspect(args) -> int:
    import peftfx
    from peftfx.reporting import build_report, pass_diff, render_report, write_graph

    plan = _load_plan(args.plan)
    model, inputs, name = load_model(args.model, device="cpu", batch=args.batch, seq=args.seq)
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
    from peftfx.estimate import estimate

    plan = _load_plan(args.plan) if args.plan else None
    model, inputs, name = load_model(args.model, device=args.device, batch=args.batch, seq=args.seq)
    est = estimate(model, plan, example_inputs=inputs, optimizer=args.optimizer, dtype=args.dtype,
                   train_device=args.train_device)
    est.model = name
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.render())
    return EXIT_OK


def _cmd_passes(args) -> int:
    from peftfx.pass_manager import registered_passes

    specs = registered_passes()
    if args.json:
        print(json.dumps([{"name": s.name, "sections": s.section.split("|"), "order": s.order, "doc": s.doc}
                          for s in specs], indent=2))
        return EXIT_OK
    print(f"{'order':>5}  {'pass':<16} {'plan sections':<22} what it does")
    for s in specs:
        sections = "(always)" if s.section == "*" else ", ".join(s.section.split("|"))
        print(f"{s.order:>5}  {s.name:<16} {sections:<22} {s.doc}")
    return EXIT_OK


def _load_plan(path: str):
    from peftfx.api import as_plan

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,estimate,passes,scaling}")
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
    p.add_argument("--optimizer", choices=("adamw", "sgd", "adamw-8bit"), default="adamw")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="training dtype (default: model's)")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="build the model on meta (nothing allocated, default) or cpu (real weights)")
    p.add_argument("--train-device", choices=("cpu", "cuda"), default="cpu",
                   help="where the optimizer step runs (sets its temporaries: single-tensor vs foreach AdamW)")
    p.add_argument("--json", action="store_true", help="machine-readable estimate")
    p.set_defaults(fn=_cmd_estimate)

    p = sub.add_parser("passes", help="list the registered passes and the plan sections they serve")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_passes)

    from peftfx.scaling.cli import add_scaling_parser

    add_scaling_parser(sub)  # `peftfx scaling fit runs.csv` (issue 17)
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
