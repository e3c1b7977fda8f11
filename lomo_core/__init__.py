"""lomo_core: full-parameter fine-tuning with LOMO and AdaLomo."""

from lomo_core.optim import LOMO, AdaLomo, DynamicLossScaler

__all__ = ["LOMO", "AdaLomo", "DynamicLossScaler"]
__version__ = "0.1.0"
