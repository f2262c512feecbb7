"""Export stage: a run dir (or merged dir) in, RUN_DIR/export/ out.

`--format gguf --quant f16,q8_0,q4_k_m`: llama.cpp converts the merged model to f16 once
(llamacpp.convert) and quantizes that file to each other type (llamacpp.quantize); every file is
then run in llama.cpp and compared with the merged model (verify.py). A file that fails its rule is
removed and the command exits 1. export_report.json has the numbers; an Ollama Modelfile and a
README go next to the files (handoff.py).
`--format adapter`: the adapter directory with a model card, optionally pushed to the hub.
"""

from __future__ import annotations

from pathlib import Path

from peft_pipeline.errors import UserError


def export(path: str | Path, fmt: str = "gguf", quant: str = "f16", out: str | Path | None = None,
           push_to_hub: str | None = None, score: bool = True) -> Path:
    """`peft-pipeline export`: verified GGUF files from the merged model, or the adapter with a model card."""
    from peft_pipeline.rundir import resolve

    if fmt not in ("gguf", "adapter"):
        raise UserError(f"--format: '{fmt}' is not supported; use gguf or adapter", exit_code=2)
    from peft_pipeline.export.llamacpp import parse_quants

    quants = parse_quants(quant) if fmt == "gguf" else []  # a usage error comes before anything is loaded
    target = resolve(path)
    if fmt == "adapter":
        return export_adapter(target, Path(out) if out else None, push_to_hub)
    return export_gguf(target, quants, Path(out) if out else target.out_dir / "export", score)


def export_gguf(target, quants: list[str], out_dir: Path, score: bool) -> Path:
    """Convert, quantize, check in llama.cpp, report, hand off; raise if any file failed its check."""
    from peft_pipeline.data.template import load_tokenizer, stop_token_ids
    from peft_pipeline.export import handoff, llamacpp, verify
    from peft_pipeline.paths import write_json_atomic

    model_dir = find_merged(target)
    inst = llamacpp.locate()
    name = (target.run_dir or target.path).resolve().name
    tok = load_tokenizer(str(model_dir), padding_side="left")
    stop = stop_token_ids(target, tok)
    files = {q: out_dir / f"{name}-{q}.gguf" for q in quants}
    say(f"converting {model_dir} with llama.cpp's convert_hf_to_gguf.py, then {', '.join(quants)} -> {out_dir}")
    steps = make_files(inst, model_dir, files, name, base_tokenizer_model(target))

    prompts = probe_prompts(target, tok, with_tests=score)
    say(f"checking each file in llama.cpp against the merged model on {len(prompts)} prompts "
        f"({verify.threads()} thread(s))")
    probes = verify.reference(model_dir, tok, prompts, stop, max_new_tokens=max(n for _, n in prompts))
    answers = verify.run_probe(inst, list(files.values()), probes)
    results = []
    for q, answer in zip(quants, answers):
        r = {"quant": q, "file": str(files[q]), "bytes": files[q].stat().st_size,
             "mb": round(files[q].stat().st_size / 1e6, 1), **steps[q], **verify.compare(q, probes, answer, stop, tok)}
        results.append(r)
        if r["status"] != "ok":
            files[q].unlink(missing_ok=True)  # a file that failed its check must not look like a result
    report = gguf_report(model_dir, inst, probes, results, tok)
    report["handoff"] = handoff.write(out_dir, name, results, tok, stop, target.config.data.system_prompt
                                      if target.config is not None else None)
    write_json_atomic(target.out_dir / "export_report.json", report)
    say(*summary_lines(report))
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        raise UserError("; ".join(f"{r['quant']}: {r['reason']}" for r in failed)
                        + f" (file removed; details in {target.out_dir / 'export_report.json'})")
    return out_dir


def find_merged(target) -> Path:
    """The merged model to export: the target itself, or where the run's merge wrote it."""
    from peft_pipeline.rundir import merged_dir

    d = merged_dir(target)
    if d is None:
        raise UserError(f"{target.path}: no merged model (none at {target.out_dir / 'merged'} and merge_report.json "
                        f"records no other); run `peft-pipeline merge {target.path}` first, or give the merged "
                        "directory itself: `peft-pipeline export MERGED_DIR` (GGUF is written from the verified merged model)")
    if (d / "config.json").is_file() and '"quantization_config"' in (d / "config.json").read_text():
        raise UserError(f"{d}/config.json: the weights are quantized; export needs the full-precision merged model "
                        "(`peft-pipeline merge` writes one)")
    return d


def base_tokenizer_model(target) -> Path | None:
    """The base's SentencePiece tokenizer.model, which a merged dir saved by transformers 5 may lack."""
    if target.kind == "merged" or not target.model_path:
        return None
    f = Path(target.model_path) / "tokenizer.model"
    return f if f.is_file() else None


