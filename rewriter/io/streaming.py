"""``peftfx.load``: compile a model from a local Hugging Face folder without materializing it.

``peftfx.compile(model, plan)`` needs the model in memory first: a 70B model in bf16 is 130 GiB
of host memory before a single layer is quantized. :func:`load` instead

1. checks the folder (``model.safetensors`` or ``model.safetensors.index.json`` and its shards):
   every listed shard present, every file as long as its header says, recorded checksums
   matching (a Hugging Face cache blob is named by its sha256; peftfx-written shards carry a
   sha256 per tensor), all before anything is built;
2. builds the model from its ``config.json`` with every parameter a *placeholder*: a one-element
   tensor broadcast to the parameter's shape (stride 0: 2 bytes for a 28672 x 8192 weight), so
   capture (``torch.export``) sees the right shapes and dtypes while nothing is allocated;
   buffers computed at construction (RoPE tables) are real;
3. compiles: each targeted linear's placeholder is read from its shard just before it is
   quantized (exactly its bytes, at the header's offsets), quantized in slices, and dropped,
   so the dense weight of one layer at a time exists;
4. reads the remaining placeholders (embeddings, norms, head, untargeted linears) into the
   compiled module.

Host memory of tensors therefore peaks at about the largest layer's dense weight plus the
compiled (packed) model. With ``shard=True`` (under ``torch.distributed``) each rank keeps only
its dim-0 chunk of each layer's packed base as soon as the layer is quantized (meta tensors stay
in the module), the model is sharded by :func:`peftfx.distributed.shard`, and the chunks become
the FSDP2 shards: a rank's peak is then the largest dense layer plus its shard of the packed base
plus the unquantized rest.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from peftfx.api import compile as compile_model
from peftfx.distributed import shard as shard_model
from peftfx.distributed.base_sharding import base_storage_names, local_tensor, rank_chunk
from peftfx.errors import CheckpointError, PeftfxError
from peftfx.io.checkpoint import ST_DTYPES, safetensors_header, tensor_sha256

__all__ = ["load", "SafetensorsFolder"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_BLOB = re.compile(r"^[0-9a-f]{64}$")  # Hugging Face cache: snapshots/<rev>/<file> -> blobs/<sha256>


class SafetensorsFolder:
    """The weights of a local Hugging Face folder: which shard holds which tensor, checked up front.

    Args:
        folder: holds ``model.safetensors``, or ``model.safetensors.index.json`` and its shards.
        verify: hash every shard that has a recorded sha256 (a Hugging Face cache blob name) and
            every tensor against a recorded per-tensor checksum (peftfx-written shards) as it is read.

    Raises:
        CheckpointError: no weights, a bad index, a missing or truncated shard, a tensor the index
            places in a shard that lacks it, or a shard whose bytes do not match its recorded
            sha256; each names the file.
    """

    def __init__(self, folder: str | os.PathLike, *, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.verify = verify
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e}); re-save the model") from None
            self.where = {k: self.folder / f for k, f in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            self.where = None
        else:
            raise CheckpointError(f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE}; "
                                  "save the model with save_pretrained(..., safe_serialization=True)")
        files = sorted(set(self.where.values())) if self.where is not None else [self.folder / SINGLE_FILE]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{self.folder}: shard(s) {missing} listed in {INDEX_FILE} are missing; "
                                  "re-download or re-copy the model folder")
        self.entries: dict[str, tuple[Path, dict]] = {}
        self._sums: dict[Path, dict[str, str]] = {}
        self._data_start: dict[Path, int] = {}
        for f in files:
            header, meta = safetensors_header(f)  # truncated / padded / malformed: CheckpointError
            with open(f, "rb") as fh:
                self._data_start[f] = 8 + struct.unpack("<Q", fh.read(8))[0]
            self._sums[f] = json.loads(meta.get("peftfx.checksums", "{}"))
            for k, v in header.items():
                self.entries[k] = (f, v)
            if verify:
                _check_blob_sha256(f)
        if self.where is not None:
            wrong = sorted(k for k, f in self.where.items() if self.entries.get(k, (None,))[0] != f)
            if wrong:
                raise CheckpointError(f"{INDEX_FILE} places {wrong[:5]} in shards that do not hold them "
                                      f"({len(wrong)} tensors); the folder is inconsistent, re-save it")

    def dtype(self) -> torch.dtype:
        """The dtype most floating tensors are stored in (the model's dtype)."""
        counts: dict[torch.dtype, int] = {}
        for _, v in self.entries.values():
            dt = ST_DTYPES[v["dtype"]]
            if dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key][1]["shape"])

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """Tensor ``key`` from its shard (checked against its recorded checksum), cast to ``dtype``.

        Reads exactly the tensor's bytes at the offsets the header gives, into a fresh tensor:
        ``safe_open(..., framework="pt").get_tensor`` maps the whole shard into one storage
        that the tensor then views, which would keep a 5-10 GiB shard alive per layer.
        """
        path, entry = self.entries[key]
        begin, end = (int(x) for x in entry["data_offsets"])
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(self._data_start[path] + begin)
            if f.readinto(memoryview(raw.numpy())) != end - begin:
                raise CheckpointError(f"{path}: {key!r} ends past the end of the file (truncated while loading?)")
        t = raw.view(ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        want = self._sums[path].get(key)
        if self.verify and want is not None and tensor_sha256(t) != want:
            raise CheckpointError(f"{path}: checksum mismatch in {key!r} (payload bytes changed since saving); "
                                  "the shard is corrupt, re-copy or re-save it")
        return t if dtype is None or t.dtype == dtype or not t.dtype.is_floating_point else t.to(dtype)


def _check_blob_sha256(path: Path) -> None:
    """A shard that is a Hugging Face cache blob (named by its sha256) must hash to its name."""
    real = path.resolve()
    if real == path.absolute() or not _BLOB.match(real.name):
        return
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    if h.hexdigest() != real.name:
        raise CheckpointError(f"{path}: sha256 {h.hexdigest()[:12]}... does not match the recorded "
                              f"{real.name[:12]}... (the cache blob it points to); the shard is corrupt, "
                              "re-download it")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device (buffers stay real: RoPE tables are computed)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Placeholders:
    """Placeholder parameters by address: ``{data_ptr: checkpoint key}``.

    Each placeholder has its own one-element storage, kept alive here until the load ends, so
    no other tensor can take its address (a released weight's storage is freed, and a new
    scalar allocated there must never be mistaken for a placeholder).
    """

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}
        self._storages: list[Tensor] = []

    def make(self, shape: torch.Size, dtype: torch.dtype, requires_grad: bool) -> nn.Parameter:
        one = torch.zeros(1, dtype=dtype)
        self._storages.append(one)
        return nn.Parameter(one.expand(shape), requires_grad=requires_grad)

    def key(self, t: Tensor) -> str | None:
        """The checkpoint key ``t`` is a placeholder for (None: a real tensor)."""
        return self.keys.get(t.data_ptr()) if t.untyped_storage().nbytes() == t.element_size() else None


