"""Every TrainerCallback the pipeline adds to a trainer: log lines, guards, data epochs, sweep trials.

Imports transformers at the top (a callback class needs its base class), so only the code that
builds a trainer imports this module, inside its functions; the CLI and the config never do.
Controls that change what trains (freezing, early stopping, NEFTune) live in controls.py.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from peft_pipeline import rundir
from peft_pipeline.errors import UserError


class JsonlLogger(TrainerCallback):
    """Appends every trainer log (loss, lr, grad norm, eval metrics) as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            rundir.append_log(self.path, state, logs)


class Guard(TrainerCallback):
    """Stops on a NaN/inf loss or gradient norm without saving the bad state; checks disk before saves."""

    def __init__(self, run: Path):
        self.run = run
        self.bad: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.bad = f"{key} became {value} at step {state.global_step}"
                control.should_training_stop = True
                control.should_save = False  # never checkpoint non-finite weights
                control.should_evaluate = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and state.is_world_process_zero and model is not None:
            import shutil

            trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            need = 4 * trainable + 50_000_000  # weights + Adam moments (+ margin for RNG/scheduler/tokenizer)
            free = shutil.disk_usage(self.run).free
            if free < need:
                raise DiskFull(f"{self.run}: {free / 1e9:.2f} GB free, a checkpoint needs about {need / 1e9:.2f} GB; "
                               "free space or set output_dir on a larger disk")

    def raise_if_stopped(self) -> None:
        """After training: turn a non-finite stop into a user-facing error naming the last good checkpoint."""
        if self.bad:
            ckpts = sorted((self.run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            last = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was saved before it"
            raise UserError(f"training stopped: {self.bad}; {last}; lower training.learning_rate or set "
                            "training.max_grad_norm, then --resume")


class DiskFull(UserError):
    """Not enough free disk for the next checkpoint."""


class EpochCallback(TrainerCallback):
    """Tells the AugmentedDataset which epoch the trainer is in, and checks the DataLoader still reads it."""

    def __init__(self, dataset):
        self.shared = dataset._shared

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        from peft_pipeline.data.augment import AugmentedDataset

        dataset = getattr(train_dataloader, "dataset", None)
        if train_dataloader is not None and not isinstance(dataset, AugmentedDataset):
            # Something (a TRL preparation step, a sampler wrapper) replaced the dataset: variations would be lost.
            raise RuntimeError(f"data.augment: the trainer reads a {type(dataset).__name__}, not the AugmentedDataset; "
                               "the variations would silently be lost")

    def on_epoch_begin(self, args, state, control, **kwargs):
        # TrainerState.epoch is the number of epochs done (k.0 when epoch k starts; the checkpoint's value on resume).
        self.shared.epoch = int(state.epoch or 0)


class TrialReporter(TrainerCallback):
    """Reports each evaluation to the Optuna trial and stops training when the pruner says so."""

    def __init__(self, trial, metric: str, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune
        self.final: dict[str, float] = {}  # the last evaluation's metrics (after training: the final one)
        self.pruned_at: int | None = None
        self.last_value: float | None = None
        self.reported: set[int] = set()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.final = dict(metrics or {})
        value = self.final.get(self.metric)
        # train() evaluates once more after training, at the step of the last periodic evaluation: report once
        if (not self.prune or self.pruned_at is not None or not isinstance(value, (int, float))
                or state.global_step in self.reported):
            return
        self.reported.add(state.global_step)
        self.last_value = value
        self.trial.report(value, state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True


class RetentionEval(TrainerCallback):
    """data.retention_eval: at each evaluation during training, the retention score joins the eval metrics.

    Adds eval_retention (prompts kept) and eval_retention_same (answers identical to the base's) to the
    metrics dict before the callbacks after it (early stopping, a sweep's trial reporter) and the
    trainer's best-checkpoint choice read it; the trainer has already logged that dict, so the values
    go to log.jsonl as their own line and into the logged evaluation in the trainer state. Must be the
    first callback (see `install`). The final evaluation after training is left to the end-of-run check.
    Under several processes the main process asks (tracker) and the others (tracker None) receive its
    scores, so early stopping and the best checkpoint decide the same on every rank.
    """

    def __init__(self, tracker, model, log: Path):
        self.tracker, self.model, self.log = tracker, model, log
        self.training = False

    @classmethod
    def install(cls, trainer, tracker, log: Path) -> None:
        """Put it ahead of every other callback, so they see the retention metrics."""
        cb = cls(tracker, trainer.accelerator.unwrap_model(trainer.model), log)
        trainer.callback_handler.callbacks.insert(0, cb)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.training or metrics is None:
            return
        result = shared(self.tracker.score(self.model) if self.tracker is not None else None)
        if result is None:
            return
        scores = {"eval_retention": result["kept"], "eval_retention_same": result["same"]}
        metrics.update(scores)
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1].update(scores)
        if state.is_world_process_zero:
            rundir.append_log(self.log, state, {**scores, "retention_lost": result["lost"]})
            print(f"[peft-pipeline] step {state.global_step}: retention {result['kept']}/{result['base']} kept, "
                  f"{result['same']}/{result['n']} answers as the base's", flush=True)


def shared(value):
    """The main process's value on every process (itself when there is one process)."""
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
