"""Build a model from a MODEL argument of the ``peftfx`` command (and of tools that take the same).

MODEL is one of:

* ``package.module:function``: a function returning ``(model, example_inputs)``;
* a local Hugging Face model folder (``config.json`` + weights; nothing is downloaded);
* a ``config.json`` path: random init from the config (``architectures`` picks the class).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from typing import Any

from peftfx.errors import PeftfxError, PlanError

__all__ = ["UsageError", "model_from_spec", "default_inputs"]


class UsageError(PlanError):
    """A bad command-line argument (exit code 2, like a bad plan)."""


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
        with torch.device(device) if device == "meta" else contextlib.nullcontext():
            result = fn()
    except PeftfxError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise UsageError(f"MODEL {spec!r}: the factory raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"MODEL {spec!r}: the factory must return (model, example_inputs), got "
                         f"{type(result).__name__}")
    return result


def model_from_spec(spec: str, *, device: str = "cpu", batch: int | None = None, seq: int | None = None
               ) -> tuple[Any, Any, str]:
    """``(model, example_inputs, display name)`` for a MODEL argument (see the module docstring)."""
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


def default_inputs(model: Any, batch: int = 2, seq: int = 8, *, device: Any = "cpu") -> dict:
    """``input_ids`` / ``attention_mask`` (and ``labels`` for language models) of ``[batch, seq]``."""
    import torch  # not at module top: ``peftfx --help`` should not pay for importing torch

    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", None) or 1000)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    if any("CausalLM" in a or "LMHead" in a for a in archs):
        inputs["labels"] = ids
    return inputs
