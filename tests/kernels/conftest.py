"""Kernel tests run the Triton kernels on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are first imported (Triton reads it when a
kernel is decorated); ``make test`` sets it globally, this file sets it when a run did not.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and compiled Triton kernels (TRITON_INTERPRET unset)")


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def kernel_device():
    """Where the small-shape kernel tests run: CPU under the interpreter, else the GPU, else skip."""
    if interpreted():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")


@pytest.fixture(autouse=True)
def _interpreter_rounds_bf16_to_nearest(monkeypatch):
    """Make the interpreter round float32 -> bfloat16 to nearest-even, as the compiled kernel does.

    Triton 3.9's interpreter implements ``x.to(tl.bfloat16)`` by truncating the mantissa
    (``_convert_float`` with no rounding mode), while the GPU backend rounds to nearest even. Left
    alone, every bfloat16 output would carry up to 1 ulp instead of 0.5 ulp of error and the
    "≤ 2× torch's error" rule could not be tested as it holds on the device.
    """
    if not interpreted():
        return
    from triton import language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
