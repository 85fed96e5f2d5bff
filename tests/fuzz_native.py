"""The fuzz target of the C core: differential runs on hostile rings, for a time budget.

``python -m tests.fuzz_native --seconds 60`` runs seeds from ``--start`` on,
each as a TX burst sequence, an RX delivery sequence and RX batches (plain
and MAC-swapped), on a split and on a packed ring, and switch bursts among
three guests and two uplinks (``tests.switch_differential``, every other seed
on hostile rings), through the C path and the Python reference, on rings a
hostile driver scribbled over (``tests.differential.scribble``/``scribble_packed``), and stops at
the first divergence with the seed that shows it. Under the sanitizer build
(``VHOSTD_SANITIZE=1``, see ``vhostd/native.py``) a memory error in C aborts
the run. Seeds run in order, so a run is reproducible: only its length
depends on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from tests.differential import compare, differential, differential_batch
from tests.switch_differential import compare_switch, switch_differential

Pair = tuple[dict[str, Any], dict[str, Any]]


def cases(seed: int) -> list[tuple[str, Callable[[], Pair]]]:
    return [
        ("tx", lambda: differential(seed, False, True)),
        ("rx", lambda: differential(seed, True, True)),
        ("rx-batch", lambda: differential_batch(seed, False, True)),
        ("rx-batch-swap", lambda: differential_batch(seed, True, True)),
        ("packed-tx", lambda: differential(seed, False, True, True)),
        ("packed-rx", lambda: differential(seed, True, True, True)),
        ("packed-rx-batch", lambda: differential_batch(seed, False, True, True)),
        ("packed-rx-batch-swap", lambda: differential_batch(seed, True, True, True)),
        ("switch", lambda: switch_differential.__wrapped__(seed, seed % 2 == 1)),
    ]


def run(start: int, seconds: float, limit: int | None = None) -> int:
    """Fuzz until the budget is spent; returns how many seeds ran (raises on a divergence)."""
    deadline = time.monotonic() + seconds
    seed = start
    while time.monotonic() < deadline and (limit is None or seed < start + limit):
        for name, case in cases(seed):
            try:
                (compare_switch if name == "switch" else compare)(*case())
            except AssertionError as exc:
                raise AssertionError(f"C and Python diverge: seed {seed}, {name}: {exc}") from exc
        differential.cache_clear()
        seed += 1
    return seed - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--start", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, default=None, help="stop after this many seeds")
    args = parser.parse_args(argv)
    n = run(args.start, args.seconds, args.seeds)
    print(f"fuzz: {n} seeds from {args.start}, no divergence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
