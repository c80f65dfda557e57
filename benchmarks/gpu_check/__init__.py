"""The prepared GPU check: exactness, memory and time ratios, precision on one GPU."""
