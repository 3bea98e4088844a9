"""Character-level training text that every machine has: the Python standard library's own sources.

``load_corpus(num_bytes)`` reads the ``*.py`` files next to ``os.py`` in sorted order until it has
``num_bytes`` bytes, so every rank (and every launcher) builds the same text and vocabulary without
a download. ``Batches`` draws the global batch of step ``s`` from a generator seeded by
``(seed, s)`` and hands DP rank ``r`` its slice: data order depends neither on the launcher nor on
the TP degree, only on the seed and the global batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Batches", "CharCorpus", "load_corpus"]


@dataclass(frozen=True)
class CharCorpus:
    """The encoded text (``ids`` int64 ``[n]``) and its sorted character vocabulary."""

    ids: torch.Tensor
    chars: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def load_corpus(num_bytes: int = 1 << 20, root: str | os.PathLike[str] | None = None) -> CharCorpus:
    """The first ``num_bytes`` bytes of the stdlib's ``*.py`` files (sorted paths), as characters.

    Non-ASCII characters map to ``"?"`` so the vocabulary (< 100 symbols) is the same everywhere.
    """
    if not isinstance(num_bytes, int) or isinstance(num_bytes, bool) or num_bytes < 1024:
        raise ValueError(f"load_corpus: num_bytes must be an int >= 1024, got {num_bytes!r}")
    root = Path(root) if root is not None else Path(os.__file__).parent
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes().decode("ascii", errors="replace").replace("\ufffd", "?")
        parts.append(text[: num_bytes - total])
        total += len(parts[-1])
        if total >= num_bytes:
            break
    if total < num_bytes:
        raise ValueError(f"load_corpus: only {total} bytes of *.py under {root}, asked for num_bytes={num_bytes}")
    text = "".join(parts)
    chars = "".join(sorted(set(text)))
    lookup = torch.full((128,), -1, dtype=torch.int64)
    lookup[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars))
    ids = lookup[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
    return CharCorpus(ids=ids, chars=chars)


class Batches:
    """``batch(step) -> (inputs, targets)``, each int64 ``[global_batch / dp, seq_len]`` for this DP rank.

    The global batch of a step is ``global_batch`` random windows of ``seq_len + 1`` characters,
    drawn by a generator seeded with ``seed * 1_000_003 + step``; DP rank ``r`` keeps rows
    ``r * b : (r + 1) * b`` with ``b = global_batch / dp``.
    """

    def __init__(self, corpus: CharCorpus, *, seq_len: int, global_batch: int, dp_size: int, dp_rank: int,
                 seed: int) -> None:
        if global_batch % dp_size:
            raise ValueError(
                f"Batches: global batch_size={global_batch} must be divisible by the data-parallel size "
                f"{dp_size} (rank {dp_rank} of {dp_size})"
            )
        if corpus.ids.numel() <= seq_len + 1:
            raise ValueError(f"Batches: seq_len={seq_len} must be shorter than the corpus ({corpus.ids.numel()})")
        self.corpus, self.seq_len, self.global_batch = corpus, seq_len, global_batch
        self.local_batch, self.dp_rank, self.seed = global_batch // dp_size, dp_rank, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.corpus.ids.numel() - self.seq_len - 1, (self.global_batch,), generator=g)
        rows = starts[self.dp_rank * self.local_batch: (self.dp_rank + 1) * self.local_batch]
        window = rows[:, None] + torch.arange(self.seq_len + 1)
        chunk = self.corpus.ids[window]
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
