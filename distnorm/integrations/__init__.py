"""Integrations with training frameworks. Each submodule imports its framework lazily.

* :mod:`distnorm.integrations.deepspeed`: ``initialize(...)`` reading the ``"distnorm"`` section of a
  DeepSpeed config, converting norms and passing the TP x DP topology as DeepSpeed's ``mpu``.
"""

__all__ = ["deepspeed"]
