"""SFT, the default method: chat-templated examples with loss masks, LoRA (or top layers), TRL's SFTTrainer.

A method is what train/loop.py plugs into its one setup -> fit -> save sequence:
  check(cfg, path, tokenizer, progress) -> Prepared   every data and model-name problem, no weights
  setup(cfg, prepared, run, state) -> (trainer, facts) base, adapter, trainer arguments, trainer
  finish(trainer, prepared) -> dict                   the method's own metrics after fitting
  save(trainer, prepared, run, weights)               what later stages load (adapter/ or model/)
Another method (preference training, a classification head) is another such object, not another loop.
"""

from __future__ import annotations

from typing import Any

from peft_pipeline.config import RunConfig
from peft_pipeline.console import library_deprecations_quiet, say
from peft_pipeline.train import hardware
from peft_pipeline.train.prepared import Prepared


class SFT:
    """Supervised fine-tuning on the data stage's tokenized rows."""

    name = "sft"
    generates_text = True  # the retention check runs after training

    def check(self, cfg: RunConfig, path: str, tokenizer, progress: bool = True) -> Prepared:
        """lora.*/freeze.* names against the architecture, then the datasets (cached), before any weight loads."""
        from peft_pipeline.data.build import build_datasets
        from peft_pipeline.data.template import end_of_turn, ensure_chat_template

        from peft_pipeline.train import self_replay

        validate_against_model(cfg, path)
        template = ensure_chat_template(tokenizer, cfg.model.chat_template)
        data = self_replay.resolve(cfg, path, tokenizer).data  # replay: self -> the base's own answers (cached)
        train_ds, eval_ds, report = build_datasets(data, tokenizer, cfg.max_length, cfg.seed, progress=progress)
        lines = [*report.lines(), f"chat template: {template}; end of turn: {end_of_turn(tokenizer)!r}"]
        return Prepared(path, tokenizer, train_ds, eval_ds, lines, {"data": report, "chat_template": template})

    def setup(self, cfg: RunConfig, prep: Prepared, run, state):
        """Base (quantized if asked), trainer arguments, adapter or trainable top layers, preflight, SFTTrainer."""
        from dataclasses import asdict

        from transformers import set_seed

        from peft_pipeline.model.load import load_base, parameter_counts
        from peft_pipeline.train import controls
        from peft_pipeline.train.preflight import preflight

        base = load_base(cfg.model, cfg.quantization, prep.path)
        args = make_sft_config(cfg, base.dtype, base)
        # Seeded before the adapter is built: the same LoRA init on every rank (FSDP shards it
        # without broadcasting from rank 0) and from one run to the next.
        set_seed(cfg.seed)
        model, plan = controls.build_model(base, cfg, args.gradient_checkpointing)  # LoRA, or top layers (freeze:)
        counts = parameter_counts(model)
        say(f"model: {prep.path}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
            f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%)", state=state)
        report = prep.facts["data"]
        record, lines = preflight(cfg, model, args, len(prep.train), report.tokens.get("length_max"),
                                  state.num_processes)  # refuses (UserError) what clearly cannot fit
        say(*lines, state=state)
        with library_deprecations_quiet():
            trainer = make_trainer(args, model, prep.tokenizer, prep.train, prep.eval)
        controls.install(trainer, cfg, plan, run, state.num_processes)  # early stopping, freezing schedule, NEFTune
        return trainer, {**counts, "data": asdict(report), "chat_template": prep.facts["chat_template"],
                         "preflight": record}

    def finish(self, trainer, prep: Prepared) -> dict[str, Any]:
        """The final eval loss, peak memory and what the controls did."""
        from peft_pipeline.train import controls
        from peft_pipeline.train.preflight import peak_memory

        final_eval = trainer.evaluate() if prep.eval is not None else {}
        return {"eval_loss": final_eval.get("eval_loss"), "peak_memory": peak_memory(), **controls.summary(trainer)}

    def save(self, trainer, prep: Prepared, cfg: RunConfig, run, weights) -> None:
        """adapter/ (or model/ for top-layer fine-tuning) with tokenizer, template and stop tokens."""
        from peft_pipeline.train.loop import save_adapter

        save_adapter(trainer.accelerator.unwrap_model(trainer.model), prep.tokenizer, run / cfg.freeze.weights_dir, weights)


def validate_against_model(cfg: RunConfig, path: str) -> None:
    """Check lora.* names against the architecture on the meta device (no weights loaded)."""
    from peft_pipeline.config import ConfigError
    from peft_pipeline.model.adapter import lora_problems
    from peft_pipeline.model.load import meta_model
    from peft_pipeline.train.controls import model_problems

    meta = meta_model(cfg.model, path)
    problems = lora_problems(cfg.lora, meta) + model_problems(cfg, meta)
    if problems:
        raise ConfigError(cfg.output_dir + "/config", problems)


def make_sft_config(cfg: RunConfig, dtype, model=None):
    """trl.SFTConfig from the training section; precision, kernels and checkpointing follow the hardware unless set.

    `model`: the loaded base, for the memory estimate that decides gradient checkpointing on a GPU.
    """
    import torch
    from trl import SFTConfig

    args: dict[str, Any] = dict(cfg.sft_args)
    on_gpu = torch.cuda.is_available()
    hardware.hardware_defaults(cfg, args, dtype)
    args.setdefault("use_liger_kernel", on_gpu and hardware.liger_available())
    hardware.checkpointing_default(args, SFTConfig, model)
    padding_free = args.get("padding_free") and not args.get("packing")
    if padding_free:
        # The data stage already dropped or cut rows longer than max_length; TRL refuses padding-free
        # without packing while max_length is set, because it would not truncate.
        args["max_length"] = None
    # A padding-free batch holds no pad token, and pad == EOS for many tokenizers (SmolLM2's): count them all.
    no_pads = padding_free and args.get("pad_to_multiple_of") in (None, "auto")
    args.setdefault("include_num_input_tokens_seen", "all" if no_pads else "non_padding")
    if cfg.data.augment.enabled:
        # TRL's preparation maps the dataset, which would bake one variant in; the data stage already
        # tokenized, masked and length-checked every row (augment.py).
        args["dataset_kwargs"] = {"skip_prepare_dataset": True}
    return hardware.build_config(SFTConfig, args)


def make_trainer(args, model, tokenizer, train_ds, eval_ds):
    """TRL's SFTTrainer on the pre-tokenized data (input_ids + labels), logging to log.jsonl."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    if hasattr(train_ds, "set_epoch"):  # data.augment: the dataset serves each epoch's variants
        from peft_pipeline.train.callbacks import EpochCallback

        trainer.add_callback(EpochCallback(train_ds))
    return trainer
