"""A tiny GPT built from distnorm layers: tensor + sequence parallel, any norm, any placement.

Choices (nanochat-style, one place to read them):

* Activations between sublayers are token-sharded over the TP group (sequence parallelism):
  ``x_shard [tokens_local, d]``, ``tokens = batch * seq`` flattened, split by ``shard_sizes``.
  Norms are the sequence-parallel ones (zero forward collectives).
* Attention: one fused ``ColumnParallelLinear(d, 3d)`` whose rows are laid out per rank as
  ``[q_r; k_r; v_r]`` (whole heads per rank), causal SDPA on local heads, ``RowParallelLinear``
  back to token shards. MLP: column (4d, GELU) -> row. Per sublayer: fwd 1 all-gather +
  1 reduce-scatter, bwd the converse.
* Embeddings are replicated: every TP rank embeds all tokens and keeps its shard
  (``scatter_along``: its backward all-gathers, so the embedding gradient is complete on every
  rank). The LM head is replicated and sees this rank's tokens (``copy_to_group`` sums its
  gradient over TP); the loss is summed over TP with ``reduce_from_group``.
* Placement (``pre``, ``post``, ``peri`` = Peri-LN: norm in and out of each sublayer, ``mix`` =
  Mix-LN: Post-LN for the first ``mix_ratio`` of the layers, Pre-LN after), and LayerNorm
  Scaling (``output_scale = 1/sqrt(layer)`` on each layer's input norms).
* ``overlap``: each "row-parallel reduce-scatter + residual add + RMSNorm + all-gather" becomes one
  ``distnorm.overlap.fused_allreduce_rms_norm(mode="reduce_scatter", normed_grad="partial")``
  (Pre-RMSNorm only), the next column linear consuming its replicated output directly and handing
  back its partial gradient: per sublayer the backward moves the forward's bytes (1 reduce-scatter
  + 1 all-gather), as the sequence-parallel path does.
* Every weight is drawn from one seeded ``torch.Generator`` as a *full* tensor and sliced, so a
  model starts identical for every TP degree and launcher.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_rank, group_size, shard_offsets, shard_sizes
from distnorm.tensor_parallel import (
    ColumnParallelLinear,
    CRMSNorm,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    SingleScaleRMSNorm,
    layer_norm_scaling,
)

__all__ = ["GPT", "NORM_TYPES", "PLACEMENTS", "ModelConfig", "fused_qkv_keys", "make_norm"]

NormType = Literal["layernorm", "rmsnorm", "ssnorm", "crmsnorm", "powernorm", "unified", "prepbn"]
Placement = Literal["pre", "post", "peri", "mix"]
NORM_TYPES: tuple[str, ...] = ("layernorm", "rmsnorm", "ssnorm", "crmsnorm", "powernorm", "unified", "prepbn")
PLACEMENTS: tuple[str, ...] = ("pre", "post", "peri", "mix")
# batch-statistics norms and the distnorm.data_parallel class each needs
_BATCH_NORMS = {"powernorm": "PowerNorm", "unified": "UnifiedNorm", "prepbn": "ProgressiveRepBN"}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape and norm choices of the tiny GPT (``[model]`` table of the TOML config)."""

    vocab_size: int = 0
    """Set from the corpus when 0."""
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    """Must be divisible by the TP degree (whole heads per rank)."""
    seq_len: int = 64
    mlp_ratio: int = 4
    norm: NormType = "layernorm"
    placement: Placement = "pre"
    mix_ratio: float = 0.25
    """Mix-LN: the first ``floor(mix_ratio * n_layers)`` layers are Post-LN."""
    layer_norm_scaling: bool = False
    """LayerNorm Scaling ("The Curse of Depth"): scale layer l's input norms by 1/sqrt(l)."""
    grad_sync: Literal["backward", "deferred"] = "backward"
    """Sequence-parallel norm gradient sync; ``"deferred"``: the trainer calls ``sync_sequence_parallel_grads``."""
    total_steps: int = 1000
    """Optimizer steps of the run (the trainer sets it): ProgressiveRepBN's schedule must end inside it."""
    overlap: bool = False
    """Fuse each row-parallel reduce-scatter + residual add + RMSNorm + all-gather
    (``distnorm.overlap.fused_allreduce_rms_norm``, TokenWeave's op); Pre-RMSNorm only."""
    prepbn_decay_steps: int = 0
    """ProgressiveRepBN: steps over which λ decays from 1 (LayerNorm) to 0 (RepBN); 0 = ``total_steps``."""


