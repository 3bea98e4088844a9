"""The demo GPT: identical losses and gradients for every TP size, every norm and placement trains."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distnorm.comm import count_collectives, group_size
from distnorm.testing import simulate, spawn
from launch.data import Batches, load_corpus
from launch.model import GPT, NORM_TYPES, ModelConfig, make_norm

CFG = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, seq_len=8)


def _has_data_parallel() -> bool:
    try:
        import distnorm.data_parallel  # noqa: F401
    except ImportError:
        return False
    return True


def _batch(seed: int = 0, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(idx, targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _tp_run(rank: int, cfg: ModelConfig, idx: torch.Tensor, targets: torch.Tensor) -> tuple:
    group = torch.distributed.group.WORLD
    model = GPT(cfg, tp_group=group, stats_group=group, seed=7).double()
    with count_collectives() as c:
        loss, grads = _loss_and_grads(model, idx, targets)
    # replicated parameters: embeddings, LM head, norms -> full gradient on every rank
    replicated = {n: g for n, g in grads.items() if "norm" in n or n in ("tok_emb", "pos_emb", "lm_head")
                  or n.endswith("proj.bias") or n.endswith("fc2.bias")}
    return loss, replicated, c.as_dict(), group_size(group)


@pytest.mark.parametrize("placement", ["pre", "peri"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_tp_loss_and_replicated_grads_match_one_device(world: int, placement: str) -> None:
    cfg = dataclasses.replace(CFG, placement=placement, norm="rmsnorm" if placement == "peri" else "layernorm")
    idx, targets = _batch(batch=3)
    ref_model = GPT(cfg, seed=7).double()
    ref_loss, ref_grads = _loss_and_grads(ref_model, idx, targets)
    for loss, grads, counts, _ in simulate(world, _tp_run, cfg, idx, targets, timeout=120):
        assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-10, msg=name)
        if world == 1:
            assert counts == {}
        else:  # per layer: 2 sublayers x (fwd all-gather + reduce-scatter, bwd the converse)
            assert counts["all_gather"]["count"] == 2 * cfg.n_layers * 2 + 1  # + embedding-grad all-gather


@pytest.mark.skipif(not _has_data_parallel(), reason="needs distnorm.data_parallel")
@pytest.mark.parametrize("norm", ["powernorm", "unified", "prepbn"])
@pytest.mark.parametrize("world", [2, 3])
def test_batch_statistics_norms_pool_over_tp(world: int, norm: str) -> None:
    """Tokens are split over TP too: batch statistics pool over every rank, affine grads summed over TP."""
    cfg = dataclasses.replace(CFG, norm=norm, n_heads=world * (4 // world or 1), d_model=12 if world == 3 else 16)
    idx, targets = _batch(batch=3)
    ref_loss, ref_grads = _loss_and_grads(GPT(cfg, seed=7).double(), idx, targets)
    for loss, grads, _, _ in simulate(world, _tp_run, cfg, idx, targets, timeout=120):
        assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-10, msg=name)


def test_tp3_uneven_tokens_match_one_device() -> None:
    cfg = dataclasses.replace(CFG, n_heads=3, d_model=12)
    idx, targets = _batch(batch=1)  # 8 tokens over 3 ranks: 3, 3, 2
    ref_loss, ref_grads = _loss_and_grads(GPT(cfg, seed=7).double(), idx, targets)
    for loss, grads, _, _ in simulate(3, _tp_run, cfg, idx, targets, timeout=120):
        assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-10, msg=name)


def test_tp2_real_processes() -> None:
    idx, targets = _batch()
    ref_loss, _ = _loss_and_grads(GPT(CFG, seed=7).double(), idx, targets)
    for loss, _, _, world in spawn(2, _tp_run, CFG, idx, targets, timeout=120):
        assert world == 2 and abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)


_AVAILABLE = [n for n in NORM_TYPES if _has_data_parallel() or n not in ("powernorm", "unified", "prepbn")]


@pytest.mark.parametrize("norm,placement,scaling", [(n, "pre", False) for n in _AVAILABLE]
                         + [("layernorm", p, True) for p in ("post", "peri", "mix")])
def test_every_norm_and_placement_learns(norm: str, placement: str, scaling: bool) -> None:
    corpus = load_corpus(16384)
    cfg = dataclasses.replace(CFG, vocab_size=corpus.vocab_size, d_model=32, n_layers=4, seq_len=32, norm=norm,
                              placement=placement, layer_norm_scaling=scaling)
    model = GPT(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = Batches(corpus, seq_len=32, global_batch=8, dp_size=1, dp_rank=0, seed=0)
    losses = []
    for step in range(8):
        loss = model(*batches.batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_layer_norm_scaling_and_mix_placement() -> None:
    cfg = dataclasses.replace(CFG, n_layers=4, placement="mix", mix_ratio=0.5, layer_norm_scaling=True)
    model = GPT(cfg)
    assert [b.placement for b in model.blocks] == ["post", "post", "pre", "pre"]
    assert [b.norm1.output_scale for b in model.blocks] == [1.0, 1.0, pytest.approx(3 ** -0.5), 0.5]


def test_bad_model_config() -> None:
    with pytest.raises(ValueError, match=r"n_heads=3 must divide d_model=16"):
        GPT(dataclasses.replace(CFG, n_heads=3))
    with pytest.raises(ValueError, match=r"norm must be one of .* got 'groupnorm'"):
        make_norm("groupnorm", 8, tp_group=None, stats_group=None)


def test_batches_split_the_global_batch_over_dp() -> None:
    corpus = load_corpus(4096)
    full = Batches(corpus, seq_len=16, global_batch=4, dp_size=1, dp_rank=0, seed=3).batch(5)[0]
    parts = [Batches(corpus, seq_len=16, global_batch=4, dp_size=2, dp_rank=r, seed=3).batch(5)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match=r"batch_size=5 must be divisible by the data-parallel size 2 \(rank 1"):
        Batches(corpus, seq_len=16, global_batch=5, dp_size=2, dp_rank=1, seed=3)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_overlap_path_matches_one_device(world: int) -> None:
    """The fused reduce-scatter + residual + RMSNorm + all-gather path equals the plain model."""
    pytest.importorskip("distnorm.overlap")
    cfg = dataclasses.replace(CFG, norm="rmsnorm", n_heads=world * (4 // world), d_model=12 if world == 3 else 16)
    idx, targets = _batch(batch=1)  # 8 tokens: uneven over 3 ranks
    ref_loss, ref_grads = _loss_and_grads(GPT(cfg, seed=7).double(), idx, targets)
    for loss, grads, counts, _ in simulate(world, _tp_run, dataclasses.replace(cfg, overlap=True), idx, targets,
                                           timeout=120):
        assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-10, msg=name)
        if world > 1:  # one fused reduce-scatter per sublayer in fwd and (normed_grad="partial") in bwd,
            # + the bwd of the first qkv's all-gather
            assert counts["reduce_scatter"]["count"] == 4 * cfg.n_layers + 1


def test_overlap_needs_pre_rmsnorm() -> None:
    with pytest.raises(ValueError, match=r"overlap=true fuses Pre-RMSNorm blocks; .* got norm='layernorm'"):
        GPT(dataclasses.replace(CFG, overlap=True))
