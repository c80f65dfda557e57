"""Outer objectives that plug into ``SharpBilevelOptimizer`` as closures."""

from .trajectory_matching import TrajectoryMatching

__all__ = ["TrajectoryMatching"]
