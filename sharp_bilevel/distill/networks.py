"""The networks of the trajectory-matching codebases (MTT, FTD, DATM), rebuilt in plain torch.

Every network maps ``[batch, C, H, W] -> [batch, num_classes]`` logits.

* `ConvNet` (and the depth presets `ConvNetD4`, `ConvNetD5`): MTT's student
  and expert network. Its ``parameters()`` come in MTT's order (conv, norm per level, then the
  linear head), so an MTT expert buffer (one tensor per parameter) maps onto it one to one.
  Unlike MTT, the head's input size is exact for every input size (MTT's guess breaks for
  ``1x8x8`` at depth 1 or 2, and for ``3x28x28``).
* `MLP`, `AlexNet`, `VGG11`, `ResNet18`: the cross-architecture
  networks, with MTT's layer order and default widths, adapted so they also run on 8x8 images
  (a down-sampling step that would leave convolutions running on a map smaller than 2x2 is
  skipped; no parameter count changes).
* `get_network`: build any of them by name with a seed, without touching the global RNG
  (MTT's ``get_network`` reseeds it from the wall clock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "NORMS",
    "POOLS",
    "VGG11",
    "AlexNet",
    "BasicBlock",
    "ConvNet",
    "ConvNetD4",
    "ConvNetD5",
    "ResNet18",
    "available_networks",
    "get_network",
]

#: Normalisation layers, by name: ``"instancenorm"`` is ``GroupNorm(C, C)`` (MTT's choice),
#: ``"layernorm"`` is ``GroupNorm(1, C)``, ``"groupnorm"`` is ``GroupNorm(4, C)``.
NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
#: Activations, by name (``"leakyrelu"`` has slope 0.01, as in MTT).
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")
#: Pooling after each ConvNet level: 2x2, stride 2 (MTT's spellings ``"avgpooling"`` and
#: ``"maxpooling"`` are accepted too).
POOLS = ("avgpool", "maxpool", "none")
_POOL_ALIASES = {"avgpooling": "avgpool", "maxpooling": "maxpool"}

# --------------------------------------------------------------------------------------------
# argument checks and building blocks


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _image_size(value: object) -> tuple[int, int]:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(
            f"image_size must be (height, width) with two positive ints, got {value!r}"
        )
    return (int(value[0]), int(value[1]))


def _choice(name: str, value: object, options: Sequence[str], aliases: dict[str, str]) -> str:
    key = value.strip().lower() if isinstance(value, str) else ""
    key = aliases.get(key, key)
    if key not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")
    return key


def _norm_layer(norm: str, channels: int) -> nn.Module | None:
    """A normalisation layer over ``channels`` feature maps, or None for ``"none"``."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels, affine=True)
    if norm == "groupnorm":
        if channels % 4:
            raise ValueError(
                f'norm="groupnorm" uses 4 groups: width {channels} is not divisible by 4'
            )
        return nn.GroupNorm(4, channels, affine=True)
    return None


