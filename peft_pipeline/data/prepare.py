"""The prepare stage: a config's tokenized data cache built without the model, e.g. on a CPU node before a GPU job.

`peft-pipeline prepare CONFIG.yaml` loads only the tokenizer (and the chat template the config
names), runs data.build_datasets exactly as `train` will (same cache key), and says what it built:
rows per source, examples, tokens, every dropped count and the cache path. A later `train` on
the same config, files and tokenizer finds the cache and skips the work.
"""

from __future__ import annotations

from peft_pipeline.config import RunConfig


def prepare(cfg: RunConfig, progress: bool = True) -> list[str]:
    """Build (or find) the data cache of `cfg`; return the lines to print."""
    from peft_pipeline.data.build import build_datasets, processes
    from peft_pipeline.data.template import ensure_chat_template, load_tokenizer
    from peft_pipeline.paths import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
    template = ensure_chat_template(tokenizer, cfg.model.chat_template)
    train, evals, report = build_datasets(cfg.data, tokenizer, cfg.max_length, cfg.seed, progress=progress)
    rows = sum(s["rows"] for s in report.sources)
    return [
        *(f"source: {s['path']} ({s['format']}): {s['rows']:,} rows, {s['used']:,} used" for s in report.sources),
        f"rows: {rows:,} read; examples: {len(train):,} train, {len(evals) if evals is not None else 0:,} eval",
        f"tokens: {report.tokens.get('train_total', 0):,} in train, {report.tokens.get('train_trained', 0):,} carry loss; "
        f"lengths {report.tokens.get('length_min')}-{report.tokens.get('length_max')} "
        f"(median {report.tokens.get('length_median')}, max_length {cfg.max_length})",
        f"dropped: {report.dropped_overlong:,} over max_length, {report.dropped_no_loss:,} with nothing to learn; "
        f"truncated: {report.truncated:,}; duplicates in train: {report.duplicates:,} (kept)",
        f"chat template: {template}; processes: {processes(cfg.data, rows)}",
        f"cache: {report.cache}",
    ]
