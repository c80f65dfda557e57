"""Perturbation rules: one module per rule, and the name registry.

==========  ==========================================================  ===================
name        ascent ``eps``                                               descent
==========  ==========================================================  ===================
``none``    no second pass                                               ``g``
``sam``     ``rho g / (||g|| + xi)``                                     ``g'``
``asam``    ``rho T^2 g / (||T g|| + xi)``, ``T = |phi| + eta``          ``g'``
``gsam``    as SAM, optional rho schedule                                ``g' - alpha g_perp``
``vasso``   ``rho d / (||d|| + xi)``, ``d <- (1-theta) d + theta g``     ``g'``
``ssam``    SAM, gradient taken at ``phi + Delta`` (SATM smoothing)      ``g'``
``wsam``    as SAM                                                       ``g + a (g' - g)``
``fsam``    ``rho u / (||u|| + xi)``, ``u = g - sigma m``                ``g'``
``looksam`` SAM every ``k`` steps                                        ``g'`` / reused
``bsam``    ``rho g / s``, ``g`` at ``phi + Delta``                      ``m / s``
``gcsam``   SAM on ``gc(g)``                                             ``gc(g')``
==========  ==========================================================  ===================
"""

from .asam import ASAM
from .base import PerturbationRule, RuleState
from .bsam import BayesianSAM
from .friendly import FriendlySAM
from .gcsam import GCSAM
from .gsam import GSAM
from .looksam import LookSAM
from .none import NoPerturbation
from .registry import (
    available_perturbations,
    get_perturbation,
    register_perturbation,
    rule_parameters,
)
from .sam import SAM
from .smoothed import SmoothedSAM
from .vasso import VaSSO
from .wsam import WSAM

__all__ = [
    "ASAM",
    "GCSAM",
    "GSAM",
    "SAM",
    "WSAM",
    "BayesianSAM",
    "FriendlySAM",
    "LookSAM",
    "NoPerturbation",
    "PerturbationRule",
    "RuleState",
    "SmoothedSAM",
    "VaSSO",
    "available_perturbations",
    "get_perturbation",
    "register_perturbation",
    "rule_parameters",
]
