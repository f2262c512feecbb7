"""The run's schema: one YAML, typed sections, every problem reported at once.

A config is read in three steps, none of which loads a model:
1. `load_yaml` + `apply_overrides`: YAML (safe loader, no object-building tags) and `key.sub=value`
   overrides from the command line, each value parsed as a YAML scalar.
2. `RunConfig` (pydantic): types, ranges, unknown keys with a did-you-mean.
3. `check_semantics`: combinations that cannot work, and the `training:` section checked key by key
   against the training method's TRL config class (`method: sft` -> trl.SFTConfig, dpo -> trl.DPOConfig,
   ...: METHOD_CONFIGS), which it maps one-to-one onto.
All problems from a step are gathered into one `ConfigError` (exit code 2) that names each key
path and, where known, the YAML line.
"""

from __future__ import annotations

import difflib
import re
import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peft_pipeline.errors import UserError
from peft_pipeline.paths import EMBEDDED_BASE

DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
# Rows for the preference and RL methods (data/preference.py): pairs, unpaired rated completions, prompts.
PREFERENCE_FORMATS = ("preference", "unpaired", "prompts")

# The training methods and the TRL config class `training:` maps onto for each ("module:Class").
# ORPO and CPO live under trl.experimental in TRL 1.x.
METHOD_CONFIGS = {
    "sft": "trl:SFTConfig",
    "dpo": "trl:DPOConfig",
    "kto": "trl:KTOConfig",
    "orpo": "trl.experimental.orpo:ORPOConfig",
    "cpo": "trl.experimental.cpo:CPOConfig",
    "grpo": "trl:GRPOConfig",
}
PAIR_METHODS = ("dpo", "kto", "orpo", "cpo")  # trained on preference data (KTO also on unpaired rows)
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")

# trl.SFTConfig fields that this pipeline sets itself from other sections; setting them under
# `training:` would be silently overridden, so it is an error that says where the knob lives.
TRAINING_OWNED = {
    "output_dir": "set the top-level `output_dir` (checkpoints go to <output_dir>/checkpoints)",
    "dataset_text_field": "the data section formats the text; see data.train[].format",
    "dataset_kwargs": "the pipeline tokenizes the data itself (see data:)",
    "completion_only_loss": "use data.train_on_prompt (false = loss on completions only)",
    "assistant_only_loss": "use data.train_on_prompt (false = loss on assistant turns only)",
    "model_init_kwargs": "use the model: and quantization: sections",
    "trust_remote_code": "use model.trust_remote_code",
    "chat_template_path": "use model.chat_template",
    "reward_weights": "set rewards[].weight",
}
# Fields users remember from older TRL versions, with what to do in this one.
TRAINING_REMOVED = {
    "max_prompt_length": "TRL 1.x has no such field; max_length caps prompt + completion (rows whose prompt alone "
                         "fills it are dropped, and the data stage counts them)",
}

# Defaults that differ from trl.SFTConfig's, each for a reason a user would ask about.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,  # TRL's 2e-5 suits full fine-tuning; LoRA wants ~10x more
    "logging_steps": 5,
    # gradient_checkpointing (~30% slower) is left unset: train/sft.py make_sft_config turns it on only on a GPU whose
    # memory the estimate for the longest micro-batch overflows. Set it to true/false to decide yourself.
    "padding_free": True,  # rows are flattened into one sequence (no pad tokens); false pads to the longest row
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,  # adapters are small, but optimizer states add up
    "seed": 42,
    "max_length": 1024,
}
# Of TRAINING_DEFAULTS, the keys a method's TRL config has no field for (SFT-only packing; GRPO
# caps completions with max_completion_length and has no max_length).
NOT_DEFAULTED = {"dpo": ("padding_free",), "kto": ("padding_free",), "orpo": ("padding_free",),
                 "cpo": ("padding_free",), "grpo": ("padding_free", "max_length")}


def training_defaults(method: str = "sft") -> dict[str, Any]:
    """TRAINING_DEFAULTS that apply to this method's TRL config."""
    return {k: v for k, v in TRAINING_DEFAULTS.items() if k not in NOT_DEFAULTED.get(method, ())}


class ConfigError(UserError):
    """Every problem found in a config, one per line, each with its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        n = len(problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''} in the config"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems), exit_code=2)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(_Section):
    """The base model."""

    name: str = EMBEDDED_BASE
    """Hub id, local directory, or 'smollm2-135m-instruct' (the embedded offline base)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; auto = bfloat16 on GPUs that support it, else float32."""
    attn_implementation: Literal["auto", "eager", "sdpa", "sdpa_varlen", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = "auto"
    """Attention kernel; auto = flash_attention_2 when installed on a GPU, else sdpa_varlen (SDPA within each
    packed document, model/attention.py); sdpa = transformers' SDPA with a dense mask over the pack."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust the repository."""
    chat_template: str | None = None
    """None: the tokenizer's own template; 'chatml': the named fallback; a path to a .jinja file, or the Jinja text itself."""
    allow_pickle: bool = False
    """Allow loading .bin/.pt (pickle) weights. Off: safetensors only, since pickle can run code."""


class QuantizationSection(_Section):
    """How the frozen base is stored during training (bitsandbytes)."""

    mode: Literal["none", "8bit", "4bit"] = "none"
    """none = LoRA on a full-precision base; 4bit = QLoRA."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 matches 16-bit quality in the QLoRA paper."""
    double_quant: bool = True
    """Quantize the quantization constants too (~0.4 bit/param saved)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the matmuls on dequantized weights; auto = the model dtype."""
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
    """4-bit storage dtype. Under FSDP it must equal compute_dtype so the weights can be sharded."""


