"""Readers of real image data, one module per format, and the containers they fill.

`sharp_bilevel.distill.data` re-exports every name and adds `load_dataset` (by name).
"""
