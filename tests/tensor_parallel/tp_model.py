"""A 2-layer tensor-parallel block stack built from distnorm pieces, and its plain-torch twin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distnorm import comm
from distnorm.comm import group_size
from distnorm.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    ShardedLayerNorm,
)
from distnorm.tensor_parallel.checkpoint import shard_layout

HIDDEN, FFN, TOKENS = 10, 14, 7  # 14 and 7 over 3 or 4 ranks: uneven


class Block(nn.Module):
    """Sequence-parallel pre-norm MLP block with a NormFormer-style norm on the sharded FFN hidden."""

    def __init__(self, group, grad_sync):
        super().__init__()
        kw = {"dtype": torch.float64}
        self.norm1 = SequenceParallelLayerNorm(HIDDEN, group=group, grad_sync=grad_sync, **kw)
        self.fc1 = ColumnParallelLinear(HIDDEN, FFN, group=group, sequence_parallel=True, **kw)
        self.norm2 = ShardedLayerNorm(FFN, group=group, **kw)
        self.fc2 = RowParallelLinear(FFN, HIDDEN, group=group, sequence_parallel=True, **kw)

    def forward(self, x):
        h = F.gelu(self.fc1(self.norm1(x), num_tokens=TOKENS))
        return x + self.fc2(self.norm2(h))


class Model(nn.Module):
    def __init__(self, group=None, grad_sync="backward"):
        super().__init__()
        self.blocks = nn.ModuleList([Block(group, grad_sync) for _ in range(2)])
        self.norm = SequenceParallelRMSNorm(HIDDEN, group=group, grad_sync=grad_sync, dtype=torch.float64)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def torch_model(x, sd):
    """The one-device model in plain torch from a full state dict."""
    for i in range(2):
        def p(name, i=i):
            return sd[f"blocks.{i}.{name}"]

        h = F.layer_norm(x, (HIDDEN,), p("norm1.weight"), p("norm1.bias"))
        h = F.gelu(F.linear(h, p("fc1.weight"), p("fc1.bias")))
        h = F.layer_norm(h, (FFN,), p("norm2.weight"), p("norm2.bias"))
        x = x + F.linear(h, p("fc2.weight"), p("fc2.bias"))
    return F.rms_norm(x, (HIDDEN,), sd["norm.weight"], 1e-6)


def random_full_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in Model().state_dict().items()}


def full_grads(model):
    """Every parameter's gradient, sharded ones all-gathered to full shape."""
    layout = shard_layout(model)
    out = {}
    for name, p in model.named_parameters():
        if name in layout:
            dim, n, group = layout[name]
            out[name] = comm.all_gather_uneven(p.grad, group, dim=dim, sizes=comm.shard_sizes(n, group_size(group)))
        else:
            out[name] = p.grad
    return out