class LoraSection(_Section):
    """The adapter (peft.LoraConfig)."""

    r: int = Field(16, gt=0)
    """Rank: higher gives more capacity and memory."""
    alpha: float = Field(32, gt=0)
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    """'all-linear' (every linear layer but the LM head) or module names such as [q_proj, v_proj]."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."""
    use_dora: bool = False
    """Weight-decomposed LoRA: often better at low rank, ~2x slower per step."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r), for large ranks."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "orthogonal"] = "default"
    """Adapter initialization; pissa/olora start from the principal components of the weights."""
    bias: Literal["none", "all", "lora_only"] = "none"
    layers_to_transform: int | str | list[int | str] | None = None
    """Only put adapters on these decoder layers (None = all): indices and inclusive ranges, e.g. [0, "10-15"] or "20-29"."""
    final_scale: float = Field(1.0, gt=0, le=1)
    """After training, the adapter's update is multiplied by this (saved as lora_alpha x final_scale): below 1 it
    moves the trained model part of the way back to the base (weight-space interpolation, as WiSE-FT), which keeps
    more of what the base knew at a small cost to the task (docs/retention.md); `eval RUN --adapter-scale` measures
    a trained run's trade-off first. checkpoints/ keep the update as trained."""

    @field_validator("layers_to_transform")
    @classmethod
    def _check_layer_spec(cls, v):
        layer_indices(v)  # raises ValueError on a malformed range; the value is kept as written
        return v

    @property
    def layer_indices(self) -> list[int] | None:
        """layers_to_transform with ranges expanded: sorted unique indices (None = all layers)."""
        return layer_indices(self.layers_to_transform)


def layer_indices(spec: int | str | list[int | str] | None) -> list[int] | None:
    """Expand a layer spec (5, "0-5", [0, "10-15"]) into sorted unique indices; ValueError when malformed."""
    if spec is None:
        return None
    out: set[int] = set()
    for item in spec if isinstance(spec, list) else [spec]:
        if isinstance(item, int) and not isinstance(item, bool):
            if item < 0:
                raise ValueError(f"layer index {item} is negative")
            out.add(item)
            continue
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(item))
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"{item!r} is not a layer index or an inclusive range like '10-15'")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(out)


