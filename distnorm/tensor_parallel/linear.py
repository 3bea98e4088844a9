"""Megatron-style column- and row-parallel linear layers, with sequence parallelism.

Just enough for a tensor-parallel transformer block, the demo model and the overlap path.
Tokens live on ``sequence_dim`` (default 0: ``[tokens, hidden]`` or ``[seq, batch, hidden]``).

* ``ColumnParallelLinear``: weight ``[out_local, in]`` with ``out_local = shard_sizes(out, P)[r]``.
  Input replicated (``copy_to_group``: bwd all-reduce) or, with ``sequence_parallel=True``,
  token-sharded (``gather_along(sequence_dim)``: fwd all-gather, bwd reduce-scatter).
  Output: ``[..., out_local]``, hidden-sharded.
* ``RowParallelLinear``: weight ``[out, in_local]``. Input hidden-sharded. Output: summed over the
  group (``reduce_from_group``), or reduce-scattered along tokens (``sequence_parallel=True``), or
  left as partial sums (``reduce_output=False``; the bias is then added on TP rank 0 only, so the
  partial sums still add up to the full output).

Both initialise from a *full* weight drawn with the same generator on every rank and keep their
slice, so a TP model starts identical to its one-device twin. ``reset_parameters()`` draws again
from the generator's state at construction, so meta-device init (``device="meta"`` →
``to_empty()`` → ``reset_parameters()``) gives exactly the freshly constructed values (as
``nn.Linear``, nothing is drawn on the meta device). ``from_full`` / ``full_weight`` convert between
full and sharded parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_rank, group_size, shard_sizes
from distnorm.tensor_parallel._common import ShapeChecked

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _rank_slice(n: int, group: Group) -> slice:
    sizes = shard_sizes(n, group_size(group))
    r = group_rank(group)
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def _init_full(out_features: int, in_features: int, bias: bool, generator: torch.Generator | None,
               dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear's default init (U(-1/sqrt(in), 1/sqrt(in))), on the CPU, reproducible by seed."""
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    w = torch.empty(out_features, in_features, dtype=dtype or torch.get_default_dtype())
    w.uniform_(-bound, bound, generator=generator)
    b = None
    if bias:
        b = torch.empty(out_features, dtype=w.dtype).uniform_(-bound, bound, generator=generator)
    return w, b


class _ShardedInit(ShapeChecked):
    """``reset_parameters`` and shape checks of the parallel linears: redraw the full init, keep this rank's slice."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    in_features: int
    out_features: int
    _init_state: torch.Tensor | None

    def _local(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """nn.Linear's init of the full weight (U(±1/sqrt(in))), from the construction-time generator state."""
        if self.weight.device.type == "meta":
            return
        generator = None
        if self._init_state is not None:
            generator = torch.Generator()
            generator.set_state(self._init_state)
        w, b = _init_full(self.out_features, self.in_features, self.bias is not None, generator, self.weight.dtype)
        w, b = self._local(w, b)
        with torch.no_grad():
            self.weight.copy_(w)
            if self.bias is not None and b is not None:
                self.bias.copy_(b)


def _check_positive(name: str, value: object, cls: str, group: Group) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{cls}: {name} must be a positive int, got {value!r} (rank {group_rank(group)})")
    return value


def _check_last_dim(x: torch.Tensor, expected: int, what: str, cls: str, group: Group,
                    weight: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{cls}: input must be a floating-point tensor, got {got} "
                        f"(rank {group_rank(group)} of {group_size(group)})")
    if weight is not None and weight.device != x.device:
        raise ValueError(f"{cls}: input must be on the weight's device {weight.device}, got {x.device} "
                         f"(rank {group_rank(group)} of {group_size(group)})")
    if x.dim() == 0 or x.shape[-1] != expected:
        raise ValueError(
            f"{cls}: input last dim must be {what} = {expected}, got shape {tuple(x.shape)} "
            f"(rank {group_rank(group)} of {group_size(group)})"
        )


