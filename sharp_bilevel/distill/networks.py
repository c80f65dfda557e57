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

The code lives in `sharp_bilevel.distill.nets`, one module per family (`blocks`, `convnet`,
`mlp`, `convstack`, `resnet`, `registry`); this module re-exports every public name.
"""

from __future__ import annotations

from .nets.blocks import ACTIVATIONS, NORMS, POOLS
from .nets.convnet import ConvNet, ConvNetD4, ConvNetD5
from .nets.convstack import VGG11, AlexNet
from .nets.mlp import MLP
from .nets.registry import available_networks, get_network
from .nets.resnet import BasicBlock, ResNet18

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