def make_files(inst, model_dir: Path, files: dict[str, Path], name: str, tokenizer_model: Path | None = None) -> dict[str, dict]:
    """f16 (and bf16) from the converter, the other types quantized from the f16 file; how each was made."""
    import tempfile

    from peft_pipeline.export.llamacpp import CONVERTER_TYPES, convert, quantize
    from peft_pipeline.export.verify import threads

    steps = {}
    for q in CONVERTER_TYPES:
        if q in files:
            steps[q] = convert(inst, model_dir, files[q], q, name, tokenizer_model)
    lossy = [q for q in files if q not in CONVERTER_TYPES]
    if not lossy:
        return steps
    files[lossy[0]].parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".f16-", dir=files[lossy[0]].parent) as tmp:  # beside the outputs: same disk
        f16 = files.get("f16") or Path(tmp) / "f16.gguf"  # quantized from f16 even when f16 itself is not wanted
        if "f16" not in files:
            convert(inst, model_dir, f16, "f16", name, tokenizer_model)
        for q in lossy:
            say(f"quantizing to {q} (llama_model_quantize)")
            steps[q] = quantize(inst, f16, files[q], q, threads())
    return steps


def probe_prompts(target, tok, with_tests: bool = True) -> list[tuple]:
    """(prompt, max new tokens): the run's test prompts (as `eval` generates them), then the built-in probes."""
    from peft_pipeline.evaluate.generate import Prompt, Sampling, read_prompts
    from peft_pipeline.evaluate.parity import BUILTIN_PROMPTS
    from peft_pipeline.export.verify import PROBE_TOKENS

    cfg = target.config
    tests = read_prompts(cfg.data.test, cfg.data.system_prompt) if with_tests and cfg is not None and cfg.data.test else []
    chat = bool(getattr(tok, "chat_template", None))
    builtin = [Prompt(messages=[{"role": "user", "content": t}]) if chat else Prompt(text=t) for t in BUILTIN_PROMPTS]
    return [(p, Sampling().max_new_tokens) for p in tests] + [(p, PROBE_TOKENS) for p in builtin]


def gguf_report(model_dir: Path, inst, probes, results: list[dict], tok) -> dict:
    """export_report.json: the source, the tools, the rules, the merged model's own score, and each file."""
    import json

    from peft_pipeline.evaluate.metrics import score as task_score
    from peft_pipeline.export.verify import MIN_TOP1, TIE_MARGIN, threads

    pkg = json.loads((inst.node_package / "package.json").read_text())
    release = json.loads((inst.node_package / "llama" / "llama.cpp.info.json").read_text()).get("tag")
    tests = [p for p in probes if p.expected is not None]
    report = {"format": "gguf", "source": str(model_dir), "status": "ok" if all(r["status"] == "ok" for r in results) else "failed",
              "llama_cpp": {"node-llama-cpp": pkg.get("version"), "llama.cpp release": release, "install": str(inst.root),
                            "threads": threads()},
              "rules": {"tie_margin": TIE_MARGIN, "min_top1_agreement": MIN_TOP1,
                        "f16/bf16": "every greedy answer identical to the merged model's, near-ties aside",
                        "lossy": f"reported; below {MIN_TOP1:.0%} top-1 agreement the file is broken and removed"},
              "probes": len(probes), "test_prompts": len(tests), "quants": results}
    if tests:
        answers = [tok.decode(p.answer[:-1] if p.stopped else p.answer, skip_special_tokens=True).strip() for p in tests]
        report["merged_test_scores"] = task_score(answers, [p.expected for p in tests])
    return report


def summary_lines(report: dict) -> list[str]:
    """One console line per file: size, agreement, greedy, task score, status."""
    lines = []
    for r in report["quants"]:
        em = (r.get("test_scores") or {}).get("exact_match")
        lines.append(f"{r['quant']:7s} {r['mb']:8.1f} MB  top-1 {r['top1_agreement']:.1%}  greedy identical "
                     f"{r['greedy_identical']}/{r['probes']} (+{r['greedy_ties']} near-ties)"
                     + (f"  test exact match {em:.1%}" if em is not None else "") + f"  {r['status']}"
                     + (f" ({r['reason']})" if r["reason"] else ""))
    merged = (report.get("merged_test_scores") or {}).get("exact_match")
    if merged is not None:
        lines.append(f"merged model (transformers): test exact match {merged:.1%}")
    h = report.get("handoff") or {}
    if h:
        lines.append(f"Modelfile (FROM ./{h['from']}) and README.md written; {h['template_note']}")
    return lines


def say(*lines: str) -> None:
    for line in lines:
        print(f"[peft-pipeline] export: {line}", flush=True)


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
