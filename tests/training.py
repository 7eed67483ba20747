"""A few optimizer steps on one fixed batch, for tests that check a plan trains."""
from __future__ import annotations

import torch


def train_losses(gm, inputs: dict, params, *, lr: float, steps: int = 8) -> list[float]:
    """Adam on ``params`` for ``steps`` steps of ``gm(**inputs).loss``; the loss before each step."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = gm(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
