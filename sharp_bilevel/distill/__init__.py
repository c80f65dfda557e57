"""Floor 3, the distillation toolkit: data readers, ZCA, networks, expert trajectories and their
folders, evaluation, the distillation pipeline, files and reports. It builds on
:mod:`sharp_bilevel.optim`, :mod:`sharp_bilevel.trajectory` and :mod:`sharp_bilevel.adapters`."""
