"""AlexNet and VGG11: convolutions and max-pools from a plan, with MTT's layer order and
default widths (a down-sampling step that would leave convolutions on a map smaller than 2x2
is skipped, so they run on 8x8 images too).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from .blocks import (
    NORMS,
    _choice,
    _conv_out,
    _FixedInputNet,
    _image_size,
    _norm_layer,
    _pool_fits,
    _positive_int,
)


def _conv_stack(
    plan: Sequence[tuple[int, int, int] | None],
    channels: int,
    image_size: tuple[int, int],
    norm: str,
) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """Convs (``(out_channels, kernel, padding)``, each + norm + ReLU) and max-pools (``None``).

    Returns the stack and the exact shape of its output. A pool is left out where
    `_pool_fits` says the map is too small for it.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    h, w = image_size
    c = channels
    conv_i = pool_i = 0
    for k, item in enumerate(plan):
        if item is None:
            convs_follow = any(p is not None for p in plan[k + 1 :])
            if _pool_fits(h, w, convs_follow):
                layers[f"pool{pool_i}"] = nn.MaxPool2d(kernel_size=2, stride=2)
                h, w = h // 2, w // 2
            pool_i += 1
            continue
        out_channels, kernel, padding = item
        layers[f"conv{conv_i}"] = nn.Conv2d(c, out_channels, kernel_size=kernel, padding=padding)
        h, w = _conv_out(h, kernel, padding), _conv_out(w, kernel, padding)
        if h < 1 or w < 1:  # only kernels larger than the padded input get here
            raise ValueError(f"image_size={image_size} is too small for this network")
        norm_layer = _norm_layer(norm, out_channels)
        if norm_layer is not None:
            layers[f"norm{conv_i}"] = norm_layer
        layers[f"act{conv_i}"] = nn.ReLU()
        c = out_channels
        conv_i += 1
    return nn.Sequential(layers), (c, h, w)


class _ConvStackNet(_FixedInputNet):
    """Shared forward of AlexNet and VGG11: ``features`` then a linear ``classifier``."""

    def __init__(
        self,
        plan: Sequence[tuple[int, int, int] | None],
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        norm: str,
    ) -> None:
        super().__init__()
        self.input_shape = (channels, *image_size)
        self.features, self.feature_shape = _conv_stack(plan, channels, image_size, norm)
        c, h, w = self.feature_shape
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``[batch, C, H, W] -> [batch, num_classes]``."""
        self._check_input(x)
        out: Tensor = self.features(x)
        logits: Tensor = self.classifier(out.flatten(1))
        return logits


class AlexNet(_ConvStackNet):
    """MTT's small-image AlexNet: five convs (5x5, 5x5, 3x3, 3x3, 3x3), three max-pools, linear.

    ``[batch, C, H, W] -> [batch, num_classes]``. Conv widths are ``width * (1, 1.5, 2, 1.5,
    1.5)`` (MTT: 128, 192, 256, 192, 192); the first conv pads by 4 for 1-channel inputs, else 2.
    ``norm="none"`` is MTT's AlexNet, ``"batchnorm"`` its AlexNetBN, ``"instancenorm"`` also
    works. On 32x32x3 and 28x28x1 the head reads ``192 * 4 * 4`` features, as in MTT; other sizes
    get their exact size (pools that would leave less than 2x2 for later convs are skipped).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        norm: str = "none",
    ) -> None:
        channels = _positive_int("channels", channels)
        num_classes = _positive_int("num_classes", num_classes)
        size = _image_size(image_size)
        width = _positive_int("width", width)
        norm = _choice("norm", norm, NORMS, {})
        w1, w2, w3 = width, max(1, width * 3 // 2), 2 * width
        plan: list[tuple[int, int, int] | None] = [
            (w1, 5, 4 if channels == 1 else 2),
            None,
            (w2, 5, 2),
            None,
            (w3, 3, 1),
            (w2, 3, 1),
            (w2, 3, 1),
            None,
        ]
        super().__init__(plan, channels, num_classes, size, norm)


class VGG11(_ConvStackNet):
    """MTT's small-image VGG11: eight 3x3 convs (each + norm + ReLU), five max-pools, linear.

    ``[batch, C, H, W] -> [batch, num_classes]``. Conv widths ``w, 2w, 4w, 4w, 8w, 8w, 8w, 8w``
    with ``w = width`` (MTT: 64); the first conv pads by 3 for 1-channel inputs, else 1.
    ``norm="instancenorm"`` is MTT's VGG11, ``"batchnorm"`` its VGG11BN. On 32x32 (and 28x28x1)
    the head reads ``8w`` features, as in MTT; smaller images skip the pools that would leave
    less than 2x2 for later convs, so the head always gets the exact size.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 64,
        norm: str = "instancenorm",
    ) -> None:
        channels = _positive_int("channels", channels)
        num_classes = _positive_int("num_classes", num_classes)
        size = _image_size(image_size)
        width = _positive_int("width", width)
        norm = _choice("norm", norm, NORMS, {})
        first_pad = 3 if channels == 1 else 1
        plan: list[tuple[int, int, int] | None] = [
            (width, 3, first_pad),
            None,
            (2 * width, 3, 1),
            None,
            (4 * width, 3, 1),
            (4 * width, 3, 1),
            None,
            (8 * width, 3, 1),
            (8 * width, 3, 1),
            None,
            (8 * width, 3, 1),
            (8 * width, 3, 1),
            None,
        ]
        super().__init__(plan, channels, num_classes, size, norm)
