"""The main job's thread count does not collapse on a busy machine (issue 21, point 9): the
idle cores are ``round(cores - load)``, at least 1 and at most torch's default; an explicit
``--threads``, ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` wins."""

from __future__ import annotations

import pytest
import torch

from sharp_bilevel.cli import threads
from sharp_bilevel.cli.threads import apply_threads, choose_threads

NO_ENV: dict[str, str] = {}

# cores, 1-minute load, torch's default -> threads, worked out by hand.
IDLE_CASES = [
    (2, 0.0, 2, 2),  # idle two-core machine: both cores
    (2, 0.3, 2, 2),  # a little background work: round(1.7) = 2
    (2, 0.9, 2, 1),  # one core busy
    (2, 2.5, 2, 1),  # the reported machine (load 2.5-13 on two cores): never 0
    (2, 13.0, 2, 1),
    (16, 3.4, 8, 8),  # more idle cores than torch's default: the default caps it
    (16, 11.6, 8, 4),  # round(4.4) = 4
    (4, 1.5, 4, 2),  # round(2.5) = 2 (banker's rounding: half to even)
]


@pytest.mark.parametrize(("cores", "load", "default", "expected"), IDLE_CASES)
def test_idle_cores_from_injected_load(
    cores: int, load: float, default: int, expected: int
) -> None:
    choice = choose_threads(env=NO_ENV, current=default, default=default, cores=cores, load=load)
    assert choice.threads == expected
    assert f"{cores} usable" in choice.reason
    assert f"{load:.2f}" in choice.reason
    assert (choice.cores, choice.load) == (cores, load)


def test_explicit_settings_win_over_the_load() -> None:
    busy = {"cores": 2, "load": 13.0, "default": 2}
    choice = choose_threads(3, env={"OMP_NUM_THREADS": "1"}, current=1, **busy)
    assert (choice.threads, choice.reason) == (3, "--threads 3")
    choice = choose_threads(env={"OMP_NUM_THREADS": "2"}, current=2, **busy)
    assert choice.threads == 2
    assert "OMP_NUM_THREADS=2" in choice.reason
    choice = choose_threads(env=NO_ENV, current=2, cores=2, load=13.0, default=8)
    assert choice.threads == 2
    assert "torch.set_num_threads(2)" in choice.reason


def test_a_system_without_load_average_counts_as_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "load_average", lambda: None)
    choice = choose_threads(env=NO_ENV, current=4, default=4, cores=3)
    assert choice.threads == 3


def test_apply_sets_torch_and_is_not_mistaken_for_the_user_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "STARTUP_THREADS", 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 5.0)
    try:
        torch.set_num_threads(2)
        assert apply_threads().threads == 1 == torch.get_num_threads()
        again = apply_threads()  # our own 1 is not "the user's torch.set_num_threads(1)"
        assert again.threads == 1
        assert "idle cores" in again.reason
        assert apply_threads(2).threads == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
