"""Tiny byte-level Llama decoders and their cached Shakespeare pre-training.

Sizes are ``(hidden, layers)``; heads of 32-48 dims, SwiGLU width ~8/3 hidden, tied input/output
byte embeddings (vocabulary 256). N is the NON-EMBEDDING parameter count (the paper's convention):
everything but the tied embedding.

Pre-trained weights are cached in ``$PEFTFX_TRANSFER_CACHE`` (default
``~/.cache/peftfx/transfer_scaling``) under a content hash of the model config, the pre-training
data bytes, the schedule, the seed, the source of this package's data/model/training code and the
torch/transformers versions: any change retrains, an identical rerun (or another demo) reuses them.
Files are written to a temporary name and renamed, so an interrupted run never leaves a torn file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.transfer_scaling.train import Schedule, pretrain_steps

__all__ = ["ModelSize", "build_model", "non_embedding_params", "cache_dir", "pretrained", "pretrain_key"]

VOCAB = 256
_CODE_FILES = ("data.py", "models.py", "train.py")


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int

    @property
    def name(self) -> str:
        return f"h{self.hidden}L{self.layers}"

    def config(self, seq: int) -> dict:
        heads = max(1, self.hidden // 40)
        while self.hidden % heads:  # heads of ~40 dims that divide the width
            heads -= 1
        return {"vocab_size": VOCAB, "hidden_size": self.hidden, "intermediate_size": (self.hidden * 8 // 3 + 7) // 8 * 8,
                "num_hidden_layers": self.layers, "num_attention_heads": heads, "num_key_value_heads": heads,
                "max_position_embeddings": max(128, seq), "tie_word_embeddings": True, "rms_norm_eps": 1e-5}


def build_model(size: ModelSize, seq: int, seed: int) -> torch.nn.Module:
    """A randomly initialized ``LlamaForCausalLM`` of ``size`` (seeded), in train mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**size.config(seq), use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).train()


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters other than the (tied) token embedding / output head."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    path = Path(override or os.environ.get("PEFTFX_TRANSFER_CACHE") or Path.home() / ".cache/peftfx/transfer_scaling")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _code_digest() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / f).read_bytes() for f in _CODE_FILES)).hexdigest()


def pretrain_key(size: ModelSize, data_digest: str, sched: Schedule, seed: int) -> str:
    import transformers

    blob = json.dumps({"config": size.config(sched.seq), "data": data_digest, "schedule": dataclasses.asdict(sched),
                       "seed": seed, "code": _code_digest(), "torch": torch.__version__,
                       "transformers": transformers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pretrained(size: ModelSize, tokens: torch.Tensor, data_digest: str, sched: Schedule, seed: int,
               cache: Path) -> tuple[torch.nn.Module, dict]:
    """The pre-trained model of ``size`` and its metadata, from ``cache`` or trained now (then cached)."""
    path = cache / f"pretrained-{size.name}-{pretrain_key(size, data_digest, sched, seed)}.pt"
    model = build_model(size, sched.seq, seed)
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        return model, {**json.loads(blob["meta"]), "cached": True}
    start, cpu_start = time.perf_counter(), time.process_time()
    last = pretrain_steps(model, tokens, sched, seed)
    meta = {"size": size.name, "train_loss": last, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "steps": sched.max_steps}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "meta": json.dumps(meta)}, tmp)
    os.replace(tmp, path)
    return model, {**meta, "cached": False}
