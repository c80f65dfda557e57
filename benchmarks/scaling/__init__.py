"""The synthetic set sharded over ranks: per-rank memory, all-reduce traffic, step time."""
