"""The read side, torch-free: storage, stored trials, evidence and statistics, export, tables."""

from tuner.results.trials import (
    ROLE_ATTR,
    STOPPED_ATTR,
    StudyNotFound,
    accuracy_relative,
    config_of,
    is_baseline,
    open_study,
    pareto_trials,
    study_objective,
    study_workload,
)

__all__ = ["ROLE_ATTR", "STOPPED_ATTR", "StudyNotFound", "accuracy_relative", "config_of", "is_baseline",
           "open_study", "pareto_trials", "study_objective", "study_workload"]
