"""LayerNorm removal at inference: calibrate each LayerNorm/RMSNorm's ``1/σ`` once, then keep it fixed.

A LayerNorm computes ``y = γ·(x - mean(x))·rstd(x) + β`` with ``rstd(x) = 1/sqrt(var(x) + eps)``
per token. ``freeze_norms(model, batches, group=)`` runs ``batches`` through the model, averages
``var + eps`` over every calibration token (all ranks of ``group``) and replaces the norm by
:class:`FrozenScaleNorm`, which uses that one constant ``rstd`` for every token:

    y = γ · (x - mean(x)) · rstd + β          (RMSNorm: y = γ · x · rstd)

What is fixed, and why the centring stays: only ``rstd``. The per-token mean is input-dependent
too, but ``x ↦ x - mean(x)`` is *linear* (``x·C`` with ``C = I - 11ᵀ/H``), so the frozen norm is an
exact affine map ``x ↦ x·C·diag(γ·rstd) + β`` that ``distnorm.fold_norms`` folds into the Linear
layers around it (consumer: ``W ← (W·diag(γ·rstd))·C``, each row recentred; producer:
``W ← diag(γ·rstd)·C·W``), leaving nothing of the norm at inference. Dropping the centring
instead would change the function wherever the residual stream has a non-zero mean; keeping it
costs nothing once folded. ``rstd = 1/sqrt(mean_tokens(var + eps))`` is the norm's own formula
with the variance averaged over the calibration tokens; on the demo model five candidate
constants gave losses within 0.016 of each other, this one the lowest for LayerNorm and 0.003
above the lowest for RMSNorm (docs/conversion.md, ``benchmarks/bench_freeze_constant.py``).

Collectives of :func:`freeze_norms`: **one** all-reduce over ``group`` for the whole model (2
float64 numbers per norm, ``[Σ(var + eps), tokens]``, and 2 for the batch count), none when
``group`` is None or of size 1.
Hidden-sharded norms also all-reduce ``[Σx, Σx²]`` per token (16 B/token) over their own group
once per calibration batch, as their own forward does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_rank, group_size
from distnorm.convert import _run, _zero_centered, norm_kind
from distnorm.tensor_parallel import (
    SequenceParallelLayerNorm,
    SequenceParallelNorm,
    ShardedLayerNorm,
    ShardedNorm,
    SingleScaleRMSNorm,
)
from distnorm.tensor_parallel._common import (
    DeferredGradSync,
    NormBase,
    check_float,
    check_inputs,
    where,
)

__all__ = ["FrozenScaleNorm", "freeze_norms"]

PARALLEL_FORMS = ("sequence", "sharded")


class FrozenScaleNorm(NormBase, DeferredGradSync):
    """A LayerNorm (``center=True``) or RMSNorm whose ``rstd = 1/σ`` is one calibrated constant.

    ``y = output_scale · (γ · (x - mean(x)) · rstd + β)`` (``center=False``: no ``- mean(x)``; γ is
    ``1 + weight`` with ``zero_centered_gamma``). An affine map of ``x``: ``fold_norms`` folds it
    into the neighbouring Linear layers (:meth:`fold_scale_shift`, :attr:`center`).
    :func:`freeze_norms` builds it from a trained norm, keeping that norm's ``weight``/``bias``
    Parameter objects (an optimizer holding them trains on); ``weight`` and ``bias`` stay
    learnable, ``rstd`` is a buffer (saved in the state dict).

    ``parallel="sequence"`` (default): ``x [*, H]`` holds this rank's tokens, parameters replicated;
    ``parallel="sharded"``: ``x [*, H_local]``, ``H_local = shard_sizes(H, P)[rank]``, parameters
    this rank's columns. ``weight``/``bias`` have shape ``param_shape``: ``(H,)`` (sequence),
    ``(shard_sizes(H, P)[rank],)`` (sharded), ``(1,)`` (``single_scale``, no bias); another shape,
    assigned, loaded or passed through ``torch.func.functional_call``, is a ValueError (RuntimeError
    from ``load_state_dict``) naming the parameter, both shapes and the rank, never a broadcast.
    Output shape and dtype of ``x``; computed in float32 (float64 for float64 ``x``). Collectives (P > 1): sequence: fwd none; bwd 1 all-reduce of the ``H`` (``2H`` with a
    bias) parameter-gradient numbers (``grad_sync="backward"``) or none (``"deferred"``:
    ``sync_sequence_parallel_grads``). Sharded with ``center``: fwd 1 all-reduce of 1 number/token
    (Σx), bwd 1 all-reduce of 1 number/token; sharded without: none. ``group`` None or P == 1: none.
    """

    rstd: torch.Tensor

    def __init__(
        self,
        normalized_shape: int | tuple[int],
        rstd: float = 1.0,
        *,
        center: bool = True,
        elementwise_affine: bool = True,
        bias: bool = True,
        zero_centered_gamma: bool = False,
        single_scale: bool = False,
        output_scale: float = 1.0,
        parallel: str = "sequence",
        grad_sync: str = "backward",
        group: Group = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        cls = "FrozenScaleNorm"
        if parallel not in PARALLEL_FORMS:
            raise ValueError(f"{cls}: parallel must be one of {PARALLEL_FORMS}, got {parallel!r} {where(group)}")
        self._init_rstd = check_float(cls, "rstd", rstd, group, positive=True)
        # a single-scale norm keeps one gain (shape (1,)) and no bias, as SingleScaleRMSNorm
        super().__init__(cls, normalized_shape, 0.0, elementwise_affine and not single_scale,
                         bias and not single_scale, sharded=parallel == "sharded",
                         single_scale=single_scale and elementwise_affine, zero_centered_gamma=zero_centered_gamma,
                         output_scale=output_scale, group=group, dtype=dtype, device=device)
        del self.eps  # folded into rstd: a frozen norm has none
        self.center, self.single_scale, self.parallel = bool(center), bool(single_scale), parallel
        self.init_grad_sync(cls, grad_sync, group)
        self.register_buffer("rstd", torch.tensor(self._init_rstd, dtype=torch.float64, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1 (stored as 0 with ``zero_centered_gamma``), β = 0, ``rstd`` = the constructor's value."""
        super().reset_parameters()
        if "rstd" in self._buffers:  # not yet while the base class initialises
            with torch.no_grad():
                self.rstd.fill_(self._init_rstd)

    @property
    def sharded(self) -> bool:
        return self.parallel == "sharded" and group_size(self.group) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = type(self).__name__
        self.check_parameters()  # weight / bias still of param_shape: a broadcast would be silently wrong
        what = "this rank's hidden shard" if self.sharded else "normalized_shape"
        check_inputs(cls, x, self.weight, self.bias, self.local_size, what, self.group)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight, bias = self._replicated_params()
        xs = x.to(compute)
        if self.center:
            if self.sharded:  # the full-hidden mean: all-reduce forward and backward (each rank uses it)
                total = comm.reduce_from_group(comm.copy_to_group(xs.sum(-1, keepdim=True), self.group), self.group)
                xs = xs - total / self.hidden
            else:
                xs = xs - xs.mean(-1, keepdim=True)
        y = xs * self.rstd.to(compute)
        if weight is not None:
            y = y * ((weight.to(compute) + 1.0) if self.zero_centered_gamma else weight.to(compute))
        if bias is not None:
            y = y + bias.to(compute)
        if self.output_scale != 1.0:
            y = y * self.output_scale
        return y.to(x.dtype)

    def _replicated(self) -> list[nn.Parameter]:
        """Parameters replicated over ``group`` whose gradients are per-rank partial sums: γ and β in
        the sequence form, the single scale in both forms."""
        if group_size(self.group) == 1:
            return []
        if self.parallel == "sequence":
            return [p for p in (self.weight, self.bias) if p is not None]
        return [self.weight] if self.single_scale and self.weight is not None else []

    def deferred_parameters(self) -> list[nn.Parameter]:
        """The replicated parameters (``grad_sync="deferred"``), for ``sync_sequence_parallel_grads``."""
        return [p for p in self._replicated() if p.requires_grad] if self.grad_sync == "deferred" else []

    def _replicated_params(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``grad_sync="backward"``: the replicated parameters through one ``copy_to_group`` (their
        gradients summed over ``group`` in one all-reduce); otherwise as they are."""
        weight, bias = self.weight, self.bias
        params = self._replicated() if self.grad_sync == "backward" else []
        if not params:
            return weight, bias
        flat = comm.copy_to_group(torch.cat([p.reshape(-1) for p in params]), self.group)
        synced = dict(zip((id(p) for p in params), flat.split([p.numel() for p in params]), strict=True))
        return (synced[id(weight)].view_as(weight) if id(weight) in synced else weight,
                synced[id(bias)].view_as(bias) if id(bias) in synced else bias)

    def fold_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The map as ``(scale, shift)``, float64 ``[H]`` each: ``y = C(x)·scale + shift``, ``C(x)`` =
        ``x - mean(x)`` with :attr:`center`, else ``x``.

        A hidden-sharded norm (P > 1) holds only its columns: ValueError.
        """
        if self.sharded:
            raise ValueError(f"FrozenScaleNorm.fold_scale_shift: a hidden-sharded norm holds only its "
                             f"{self.local_size} of {self.hidden} columns; expected parallel='sequence' "
                             f"or a group of size 1 {where(self.group)}")
        h = self.hidden
        gamma = torch.ones(h, dtype=torch.float64, device=self.rstd.device)
        if self.weight is not None:
            gamma = gamma * (self.weight.detach().double() + (1.0 if self.zero_centered_gamma else 0.0))
        scale = gamma * self.rstd.double() * self.output_scale
        shift = (self.bias.detach().double() * self.output_scale if self.bias is not None
                 else torch.zeros(h, dtype=torch.float64, device=scale.device))
        return scale, shift

    @property
    def channel_dim(self) -> int:
        """The channels of the affine map are the last dim (for ``fold_norms``)."""
        return -1

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape}" + (f" (local {self.local_size})" if self.sharded else "")
        s += f", rstd={float(self.rstd):.6g}, center={self.center}, elementwise_affine={self.weight is not None}"
        for flag in ("zero_centered_gamma", "single_scale"):
            s += f", {flag}=True" if getattr(self, flag) else ""
        s += f", output_scale={self.output_scale:g}" if self.output_scale != 1.0 else ""
        return s + f", parallel={self.parallel!r}, grad_sync={self.grad_sync!r}, group_size={group_size(self.group)}"