class DataSource(_Section):
    """One dataset source."""

    path: str
    """A .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk` directory, or a hub dataset id."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text",
                    "preference", "unpaired", "prompts"] = "auto"
    """auto = detected from the columns. preference (prompt/chosen/rejected), unpaired (prompt/completion/label)
    and prompts (prompt [+ answer]) are the rows of method: dpo/orpo/cpo/kto/grpo."""
    split: str = "train"
    """Split to read from a hub dataset or a saved DatasetDict."""
    name: str | None = None
    """Hub dataset configuration name."""
    columns: dict[str, str] = {}
    """Renames applied before format detection: {their_column: our_column}."""
    weight: float = Field(1.0, gt=0)
    """Row multiplier in a mixture: 0.5 keeps a seeded half, 2.0 repeats every row twice."""
    max_samples: int | None = Field(None, gt=0)
    """Keep at most this many rows (a seeded sample), applied before `weight`."""
    streaming: bool = False
    """Hub datasets only: read rows as they arrive instead of downloading the dataset first; with
    max_samples, reading stops after the first max_samples rows (a stream cannot be sampled)."""


def _as_sources(value: Any) -> Any:
    # `train: data/x.jsonl` and `train: [a.jsonl, b.jsonl]` are shorthand for {path: ...} sources.
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class AugmentSection(_Section):
    """On-the-fly variations of the training rows (data/augment.py): a different variant each epoch, reproducible.

    Row i in epoch e gets the variant drawn from Random(seed, e, i) (seed = training.seed), so a rerun or
    a resumed run sees the same inputs. Only prompts change: answers and loss masks stay as they were.
    """

    enabled: bool = False
    """Off by default: training sees every row exactly as written."""
    probability: float = Field(0.5, gt=0, le=1)
    """Chance that a row is varied in a given epoch; otherwise it is used as written."""
    system_prompts: list[str] = []
    """System messages to pick from for rows without their own ('' = no system message); [] leaves them alone."""
    instruction_templates: list[str] = []
    """Alpaca user-turn layouts with {instruction} and optionally {input} (used for rows with an input); literal braces doubled."""
    shuffle_fields: bool = False
    """Reorder the keys of a prompt that is a JSON object (an alpaca input or a whole user turn); the JSON stays equal."""


class ReplaySection(_Section):
    """General instruction rows mixed into training so the model keeps rehearsing what it knew (data/build.py)."""

    fraction: float = Field(gt=0, lt=1)
    """Share of the training mixture that is replay: 0.2 = one replay row per four task rows (seeded sample,
    rows repeated when the replay set is smaller than needed)."""
    path: str = "bundled"
    """'bundled' (peft_pipeline/resources/replay-general.jsonl, ~350 templated general Q&A rows), 'self' (the
    bundled questions with the base's own answers, generated before training and cached; method sft), or a dataset path."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"] = "auto"
    """Row format of `path` (auto = detected from the columns)."""

    def rows_for(self, n_task: int) -> int:
        """Replay rows to mix with `n_task` task rows so that they are `fraction` of the whole."""
        return round(self.fraction * n_task / (1 - self.fraction))


def _as_replay(value: Any) -> Any:
    # `replay: 0.2` is shorthand for {fraction: 0.2} (the bundled set).
    return {"fraction": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class DataSection(_Section):
    """What to train and validate on, and how it becomes tokens."""

    train: list[DataSource] = []
    """Training sources (a path, a list of paths, or a list of {path, format, ...})."""
    eval: list[DataSource] = []
    """Validation sources; when empty, `val_fraction` of train is held out (seeded)."""
    test: str | None = None
    """Prompts with expected answers (JSONL) for generation eval (`peft-pipeline eval`)."""
    val_fraction: float = Field(0.0, ge=0, lt=1)
    """Held-out share of train when no eval source is given."""
    train_on_prompt: bool = False
    """False: loss on assistant/completion tokens (and their end-of-turn) only."""
    overlong: Literal["drop", "truncate"] = "drop"
    """Examples longer than training.max_length: drop them, or cut them (both counted and reported)."""
    system_prompt: str | None = None
    """System message for rows that have none (None: the chat template's own default)."""
    cache: bool = True
    """Reuse tokenized data from the cache when files, tokenizer and settings are unchanged."""
    num_proc: int | None = Field(None, ge=1)
    """Processes that tokenize (null: the CPU cores this process may use, at most 8). Small data
    (under 5,000 rows a process) uses fewer; the result is the same for any value."""
    augment: AugmentSection = AugmentSection()
    """Prompt variations during training (off by default)."""
    retention: str | None = "auto"
    """Forgetting check (evaluate/retention.py): before training the base answers these general prompts
    (saved as retention-reference.jsonl in the run), after training the model is scored against them.
    A JSONL file of {prompt, expected?}, 'bundled' or 'auto' (both: the bundled set); null: off."""
    retention_eval: bool = False
    """Also score retention at every evaluation during training (eval_retention = prompts kept, in log.jsonl),
    so early_stopping.metric and sweeps can use it. Costs one generation pass per evaluation."""
    replay: ReplaySection | None = None
    """Mix general rows into training against forgetting: a fraction (0.2, the bundled set) or
    {fraction, path, format}; null: off."""

    _coerce_train = field_validator("train", "eval", mode="before")(classmethod(lambda cls, v: _as_sources(v)))
    _coerce_replay = field_validator("replay", mode="before")(classmethod(lambda cls, v: _as_replay(v)))


class ClassificationSection(_Section):
    """task: classification: a new head on the base that maps a text column to one label (train/classify.py)."""

    text_column: str = "text"
    """Column holding the text to classify (rename others with data.train[].columns)."""
    label_column: str = "label"
    """Column holding the label: a string or an integer per row."""
    labels: list[str] | None = None
    """The classes, in head order; None = the sorted distinct labels of the training data."""
    eval_before: bool = True
    """Also score the untrained head (base + new head = chance) on the eval split, for a before/after."""


class EarlyStoppingSection(_Section):
    """Validation monitoring: stop when a metric stops improving, keep the best checkpoint (train/controls.py)."""

    patience: int | None = Field(None, ge=1)
    """Evaluations in a row without improvement before training stops; None = early stopping off."""
    metric: str = "eval_loss"
    """Eval metric to watch (the eval_ prefix is optional): eval_loss, or one a compute_metrics adds."""
    threshold: float = Field(0.0, ge=0)
    """Smallest change over the best value that counts as an improvement (absolute, in the metric's unit)."""
    greater_is_better: bool | None = None
    """None = inferred from the name: lower is better for loss/perplexity metrics, higher for the others."""
    restore_best: bool = True
    """At the end, load the best checkpoint: adapter/ and the final eval are the best, not the last."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate and checkpoint every N steps; None = training.eval_steps, else training.save_steps."""

    @property
    def enabled(self) -> bool:
        """Whether early stopping is on."""
        return self.patience is not None

    @property
    def higher_is_better(self) -> bool:
        """greater_is_better, or inferred from the metric's name."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not any(word in self.metric.lower() for word in ("loss", "perplexity", "ppl"))

    def trainer_args(self, training: dict[str, Any]) -> dict[str, Any]:
        """The trl.SFTConfig values early stopping needs (empty when off).

        Checkpoints are saved at every evaluation (save_steps = eval_steps) because transformers can
        restore only a step that has both a metric and a checkpoint.
        """
        if not self.enabled:
            return {}
        every = self.eval_steps or training.get("eval_steps") or training.get("save_steps") or TRAINING_DEFAULTS["save_steps"]
        return {"eval_strategy": "steps", "save_strategy": "steps", "eval_steps": every, "save_steps": every,
                "metric_for_best_model": self.metric, "greater_is_better": self.higher_is_better,
                "load_best_model_at_end": self.restore_best}


class UnfreezeStep(_Section):
    """One step of a gradual-unfreezing schedule: from `step` (or `epoch`) on, the top `layers` layers train."""

    step: int | None = Field(None, ge=1)
    """After this many optimizer steps (set step or epoch, not both)."""
    epoch: int | None = Field(None, ge=1)
    """After this many whole epochs."""
    layers: int = Field(gt=0)
    """Number of top decoder layers trainable from then on."""

    @model_validator(mode="after")
    def _one_trigger(self):
        if (self.step is None) == (self.epoch is None):
            raise ValueError("set exactly one of step or epoch")
        return self


class FreezeSection(_Section):
    """Which layers train, and when: top layers only, gradual unfreezing, per-layer rates (train/controls.py)."""

    method: Literal["lora", "top_layers"] = "lora"
    """lora: adapters as in the lora section. top_layers: no adapter; the top `top_layers` decoder layers
    are fine-tuned in full and everything else (embeddings included) stays frozen; for small models."""
    top_layers: int | None = Field(None, gt=0)
    """Decoder layers trainable at the start, counted from the top (None = all). With lora, adapters
    below them stay frozen until a schedule step unfreezes them. Required for method top_layers."""
    train_head: bool = False
    """top_layers: also train the final norm and the LM head (tied to the input embeddings in many
    small models, which then train too)."""
    unfreeze: list[UnfreezeStep] = []
    """Gradual unfreezing: [{step: 100, layers: 8}, {step: 200, layers: 16}] or with epoch: instead of step."""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """Discriminative rates: a layer k below the top one trains at learning_rate * decay**k; the head at
    learning_rate, trained embeddings at learning_rate * decay**num_layers. 1.0 = one rate."""

    @property
    def active(self) -> bool:
        """Whether any freezing control is set (the lora defaults alone are not one)."""
        return self.method != "lora" or self.top_layers is not None or bool(self.unfreeze) or self.layer_lr_decay != 1.0

    @property
    def weights_dir(self) -> str:
        """Run-dir subfolder of the trained weights: adapter/ (a PEFT adapter) or model/ (a full model)."""
        return "model" if self.method == "top_layers" else "adapter"


class RewardSpec(_Section):
    """One GRPO reward (evaluate/rewards.py): a built-in verifiable reward, or a Python function by import path."""

    kind: Literal["exact_match", "json_valid", "json_fields", "json_values", "regex", "length", "python"]
    """exact_match: 1 when the completion equals the row's answer (whitespace-trimmed); json_valid: 1 for a JSON
    object; json_fields: 1 when it is a JSON object with the answer's keys; json_values: the share of the answer's
    fields whose value it gets right (partial credit); regex: 1 when `pattern` matches;
    length: -(tokens over max_tokens)/max_tokens; python: `function`."""
    weight: float = 1.0
    """This reward's weight in the sum GRPO normalizes per prompt group (trl reward_weights)."""
    name: str | None = None
    """Name in the logs (rewards/<name>/mean); default: the kind, or the function's name."""
    pattern: str | None = None
    """regex: the pattern searched for in the completion."""
    max_tokens: int | None = Field(None, gt=0)
    """length: completions longer than this many tokens are penalized in proportion."""
    function: str | None = None
    """python: 'package.module:function' (or 'package.module.function'), called as TRL calls a reward:
    f(prompts, completions, completion_ids, **columns) -> list[float | None]."""

    @property
    def label(self) -> str:
        """The name logged for this reward."""
        if self.name:
            return self.name
        if self.kind == "python" and self.function:
            return re.split(r"[:.]", self.function)[-1]
        return self.kind


class RunConfig(_Section):
    """A whole run. YAML keys equal these field names."""

    task: Literal["causal_lm", "classification"] = "causal_lm"
    """causal_lm: instruction/chat fine-tuning (SFT). classification: a new sequence-classification head
    (trained in full) with LoRA on the body; see the classification section."""
    method: Literal["sft", "dpo", "kto", "orpo", "cpo", "grpo"] = "sft"
    """How a causal LM trains: sft (demonstrations), dpo/orpo/cpo (preference pairs), kto (pairs or rated
    completions), grpo (prompts + rewards). `training:` maps onto the method's TRL config (METHOD_CONFIGS)."""
    init_from: str | None = None
    """A finished run directory whose adapter/ training starts from (e.g. an SFT run before DPO); it must
    have been trained on the same base. For dpo/kto the reference is then that adapter, not the bare base."""
    rewards: list[RewardSpec] = []
    """method: grpo: the rewards each completion is scored with (see RewardSpec)."""
    model: ModelSection = ModelSection()
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    early_stopping: EarlyStoppingSection = EarlyStoppingSection()
    """Evaluate every N steps, stop after `patience` evaluations without improvement, keep the best."""
    freeze: FreezeSection = FreezeSection()
    """Layer selection for training: top layers only, gradual unfreezing, layer-wise learning rates."""
    classification: ClassificationSection = ClassificationSection()
    """Settings for task: classification (ignored otherwise)."""
    training: dict[str, Any] = {}
    """Any field of the method's TRL config (trl.SFTConfig for sft, trl.DPOConfig for dpo, ...); unset ones
    take TRAINING_DEFAULTS (those that apply to the method), then TRL's."""
    output_dir: str = "runs/run"
    """The run directory: adapter/, config.yaml, metrics.json, log.jsonl, checkpoints/."""

    @property
    def sft_args(self) -> dict[str, Any]:
        """The keyword arguments for the method's TRL config (trl.SFTConfig for sft): our defaults under the user's."""
        args = {**training_defaults(self.method), **self.training, **self.early_stopping.trainer_args(self.training)}
        args["output_dir"] = str(Path(self.output_dir) / "checkpoints")
        return args

    @property
    def max_length(self) -> int | None:
        """Longest tokenized example (training.max_length)."""
        return self.sft_args.get("max_length")

    @property
    def seed(self) -> int:
        """One seed for the split, sampling and training."""
        return int(self.sft_args.get("seed", 42))

    @property
    def eval_requested(self) -> bool:
        """Whether the trainer will evaluate during training."""
        strategy = str(self.sft_args.get("eval_strategy", "no")).lower().split(".")[-1]
        return strategy != "no" or bool(self.sft_args.get("load_best_model_at_end"))

    def to_yaml(self) -> str:
        """The resolved config as YAML, enough to re-run (training defaults written out)."""
        data = self.model_dump(mode="json")
        data["training"] = {**training_defaults(self.method), **self.training}
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false.

    YAML 1.1 reads `no`, `off`, `yes` and `on` as booleans, so `eval_strategy: no` (a TRL value)
    would arrive as False. Here they stay the strings the user wrote.
    """


_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.1 needs a dot in a float, so `learning_rate: 1e-4` would arrive as the string "1e-4" and
# fail deep inside the optimizer; YAML 1.2 (and every user) reads it as a number. Integers still
# match the int resolver first.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Read a YAML config safely; return the mapping and a {key path: line} index for messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found", exit_code=2)
    text = path.read_text(encoding="utf-8", errors="strict") if path.stat().st_size < 10_000_000 else None
    if text is None:
        raise UserError(f"{path}: config file is larger than 10 MB; is this the right file?", exit_code=2)
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: {e.problem} (YAML tags that build objects are refused)", exit_code=2) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        ctx = getattr(e, "context_mark", None)
        started = f" (in the block that starts at line {ctx.line + 1})" if ctx and mark and ctx.line != mark.line else ""
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}{started}", exit_code=2) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of sections (model:, data:, ...)", exit_code=2)
    return data, _line_index(node)


def _line_index(node, prefix: tuple = ()) -> dict[tuple, int]:
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            lines[path] = key.start_mark.line + 1
            lines.update(_line_index(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            lines[prefix + (i,)] = value.start_mark.line + 1
            lines.update(_line_index(value, prefix + (i,)))
    return lines


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are YAML scalars (`true`, `5`, `[q_proj]`, `null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}': expected key.sub=value, e.g. training.max_steps=5", exit_code=2)
        try:
            value = yaml.load(raw, Loader=_Loader) if raw != "" else ""  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested mapping, creating (or replacing non-mapping) parents on the way."""
    node = data
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load, override and validate a config; raise one ConfigError listing every problem."""
    data, lines = load_yaml(path)
    data = apply_overrides(data, list(overrides))
    problems = _schema_problems(data, lines, str(path))
    if problems:
        raise ConfigError(str(path), problems)
    cfg = RunConfig.model_validate(data)
    problems = check_semantics(cfg, lines, str(path))
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate an in-memory config (tests, run dirs) with the same checks as a file."""
    problems = _schema_problems(data, {}, source)
    if problems:
        raise ConfigError(source, problems)
    cfg = RunConfig.model_validate(data)
    problems = check_semantics(cfg, {}, source)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _where(lines: dict[tuple, int], source: str, loc: tuple) -> str:
    key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    line = lines.get(tuple(loc))
    return f"{key} (line {line})" if line else key


def _schema_problems(data: dict[str, Any], lines: dict[tuple, int], source: str) -> list[str]:
    try:
        RunConfig.model_validate(data)
        return []
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
            # pydantic reports union alternatives separately ("str" then "list[str]"); one is enough.
            loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "list", "dict"))))
            where = _where(lines, source, loc)
            if err["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown key{_did_you_mean(loc, data)}")
            else:
                problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        return list(dict.fromkeys(problems))


