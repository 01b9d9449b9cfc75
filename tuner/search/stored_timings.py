"""Where a trial finds a stored timing of its latency signature (`tuner.measure.shared_timing`): the complete
trials of its own study, and, with `latency.share_timings: storage`, those of every other study in the same
storage (the signature holds the stack, so only the same hardware and libraries match)."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.measure.shared_timing import ended_on_its_own
from tuner.results.record import TrialRecord
from tuner.results.trials import record_of

SIGNATURE_ATTR = "latency_signature"
REUSED_ATTR = "latency_reused_from"


def _measured(trials: list[FrozenTrial]) -> dict[str, FrozenTrial]:
    """Each signature's first complete trial that timed itself to a reusable end (`ended_on_its_own`; a trial that
    reused one points to it anyway)."""
    found: dict[str, FrozenTrial] = {}
    for trial in trials:
        attrs = trial.user_attrs
        signature = attrs.get(SIGNATURE_ATTR)
        if (trial.state == TrialState.COMPLETE and signature and not attrs.get(REUSED_ATTR)
                and ended_on_its_own(attrs.get("latency_stop"))):
            found.setdefault(signature, trial)
    return found


class StoredTimings:
    """A `TimingLookup` over one study (read afresh at every call: other workers add trials) and, with `across`,
    its storage's other studies (read once: a finished study's timings do not change; the signature holds the
    stack, so only the same hardware and libraries match)."""

    def __init__(self, study: optuna.Study, *, across: bool = False) -> None:
        self.study = study
        self.storage = study._storage if across else None  # Optuna keeps no public handle on a study's storage
        self._others: dict[str, tuple[FrozenTrial, str]] | None = None

    def __call__(self, signature: str) -> tuple[TrialRecord, str] | None:
        own = _measured(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))).get(signature)
        if own is not None:
            return record_of(own), f"trial {own.number}"
        if self.storage is None:
            return None
        other = self._other_studies().get(signature)
        return None if other is None else (record_of(other[0]), other[1])

    def _other_studies(self) -> dict[str, tuple[FrozenTrial, str]]:
        if self._others is None:
            self._others = {}
            storage = self.storage
            for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
                if summary.study_name == self.study.study_name:
                    continue
                trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(
                    deepcopy=False, states=(TrialState.COMPLETE,))
                for signature, trial in _measured(trials).items():
                    self._others.setdefault(signature, (trial, f"study {summary.study_name}, trial {trial.number}"))
        return self._others