class ColumnParallelLinear(_ShardedInit, nn.Module):
    """``y_shard = x @ W_shard^T + b_shard``; output features split over ``group``.

    Shapes: ``x [*, in]`` (replicated) or, with ``sequence_parallel``, ``x_shard`` with this rank's
    tokens on ``sequence_dim`` -> ``y_shard [*, out_local]`` for *all* tokens.
    Collectives (P > 1): replicated input: fwd none, bwd 1 all-reduce of the input gradient.
    Sequence parallel: fwd 1 all-gather of the input along tokens, bwd 1 reduce-scatter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: Group = None,
                 sequence_parallel: bool = False, sequence_dim: int = 0, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = _check_positive("in_features", in_features, "ColumnParallelLinear", group)
        self.out_features = _check_positive("out_features", out_features, "ColumnParallelLinear", group)
        self.group, self.sequence_parallel, self.sequence_dim = group, sequence_parallel, sequence_dim
        self._init_state = None if generator is None else generator.get_state()
        rows = shard_sizes(out_features, group_size(group))[group_rank(group)]
        factory: dict[str, Any] = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.weight = nn.Parameter(torch.empty(rows, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(rows, **factory)) if bias else None
        self.reset_parameters()

    def _local(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = _rank_slice(self.out_features, self.group)
        return w[rows], None if b is None else b[rows]

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        rows = shard_sizes(self.out_features, group_size(self.group))[group_rank(self.group)]
        what = f"this rank's rows shard_sizes({self.out_features}, {group_size(self.group)})"
        return {"weight": ((rows, self.in_features), what), "bias": ((rows,), what)}

    @classmethod
    def from_full(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs: object) -> ColumnParallelLinear:
        """Build from a full ``[out, in]`` weight (and ``[out]`` bias), keeping this rank's rows."""
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, bias is not None, dtype=weight.dtype, **kwargs)  # type: ignore[arg-type]
        rows = _rank_slice(out_f, mod.group)
        with torch.no_grad():
            mod.weight.copy_(weight[rows])
            if bias is not None and mod.bias is not None:
                mod.bias.copy_(bias[rows])
        return mod

    def full_weight(self) -> torch.Tensor:
        """The full ``[out, in]`` weight (1 all-gather; for checkpoints and tests, not training)."""
        return comm.all_gather_uneven(self.weight.detach(), self.group, dim=0,
                                      sizes=shard_sizes(self.out_features, group_size(self.group)))

    def forward(self, x: torch.Tensor, *, num_tokens: int | None = None) -> torch.Tensor:
        """``num_tokens``: the global token count, needed with ``sequence_parallel`` when it does
        not divide evenly (shards then follow ``shard_sizes(num_tokens, P)``); ``None`` means every
        rank holds as many tokens as this one."""
        self.check_parameters()
        _check_last_dim(x, self.in_features, "in_features", "ColumnParallelLinear", self.group, self.weight)
        if self.sequence_parallel:
            sizes = None if num_tokens is None else shard_sizes(num_tokens, group_size(self.group))
            x = comm.gather_along(x, self.group, dim=self.sequence_dim, sizes=sizes)
        else:
            x = comm.copy_to_group(x, self.group)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}, group_size={group_size(self.group)}")


class RowParallelLinear(_ShardedInit, nn.Module):
    """``y = sum_r x_shard_r @ W_shard_r^T + b``; input features split over ``group``.

    Shapes: ``x_shard [*, in_local]`` -> ``y [*, out]`` (all tokens), or with
    ``sequence_parallel`` this rank's tokens ``shard_sizes(tokens, P)[r]`` on ``sequence_dim``, or
    with ``reduce_output=False`` the partial sums ``[*, out]`` (bias on TP rank 0 only).
    Collectives (P > 1): fwd 1 all-reduce of the output (or 1 reduce-scatter along tokens, or
    none with ``reduce_output=False``); bwd none, or for sequence parallel 1 all-gather of the
    output gradient plus 1 all-reduce of the bias gradient (``out`` numbers), or with
    ``reduce_output=False`` and a bias 1 all-reduce of the bias gradient (``out`` numbers).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: Group = None,
                 sequence_parallel: bool = False, reduce_output: bool = True, sequence_dim: int = 0,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = _check_positive("in_features", in_features, "RowParallelLinear", group)
        self.out_features = _check_positive("out_features", out_features, "RowParallelLinear", group)
        if sequence_parallel and not reduce_output:
            raise ValueError(
                "RowParallelLinear: sequence_parallel=True needs reduce_output=True (the reduce-scatter "
                f"is the reduction); got reduce_output=False (rank {group_rank(group)})"
            )
        self.group, self.sequence_parallel, self.sequence_dim = group, sequence_parallel, sequence_dim
        self.reduce_output = reduce_output
        self._init_state = None if generator is None else generator.get_state()
        self.in_local = _rank_slice(in_features, group)
        factory: dict[str, Any] = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local.stop - self.in_local.start, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def _local(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return w[:, self.in_local], b

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        cols = self.in_local.stop - self.in_local.start
        what = f"this rank's columns shard_sizes({self.in_features}, {group_size(self.group)}); bias replicated"
        return {"weight": ((self.out_features, cols), what), "bias": ((self.out_features,), what)}

    @classmethod
    def from_full(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs: object) -> RowParallelLinear:
        """Build from a full ``[out, in]`` weight (and ``[out]`` bias), keeping this rank's columns."""
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, bias is not None, dtype=weight.dtype, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            mod.weight.copy_(weight[:, mod.in_local])
            if bias is not None and mod.bias is not None:
                mod.bias.copy_(bias)
        return mod

    def full_weight(self) -> torch.Tensor:
        """The full ``[out, in]`` weight (1 all-gather; for checkpoints and tests, not training)."""
        return comm.all_gather_uneven(self.weight.detach(), self.group, dim=1,
                                      sizes=shard_sizes(self.in_features, group_size(self.group)))

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        self.check_parameters()
        _check_last_dim(x_shard, self.weight.shape[1], "the local in_features shard", "RowParallelLinear", self.group,
                        self.weight)
        partial = F.linear(x_shard, self.weight)
        if not self.reduce_output:
            if self.bias is None:
                return partial
            # The bias enters the sum once (rank 0's partial), but every rank holds a replica: the
            # copy's backward all-reduce hands each replica the full gradient, so none drifts.
            bias = comm.copy_to_group(self.bias, self.group)
            return partial + bias if group_rank(self.group) == 0 else partial + 0.0 * bias
        if self.sequence_parallel:
            y = comm.reduce_scatter_along(partial, self.group, dim=self.sequence_dim)
            # the replicated bias meets only this rank's tokens: its gradient is summed over ranks
            return y + comm.copy_to_group(self.bias, self.group) if self.bias is not None else y
        y = comm.reduce_from_group(partial, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, "
                f"reduce_output={self.reduce_output}, group_size={group_size(self.group)}")
