from lomo_core.optim.adalomo import AdaLomo
from lomo_core.optim.fused import FusedOptimizer
from lomo_core.optim.lomo import LOMO
from lomo_core.optim.scaler import DynamicLossScaler, LossScaleAtMinimumError

__all__ = ["LOMO", "AdaLomo", "FusedOptimizer", "DynamicLossScaler", "LossScaleAtMinimumError"]
