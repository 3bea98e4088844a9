"""Model surgery for norms: swap them for distributed ones, fold them away, or turn Pre-LN into Pre-RMSNorm.

* ``convert_norms(model, factory)`` walks the module tree and replaces every module for which
  ``factory(module)`` returns a new module (parameters and buffers copied by the factory).
  Factories: ``to_sequence_parallel(group)``, ``to_sharded(group)`` (tensor parallel; LayerNorm and
  RMSNorm), ``to_sync_batch_norm(group)``, ``to_power_norm(group)``, ``to_unified_norm(group)``
  (data parallel; BatchNorm). Recognised norms: ``torch.nn.LayerNorm`` (1-D ``normalized_shape``),
  ``torch.nn.RMSNorm``, ``torch.nn.BatchNorm{1,2,3}d`` and Hugging Face ``*RMSNorm`` modules
  (duck-typed: a 1-D ``weight`` and ``eps`` or ``variance_epsilon``; Gemma's ``1 + weight`` form maps
  to ``zero_centered_gamma=True``).
* ``fold_norms(model, example_inputs)``: in eval, a per-channel norm (BatchNorm and the like,
  ``distnorm.FrozenScaleNorm``) is an affine map ``y = s·x + t`` that moves back into the Linear /
  Conv producing its input (the Conv–BN fold) or forward into the Linear layers consuming its
  output, and disappears; a LayerNorm/RMSNorm is ``y = s·n(x) + t`` and moves ``s``, ``t`` into
  its consumers, keeping only ``n``.
* ``pre_ln_to_pre_rmsnorm(model)``: the exact Pre-LN -> Pre-RMSNorm transform of "Pre-RMSNorm
  and Pre-CRMSNorm Transformers" (Jiang et al., 2023) for GPT-2-style models.

Conversion runs on each rank with its own group; it issues no collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distnorm.comm import Group, group_rank, group_size, shard_offsets, shard_sizes
from distnorm.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear

__all__ = [
    "FoldedNorm",
    "NormFactory",
    "convert_norms",
    "fold_norms",
    "norm_kind",
    "pre_ln_to_pre_rmsnorm",
    "to_power_norm",
    "to_sequence_parallel",
    "to_sharded",
    "to_sync_batch_norm",
    "to_unified_norm",
]

NormFactory = Callable[[nn.Module], "nn.Module | None"]


# ------------------------------------------------------------------------------------------------
# Recognising norms
# ------------------------------------------------------------------------------------------------


def _is_distnorm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("distnorm.")


def norm_kind(module: nn.Module) -> str | None:
    """``"layer_norm"``, ``"rms_norm"``, ``"batch_norm"`` or None for a module distnorm can replace.

    distnorm's own modules are None (already converted).
    """
    if _is_distnorm(module):
        return None
    if isinstance(module, nn.LayerNorm):
        return "layer_norm" if len(module.normalized_shape) == 1 else None
    if isinstance(module, nn.RMSNorm):
        return "rms_norm" if len(module.normalized_shape) == 1 else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch_norm"
    weight = getattr(module, "weight", None)
    if (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and _rms_eps(module) is not None and getattr(module, "bias", None) is None):
        return "rms_norm"
    return None


def _rms_eps(module: nn.Module) -> float | None:
    for name in ("eps", "variance_epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if isinstance(module, nn.RMSNorm):  # eps=None: torch uses finfo(x.dtype).eps
        return float(torch.finfo(module.weight.dtype if module.weight is not None else torch.float32).eps)
    return None


def _zero_centered(module: nn.Module) -> bool:
    """HF Gemma-style RMSNorm computes ``x̂ · (1 + weight)``: distnorm's ``zero_centered_gamma``."""
    return "Gemma" in type(module).__name__


def _norm_args(norm: nn.Module) -> dict[str, Any]:
    module: Any = norm
    weight: Any = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    ref = weight if isinstance(weight, torch.Tensor) else None
    return {
        "hidden": int(module.normalized_shape[0]) if hasattr(module, "normalized_shape") else int(weight.shape[0]),
        "eps": float(module.eps) if isinstance(getattr(module, "eps", None), (int, float)) else _rms_eps(module),
        "weight": ref,
        "bias": bias if isinstance(bias, torch.Tensor) else None,
        "dtype": ref.dtype if ref is not None else None,
        "device": ref.device if ref is not None else None,
    }