def _build(folder: Path, source: SafetensorsFolder, dtype: torch.dtype,
           model_class: Any) -> tuple[nn.Module, _Placeholders]:
    """The model with placeholder parameters (persistent buffers read from the shards)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise CheckpointError(f"{folder}/config.json names no architecture transformers knows ({arch!r}); "
                                  "pass model_class=")
    with _parameters_on_meta():
        model = model_class(config)
    holders = _Placeholders()
    replaced: dict[int, nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if id(p) not in replaced:  # tied parameters stay one parameter
            replaced[id(p)] = holders.make(p.shape, dtype, p.requires_grad)
        new = replaced[id(p)]
        model.get_submodule(owner)._parameters[leaf] = new
        if name in source.entries and new.data_ptr() not in holders.keys:
            holders.keys[new.data_ptr()] = name
    missing = sorted(n for n, p in model.named_parameters() if holders.key(p) is None)
    if missing:
        raise CheckpointError(f"{folder}: the shards hold no tensor for {missing[:5]} ({len(missing)} parameters); "
                              "the folder does not match its config.json")
    for p in model.parameters():
        key = holders.key(p)
        if source.shape(key) != tuple(p.shape):
            raise CheckpointError(f"{source.entries[key][0]}: {key} is {list(source.shape(key))} but the "
                                  f"model built from config.json needs {list(p.shape)}")
    with torch.no_grad():  # persistent buffers the folder holds (RoPE tables are recomputed, not stored)
        for name, b in model.named_buffers():
            if name in source.entries and b is not None:
                b.copy_(source.read(name, b.dtype if b.dtype.is_floating_point else None))
    model.eval()
    return model, holders


def _default_inputs() -> dict:
    ids = torch.zeros(2, 8, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _WeightSource:
    """What ``peftfx.compile`` asks the loader while it swaps linears (see its ``weight_source``).

    ``materialize``: the real weight for a placeholder, read from disk. ``built``: with
    ``sharded``, keep only this rank's dim-0 chunk of the new layer's base tensors (as
    ``peftfx.distributed.shard`` will cut them) and leave meta tensors in the module;
    :meth:`fill_shards` puts the chunks into the FSDP2 shards once the model is sharded.
    """

    def __init__(self, source: SafetensorsFolder, holders: _Placeholders, dtype: torch.dtype, sharded: bool) -> None:
        self.source, self.holders, self.dtype, self.sharded = source, holders, dtype, sharded
        self.parts: dict[tuple[str, str], Tensor] = {}

    def materialize(self, t: Tensor) -> Tensor:
        key = self.holders.key(t)
        return self.source.read(key, self.dtype) if key is not None else t

    def built(self, fqn: str, module: nn.Module) -> None:
        if not self.sharded:
            return
        import torch.distributed as dist


        for name in base_storage_names(module):
            full = module._buffers[name]
            self.parts[(fqn, name)] = rank_chunk(full, dist.get_world_size(), dist.get_rank()).clone()
            module._buffers[name] = torch.empty_like(full, device="meta")

    def fill_shards(self, gm: nn.Module) -> None:
        """Give each meta FSDP2 shard real storage holding this rank's chunk (before the first forward:
        FSDP2's lazy init then adopts the new shard tensors, as after ``to_empty``)."""
        for fqn, name in list(self.parts):
            part = self.parts.pop((fqn, name))  # dropped as its shard is filled: never two copies
            module = gm.get_submodule(fqn)
            shard = module._parameters[name]
            real = nn.Parameter(torch.empty_like(shard, device=part.device), requires_grad=False)
            local = local_tensor(real)
            if local.shape != part.shape:
                raise AssertionError(f"{fqn}.{name}: shard {list(local.shape)} vs chunk {list(part.shape)}")
            local.copy_(part)
            module._parameters[name] = real
            del part


