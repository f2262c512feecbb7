"""Export stage: a run dir (or merged dir) in, RUN_DIR/export/ out.

`--format gguf`: the merged model as one GGUF file (export/gguf.py writes it), loaded back and
compared with the merged model (evaluate/parity.py), then scored on the run's test prompts.
`--format adapter`: the adapter directory with a model card, optionally pushed to the hub.
"""

from __future__ import annotations

from pathlib import Path

from peft_pipeline.errors import UserError
from peft_pipeline.export.gguf import alone, verify_gguf, write_gguf


def export(path: str | Path, fmt: str = "gguf", quant: str = "f16", out: str | Path | None = None,
           push_to_hub: str | None = None, score: bool = True) -> Path:
    """`peft-pipeline export`: GGUF from the merged model (verified), or the adapter with a model card."""
    from peft_pipeline.rundir import resolve

    target = resolve(path)
    if fmt == "adapter":
        return export_adapter(target, Path(out) if out else None, push_to_hub)
    if fmt != "gguf":
        raise UserError(f"--format: '{fmt}' is not supported; use gguf or adapter", exit_code=2)
    if target.kind == "merged":
        model_dir = target.path
    else:
        model_dir = target.out_dir / "merged"
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{target.path}: no merged model at {model_dir}; run `peft-pipeline merge {target.path}` first "
                            "(GGUF is written from the verified merged model)")
    name = (target.run_dir or target.path).resolve().name
    out_file = Path(out) if out else target.out_dir / "export" / f"{name}-{quant}.gguf"
    print(f"[peft-pipeline] export: writing {out_file} ({quant}) from {model_dir}", flush=True)
    write_gguf(model_dir, out_file, quant=quant, name=name)
    print("[peft-pipeline] export: loading it back with transformers to compare (about a minute)", flush=True)
    report = {"format": "gguf", "quant": quant, "file": str(out_file), "bytes": out_file.stat().st_size,
              "source": str(model_dir), "check": verify_gguf(model_dir, out_file)}
    check = report["check"]
    # f16 must be the same model; q8_0 is a lossy format whose difference is reported, not enforced.
    ok = check["tokenizer_identical"] and check["chat_template_identical"] and (quant != "f16" or check["greedy_identical"])
    if score and target.config is not None and target.config.data.test:
        report["test_scores"] = score_gguf(target, out_file)
    report["status"] = "ok" if ok else "failed"
    from peft_pipeline.paths import write_json_atomic

    write_json_atomic(target.out_dir / "export_report.json", report)
    print(f"[peft-pipeline] export: max |logit diff| {check['max_abs_logit_diff']:.4g}, top-1 agreement "
          f"{check['top1_agreement']:.1%}, greedy identical: {check['greedy_identical']}, "
          f"tokenizer identical: {check['tokenizer_identical']}", flush=True)
    if not ok:
        out_file.unlink(missing_ok=True)
        raise UserError(f"{out_file}: the GGUF does not reproduce the merged model (see {target.out_dir}/export_report.json); "
                        "file removed")
    print(f"[peft-pipeline] export: {out_file}", flush=True)
    return out_file


def score_gguf(target, gguf_file: Path, limit: int | None = None) -> dict:
    """The GGUF (read back by transformers) scored on the run's test prompts, as `eval` scores the adapter."""
    from peft_pipeline.data.template import load_tokenizer, stop_token_ids
    from peft_pipeline.evaluate.generate import generate, read_prompts
    from peft_pipeline.evaluate.metrics import score

    import torch
    from transformers import AutoModelForCausalLM

    cfg = target.config
    prompts = read_prompts(cfg.data.test, cfg.data.system_prompt)[:limit]
    tok = load_tokenizer(target.tokenizer_dir, padding_side="left")  # the training tokenizer and template: what a server would apply
    with alone(Path(gguf_file).resolve()) as (d, n):
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32).eval()
    answers = generate(model, tok, prompts, stop_token_ids(target, tok), batch_size=8)
    return score([a.text for a in answers], [p.expected for p in prompts])


def export_adapter(target, out: Path | None, push_to_hub: str | None) -> Path:
    """The PEFT adapter dir plus a model card (README.md), optionally pushed to the hub."""
    import shutil

    from peft_pipeline.paths import atomic_dir

    if target.adapter_dir is None:
        raise UserError(f"{target.path}: a merged model has no adapter to export; use --format gguf")
    out = out or target.out_dir / "export" / "adapter"
    with atomic_dir(out) as tmp:
        shutil.copytree(target.adapter_dir, tmp, dirs_exist_ok=True)
        (tmp / "README.md").write_text(model_card(target))
    print(f"[peft-pipeline] export: adapter with model card in {out}", flush=True)
    from peft_pipeline.export.vllm import write_vllm_check

    write_vllm_check(out)  # what vLLM's LoRA loader would refuse, before a server finds out (vllm_check.json)
    if push_to_hub:
        # Real hub path for users with credentials; never exercised offline.
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=str(out))
        print(f"[peft-pipeline] export: pushed to {push_to_hub}", flush=True)
    return out


def model_card(target) -> str:
    """Markdown card: base, data, hyperparameters, eval results, how to load."""
    import json

    cfg = target.config
    run = target.run_dir
    metrics = _read_json(run / "metrics.json") if run else {}
    evals = _read_json(run / "eval.json") if run else {}
    base = cfg.model.name if cfg else "(unknown base)"
    lines = ["---", "library_name: peft", f"base_model: {base}", "tags: [lora, peft-pipeline]", "---", "",
             f"# LoRA adapter for {base}", "", "Trained with peft-pipeline.", "", "## Training", ""]
    if cfg:
        lora = cfg.lora
        lines += [f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target_modules={lora.target_modules}"
                  + (", DoRA" if lora.use_dora else "") + (", rsLoRA" if lora.use_rslora else ""),
                  f"- Quantization during training: {cfg.quantization.mode}",
                  f"- Data: {', '.join(s.path for s in cfg.data.train)} (loss on prompts: {cfg.data.train_on_prompt})",
                  f"- Training arguments: `{json.dumps({k: v for k, v in cfg.sft_args.items() if k != 'output_dir'})}`"]
    if metrics:
        lines += [f"- Steps: {metrics.get('global_steps')}, final train loss {metrics.get('final_logged_loss')}, "
                  f"eval loss {metrics.get('eval_loss')}, trainable parameters {metrics.get('trainable_params')}"]
    if evals.get("metrics"):
        lines += ["", "## Evaluation", "", "```json", json.dumps(evals["metrics"], indent=2)[:4000], "```"]
    lines += ["", "## Use", "", "```python", "from peft import AutoPeftModelForCausalLM",
              "from transformers import AutoTokenizer", "",
              'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```", ""]
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
