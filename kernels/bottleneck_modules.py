"""Houlsby bottleneck adapter: ``h + up(act(down(h)))`` with a zero-initialized up-projection.

Shapes: ``h [..., hidden]``; ``down_weight [size, hidden]``, ``down_bias [size]``,
``up_weight [hidden, size]``, ``up_bias [hidden]``. Because ``up`` starts at zero the adapter is
the identity at initialization, so inserting it leaves a model's outputs unchanged (Houlsby et al.
2019 initialize near-identity for the same reason: training starts from the pretrained function).

The parameters live directly on the module (not in ``nn.Linear`` children) so that
``passes/freeze.py`` finds them through :attr:`Bottleneck.PEFTFX_TRAINABLE`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftfx.errors import KernelError

__all__ = ["Bottleneck", "NONLINEARITIES"]

NONLINEARITIES = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class Bottleneck(nn.Module):
    """Residual bottleneck adapter ``y = h + up(act(down(h)))``.

    Args:
        hidden: feature size of ``h`` (the sublayer output).
        size: bottleneck width.
        nonlinearity: ``gelu | relu | silu | tanh``.
        dtype, device: of the parameters (match the sublayer output).
        name: the module this adapter follows, for error messages.
    """

    PEFTFX_TRAINABLE = ("down_weight", "down_bias", "up_weight", "up_bias")

    def __init__(self, hidden: int, size: int, *, nonlinearity: str = "gelu", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, name: str | None = None) -> None:
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise KernelError(f"bottleneck nonlinearity {nonlinearity!r} for {name or 'adapter'} is not one of "
                              f"{sorted(NONLINEARITIES)}")
        if hidden < 1 or size < 1:
            raise KernelError(f"bottleneck for {name or 'adapter'} needs hidden >= 1 and size >= 1, "
                              f"got hidden={hidden}, size={size}")
        kw = {"dtype": dtype, "device": device}
        self.hidden, self.size, self.nonlinearity, self.name = hidden, size, nonlinearity, name
        self.down_weight = nn.Parameter(torch.empty(size, hidden, **kw))
        self.down_bias = nn.Parameter(torch.zeros(size, **kw))
        self.up_weight = nn.Parameter(torch.zeros(hidden, size, **kw))
        self.up_bias = nn.Parameter(torch.zeros(hidden, **kw))
        # nn.Linear's default init for the down-projection; up stays zero so the adapter starts as identity
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., hidden]`` -> ``[..., hidden]``."""
        z = NONLINEARITIES[self.nonlinearity](F.linear(h, self.down_weight, self.down_bias))
        return h + F.linear(z, self.up_weight, self.up_bias)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, size={self.size}, nonlinearity={self.nonlinearity}"