def _did_you_mean(loc: tuple, data: dict[str, Any]) -> str:
    *parent, name = loc
    model: type[BaseModel] | None = RunConfig
    for part in parent:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        model = _model_of(ann)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(name), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (allowed: {', '.join(model.model_fields)})"


def _model_of(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_of(arg)
        if found:
            return found
    return None


# --------------------------------------------------------------------------- semantics


def check_semantics(cfg: RunConfig, lines: dict[tuple, int] = {}, source: str = "<config>") -> list[str]:
    """Combinations that cannot work, found without loading any weights."""
    problems: list[str] = []

    def add(loc: tuple, msg: str) -> None:
        problems.append(f"{_where(lines, source, loc)}: {msg}")

    q, lora, data = cfg.quantization, cfg.lora, cfg.data
    if q.mode != "none" and importlib.util.find_spec("bitsandbytes") is None:
        add(("quantization", "mode"), f"{q.mode} needs bitsandbytes; install it with `pip install bitsandbytes` or set mode: none")
    if lora.init == "loftq" and q.mode != "none":
        add(("lora", "init"), "loftq quantizes the full-precision base itself; set quantization.mode: none")
    if lora.init in ("pissa", "olora") and q.mode == "8bit":
        add(("lora", "init"), f"{lora.init} needs float or 4-bit base weights; use quantization.mode: none or 4bit")
    if lora.use_dora and q.mode == "8bit":
        add(("lora", "use_dora"), "DoRA is not supported on 8-bit bitsandbytes layers; use quantization.mode: 4bit or none")
    if lora.layers_to_transform is not None and isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        add(("lora", "layers_to_transform"), "needs target_modules as a list of names (or all-linear)")
    if not data.train:
        add(("data", "train"), "no training data; set data.train to a .jsonl file (e.g. data/orders/train.jsonl)")
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(data, section)):
            if _looks_local(src.path) and not Path(src.path).exists():
                add(("data", section, i, "path"), f"{src.path} does not exist")
    if data.test and not Path(data.test).exists():
        add(("data", "test"), f"{data.test} does not exist")
    problems += _augment_problems(cfg, lines, source)
    if data.retention not in (None, "auto", "bundled") and not Path(data.retention).expanduser().is_file():
        add(("data", "retention"), f"{data.retention} does not exist; give a JSONL file of {{prompt, expected}}, "
                                   "'bundled', 'auto' or null")
    problems += [f"{_where(lines, source, loc)}: {msg}" for loc, msg in _forgetting_problems(cfg)]
    if cfg.eval_requested and not data.eval and data.val_fraction == 0:
        asked_by = ("early_stopping", "patience") if cfg.early_stopping.enabled else ("training", "eval_strategy")
        add(asked_by, "evaluation requested but there is no eval data; set data.eval or data.val_fraction")
    problems += _control_problems(cfg, lines, source)
    if (cfg.model.chat_template not in (None, "chatml") and not Path(cfg.model.chat_template).is_file()
            and not any(tag in cfg.model.chat_template for tag in ("{%", "{{"))):  # inline Jinja is a template too
        add(("model", "chat_template"), f"{cfg.model.chat_template!r} is neither 'chatml' nor an existing .jinja file")
    if cfg.task == "classification":
        problems += _classification_problems(cfg, lines, source)
    problems += _method_problems(cfg, lines, source)
    problems += _training_problems(cfg.training, lines, source, cfg.method)
    return problems