# ------------------------------------------------------------------------------------------------
# convert_norms and the factories
# ------------------------------------------------------------------------------------------------


def convert_norms(model: nn.Module, factory: NormFactory) -> nn.Module:
    """Replace, in place, every submodule ``m`` with ``factory(m)`` when that is not None; return the model.

    The walk is top-down: a replaced module's children are not visited. If ``factory`` accepts
    ``model`` itself the replacement is returned. Training/eval mode carries over.
    Collectives: none (the factories only copy this rank's slice of each parameter).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_norms: model must be an nn.Module, got {type(model).__name__}")
    if not callable(factory):
        raise TypeError(f"convert_norms: factory must be callable (module -> module | None), got {factory!r}")
    root = _replace(model, factory)
    if root is not None:
        return root
    _convert_children(model, factory)
    return model


def _replace(module: nn.Module, factory: NormFactory) -> nn.Module | None:
    new = factory(module)
    if new is None or new is module:
        return None
    if not isinstance(new, nn.Module):
        raise TypeError(f"convert_norms: factory returned {type(new).__name__} for {type(module).__name__}, "
                        "expected an nn.Module or None")
    new.train(module.training)
    return new


def _convert_children(module: nn.Module, factory: NormFactory) -> None:
    for name, child in list(module.named_children()):
        new = _replace(child, factory)
        if new is not None:
            setattr(module, name, new)
        else:
            _convert_children(child, factory)


def _copy_(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    if dst is not None and src is not None:
        with torch.no_grad():
            dst.copy_(src)


def to_sequence_parallel(group: Group, *, grad_sync: str = "backward") -> NormFactory:
    """LayerNorm / RMSNorm -> ``SequenceParallelLayerNorm`` / ``SequenceParallelRMSNorm`` over ``group``.

    Parameters are copied whole (replicated). Use where the norm's input is token-sharded over
    ``group``; each rank's weight gradient is then summed over ``group`` in backward.
    """
    from distnorm.tensor_parallel import SequenceParallelLayerNorm, SequenceParallelRMSNorm

    def factory(module: nn.Module) -> nn.Module | None:
        kind = norm_kind(module)
        if kind not in ("layer_norm", "rms_norm"):
            return None
        a = _norm_args(module)
        common = {"group": group, "grad_sync": grad_sync, "dtype": a["dtype"], "device": a["device"]}
        new: nn.Module
        if kind == "layer_norm":
            new = SequenceParallelLayerNorm(a["hidden"], a["eps"], a["weight"] is not None, a["bias"] is not None,
                                            **common)
        else:
            new = SequenceParallelRMSNorm(a["hidden"], a["eps"], a["weight"] is not None,
                                          zero_centered_gamma=_zero_centered(module), **common)
        _copy_(new.weight, a["weight"])
        _copy_(new.bias, a["bias"])
        return new

    return factory


def to_sharded(group: Group) -> NormFactory:
    """LayerNorm / RMSNorm -> ``ShardedLayerNorm`` / ``ShardedRMSNorm`` holding this rank's slice.

    Rank r keeps ``weight[shard_offsets(H, P)[r] : + shard_sizes(H, P)[r]]`` (and bias); the norm's
    input must then be hidden-sharded the same way.
    """
    from distnorm.tensor_parallel import ShardedLayerNorm, ShardedRMSNorm

    def factory(module: nn.Module) -> nn.Module | None:
        kind = norm_kind(module)
        if kind not in ("layer_norm", "rms_norm"):
            return None
        a = _norm_args(module)
        world, rank = group_size(group), group_rank(group)
        start, size = shard_offsets(a["hidden"], world)[rank], shard_sizes(a["hidden"], world)[rank]
        common = {"group": group, "dtype": a["dtype"], "device": a["device"]}
        new: nn.Module
        if kind == "layer_norm":
            new = ShardedLayerNorm(a["hidden"], a["eps"], a["weight"] is not None, a["bias"] is not None, **common)
        else:
            new = ShardedRMSNorm(a["hidden"], a["eps"], a["weight"] is not None,
                                 zero_centered_gamma=_zero_centered(module), **common)
        _copy_(new.weight, None if a["weight"] is None else a["weight"].narrow(0, start, size))
        _copy_(new.bias, None if a["bias"] is None else a["bias"].narrow(0, start, size))
        return new

    return factory


def _data_parallel(name: str, factory: str) -> Any:
    try:
        from distnorm import data_parallel
    except ImportError as exc:
        raise RuntimeError(
            f"{factory}: needs distnorm.data_parallel.{name}, which this build of distnorm does not have"
        ) from exc
    return getattr(data_parallel, name)


def _batch_norm_factory(name: str, factory_name: str, group: Group, **kwargs: Any) -> NormFactory:
    cls = _data_parallel(name, factory_name)

    def factory(module: nn.Module) -> nn.Module | None:
        if norm_kind(module) != "batch_norm":
            return None
        bn: Any = module
        weight = bn.weight if bn.affine else None
        new = cls(bn.num_features, eps=bn.eps, group=group,
                  **({"momentum": bn.momentum, "affine": bn.affine,
                      "track_running_stats": bn.track_running_stats} if name == "SyncBatchNorm" else {}),
                  **kwargs)
        if weight is not None:
            new.to(dtype=weight.dtype, device=weight.device)
        own = new.state_dict()
        # copy what both modules name alike (BN-compatible state; the rest keeps its own init)
        shared = {k: v for k, v in module.state_dict().items() if k in own and own[k].shape == v.shape}
        new.load_state_dict(shared, strict=False)
        return new  # type: ignore[no-any-return]

    return factory


def to_sync_batch_norm(group: Group, *, channel_dim: int = 1) -> NormFactory:
    """BatchNorm*d -> ``SyncBatchNorm`` over the DP ``group`` (state-dict compatible: all state copied)."""
    return _batch_norm_factory("SyncBatchNorm", "to_sync_batch_norm", group, channel_dim=channel_dim)


def to_power_norm(group: Group, *, channel_dim: int = 1, **kwargs: Any) -> NormFactory:
    """BatchNorm*d -> ``PowerNorm`` over the DP ``group`` (affine parameters copied)."""
    return _batch_norm_factory("PowerNorm", "to_power_norm", group, channel_dim=channel_dim, **kwargs)


def to_unified_norm(group: Group, *, channel_dim: int = 1, **kwargs: Any) -> NormFactory:
    """BatchNorm*d -> ``UnifiedNorm`` over the DP ``group`` (affine parameters copied)."""
    return _batch_norm_factory("UnifiedNorm", "to_unified_norm", group, channel_dim=channel_dim, **kwargs)


# ------------------------------------------------------------------------------------------------
# Folding
# ------------------------------------------------------------------------------------------------


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2): a Linear with its weight stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_linear_like(module: nn.Module) -> bool:
    """A layer that multiplies its input's last dim by a full ``[out, in]`` matrix: ``nn.Linear``,
    HF ``Conv1D`` and ``ColumnParallelLinear`` (this rank's output rows, every input column)."""
    return isinstance(module, (nn.Linear, ColumnParallelLinear)) or _is_hf_conv1d(module)


def _producer_dim(layer: nn.Module, out_ndim: int) -> int | None:
    """The dim of ``layer``'s output (``out_ndim`` dims) that holds its output features, if
    ``fold_norms`` can scale them: Linear-like (last dim), ``RowParallelLinear`` with a reduced
    output (full features on every rank), ``Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d`` (dim 1, or 0
    unbatched); None otherwise."""
    if isinstance(layer, RowParallelLinear):
        return out_ndim - 1 if layer.reduce_output else None
    if isinstance(layer, nn.Linear) or _is_hf_conv1d(layer):
        return out_ndim - 1
    if isinstance(layer, nn.modules.conv._ConvNd):
        spatial = len(layer.kernel_size)
        return {spatial + 2: 1, spatial + 1: 0}.get(out_ndim)
    return None


def _input_matrix(layer: Any) -> torch.Tensor:
    """A Linear-like layer's weight as float64 ``[out, in]``."""
    w = layer.weight.detach().to(torch.float64)
    return w.t() if _is_hf_conv1d(layer) else w


def _output_rows(layer: Any) -> torch.Tensor:
    """A producer's weight as float64 ``[out_features, rest]``: row ``o`` makes output feature ``o``."""
    w = layer.weight.detach().to(torch.float64)
    if _is_hf_conv1d(layer):
        return w.t()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # [in, out/groups, *k]
        g = layer.groups
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1).permute(0, 2, 1, 3).reshape(g * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


def _write_weight(layer: Any, matrix: torch.Tensor, *, rows: bool) -> None:
    """Inverse of :func:`_output_rows` (``rows``) or :func:`_input_matrix`, cast to the weight's dtype."""
    weight: torch.Tensor = layer.weight
    if _is_hf_conv1d(layer):
        matrix = matrix.t()
    elif rows and isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g, per_group = layer.groups, weight.shape[1]
        matrix = matrix.reshape(g, per_group, weight.shape[0] // g, -1).permute(0, 2, 1, 3)
    weight.copy_(matrix.reshape(weight.shape).to(weight.dtype))


def _write_bias(layer: Any, bias: torch.Tensor) -> None:
    """Set the layer's bias (float64 ``[out]``), creating it when the layer has none."""
    weight: torch.Tensor = layer.weight
    current = getattr(layer, "bias", None)
    if current is None:
        layer.bias = nn.Parameter(bias.to(device=weight.device, dtype=weight.dtype))
    else:
        current.copy_(bias.to(current.dtype))


def _fold_into(linear: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None, *, center: bool = False) -> None:
    """``linear(C(z)·s + t) = linear'(z)``, ``C`` the centring ``z - mean(z)`` when ``center``:
    ``W' = (W·diag(s))·C`` (each row recentred), ``b' = b + W t``."""
    w = _input_matrix(linear)
    folded = w * scale.detach().to(torch.float64)
    if center:
        folded = folded - folded.mean(dim=1, keepdim=True)
    if shift is not None:
        bias = getattr(linear, "bias", None)
        base = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(w[:, 0])
        _write_bias(linear, base + w @ shift.detach().to(torch.float64))
    _write_weight(linear, folded, rows=False)


def _fold_back(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None, *, center: bool) -> None:
    """``s·C(layer(x)) + t = layer'(x)``: ``W' = diag(s)·C·W`` (columns recentred over the output
    features when ``center``), ``b' = s·C(b) + t``. The Conv–BN fold when ``C`` is the identity."""
    rows = _output_rows(layer)
    bias = getattr(layer, "bias", None)
    b = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(rows[:, 0])
    if center:
        rows, b = rows - rows.mean(dim=0, keepdim=True), b - b.mean()
    s = scale.detach().to(torch.float64)
    b = b * s + (shift.detach().to(torch.float64) if shift is not None else 0.0)
    _write_weight(layer, rows * s[:, None], rows=True)
    _write_bias(layer, b)


@dataclass(frozen=True, slots=True)
class _Affine:
    """An eval-mode norm as ``y = scale·C(x) + shift`` over its ``channel_dim`` (or its part after
    normalisation, ``removable=False``: LayerNorm/RMSNorm γ, β)."""

    scale: torch.Tensor
    shift: torch.Tensor | None
    center: bool
    """The map acts on ``x - mean(x)`` over the channels (``FrozenScaleNorm`` of a LayerNorm)."""
    removable: bool
    """The whole norm is this map: after folding it becomes an identity. Else only γ, β move and
    :attr:`neutralise` leaves the normalisation in place."""
    channel_dim: int
    neutralise: Callable[[], None]


def _no_op() -> None:
    return None


def _affine_of(norm: nn.Module) -> _Affine | None:
    """The :class:`_Affine` of an eval-mode norm, or None if it is not one.

    Removable: BatchNorm*d with running statistics (torch's, distnorm's ``SyncBatchNorm``;
    ``AlphaBatchNorm`` only with ``alpha = 1``: below it mixes in the test batch), and modules with
    ``fold_scale_shift() -> (scale[C], shift[C])`` on ``channel_dim`` (PowerNorm without
    GroupScaling, UnifiedNorm, RepBatchNorm, ProgressiveRepBN, FrozenScaleNorm; an optional
    ``center`` attribute says the map acts on the centred input). Not removable: LayerNorm /
    RMSNorm (γ -> 1 or 0 with zero-centered γ, β -> 0, ``output_scale`` -> 1 after folding).
    """
    module: Any = norm
    fold = getattr(module, "fold_scale_shift", None)
    if callable(fold) or isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or (_is_alpha_batch_norm(module) and module.alpha < 1.0):
            return None
        if callable(fold):
            try:
                scale, shift = fold()
            except ValueError:  # e.g. PowerNorm with GroupScaling: not an affine map
                return None
        else:
            if not module.track_running_stats or module.running_mean is None:
                return None
            rstd = torch.rsqrt(module.running_var.double() + module.eps)
            scale = rstd * (module.weight.double() if module.affine else 1.0)
            shift = -module.running_mean.double() * scale + (module.bias.double() if module.affine else 0.0)
        return _Affine(scale.double(), shift.double(), bool(getattr(module, "center", False)), True,
                       int(getattr(module, "channel_dim", 1)), _no_op)
    kind = norm_kind(module)
    zero_centered = bool(getattr(module, "zero_centered_gamma", False)) or (
        kind == "rms_norm" and _zero_centered(module))
    is_norm = kind in ("layer_norm", "rms_norm") or (_is_distnorm(module) and hasattr(module, "normalized_shape"))
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not is_norm or not isinstance(weight, torch.Tensor) or weight.numel() <= 1:
        return None
    if getattr(module, "group", None) is not None and group_size(module.group) > 1 and weight.numel() != \
            getattr(module, "hidden", weight.numel()):
        return None  # hidden-sharded: the consumer sees all columns, this rank only its slice
    scale = weight.detach().double() + (1.0 if zero_centered else 0.0)
    out_scale = float(getattr(module, "output_scale", 1.0))
    scale = scale * out_scale
    shift = bias.detach().double() * out_scale if isinstance(bias, torch.Tensor) else None

    def neutralise() -> None:
        with torch.no_grad():
            weight.fill_(0.0 if zero_centered else 1.0)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
            if out_scale != 1.0:
                module.output_scale = 1.0

    return _Affine(scale, shift, False, False, -1, neutralise)


def _is_alpha_batch_norm(module: nn.Module) -> bool:
    try:
        from distnorm.data_parallel import AlphaBatchNorm
    except ImportError:
        return False
    return isinstance(module, AlphaBatchNorm)


class FoldedNorm(nn.Identity):
    """What ``fold_norms`` leaves where a norm was folded away: ``x -> x`` (any shape, dtype), ignoring
    further arguments (``mask=``). An ``nn.Identity``. Collectives: none."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return x


def _leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    if hasattr(out, "to_tuple"):  # HF ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@dataclass(slots=True)
class _Trace:
    """One hooked forward: who feeds whom (module names)."""

    consumers: dict[str, list[str]] = field(default_factory=dict)
    """A tracked module -> the leaf modules and norms that received its output tensor."""
    producer: dict[str, list[str | None]] = field(default_factory=dict)
    """A norm -> per call, the tracked module whose output was its input (None: anything else)."""
    calls: dict[str, int] = field(default_factory=dict)
    ndim: dict[str, int] = field(default_factory=dict)
    """A norm -> its input's number of dims."""


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


@contextmanager
def _trace(model: nn.Module, norms: list[nn.Module]) -> Iterator[_Trace]:
    """During one forward: the consumers of every norm's and candidate producer's output tensor, and
    which candidate producer made each norm's input. Hooks see module calls, not functional uses
    (a residual add): ``fold_norms`` checks every fold by re-running the model."""
    names = {m: n for n, m in model.named_modules()}
    norm_set = set(norms)
    tracked = [m for m in names if m in norm_set or _producer_dim(m, 2) is not None or
               isinstance(m, nn.modules.conv._ConvNd)]
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # holds the tensor: a freed id() would be reused
    trace = _Trace()
    handles = []

    def out_hook(module: nn.Module, args: Any, output: Any) -> None:
        name = names[module]
        trace.calls[name] = trace.calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (name, output)

    def in_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        name = names[module]
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and id(a) in produced:
                trace.consumers.setdefault(produced[id(a)][0], []).append(name)
        if module in norm_set:
            x = _first_tensor(args, kwargs)
            source = produced.get(id(x)) if x is not None else None
            trace.producer.setdefault(name, []).append(source[0] if source is not None else None)
            if x is not None:
                trace.ndim[name] = x.dim()

    for m in tracked:
        handles.append(m.register_forward_hook(out_hook))
    for m in names:
        if m in norm_set or next(m.children(), None) is None:  # leaves: containers only pass tensors on
            handles.append(m.register_forward_pre_hook(in_hook, with_kwargs=True))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return False
        # structural misses (a hidden residual use) give O(1) errors; round-off (HF norms compute in fp32
        # even for fp64 inputs) stays far below these
        tol = 1e-5 if x.dtype == torch.float64 else (1e-3 if x.dtype == torch.float32 else 5e-2)
        scale = max(float(y.abs().max()) if y.numel() else 0.0, 1.0)
        if y.numel() and float((x - y).abs().max()) > tol * scale:
            return False
    return True


def _snapshot(layers: list[Any]) -> Callable[[], None]:
    """Undo for in-place edits of the layers' weight and bias (a bias created by a fold is removed)."""
    saved: list[tuple[Any, torch.Tensor, torch.Tensor | None]] = [
        (m, m.weight.detach().clone(), None if getattr(m, "bias", None) is None else m.bias.detach().clone())
        for m in layers]

    def undo() -> None:
        for m, w, b in saved:
            m.weight.copy_(w)
            if b is None:
                m.bias = None
            else:
                m.bias.copy_(b)

    return undo


class _Folder:
    """Applies one norm's fold at a time and keeps it only if the model's outputs are unchanged."""

    def __init__(self, model: nn.Module, example_inputs: Any, trace: _Trace, reference: list[torch.Tensor]) -> None:
        self.model, self.example_inputs, self.trace, self.reference = model, example_inputs, trace, reference
        owners: dict[int, int] = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.owners = owners

    def _private(self, layer: nn.Module) -> bool:
        """The layer's weight and bias belong to it alone (a tied weight would change elsewhere too)."""
        return all(self.owners.get(id(p), 0) <= 1 for p in layer.parameters(recurse=False))

    def _outside(self, norm_name: str, users: list[str]) -> list[str]:
        """``users`` other than the norm itself and its submodules, deduplicated."""
        return [u for u in dict.fromkeys(users) if u != norm_name and not u.startswith(norm_name + ".")]

    def producer(self, name: str, affine: _Affine) -> nn.Module | None:
        """The layer whose only use is to feed this norm (called once, each once), if it can absorb the map."""
        sources = self.trace.producer.get(name, [])
        if len(sources) != 1 or sources[0] is None or self.trace.calls.get(sources[0]) != 1:
            return None
        if self._outside(name, self.trace.consumers.get(sources[0], [])):
            return None
        layer = self.model.get_submodule(sources[0])
        ndim = self.trace.ndim[name]
        dim = _producer_dim(layer, ndim)
        linear = isinstance(layer, (nn.Linear, RowParallelLinear)) or _is_hf_conv1d(layer)
        if dim is None or dim != affine.channel_dim % ndim or (affine.center and not linear):
            return None
        if _output_rows(layer).shape[0] != affine.scale.numel() or not self._private(layer):
            return None
        return layer

    def consumers(self, name: str, affine: _Affine) -> list[nn.Module] | None:
        """The Linear-like layers that alone receive this norm's output on its last (channel) dim."""
        users = [self.model.get_submodule(u) for u in self._outside(name, self.trace.consumers.get(name, []))]
        ndim = self.trace.ndim.get(name)
        if not users or ndim is None or affine.channel_dim % ndim != ndim - 1:
            return None
        if not all(_is_linear_like(u) and _input_matrix(u).shape[1] == affine.scale.numel() and self._private(u)
                   for u in users):
            return None
        return users

    def _swap(self, name: str, module: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), attr, module)

    def _unchanged(self) -> bool:
        try:
            return _close(_leaves(_run(self.model, self.example_inputs)), self.reference)
        except Exception:  # noqa: BLE001 - a folded model that fails is a fold to undo
            return False

    def back(self, name: str, norm: nn.Module, affine: _Affine) -> bool:
        """Fold into the producer (removable norms only); True if kept."""
        layer = self.producer(name, affine) if affine.removable else None
        if layer is None:
            return False
        undo = _snapshot([layer])
        _fold_back(layer, affine.scale, affine.shift, center=affine.center)
        self._swap(name, FoldedNorm())
        if self._unchanged():
            return True
        undo()
        self._swap(name, norm)
        return False

    def forward(self, name: str, norm: nn.Module, affine: _Affine) -> bool:
        """Fold into the consumers; True if kept."""
        users = self.consumers(name, affine)
        if users is None:
            return False
        undo = _snapshot(users)
        saved = {k: v.clone() for k, v in norm.state_dict().items()}
        saved_scale = getattr(norm, "output_scale", None)
        for u in users:
            _fold_into(u, affine.scale, affine.shift, center=affine.center)
        if affine.removable:
            self._swap(name, FoldedNorm())
        else:
            affine.neutralise()
        if self._unchanged():
            return True
        undo()
        if affine.removable:
            self._swap(name, norm)
        else:
            norm.load_state_dict(saved)
            if saved_scale is not None:
                setattr(norm, "output_scale", saved_scale)  # noqa: B010 - not every norm declares it
        return False


@torch.no_grad()
def fold_norms(model: nn.Module, example_inputs: Any) -> nn.Module:
    """Fold every eval-mode norm's affine map into the Linear / Conv layers next to it; return the model.

    Backwards (the Conv–BN fold): a norm that is a whole per-channel affine map in eval — BatchNorm*d
    with running statistics (torch's, ``SyncBatchNorm``, ``AlphaBatchNorm`` with ``alpha = 1``),
    RepBatchNorm, ProgressiveRepBN, PowerNorm (no GroupScaling), UnifiedNorm, ``FrozenScaleNorm`` —
    moves into the layer that produces its input when that layer feeds nothing else and is called
    once: ``nn.Linear``, HF ``Conv1D``, ``RowParallelLinear``, ``Conv{1,2,3}d`` (any groups, padding
    mode, bias or none) and ``ConvTranspose{1,2,3}d``, with the norm's channel dim on the layer's
    output features; the norm becomes an identity. Forwards (otherwise): a norm whose output only
    feeds Linear-like layers (``nn.Linear``, HF ``Conv1D``, ``ColumnParallelLinear``) on its last dim
    moves into them: the per-channel norms disappear, LayerNorm/RMSNorm (torch, HF, distnorm
    sequence-parallel) keep only their normalisation (γ, β, ``output_scale`` move).

    Who feeds whom comes from one hooked run of ``example_inputs`` (a tensor, tuple, or kwargs
    dict); hooks cannot see functional uses (a residual add), so after each fold the model is run
    again and a fold that changes its outputs (beyond round-off) is undone. Tied parameters are not
    edited. The model must be in eval mode. Collectives: none beyond the model's own forwards.
    """
    if model.training:
        raise ValueError("fold_norms: the model must be in eval mode (call model.eval()); got training=True")
    norms = {m: n for n, m in model.named_modules() if _affine_of(m) is not None}
    if not norms:
        return model
    with _trace(model, list(norms)) as trace:
        reference = _leaves(_run(model, example_inputs))
    folder = _Folder(model, example_inputs, trace, reference)
    for norm, name in norms.items():
        affine = _affine_of(norm)
        if affine is None or not any(m is norm for m in model.modules()):
            continue  # gone with an enclosing norm folded before it
        if not folder.back(name, norm, affine):
            folder.forward(name, norm, affine)
    return model


# ------------------------------------------------------------------------------------------------
# Pre-LN -> Pre-RMSNorm
# ------------------------------------------------------------------------------------------------


def _recentre_rows_(table: torch.Tensor) -> None:
    table.sub_(table.mean(dim=-1, keepdim=True))


def _recentre_writer_(conv1d: nn.Module) -> None:
    """A residual writer's outputs made zero-mean over the hidden dim: W' = W - mean_out(W), b' likewise."""
    w: torch.Tensor = conv1d.weight  # type: ignore[assignment]
    out_dim = -1 if not isinstance(conv1d, nn.Linear) else 0  # Conv1D weight [in, out]; Linear [out, in]
    w.sub_(w.mean(dim=out_dim, keepdim=True))
    b = getattr(conv1d, "bias", None)
    if b is not None:
        b.sub_(b.mean())


def _rms_norm_like(ln: nn.LayerNorm, *, affine: bool) -> nn.RMSNorm:
    new = nn.RMSNorm(ln.normalized_shape, eps=ln.eps, elementwise_affine=affine,
                     device=ln.weight.device if ln.weight is not None else None,
                     dtype=ln.weight.dtype if ln.weight is not None else None)
    if affine and ln.weight is not None:
        new.weight.copy_(ln.weight)
    new.train(ln.training)
    return new


@torch.no_grad()
def pre_ln_to_pre_rmsnorm(model: nn.Module) -> nn.Module:
    """Turn a Pre-LN GPT-2 (HF ``GPT2Model`` / ``GPT2LMHeadModel`` layout) into an equivalent Pre-RMSNorm model.

    Every residual-stream writer (token and position embeddings, each attention and MLP output
    projection) is recentred so that the stream is zero-mean in the hidden dim; then
    ``LN(x) = γ·x/rms(x) + β`` exactly (same eps), each block's γ, β fold into the next projection
    (``c_attn``, ``c_fc``) and its LayerNorm becomes an affine-free ``nn.RMSNorm``. The final
    ``ln_f`` folds into an LM head when there is one (the head is untied from the embedding and
    gains a bias), else it stays a LayerNorm (no Linear to fold β into; it sees a zero-mean stream).
    Outputs are unchanged up to round-off. Returns the model (modified in place).
    """
    body: Any = getattr(model, "transformer", model)
    needed = ("wte", "wpe", "h", "ln_f")
    if not all(hasattr(body, n) for n in needed):
        raise ValueError(f"pre_ln_to_pre_rmsnorm: expected a GPT-2-style model with {needed}, got {type(model).__name__}")
    head = getattr(model, "lm_head", None)
    head_weight = head.weight.detach().clone() if isinstance(head, nn.Linear) else None  # before wte moves (tied)
    _recentre_rows_(body.wte.weight)
    _recentre_rows_(body.wpe.weight)
    for block in body.h:
        _recentre_writer_(block.attn.c_proj)
        _recentre_writer_(block.mlp.c_proj)
        for ln_name, consumer in (("ln_1", block.attn.c_attn), ("ln_2", block.mlp.c_fc)):
            ln = getattr(block, ln_name)
            _fold_into(consumer, ln.weight, ln.bias)
            setattr(block, ln_name, _rms_norm_like(ln, affine=False))
    if isinstance(head, nn.Linear) and head_weight is not None:
        ln_f = body.ln_f
        new_head = nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device,
                             dtype=head.weight.dtype)
        new_head.weight.copy_(head_weight)
        if head.bias is not None:
            new_head.bias.copy_(head.bias)
        else:
            new_head.bias.zero_()
        _fold_into(new_head, ln_f.weight, ln_f.bias)
        model.lm_head = new_head
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
        body.ln_f = _rms_norm_like(ln_f, affine=False)
    return model

