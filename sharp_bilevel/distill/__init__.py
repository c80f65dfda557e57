"""Floor 3, the distillation toolkit: data readers, ZCA, networks, expert trajectories and their
folders, evaluation, the distillation pipeline, files and reports. It builds on
`sharp_bilevel.optim`, `sharp_bilevel.trajectory` and `sharp_bilevel.adapters`."""
