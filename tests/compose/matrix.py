"""Print the compile matrix the compose tests pin: case x world x backend -> graphs, breaks, max error.

The same runs as ``tests/compose/test_compile.py`` (world 1 in this process; worlds 2 and 4 in real
gloo processes; the world-2 spawn also compiles six cases around non-reentrant checkpointing),
written as a markdown table and JSON. About 3 minutes on 2 cores::

    python -m tests.compose.matrix [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tests.compose.cases import BY_NAME
from tests.compose.harness import compile_case
from tests.compose.test_compile import ALL, INDUCTOR, _matrix


def rows() -> list[dict[str, Any]]:
    out = [compile_case(BY_NAME[n], None, 0, 1, "inductor" if n in INDUCTOR[1] else "aot_eager") for n in ALL]
    for world in (2, 4):
        out += list(_matrix(world).values())
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| case | world | backend | around checkpoint | graphs | graph breaks | max error (out, grads, buffers) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['world']} | {r['backend']} | {r.get('checkpoint') or ''} "
                         f"| - | - | **{r['error'].splitlines()[0][:80]}** |")
            continue
        err = max(r["errors"].values())
        lines.append(f"| {r['name']} | {r['world']} | {r['backend']} | {r.get('checkpoint') or ''} "
                     f"| {r['graphs']} | {r['graph_breaks']} | {err:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "benchmarks" / "out"))
    args = p.parse_args()
    results = rows()
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, `python -m tests.compose.matrix`")
    text = f"{header}\n\n{table(results)}\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_matrix.md").write_text(text)
    (out / "compile_matrix.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
