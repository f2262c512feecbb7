"""Sweeps on a tiny model: sweep-file errors, grid runs and results, resume, retry of killed trials, pruning."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from peft_pipeline.tools.sweep import SweepConfig, _fingerprint, check_trials, load_sweep, make_sampler, open_study, suggest, sweep
from peft_pipeline.cli import main
from peft_pipeline.config import ConfigError, load_config

from conftest import REPO, write_jsonl
from peft_pipeline import tasks as train_mod

ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in
        ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano"]]


def write_config(tmp_path: Path, tiny_base: Path, **training) -> Path:
    """A tiny run config on disk (sweeps take a config file, as `train` does)."""
    data = {
        "model": {"name": str(tiny_base)},
        "lora": {"r": 4, "target_modules": "all-linear"},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", ROWS)),
                 "eval": str(write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])), "cache": False},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
                     "save_steps": 100, "max_length": 128, **training},
        "output_dir": str(tmp_path / "unused"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_sweep(tmp_path: Path, **fields) -> Path:
    spec = {"method": "grid", "output_dir": str(tmp_path / "sweep"),
            "params": {"training.learning_rate": {"values": [1e-5, 3e-2]}}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_trials(sweep_dir: Path, name: str = "sweep"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}").get_trials()


# --------------------------------------------------------------------------- the sweep file


def test_sweep_file_problems_are_reported_at_once_with_lines(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("method: bayes\n"
                    "metric: eval_los\n"
                    "params:\n"
                    "  training.learning_rate: {low: 1.0e-2, high: 1.0e-4, log: true}\n"
                    "  lora.r: {values: [4, 8], high: 3}\n"
                    "  training.warmup_ratio: {low: 0.0, high: 0.1, log: true, stepp: 0.1}\n"
                    "pruning: {enabeld: true}\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    text = str(e.value)
    assert "method (line 1): Input should be 'grid', 'random' or 'tpe'" in text
    assert "params.training.warmup_ratio.stepp (line 6): unknown key (did you mean step?)" in text
    assert "pruning.enabeld (line 7): unknown key (did you mean enabled?)" in text
    # the pydantic errors stop before the semantic ones; fix them and the rest appear, all together
    path.write_text(path.read_text().replace("bayes", "random").replace("stepp", "step").replace("enabeld", "enabled"))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    problems = e.value.problems
    assert "params.training.learning_rate (line 4): low (0.01) is above high (0.0001)" in problems
    assert "params.lora.r (line 5): give either values: [...] or a range (low, high, step, log), not both" in problems
    assert "params.training.warmup_ratio.low (line 6): a log range needs low > 0" in problems
    assert any(p.startswith("trials: random search needs the number of trials") for p in problems)
    assert any(p.startswith("metric (line 2): 'eval_los' is not a metric a run produces (did you mean eval_loss?)")
               for p in problems)
    # the CLI: one error block, exit code 2, nothing trained
    assert main(["sweep", str(tmp_path / "run.yaml"), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: 6 problems in the config")


def test_grid_needs_values_or_step_and_pruning_needs_an_eval_metric(tmp_path):
    path = write_sweep(tmp_path, metric="train_loss", pruning={"enabled": True},
                       params={"training.learning_rate": {"low": 1e-4, "high": 1e-2}})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert any("grid search needs values: [...] or a step for a range" in p for p in e.value.problems)
    assert any(p.startswith("pruning.enabled") and "train_loss is known only at the end" in p for p in e.value.problems)


def test_params_are_checked_against_the_run_config_before_any_trial(tmp_path, tiny_base, monkeypatch):
    config = write_config(tmp_path, tiny_base)
    path = write_sweep(tmp_path, params={"training.learning_rat": {"values": [1e-3]},
                                         "lora.rr": {"values": [4]},
                                         "lora.dropout": {"low": 0.0, "high": 1.5},
                                         "lora.target_modules": {"values": [["q_proj"], ["q_projj"]]}},
                       method="random", trials=2)
    monkeypatch.setattr("peft_pipeline.tasks.train", lambda *a, **k: pytest.fail("a trial started"))
    with pytest.raises(ConfigError) as e:
        sweep(str(config), str(path))
    text = str(e.value)
    assert "params.training.learning_rat (line" in text and "not a trl.SFTConfig field (did you mean learning_rate?)" in text
    assert "lora.rr: unknown key (did you mean r?)" in text
    assert "params.lora.dropout (line" in text and "= 1.5: lora.dropout: Input should be less than 1" in text
    assert "'q_projj' matches no module" in text and "did you mean q_proj?" in text
    assert "= 0.0: " not in text  # the valid end of the range is fine
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_needs_eval_data(tmp_path, tiny_base):
    config = write_config(tmp_path, tiny_base)
    data = yaml.safe_load(config.read_text())
    data["data"]["eval"] = []
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="a sweep scores every trial on eval data"):
        sweep(str(config), str(write_sweep(tmp_path)))


def test_random_and_tpe_sample_within_bounds():
    import optuna

    for method in ("random", "tpe"):
        spec = SweepConfig.model_validate({
            "method": method, "trials": 12, "params": {
                "training.learning_rate": {"low": 1e-5, "high": 1e-2, "log": True},
                "lora.r": {"low": 4, "high": 32, "step": 4},
                "lora.dropout": {"low": 0.0, "high": 0.2},
                "lora.target_modules": {"values": ["all-linear", ["q_proj", "v_proj"]]}}})
        study = optuna.create_study(sampler=make_sampler(spec), direction=spec.goal)
        seen = []
        for _ in range(12):
            trial = study.ask()
            v = suggest(trial, spec)
            study.tell(trial, -math.log10(v["training.learning_rate"]))  # TPE gets something to model
            seen.append(v)
        for v in seen:
            assert 1e-5 <= v["training.learning_rate"] <= 1e-2
            assert isinstance(v["lora.r"], int) and v["lora.r"] % 4 == 0 and 4 <= v["lora.r"] <= 32
            assert 0.0 <= v["lora.dropout"] <= 0.2
            assert v["lora.target_modules"] in ("all-linear", ["q_proj", "v_proj"])
        assert len({v["training.learning_rate"] for v in seen}) == 12  # continuous draws, not a grid
        assert {json.dumps(v["lora.target_modules"]) for v in seen} == {'"all-linear"', '["q_proj", "v_proj"]'}


# --------------------------------------------------------------------------- real trials


def test_grid_runs_each_point_once_writes_results_and_resumes(tmp_path, tiny_base, monkeypatch, capsys):
    config = write_config(tmp_path, tiny_base)
    path = write_sweep(tmp_path)
    assert main(["sweep", str(config), str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "sweep"
    trials = study_trials(sweep_dir)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.params["training.learning_rate"] for t in trials) == [1e-5, 3e-2]
    assert out.count("[peft-pipeline] sweep sweep: trial ") == 2  # one progress line per trial

    # each trial is a real run dir, scored on its final eval loss
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert run.parent == sweep_dir and run.name == f"trial-{t.number:03d}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["global_steps"] == 4
        assert t.value == pytest.approx(metrics["eval_loss"])
        assert yaml.safe_load((run / "config.yaml").read_text())["training"]["learning_rate"] == t.params["training.learning_rate"]
    # the tiny lr barely moves the random model; 3e-2 learns the repeat task
    best = min(trials, key=lambda t: t.value)
    assert best.params["training.learning_rate"] == 3e-2

    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["best"] == best.number and [r["best"] for r in results["trials"]].count(True) == 1
    table = (sweep_dir / "results.md").read_text()
    assert f"| **{best.number} (best)** | complete | 0.03 | {best.value:.4f} | 4 |" in table
    assert "| training.learning_rate | eval_loss | steps | run dir |" in table

    # best.yaml: a valid config for `train`, holding the best trial's value
    best_cfg = load_config(sweep_dir / "best.yaml")
    assert best_cfg.training["learning_rate"] == 3e-2 and best_cfg.output_dir == str(sweep_dir / "best")
    assert (sweep_dir / "best.yaml").read_text().startswith(f"# Best trial of sweep sweep: trial {best.number}")

    # re-running continues the study: nothing is trained again
    monkeypatch.setattr("peft_pipeline.tasks.train", lambda *a, **k: pytest.fail("a finished trial ran again"))
    assert sweep(str(config), str(path), progress=False) == sweep_dir
    assert len(study_trials(sweep_dir)) == 2
    assert "2 already done" in capsys.readouterr().out

    # a changed search is refused rather than mixed into the old study
    changed = write_sweep(tmp_path, params={"training.learning_rate": {"values": [1e-3, 3e-2]}})
    from peft_pipeline.errors import UserError

    with pytest.raises(UserError, match="holds study 'sweep' of a different sweep"):
        sweep(str(config), str(changed))


def test_killed_and_interrupted_trials_are_retried_in_their_own_run_dir(tmp_path, tiny_base, monkeypatch):
    import optuna

    from peft_pipeline.tasks import train

    config = write_config(tmp_path, tiny_base)
    path = write_sweep(tmp_path, params={"training.learning_rate": {"values": [1e-5, 3e-2, 1e-2]}})
    spec, _ = load_sweep(path)
    sweep_dir = tmp_path / "sweep"
    fingerprint = _fingerprint(str(config), spec, [])
    # A process killed with SIGKILL leaves its trial RUNNING: simulate one that had just started.
    study = open_study(spec, sweep_dir, fingerprint)
    killed = study.ask()
    killed_value = suggest(killed, spec)["training.learning_rate"]
    killed.set_user_attr("run_dir", str(sweep_dir / "trial-000"))

    # The next trial's process dies right after its run finished, before the study heard of it (Ctrl-C here):
    # the sweep stops, the trial is left failed without an error of its own.
    real_train = train
    calls = []

    def dies_after_second_run(cfg, **kwargs):
        calls.append(cfg.output_dir)
        run = real_train(cfg, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run

    monkeypatch.setattr(train_mod, "train", dies_after_second_run)
    with pytest.raises(KeyboardInterrupt):
        sweep(str(config), str(path), progress=False)
    trials = study_trials(sweep_dir)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL"]
    assert calls == [str(sweep_dir / "trial-000"), str(sweep_dir / "trial-002")]  # trial 1 retried 0 in trial-000
    assert "error" not in trials[2].user_attrs

    calls.clear()
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: calls.append(cfg.output_dir) or real_train(cfg, **kw))
    sweep(str(config), str(path), progress=False)
    trials = study_trials(sweep_dir)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["training.learning_rate"] for t in done) == [1e-5, 1e-2, 3e-2]  # every grid point, once
    retry_of_0 = next(t for t in done if t.system_attrs.get("failed_trial") == 0)
    assert retry_of_0.params["training.learning_rate"] == killed_value
    assert retry_of_0.user_attrs["run_dir"] == str(sweep_dir / "trial-000")
    # trial 2's run had finished: its retry scores it from the run dir without training it again
    retry_of_2 = next(t for t in done if t.system_attrs.get("failed_trial") == 2)
    assert len(calls) == 1 and str(sweep_dir / "trial-002") not in calls
    metrics = json.loads((sweep_dir / "trial-002" / "metrics.json").read_text())
    assert retry_of_2.value == pytest.approx(metrics["eval_loss"])
    table = (sweep_dir / "results.md").read_text()
    assert "| 0 | interrupted |" in table and "| complete (retry of 0) |" in table


def test_pruning_stops_a_poor_trial_early(tmp_path, tiny_base):
    # Evaluate every 2 steps of 8; any eval loss above 0 is "poor" for this threshold, so the first evaluation prunes.
    config = write_config(tmp_path, tiny_base, max_steps=8, eval_strategy="steps", eval_steps=2)
    path = write_sweep(tmp_path, params={"training.learning_rate": {"values": [1e-2]}},
                       pruning={"enabled": True, "pruner": "threshold", "threshold": 0.0})
    sweep_dir = sweep(str(config), str(path), progress=False)
    (trial,) = study_trials(sweep_dir)
    assert trial.state.name == "PRUNED" and trial.user_attrs["pruned_at"] == 2
    assert list(trial.intermediate_values) == [2]
    metrics = json.loads((sweep_dir / "trial-000" / "metrics.json").read_text())
    assert metrics["global_steps"] == 2  # stopped at the evaluation, not at max_steps (8)
    assert metrics["sweep"] == {"pruned": True, "pruned_at_step": 2, "trial": 0}
    assert "| 0 | pruned | 0.01 |" in (sweep_dir / "results.md").read_text()
    assert not (sweep_dir / "best.yaml").exists()  # nothing completed, nothing to recommend


def test_a_trial_that_fails_is_counted_and_the_sweep_goes_on(tmp_path, tiny_base):
    # A learning rate so high the loss turns non-finite: the Guard stops that run with a user error.
    config = write_config(tmp_path, tiny_base)
    path = write_sweep(tmp_path, params={"training.learning_rate": {"values": [1e30, 1e-2]}})
    sweep_dir = sweep(str(config), str(path), progress=False)
    trials = {t.params["training.learning_rate"]: t for t in study_trials(sweep_dir)}
    assert len(trials) == 2
    assert trials[1e30].state.name == "FAIL" and "training stopped" in trials[1e30].user_attrs["error"]
    assert trials[1e-2].state.name == "COMPLETE"
    assert "| failed |" in (sweep_dir / "results.md").read_text()


@pytest.mark.slow
def test_parallel_workers_share_one_study(tmp_path, tiny_base, capsys):
    config = write_config(tmp_path, tiny_base)
    path = write_sweep(tmp_path)
    sweep_dir = sweep(str(config), str(path), parallel=2, progress=False)
    out = capsys.readouterr().out
    assert "--parallel 2 on CPU" in out
    trials = study_trials(sweep_dir)
    assert sorted(t.params["training.learning_rate"] for t in trials if t.state.name == "COMPLETE") == [1e-5, 3e-2]
    logs = [(sweep_dir / f"worker-{i}.log").read_text() for i in range(2)]
    assert all("[peft-pipeline]" in log for log in logs)  # both workers started and trained
    assert (sweep_dir / "best.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_files_in_configs_are_valid(path, monkeypatch, base_dir):
    # base_dir: lora.* params are checked against the embedded base's architecture (meta device)
    monkeypatch.chdir(REPO)
    head = path.read_text().splitlines()
    assert head[0].startswith("#"), "sweep files start with a comment block saying what they search and how to run"
    run_line = next(line for line in head if line.startswith("# Run:"))
    config, sweep_file = run_line.split("peft-pipeline sweep ")[1].split()[:2]
    assert sweep_file == str(path.relative_to(REPO))
    spec, lines = load_sweep(path)
    check_trials(config, spec, [], lines, sweep_file)  # raises ConfigError on any problem


def test_help_does_not_import_optuna_or_torch():
    import subprocess

    code = ("import sys\nfrom peft_pipeline.cli import main\ntry:\n    main(['sweep', '--help'])\n"
            "except SystemExit:\n    pass\nprint('heavy:', any(m in sys.modules for m in ('torch', 'optuna')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--parallel N" in r.stdout and r.stdout.strip().endswith("heavy: False")


def test_constraints_pick_the_best_feasible_trial(tmp_path, tiny_base, capsys):
    """Optimize a metric subject to a bound on another: a trial outside it is marked and never the best."""
    config = write_config(tmp_path, tiny_base)
    # unconstrained, lr 3e-2 has the lower training loss after 4 steps (10.66 vs 10.81); a floor on the same
    # metric leaves only lr 1e-5 feasible
    path = write_sweep(tmp_path, metric="final_logged_loss", constraints={"final_logged_loss": {"min": 10.73}})
    assert main(["sweep", str(config), str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    trials = {t.params["training.learning_rate"]: t for t in study_trials(tmp_path / "sweep")}
    assert trials[3e-2].value < 10.73 <= trials[1e-5].value
    assert json.loads(trials[3e-2].user_attrs["constraints"]) == {"final_logged_loss": trials[3e-2].value}
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert results["best"] == trials[1e-5].number and results["constraints"] == {"final_logged_loss": {"min": 10.73, "max": None}}
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| final_logged_loss | final_logged_loss | steps |" in table
    assert "complete (fails constraints)" in table and "constraints: final_logged_loss in [10.7, inf]" in table
    assert "fails constraints" in out
    assert load_config(tmp_path / "sweep" / "best.yaml").training["learning_rate"] == 1e-5


def test_constraint_and_objective_names_are_checked(tmp_path):
    spec = SweepConfig.model_validate({"params": {"lora.r": {"values": [4]}}, "method": "grid", "metric": "test.exact_match",
                                       "constraints": {"retention.kept": {"min": 42}, "retention.kpt": {"min": 1},
                                                       "eval_retention": {}}})
    from peft_pipeline.tools.sweep import spec_problems

    problems = "\n".join(spec_problems(spec))
    assert "'retention.kpt' is not a metric" in problems and "eval_retention: give min and/or max" in problems
    assert "constraints.retention.kept:" not in problems and "metric" not in problems.split("constraints")[0]
    assert spec.goal == "maximize"  # exact match, retention: higher is better


def test_test_exact_match_objective_under_a_retention_constraint(tmp_path, tiny_base, capsys):
    """The demo sweep's shape: exact match on data.test (scored after the trial), retention.kept bounded."""
    config = write_config(tmp_path, tiny_base)
    data = yaml.safe_load(config.read_text())
    data["data"]["test"] = str(write_jsonl(tmp_path / "test.jsonl", [{"prompt": r["instruction"], "completion": r["output"]}
                                                                      for r in ROWS[:3]]))
    config.write_text(yaml.safe_dump(data))
    path = write_sweep(tmp_path, metric="test.exact_match", params={"training.learning_rate": {"values": [3e-2]}},
                       constraints={"retention.kept": {"min": 0}})
    assert main(["sweep", str(config), str(path), "--no-progress"]) == 0
    [trial] = study_trials(tmp_path / "sweep")
    run = Path(trial.user_attrs["run_dir"])
    scored = json.loads((run / "eval.json").read_text())["generation"]["metrics"]["adapter"]
    assert trial.value == scored["exact_match"]
    kept = json.loads((run / "metrics.json").read_text())["retention"]["kept"]
    assert json.loads(trial.user_attrs["constraints"]) == {"retention.kept": kept}
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())["best"] == trial.number