# ------------------------------------------------------------------------------------------------
# Recognising the norms to freeze
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Spec:
    """What a norm is, for calibration and for building its :class:`FrozenScaleNorm`."""

    hidden: int
    eps: float
    center: bool
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    zero_centered_gamma: bool
    single_scale: bool
    output_scale: float
    parallel: str
    grad_sync: str
    group: Group


def _hidden(module: nn.Module, normalized_shape: Any) -> int:
    """The hidden size of a norm over the last dim; a norm over several trailing dims is a ValueError."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"freeze_norms: {type(module).__name__} normalises over normalized_shape={shape}; expected "
                         f"a norm over the last dim only (a one-element normalized_shape) "
                         f"{where(getattr(module, 'group', None))}")
    return int(shape[0])


def _spec(module: nn.Module) -> _Spec | None:
    """The :class:`_Spec` of a LayerNorm/RMSNorm ``freeze_norms`` can freeze, else None."""
    m: Any = module
    if isinstance(module, (SequenceParallelNorm, ShardedNorm, SingleScaleRMSNorm)):
        parallel = "sharded" if isinstance(module, ShardedNorm) else getattr(m, "parallel", "sequence")
        return _Spec(_hidden(module, m.normalized_shape), m.eps, isinstance(module, (SequenceParallelLayerNorm, ShardedLayerNorm)),
                     m.weight, m.bias, m.zero_centered_gamma, isinstance(module, SingleScaleRMSNorm),
                     m.output_scale, parallel,
                     getattr(m, "grad_sync", "backward"), m.group)
    kind = norm_kind(module)
    if kind not in ("layer_norm", "rms_norm"):
        return None
    weight: Any = getattr(m, "weight", None)
    bias = getattr(m, "bias", None)
    hidden = _hidden(module, m.normalized_shape) if hasattr(m, "normalized_shape") else int(weight.shape[0])
    eps = getattr(m, "eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        eps = getattr(m, "variance_epsilon", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):  # torch RMSNorm(eps=None): finfo(dtype).eps
        eps = torch.finfo(weight.dtype if isinstance(weight, torch.Tensor) else torch.float32).eps
    return _Spec(hidden, float(eps), kind == "layer_norm", weight if isinstance(weight, nn.Parameter) else None,
                 bias if isinstance(bias, nn.Parameter) else None, kind == "rms_norm" and _zero_centered(module),
                 False, 1.0, "sequence", "backward", None)


def _frozen(spec: _Spec, rstd: float, training: bool) -> FrozenScaleNorm:
    """The :class:`FrozenScaleNorm` of ``spec``, holding the norm's own Parameter objects."""
    ref = spec.weight if spec.weight is not None else spec.bias
    new = FrozenScaleNorm(spec.hidden, rstd, center=spec.center,
                          elementwise_affine=spec.weight is not None or spec.bias is not None,
                          bias=spec.bias is not None,
                          zero_centered_gamma=spec.zero_centered_gamma,
                          single_scale=spec.single_scale, output_scale=spec.output_scale,
                          parallel=spec.parallel, grad_sync=spec.grad_sync, group=spec.group,
                          device=ref.device if ref is not None else None)
    new.weight, new.bias = spec.weight, spec.bias  # shared: the optimizer's Parameters stay the model's
    return new.train(training)


