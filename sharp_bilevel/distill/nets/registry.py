"""`get_network`: any network by name, seeded, without touching the global RNG (MTT's
``get_network`` reseeds it from the wall clock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import (
    _image_size,
    _positive_int,
)
from .convnet import ConvNet, ConvNetD4, ConvNetD5
from .convstack import VGG11, AlexNet
from .mlp import MLP
from .resnet import ResNet18


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