def _final_scale_problem(cfg: RunConfig) -> str | None:
    """Why lora.final_scale below 1 cannot move this run's model back toward its base, or None."""
    lora = cfg.lora
    if lora.final_scale == 1:
        return None
    if cfg.freeze.method == "top_layers":
        return "scales a LoRA adapter's update, and freeze.method: top_layers trains the layers themselves; remove it"
    if lora.init in ("pissa", "olora", "loftq"):
        return (f"lora.init: {lora.init} changes the base weights it starts from, so a smaller adapter does not lead "
                "back to the base; use init: default or gaussian, or final_scale: 1")
    if cfg.task == "classification" or lora.modules_to_save:
        return ("modules trained in full (lora.modules_to_save, a classification head) have no adapter to scale; "
                "remove them or set final_scale: 1")
    return None


def _forgetting_problems(cfg: RunConfig) -> list[tuple[tuple, str]]:
    """(key path, problem) for data.retention_eval and data.replay settings that cannot work."""
    data, out = cfg.data, []
    if data.retention_eval and data.retention is None:
        out.append((("data", "retention_eval"), "needs a retention set; set data.retention (e.g. bundled) or retention_eval: false"))
    if data.retention_eval and not cfg.eval_requested:
        out.append((("data", "retention_eval"), "scores at evaluations, and this run has none; set training.eval_strategy: "
                                                "steps (and eval_steps) or early_stopping.patience"))
    problem = _final_scale_problem(cfg)
    if problem:
        out.append((("lora", "final_scale"), problem))
    if data.replay and (cfg.method != "sft" or cfg.task != "causal_lm"):
        out.append((("data", "replay"), f"replay mixes instruction rows into SFT; this run trains {cfg.task}/{cfg.method}; "
                                        "remove it"))
    if (data.replay and data.replay.path not in ("bundled", "self") and _looks_local(data.replay.path)
            and not Path(data.replay.path).exists()):
        out.append((("data", "replay", "path"), f"{data.replay.path} does not exist; give a dataset path, 'bundled' or 'self'"))
    return out


