"""Eval stage: validation loss/perplexity and generation metrics for a run, adapter or merged model.

Takes the directory a previous stage wrote (resolve) and reads its settings back from it:
the run's config names the validation data (data.eval, or the val_fraction held out of train,
rebuilt exactly as training built it) and the test prompts (data.test); --data and --prompts
replace them. With --compare-base the same model is evaluated a second time with its adapter
switched off, so base and adapter see identical prompts, template, stop tokens and decoding.

Writes <run dir>/eval.json: settings, loss and perplexity, metrics (metrics.score) per model,
and every prediction with its prompt and expected answer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError
from peft_pipeline.evaluate.generate import Prompt, Sampling, adapter_off, generate, one_line, read_prompts
from peft_pipeline.evaluate.harness import check as check_harness
from peft_pipeline.evaluate.preference import load_pairs
from peft_pipeline.report import metric_rows

EXAMPLES_SHOWN = 3


# Over 50 lines by choice: the eval stage's one sequence (inputs checked, the model loaded once, each score, the
# report), read top to bottom; each score is a helper below.
def evaluate(path: str | Path, data: str | None = None, prompts: str | None = None, compare_base: bool = False,
             sampling: Sampling | None = None, batch_size: int = 8, limit: int | None = None,
             progress: bool = True, retention: str | None = None, pairs: str | None = None,
             harness: list[str] | None = None, harness_include: str | None = None) -> dict[str, Any]:
    """Evaluate the model in `path`, print a summary, write eval.json next to it; return the report.

    `retention`: a JSONL file or 'auto' (the run's data.retention, else the bundled set): base vs adapter on
    general prompts. `pairs`: preference pairs to score (default: a DPO/ORPO/CPO/KTO run's held-out pairs).
    `harness`: lm-evaluation-harness tasks, base and adapter (evaluate/harness.py; also written to harness.json).
    """
    from peft_pipeline.data.template import load_tokenizer, stop_token_ids
    from peft_pipeline.model.load import load_model
    from peft_pipeline.paths import write_json_atomic
    from peft_pipeline.rundir import resolve

    sampling = sampling or Sampling()
    check_settings(sampling, batch_size, limit)
    target = resolve(path)
    if compare_base and target.adapter_dir is None:
        raise UserError(f"{path}: --compare-base needs an adapter to switch off, and a merged model has none; "
                        "run it on the run directory instead", exit_code=2)
    tokenizer = load_tokenizer(target.tokenizer_dir, padding_side="left")
    # Data problems surface before the model loads.
    test = load_test_prompts(target, prompts, limit)
    loss_data = load_loss_data(target, tokenizer, data, limit, progress)
    retention_set = load_retention(target, retention, path)
    pair_data = load_pairs(target, pairs, limit)
    tasks = check_harness(harness, harness_include) if harness is not None else None  # its task index, before loading
    if test is None and loss_data is None and retention_set is None and pair_data is None and harness is None:
        raise UserError(f"{path}: nothing to evaluate: the run config sets neither data.eval/val_fraction nor "
                        "data.test; pass --data FILE (loss) and/or --prompts FILE (generation)", exit_code=2)
    model = load_model(target, place_on_gpu=True)
    stop_ids = stop_token_ids(target, tokenizer)
    label = "adapter" if target.adapter_dir is not None else "merged"
    names = ["base", label] if compare_base else [label]
    losses, answers = score_models(model, tokenizer, names, loss_data, test, stop_ids, sampling, batch_size, progress)
    report = build_report(target, names, sampling, batch_size, limit, stop_ids, loss_data, losses, test, answers)
    report.update(method_scores(target, model, tokenizer, names, pair_data, test, answers, batch_size, progress))
    if retention_set is not None:
        report["retention"] = retention_report(target, model, tokenizer, retention_set, stop_ids, batch_size, progress)
    if harness is not None:
        report["harness"] = run_harness(target, model, tokenizer, names if target.adapter_dir is None else ["base", label],
                                        tasks, harness, harness_include, batch_size, limit)
    out = target.out_dir / "eval.json"
    write_json_atomic(out, report)
    print_report(report)
    print_checks(report)
    print(f"[peft-pipeline] eval written to {out}")
    return report


def retention_report(target, model, tokenizer, retention_set, stop_ids, batch_size: int, progress: bool) -> dict:
    """Base vs adapter on the retention prompts; against the saved base answers when there is no adapter."""
    from peft_pipeline.evaluate.retention import answer, check, compare

    file, items, base, config = retention_set
    system = config.data.system_prompt if config is not None else None
    if base is None:
        return {"file": file, **check(model, tokenizer, items, stop_ids, system, batch_size, progress)}
    return {"file": file, **compare(items, base, answer(model, tokenizer, items, stop_ids, system, batch_size, progress))}


def print_checks(report: dict[str, Any]) -> None:
    """The harness table and the retention line, after the main report."""
    if "harness" in report:
        from peft_pipeline.evaluate.harness import table

        print("\nlm-evaluation-harness:\n" + "\n".join(table(report["harness"])))
    if "retention" in report:
        from peft_pipeline.report import summary_line

        print(f"\n{summary_line(report['retention'])}")


def run_harness(target, model, tokenizer, names: list[str], manager, tasks: list[str], include: str | None,
                batch_size: int, limit: int | None) -> dict[str, Any]:
    """The harness tasks on each model in `names`, also written to <run>/harness.json."""
    from peft_pipeline.evaluate.harness import run
    from peft_pipeline.paths import write_json_atomic

    result = run(model, tokenizer, manager, tasks, include, names, batch_size, limit)
    write_json_atomic(target.out_dir / "harness.json", result)
    return result


def score_models(model, tokenizer, names: list[str], loss_data, test, stop_ids, sampling, batch_size: int,
                 progress: bool) -> tuple[dict, dict]:
    """Losses and answers of each model in `names` ("base" = the same weights with the adapter off)."""
    losses, answers = {}, {}
    for name in names:
        with adapter_off(model, name == "base"):
            if loss_data is not None:
                losses[name] = validation_loss(model, loss_data["columns"], tokenizer.pad_token_id, batch_size,
                                               progress, desc=f"Loss ({name})")
            if test is not None:
                answers[name] = generate(model, tokenizer, test["prompts"], stop_ids, sampling, batch_size,
                                         progress, desc=f"Generating ({name})")
    return losses, answers


def method_scores(target, model, tokenizer, names, pair_data, test, answers, batch_size: int, progress: bool) -> dict:
    """Preference accuracy/margin on held-out pairs, and a GRPO run's rewards on its test generations."""
    out: dict[str, Any] = {}
    cfg = target.config
    system = cfg.data.system_prompt if cfg is not None else None
    if pair_data is not None:
        from peft_pipeline.evaluate.preference import score_models as score_pairs

        out["preference"] = score_pairs(model, tokenizer, names, pair_data, system, batch_size, progress)
    if test is not None and cfg is not None and cfg.method == "grpo" and cfg.rewards:
        from peft_pipeline.evaluate.rewards import score as reward_scores

        prompts = [p.as_json() for p in test["prompts"]]
        refs = [p.expected or "" for p in test["prompts"]]
        out["rewards"] = {name: reward_scores(cfg.rewards, prompts, [a.text for a in answers[name]],
                                              [a.token_ids for a in answers[name]], refs) for name in names}
    return out


def check_settings(sampling: Sampling, batch_size: int, limit: int | None) -> None:
    """Flag values that cannot work, before anything loads."""
    sampling.check()
    if batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {batch_size}", exit_code=2)
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be at least 1, got {limit}", exit_code=2)


# --------------------------------------------------------------------------- inputs


def load_test_prompts(target, prompts: str | None, limit: int | None) -> dict | None:
    """The prompts file (--prompts, else the run's data.test) as Prompts with expected answers."""
    system = target.config.data.system_prompt if target.config is not None else None
    source = prompts
    if source is None:
        source = target.config.data.test if target.config is not None else None
        if source is None:
            return None
        if not Path(source).expanduser().exists():
            raise UserError(f"data.test: {source} not found (paths in the run's config.yaml are relative to where "
                            "training ran); run from there or pass --prompts FILE")
    rows = read_prompts(source, system, need_expected=True)
    return {"file": str(source), "prompts": rows[:limit] if limit else rows}


def load_retention(target, setting: str | None, path) -> tuple[str, list, list | None, Any] | None:
    """(file, items, base answers or None, the run's config) for --retention: FILE, or 'auto' = the run's
    data.retention, else the bundled set. Without an adapter to switch off (freeze.method: top_layers, a merged
    model), 'auto' scores against the base answers the run saved before training (retention-reference.jsonl),
    found beside the model or, for a merged dir, in the run it was merged from."""
    from peft_pipeline.evaluate.retention import REFERENCE, load, read_reference, resolve
    from peft_pipeline.rundir import source_run

    if setting is None:
        return None
    if target.adapter_dir is None:
        run = source_run(target) or target
        reference = run.out_dir / REFERENCE
        if setting == "auto" and reference.is_file():
            return (str(reference), *read_reference(reference), run.config)
        raise UserError(f"{path}: --retention compares base and adapter, and this model has no adapter to switch "
                        f"off nor a {REFERENCE} from training; run it on the run directory instead", exit_code=2)
    file = None
    if setting == "auto" and target.config is not None:
        file = resolve(target.config.data.retention, target.config.model.name)
    if file is None:
        file = resolve("bundled" if setting == "auto" else setting, "")
    return str(file), load(file), None, target.config


def load_loss_data(target, tokenizer, data: str | None, limit: int | None, progress: bool) -> dict | None:
    """Tokenized validation examples (input_ids + labels with -100 outside the loss), or None."""
    from peft_pipeline.data.build import DataReport, build_datasets, load_examples, tokenize_examples
    from peft_pipeline.config import DataSection, DataSource

    cfg = target.config
    if data is None and cfg is not None and cfg.method != "sft":
        return None  # a preference or GRPO run's data are pairs or prompts: scored by method_scores
    settings = cfg.data if cfg is not None else DataSection()
    max_length = cfg.max_length if cfg is not None else None
    seed = cfg.seed if cfg is not None else 42
    if data is not None:
        report = DataReport()
        examples = load_examples([DataSource(path=data)], settings.system_prompt, seed, report)
        columns = tokenize_examples(examples, tokenizer, settings, max_length, report, "eval", progress)
        source = data
    elif cfg is not None and (settings.eval or settings.val_fraction > 0):
        # The same split, tokens and masks training saw (usually a cache hit).
        _, evals, _ = build_datasets(replay_as_trained(target, settings), tokenizer, max_length, seed, progress=progress)
        if evals is None:
            return None
        cols = evals.to_dict()
        columns = {"input_ids": cols["input_ids"], "labels": cols["labels"]}
        source = ", ".join(s.path for s in settings.eval) or f"val_fraction={settings.val_fraction} of train"
    else:
        return None
    if not columns["input_ids"]:
        raise UserError(f"{source}: no example left to compute a loss on (all too long or with nothing to learn)")
    if limit:
        columns = {k: v[:limit] for k, v in columns.items()}
    return {"source": source, "columns": columns}


def replay_as_trained(target, settings):
    """data.replay.path 'self' as the file of base answers the run trained on (its data report names it)."""
    import json

    if settings.replay is None or settings.replay.path != "self":
        return settings
    metrics = target.out_dir / "metrics.json"
    sources = json.loads(metrics.read_text()).get("data", {}).get("sources", []) if metrics.is_file() else []
    used = [s["path"] for s in sources if s.get("replay")]
    if not used or not Path(used[0]).is_file():
        raise UserError(f"{target.out_dir}: the self-replay rows this run trained on are not found (metrics.json "
                        "data.sources); pass --data FILE to compute the loss on a file")
    return settings.model_copy(update={"replay": settings.replay.model_copy(update={"path": used[0], "format": "alpaca"})})


# --------------------------------------------------------------------------- loss


def validation_loss(model, columns: dict[str, list], pad_id: int | None, batch_size: int = 8,
                    progress: bool = False, desc: str = "Loss") -> dict[str, float]:
    """Token-weighted mean cross-entropy over label positions (-100 ignored) and its exp (perplexity).

    Every label token counts once, whatever batch it lands in: the mean is sum(nll) / n_tokens,
    not a mean of batch means, so neither batch size nor padding changes the number.
    """
    import math

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    ids, labels = columns["input_ids"], columns["labels"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    pad_id = 0 if pad_id is None else pad_id
    nll, tokens = 0.0, 0
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr):
        idx = order[start:start + batch_size]
        width = max(len(ids[i]) for i in idx)
        # Right padding: positions stay 0..n-1 as in training; padded positions carry no label.
        x = torch.full((len(idx), width), pad_id, dtype=torch.long)
        y = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(ids[i])
            x[r, :n], y[r, :n], mask[r, :n] = torch.tensor(ids[i]), torch.tensor(labels[i]), 1
        with torch.inference_mode():
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
        # Position t predicts token t+1.
        target = y[:, 1:].to(logits.device)
        nll += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), target.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
        tokens += int((target != -100).sum())
    loss = nll / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens, "examples": len(ids)}


