"""The MKD method and its baselines in pure PyTorch (no Ray, no MLflow)."""

from mkd_ray.method.mkd import Batch, MutualKD, StepOutput
from mkd_ray.method.optim import build_optimizer, poly_lr_lambda, train_step

__all__ = ["Batch", "MutualKD", "StepOutput", "build_optimizer", "poly_lr_lambda", "train_step"]