def _augment_problems(cfg: RunConfig, lines: dict[tuple, int], source: str) -> list[str]:
    """data.augment settings that would do nothing, or that the trainer would silently undo."""
    import string

    aug, problems = cfg.data.augment, []
    where = lambda *loc: _where(lines, source, ("data", "augment", *loc))  # noqa: E731
    for i, tmpl in enumerate(aug.instruction_templates):
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(tmpl) if name is not None}
        except ValueError as e:
            problems.append(f"{where('instruction_templates', i)}: {e} (write literal braces as {{{{ and }}}})")
            continue
        unknown = sorted(names - {"instruction", "input"})
        if unknown:
            close = difflib.get_close_matches(unknown[0], ["instruction", "input"], n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else " (use {instruction} and {input}; double literal braces)"
            problems.append(f"{where('instruction_templates', i)}: unknown placeholder {{{unknown[0]}}}{hint}")
        elif "instruction" not in names:
            problems.append(f"{where('instruction_templates', i)}: needs {{instruction}}, or the task disappears from the prompt")
    if not aug.enabled:
        return problems
    if not (aug.system_prompts or aug.instruction_templates or aug.shuffle_fields):
        problems.append(f"{where('enabled')}: nothing to vary; set system_prompts, instruction_templates or "
                        "shuffle_fields: true (or enabled: false)")
    args = cfg.sft_args
    if args.get("packing"):
        problems.append(f"{_where(lines, source, ('training', 'packing'))}: packing fixes every row's tokens before "
                        "training, so data.augment would vary nothing; set packing: false (padding_free keeps the speed)")
    if args.get("dataloader_persistent_workers"):
        problems.append(f"{_where(lines, source, ('training', 'dataloader_persistent_workers'))}: persistent workers "
                        "keep the first epoch's variants; set it to false with data.augment")
    return problems


# trl.SFTConfig fields a classification run has no use for (it trains with transformers.Trainer on
# padded batches); max_length is not among them: it caps the tokenized text.
SFT_ONLY_FIELDS = ("padding_free", "packing", "packing_strategy", "eval_packing", "pad_to_multiple_of",
                   "completion_only_loss", "assistant_only_loss", "loss_type", "activation_offloading",
                   "truncation_mode", "shuffle_dataset", "dataset_num_proc", "eos_token", "pad_token")


def _classification_problems(cfg: RunConfig, lines: dict[tuple, int], source: str) -> list[str]:
    """Settings that make no sense with task: classification, each with what to do instead."""
    out: list[str] = []

    def add(loc: tuple, msg: str) -> None:
        out.append(f"{_where(lines, source, loc)}: {msg}")

    c, data = cfg.classification, cfg.data
    if cfg.quantization.mode == "8bit":
        # 4-bit (QLoRA) is the tested path; 8-bit bitsandbytes layers are not exercised with a new head.
        add(("quantization", "mode"), "8bit is not supported with task: classification; use none or 4bit")
    if c.text_column == c.label_column:
        add(("classification", "label_column"), f"equals text_column ({c.text_column!r}); name two different columns")
    if c.labels is not None:
        if len(c.labels) < 2:
            add(("classification", "labels"), f"a classifier needs at least 2 labels, got {c.labels}")
        dupes = sorted({x for x in c.labels if c.labels.count(x) > 1})
        if dupes:
            add(("classification", "labels"), f"duplicate labels {dupes}; list each class once")
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(data, section)):
            if src.format != "auto":
                add(("data", section, i, "format"), f"'{src.format}' is an SFT format; classification reads "
                    "classification.text_column and label_column: remove format")
    if data.test:
        add(("data", "test"), "generation prompts do not apply to task: classification; the eval split is scored")
    if data.train_on_prompt:
        add(("data", "train_on_prompt"), "no prompt/answer split in classification; remove it")
    if data.system_prompt is not None:
        add(("data", "system_prompt"), "classification feeds the raw text (no chat template); remove it")
    for key, value in cfg.training.items():
        # a saved run config writes TRAINING_DEFAULTS out (padding_free: true); those values re-load
        if key in SFT_ONLY_FIELDS and (key not in TRAINING_DEFAULTS or value != TRAINING_DEFAULTS[key]):
            add(("training", key), "an SFT setting; task: classification trains with transformers.Trainer on "
                "padded batches: remove it")
    return out