# --------------------------------------------------------------------------- report


def build_report(target, names, sampling: Sampling, batch_size, limit, stop_ids, loss_data, losses, test, answers) -> dict:
    """eval.json: what was evaluated and how, the numbers per model, and every prediction."""
    from peft_pipeline.evaluate.metrics import score

    report: dict[str, Any] = {
        "target": {"kind": target.kind, "path": str(target.path), "base_model": target.model_path,
                   "adapter": str(target.adapter_dir) if target.adapter_dir else None},
        "models": names,
        "settings": {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                     "top_p": sampling.top_p, "batch_size": batch_size, "limit": limit, "stop_token_ids": stop_ids},
    }
    if loss_data is not None:
        report["loss"] = {"data": loss_data["source"], **losses}
    if test is not None:
        prompts: list[Prompt] = test["prompts"]
        refs = [p.expected for p in prompts]
        metrics = {}
        for name in names:
            got = answers[name]
            metrics[name] = {**score([a.text for a in got], refs),
                             "stopped_rate": sum(a.stopped for a in got) / len(got) if got else 0.0,
                             "mean_new_tokens": sum(a.new_tokens for a in got) / len(got) if got else 0.0}
        report["generation"] = {"prompts": test["file"], "metrics": metrics}
        report["predictions"] = [
            {"where": p.where, "prompt": p.as_json(), "expected": p.expected,
             **{name: answers[name][i].text for name in names},
             "stopped": {name: answers[name][i].stopped for name in names}}
            for i, p in enumerate(prompts)
        ]
    return report


