"""Sweep stage: a run config + a sweep file -> many real runs, a results table and the best config.

`peft-pipeline sweep CONFIG SWEEP.yaml` searches (Optuna: grid, random or TPE) over any config key.
Each trial is a full `train()` into SWEEP_DIR/trial-NNN, scored on a validation metric (the final
evaluation's `eval_loss` by default); poor trials are stopped at an evaluation (pruning). The
study lives in SWEEP_DIR/study.db (sqlite), so re-running the same command continues it: finished
trials are kept and count toward `trials`, a trial left running by a killed process is retried
(from its own run dir's last checkpoint when it has one). `--parallel N` runs N worker processes
on one study, one GPU each.

SWEEP_DIR holds, besides the trial run dirs: results.md (table, best marked), results.json,
best.yaml (the best trial's resolved config, ready for `peft-pipeline train`), worker-N.log.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from peft_pipeline.config import (ConfigError, _Section, _where, apply_overrides, config_from_dict, load_yaml,
                                  set_dotted)
from peft_pipeline.console import say as _say
from peft_pipeline.errors import UserError

# metrics.json values a trial can be scored on besides the evaluation's eval_* metrics
# (eval.accuracy and eval.macro_f1: the scores `task: classification` runs write after training).
# retention.kept/same: the forgetting check after training (evaluate/retention.py); test.*: generation metrics on
# data.test, scored after the trial (evaluate/run.py) only when the metric or a constraint names one.
RUN_METRICS = ("train_loss", "final_logged_loss", "runtime_s", "eval.accuracy", "eval.macro_f1",
               "retention.kept", "retention.same", "test.exact_match", "test.json_valid")
# What SFTTrainer reports at each evaluation (mean_token_accuracy: share of trained tokens predicted right),
# and the retention score at each evaluation with data.retention_eval.
EVAL_METRICS = ("eval_loss", "eval_mean_token_accuracy", "eval_entropy", "eval_runtime",
                "eval_retention", "eval_retention_same")
HIGHER_IS_BETTER = ("accuracy", "f1", "retention", "exact_match", "json_valid")
MAX_RETRIES = 3  # a trial killed more often than this is left failed
GRID_CHECK_LIMIT = 256  # grids up to this size have every point validated up front


class ParamSpec(_Section):
    """Where one config key is searched: a list of values, or a range (ints when low/high/step are ints)."""

    values: list[Any] | None = None
    """Candidate values (any YAML value: numbers, strings, lists such as [q_proj, v_proj])."""
    low: int | float | None = None
    """Range start (inclusive)."""
    high: int | float | None = None
    """Range end (inclusive)."""
    log: bool = False
    """Sample on a log scale (learning rates); needs low > 0."""
    step: int | float | None = None
    """Spacing of a discrete range; grid search needs it for a range."""

    @property
    def is_int(self) -> bool:
        """A range of integers: low, high (and step) written as integers."""
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step)
                   if v is not None)

    def grid_values(self) -> list[Any]:
        """The values grid search visits."""
        if self.values is not None:
            return list(self.values)
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        points = [self.low + i * self.step for i in range(n)]
        return [int(p) for p in points] if self.is_int else [round(p, 12) for p in points]

    def extremes(self) -> list[Any]:
        """Values that stand for the whole spec when validating trial configs."""
        return self.grid_values() if self.values is not None else [self.low, self.high]


class PruningSection(_Section):
    """Stopping poor trials at an evaluation (needs training.eval_strategy: steps)."""

    enabled: bool = False
    pruner: Literal["median", "threshold"] = "median"
    """median: stop a trial whose metric at a step is worse than the median of finished trials at that step;
    threshold: stop it when the metric is worse than `threshold`."""
    startup_trials: int = Field(2, ge=0)
    """median: finished trials needed before any trial is pruned."""
    warmup_steps: int = Field(0, ge=0)
    """Training steps a trial runs before it can be pruned."""
    threshold: float | None = None
    """threshold: the metric value beyond which a trial is stopped (above it when minimizing)."""


class Bound(_Section):
    """A constraint on one metric: a trial outside [min, max] is infeasible and never the best."""

    min: float | None = None
    """Lowest acceptable value (inclusive)."""
    max: float | None = None
    """Highest acceptable value (inclusive)."""

    def violation(self, value: float | None) -> float:
        """How far outside the bounds (0 = satisfied; a missing value is infinitely far)."""
        if value is None or not math.isfinite(value):
            return math.inf
        return max((self.min - value) if self.min is not None else 0.0, (value - self.max) if self.max is not None else 0.0, 0.0)


class SweepConfig(_Section):
    """A sweep file. YAML keys equal these field names."""

    method: Literal["grid", "random", "tpe"] = "tpe"
    """grid: every combination of values; random: independent samples; tpe: Optuna's TPE (model-based)."""
    metric: str = "eval_loss"
    """What scores a trial: the final evaluation's eval_loss, eval_mean_token_accuracy, eval_entropy or eval_runtime,
    or metrics.json's train_loss, final_logged_loss, runtime_s, eval.accuracy or eval.macro_f1 (classification)."""
    direction: Literal["minimize", "maximize"] | None = None
    """None: maximize accuracies, F1, retention and exact match; minimize everything else."""
    constraints: dict[str, Bound] = {}
    """Metrics a trial must keep within bounds to count: {"retention.kept": {min: 42}} maximizes `metric` among
    trials that keep at least 42 retention prompts (TPE also learns to avoid the infeasible region)."""
    trials: int | None = Field(None, gt=0)
    """Trials to finish (complete, pruned or failed), across re-runs and workers; grid: default the grid size."""
    seed: int = 0
    """Sampler seed (grid order, random/TPE draws)."""
    tpe_startup_trials: int | None = Field(None, ge=1)
    """tpe: random trials before TPE models the results; None: min(10, max(2, trials // 4))."""
    study_name: str | None = None
    """Name of the study in study.db; None: the name of output_dir."""
    output_dir: str = "runs/sweeps/sweep"
    """SWEEP_DIR: study.db, trial-NNN/ run dirs, results.md/json, best.yaml."""
    fixed: dict[str, Any] = {}
    """Config overrides for every trial ({"training.max_steps": 30}); applied before CLI overrides."""
    pruning: PruningSection = PruningSection()
    params: dict[str, ParamSpec]
    """What to search: {"training.learning_rate": {low: 1.0e-4, high: 1.0e-2, log: true}, "lora.r": {values: [8, 16]}}."""

    @property
    def goal(self) -> str:
        """The direction, with its default resolved."""
        return self.direction or ("maximize" if any(w in self.metric for w in HIGHER_IS_BETTER) else "minimize")

    @property
    def name(self) -> str:
        """The study name."""
        return self.study_name or Path(self.output_dir).name


