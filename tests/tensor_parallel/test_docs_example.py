"""The example in docs/tensor_parallel.md runs as written."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "tensor_parallel.md"


def test_docs_example_runs(capsys):
    text = DOC.read_text()
    section = text[text.index("## Example"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert out.count("torch.Size([3, 16])") == 3, out  # 9 tokens over 3 ranks
