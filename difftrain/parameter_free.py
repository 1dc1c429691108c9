"""Optimizers that set their own step size: DoWG (scalar and per coordinate) and AdaCoor.

EveryDream2 offers them as `scalar_dowg`, `coordinate_dowg` and `adacoor`. DoWG is Algorithm 1 of
Khaled, Mishchenko and Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free Gradient Descent
Method" (NeurIPS 2023): with x_0 the starting weights and r_eps > 0 a small first guess of the distance
to travel,

    r_t^2 = max(r_{t-1}^2, |x_t - x_0|^2)        (r_{-1} = r_eps)
    v_t   = v_{t-1} + r_t^2 |g_t|^2              (v_{-1} = 0)
    x_{t+1} = x_t - (r_t^2 / sqrt(v_t)) g_t

ScalarDoWG takes |.| over all the optimizer's parameters as one vector, as the paper does;
CoordinateDoWG runs the same recursion for every coordinate on its own (the `dowg` package's
coordinate variant, which EveryDream2 installs). That package is not used: its ScalarDoWG only
steps when given a closure (EveryDream2's loop passes none) and keeps CPU tensors beside GPU weights.
Here r_eps = eps * (1 + |x_0|), the scale-aware first guess of DoG (Ivgi et al., 2023).

AdaCoor is EveryDream2's optimizer/adacoor.py: an AdaGrad whose step is set by eps alone,
v += eps g^2 (kept in bfloat16, as there), x -= eps g / (sqrt(v) + eps).

None of them reads lr: a group's lr is kept (schedules report it) but changes nothing, as in
EveryDream2; `sets_own_step_size` tells difftrain/optim.py to let the schedule step aside.
Every running quantity lives in the optimizer state, so a checkpoint resumes them exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


class _OwnStepSize(torch.optim.Optimizer):
    sets_own_step_size = True

    def __init__(self, params: Any, lr: float = 1.0, eps: float = 1e-4) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to each weight's dtype; these keep their own (float32 sums,
        # AdaCoor's bfloat16), and the saved values came from those, so casting back is exact.
        indices = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in zip(indices, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value):
                    self.state[param][key] = self.state[param][key].to(value.dtype)

    def _trainable(self):
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @staticmethod
    def _closure_loss(closure: Optional[Callable[[], Any]]) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # v is 0 only where every gradient so far was 0; the numerator is 0 there too, so the step is 0.
    return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)


class ScalarDoWG(_OwnStepSize):
    """DoWG over all parameters as one vector. `eps`: r_eps = eps * (1 + |x_0|)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        loss = self._closure_loss(closure)
        params = self._trainable()
        if not params:
            return loss
        totals = self.state[self.param_groups[0]["params"][0]]  # the recursion's two numbers
        if "weighted_sum" not in totals:
            start_norm_sq = sum(p.detach().float().pow(2).sum() for p in params)
            eps = self.param_groups[0]["eps"]
            totals["distance_sq"] = (eps * (1 + start_norm_sq.sqrt())) ** 2
            totals["weighted_sum"] = torch.zeros_like(totals["distance_sq"])
        for p in params:
            if "start" not in self.state[p]:
                self.state[p]["start"] = p.detach().float().clone()
        moved_sq = sum((p.float() - self.state[p]["start"]).pow(2).sum() for p in params)
        grad_sq = sum(p.grad.float().pow(2).sum() for p in params)
        totals["distance_sq"] = torch.maximum(totals["distance_sq"], moved_sq)
        totals["weighted_sum"] += totals["distance_sq"] * grad_sq
        step_size = _safe_divide(totals["distance_sq"], totals["weighted_sum"].sqrt())
        for p in params:
            p.sub_((step_size * p.grad.float()).to(p.dtype))
        return loss


class CoordinateDoWG(_OwnStepSize):
    """DoWG for every coordinate on its own. `eps`: r_eps,i = eps * (1 + |x_0,i|)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, weights, grad = self.state[p], p.float(), p.grad.float()
                if "start" not in state:
                    state["start"] = weights.clone()
                    state["distance_sq"] = (group["eps"] * (1 + weights.abs())) ** 2
                    state["weighted_sum"] = torch.zeros_like(weights)
                torch.maximum(state["distance_sq"], (weights - state["start"]).pow(2), out=state["distance_sq"])
                state["weighted_sum"].addcmul_(state["distance_sq"], grad.pow(2))
                update = _safe_divide(state["distance_sq"] * grad, state["weighted_sum"].sqrt())
                p.sub_(update.to(p.dtype))
        return loss


class AdaCoor(_OwnStepSize):
    """EveryDream2's AdaCoor: v += eps g^2 in bfloat16; x -= eps g / (sqrt(v) + eps). Default eps 1e-8
    (EveryDream2's optimizer.json epsilon)."""

    def __init__(self, params: Any, lr: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__(params, lr, eps)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            # EveryDream2 rounds eps to bfloat16 where it scales the gradient, and adds it unrounded
            # to the bfloat16 root; both kept here, so the steps match its own.
            scale = torch.tensor(group["eps"], dtype=torch.bfloat16).item()
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad.float()
                if "sum_sq" not in state:
                    state["sum_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["sum_sq"].add_((scale * grad.pow(2)).to(torch.bfloat16))
                denominator = state["sum_sq"].sqrt().add_(group["eps"]).float()
                p.sub_((scale * grad / denominator).to(p.dtype))
        return loss
