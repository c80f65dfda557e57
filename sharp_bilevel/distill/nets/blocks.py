"""The networks' option names, argument checks and shared building blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

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
