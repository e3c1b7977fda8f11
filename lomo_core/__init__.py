"""lomo_core: full-parameter fine-tuning with LOMO and AdaLomo.

The optimizers are imported on first use, so that the parts that need no torch (the config, the data
file checks) stay light for the job API.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOMO", "AdaLomo", "DynamicLossScaler"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lomo_core import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'lomo_core' has no attribute {name!r}")
