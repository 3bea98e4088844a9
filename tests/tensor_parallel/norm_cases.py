"""Inputs, float64 references and same-dtype torch baselines shared by the tensor-parallel norm tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distnorm.functional.reference import layer_norm_ref, rms_norm_ref
from distnorm.testing import assert_close_to_reference

TOKENS = 7  # over 2, 3, 4 ranks: uneven token shards
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@dataclass
class Case:
    """One global problem: full input, output gradient and full parameters (float64 masters)."""

    kind: str  # "layer" | "rms"
    x: torch.Tensor  # [TOKENS, 2, H]
    dy: torch.Tensor
    weight: torch.Tensor  # as stored (γ - 1 when zero_centered_gamma)
    bias: torch.Tensor | None
    eps: float
    zero_centered_gamma: bool = False
    output_scale: float = 1.0

    def cast(self, dtype: torch.dtype) -> Case:
        return Case(self.kind, self.x.to(dtype), self.dy.to(dtype), self.weight.to(dtype),
                    None if self.bias is None else self.bias.to(dtype), self.eps, self.zero_centered_gamma,
                    self.output_scale)


def make_case(kind: str, hidden: int, *, offset: float = 0.0, seed: int = 0, zero_centered_gamma: bool = False,
              output_scale: float = 1.0, bias: bool = True) -> Case:
    """``offset``: added to every element (std 1), so ``offset=1e3`` is the |mean|/std = 1e3 input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, 2, hidden, generator=g, dtype=torch.float64) + offset
    dy = torch.randn(TOKENS, 2, hidden, generator=g, dtype=torch.float64)
    gamma = 1.0 + 0.3 * torch.randn(hidden, generator=g, dtype=torch.float64)
    weight = gamma - 1.0 if zero_centered_gamma else gamma
    b = 0.3 * torch.randn(hidden, generator=g, dtype=torch.float64) if kind == "layer" and bias else None
    return Case(kind, x, dy, weight, b, 1e-5 if kind == "layer" else 1e-6, zero_centered_gamma, output_scale)


def _grads(case: Case, fn) -> tuple[torch.Tensor, ...]:
    x = case.x.clone().requires_grad_()
    w = case.weight.clone().requires_grad_()
    b = None if case.bias is None else case.bias.clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(case.dy.to(y.dtype))
    return y.detach(), x.grad, w.grad, (None if b is None else b.grad)


def reference(case: Case) -> tuple[torch.Tensor, ...]:
    """float64 ``(y, dx, dw, db)`` of ``case`` (already cast to the dtype under test)."""
    c = Case(case.kind, case.x.double(), case.dy.double(), case.weight.double(),
             None if case.bias is None else case.bias.double(), case.eps, case.zero_centered_gamma, case.output_scale)
    kw = {"zero_centered_gamma": c.zero_centered_gamma, "output_scale": c.output_scale}
    if c.kind == "layer":
        return _grads(c, lambda x, w, b: layer_norm_ref(x, w, b, c.eps, **kw))
    return _grads(c, lambda x, w, b: rms_norm_ref(x, w, c.eps, **kw))


def torch_baseline(case: Case) -> tuple[torch.Tensor, ...]:
    """The same computation by plain torch in the case's dtype: the error budget."""
    h = case.x.shape[-1]

    def fn(x, w, b):
        gamma = w + 1 if case.zero_centered_gamma else w
        if case.kind == "layer":
            y = F.layer_norm(x, (h,), gamma, b, case.eps)
        else:
            y = F.rms_norm(x, (h,), gamma, case.eps)
        return y * case.output_scale if case.output_scale != 1.0 else y

    return _grads(case, fn)


def check_all(actual: tuple, case: Case, names=("y", "dx", "dw", "db")) -> None:
    """Outputs and every gradient vs float64: ≤ 1e-10 for float64, else ≤ 2× torch's error + 1 ulp.

    The ulp (``finfo(dtype).eps * max|ref|``) keeps sums over tokens (dw, db), where torch's own
    error is often a lucky 0 or half an ulp, from failing on a summation order.
    """
    ref = reference(case)
    base = torch_baseline(case) if case.x.dtype != torch.float64 else ref
    for name, a, r, b in zip(names, actual, ref, base, strict=True):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == case.x.dtype, (name, a.dtype)
        if case.x.dtype == torch.float64:
            assert_close_to_reference(a, r, atol=1e-10, name=name)
        else:
            ulp = torch.finfo(case.x.dtype).eps * float(r.abs().max())
            assert_close_to_reference(a, r, baseline=b, atol=ulp, name=f"{name} {case.x.dtype}")