def _control_problems(cfg: RunConfig, lines: dict[tuple, int], source: str) -> list[str]:
    """early_stopping: and freeze: against each other and the training section (model-dependent checks: train/controls.py)."""
    out: list[str] = []

    def add(loc: tuple, msg: str) -> None:
        out.append(f"{_where(lines, source, loc)}: {msg}")

    es, fr = cfg.early_stopping, cfg.freeze
    for key, value in es.trainer_args(cfg.training).items():
        if key not in cfg.training:
            continue
        mine, theirs = _plain(value), _plain(cfg.training[key])
        if key == "metric_for_best_model":
            mine, theirs = mine.removeprefix("eval_"), theirs.removeprefix("eval_")
        if mine != theirs:
            add(("training", key), f"{cfg.training[key]!r} conflicts with early_stopping, which sets {key}: {value!r}; "
                "remove it from training: (the evaluation interval is early_stopping.eval_steps)")
    if fr.method == "top_layers":
        if fr.top_layers is None:
            add(("freeze", "top_layers"), "method top_layers needs the number of top layers to fine-tune, e.g. top_layers: 4")
        if cfg.quantization.mode != "none":
            add(("freeze", "method"), "top_layers fine-tunes the base weights, which cannot be trained quantized; "
                "set quantization.mode: none")
    if fr.unfreeze and fr.top_layers is None:
        add(("freeze", "unfreeze"), "a schedule needs freeze.top_layers: the number of top layers that train from the start")
    for i, st in enumerate(fr.unfreeze):
        if fr.top_layers is not None and st.layers <= fr.top_layers:
            add(("freeze", "unfreeze", i, "layers"), f"{st.layers} does not unfreeze anything: top_layers is already "
                f"{fr.top_layers}; give more layers")
    if fr.train_head and fr.method != "top_layers":
        add(("freeze", "train_head"), "only for method top_layers; with lora train the head with lora.modules_to_save: [lm_head]")
    if fr.active and getattr(cfg, "task", "causal_lm") != "causal_lm":
        add(("freeze",), f"freezing controls apply to task: causal_lm only (this run is task: {cfg.task})")
    return out


