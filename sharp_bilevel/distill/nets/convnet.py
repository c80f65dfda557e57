"""MTT's ConvNet (and the depth presets `ConvNetD4`, `ConvNetD5`). Its ``parameters()``
come in MTT's order (conv, norm per level, then the linear head), so an MTT expert buffer maps
onto it one to one; the head's input size is exact for every input size.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .blocks import (
    _POOL_ALIASES,
    ACTIVATIONS,
    NORMS,
    POOLS,
    _activation,
    _choice,
    _conv_out,
    _FixedInputNet,
    _image_size,
    _norm_layer,
    _positive_int,
)


class ConvNet(_FixedInputNet):
    """MTT's ConvNet: ``depth`` levels of conv3x3 -> norm -> activation -> 2x2 pool, then linear.

    ``[batch, channels, H, W] -> [batch, num_classes]``. Level ``d``'s modules are
    ``features.conv{d}``, ``features.norm{d}`` (absent for ``norm="none"``), ``features.act{d}``
    and ``features.pool{d}`` (absent for ``pool="none"``); the head is ``classifier``. So
    ``parameters()`` yields ``conv0.weight, conv0.bias, norm0.weight, norm0.bias, ...,
    classifier.weight, classifier.bias``: MTT's order. With 1-channel inputs the first conv pads
    by 3 (as MTT does, so 28x28 grows to 32x32); every other conv pads by 1. The head's input
    size is ``width * h * w`` with ``h x w`` the exact final map size (`feature_shape`).

    Args:
        channels: input channels C.
        num_classes: number of logits.
        image_size: ``(H, W)`` of the inputs.
        width: feature maps per level (MTT: 128).
        depth: number of levels (MTT: 3; ConvNetD4/D5 for 64x64 and larger images).
        act: one of `ACTIVATIONS`.
        norm: one of `NORMS`.
        pool: one of `POOLS`.

    Raises:
        ValueError: on a bad argument, or when the pooling shrinks the map to zero size
            (``depth`` too large for ``image_size``).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        depth: int = 3,
        act: str = "relu",
        norm: str = "instancenorm",
        pool: str = "avgpool",
    ) -> None:
        super().__init__()
        channels = _positive_int("channels", channels)
        num_classes = _positive_int("num_classes", num_classes)
        size = _image_size(image_size)
        width = _positive_int("width", width)
        depth = _positive_int("depth", depth)
        act = _choice("act", act, ACTIVATIONS, {})
        norm = _choice("norm", norm, NORMS, {})
        pool = _choice("pool", pool, POOLS, _POOL_ALIASES)

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        h, w = size
        in_channels = channels
        for d in range(depth):
            padding = 3 if channels == 1 and d == 0 else 1
            layers[f"conv{d}"] = nn.Conv2d(in_channels, width, kernel_size=3, padding=padding)
            h, w = _conv_out(h, 3, padding), _conv_out(w, 3, padding)
            norm_layer = _norm_layer(norm, width)
            if norm_layer is not None:
                layers[f"norm{d}"] = norm_layer
            layers[f"act{d}"] = _activation(act)
            if pool != "none":
                pool_cls = nn.AvgPool2d if pool == "avgpool" else nn.MaxPool2d
                layers[f"pool{d}"] = pool_cls(kernel_size=2, stride=2)
                h, w = h // 2, w // 2
                if h < 1 or w < 1:
                    raise ValueError(
                        f"ConvNet depth={depth} is too deep for image_size={size} "
                        f"(channels={channels}): level {d} pools the feature map down to {h}x{w}; "
                        "use a smaller depth or a larger image_size"
                    )
            in_channels = width
        self.input_shape = (channels, *size)
        #: ``(width, h, w)``: the shape of the features the head reads.
        self.feature_shape: tuple[int, int, int] = (width, h, w)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Flattened features: ``[batch, C, H, W] -> [batch, width * h * w]``."""
        self._check_input(x)
        out: Tensor = self.features(x)
        return out.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``[batch, C, H, W] -> [batch, num_classes]``."""
        out: Tensor = self.classifier(self.embed(x))
        return out


class ConvNetD4(ConvNet):
    """`ConvNet` with depth 4 (MTT's choice for 64x64 images such as Tiny ImageNet)."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        act: str = "relu",
        norm: str = "instancenorm",
        pool: str = "avgpool",
    ) -> None:
        super().__init__(channels, num_classes, image_size, width, 4, act, norm, pool)


class ConvNetD5(ConvNet):
    """`ConvNet` with depth 5 (MTT's choice for 128x128 ImageNet subsets)."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        act: str = "relu",
        norm: str = "instancenorm",
        pool: str = "avgpool",
    ) -> None:
        super().__init__(channels, num_classes, image_size, width, 5, act, norm, pool)
