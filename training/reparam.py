"""Prefix reparameterisation (Li & Liang, 2021, sec. 4.3): train the prefix through an MLP.

Li & Liang found optimising the prefix keys/values directly unstable and trained a small matrix
`E [P, h]` pushed through an MLP instead, keeping only the MLP's output after training; HF PEFT's
`prefix_projection` does the same and saves the projected prefix. Here the MLP adds to the prefix's
starting point rather than replacing it:

    keys, values = start + MLP(E),   MLP = Linear(h, m) -> tanh -> Linear(m, 2 * L * h)

with the last linear zero at first, so training starts exactly where the unprojected prefix does
(the backbone's own keys/values for real words, `PrefixWeights.init`), and every step couples all
P tokens and 2L layers through the shared MLP weights.

The serving tensors stay what the engine runs: `PrefixWeights.keys/values` are leaves the forward
pass reads. After `loss.backward()` their gradients are pushed through the MLP (`backward`), the
optimiser steps the MLP's parameters, and `write` puts the MLP's new output into the leaves. The
bundle therefore stores the folded prefix, with no MLP, exactly as without the projection.
"""
from __future__ import annotations

import torch
from torch import Tensor

from service.methods.prefix import PrefixWeights


class PrefixProjection:
    """The trainable MLP behind one `PrefixWeights` (which it keeps up to date)."""

    def __init__(self, prefix: PrefixWeights, hidden: int, generator: torch.Generator):
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"prefix projection size must be a positive integer, got {hidden!r}")
        self.prefix = prefix
        layers, plen, h = prefix.keys.shape
        dev, dtype = prefix.keys.device, prefix.keys.dtype
        self.start = torch.cat([prefix.keys, prefix.values]).detach().clone()  # [2L, P, H]

        def leaf(t: Tensor) -> Tensor:
            return t.to(device=dev, dtype=dtype).requires_grad_(True)

        bound = 1 / h**0.5  # nn.Linear's default init range
        self.embedding = leaf(torch.randn(plen, h, generator=generator))
        self.w1 = leaf(torch.empty(hidden, h).uniform_(-bound, bound, generator=generator))
        self.b1 = leaf(torch.empty(hidden).uniform_(-bound, bound, generator=generator))
        self.w2 = leaf(torch.zeros(2 * layers * h, hidden))  # zero: starts at `start`
        self.b2 = leaf(torch.zeros(2 * layers * h))

    @property
    def driven(self) -> list[Tensor]:
        """The serving tensors this MLP writes (the optimiser must not step them itself)."""
        return [self.prefix.keys, self.prefix.values]

    def matrices(self) -> list[Tensor]:
        return [self.embedding, self.w1, self.w2]

    def vectors(self) -> list[Tensor]:
        return [self.b1, self.b2]

    def parameters(self) -> list[Tensor]:
        return [*self.matrices(), *self.vectors()]

    def _output(self) -> Tensor:
        """start + MLP(E): [2L, P, H], keys first."""
        two_l, plen, h = self.start.shape
        hid = torch.tanh(self.embedding @ self.w1.T + self.b1)  # [P, m]
        out = (hid @ self.w2.T + self.b2).view(plen, two_l, h).transpose(0, 1)  # [2L, P, H]
        return self.start + out

    def backward(self) -> None:
        """Carry the leaves' gradients (from `loss.backward()`) into the MLP's parameters."""
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self.driven]
        torch.autograd.backward(self._output(), torch.cat(grads))
        for t in self.driven:
            t.grad = None

    @torch.no_grad()
    def write(self) -> None:
        """Fold the MLP into the serving tensors: after every optimiser step and a checkpoint restore."""
        keys, values = self._output().chunk(2)
        self.prefix.keys.copy_(keys)
        self.prefix.values.copy_(values)
