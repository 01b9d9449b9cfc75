"""Seconds an early-stopped trial's chunk costs outside generation, with lmms-eval's default `clean()` and with the
`dart_tuner` model's: the bench-search space's 40 documents in 5 chunks of 8, alternating the two, 3 times each.

    PYTHONPATH=$PWD python .ci/chunk_cost.py
"""

from __future__ import annotations

import statistics
import time

from tuner.config import PruningConfig
from tuner.evaluation.lmms_model import DartTunerLMM, lmms
from tuner.search.setup import MeasuringSetup
from tuner.search.space import load_space


def main() -> None:
    """Print the median seconds per chunk outside `generate_until` for each `clean()`."""
    evaluator = MeasuringSetup.load(load_space("bench_search")).measurer.evaluator
    config = PruningConfig(method="dart", layer=2, keep_ratio=0.25)
    generating = [0.0]
    answer = DartTunerLMM.generate_until

    def timed(self: DartTunerLMM, requests: list) -> list[str]:
        started = time.perf_counter()
        try:
            return answer(self, requests)
        finally:
            generating[0] += time.perf_counter() - started

    ours = DartTunerLMM.clean
    DartTunerLMM.generate_until = timed
    evaluator.evaluate(config)  # warm-up
    per_chunk: dict[str, list[float]] = {"lmms-eval clean()": [], "dart_tuner clean()": []}
    for _ in range(3):
        for name, clean in (("lmms-eval clean()", lmms.clean), ("dart_tuner clean()", ours)):
            DartTunerLMM.clean = clean
            generating[0] = 0.0
            result = evaluator.evaluate(config, chunk_size=8)
            per_chunk[name].append((result.seconds - generating[0]) / 5)
    DartTunerLMM.clean, DartTunerLMM.generate_until = ours, answer
    for name, values in per_chunk.items():
        print(f"{name}: {statistics.median(values):.3f} s per chunk outside generation "
              f"({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
