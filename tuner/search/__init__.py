"""The search: a validated space (`space`, its parameters in `params`, packaged spaces in `space_files`), the
samplers, what a worker measures with (`setup.MeasuringSetup`), the study driver (`study.Tuner`, with its
`guards`, `requeue`, `provenance` and `space_changes` checks), the confirmation of a front and the replay of
samplers against a measured grid."""

__all__ = ["confirm", "guards", "params", "provenance", "replay", "requeue", "samplers", "setup", "space",
           "space_changes", "space_files", "study"]