class CompressedRMSNorm(nn.Module):
    """Pre-CRMSNorm on a ``d``-wide residual stream: recentre, keep ``d - 1`` coordinates, CRMSNorm them.

    ``x_shard [n, d] -> [n, d]``: the first ``d - 1`` outputs are ``CRMSNorm(d - 1)``, the last is
    minus their sum, so the output stays zero-mean (with a unit weight this is exactly the
    affine-free LayerNorm of x). Collectives: those of the inner ``CRMSNorm`` (sequence form).
    """

    def __init__(self, d: int, **kwargs: object) -> None:
        super().__init__()
        self.norm = CRMSNorm(d - 1, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm((x - x.mean(dim=-1, keepdim=True))[..., :-1])
        return torch.cat([y, -y.sum(dim=-1, keepdim=True)], dim=-1)


def _sum_over(grad: torch.Tensor, *, group: Group) -> torch.Tensor:
    return comm.all_reduce_(grad.clone(), group)


def make_norm(kind: str, d: int, *, tp_group: Group, stats_group: Group, output_scale: float = 1.0,
              grad_sync: str = "backward", decay_steps: int = 0, total_steps: int = 1000) -> nn.Module:
    """One norm of the demo model on token-sharded ``[n, d]`` activations.

    ``tp_group``: where the tokens are split (replicated parameters' gradients are summed there).
    ``stats_group``: the group whose tokens the batch-statistics norms pool (all ranks: tokens are
    split over DP *and*, by sequence parallelism, over TP). ``decay_steps``/``total_steps``: the
    ProgressiveRepBN schedule (``decay_steps`` 0 = all of ``total_steps``).
    """
    tp = {"group": tp_group, "output_scale": output_scale, "grad_sync": grad_sync}
    if kind == "layernorm":
        return SequenceParallelLayerNorm(d, **tp)  # type: ignore[arg-type]
    if kind == "rmsnorm":
        return SequenceParallelRMSNorm(d, **tp)  # type: ignore[arg-type]
    if kind == "ssnorm":
        return SingleScaleRMSNorm(d, parallel="sequence", **tp)  # type: ignore[arg-type]
    if kind == "crmsnorm":
        return CompressedRMSNorm(d, parallel="sequence", **tp)
    if kind in _BATCH_NORMS:
        try:
            from distnorm import data_parallel
        except ImportError as exc:
            raise ValueError(
                f"norm={kind!r} needs distnorm.data_parallel.{_BATCH_NORMS[kind]}, which this build does not have "
                f"(the data-parallel norms have not landed) (rank {group_rank(stats_group)})"
            ) from exc
        cls = getattr(data_parallel, _BATCH_NORMS[kind])
        if output_scale != 1.0:
            raise ValueError(f"norm={kind!r} does not support layer_norm_scaling=true (rank {group_rank(stats_group)})")
        extra = {"decay_steps": decay_steps or total_steps, "total_steps": total_steps} if kind == "prepbn" else {}
        norm: nn.Module = cls(d, group=stats_group, channel_dim=-1, **extra)
        if group_size(tp_group) > 1:
            # replicated over TP but fed this rank's tokens only: sum the affine gradients over TP
            for p in norm.parameters():
                p.register_hook(functools.partial(_sum_over, group=tp_group))
        return norm
    raise ValueError(f"norm must be one of {NORM_TYPES}, got {kind!r} (rank {group_rank(tp_group)})")


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def _qkv_linear(d: int, group: Group, generator: torch.Generator) -> ColumnParallelLinear:
    """Fused q/k/v column-parallel linear with rank r's rows ``[q_r; k_r; v_r]`` (whole heads)."""
    bound = 1.0 / math.sqrt(d)
    w = [torch.empty(d, d).uniform_(-bound, bound, generator=generator) for _ in range(3)]
    b = [torch.empty(d).uniform_(-bound, bound, generator=generator) for _ in range(3)]
    world = group_size(group)
    sizes, offsets = shard_sizes(d, world), shard_offsets(d, world)
    rows = [torch.arange(o, o + s) for o, s in zip(offsets, sizes, strict=True)]
    weight = torch.cat([torch.cat([m[r] for m in w]) for r in rows])
    bias = torch.cat([torch.cat([v[r] for v in b]) for r in rows])
    return ColumnParallelLinear.from_full(weight, bias, group=group, sequence_parallel=True)


def fused_qkv_keys(model: nn.Module) -> dict[str, int]:
    """``{state-dict key: 3}`` for every fused q/k/v weight and bias of ``model``.

    TP rank r holds rows ``[q_r; k_r; v_r]`` (:func:`_qkv_linear`), so the all-gathered tensor
    depends on the TP degree; its ``[3, d, ...]`` view, sharded along dim 1, does not. Checkpoints
    (``launch/checkpoint.py``) store that view so that they load at any TP degree.
    """
    return {f"{name}.qkv.{p}": 3 for name, m in model.named_modules() if isinstance(m, Block)
            for p in ("weight", "bias")}


class Block(nn.Module):
    """One transformer layer on token-sharded activations ``x_shard [n_local, d]``."""

    def __init__(self, cfg: ModelConfig, layer: int, *, tp_group: Group, stats_group: Group,
                 generator: torch.Generator) -> None:
        super().__init__()
        d, tp = cfg.d_model, group_size(tp_group)
        self.n_heads_local, self.head_dim = cfg.n_heads // tp, d // cfg.n_heads
        post_layers = math.floor(cfg.mix_ratio * cfg.n_layers) if cfg.placement == "mix" else 0
        self.placement = "post" if cfg.placement == "post" or layer <= post_layers else (
            "peri" if cfg.placement == "peri" else "pre")
        scale = layer_norm_scaling(layer) if cfg.layer_norm_scaling and self.placement != "post" else 1.0

        def norm(output_scale: float = 1.0) -> nn.Module:
            return make_norm(cfg.norm, d, tp_group=tp_group, stats_group=stats_group, output_scale=output_scale,
                             grad_sync=cfg.grad_sync, decay_steps=cfg.prepbn_decay_steps,
                             total_steps=cfg.total_steps)

        self.norm1, self.norm2 = norm(scale), norm(scale)
        if self.placement == "peri":
            self.norm1_out, self.norm2_out = norm(), norm()
        self.qkv = _qkv_linear(d, tp_group, generator)
        self.proj = RowParallelLinear(d, d, group=tp_group, sequence_parallel=True, generator=generator)
        self.fc1 = ColumnParallelLinear(d, cfg.mlp_ratio * d, group=tp_group, sequence_parallel=True,
                                        generator=generator)
        self.fc2 = RowParallelLinear(cfg.mlp_ratio * d, d, group=tp_group, sequence_parallel=True,
                                     generator=generator)

    def _attend(self, qkv: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """``qkv [B*T, 3 * d_local]`` (this rank's heads) -> ``[B*T, d_local]``."""
        q, k, v = qkv.view(batch, seq, 3, self.n_heads_local, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, h_local, T, hd]
        return y.transpose(1, 2).reshape(batch * seq, -1)

    def attention(self, x_shard: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        return self.proj(self._attend(self.qkv(x_shard, num_tokens=batch * seq), batch, seq))

    # --- overlap path: the row-parallel outputs stay partial sums for fused_allreduce_rms_norm ----
    @staticmethod
    def _column_replicated(layer: ColumnParallelLinear, h: torch.Tensor) -> torch.Tensor:
        """The column linear on a replicated full input (the fused op's ``normed``): no all-gather,
        and ``h``'s gradient stays this rank's part (the fused op's ``normed_grad="partial"``)."""
        return F.linear(h, layer.weight, layer.bias)

    @staticmethod
    def _row_partial(layer: RowParallelLinear, x: torch.Tensor, residual_shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row linear's partial sums ``[B*T, out]`` without bias, and the residual shard with the
        bias added: the replicated bias then meets this rank's tokens only and ``copy_to_group``
        sums its gradient over TP (as ``RowParallelLinear(sequence_parallel=True)`` does), so every
        rank's bias gets the full gradient."""
        if layer.bias is not None:
            residual_shard = residual_shard + comm.copy_to_group(layer.bias, layer.group)
        return F.linear(x, layer.weight), residual_shard

    def attention_partial(self, h: torch.Tensor, r_shard: torch.Tensor, batch: int, seq: int, *,
                          replicated: bool) -> tuple[torch.Tensor, torch.Tensor]:
        qkv = self._column_replicated(self.qkv, h) if replicated else self.qkv(h, num_tokens=batch * seq)
        return self._row_partial(self.proj, self._attend(qkv, batch, seq), r_shard)

    def mlp_partial(self, h_full: torch.Tensor, r_shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._row_partial(self.fc2, F.gelu(self._column_replicated(self.fc1, h_full)), r_shard)

    def mlp(self, x_shard: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_shard, num_tokens=batch * seq)))

    def forward(self, x_shard: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        if self.placement == "post":
            x_shard = self.norm1(x_shard + self.attention(x_shard, batch, seq))
            return self.norm2(x_shard + self.mlp(x_shard, batch, seq))
        if self.placement == "peri":
            x_shard = x_shard + self.norm1_out(self.attention(self.norm1(x_shard), batch, seq))
            return x_shard + self.norm2_out(self.mlp(self.norm2(x_shard), batch, seq))
        x_shard = x_shard + self.attention(self.norm1(x_shard), batch, seq)
        return x_shard + self.mlp(self.norm2(x_shard), batch, seq)


class GPT(nn.Module):
    """``idx [B, T] int64`` (replicated over TP) -> loss (scalar, at least float32; mean over this DP rank's tokens).

    Collectives per step (TP = P > 1), besides the blocks': fwd 1 all-reduce of the loss (4 B);
    bwd 1 all-gather of the embedding output gradient, 1 all-reduce of the LM head gradient.
    ``tp_group`` None or P == 1: none.
    """

    def __init__(self, cfg: ModelConfig, *, tp_group: Group = None, stats_group: Group = None, seed: int = 0) -> None:
        super().__init__()
        tp, rank = group_size(tp_group), group_rank(tp_group)
        if cfg.vocab_size < 1:
            raise ValueError(f"GPT: vocab_size must be >= 1, got {cfg.vocab_size} (rank {rank})")
        if cfg.d_model % cfg.n_heads or cfg.n_heads % tp:
            raise ValueError(
                f"GPT: n_heads={cfg.n_heads} must divide d_model={cfg.d_model} and be divisible by the TP size "
                f"{tp} (rank {rank} of {tp})"
            )
        if cfg.placement not in PLACEMENTS:
            raise ValueError(f"GPT: placement must be one of {PLACEMENTS}, got {cfg.placement!r} (rank {rank})")
        if cfg.overlap and (cfg.norm, cfg.placement, cfg.layer_norm_scaling) != ("rmsnorm", "pre", False):
            raise ValueError(
                f"GPT: overlap=true fuses Pre-RMSNorm blocks; needs norm='rmsnorm', placement='pre', "
                f"layer_norm_scaling=false, got norm={cfg.norm!r}, placement={cfg.placement!r}, "
                f"layer_norm_scaling={cfg.layer_norm_scaling} (rank {rank})"
            )
        self.cfg, self.tp_group = cfg, tp_group
        g = torch.Generator().manual_seed(seed)
        self.tok_emb = nn.Parameter(_normal((cfg.vocab_size, cfg.d_model), 0.02, g))
        self.pos_emb = nn.Parameter(_normal((cfg.seq_len, cfg.d_model), 0.02, g))
        self.blocks = nn.ModuleList(
            Block(cfg, i + 1, tp_group=tp_group, stats_group=stats_group, generator=g) for i in range(cfg.n_layers)
        )
        self.norm_f = (make_norm(cfg.norm, cfg.d_model, tp_group=tp_group, stats_group=stats_group,
                                 grad_sync=cfg.grad_sync, decay_steps=cfg.prepbn_decay_steps,
                             total_steps=cfg.total_steps)
                       if cfg.placement != "post" else nn.Identity())
        self.lm_head = nn.Parameter(_normal((cfg.vocab_size, cfg.d_model), 0.02, g))

    def _weave(self, r_shard: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """Pre-RMSNorm blocks with every "reduce-scatter + residual add + RMSNorm + all-gather" fused
        (``fused_allreduce_rms_norm(mode="reduce_scatter", normed_grad="partial")``, TokenWeave's
        op with the minimum-byte backward). Returns the final normed activations of this rank's
        tokens ``[n_local, d]``."""
        from distnorm.overlap import fused_allreduce_rms_norm

        group, n = self.tp_group, batch * seq
        h = self.blocks[0].norm1(r_shard)  # the first norm has no preceding row-parallel output
        norms_after = [b.norm2 for b in self.blocks]
        norms_next = [b.norm1 for b in self.blocks[1:]] + [self.norm_f]
        fused = functools.partial(fused_allreduce_rms_norm, group=group, mode="reduce_scatter", normed_grad="partial")
        for i, block in enumerate(self.blocks):
            partial, r_shard = block.attention_partial(h, r_shard, batch, seq, replicated=i > 0)
            h, r_shard = fused(partial, r_shard, norms_after[i].weight, norms_after[i].eps)
            partial, r_shard = block.mlp_partial(h, r_shard)
            h, r_shard = fused(partial, r_shard, norms_next[i].weight, norms_next[i].eps)
        # h is replicated (all tokens): keep this rank's tokens, whose gradient is this rank's part
        # of h's (zero elsewhere): the fused op's backward reduce-scatter sums the parts
        r = group_rank(group)
        return h.narrow(0, shard_offsets(n, group_size(group))[r], r_shard.shape[0])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch, seq = idx.shape
        if seq > self.cfg.seq_len:
            raise ValueError(f"GPT: sequence length {seq} exceeds seq_len={self.cfg.seq_len} "
                             f"(rank {group_rank(self.tp_group)})")
        n, tp = batch * seq, group_size(self.tp_group)
        h = (F.embedding(idx, self.tok_emb) + self.pos_emb[:seq]).view(n, -1)
        x_shard = comm.scatter_along(h, self.tp_group, dim=0)
        if self.cfg.overlap:
            x_shard = self._weave(x_shard, batch, seq)
        else:
            for block in self.blocks:
                x_shard = block(x_shard, batch, seq)
            x_shard = self.norm_f(x_shard)
        logits = F.linear(x_shard, comm.copy_to_group(self.lm_head, self.tp_group))
        r = group_rank(self.tp_group)
        t_shard = targets.reshape(n).narrow(0, shard_offsets(n, tp)[r], shard_sizes(n, tp)[r])
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss_local = F.cross_entropy(logits, t_shard, reduction="sum") / n
        return comm.reduce_from_group(loss_local, self.tp_group)

