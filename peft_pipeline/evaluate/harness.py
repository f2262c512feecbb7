"""Standard benchmarks: EleutherAI's lm-evaluation-harness on the base and the adapter of a run, side by side.

`peft-pipeline eval RUN --harness TASKS [--harness-include DIR]` loads the run's model once and hands it
to the harness (lm_eval.models.huggingface.HFLM over the in-memory model) twice: with the adapter
switched off (the base) and on, on the same tasks, few-shot examples and seeds. The harness is an
optional extra (`pip install 'peft-pipeline[harness]'`); its built-in tasks download their datasets
from the hub on first use, while a task of your own (a YAML over local files, in --harness-include
DIR) runs offline. Results go to <run>/harness.json and a console table (task, metric, base, adapter, change).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError

INSTALL_HINT = "the harness is an optional extra: pip install 'peft-pipeline[harness]' (or pip install lm-eval)"


def available() -> bool:
    """Whether lm_eval can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def check(tasks: list[str], include: str | None):
    """The harness's TaskManager holding `tasks`; refuses what cannot run before the model loads (UserError, exit 2)."""
    if not available():
        raise UserError(f"--harness: {INSTALL_HINT}", exit_code=2)
    if not tasks:
        raise UserError("--harness: name at least one task, e.g. --harness arc_easy,hellaswag", exit_code=2)
    if include is not None and not Path(include).is_dir():
        raise UserError(f"--harness-include: {include} is not a directory of task YAML files", exit_code=2)
    import logging

    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-request info lines drown the pipeline's
    # Indexing the ~200 built-in task folders takes a while; tasks all found in the include dir skip it.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--harness: unknown task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`"
                        + ("" if include else " or add your own YAML with --harness-include DIR"), exit_code=2)
    return manager


def run(model, tokenizer, manager, tasks: list[str], include: str | None, names: list[str], batch_size: int = 8,
        limit: int | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """Each task's metrics per model in `names` ('base' = adapter off): {"tasks", "results": {name: {task: {metric: v}}}}.

    `manager`: the TaskManager `check` returned."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from peft_pipeline.evaluate.generate import adapter_off

    padding = tokenizer.padding_side
    results: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        for name in names:
            with adapter_off(model, name == "base"):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
                out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                      log_samples=False, bootstrap_iters=0, verbosity="ERROR")
            results[name] = {task: _numbers(values) for task, values in out["results"].items()}
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding  # HFLM may change it
    return {"tasks": tasks, "include": include, "limit": limit, "num_fewshot": num_fewshot, "results": results}


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """A task's metrics as {'acc': 0.5, ...}: the harness names them 'acc,none' (metric,filter); stderr left out."""
    out = {}
    for key, v in values.items():
        metric, _, flt = key.partition(",")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in metric:
            out[metric if flt in ("", "none") else f"{metric} ({flt})"] = float(v)
    return out


def table(report: dict[str, Any]) -> list[str]:
    """Console lines: task, metric, then each model's value and the change from base to adapter."""
    results = report["results"]
    names = list(results)
    head = f"{'task':<24} {'metric':<16}" + "".join(f" {n:>9}" for n in names) + (" {:>9}".format("change") if len(names) == 2 else "")
    lines = [head]
    first = results[names[0]]
    for task in sorted(first):
        for metric in sorted(first[task]):
            vals = [results[n].get(task, {}).get(metric) for n in names]
            cells = "".join(f" {v:>9.4f}" if isinstance(v, float) else f" {'-':>9}" for v in vals)
            if len(vals) == 2 and all(isinstance(v, float) for v in vals):
                cells += f" {vals[1] - vals[0]:>+9.4f}"
            lines.append(f"{task:<24} {metric:<16}{cells}")
    return lines
