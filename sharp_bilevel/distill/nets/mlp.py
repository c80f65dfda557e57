"""MTT's three-layer MLP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    _FixedInputNet,
    _image_size,
    _positive_int,
)


class MLP(_FixedInputNet):
    """MTT's MLP: flatten -> ``fc_1`` -> ReLU -> ``fc_2`` -> ReLU -> ``fc_3``.

    ``[batch, C, H, W] -> [batch, num_classes]``; hidden layers of ``width`` units (MTT: 128).
    MTT fixes the input to 28x28x1 or 32x32x3; here it is ``C * H * W`` of ``image_size``.
    """

    def __init__(
        self, channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128
    ) -> None:
        super().__init__()
        channels = _positive_int("channels", channels)
        num_classes = _positive_int("num_classes", num_classes)
        size = _image_size(image_size)
        width = _positive_int("width", width)
        self.input_shape = (channels, *size)
        self.fc_1 = nn.Linear(channels * size[0] * size[1], width)
        self.fc_2 = nn.Linear(width, width)
        self.fc_3 = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``[batch, C, H, W] -> [batch, num_classes]``."""
        self._check_input(x)
        out = F.relu(self.fc_1(x.flatten(1)))
        out = F.relu(self.fc_2(out))
        logits: Tensor = self.fc_3(out)
        return logits