# Over 50 lines by choice: one check per line, each with its fix, read as the list of what a method refuses.
def _method_problems(cfg: RunConfig, lines: dict[tuple, int], source: str) -> list[str]:
    """method:, init_from: and rewards: against each other and the other sections (no weights, no TRL import)."""
    out: list[str] = []

    def add(loc: tuple, msg: str) -> None:
        out.append(f"{_where(lines, source, loc)}: {msg}")

    m, data = cfg.method, cfg.data
    if m != "sft" and cfg.task != "causal_lm":
        add(("method",), f"{m} trains a causal LM; task: classification trains with method: sft only")
    if m != "sft":
        if cfg.freeze.active:
            add(("freeze",), f"method {m} trains a LoRA adapter, whose disabled state is the reference model; "
                "remove the freeze section")
        if data.augment.enabled:
            add(("data", "augment", "enabled"), "prompt variation applies to method: sft only; set it to false")
        if data.train_on_prompt:
            add(("data", "train_on_prompt"), f"method {m} scores completions only; remove it")
        heads = [t for t in (cfg.lora.modules_to_save + (cfg.lora.target_modules if isinstance(cfg.lora.target_modules, list) else []))
                 if t.endswith("lm_head")]
        if heads and m in ("dpo", "kto", "grpo"):
            add(("lora", "modules_to_save" if "lm_head" in cfg.lora.modules_to_save else "target_modules"),
                f"TRL's {m.upper()} computes log-probs from lm_head's weight directly and refuses an adapter on it; "
                "remove lm_head")
        for section in ("train", "eval"):
            for i, src in enumerate(getattr(data, section)):
                if src.format in DATA_FORMATS[1:] and not (m == "grpo" and src.format != "text"):
                    add(("data", section, i, "format"), f"'{src.format}' is an SFT format; method {m} reads "
                        f"{'preference or unpaired' if m == 'kto' else 'preference' if m != 'grpo' else 'prompts'} rows "
                        "(or format: auto)")
    else:
        for section in ("train", "eval"):
            for i, src in enumerate(getattr(data, section)):
                if src.format in PREFERENCE_FORMATS:
                    add(("data", section, i, "format"), f"'{src.format}' rows train with method: "
                        f"{'grpo' if src.format == 'prompts' else 'kto' if src.format == 'unpaired' else 'dpo, orpo, cpo or kto'}")
    if m == "grpo" and not cfg.rewards:
        add(("rewards",), "method grpo needs at least one reward, e.g. rewards: [{kind: exact_match}]")
    if m != "grpo" and cfg.rewards:
        add(("rewards",), f"rewards score generations for method: grpo; method {m} does not use them: remove them")
    for i, r in enumerate(cfg.rewards):
        if r.kind == "regex":
            if not r.pattern:
                add(("rewards", i, "pattern"), "a regex reward needs pattern: '...'")
            else:
                try:
                    re.compile(r.pattern)
                except re.error as e:
                    add(("rewards", i, "pattern"), f"not a valid regular expression ({e})")
        if r.kind == "length" and r.max_tokens is None:
            add(("rewards", i, "max_tokens"), "a length reward needs max_tokens: N (longer completions are penalized)")
        if r.kind == "python" and not r.function:
            add(("rewards", i, "function"), "a python reward needs function: 'package.module:function'")
    labels = [r.label for r in cfg.rewards]
    for dup in sorted({x for x in labels if labels.count(x) > 1}):
        add(("rewards",), f"two rewards are named {dup!r}; give one a name: so their logs stay apart")
    if m == "kto" and int(cfg.training.get("per_device_train_batch_size", 8)) < 2:
        add(("training", "per_device_train_batch_size"), "KTO estimates its KL term from the other rows of a batch; "
            "use 2 or more")
    if cfg.init_from is not None:
        out += _init_from_problems(cfg, lines, source)
    return out


def _init_from_problems(cfg: RunConfig, lines: dict[tuple, int], source: str) -> list[str]:
    """init_from must be a finished run (adapter/) on the same base, and not the run being written."""
    where = _where(lines, source, ("init_from",))
    run = Path(cfg.init_from).expanduser()
    if not (run / "adapter" / "adapter_config.json").is_file():
        return [f"{where}: {cfg.init_from} holds no adapter/adapter_config.json; give a finished run directory"]
    if run.resolve() == Path(cfg.output_dir).expanduser().resolve():
        return [f"{where}: is this run's own output_dir; start from another run"]
    if cfg.freeze.method != "lora" or cfg.task != "causal_lm":
        return [f"{where}: starts a LoRA adapter for a causal LM; remove it with freeze.method top_layers or classification"]
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return [f"{where}: {run}/config.yaml is missing or unreadable; cannot tell which base it was trained on"]
    theirs = (saved.get("model") or {}).get("name", EMBEDDED_BASE)
    if theirs != cfg.model.name:
        return [f"{where}: {run} was trained on model.name {theirs!r}, this run uses {cfg.model.name!r}; "
                "use the same base"]
    if (saved.get("task") or "causal_lm") != "causal_lm":
        return [f"{where}: {run} is a classification run; start from a causal-LM run"]
    return []


def _plain(value: Any) -> Any:
    """A training value as comparable text: enums and their strings ('IntervalStrategy.STEPS' -> 'steps')."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    return str(getattr(value, "value", value)).lower().split(".")[-1]


def _looks_local(path: str) -> bool:
    p = Path(path)
    return p.suffix in LOCAL_DATA_SUFFIXES or path.startswith((".", "/", "~")) or p.exists()


def method_config_class(method: str = "sft"):
    """The TRL config class `training:` maps onto for this method (imports trl, hence torch)."""
    import importlib
    import os

    module, name = METHOD_CONFIGS[method].split(":")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO/CPO: we know they are experimental
    return getattr(importlib.import_module(module), name)


def sft_config_fields(method: str = "sft") -> dict[str, Any]:
    """The method's TRL config fields by name (trl.SFTConfig's for sft; imports trl: call only when validating)."""
    import dataclasses

    return {f.name: f for f in dataclasses.fields(method_config_class(method)) if f.init}


def _training_problems(training: dict[str, Any], lines: dict[tuple, int], source: str, method: str = "sft") -> list[str]:
    from pydantic import TypeAdapter

    problems = []
    fields = sft_config_fields(method)
    cls = METHOD_CONFIGS[method].replace(":", ".")
    for key, value in training.items():
        where = _where(lines, source, ("training", key))
        if key in TRAINING_OWNED:
            problems.append(f"{where}: set by the pipeline; {TRAINING_OWNED[key]}")
            continue
        if key in TRAINING_REMOVED and key not in fields:
            problems.append(f"{where}: {TRAINING_REMOVED[key]}")
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" (see {cls} / transformers.TrainingArguments)"
            named = f" (method: {method})" if method != "sft" else ""
            problems.append(f"{where}: not a {cls} field{named}{hint}")
            continue
        annotation = fields[key].type
        if isinstance(annotation, str):
            continue  # postponed annotation we cannot evaluate safely; SFTConfig itself will check it
        try:
            TypeAdapter(annotation).validate_python(value, strict=False)
        except ValidationError as e:
            msg = e.errors()[0]["msg"]
            problems.append(f"{where}: {msg} (got {value!r})")
        except Exception:
            pass  # annotation pydantic cannot express (enums of classes...); SFTConfig checks it
    return problems
