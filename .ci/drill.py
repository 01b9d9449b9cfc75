"""The "nothing wasted, nothing lost" drill of issue 19: real workers, real signals, malformed inputs; prints figures.

    .venv/bin/python .ci/drill.py                     # SQLite workers + malformed inputs (about 10 minutes on 2 cores)
    .venv/bin/python .ci/drill.py --postgres URL --pg-stop CMD --pg-start CMD   # also a PostgreSQL restart

1. Workers: `--workers` `dart-tuner tune` processes share one SQLite study of the embedded model. While they
   run, `--kills` times a random worker with a running trial gets SIGKILL, once one gets SIGINT, and each is
   started again. Reported: trial numbers (none lost or repeated), complete trials, distinct configurations
   per complete pruned trial, failure reasons, re-queued trials, complete baselines.
2. PostgreSQL (optional): two workers, the server stopped for 6 s mid-trial and started again.
3. Malformed inputs: the test suite's malformed spaces and presets, and unusable storages, each given to the
   CLI; counted as "one clear line" when it exits 2 with an `error:` line and no traceback.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
DART_TUNER = str(Path(sys.executable).parent / "dart-tuner")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
optuna.logging.set_verbosity(optuna.logging.ERROR)


def drill_space(folder: Path, study: str) -> Path:
    """demo.yaml with a 12-question subset and 3 timed rounds: many short trials."""
    data = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    data.update(study=study, subset={"size": 12, "seed": 0}, batch_size=4,
                latency={"new_tokens": 2, "repeats": 3, "warmup": 1})
    path = folder / f"{study}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Worker:
    """A `dart-tuner tune` process whose output is collected by a thread (so the drill knows when it has loaded)."""

    def __init__(self, space: Path, storage: str, trials: int) -> None:
        self.process = subprocess.Popen(
            [DART_TUNER, "tune", "--space", str(space), "--storage", storage, "--trials", str(trials),
             "--heartbeat-interval", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def loaded(self) -> bool:
        """Past loading: it printed the study line and now runs trials."""
        return any(line.startswith("study '") for line in self.lines)

    def wait(self, timeout: float) -> str:
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return "".join(self.lines)


def running_trials(storage: str, study: str) -> list[int]:
    try:
        return [t.number for t in optuna.load_study(study_name=study, storage=storage)
                .get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    except KeyError:
        return []


def study_figures(storage: str, study: str) -> dict[str, object]:
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    numbers = [t.number for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned_configs = [tuple(sorted(t.params.items())) for t in complete if t.user_attrs.get("role") != "baseline"]
    reasons = Counter(str(t.user_attrs.get("failure", "no reason stored")).split(";")[0].split(" (")[0]
                      for t in trials if t.state == TrialState.FAIL)
    return {"trials": len(trials), "numbers 0..n-1, each once": numbers == list(range(len(trials))),
            "complete": len(complete), "complete baselines": sum(t.user_attrs.get("role") == "baseline"
                                                                 for t in complete),
            "complete pruned": len(pruned_configs), "distinct configurations among them": len(set(pruned_configs)),
            "skipped as already measured": sum("duplicate_of" in t.user_attrs for t in trials),
            "failed, by reason": dict(reasons),
            "re-queued after Ctrl-C": sum("requeued_from" in t.user_attrs for t in trials),
            "left running": sum(t.state == TrialState.RUNNING for t in trials),
            "left waiting": sum(t.state == TrialState.WAITING for t in trials)}


def workers_drill(folder: Path, n_workers: int, kills: int, trials: int, seed: int) -> None:
    storage, study = f"sqlite:///{folder / 'drill.db'}", "drill"
    space = drill_space(folder, study)
    rng = random.Random(seed)
    workers = [Worker(space, storage, trials) for _ in range(n_workers)]
    events = ["SIGKILL"] * kills + ["SIGINT"]
    codes: Counter = Counter()
    started = time.monotonic()
    while events and time.monotonic() - started < 900:
        time.sleep(rng.uniform(2, 6))
        live = [w for w in workers if w.process.poll() is None and w.loaded]
        if not live or len(running_trials(storage, study)) < len(live):
            continue  # signal only while every loaded worker is in a trial, so the signal lands mid-trial
        victim = rng.choice(live)
        event = events.pop(0)
        victim.process.send_signal(signal.SIGKILL if event == "SIGKILL" else signal.SIGINT)
        output = victim.wait(timeout=120)
        codes[f"{event} -> exit {victim.process.returncode}"] += 1
        if event == "SIGINT":
            print(f"  SIGINT: {' '.join(output.strip().splitlines()[-2:])}")
        workers[workers.index(victim)] = Worker(space, storage, trials)  # the operator starts it again
    for worker in workers:
        output = worker.wait(timeout=1800)
        codes[f"finished -> exit {worker.process.returncode}"] += 1
        if worker.process.returncode != 0:
            print(f"  a worker failed: {output.strip()[-1500:]}")
    print(f"\n## {n_workers} SQLite workers, {kills} SIGKILLs and 1 SIGINT mid-trial, target {trials} complete "
          f"trials ({time.monotonic() - started:.0f} s)")
    print(f"  exit codes: {dict(codes)}")
    for key, value in study_figures(storage, study).items():
        print(f"  {key}: {value}")


def postgres_drill(folder: Path, url: str, stop: str, start: str, trials: int) -> None:
    study = f"drill-pg-{os.getpid()}"
    space = drill_space(folder, study)
    workers = [Worker(space, url, trials) for _ in range(2)]
    deadline = time.monotonic() + 300
    while not [n for n in running_trials(url, study) if n >= 1] and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(shlex.split(stop), check=True, capture_output=True)
    time.sleep(6)
    subprocess.run(shlex.split(start), check=True, capture_output=True)
    outputs = [w.wait(timeout=1800) for w in workers]
    print(f"\n## 2 PostgreSQL workers, server stopped for 6 s mid-trial, target {trials} complete trials")
    print(f"  exit codes: {[w.process.returncode for w in workers]}; workers that waited it out: "
          f"{sum('retrying for up to' in out for out in outputs)}")
    for worker, output in zip(workers, outputs):
        if worker.process.returncode != 0:
            print(f"  a worker failed: {output.strip()[-1500:]}")
    for key, value in study_figures(url, study).items():
        print(f"  {key}: {value}")


def one_clear_line(result) -> bool:  # noqa: ANN001
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    return (result.exit_code == 2 and "Traceback" not in result.output and len(lines) <= 4
            and bool(lines) and lines[0].startswith("error:"))


def malformed_drill(folder: Path) -> None:
    from test_presets import MALFORMED
    from test_space import BAD, MINIMAL
    from test_storage import BAD_WRITER_URLS
    from typer.testing import CliRunner

    from tuner.cli import app

    runner = CliRunner()
    tried: Counter = Counter()
    clear: Counter = Counter()
    missed: list[str] = []

    def check(kind: str, args: list[str]) -> None:
        result = runner.invoke(app, args)
        tried[kind] += 1
        if one_clear_line(result):
            clear[kind] += 1
        else:
            missed.append(f"{kind} {args}: exit {result.exit_code}: {result.output.strip()[:300]}")

    for number, (change, _) in enumerate(BAD):
        data = {k: v for k, v in {**MINIMAL, **change}.items() if v is not None}
        path = folder / f"space{number}.yaml"
        path.write_text(yaml.safe_dump(data))
        check("space", ["tune", "--space", str(path), "--storage", f"sqlite:///{folder / 's.db'}"])
    (folder / "binary.yaml").write_bytes(bytes(range(256)))
    (folder / "broken.yaml").write_text("layer: [1, 2\n")
    for name in ("binary.yaml", "broken.yaml", "missing.yaml"):
        check("space", ["tune", "--space", str(folder / name), "--storage", f"sqlite:///{folder / 's.db'}"])
    for number, (content, _) in enumerate(MALFORMED):
        path = folder / f"preset{number}.yaml"
        path.write_text(content)
        check("preset", ["eval", "--preset", str(path), "--model", "m", "--task", "dart_shapes"])
    for name in ("binary.yaml", "missing.yaml"):
        check("preset", ["eval", "--preset", str(folder / name), "--model", "m", "--task", "dart_shapes"])
    good_space = drill_space(folder, "storage")
    for make_url, _ in BAD_WRITER_URLS:
        check("storage", ["tune", "--space", str(good_space), "--storage", make_url(folder), "--trials", "1"])
    for command in (["studies"], ["export", "--study", "x", "--trial", "0"], ["dashboard"]):
        check("storage", [*command, "--storage", f"sqlite:///{folder / 'mistyped.db'}"])
    print("\n## Malformed inputs given to the CLI")
    for kind in tried:
        print(f"  {kind}: {tried[kind]} tried, {clear[kind]} got one clear line (exit 2, no traceback)")
    print(f"  mistyped SQLite path created by a reader: {(folder / 'mistyped.db').exists()}")
    for line in missed:
        print(f"  NOT CLEAR: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres", help="SQLAlchemy URL of a PostgreSQL database the drill may write to")
    parser.add_argument("--pg-stop", help="command that stops that server")
    parser.add_argument("--pg-start", help="command that starts it again")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dart_tuner_drill_") as tmp:
        folder = Path(tmp)
        malformed_drill(folder)
        workers_drill(folder, args.workers, args.kills, args.trials, args.seed)
        if args.postgres:
            postgres_drill(folder, args.postgres, args.pg_stop, args.pg_start, trials=6)


if __name__ == "__main__":
    main()
