"""The bytes of one training step's memory, by kind: what the simulated allocator measures."""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Breakdown"]


@dataclass
class Breakdown:
    """Bytes of one training step's memory (one configuration: full fine-tune or the plan)."""

    weights: dict[str, int]  # by storage kind: "float32", "nf4", "lora (float32)", "buffers", ...
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward through autograd's saved-tensor hooks (on the device)
    forward_backward_peak: int  # live bytes above the weights during forward + backward
    optimizer_transient: int
    inputs: int
    peak: int
    total_params: int
    trainable_params: int
    largest_tensor: str
    largest_tensor_bytes: int
    offloaded: int = 0  # bytes parked in host memory by memory.offload = "cpu" (not in the peak)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        """The textbook sum: weights + gradients + optimizer state + activations."""
        return self.weight_bytes + self.gradients + self.optimizer_state + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "weight_bytes": self.weight_bytes, "total": self.total}
