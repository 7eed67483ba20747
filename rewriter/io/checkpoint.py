"""Adapter and whole-model checkpoints: safetensors plus what safetensors lacks.

Both writers store a flat ``{name: tensor}`` safetensors file whose header metadata carries
(JSON strings):

* ``peftfx.kind`` (``adapters`` | ``model``), ``peftfx.version``, ``peftfx.plan`` (the plan dict);
* ``peftfx.checksums``: sha256 of each tensor's raw bytes (safetensors has no checksum, so a
  flipped payload bit would otherwise load silently);
* ``peftfx.layers``: per adapted layer its format, shape, block sizes, r, alpha and scaling (a
  different format or alpha leaves every tensor shape unchanged, so shapes alone cannot catch it);
* ``peftfx.fingerprint``: per adapted layer a sha256 over its frozen base tensors (packed bytes,
  scales, bias), so adapters are refused on another base;
* ``peftfx.aliases`` (model only): tied tensors stored once.

Loaders verify everything first (header, sizes, checksums, keys, shapes, dtypes, layers, base)
and copy only when all of it passed: a failed load leaves the module untouched. Nothing is ever
pickled; ``load_model`` fills a GraphModule compiled from the same model and plan.

Sharded models (``peftfx.distributed.shard``: FSDP2 DTensor shards, the packed base included)
save and load through the same functions, which are then collective (every rank calls them):
shards are all-gathered tensor by tensor, rank 0 writes the file a single process would write
(same names, bytes, checksums and fingerprint), and loading copies into each rank its own dim-0
chunk of every tensor, so a file saved under one world size loads under any other.

(Over 400 lines on purpose: this is the one home of the file format, its checks and both
writers/readers; the distributed halves are a few lines each and delegate to
:mod:`peftfx.distributed.base_sharding`.)
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peftfx import __version__
from peftfx.api import trainable_parameters
from peftfx.distributed.base_sharding import full_tensor, gathered_state_dict, is_sharded, local_slice, local_tensor
from peftfx.errors import CheckpointError
from peftfx.kernels.modules import qlora_layers

try:  # builds without torch.distributed have no shards to gather
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = ()

__all__ = ["save_adapters", "load_adapters", "save_model", "load_model", "ADAPTER_FILE",
           "base_fingerprint", "layer_info", "tensor_bytes", "tensor_sha256",
           "write_safetensors", "read_safetensors", "safetensors_header", "ST_DTYPES"]

ADAPTER_FILE = "peftfx_adapters.safetensors"
_BASE_BUFFERS = ("weight", "weight_scales", "weight_scales2", "weight_offset", "bias")


# ---------------------------------------------------------------- bytes and hashes


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of ``t`` (row-major); packed codes compare exactly even when they read as NaN."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def _whole(t: Tensor) -> Tensor:
    """``t`` as a full plain tensor; an FSDP2 shard is all-gathered (collective, same order on every rank)."""
    if isinstance(t, DTensor):
        return full_tensor(t)
    return t


def _is_writer(gm: nn.Module) -> bool:
    """Rank 0 writes a sharded model's files; a plain model's caller always writes."""
    return not (is_sharded(gm) and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def _meet(gm: nn.Module) -> None:
    """After a sharded save, no rank returns before the file exists."""
    if is_sharded(gm) and dist.is_available() and dist.is_initialized():
        dist.barrier()


def base_fingerprint(gm: nn.Module) -> dict[str, dict[str, Any]]:
    """Per swapped layer: format, ``[out, in]`` and a sha256 over its frozen base tensors.

    Collective on a sharded model (each base tensor is gathered in turn: every rank must call it).
    """
    out = {}
    for fqn, m in qlora_layers(gm).items():
        h = hashlib.sha256()
        for name in _BASE_BUFFERS:
            t = getattr(m, name, None)
            if isinstance(t, Tensor) and (name != "weight_scales" or t.numel()):
                t = _whole(t)
                h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
                h.update(tensor_bytes(t))
        out[fqn] = {"format": m.format, "shape": [m.out_features, m.in_features], "sha256": h.hexdigest()}
    return out


def layer_info(gm: nn.Module) -> dict[str, dict[str, Any]]:
    """Per swapped layer, the facts a state dict cannot show (format, block sizes, LoRA scaling)."""
    return {fqn: {"format": m.format, "shape": [m.out_features, m.in_features], "block_size": m.block_size,
                  "block_size2": m.block_size2, "dtype": str(m.weight_dtype), "r": m.r, "alpha": m.alpha,
                  "scaling": float(m.scaling)}
            for fqn, m in qlora_layers(gm).items()}


# ---------------------------------------------------------------- safetensors I/O

# safetensors dtype names <-> torch dtypes (the ones a checkpoint of ours can hold)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` with JSON-encoded ``meta`` plus per-tensor checksums, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"format": "pt", **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                 for k, v in meta.items()}}
    header["peftfx.checksums"] = json.dumps({k: tensor_sha256(v) for k, v in tensors.items()}, sort_keys=True)
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint under the real name


def _parse_header(path: Path, head: bytes, size: int) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, metadata) from ``head`` (the file's first bytes, header included) of a
    ``size``-byte safetensors file; raises CheckpointError for a short, cut or malformed file."""
    if len(head) < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8 or n > len(head) - 8:
        raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size - 8}; "
                              f"the file is truncated or not safetensors")
    try:
        header = json.loads(head[8:8 + n].decode("utf-8"))
        meta = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        for k, v in header.items():
            if v["dtype"] not in ST_DTYPES:
                raise ValueError(f"tensor {k!r} has unsupported dtype {v['dtype']!r}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: bad safetensors header ({e}); the file is corrupt, re-save it") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: payload is {size - 8 - n} bytes but the header describes {end}; "
                              f"the file is truncated or was modified")
    return header, meta


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries ``{name: {"dtype", "shape", "data_offsets"}}``, metadata) of a safetensors
    file, reading only its header; checks that the file is as long as the header says.

    Raises:
        CheckpointError: missing file, bad header, or a truncated/padded payload (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            head += f.read(min(struct.unpack("<Q", head)[0], size))
    return _parse_header(path, head, size)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file into memory, checking header, sizes and (when present) checksums.

    Raises:
        CheckpointError: missing file, bad/truncated header, payload size not matching the
            header (truncated or padded file), or a tensor whose sha256 differs from the one
            recorded at save time (names the tensors).
    """
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    data = path.read_bytes()
    _, meta = _parse_header(path, data, len(data))
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for inconsistent headers
        raise CheckpointError(f"{path}: safetensors could not decode the file ({e}); it is corrupt") from None
    sums = json.loads(meta.get("peftfx.checksums", "{}"))
    bad = sorted(k for k, t in tensors.items() if k in sums and tensor_sha256(t) != sums[k])
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch (payload bytes changed since saving) in {bad}; "
                              f"the file is corrupt, re-copy or re-save it")
    return tensors, meta


def _meta_json(meta: Mapping[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: metadata {key!r} missing: not written by peftfx "
                              f"(use import_peft for PEFT files)")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None


def _plan_dict(gm: nn.Module) -> dict | None:
    plan = getattr(gm, "meta", {}).get("peftfx.plan")
    return plan.to_dict() if plan is not None else None


def _common_meta(gm: nn.Module, kind: str) -> dict[str, Any]:
    return {"peftfx.kind": kind, "peftfx.version": __version__, "peftfx.plan": _plan_dict(gm),
            "peftfx.layers": layer_info(gm)}


# ---------------------------------------------------------------- checks (all before any copy)


def _check_kind(meta: Mapping[str, str], kind: str, path: Path) -> None:
    found = meta.get("peftfx.kind")
    if found != kind:
        raise CheckpointError(f"{path}: this is a {found or 'non-peftfx'} file, expected peftfx {kind} "
                              f"(adapters: load_adapters; whole model: load_model; PEFT: import_peft)")


def _check_keys(want: Mapping[str, Tensor], got: Mapping[str, Tensor], path: Path) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path}: keys do not match the compiled model; missing {missing}, unexpected {extra}. "
                              f"Compile with the plan the checkpoint was saved with")
    errs = [f"{k}: file {got[k].dtype} {list(got[k].shape)} vs model {want[k].dtype} {list(want[k].shape)}"
            for k in sorted(want) if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape]
    if errs:
        raise CheckpointError(f"{path}: tensors do not fit (dtype/shape): " + "; ".join(errs))


def _check_layers(gm: nn.Module, meta: Mapping[str, str], path: Path, keys: tuple[str, ...]) -> None:
    saved, now = _meta_json(meta, "peftfx.layers", path), layer_info(gm)
    diffs = []
    for fqn in sorted(set(saved) | set(now)):
        a, b = saved.get(fqn), now.get(fqn)
        if a is None or b is None:
            diffs.append(f"{fqn} ({'only in the model' if a is None else 'only in the file'})")
            continue
        bad = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
        if bad:
            diffs.append(f"{fqn} (file vs model: {', '.join(bad)})")
    if diffs:
        raise CheckpointError(f"{path}: adapted layers differ from the compiled model: {'; '.join(diffs)}")


def _check_base(gm: nn.Module, meta: Mapping[str, str], path: Path) -> None:
    saved, now = _meta_json(meta, "peftfx.fingerprint", path), base_fingerprint(gm)
    differ = sorted(f for f in set(saved) | set(now) if saved.get(f) != now.get(f))
    if differ:
        raise CheckpointError(f"{path}: these adapters were trained on another base: the frozen weights of "
                              f"{differ} differ (name, shape, format or packed bytes). Load them into the base "
                              f"they were saved with, or pass verify_base=False if you know better")


def _local_parts(targets: Mapping[str, Tensor], tensors: Mapping[str, Tensor],
                 path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (destination, source)}``: for an FSDP2 shard, its local storage and this rank's chunk."""
    parts = {}
    for k, t in targets.items():
        src = tensors[k]
        if isinstance(t, DTensor):
            if any(not (isinstance(pl, Shard) and pl.dim == 0) for pl in t.placements):
                layout = [str(pl) for pl in t.placements]
                raise CheckpointError(f"{path}: cannot reshard {k} to this model's layout {layout} "
                                      f"on a {t.device_mesh.size()}-rank mesh: a saved tensor is cut into this rank's "
                                      f"part along dim 0 only (Shard(0), as peftfx.distributed.shard and FSDP2's "
                                      f"default do); shard the model that way, or load before sharding")
            t, src = local_tensor(t), local_slice(src, t)
            if t.shape != src.shape:
                raise CheckpointError(f"{path}: {k}: this rank's shard is {list(t.shape)} but the file's chunk "
                                      f"for it is {list(src.shape)}; shard the model as peftfx.distributed.shard does")
        parts[k] = (t, src)
    return parts


def _copy_in(targets: Mapping[str, Tensor], tensors: Mapping[str, Tensor], path: Path) -> None:
    parts = _local_parts(targets, tensors, path)  # all checked before the first copy
    with torch.no_grad():
        for dst, src in parts.values():
            dst.copy_(src)


# ---------------------------------------------------------------- adapters


def save_adapters(gm: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the trainable tensors of ``gm`` (what the optimizer updates) with plan and base fingerprint.

    On a model sharded by ``peftfx.distributed.shard`` this is collective: every rank calls it,
    rank 0 writes the file one process would write, and all ranks return once it exists.

    Args:
        gm: a module from :func:`peftfx.compile`.
        directory: created if needed; the file is ``<directory>/peftfx_adapters.safetensors``.

    Returns:
        The file path.

    Example::

        >>> path = peftfx.save_adapters(gm, "out/step-100")     # doctest: +SKIP
        >>> peftfx.load_adapters(gm2, "out/step-100")          # doctest: +SKIP
    """
    params = trainable_parameters(gm)
    if not params:
        raise CheckpointError("the module has no trainable parameters to save "
                              "(was it compiled with lora/prefix/prompt?)")
    directory = Path(directory)
    path = directory / ADAPTER_FILE
    params = {k: _whole(p) for k, p in params.items()}
    meta = {**_common_meta(gm, "adapters"), "peftfx.fingerprint": base_fingerprint(gm)}
    if _is_writer(gm):
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, params, meta)
    _meet(gm)
    return path


def load_adapters(gm: nn.Module, directory: str | os.PathLike, *, verify_base: bool = True) -> dict[str, Any]:
    """Load adapters saved by :func:`save_adapters` into ``gm``, bit-exactly, or change nothing.

    Args:
        gm: a module compiled with the same plan on the same base.
        directory: the directory given to :func:`save_adapters` (or the file itself).
        verify_base: refuse adapters whose base fingerprint differs from ``gm``'s.

    Returns:
        ``{"plan": plan dict, "version": peftfx version}`` from the file.

    Raises:
        CheckpointError: corrupt/truncated file, checksum mismatch, missing/extra keys, wrong
            shape or dtype, different layer format/scaling, or another base. ``gm`` is unchanged.
    """
    path = Path(directory)
    path = path / ADAPTER_FILE if path.is_dir() else path
    tensors, meta = read_safetensors(path)
    _check_kind(meta, "adapters", path)
    params = trainable_parameters(gm)
    _check_keys(params, tensors, path)
    _check_layers(gm, meta, path, ("format", "shape", "r", "alpha", "scaling"))
    if verify_base:
        _check_base(gm, meta, path)
    _copy_in(params, tensors, path)
    return {"plan": json.loads(meta.get("peftfx.plan", "null")), "version": meta.get("peftfx.version")}


# ---------------------------------------------------------------- whole model


def _dedupe(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store tied tensors once: ``(unique tensors, {alias: stored name})``."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for k, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            unique[k] = t
    return unique, aliases


def save_model(gm: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``gm.state_dict()`` (packed uint8/int8 bases included) as one safetensors file.

    The GraphModule itself is never pickled: rebuild it with :func:`peftfx.compile` (same model
    class and plan; the plan is in the file's metadata) and call :func:`load_model`.

    On a sharded model this is collective: shards are gathered tensor by tensor to rank 0, which
    writes the single-process file (rank 0's host then holds the whole state once).
    """
    path = Path(path)
    if is_sharded(gm):
        state = gathered_state_dict(gm)  # ties stay one tensor: stored once, as in one process
    else:
        state = gm.state_dict()
    fingerprint = base_fingerprint(gm)
    if _is_writer(gm):
        unique, aliases = _dedupe(state)
        meta = {**_common_meta(gm, "model"), "peftfx.aliases": aliases, "peftfx.fingerprint": fingerprint}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, unique, meta)
    _meet(gm)
    return path


def load_model(gm: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Fill ``gm``'s parameters and buffers from :func:`save_model`'s file, bit-exactly, or change nothing.

    A sharded model takes on each rank its own dim-0 chunk of every tensor, whatever world size
    (or single process) saved the file.

    Raises:
        CheckpointError: as :func:`load_adapters` (every state-dict key must match in name, dtype
            and shape: a float tensor never lands in a packed uint8 buffer). ``gm`` is unchanged.
    """
    path = Path(path)
    tensors, meta = read_safetensors(path)
    _check_kind(meta, "model", path)
    aliases = _meta_json(meta, "peftfx.aliases", path)
    missing_alias = sorted(a for a, k in aliases.items() if k not in tensors)
    if missing_alias:
        raise CheckpointError(f"{path}: tied tensors {missing_alias} point at names missing from the file")
    tensors.update({a: tensors[k] for a, k in aliases.items()})
    targets = gm.state_dict(keep_vars=True)
    _check_keys(targets, tensors, path)
    _check_layers(gm, meta, path, ("format", "shape", "block_size", "block_size2", "dtype", "r", "alpha", "scaling"))
    _copy_in(targets, tensors, path)
    return {"plan": json.loads(meta.get("peftfx.plan", "null")), "version": meta.get("peftfx.version")}
