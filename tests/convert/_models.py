"""Tiny random models for the conversion tests: Hugging Face ones built from config classes (no
downloads), a Conv–BN–ReLU CNN and a Linear–BN–ReLU MLP; all float64 and in eval mode."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="transformers")


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random γ/β and running statistics (initial 1/0 values would hide folding mistakes); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-1.0, 1.0, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def gpt2(head: bool = False) -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager")
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    torch.manual_seed(0)
    return perturb(cls(cfg).double())


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=50, attn_implementation="eager")
    torch.manual_seed(0)
    return perturb(transformers.LlamaModel(cfg).double())


def vit() -> nn.Module:
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=4, attn_implementation="eager")
    torch.manual_seed(0)
    return perturb(transformers.ViTModel(cfg).double())


def resnet() -> nn.Module:
    """HF ResNet: every conv (stem, blocks, shortcut) is Conv(bias=False) -> BatchNorm2d."""
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    torch.manual_seed(0)
    return perturb(transformers.ResNetModel(cfg).double())


def inputs(name: str, batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64)}
    if name == "resnet":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64)}
    return {"input_ids": torch.randint(0, 50, (batch, 8), generator=g)}


HF_MODELS: dict[str, Callable[[], nn.Module]] = {"gpt2": gpt2, "llama": llama, "vit": vit, "resnet": resnet}
# HF's LlamaRMSNorm computes in float32 even for float64 inputs; distnorm keeps float64, so a
# converted Llama differs from the original by HF's own round-off, not by distnorm's
TOL = {"gpt2": 1e-10, "llama": 1e-6, "vit": 1e-10, "resnet": 1e-10}


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).last_hidden_state
