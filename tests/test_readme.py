"""Every ```python block in README.md and docs/*.md runs as written, and README's prints what it says.

Each block runs as a script of its own (``python block.py`` from the repository root, a fresh
process): what a reader who copies it gets. A block that cannot run standalone must use another
fence language (```text, ```bash). Scripts that start processes (``distnorm.testing.spawn``,
``torch.multiprocessing``) work because the block is a real file with ``__name__ == "__main__"``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
BLOCK_TIMEOUT_S = 240  # the slowest blocks start real 4-process jobs; a hang must still end


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block of a markdown text; ``line`` is 1-based, at the fence."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


BLOCKS = [(page, line, code) for page in PAGES for line, code in python_blocks(page.read_text())]


def run_block(code: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / name
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


def test_block_extraction():
    text = "x\n```python\na = 1\n```\n```text\nnot python\n```\n\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (9, "b = 2\nc = 3\n")]
    assert len(BLOCKS) >= 10, "the docs lost their examples, or the extraction broke"


@pytest.mark.parametrize(("page", "line", "code"), BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in BLOCKS])
def test_docs_python_block_runs(page, line, code, tmp_path):
    where = f"{page.relative_to(ROOT)}:{line}"
    proc = run_block(code, tmp_path, f"{page.stem}_L{line}.py")
    assert proc.returncode == 0, (
        f"the ```python block at {where} fails when run as written (exit {proc.returncode}).\n"
        f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"
    )
    if page.name == "README.md" and line == BLOCKS[0][1]:  # README's example prints what its comment says
        promised = re.search(r"# (\{'all_reduce'.*\})", code).group(1)
        assert proc.stdout.splitlines() == [f"{r} {promised}" for r in range(4)]
