"""Accuracy: lmms-eval tasks and their seeded subsets, the `dart_tuner` lmms-eval model, batched model inputs,
the bundled offline task. `lmms_compat` is the one place that imports lmms-eval."""

__all__ = ["inputs", "lmms_compat", "lmms_model", "runner", "shapes", "tasks"]