def _activation(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU()
    if act == "sigmoid":
        return nn.Sigmoid()
    return nn.LeakyReLU(negative_slope=0.01)


def _conv_out(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool_fits(h: int, w: int, convs_follow: bool) -> bool:
    """Whether a 2x2 stride-2 pooling belongs at an ``h x w`` map in the small-image networks.

    Pooling is skipped when it would leave a map smaller than 2x2 for the convolutions that
    follow (instance norm over one pixel is constant), or, as the last layer, an empty map.
    """
    least = 2 if convs_follow else 1
    return h // 2 >= least and w // 2 >= least


class _FixedInputNet(nn.Module):
    """A network whose linear head is sized for one input shape ``[C, H, W]``."""

    input_shape: tuple[int, int, int]

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{type(self).__name__} was built for inputs [batch, "
                f"{', '.join(map(str, self.input_shape))}], got {list(x.shape)}"
            )


# --------------------------------------------------------------------------------------------
# ConvNet


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


# --------------------------------------------------------------------------------------------
# MLP


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


# --------------------------------------------------------------------------------------------
# AlexNet and VGG11: convolutions and max-pools from a plan


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


# --------------------------------------------------------------------------------------------
# ResNet18


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


# --------------------------------------------------------------------------------------------
# get_network


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., nn.Module]
    options: frozenset[str]  # which of width/depth/norm the caller may set
    fixed: dict[str, object] = field(default_factory=dict)  # set by the name itself
    preset: dict[str, object] = field(default_factory=dict)  # passed to build


_NETWORKS: dict[str, _Spec] = {
    "ConvNet": _Spec(ConvNet, frozenset({"width", "depth", "norm"})),
    "ConvNetD4": _Spec(ConvNetD4, frozenset({"width", "norm"}), {"depth": 4}),
    "ConvNetD5": _Spec(ConvNetD5, frozenset({"width", "norm"}), {"depth": 5}),
    "ConvNetBN": _Spec(
        ConvNet, frozenset({"width", "depth"}), {"norm": "batchnorm"}, {"norm": "batchnorm"}
    ),
    "ConvNetNoNorm": _Spec(
        ConvNet, frozenset({"width", "depth"}), {"norm": "none"}, {"norm": "none"}
    ),
    "MLP": _Spec(MLP, frozenset({"width"})),
    "AlexNet": _Spec(AlexNet, frozenset({"width", "norm"})),
    "VGG11": _Spec(VGG11, frozenset({"width", "norm"})),
    "ResNet18": _Spec(ResNet18, frozenset({"width", "norm"})),
}
_BY_KEY = {name.lower(): name for name in _NETWORKS}


def available_networks() -> list[str]:
    """The names `get_network` accepts (matched case-insensitively)."""
    return list(_NETWORKS)


def get_network(
    name: str,
    channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    seed: int = 0,
    width: int | None = None,
    depth: int | None = None,
    norm: str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build network ``name`` for ``[batch, channels, *image_size]`` inputs, seeded.

    The weights are drawn on the CPU from a generator seeded with ``seed`` (PyTorch's default
    initialisation), then moved to ``device``: the same seed gives bit-identical weights on every
    device, and the global RNG state (CPU and accelerators) is the same after the call as before.

    Args:
        name: one of `available_networks`, case-insensitive. ``"ConvNetBN"`` and
            ``"ConvNetNoNorm"`` are ConvNet with ``norm="batchnorm"`` / ``"none"``.
        channels: input channels C.
        num_classes: number of logits.
        image_size: ``(H, W)`` of the inputs.
        seed: seed of the initialisation.
        width: overrides the network's default width (ConvNet and MLP: 128; AlexNet: 128;
            VGG11 and ResNet18: 64).
        depth: ConvNet levels (ConvNet, ConvNetBN, ConvNetNoNorm only; default 3).
        norm: overrides the default normalisation, one of `NORMS` (not for MLP,
            ConvNetBN, ConvNetNoNorm).
        device: where the returned module lives (default CPU).

    Raises:
        ValueError: unknown name (the message lists the known ones), a bad argument (named in
            the message), an option the network does not take, or an impossible shape.
    """
    if not isinstance(name, str) or name.strip().lower() not in _BY_KEY:
        raise ValueError(
            f"unknown network {name!r}; known networks: {', '.join(available_networks())}"
        )
    canonical = _BY_KEY[name.strip().lower()]
    spec = _NETWORKS[canonical]
    channels = _positive_int("channels", channels)
    num_classes = _positive_int("num_classes", num_classes)
    size = _image_size(image_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")

    kwargs: dict[str, object] = dict(spec.preset)
    for key, value in (("width", width), ("depth", depth), ("norm", norm)):
        if value is None:
            continue
        if key in spec.fixed:
            given = value.strip().lower() if isinstance(value, str) else value
            if given != spec.fixed[key]:
                raise ValueError(
                    f"{canonical} has {key}={spec.fixed[key]!r} by definition, got {key}={value!r}"
                )
        elif key not in spec.options:
            raise ValueError(
                f"{canonical} takes no {key} argument (it takes: "
                f"{', '.join(sorted(spec.options)) or 'none'})"
            )
        else:
            kwargs[key] = value

    # Seed only the CPU generator (torch.manual_seed would also reseed every accelerator) and
    # build on the CPU, so the draws do not depend on the default device; fork_rng restores it.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed)
        net = spec.build(channels, num_classes, size, **kwargs)
    if device is not None:
        net = net.to(device)
    return net
