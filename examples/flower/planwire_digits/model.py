"""The model and its training plan (server side only: building a plan needs torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import planwire as sy


class CNN(nn.Module):
    """The digits CNN, of this app and of examples/federated.py (which imports it from here)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(lr: float = 0.05, momentum: float = 0.9, seed: int = 0) -> tuple[CNN, bytes]:
    """A seeded model and its training step (SGD with momentum, cross-entropy, accuracy) as ONNX bytes."""
    torch.manual_seed(seed)
    model = CNN()
    plan = sy.training_plan(
        model,
        F.cross_entropy,
        sy.optim.SGD(lr=lr, momentum=momentum),
        args_shape=[(-1, 1, 8, 8), (-1,)],
        args_dtypes=[torch.float32, torch.int64],
        metrics=("accuracy",),
    )
    return model, plan.step.variant.data
