"""`dart-tuner tune --portable vllm` end to end on a tiny random Qwen2-VL: only keep_all at the space's processor
settings is measured, the study records its target, and its trials export for vLLM; a space with nothing portable,
or a setting the loaded family's engine processor does not take, fails in one line before any trial."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from tuner.cli import app
from tuner.results import is_baseline
from tuner.results.ports import TARGET_ATTR
from tuner.results.trials import config_of

optuna.logging.set_verbosity(optuna.logging.WARNING)
PIXELS = [64 * 64, 96 * 96]


def _space(tmp_path: Path, model: Path, processor: dict | None) -> Path:
    data = {"study": "serve", "model": str(model), "tasks": ["dart_shapes"], "subset": {"size": 2, "seed": 0},
            "methods": ["dart", "random", "keep_all"], "layer": [1, 2], "keep_ratio": [0.25, 0.5],
            "attn_implementation": "sdpa", "dtype": "float32", "device": "cpu", "batch_size": 2,
            "sampler": {"name": "random", "seed": 0}, "trials": 3,
            "latency": {"new_tokens": 2, "repeats": 1, "warmup": 0}}
    if processor is not None:
        data["processor"] = processor
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_tune_portable_vllm_measures_only_what_vllm_runs(saved_dirs, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    space = _space(tmp_path, saved_dirs["qwen2_vl"], {"max_pixels": PIXELS})
    result = _run("tune", "--space", str(space), "--storage", storage, "--portable", "vllm", "--no-confirm")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="serve", storage=storage)
    assert study.user_attrs[TARGET_ATTR] == "vllm"
    pruned = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not is_baseline(t)]
    assert pruned, "no trial completed"
    for trial in pruned:  # a pruning method here would be a point vLLM cannot serve
        config = config_of(trial)
        assert config.method == "keep_all" and config.processor["max_pixels"] in PIXELS, config
    out = tmp_path / "p.yaml"
    exported = _run("export", "--storage", storage, "--study", "serve", "--trial", str(pruned[0].number),
                    "--target", "vllm", "-o", str(out))
    assert exported.exit_code == 0, exported.output
    argv = shlex.split((tmp_path / "p.vllm.sh").read_text().splitlines()[-1])
    assert json.loads(argv[argv.index("--mm-processor-kwargs") + 1]) == config_of(pruned[0]).processor
    again = _run("tune", "--space", str(space), "--storage", storage, "--no-confirm")  # the same study, unrestricted
    assert again.exit_code == 2 and "Resume it with the space it was tuned with" in " ".join(again.output.split())


def test_nothing_portable_fails_before_loading(saved_dirs, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    space = _space(tmp_path, saved_dirs["llava"], {"image_size": [96]})
    result = _run("tune", "--space", str(space), "--storage", storage, "--portable", "vllm")
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "--portable vllm: nothing to search" in line and "its processor section has only image_size" in line
    assert "serve" not in optuna.get_all_study_names(storage)  # refused before the study existed


def test_a_setting_the_family_has_not_fails_before_any_trial(saved_dirs, tmp_path: Path) -> None:
    """max_pixels ports for Qwen families, but the loaded model is LLaVA: refused once it is loaded."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    space = _space(tmp_path, saved_dirs["llava"], {"max_pixels": PIXELS})
    result = _run("tune", "--space", str(space), "--storage", storage, "--portable", "sglang")
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "processor.max_pixels" in line and "family llava" in line and "Traceback" not in line
    names = optuna.get_all_study_names(storage)
    assert not names or not optuna.load_study(study_name="serve", storage=storage).get_trials()
