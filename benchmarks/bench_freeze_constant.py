"""Which fixed ``1/σ`` should a frozen norm use? Loss of the demo GPT with its norms frozen at
five candidate constants, against the unfrozen model.

The demo model (``configs/tiny_gpt.toml``, single process, the trainer's optimizer and schedule)
trains ``--steps`` steps; ``distnorm.freeze_norms`` then calibrates on the next 4 training batches
(the trainer's ``--freeze-norms-at``), and every norm's ``rstd`` is set in turn to each candidate
built from the per-token ``σ = sqrt(var + eps)`` (``mean x²`` for RMSNorm) seen in calibration:

* ``1/sqrt(mean σ²)`` (what ``freeze_norms`` uses), ``1/mean σ``, ``mean 1/σ``;
* least squares on the outputs, ``Σ var/σ / Σ var`` (minimises ``Σ_t |x̃_t·r − x̃_t/σ_t|²``);
* least squares per token, ``Σ σ / Σ σ²`` (minimises ``Σ_t (r·σ_t − 1)²``).

Loss: mean over the 20 batches after the calibration ones, in eval mode, no fine-tuning.
Deterministic (seeded), so the numbers do not depend on the machine's load.

    python benchmarks/bench_freeze_constant.py [--norm layernorm|rmsnorm] [--steps 300]

Prints a table, writes ``benchmarks/out/bench_freeze_constant_<norm>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distnorm.freeze import FrozenScaleNorm, freeze_norms, token_variance
from launch.data import Batches, load_corpus
from launch.model import GPT
from launch.train import _lr_lambda, load_train_config, parse_args

CALIBRATION, EVALUATION = 4, 20


def candidates(sigma: torch.Tensor, var: torch.Tensor) -> dict[str, float]:
    """Candidate constants from the calibration tokens' ``σ`` and ``var`` (float64 ``[tokens]``)."""
    return {
        "1/sqrt(mean sigma^2) (freeze_norms)": float(sigma.pow(2).mean().rsqrt()),
        "1/mean(sigma)": float(1 / sigma.mean()),
        "mean(1/sigma)": float((1 / sigma).mean()),
        "least squares, outputs: sum(var/sigma)/sum(var)": float((var / sigma).sum() / var.sum()),
        "least squares, per token: sum(sigma)/sum(sigma^2)": float(sigma.sum() / sigma.pow(2).sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--norm", default="layernorm", choices=["layernorm", "rmsnorm"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = p.parse_args()
    cfg = load_train_config(parse_args(["--steps", str(args.steps), "--norm", args.norm]))
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg.corpus_bytes)
    mcfg = dataclasses.replace(cfg.model, vocab_size=corpus.vocab_size, total_steps=cfg.steps)
    model = GPT(mcfg, seed=cfg.seed)
    batches = Batches(corpus, seq_len=mcfg.seq_len, global_batch=cfg.batch_size, dp_size=1, dp_rank=0, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    for step in range(cfg.steps):
        loss = model(*batches.batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    evaluation = [batches.batch(s) for s in range(cfg.steps + CALIBRATION, cfg.steps + CALIBRATION + EVALUATION)]

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return sum(float(model(*b)) for b in evaluation) / len(evaluation)

    unfrozen = eval_loss()
    calibration = [batches.batch(s) for s in range(cfg.steps, cfg.steps + CALIBRATION)]
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, m in model.named_modules():
        if hasattr(m, "normalized_shape") and hasattr(m, "eps"):
            center = "LayerNorm" in type(m).__name__

            def hook(module: torch.nn.Module, inputs: tuple, name: str = name, center: bool = center) -> None:
                var = token_variance(inputs[0], module.normalized_shape, center=center)
                seen.setdefault(name, []).append(((var + module.eps).sqrt(), var))

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in calibration:
            model(*b)
    for h in hooks:
        h.remove()
    freeze_norms(model, calibration)
    frozen = {n: m for n, m in model.named_modules() if isinstance(m, FrozenScaleNorm)}
    per_norm = {n: candidates(torch.cat([s for s, _ in v]), torch.cat([v for _, v in v])) for n, v in seen.items()}
    rows = []
    for key in next(iter(per_norm.values())):
        for n, m in frozen.items():
            m.rstd.fill_(per_norm[n][key])
        loss = eval_loss()
        rows.append({"constant": key, "loss": loss, "delta": loss - unfrozen})
    print(f"demo GPT, norm={args.norm}, {cfg.steps} steps; unfrozen eval loss {unfrozen:.4f}")
    print(f"{'constant':52s} {'loss':>8s} {'- unfrozen':>11s}")
    for r in rows:
        print(f"{r['constant']:52s} {r['loss']:8.4f} {r['delta']:+11.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_freeze_constant_{args.norm}.json").write_text(json.dumps(
        {"norm": args.norm, "steps": cfg.steps, "unfrozen": unfrozen, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
