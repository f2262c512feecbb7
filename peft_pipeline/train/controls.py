"""Training controls: which parameters train and when, and when training stops.

Owns the `early_stopping:` and `freeze:` sections at run time, plus NEFTune on padding-free batches:
- `build_model`: LoRA (the lora section) or, for freeze.method top_layers, the bare base with only its
  top decoder layers (and optionally the head) trainable; returns the model and a `Plan` of the
  parameters that ever train.
- `install`: on an SFTTrainer, an optimizer holding every parameter that will ever train, in one
  param group per layer depth (discriminative rates), the `Freezer` callback that switches
  `requires_grad` per the unfreezing schedule, `EarlyStopping`, and `PackedNEFTune`.
- `summary`: what happened, for metrics.json (stop reason, best checkpoint, trainable-count changes).
The config sections and their static checks live in config.py; train/sft.py only wires these in.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

from peft_pipeline.errors import UserError

# Decoder blocks are a ModuleList named layers (llama, qwen, mistral, gemma), h (gpt2, bloom, falcon),
# blocks or layer; the index after it is the layer number, 0 = closest to the embeddings.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Decoder layer index of a parameter name, None for embeddings, final norm and head."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(model) -> int:
    """Number of decoder layers (text config of multimodal models)."""
    config = model.config
    return int((config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers)


def model_problems(cfg, model) -> list[str]:
    """freeze.* layer counts against the architecture (meta model, no weights loaded)."""
    fr, n, arch = cfg.freeze, num_layers(model), type(model).__name__
    counts = [("freeze.top_layers", fr.top_layers)] + [(f"freeze.unfreeze[{i}].layers", s.layers) for i, s in enumerate(fr.unfreeze)]
    problems = [f"{key}: {k} layers asked for, but {arch} has {n}" for key, k in counts if k is not None and k > n]
    indices = cfg.lora.layer_indices
    if fr.method == "lora" and fr.top_layers and indices is not None and fr.top_layers <= n:
        top = range(n - fr.top_layers, n)
        if not set(top) & set(indices):
            problems.append(f"freeze.top_layers: the top {fr.top_layers} layers ({top.start}-{top.stop - 1}) hold no adapter "
                            f"(lora.layers_to_transform: {cfg.lora.layers_to_transform}); nothing would train at the start")
    return problems


class Plan:
    """The parameters that ever train, where each sits (layer / embedding / head), and the schedule."""

    def __init__(self, model, freeze):
        self.model, self.freeze, self.n = model, freeze, num_layers(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        embed = base.get_input_embeddings()
        out = base.get_output_embeddings()
        head_ids = {id(p) for p in out.parameters()} if out is not None else set()
        embed_names = [n for n, m in model.named_modules() if m is embed and n]
        self.depth: dict[str, int] = {}  # 0 = the top layer and the head; n = the input embeddings
        self.params: dict[str, Any] = {}
        if freeze.method == "top_layers":
            # Everything the schedule will ever reach trains; the rest of the base stays frozen for good.
            reach = max([freeze.top_layers or self.n] + [s.layers for s in freeze.unfreeze])
            for name, p in model.named_parameters():
                i = layer_of(name)
                p.requires_grad_((i is not None and i >= self.n - reach) or (i is None and freeze.train_head
                                                                             and self._is_head(name, p, head_ids, embed_names)))
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            i = layer_of(name)
            self.params[name] = p
            if i is not None:
                self.depth[name] = self.n - 1 - i
            else:
                self.depth[name] = 0 if self._is_head(name, p, head_ids, embed_names) else self.n

    @staticmethod
    def _is_head(name, p, head_ids, embed_names) -> bool:
        # The LM head, even when tied to the input embeddings (same tensor), and the final norm:
        # any non-layer parameter outside the input embedding module.
        if id(p) in head_ids:
            return True
        return not any(name.startswith(e + ".") for e in embed_names)

    def layers_at(self, step: int, epochs: int) -> int:
        """How many top layers train after `step` optimizer steps and `epochs` whole epochs."""
        k = self.freeze.top_layers or self.n
        for s in self.freeze.unfreeze:
            if (s.step is not None and step >= s.step) or (s.epoch is not None and epochs >= s.epoch):
                k = max(k, s.layers)
        return min(k, self.n)

    def apply(self, k: int) -> None:
        """Make the adapters/weights of the top k layers (and the non-layer ones) trainable, freeze the others."""
        for name, p in self.params.items():
            # Parameters outside the decoder layers (head, norm, lora.modules_to_save) train throughout.
            p.requires_grad_(layer_of(name) is None or self.depth[name] < k)

    def describe(self, k: int) -> dict[str, Any]:
        """Trainable count now, for printing and log.jsonl."""
        from peft_pipeline.model.load import parameter_counts

        counts = parameter_counts(self.model)
        layers = sorted({layer_of(n) for n, p in self.params.items() if p.requires_grad and layer_of(n) is not None})
        return {"trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
                "layers": [layers[0], layers[-1]] if layers else None, "top_layers": k}

    @property
    def needs_optimizer(self) -> bool:
        """A schedule or per-layer rates need our optimizer; otherwise the trainer's own sees the right params."""
        return bool(self.freeze.unfreeze) or self.freeze.layer_lr_decay != 1.0


