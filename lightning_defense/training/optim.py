"""The optimizer recipe the seeds share: SGD with momentum and a multi-step decay."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


def sgd_multistep(
    parameters: Iterable[nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: Sequence[int],
    gamma: float,
) -> dict[str, Any]:
    """``configure_optimizers`` output: SGD, and the lr times ``gamma`` at each milestone epoch."""
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}
