"""Model surgery for norms: swap them for distributed ones, fold them away, or turn Pre-LN into Pre-RMSNorm.

* ``convert_norms(model, factory)`` walks the module tree and replaces every module for which
  ``factory(module)`` returns a new module (parameters and buffers copied by the factory).
  Factories: ``to_sequence_parallel(group)``, ``to_sharded(group)`` (tensor parallel; LayerNorm and
  RMSNorm), ``to_sync_batch_norm(group)``, ``to_power_norm(group)``, ``to_unified_norm(group)``
  (data parallel; BatchNorm). Recognised norms: ``torch.nn.LayerNorm`` (1-D ``normalized_shape``),
  ``torch.nn.RMSNorm``, ``torch.nn.BatchNorm{1,2,3}d`` and Hugging Face ``*RMSNorm`` modules
  (duck-typed: a 1-D ``weight`` and ``eps`` or ``variance_epsilon``; Gemma's ``1 + weight`` form maps
  to ``zero_centered_gamma=True``).
* ``fold_norms(model, example_inputs)``: in eval, a norm whose output only feeds Linear-like
  layers is an affine map after normalisation, ``y = s·n(x) + t``; ``s`` and ``t`` move into those
  layers' weights and biases, and the norm keeps only ``n``.
* ``pre_ln_to_pre_rmsnorm(model)``: the exact Pre-LN -> Pre-RMSNorm transform of "Pre-RMSNorm
  and Pre-CRMSNorm Transformers" (Jiang et al., 2023) for GPT-2-style models.

Conversion runs on each rank with its own group; it issues no collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from distnorm.comm import Group, group_rank, group_size, shard_offsets, shard_sizes

__all__ = [
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


def _is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (weight ``[out, in]``) or HF ``Conv1D`` (weight ``[in, out]``, ``nf`` attribute)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _fold_into(linear: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    """``linear(s·z + t) = linear'(z)``: scale the input columns by ``s``, add ``W t`` to the bias."""
    weight: torch.Tensor = linear.weight  # type: ignore[assignment]
    conv1d = not isinstance(linear, nn.Linear)
    w = weight.detach().to(torch.float64)
    s = scale.detach().to(torch.float64)
    w_in_last = w.t() if conv1d else w  # [out, in]
    with torch.no_grad():
        if shift is not None:
            extra = w_in_last @ shift.detach().to(torch.float64)
            bias = getattr(linear, "bias", None)
            if bias is None:
                linear.bias = nn.Parameter(extra.to(weight.dtype))
            else:
                bias.add_(extra.to(bias.dtype))
        folded = w_in_last * s
        weight.copy_((folded.t() if conv1d else folded).to(weight.dtype))


def _affine_of(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[], None]] | None:
    """(scale, shift, neutralise) of an eval-mode norm whose output is ``scale·n(x) + shift``; None if not foldable.

    ``neutralise()`` leaves the norm computing ``n(x)``: γ -> 1 (0 with zero-centered γ), β -> 0;
    a per-channel affine (BatchNorm, ``fold_scale_shift()`` norms) becomes the identity.
    """
    module: Any = norm
    fold = getattr(module, "fold_scale_shift", None)
    if callable(fold) or isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training:
            return None
        if callable(fold):
            scale, shift = fold()
        else:
            bn: Any = module
            if not bn.track_running_stats or bn.running_mean is None:
                return None
            rstd = torch.rsqrt(bn.running_var.double() + bn.eps)
            scale = rstd * (bn.weight.double() if bn.affine else 1.0)
            shift = -bn.running_mean.double() * scale + (bn.bias.double() if bn.affine else 0.0)
        return scale, shift, lambda: None  # the caller swaps the module for nn.Identity
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

    return scale, shift, neutralise


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


@contextmanager
def _record_consumers(model: nn.Module, candidates: dict[nn.Module, str]) -> Iterator[dict[str, list[str]]]:
    """During one forward: which leaf modules receive each candidate norm's output tensor as an input."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # holds the tensor: a freed id() would be reused
    consumers: dict[str, list[str]] = {n: [] for n in candidates.values()}
    handles = []

    def out_hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (candidates[module], output)

    def in_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and id(a) in produced:
                consumers[produced[id(a)][0]].append(names[module])

    for m in candidates:
        handles.append(m.register_forward_hook(out_hook))
    for m in names:
        if next(m.children(), None) is None:  # leaves: containers only pass tensors on
            handles.append(m.register_forward_pre_hook(in_hook, with_kwargs=True))
    try:
        yield consumers
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


@torch.no_grad()
def fold_norms(model: nn.Module, example_inputs: Any) -> nn.Module:
    """Fold every eval-mode norm's affine part into the Linear layers that consume its output; return the model.

    Foldable: LayerNorm / RMSNorm (torch, HF, distnorm sequence-parallel; γ, β and ``output_scale``),
    BatchNorm*d (running statistics: the whole norm is an affine map) and any module with
    ``fold_scale_shift() -> (scale[C], shift[C])`` (PowerNorm, UnifiedNorm, RepBatchNorm).
    Consumers are found by running ``example_inputs`` (a tensor, tuple, or kwargs dict) once with
    hooks; a norm is folded only when every module receiving its output is a Linear (or HF
    ``Conv1D``) and the model's outputs on ``example_inputs`` are unchanged afterwards (a norm whose
    output also feeds a functional op, e.g. a residual, is left as it was). The model must be in
    eval mode. Collectives: none.
    """
    if model.training:
        raise ValueError("fold_norms: the model must be in eval mode (call model.eval()); got training=True")
    candidates = {m: n for n, m in model.named_modules() if _affine_of(m) is not None}
    if not candidates:
        return model
    with _record_consumers(model, candidates) as consumers:
        reference = _leaves(_run(model, example_inputs))
    modules = dict(model.named_modules())
    for norm, name in candidates.items():
        users = [modules[u] for u in dict.fromkeys(consumers[name])]
        if not users or not all(_is_linear_like(u) for u in users):
            continue
        affine = _affine_of(norm)
        if affine is None:
            continue
        scale, shift, neutralise = affine
        saved = [(u.weight.clone(), u.bias.clone() if getattr(u, "bias", None) is not None else None) for u in users]
        saved_norm = {k: v.clone() for k, v in norm.state_dict().items()}
        saved_scale = getattr(norm, "output_scale", None)
        for u in users:
            _fold_into(u, scale, shift)
        identity = callable(getattr(norm, "fold_scale_shift", None)) or isinstance(
            norm, nn.modules.batchnorm._BatchNorm)
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if identity:
            setattr(parent, attr, nn.Identity())
        else:
            neutralise()
        if _close(_leaves(_run(model, example_inputs)), reference):
            continue
        # undo: the norm's output has a consumer the hooks cannot see
        for u, (w, b) in zip(users, saved, strict=True):
            u.weight.copy_(w)
            if b is None:
                u.bias = None
            else:
                u.bias.copy_(b)
        if identity:
            setattr(parent, attr, norm)
        else:
            norm.load_state_dict(saved_norm)
            if saved_scale is not None:
                norm.output_scale = saved_scale
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