def build_model(base, cfg, gradient_checkpointing: bool):
    """The model to train and its Plan (None when no freeze control is set)."""
    from peft_pipeline.model.adapter import attach_adapter

    if cfg.init_from is not None:  # config.py refused it with freeze controls
        from peft_pipeline.model.adapter import resume_adapter

        return resume_adapter(base, cfg.init_from, cfg.quantization.mode != "none", gradient_checkpointing), None
    if cfg.freeze.method == "lora":
        model = attach_adapter(base, cfg.lora, cfg.quantization.mode != "none", gradient_checkpointing)
    else:
        model = base
        if gradient_checkpointing:
            # The frozen embeddings output no grad; checkpointed layers need an input that requires one.
            model.enable_input_require_grads()
    if not cfg.freeze.active:
        return model, None
    plan = Plan(model, cfg.freeze)
    plan.apply(plan.layers_at(0, 0))
    return model, plan


def make_optimizer(trainer, plan: Plan):
    """The optimizer `training.optim` names, over every parameter that will ever train, one group per depth.

    The trainer builds its optimizer from the parameters that require grad at creation, which is before
    any callback runs; a layer unfrozen later would never be stepped. So every eventually-trainable
    parameter is in from the start; frozen ones have no .grad, and torch optimizers skip those (no update,
    no weight decay). The trainer's LambdaLR scheduler then scales each group's own rate.
    """
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if any(k in kwargs for k in ("params", "model", "optimizer_dict")):
        raise UserError(f"training.optim: {trainer.args.optim} builds its own parameter groups and cannot be combined "
                        "with freeze.unfreeze or freeze.layer_lr_decay; use adamw_torch", exit_code=2)
    lr, decay = trainer.args.learning_rate, plan.freeze.layer_lr_decay
    decay_names = set(trainer.get_decay_parameter_names(trainer.model))
    decayed = {id(p) for n, p in trainer.model.named_parameters() if n in decay_names}
    groups: dict[tuple[int, bool], list] = {}
    for name, p in plan.params.items():
        groups.setdefault((plan.depth[name], id(p) in decayed), []).append(p)
    # Sorted by depth: group 0 is the top, so the learning_rate the trainer logs is the configured one.
    param_groups = [{"params": ps, "lr": lr * decay ** depth, "weight_decay": trainer.args.weight_decay if wd else 0.0,
                     "layer_depth": depth} for (depth, wd), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    return cls(param_groups, **kwargs)


def install(trainer, cfg, plan: Plan | None, run: Path, world: int) -> None:
    """Add the optimizer and callbacks the early_stopping/freeze sections and NEFTune need."""
    from peft_pipeline.config import ConfigError

    log = run / "log.jsonl"
    if plan is not None:
        if world > 1 and (plan.needs_optimizer or cfg.freeze.method == "top_layers"):
            # DDP registers its gradient hooks for the params that require grad when it wraps the model,
            # and FSDP refuses a ready-made optimizer: neither follows requires_grad changing mid-run.
            raise ConfigError("freeze", ["freeze: top_layers, unfreeze and layer_lr_decay run on one process only "
                                         f"(this launch has {world}); remove them or launch one process"])
        if plan.needs_optimizer:
            trainer.optimizer = make_optimizer(trainer, plan)
        trainer.add_callback(Freezer(plan, log))
    if cfg.early_stopping.enabled:
        es = cfg.early_stopping
        trainer.add_callback(EarlyStopping(es.patience, es.threshold, log=str(log)))
    if trainer.args.neftune_noise_alpha is not None and trainer.args.padding_free:
        # transformers' hook scales noise by the row length; a padding-free row holds a whole batch.
        trainer.add_callback(PackedNEFTune(trainer.model, trainer.args.neftune_noise_alpha))
        trainer.neftune_noise_alpha = None  # so Trainer.train does not add its own hook as well


def _emit(log: str | Path | None, state, record: dict, line: str) -> None:
    """Print a pipeline line and append the record to log.jsonl (main process only)."""
    if not state.is_world_process_zero:
        return
    print(f"[peft-pipeline] {line}", flush=True)
    if log:
        from peft_pipeline.rundir import append_log

        append_log(Path(log), state, record)


class Freezer(TrainerCallback):
    """Sets requires_grad per the unfreezing schedule at train start (and resume), each epoch and each step."""

    def __init__(self, plan: Plan, log: Path | None = None):
        self.plan, self.log = plan, log
        self.current: int | None = None
        self.history: list[dict] = []

    def _update(self, state, why: str) -> None:
        # Epochs completed so far; state.epoch is fractional and may be 0.9999... at an epoch boundary.
        epochs = math.floor((state.epoch or 0) + 1e-6)
        k = self.plan.layers_at(state.global_step, epochs)
        if k == self.current:
            return
        self.plan.apply(k)
        self.current = k
        info = self.plan.describe(k)
        self.history.append({"step": state.global_step, **info})
        where = f"layers {info['layers'][0]}-{info['layers'][1]}" if info["layers"] else "no layer"
        _emit(self.log, state, {"event": "trainable", "why": why, **info},
              f"trainable: {info['trainable_params']:,} of {info['total_params']:,} parameters ({where}) at step {state.global_step}")

    def on_train_begin(self, args, state, control, **kwargs):
        self.current = None  # a resumed run re-applies the state of its step
        self._update(state, "resumed" if state.global_step else "start")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._update(state, "unfreeze")

    def on_step_begin(self, args, state, control, **kwargs):
        self._update(state, "unfreeze")


class EarlyStopping(EarlyStoppingCallback):
    """transformers' EarlyStoppingCallback that says why it stopped (stdout, log.jsonl, metrics.json)."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0, log: str | None = None):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.log = log
        self.stopped: dict | None = None
        self.evaluations = 0
        self.training = False

    def state(self) -> dict:
        # All constructor args, so transformers can rebuild it on resume (restore_callback_states_from_checkpoint).
        out = super().state()
        out["args"]["log"] = self.log
        out["attributes"].update(evaluations=self.evaluations)
        return out

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = state.stateful_callbacks.get(type(self).__name__) if isinstance(state.stateful_callbacks, dict) else None
        if isinstance(saved, dict):  # resumed: count patience from where the checkpoint left it
            for key, value in saved.get("attributes", {}).items():
                setattr(self, key, value)
        self.training = True

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if not self.training:
            return  # the final evaluation after training is not a stopping decision
        # The trainer updates its best after the callbacks: these are the values this evaluation is compared to.
        ref, ref_step = state.best_metric, state.best_global_step
        super().on_evaluate(args, state, control, metrics, **kwargs)
        self.evaluations += 1
        # should_training_stop alone may also mean the last step was reached; the counter says it was patience.
        if self.early_stopping_patience_counter < self.early_stopping_patience or self.stopped is not None:
            return
        name = args.metric_for_best_model if args.metric_for_best_model.startswith("eval_") else f"eval_{args.metric_for_best_model}"
        value = metrics.get(name)
        better = (value > ref) if args.greater_is_better else (value < ref)
        # Better by no more than the threshold does not reset patience, but the trainer keeps it as its best.
        best, best_step = (value, state.global_step) if better else (ref, ref_step)
        self.stopped = {"step": state.global_step, "metric": name, "value": value, "best_metric": best, "best_step": best_step,
                        "patience": self.early_stopping_patience, "threshold": self.early_stopping_threshold}
        n = self.early_stopping_patience
        reason = (f"early stop at step {state.global_step}: {name} {value:.4f} has not improved on {ref:.4f} (step {ref_step}) "
                  f"by more than {self.early_stopping_threshold:g} for {n} evaluation{'s' if n != 1 else ''} (patience {n})")
        self.stopped["reason"] = reason
        _emit(self.log, state, {"event": "early_stop", **self.stopped}, reason)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        if args.load_best_model_at_end and state.best_model_checkpoint:
            _emit(None, state, {}, f"restored the best checkpoint {Path(state.best_model_checkpoint).name} "
                                   f"({args.metric_for_best_model} {state.best_metric:.4f})")


def segment_lengths(position_ids, shape) -> Any:
    """Per token, the length of the example it belongs to in a padding-free row (positions restart at 0).

    Without position ids (or with another shape), every token gets the row length, as transformers does.
    """
    import torch

    b, t = shape
    if position_ids is None or tuple(position_ids.shape) != (b, t):
        return torch.full((b, t), t, dtype=torch.float32)
    starts = position_ids == 0
    starts[:, 0] = True
    seg = torch.cumsum(starts.flatten().long(), 0) - 1
    return torch.bincount(seg)[seg].view(b, t).float()


class PackedNEFTune(TrainerCallback):
    """NEFTune noise scaled per example in padding-free rows.

    NEFTune adds uniform noise of magnitude alpha / sqrt(L * d) to the input embeddings, L being the
    example's length. transformers' hook takes L from the row width, which in a padding-free batch is
    the whole batch concatenated: the noise would shrink by ~sqrt(examples per batch). Here L is each
    token's own example length, read from the position ids (they restart at 0 at each example).
    """

    def __init__(self, model, alpha: float):
        self.model, self.alpha = model, alpha
        self.position_ids = None
        self.handles: list = []

    def _grab(self, module, args, kwargs):
        self.position_ids = kwargs.get("position_ids")

    def _noise(self, module, inputs, output):
        import torch

        if not module.training:
            return output
        lengths = segment_lengths(self.position_ids, output.shape[:2]).to(output.device)
        magnitude = (self.alpha / torch.sqrt(lengths * output.size(-1))).unsqueeze(-1).to(output.dtype)
        return output + (torch.rand_like(output) * 2 - 1) * magnitude

    def on_train_begin(self, args, state, control, **kwargs):
        self.handles = [self.model.register_forward_pre_hook(self._grab, with_kwargs=True),
                        self.model.get_input_embeddings().register_forward_hook(self._noise)]

    def on_train_end(self, args, state, control, **kwargs):
        for h in self.handles:
            h.remove()
        self.handles = []


def summary(trainer) -> dict[str, Any]:
    """For metrics.json: why training stopped, the best checkpoint, and each trainable-count change."""
    out: dict[str, Any] = {}
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, EarlyStopping):
            out["early_stopping"] = {"stopped_early": cb.stopped is not None, "evaluations": cb.evaluations, **(cb.stopped or {})}
            out["best_checkpoint"] = trainer.state.best_model_checkpoint
            out["best_metric"] = trainer.state.best_metric
            out["best_restored"] = bool(trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint)
        if isinstance(cb, Freezer):
            out["trainable_changes"] = cb.history
    return out
