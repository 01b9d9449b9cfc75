"""What the dashboard shows, computed from a stored study; `dashboard/app.py` only lays it out.

Studies are read the way optuna-dashboard reads them: through Optuna's public API over any SQLAlchemy storage,
never written to. Recommendations go through `tuner.results.export` (`Rule`, `choose_trial`, `qualifying_trials`) and
downloads through `preset_from_trial` + `preset_to_yaml`, so the dashboard and `dart-tuner export` agree on both
the chosen trial and the file's bytes.

One module per job: `studies` (storage URL, picker, loading), `provenance` (what a study's numbers depend on),
`frame` (one row per trial), `choice` (choosing a point and its preset), `targets` (the points a serving engine
runs) and `figures`.
"""

from tuner.dashboard.choice import (
    Recommendation,
    default_bounds,
    export_rule_args,
    preset_file_name,
    preset_yaml,
    recommend,
)
from tuner.dashboard.figures import (
    IMPORTANCE_AUTO_TRIALS,
    PARAMETER_TITLES,
    PARAMETERS,
    STUDY_COLORS,
    X_AXES,
    compare_figure,
    hypervolume_figure,
    importance_figure,
    importance_params,
    parameter_figure,
    parameter_names,
    parameter_title,
    pareto_figure,
    reference_point,
)
from tuner.dashboard.frame import (
    METHOD_COLORS,
    TRIAL_COLUMNS,
    candidate_numbers,
    method_color,
    option_columns,
    table_of,
    trial_frame,
    workload_text,
)
from tuner.dashboard.provenance import constraints_text, markdown_text, provenance_rows
from tuner.dashboard.studies import (
    STORAGE_ENV,
    StudyChoice,
    is_running,
    list_studies,
    load_study,
    related_studies,
    state_counts,
    storage_from_argv,
)
from tuner.dashboard.targets import TARGET_CHOICES, default_target, recommend_on, target_preset_yaml, trials_on
from tuner.results.storage import StorageError
from tuner.results.trials import skipped_text, unreadable_trials

__all__ = [
    "IMPORTANCE_AUTO_TRIALS",
    "METHOD_COLORS", "PARAMETERS", "PARAMETER_TITLES", "STORAGE_ENV", "STUDY_COLORS", "TARGET_CHOICES", "TRIAL_COLUMNS",
    "X_AXES", "default_target", "recommend_on", "target_preset_yaml", "trials_on",
    "Recommendation", "StorageError", "StudyChoice", "candidate_numbers", "compare_figure", "constraints_text",
    "default_bounds", "export_rule_args", "hypervolume_figure", "importance_figure", "importance_params",
    "is_running", "list_studies", "load_study", "markdown_text", "method_color", "option_columns", "parameter_figure",
    "parameter_names", "parameter_title", "pareto_figure",
    "preset_file_name", "preset_yaml", "provenance_rows", "recommend", "reference_point", "related_studies",
    "skipped_text", "state_counts", "storage_from_argv", "table_of", "trial_frame", "unreadable_trials",
    "workload_text",
]
