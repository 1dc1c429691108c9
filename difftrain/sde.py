"""The variance-preserving SDE of the Kolmogorov experiment (sda), with its cosine schedule.

Time t runs from 0 (data) to 1 (noise):

    mu(t)    = cos(acos(sqrt(eta)) * t) ** 2
    sigma(t) = sqrt(1 - mu(t) ** 2 + eta ** 2)
    x_t      = mu(t) * x + sigma(t) * eps

The loss is the mean squared error on eps. The network's raw output F is not used as eps
directly but through eps_hat = sigma(t) x_t + mu(t) F (a v-style parametrization): near t = 1,
mu is 1e-3 and the data estimate x0_hat = (x_t - sigma eps_hat) / mu would multiply any error
of a raw eps output by 1000, which makes samples of a briefly trained network explode. With
this form x0_hat ~ mu x_t - sigma F, so errors stay of the size of the network's own error at
every t, and the optimum is unchanged (F is then the v target).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

EpsilonModel = Callable[[Tensor, Tensor], Tensor]


class VPSDE:
    """Cosine-schedule VP-SDE. `eta` keeps mu(1) > 0 and sigma(0) > 0 so no step divides by zero."""

    def __init__(self, eta: float = 1e-3):
        self.eta = eta
        self.alpha = math.acos(math.sqrt(eta))

    def mu(self, t: Tensor) -> Tensor:
        return torch.cos(self.alpha * t) ** 2

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.mu(t) ** 2 + self.eta**2).sqrt()

    def perturb(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x: (B, ...), t: (B,), eps like x -> x_t like x."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.mu(t).view(shape) * x + self.sigma(t).view(shape) * eps

    def epsilon(self, model: EpsilonModel, x_t: Tensor, t: Tensor) -> Tensor:
        """eps_hat (like x_t) from the network's raw output at times t (B,)."""
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        return self.sigma(t).view(shape) * x_t + self.mu(t).view(shape) * model(x_t, t)

    def loss(self, model: EpsilonModel, x: Tensor, generator: torch.Generator,
             t: Optional[Tensor] = None, eps: Optional[Tensor] = None) -> Tensor:
        """Epsilon-prediction loss on a batch x (B, C, H, W); t ~ U(0, 1) unless given."""
        if t is None:
            t = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        if eps is None:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (self.epsilon(model, self.perturb(x, t, eps), t) - eps).square().mean()

    @torch.no_grad()
    def sample(self, model: EpsilonModel, shape: tuple[int, ...], steps: int,
               generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        """Deterministic DDIM-style integration from t=1 to t=0 in `steps` uniform steps."""
        x = torch.randn(shape, generator=generator, device=device)
        times = torch.linspace(1, 0, steps + 1, device=device)
        for t_now, t_next in zip(times[:-1], times[1:]):
            t_batch = t_now.expand(shape[0])
            eps = self.epsilon(model, x, t_batch)
            x0 = (x - self.sigma(t_now) * eps) / self.mu(t_now)
            x = self.mu(t_next) * x0 + self.sigma(t_next) * eps
        return x
