"""Tiny random-init Hugging Face models for tests: nothing is downloaded.

``ZOO[name]()`` returns a :class:`Case`: the model (eval mode, fixed seed), example inputs
(batch 2, sequence 7), inputs of another batch/sequence size, and the plan target patterns for
"attention projections" and "all linears" in that family's module names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Case", "ZOO", "make_case"]

VOCAB = 96


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    inputs: dict
    other_inputs: dict
    attn_targets: list[str]
    all_targets: list[str]
    logits_key: str = "logits"


def _ids(b: int, s: int, *, left_pad: bool = False) -> dict:
    ids = torch.randint(3, VOCAB, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    if left_pad and b > 1:
        mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _decoder_lm(cls_name: str, cfg_name: str, **extra) -> Callable[[], torch.nn.Module]:
    def build():
        import transformers

        cfg = getattr(transformers, cfg_name)(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            use_cache=False, attn_implementation="sdpa", **extra,
        )
        return getattr(transformers, cls_name)(cfg)

    return build


_LLAMA_ATTN = ["*.q_proj", "*.v_proj"]
_LLAMA_ALL = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def make_case(name: str, *, seed: int = 0) -> Case:
    import transformers

    torch.manual_seed(seed)
    if name in ("llama", "qwen2", "qwen3", "mistral"):
        cls, cfg = {
            "llama": ("LlamaForCausalLM", "LlamaConfig"),
            "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
            "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
            "mistral": ("MistralForCausalLM", "MistralConfig"),
        }[name]
        extra = {"head_dim": 16} if name == "qwen3" else {}
        model = _decoder_lm(cls, cfg, **extra)()
        inputs, other = _ids(2, 7, left_pad=True), _ids(3, 11)
        inputs["labels"], other["labels"] = inputs["input_ids"], other["input_ids"]
        return Case(name, model.eval(), inputs, other, _LLAMA_ATTN, _LLAMA_ALL)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, use_cache=False, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(cfg)
        inputs, other = _ids(2, 7, left_pad=True), _ids(3, 11)
        inputs["labels"], other["labels"] = inputs["input_ids"], other["input_ids"]
        return Case(name, model.eval(), inputs, other, ["*.c_attn"], ["*.c_attn", "*.c_proj", "*.c_fc"])
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128, num_labels=3,
                                      attn_implementation="sdpa")
        model = transformers.BertForSequenceClassification(cfg)
        inputs, other = _ids(2, 7, left_pad=False), _ids(3, 11)
        inputs["labels"], other["labels"] = torch.tensor([0, 2]), torch.tensor([1, 0, 2])
        return Case(name, model.eval(), inputs, other, ["*.query", "*.value"], ["*.query", "*.key", "*.value", "*.dense"])
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0, pad_token_id=0, use_cache=False)
        model = transformers.T5ForConditionalGeneration(cfg)
        inputs, other = _ids(2, 7), _ids(3, 11)
        inputs["labels"] = torch.randint(3, VOCAB, (2, 5))
        other["labels"] = torch.randint(3, VOCAB, (3, 4))
        return Case(name, model.eval(), inputs, other, ["*.q", "*.v"], ["*.q", "*.k", "*.v", "*.o", "*.wi", "*.wo"])
    if name == "vit":
        cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=16, patch_size=4, num_labels=5, attn_implementation="sdpa")
        model = transformers.ViTForImageClassification(cfg)
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([1, 4])}
        other = {"pixel_values": torch.randn(3, 3, 16, 16), "labels": torch.tensor([0, 2, 3])}
        return Case(name, model.eval(), inputs, other, ["*.q_proj", "*.v_proj"],
                    ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.fc1", "*.fc2"])
    raise KeyError(name)


ZOO = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "bert", "t5", "vit")