# --------------------------------------------------------------------------- the sweep file


def load_sweep(path: str | Path) -> tuple[SweepConfig, dict[tuple, int]]:
    """Read and check a sweep file on its own (no run config yet); every problem at once."""
    data, lines = load_yaml(path)
    try:
        spec = SweepConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{_where(lines, str(path), loc)}: unknown key{_sweep_did_you_mean(loc)}")
            else:
                problems.append(f"{_where(lines, str(path), loc)}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(str(path), list(dict.fromkeys(problems))) from None
    problems = spec_problems(spec, lines, str(path))
    if problems:
        raise ConfigError(str(path), problems)
    return spec, lines


def _sweep_did_you_mean(loc: tuple) -> str:
    import difflib

    model = {1: SweepConfig, 2: PruningSection if loc[:1] == ("pruning",) else None, 3: ParamSpec}.get(len(loc))
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (allowed: {', '.join(model.model_fields)})"


def spec_problems(spec: SweepConfig, lines: dict[tuple, int] = {}, source: str = "<sweep>") -> list[str]:
    """Ranges, methods and metrics that cannot work together."""
    problems: list[str] = []

    def add(loc: tuple, msg: str) -> None:
        problems.append(f"{_where(lines, source, loc)}: {msg}")

    if not spec.params:
        add(("params",), "nothing to search; add e.g. training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}")
    for key, p in spec.params.items():
        loc = ("params", key)
        if key == "output_dir" or key.startswith("output_dir."):
            add(loc, "each trial's output_dir is SWEEP_DIR/trial-NNN; set the sweep's output_dir instead")
        if p.values is not None:
            if p.low is not None or p.high is not None or p.step is not None or p.log:
                add(loc, "give either values: [...] or a range (low, high, step, log), not both")
            elif not p.values:
                add(loc + ("values",), "empty list; give at least one value")
            continue
        if p.low is None or p.high is None:
            add(loc, "give values: [...] or a range with both low and high")
            continue
        if p.low > p.high:
            add(loc, f"low ({p.low}) is above high ({p.high})")
        if p.log and p.low <= 0:
            add(loc + ("low",), "a log range needs low > 0")
        if p.step is not None and p.step <= 0:
            add(loc + ("step",), "step must be > 0")
        if p.log and p.step is not None and not (p.is_int and p.step == 1):
            add(loc + ("log",), "a log range cannot have a step (Optuna samples it continuously)")
        if spec.method == "grid" and p.step is None:
            add(loc, "grid search needs values: [...] or a step for a range")
    if spec.method != "grid" and spec.trials is None:
        add(("trials",), f"{spec.method} search needs the number of trials, e.g. trials: 8")
    if spec.metric not in EVAL_METRICS + RUN_METRICS:
        import difflib

        close = difflib.get_close_matches(spec.metric, EVAL_METRICS + RUN_METRICS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"one of {', '.join(EVAL_METRICS + RUN_METRICS)}"
        add(("metric",), f"{spec.metric!r} is not a metric a run produces ({hint})")
    problems += [f"{_where(lines, source, ('constraints', key))}: {msg}" for key, msg in _constraint_problems(spec)]
    pr = spec.pruning
    if pr.enabled and not spec.metric.startswith("eval_"):
        add(("pruning", "enabled"), f"pruning compares evaluations during training; {spec.metric} is known only "
                                    "at the end (use an eval_* metric or disable pruning)")
    if pr.enabled and pr.pruner == "threshold" and pr.threshold is None:
        add(("pruning", "threshold"), "the threshold pruner needs a threshold value")
    if spec.method == "grid" and spec.params and not problems and len(grid_points(spec)) == 0:
        add(("params",), "the grid is empty")
    return problems


def _constraint_problems(spec: SweepConfig) -> list[tuple[str, str]]:
    """(key, problem) for constraints on unknown metrics or without a bound."""
    out = []
    for key, bound in spec.constraints.items():
        if key not in EVAL_METRICS + RUN_METRICS:
            out.append((key, f"{key!r} is not a metric a run produces (one of {', '.join(EVAL_METRICS + RUN_METRICS)})"))
        if bound.min is None and bound.max is None:
            out.append((key, "give min and/or max"))
    return out


def grid_points(spec: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the grid."""
    import itertools

    keys = list(spec.params)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec.params[k].grid_values() for k in keys))]


# --------------------------------------------------------------------------- trial configs


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a config mapping (the typed counterpart of a `key=value` override)."""
    set_dotted(data, key, copy.deepcopy(value))


def base_data(config: str | Path, spec: SweepConfig, overrides: list[str]) -> dict[str, Any]:
    """The run config as a mapping, with the sweep's fixed values and then the CLI overrides applied."""
    data, _ = load_yaml(config)
    for key, value in spec.fixed.items():
        set_key(data, key, value)
    return apply_overrides(data, list(overrides))


def trial_config(base: dict[str, Any], params: dict[str, Any], run_dir: Path, source: str = "<trial>"):
    """The validated RunConfig of one trial."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_key(data, key, value)
    data["output_dir"] = str(run_dir)
    return config_from_dict(data, source)


def check_trials(config: str | Path, spec: SweepConfig, overrides: list[str], lines: dict[tuple, int],
                 sweep_file: str) -> None:
    """Validate the configs the trials will run, before any of them starts; one ConfigError for all problems.

    Each value (a range: its two ends) is checked alone, so a problem names the param that caused
    it; then every grid point (up to GRID_CHECK_LIMIT) for combinations that cannot work.
    """
    from peft_pipeline.train.sft import validate_against_model

    base = base_data(config, spec, overrides)
    problems: list[str] = []
    where_fixed = {k: _where(lines, sweep_file, ("fixed", k)) for k in spec.fixed}
    try:
        cfg = trial_config(base, {}, Path(spec.output_dir) / "check", str(config))
    except ConfigError as e:
        fixed = f" (with {', '.join(where_fixed.values())} from {sweep_file})" if spec.fixed else ""
        raise ConfigError(str(config) + fixed, e.problems) from None
    if not cfg.data.eval and cfg.data.val_fraction == 0:
        problems.append("data.eval: a sweep scores every trial on eval data; set data.eval or data.val_fraction "
                        "in the config")
    if spec.pruning.enabled and not cfg.eval_requested:
        problems.append(f"{_where(lines, sweep_file, ('pruning', 'enabled'))}: pruning needs evaluations during "
                        "training; set training.eval_strategy: steps and training.eval_steps (config or fixed:)")
    checked_models: set[str] = set()

    def check(params: dict[str, Any], label: str) -> None:
        try:
            trial_cfg = trial_config(base, params, Path(spec.output_dir) / "check")
        except ConfigError as e:
            problems.extend(f"{label}: {p}" for p in e.problems)
            return
        key = trial_cfg.model.model_dump_json() + trial_cfg.lora.model_dump_json()
        if any(k.startswith(("lora.", "model.")) for k in params) and key not in checked_models:
            checked_models.add(key)  # lora names against the architecture, on the meta device
            try:
                validate_against_model(trial_cfg, _model_path(trial_cfg))
            except ConfigError as e:
                problems.extend(f"{label}: {p}" for p in e.problems)

    for key, p in spec.params.items():
        for value in p.extremes():
            check({key: value}, f"{_where(lines, sweep_file, ('params', key))} = {value!r}")
    if spec.method == "grid" and len(spec.params) > 1 and not problems:
        points = grid_points(spec)
        for point in points[:GRID_CHECK_LIMIT]:
            check(point, "grid point " + ", ".join(f"{k}={v!r}" for k, v in point.items()))
    if problems:
        raise ConfigError(f"{sweep_file} on {config}", list(dict.fromkeys(problems)))


def _model_path(cfg) -> str:
    from peft_pipeline.paths import resolve_model_path

    return resolve_model_path(cfg.model)


# --------------------------------------------------------------------------- the study


def open_study(spec: SweepConfig, sweep_dir: Path, fingerprint: str, worker: int = 0):
    """Create or load the persistent study in SWEEP_DIR/study.db; refuse one made from a different sweep."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours to print
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_experimental():
        # Heartbeats let a live worker fail and retry the trial of a worker that died (after grace_period s).
        storage = RDBStorage(f"sqlite:///{(sweep_dir / 'study.db').resolve()}", heartbeat_interval=30,
                             grace_period=120, engine_kwargs={"connect_args": {"timeout": 60}},
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
    offset = 1000 * worker + _n_trials(storage, spec.name)
    study = optuna.create_study(storage=storage, study_name=spec.name, direction=spec.goal, load_if_exists=True,
                                sampler=make_sampler(spec, offset), pruner=make_pruner(spec))
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        raise UserError(f"{sweep_dir}: holds study {spec.name!r} of a different sweep (config, overrides or sweep file "
                        "changed); set another output_dir or study_name, or delete the directory to start over",
                        exit_code=2)
    return study


def _n_trials(storage, name: str) -> int:
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(name))
    except KeyError:
        return 0


@contextlib.contextmanager
def _quiet_experimental():
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def make_sampler(spec: SweepConfig, offset: int = 0):
    """The Optuna sampler. `offset` (trials already run, worker index) keeps resumed or parallel draws new."""
    import optuna

    if spec.method == "grid":
        # Every worker shares one seed: the same grid order, so the trial-number -> grid-point map agrees.
        return optuna.samplers.GridSampler({k: _encoded(p.grid_values()) for k, p in spec.params.items()},
                                           seed=spec.seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed + offset)
    startup = spec.tpe_startup_trials or min(10, max(2, (spec.trials or 8) // 4))
    constraints = {"constraints_func": _violations} if spec.constraints else {}
    return optuna.samplers.TPESampler(seed=spec.seed + offset, n_startup_trials=startup, **constraints)


def _violations(trial) -> list[float]:
    """Optuna's constraint values for a finished trial (<= 0 feasible), stored by `objective`."""
    return json.loads(trial.user_attrs.get("violations", "[]")) or [0.0]


def make_pruner(spec: SweepConfig):
    """The Optuna pruner (NopPruner when pruning is off)."""
    import optuna

    pr = spec.pruning
    if not pr.enabled:
        return optuna.pruners.NopPruner()
    if pr.pruner == "threshold":
        bound = {"upper" if spec.goal == "minimize" else "lower": pr.threshold}
        return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=pr.warmup_steps)
    return optuna.pruners.MedianPruner(n_startup_trials=pr.startup_trials, n_warmup_steps=pr.warmup_steps)


def _encoded(values: list[Any]) -> list[Any]:
    # Optuna stores only scalars; lists and mappings (target_modules: [q_proj, v_proj]) travel as JSON text.
    return [v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v) for v in values]


def _decoded(spec: ParamSpec, value: Any) -> Any:
    if isinstance(value, str) and value not in (spec.values or []):
        return json.loads(value)
    return value


def suggest(trial, spec: SweepConfig) -> dict[str, Any]:
    """This trial's config values, drawn through the Optuna trial (so the sampler sees them)."""
    out = {}
    for key, p in spec.params.items():
        if spec.method == "grid" or p.values is not None:
            out[key] = _decoded(p, trial.suggest_categorical(key, _encoded(p.grid_values())))
        elif p.is_int:
            out[key] = trial.suggest_int(key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            out[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return out


def recover_interrupted(study) -> list[int]:
    """Fail trials a killed or interrupted sweep left unfinished, and queue each again; return their numbers.

    Only the coordinator calls it, holding SWEEP_DIR's lock: then no live process runs any trial.
    A trial that raised an error is not retried (it counts as failed, user_attr "error").
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    queued = []
    for t in trials:
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and "error" not in t.user_attrs and t.number not in retried):
            continue
        with _quiet_experimental():
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, study._storage.get_trial(t._trial_id))
        queued.append(t.number)
    return queued


def counted(study, exclude: int | None = None) -> int:
    """Trials that count toward `trials`: finished ones (not killed) and ones other workers are running."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.number == exclude:
            continue
        n += t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or (
            t.state == TrialState.FAIL and "error" in t.user_attrs)
    return n


def planned(spec: SweepConfig) -> int:
    """The number of trials the sweep will finish."""
    if spec.method == "grid":
        return min(spec.trials or 10**9, len(grid_points(spec)))
    return int(spec.trials)


def work(study, spec: SweepConfig, base: dict[str, Any], sweep_dir: Path, progress: bool, log=print) -> None:
    """Run trials until `trials` are counted or the grid is done (a worker's loop)."""
    from optuna.trial import TrialState

    goal = planned(spec)
    while True:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if counted(study) >= goal and not waiting:
            return
        if spec.method == "grid" and study.sampler.is_exhausted(study) and not waiting:
            return
        study.optimize(lambda trial: objective(trial, spec, base, sweep_dir, progress), n_trials=1,
                       catch=(Exception,), callbacks=[lambda s, t: log(progress_line(s, spec, t, goal))],
                       gc_after_trial=True)
        _free_accelerator_memory()


# Over 50 lines by choice: one trial from config to score in one place (run, failure, pruning, constraints, score),
# the order Optuna needs them in.
def objective(trial, spec: SweepConfig, base: dict[str, Any], sweep_dir: Path, progress: bool) -> float:
    """One trial: a real training run in its own run dir, scored on spec.metric."""
    import optuna

    from peft_pipeline.rundir import status as run_status
    from peft_pipeline.tasks import train

    params = suggest(trial, spec)
    # A retried trial continues in its original run dir, from that run's last checkpoint.
    number = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial", trial.number)
    run = sweep_dir / f"trial-{number:03d}"
    trial.set_user_attr("run_dir", str(run))
    trial.set_user_attr("values", json.dumps(params, default=str))
    from peft_pipeline.train.callbacks import TrialReporter

    reporter = TrialReporter(trial, spec.metric, spec.pruning.enabled)
    try:
        cfg = trial_config(base, params, run, f"trial {trial.number}")
        status = run_status(run)
        if status != "complete":
            resume = status == "running" and any((run / "checkpoints").glob("checkpoint-*/trainer_state.json"))
            train(cfg, overwrite=not resume, resume=True if resume else None, progress=progress, callbacks=[reporter])
        metrics = json.loads((run / "metrics.json").read_text())
        if reporter.pruned_at is None and any(k.startswith("test.") for k in [spec.metric, *spec.constraints]):
            metrics["test"] = _test_scores(run, progress)
    except Exception as e:
        if not isinstance(e, UserError):
            import traceback

            traceback.print_exc()  # a bug, not a user error: the stack trace goes to the log
        trial.set_user_attr("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    trial.set_user_attr("steps", metrics.get("global_steps"))
    if reporter.pruned_at is not None:
        from peft_pipeline.paths import write_json_atomic

        trial.set_user_attr("pruned_at", reporter.pruned_at)
        write_json_atomic(run / "metrics.json", {**metrics, "sweep": {"pruned": True, "pruned_at_step": reporter.pruned_at,
                                                                      "trial": trial.number}})
        raise optuna.TrialPruned(f"{spec.metric} {reporter.last_value:.4g} at step {reporter.pruned_at}")
    # metrics.json holds the score after training; the other eval_* metrics come from the last evaluation
    # (the final one), which a run finished by a killed sweep left in log.jsonl only.
    final = reporter.final or _last_evaluation(run)
    lookup = lambda key: _lookup(metrics, key) if _lookup(metrics, key) is not None else final.get(key)  # noqa: E731
    if spec.constraints:
        got = {key: lookup(key) for key in spec.constraints}
        trial.set_user_attr("constraints", json.dumps(got))
        trial.set_user_attr("violations", json.dumps([min(b.violation(got[k]), 1e9) for k, b in spec.constraints.items()]))
    value = lookup(spec.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        have = sorted(k for k, v in {**metrics, **final}.items() if isinstance(v, (int, float)))
        trial.set_user_attr("error", f"metric {spec.metric} is {value!r}; this run has {', '.join(have)}")
        raise UserError(f"trial {trial.number}: {trial.user_attrs['error']}")
    return float(value)


def _test_scores(run: Path, progress: bool) -> dict[str, Any]:
    """The trained model's generation metrics on the run's data.test (evaluate/run.py; eval.json in the run)."""
    from peft_pipeline.evaluate.run import evaluate

    if (run / "eval.json").is_file():  # a re-run sweep: scored already
        report = json.loads((run / "eval.json").read_text())
    else:
        with contextlib.redirect_stdout(sys.stderr):  # eval's table would break the sweep's progress lines
            report = evaluate(run, progress=progress)
    return (report.get("generation") or {}).get("metrics", {}).get("adapter", {})


def _lookup(metrics: dict[str, Any], key: str) -> Any:
    node: Any = metrics
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _last_evaluation(run: Path) -> dict[str, Any]:
    try:
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return {}
    evals = [r for r in records if "eval_loss" in r]
    return evals[-1] if evals else {}






def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- reporting


def progress_line(study, spec: SweepConfig, t, goal: int) -> str:
    """One line per finished trial: state, values, score, best so far, run dir."""
    from optuna.trial import TrialState

    values = ", ".join(f"{k}={_fmt(v)}" for k, v in json.loads(t.user_attrs.get("values", "{}")).items())
    if t.state == TrialState.COMPLETE:
        outcome = f"{spec.metric}={t.value:.4f}"
        if spec.constraints:
            got = json.loads(t.user_attrs.get("constraints", "{}"))
            outcome += " (" + ", ".join(f"{k}={_fmt(v)}" for k, v in got.items()) + ("" if feasible(t) else "; fails constraints") + ")"
    elif t.state == TrialState.PRUNED:
        outcome = f"pruned at step {t.user_attrs.get('pruned_at')}"
    else:
        outcome = f"failed: {t.user_attrs.get('error', 'interrupted')}"
    best = _best(study)
    best_txt = f"; best: trial {best.number} ({best.value:.4f})" if best else ""
    done = counted(study)
    return (f"[peft-pipeline] sweep {spec.name}: trial {t.number} ({done}/{goal}) {values} -> {outcome}{best_txt} "
            f"[{t.user_attrs.get('run_dir', '')}]")


def _best(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    if not done:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(done, key=lambda t: t.value)


def feasible(t) -> bool:
    """The trial met every constraint of the sweep (trivially when it has none)."""
    return all(v <= 0 for v in json.loads(t.user_attrs.get("violations", "[]")))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def write_results(study, spec: SweepConfig, sweep_dir: Path) -> str:
    """results.md, results.json and best.yaml in SWEEP_DIR; return the Markdown table."""
    from peft_pipeline.paths import write_json_atomic

    best = _best(study)
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        values = json.loads(t.user_attrs.get("values", "null")) or {k: t.params.get(k) for k in spec.params}
        state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(t.state.name, t.state.name.lower())
        if t.state.name == "FAIL" and "error" not in t.user_attrs:
            state = "interrupted"  # killed or Ctrl-C: queued again (see recover_interrupted)
        if "retry_history" in t.system_attrs:
            state += f" (retry of {t.system_attrs['failed_trial']})"
        if t.state.name == "COMPLETE" and not feasible(t):
            state += " (fails constraints)"
        score = t.value if t.value is not None else (list(t.intermediate_values.values()) or [None])[-1]
        rows.append({"trial": t.number, "state": state, "params": values, spec.metric: score,
                     "constraints": json.loads(t.user_attrs.get("constraints", "{}")),
                     "steps": t.user_attrs.get("pruned_at") or t.user_attrs.get("steps"),
                     "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error"),
                     "best": best is not None and t.number == best.number})
    keys = list(spec.params)
    limits = list(spec.constraints)
    head = ["trial", "state", *keys, spec.metric, *limits, "steps", "run dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        score = "" if r[spec.metric] is None else f"{r[spec.metric]:.4f}"
        cells = [f"**{r['trial']} (best)**" if r["best"] else str(r["trial"]), r["state"],
                 *(_fmt(r["params"].get(k)) for k in keys), score,
                 *(_fmt(r["constraints"].get(k, "")) for k in limits), str(r["steps"] or ""), r["run_dir"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    errors = [f"- trial {r['trial']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        table += "\n\nFailed trials:\n" + "\n".join(errors)
    summary = _summary(spec, best, sweep_dir)
    (sweep_dir / "results.md").write_text(
        f"# Sweep {spec.name}\n\n{spec.method} search over {', '.join(keys)}; {spec.metric} ({spec.goal}); "
        f"{len(rows)} trials in {sweep_dir / 'study.db'}\n\n{table}\n\n{summary}\n")
    write_json_atomic(sweep_dir / "results.json", {"study": spec.name, "method": spec.method, "metric": spec.metric,
                                                   "direction": spec.goal,
                                                   "constraints": {k: b.model_dump() for k, b in spec.constraints.items()}, "best": best.number if best else None,
                                                   "trials": rows})
    if best is not None:
        write_best_config(study, spec, best, sweep_dir)
    return table + "\n\n" + summary


def _summary(spec: SweepConfig, best, sweep_dir: Path) -> str:
    """The results' last line: the best trial (and the constraints it met)."""
    summary = (f"best: trial {best.number}, {spec.metric} = {best.value:.4f} ({spec.goal}); config: {sweep_dir / 'best.yaml'}"
               if best else "no trial met the constraints yet" if spec.constraints else "no trial completed yet")
    if spec.constraints:
        summary += "; constraints: " + ", ".join(f"{k} in [{_fmt(b.min) if b.min is not None else '-inf'}, "
                                                  f"{_fmt(b.max) if b.max is not None else 'inf'}]"
                                                  for k, b in spec.constraints.items())
    return summary


def write_best_config(study, spec: SweepConfig, best, sweep_dir: Path) -> Path:
    """best.yaml: the best trial's resolved config, with output_dir SWEEP_DIR/best, for `peft-pipeline train`."""
    import yaml

    run = Path(best.user_attrs["run_dir"])
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["output_dir"] = str(sweep_dir / "best")
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in json.loads(best.user_attrs["values"]).items())
    header = (f"# Best trial of sweep {spec.name}: trial {best.number}, {spec.metric} = {best.value:.6g} ({spec.goal})\n"
              f"# Values: {values}\n# Run dir: {run}\n# Train it again: peft-pipeline train {sweep_dir / 'best.yaml'}\n")
    target = sweep_dir / "best.yaml"
    target.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return target


# --------------------------------------------------------------------------- entry points


def sweep(config: str, sweep_file: str, overrides: list[str] = (), parallel: int = 1, worker: int | None = None,
          progress: bool = True) -> Path:
    """Run (or continue) a sweep and return SWEEP_DIR; `worker` is set in the processes --parallel starts."""
    spec, lines = load_sweep(sweep_file)
    if parallel < 1:
        raise UserError(f"--parallel {parallel}: give a number of worker processes >= 1", exit_code=2)
    sweep_dir = Path(spec.output_dir)
    fingerprint = _fingerprint(config, spec, overrides)
    if worker is not None:  # a worker of --parallel: the coordinator validated and holds the lock
        study = open_study(spec, sweep_dir, fingerprint, worker)
        work(study, spec, base_data(config, spec, overrides), sweep_dir, progress)
        return sweep_dir
    check_trials(config, spec, list(overrides), lines, sweep_file)
    with _lock(sweep_dir):
        study = open_study(spec, sweep_dir, fingerprint)
        again = recover_interrupted(study)
        _say(f"sweep {spec.name}: {spec.method} search, {planned(spec)} trials, {counted(study)} already done"
             + (f"; re-running interrupted trial(s) {', '.join(map(str, again))}" if again else "")
             + f"; study {sweep_dir / 'study.db'}")
        if parallel == 1:
            work(study, spec, base_data(config, spec, overrides), sweep_dir, progress)
        else:
            run_workers(study, spec, config, sweep_file, list(overrides), sweep_dir, parallel)
        table = write_results(study, spec, sweep_dir)
    print(table, flush=True)
    return sweep_dir


def run_workers(study, spec: SweepConfig, config: str, sweep_file: str, overrides: list[str], sweep_dir: Path,
                n: int) -> None:
    """Start n worker processes on the shared study, one GPU each; print a line per finished trial."""
    import subprocess

    devices = _visible_gpus()
    env_base = {**os.environ, "PEFT_PIPELINE_NO_PROGRESS": "1"}
    if not devices:
        threads = max(1, (os.cpu_count() or 1) // n)
        _say(f"warning: --parallel {n} on CPU: the workers share {os.cpu_count()} cores ({threads} thread(s) each); "
             "one worker is usually as fast")
        env_base.setdefault("OMP_NUM_THREADS", str(threads))
    elif len(devices) < n:
        _say(f"warning: --parallel {n} with {len(devices)} GPU(s): several workers share a GPU")
    procs = []
    for i in range(n):
        env = dict(env_base)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        log = open(sweep_dir / f"worker-{i}.log", "w")
        cmd = [sys.executable, "-m", "peft_pipeline", "sweep", config, sweep_file, *overrides, "--worker", str(i)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    _say(f"{n} workers started; their output: {sweep_dir}/worker-N.log")
    seen: set[int] = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    goal = planned(spec)
    try:
        while True:
            running = [p for p, _ in procs if p.poll() is None]
            for t in study.get_trials(deepcopy=False):
                if t.state.is_finished() and t.number not in seen:
                    seen.add(t.number)
                    print(progress_line(study, spec, t, goal), flush=True)
            if not running:
                break
            time.sleep(2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.terminate()
            p.wait()
            log.close()
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        raise UserError(f"worker(s) {', '.join(map(str, failed))} failed; see {sweep_dir}/worker-{failed[0]}.log "
                        "(re-run the same command to continue the sweep)")


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def _lock(sweep_dir: Path):
    """Hold SWEEP_DIR/.lock: one coordinator per sweep, so trials found running at start are dead ones."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise UserError(f"{sweep_dir}: another sweep is running on it (pid {f.read().strip() or '?'}); wait for it "
                            "or choose another output_dir", exit_code=2) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _fingerprint(config: str, spec: SweepConfig, overrides) -> str:
    # What makes trials comparable: the run config's contents, the overrides and the search itself.
    # Trial counts and pruning may change between re-runs (e.g. raise `trials` to continue a sweep).
    h = hashlib.sha256(Path(config).read_bytes())
    h.update(json.dumps(list(overrides)).encode())
    # constraints only when set: sweeps from before they existed keep their fingerprint
    include = {"method", "metric", "direction", "fixed", "params", "seed"} | ({"constraints"} if spec.constraints else set())
    h.update(spec.model_dump_json(include=include).encode())
    return h.hexdigest()[:16]


