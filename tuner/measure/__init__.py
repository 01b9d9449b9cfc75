"""Measuring configurations: latency (interleaved, synchronised rounds), early stopping (exact or confident), one
trial's record (`trial.TrialMeasurer`), a serving workload (`workload`) and `eval`'s comparison with the baseline
(`compare`, printed by `table`)."""

__all__ = ["compare", "confident_stop", "early_stop", "latency", "table", "trial", "workload"]
