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


def saved_activation_bytes(gm, inputs: dict) -> int:
    """Bytes autograd saves for backward during ``gm(**inputs)``: distinct storages, parameters and
    buffers excluded."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in [*gm.parameters(), *gm.buffers()]}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gm(**inputs)
    return sum(v for k, v in seen.items() if k not in params)
