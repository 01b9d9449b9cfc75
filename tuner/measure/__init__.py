"""Measuring configurations: latency (interleaved, synchronised rounds), the exact early stop, one trial's
record (`trial.TrialMeasurer`), a serving workload (`workload`) and `eval`'s comparison with the baseline
(`compare`, printed by `table`)."""

__all__ = ["compare", "early_stop", "latency", "table", "trial", "workload"]
