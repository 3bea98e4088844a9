"""README.md's example runs as written and prints what its comment says."""

import contextlib
import io
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_example_runs_and_matches_its_comment():
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    promised = re.search(r"# (\{'all_reduce'.*\})", code).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    assert lines == [f"{r} {promised}" for r in range(4)]
