"""ResNet18 with MTT's layer order and default width."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    NORMS,
    _choice,
    _conv_out,
    _image_size,
    _norm_layer,
    _positive_int,
)


def _resnet_norm(norm: str, channels: int) -> nn.Module:
    layer = _norm_layer(norm, channels)
    return nn.Identity() if layer is None else layer


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``[batch, in_planes, H, W] -> [batch, planes, H', W']`` with ``H' = (H - 1) // stride + 1``.
    The shortcut is a 1x1 conv + norm when the shape changes, else the identity.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _resnet_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _resnet_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                _resnet_norm(norm, planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, in_planes, H, W] -> [batch, planes, H', W']``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """MTT's CIFAR-style ResNet18: 3x3 stem, four stages of two BasicBlocks, global pool, linear.

    ``[batch, C, H, W] -> [batch, num_classes]``. Stage widths ``w, 2w, 4w, 8w`` (``w = width``,
    MTT: 64); stages 2-4 down-sample by 2, except where that would shrink the map below 2x2
    (on 8x8 inputs the last stage keeps stride 1; parameters are unchanged). The head reads the
    ``8w`` globally averaged channels, which equals MTT's ``avg_pool2d(4)`` on 32x32 and 28x28.
    Module names follow MTT (``conv1``, ``bn1``, ``layer1..4``, ``classifier``).
    ``norm="batchnorm"`` (default) is MTT's ResNet18BN; ``"instancenorm"`` is MTT's ResNet18.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 64,
        norm: str = "batchnorm",
    ) -> None:
        super().__init__()
        channels = _positive_int("channels", channels)
        num_classes = _positive_int("num_classes", num_classes)
        h, w = _image_size(image_size)
        width = _positive_int("width", width)
        norm = _choice("norm", norm, NORMS, {})
        self.conv1 = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = _resnet_norm(norm, width)
        in_planes = width
        stages: list[nn.Sequential] = []
        for k, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1
            if k > 0 and _conv_out(h, 3, 1, 2) >= 2 and _conv_out(w, 3, 1, 2) >= 2:
                stride = 2
                h, w = _conv_out(h, 3, 1, 2), _conv_out(w, 3, 1, 2)
            blocks = [
                BasicBlock(in_planes, planes, stride, norm),
                BasicBlock(planes, planes, 1, norm),
            ]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``[batch, C, H, W] -> [batch, num_classes]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        logits: Tensor = self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))
        return logits
