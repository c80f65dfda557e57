"""Adapters that glue ``SharpBilevelOptimizer`` onto MTT, FTD and DATM distillation loops.

Installed as the subpackage ``sharp_bilevel.adapters`` (never a top-level ``adapters`` import).
The MTT, FTD and DATM adapters arrive with the trajectory-matching engine.
"""