def _ranks(group: Group) -> set[int]:
    return {0} if group is None else set(dist.get_process_group_ranks(group))


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------


def token_variance(x: torch.Tensor, hidden: int, *, center: bool, group: Group = None) -> torch.Tensor:
    """Per-token ``var(x)`` (``center``) or ``mean(x²)`` over the hidden dim, float64 ``[tokens]``.

    ``x [*, H]``, or ``x_shard [*, H_local]`` with ``group`` the hidden-sharding group (P > 1): then
    1 all-reduce of ``[Σx, Σx²]`` per token (16 B/token) over ``group``. No autograd.
    """
    x64 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if group_size(group) == 1:
        if x64.shape[0] == 0:
            return x64.new_zeros(0)
        return x64.var(-1, unbiased=False) if center else x64.pow(2).mean(-1)
    sums = comm.all_reduce_(torch.stack([x64.sum(-1), x64.pow(2).sum(-1)]), group)
    mean_sq = sums[1] / hidden
    return (mean_sq - (sums[0] / hidden).pow(2)).clamp_min(0.0) if center else mean_sq


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


@torch.no_grad()
def freeze_norms(model: nn.Module, batches: Iterable[Any], *, group: Group = None) -> nn.Module:
    """Replace every LayerNorm/RMSNorm of ``model`` by its :class:`FrozenScaleNorm`, calibrated on ``batches``.

    Frozen: ``torch.nn.LayerNorm`` (1-D shape), ``torch.nn.RMSNorm``, Hugging Face ``*RMSNorm``
    (duck-typed, Gemma's ``1 + weight`` included), and distnorm's ``SequenceParallel*``,
    ``Sharded*`` and ``SingleScaleRMSNorm``. Each norm's ``rstd = 1/sqrt(mean(var + eps))`` over
    every token it sees while ``batches`` (each a tensor, tuple of positional arguments or kwargs
    dict, as for ``fold_norms``) run through the model in eval mode (restored afterwards), pooled
    over ``group``: the group whose ranks hold different calibration tokens (the DP group; all
    ranks when the norms are sequence-parallel, whose own group must then lie inside ``group``).
    The new modules keep the norms' weight/bias Parameters, training flag and attribute names.
    Returns the model (or the replacement if ``model`` itself is a norm), modified in place.

    Collectives: 1 all-reduce over ``group`` of ``2 × (norms + 1)`` float64 numbers (per norm
    ``[Σ(var + eps), tokens]``, then the batch count; none for ``group`` None or of size 1), plus, per calibration batch and hidden-sharded norm (P > 1), 1 all-reduce
    of 16 B/token over the norm's group. A norm that saw no token on any rank, an empty
    ``batches``, or a sequence-parallel group outside ``group`` is a ValueError (on every rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_norms: model must be an nn.Module, got {type(model).__name__}")
    size, rank = group_size(group), group_rank(group)
    found = _find(model)
    if not found:
        raise ValueError(f"freeze_norms: found no LayerNorm/RMSNorm to freeze in {type(model).__name__} "
                         f"(rank {rank} of {size})")
    outer = _ranks(group)
    for name, (_, spec) in found.items():
        if spec.parallel == "sequence" and group_size(spec.group) > 1 and not _ranks(spec.group) <= outer:
            raise ValueError(
                f"freeze_norms: norm {name!r} splits its tokens over a group of ranks {sorted(_ranks(spec.group))} "
                f"that group={sorted(outer)} does not contain; pass the group spanning every calibration token "
                f"(e.g. all ranks) (rank {rank} of {size})")
    sums, device = _calibrate(model, found, batches)
    packed = torch.stack(sums).to(device)  # [norms + 1, 2]: Σ(var + eps), tokens; last row: batches, 0
    comm.all_reduce_(packed, group)
    totals = packed.cpu().tolist()
    if totals.pop()[0] == 0:  # decided after the all-reduce: every rank agrees, none waits
        raise ValueError(f"freeze_norms: batches is empty on every rank; expected at least one calibration batch "
                         f"(rank {rank} of {size})")
    for (name, (module, spec)), (total, count) in zip(found.items(), totals, strict=True):
        if count == 0:
            raise ValueError(f"freeze_norms: norm {name!r} ({type(module).__name__}) saw no token in the calibration "
                             f"batches on any rank; expected every norm to run (rank {rank} of {size})")
        # all-constant inputs with eps = 0 (total 0) normalise to 0 whatever rstd is: take 1
        frozen = _frozen(spec, (total / count) ** -0.5 if total > 0 else 1.0, module.training)
        if not name:
            return frozen
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, frozen)
    return model


def _find(model: nn.Module) -> dict[str, tuple[nn.Module, _Spec]]:
    """Freezable norms by name, top-down (a freezable module's children are not visited)."""
    found: dict[str, tuple[nn.Module, _Spec]] = {}

    def visit(name: str, module: nn.Module) -> None:
        spec = _spec(module)
        if spec is not None:
            found[name] = (module, spec)
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found


def _calibrate(model: nn.Module, found: dict[str, tuple[nn.Module, _Spec]],
               batches: Iterable[Any]) -> tuple[list[torch.Tensor], torch.device]:
    """Run ``batches`` in eval mode; per norm, this rank's float64 ``[Σ(var + eps), tokens]``, then
    ``[batches, 0]``; and the device of the norms' inputs (where the all-reduce runs)."""
    sums = [torch.zeros(2, dtype=torch.float64) for _ in range(len(found) + 1)]
    param = next(model.parameters(), None)
    device = [param.device if param is not None else torch.device("cpu")]

    def hook_for(i: int, spec: _Spec) -> Any:
        sharding = spec.group if spec.parallel == "sharded" else None

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_tensor(args, kwargs)
            if x is None:
                return
            var = token_variance(x, spec.hidden, center=spec.center, group=sharding)
            sums[i] += torch.stack([(var + spec.eps).sum(), var.new_tensor(var.numel())]).cpu()
            device[0] = x.device

        return hook

    training = {m: m.training for m in model.modules()}
    handles = [module.register_forward_pre_hook(hook_for(i, spec), with_kwargs=True)
               for i, (module, spec) in enumerate(found.values())]
    try:
        model.eval()
        for batch in batches:
            _run(model, batch)
            sums[-1][0] += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return sums, device[0]
