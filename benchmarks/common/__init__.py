"""Helpers the studies share: interleaved timing (``timing``), the saved-for-backward bytes meter
(``memory``), paired t-intervals (``stats``) and Markdown files whose discussion survives a rerun
(``discussion``)."""