def load(folder: str | os.PathLike, plan: Any, *, example_inputs: Any = None, dtype: torch.dtype | None = None,
         model_class: Any = None, verify: bool = True, shard: bool | dict = False,
         **compile_kwargs: Any) -> GraphModule:
    """Compile a model straight from a local Hugging Face folder, one layer in memory at a time.

    Args:
        folder: a ``save_pretrained`` folder (``config.json`` + safetensors, sharded or not).
        plan: as :func:`peftfx.compile`'s.
        example_inputs: as :func:`peftfx.compile`'s (default: ``input_ids`` and ``attention_mask``
            of shape ``[2, 8]``; pass ``labels`` too if you will call the model with them).
        dtype: dtype of the non-quantized parameters and of the weights handed to the quantizer
            (default: the dtype the folder stores).
        model_class: the ``transformers`` class to build (default: ``config.architectures[0]``).
        verify: check recorded checksums (see :class:`SafetensorsFolder`).
        shard: return the model sharded by :func:`peftfx.distributed.shard` (collective: every
            rank calls ``load``; a dict is passed to ``shard`` as keyword arguments). Each rank
            keeps only its chunk of each layer's packed base as soon as the layer is quantized,
            so a rank's host never holds the whole packed model.
        **compile_kwargs: passed to :func:`peftfx.compile` (``snapshots``, ``tokenizer``).

    Returns:
        The compiled GraphModule, equal to ``peftfx.compile(from_pretrained(folder), plan)``, in eval
        mode (call ``.train()`` to fine-tune).

    Raises:
        CheckpointError: a missing, truncated or corrupt shard, or weights that do not fit the
            config (before anything is built; nothing is returned half-loaded).

    Example::

        >>> gm = peftfx.load("Llama-2-70b-hf", "plans/qlora.toml")      # doctest: +SKIP
    """
    if shard:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise PeftfxError("peftfx.load(shard=...) shards across ranks: call "
                              "torch.distributed.init_process_group first (e.g. under torchrun)")
    folder = Path(folder)
    source = SafetensorsFolder(folder, verify=verify)
    dtype = dtype or source.dtype()
    model, holders = _build(folder, source, dtype, model_class)
    weights = _WeightSource(source, holders, dtype, sharded=bool(shard))
    inputs = example_inputs if example_inputs is not None else _default_inputs()
    gm = compile_model(model, plan, example_inputs=inputs, weight_source=weights, **compile_kwargs)
    _fill_placeholders(gm, holders, source, dtype)
    if shard:
        shard_model(gm, **(shard if isinstance(shard, dict) else {}))
        weights.fill_shards(gm)
    return gm


def _fill_placeholders(gm: nn.Module, holders: _Placeholders, source: SafetensorsFolder, dtype: torch.dtype) -> None:
    """Read every placeholder still in ``gm`` (embeddings, norms, head, untargeted linears) from disk."""
    done: dict[int, Tensor] = {}
    named = [(n, t, True) for n, t in gm.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in gm.named_buffers(remove_duplicate=False)]
    for name, t, is_param in named:
        key = holders.key(t)
        if key is None:
            continue
        if id(t) not in done:
            real = source.read(key, dtype)
            if is_param:
                t.data = real
            done[id(t)] = real
        if not is_param:
            owner, _, leaf = name.rpartition(".")
            gm.get_submodule(owner)._buffers[leaf] = done[id(t)]