# Blocks of metrics.score not shown as table rows (shown apart or too wide).


def print_report(report: dict, out=None) -> None:
    """Side-by-side metrics (one column per model), label confusion matrices, and a few examples."""
    from peft_pipeline.evaluate.metrics import format_confusion_matrix

    out = out or sys.stdout
    names = report["models"]
    rows = metric_rows(report)
    if "generation" in report:
        gen = report["generation"]["metrics"][names[-1]]
        print(f"\ngeneration on {report['generation']['prompts']}: {gen['n']} prompts, answers scored as {gen['kind']}",
              file=out)
    if "loss" in report:
        first = report["loss"][names[0]]
        print(f"loss on {report['loss']['data']}: {first['examples']} examples, {first['tokens']} label tokens", file=out)
    width = max([len(r[0]) for r in rows] + [6])
    print("\n" + f"{'metric':<{width}}" + "".join(f"{n:>12}" for n in names), file=out)
    for key, values in rows:
        cells = "".join(f"{'-' if v is None else f'{v:.4f}':>12}" for v in values)
        print(f"{key:<{width}}{cells}", file=out)
    for n in names:
        label = report.get("generation", {}).get("metrics", {}).get(n, {}).get("label")
        if label:
            print(f"\nconfusion matrix ({n}):\n{format_confusion_matrix(label['confusion_matrix'])}", file=out)
    for p in report.get("predictions", [])[:EXAMPLES_SHOWN]:
        print(f"\n--- {p['where']}", file=out)
        prompt = p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][-1]["content"]
        print(f"  prompt:   {one_line(prompt)}", file=out)
        print(f"  expected: {one_line(p['expected'])}", file=out)
        for n in names:
            flag = "" if p["stopped"][n] else "  [hit max_new_tokens]"
            print(f"  {n + ':':<9} {one_line(p[n])}{flag}", file=out)
