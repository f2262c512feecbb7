"""Training under several processes: `accelerate launch --config_file launch/X.yaml -m peft_pipeline train`.

Two CPU processes over gloo stand in for two GPUs; the tiny random llama trains for a few steps.
What is checked, and how each rank is seen to take part:
- one run dir, every step logged once, metrics.json says world_size 2 / global batch 4;
- both ranks stepped: each rank writes its own RNG state into every checkpoint
  (rng_state_0.pth, rng_state_1.pth), and the non-padding tokens counted across ranks equal the
  whole training set after one epoch, which one rank alone (half of each global batch) cannot reach;
- 2 processes x batch B follow the loss trajectory of 1 process x batch 2B: Accelerate's
  BatchSamplerShard gives rank r batches r, r+2, ... of the one seeded shuffle, so a global step
  holds the same 2B examples as the one-process batch, and the loss is normalized by the tokens of
  all ranks, so the gradient is the same (measured: one fp32 ulp apart, see LOSS_TOL);
- resume under 2 processes continues the same trajectory;
- FSDP2 and DeepSpeed ZeRO (when installed) really shard on the CPU and save the whole adapter.

Each launch costs ~25-50 s on 2 cores (mostly two interpreters importing torch); the tests marked
`distributed` launch 4 times (+2 with DeepSpeed installed). The SLURM-script and placement tests
start no process and are not marked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_jsonl

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano",
         "lemon", "eagle", "frost", "amber", "cedar", "delta", "ember", "flint"]
ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in WORDS]
B = 2  # per-device batch under 2 processes; the one-process reference uses 2 * B
STEPS = 4  # = one epoch of 16 examples at a global batch of 4
# Measured here (2 cores, torch 2.13 CPU): per-step losses of 2 x B and 1 x 2B differ by at most
# 9.5e-7 (one fp32 ulp at 10.8) over 6 steps, resume included; adapter weights by at most 1.3e-6
# (DDP, FSDP2, ZeRO-2, ZeRO-3, ZeRO-3 offload; table in docs/scaling.md). Losses of different
# batches differ by 2e-3 to 2e-1, so a wrong batch composition cannot pass.
# The learning rate is 1e-2: at 5e-2 this tiny model's loss rises and Adam amplifies the one-ulp
# rounding differences of 1 vs 2 threads to 1e-3 by step 6.
LOSS_TOL = 1e-5
WEIGHT_TOL = 2e-5
# retention-reference.jsonl: the base's answers to the retention prompts, asked once before training (main process)
RUN_DIR_ENTRIES = {"adapter", "checkpoints", "config.yaml", "log.jsonl", "metrics.json", "plots", "report.md",
                   "retention-reference.jsonl"}

# Accelerate 1.15 enables FSDP and DeepSpeed only for GPU-type backends: on a CPU-only machine an
# fsdp2.yaml/zero*.yaml run silently trains as plain DDP. This driver lets the gloo CPU group pose
# as a GPU-type one (device pinned to the CPU) so that FSDP2 / ZeRO really shard the model, then
# runs the normal CLI. Test-only: on GPUs none of this is needed.
SHARDING_DRIVER = '''
import os, sys
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend

def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if int(os.environ.get("LOCAL_RANK", -1)) != -1 and kind in (DistributedType.NO, DistributedType.MULTI_CPU):
        return "gloo", DistributedType.MULTI_GPU
    return found, kind

PartialState._prepare_backend = prepare_backend
import peft_pipeline.train.hardware
peft_pipeline.train.hardware.runs_on_cpu = lambda cfg: False  # cpu=True would switch FSDP/ZeRO off again
from peft_pipeline.cli import main
sys.exit(main())
'''


def run_config(tmp: Path, base: Path, **training) -> dict:
    """A tiny run: dropout 0 and a constant LR, so trajectories compare step by step."""
    return {
        "model": {"name": str(base)},
        "lora": {"r": 4, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(write_jsonl(tmp / "train.jsonl", ROWS)),
                 "eval": str(write_jsonl(tmp / "eval.jsonl", ROWS[:4])), "cache": False},
        "training": {"max_steps": STEPS, "per_device_train_batch_size": B, "learning_rate": 1e-2,
                     "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 2,
                     "max_length": 128, "seed": 7, **training},
        "output_dir": str(tmp / "run"),
    }


def launch(tmp: Path, config_file: str, cfg: dict, *args: str, script: Path | None = None,
           extra: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/<config_file> -m peft_pipeline train CFG ARGS`, on the CPU."""
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    accelerate = Path(sys.executable).with_name("accelerate")  # the venv's `accelerate` command
    cmd = [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(REPO / "launch" / config_file), *extra]
    cmd += [str(script)] if script else ["-m", "peft_pipeline"]
    cmd += ["train", str(cfg_path), *args]
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PEFT_PIPELINE_NO_PROGRESS": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PEFT_PIPELINE_CACHE": str(tmp / "cache"), **(env or {})}
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def step_losses(run: Path) -> dict[int, float]:
    """{step: training loss} from log.jsonl; fails if a step was logged twice."""
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in steps if "loss" in r]
    assert len({s for s, _ in losses}) == len(losses), f"a step was logged twice: {losses}"
    return dict(losses)


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def assert_same_weights(a: dict, b: dict, tol: float = WEIGHT_TOL) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key].float(), b[key].float(), atol=tol, rtol=0), (key, (a[key] - b[key]).abs().max())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_base):
    """2 processes x batch 2 for 4 steps through launch/cpu-2proc.yaml, with the data cache on."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = run_config(tmp, tiny_base)
    cfg["data"]["cache"] = True  # rank 0 tokenizes and writes the cache, rank 1 waits and reads it
    result = launch(tmp, "cpu-2proc.yaml", cfg)
    return tmp, Path(cfg["output_dir"]), result


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_base):
    """1 process x batch 4 for 6 steps, in this process (the plain `peft-pipeline train` path)."""
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    tmp = tmp_path_factory.mktemp("one")
    cfg = run_config(tmp, tiny_base, per_device_train_batch_size=2 * B, max_steps=6, save_steps=STEPS)
    return train(config_from_dict(cfg), progress=False)


@pytest.mark.distributed
def test_two_processes_train_into_one_run_dir_and_both_ranks_step(ddp_run):
    tmp, run, result = ddp_run
    assert {p.name for p in run.iterdir()} == RUN_DIR_ENTRIES  # no second writer's temp files either
    m = metrics(run)
    assert m["status"] == "complete"
    assert (m["world_size"], m["global_batch_size"], m["global_steps"]) == (2, 2 * B, STEPS)
    # One epoch: the tokens counted over both ranks are the whole training set; rank 0 saw half.
    assert m["trained_tokens"] == m["data"]["tokens"]["train_total"]
    assert sorted(step_losses(run)) == [1, 2, 3, 4]
    # Printed once, by the main process, with the effective global batch.
    out = result.stdout.splitlines()
    assert out.count(f"[peft-pipeline] batch: {B} per device x 1 accumulation x 2 processes = {2 * B} examples per optimizer step") == 1
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        names = {p.name for p in (run / "checkpoints" / ckpt).iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= names, names
    # The main process built the tokenized cache once; nothing half-written is left beside it.
    entries = list((tmp / "cache" / "data").iterdir())
    assert len(entries) == 1 and (entries[0] / "report.json").is_file(), entries


@pytest.mark.distributed
def test_adapter_from_two_processes_loads_with_peft(ddp_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run, _ = ddp_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), run / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained away from its zero init
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, model.config.vocab_size)


@pytest.mark.distributed
def test_two_processes_of_batch_b_follow_one_process_of_batch_2b(ddp_run, reference_run):
    _, run, _ = ddp_run
    two, one = step_losses(run), step_losses(reference_run)
    assert max(abs(one[s] - s_loss) for s, s_loss in two.items()) < LOSS_TOL, (two, one)
    assert max(two.values()) - min(two.values()) > 100 * LOSS_TOL  # the loss did move
    assert_same_weights(adapter_weights(run / "adapter"), adapter_weights(reference_run / "checkpoints" / f"checkpoint-{STEPS}"))


@pytest.mark.distributed
def test_resume_under_two_processes_continues_the_same_trajectory(ddp_run, reference_run, tmp_path):
    tmp, run, _ = ddp_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["output_dir"] = str(resumed)
    launch(tmp_path, "cpu-2proc.yaml", cfg, "training.max_steps=6", "--resume",
           env={"PEFT_PIPELINE_CACHE": str(tmp / "cache")})
    losses = step_losses(resumed)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # 1-4 from the first run, 5-6 after resuming, once each
    reference = step_losses(reference_run)
    assert max(abs(reference[s] - losses[s]) for s in (5, 6)) < LOSS_TOL, (losses, reference)
    m = metrics(resumed)
    assert (m["status"], m["global_steps"], m["world_size"]) == ("complete", 6, 2)
    assert m["trained_tokens"] == metrics(reference_run)["trained_tokens"]  # the same 24 examples seen
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (resumed / "checkpoints" / "checkpoint-6").iterdir()}


@pytest.mark.distributed
def test_retention_at_evaluations_under_two_processes_drives_early_stopping_on_both(tmp_path, tiny_base):
    """The main process asks the retention prompts at each evaluation and every rank gets its scores: the trainer
    on each rank needs eval_retention to pick the best checkpoint (a rank without it stops with a KeyError)."""
    cfg = run_config(tmp_path, tiny_base, max_steps=6, learning_rate=5e-2, save_steps=2)
    prompts = ["Say hello.", "Count to three.", "What do bees make?", "Name a colour."]
    cfg["data"].update(retention=str(write_jsonl(tmp_path / "mine.jsonl", [{"prompt": p} for p in prompts])),
                       retention_eval=True)
    cfg["early_stopping"] = {"patience": 10, "metric": "retention", "eval_steps": 2}
    result = launch(tmp_path, "cpu-2proc.yaml", cfg)
    run = Path(cfg["output_dir"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    scored = [r for r in log if "eval_retention" in r and "retention_lost" in r]  # the main process's own line
    assert [r["step"] for r in scored] == [2, 4, 6] and all(0 <= r["eval_retention"] <= 4 for r in scored)
    m = metrics(run)
    assert m["status"] == "complete" and m["world_size"] == 2
    assert m["best_metric"] == max(r["eval_retention"] for r in scored)
    assert result.stdout.count("[peft-pipeline] step 2: retention ") == 1  # printed by the main process only


def sharded_run(tmp: Path, tiny_base: Path, config_file: str, extra: tuple[str, ...] = ()) -> Path:
    driver = tmp / "shard_on_cpu.py"
    driver.write_text(SHARDING_DRIVER)
    cfg = run_config(tmp, tiny_base)
    launch(tmp, config_file, cfg, script=driver, extra=("--num_processes", "2", "--mixed_precision", "no", *extra))
    return Path(cfg["output_dir"])


@pytest.mark.distributed
def test_fsdp2_shards_the_model_and_saves_the_whole_adapter(tmp_path, tiny_base, ddp_run):
    run = sharded_run(tmp_path, tiny_base, "fsdp2.yaml")
    names = {p.name for p in (run / "checkpoints" / f"checkpoint-{STEPS}").iterdir()}
    assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= names, names  # Accelerate's FSDP checkpoint, not DDP's
    # Retention is skipped under sharded training (a console line names the eval command): no reference file.
    assert {p.name for p in run.iterdir()} == RUN_DIR_ENTRIES - {"retention-reference.jsonl"}
    _, ddp, _ = ddp_run
    two = step_losses(ddp)
    assert max(abs(two[s] - loss) for s, loss in step_losses(run).items()) < LOSS_TOL
    # Gathered from the shards: whole LoRA matrices, equal to the DDP run's.
    assert_same_weights(adapter_weights(run / "adapter"), adapter_weights(ddp / "adapter"))


@pytest.mark.distributed
@pytest.mark.parametrize("config_file", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_zero_trains_and_saves_the_whole_adapter(tmp_path, tiny_base, ddp_run, config_file):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    run = sharded_run(tmp_path, tiny_base, config_file)
    names = {p.name for p in (run / "checkpoints" / f"checkpoint-{STEPS}").iterdir()}
    assert f"global_step{STEPS}" in names, names  # DeepSpeed's own checkpoint layout
    _, ddp, _ = ddp_run
    two = step_losses(ddp)
    assert max(abs(two[s] - loss) for s, loss in step_losses(run).items()) < LOSS_TOL
    assert_same_weights(adapter_weights(run / "adapter"), adapter_weights(ddp / "adapter"))


def test_slurm_script_starts_one_launcher_per_node_with_its_machine_rank(tmp_path):
    """launch/slurm.sbatch with srun/scontrol/accelerate stubbed: ranks, address, world size."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'echo gpu-node-07; echo gpu-node-08\n',
        # srun: run the task once per node, as SLURM would, with that node's ids.
        "srun": 'while [[ $1 == --* ]]; do shift; done\n'
                'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done\n',
        "accelerate": 'echo "ACCELERATE $*"\n',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "ACCELERATE_CONFIG": "launch/fsdp2.yaml"}
    r = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "cfg.yaml", "training.max_steps=5", "--resume"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("ACCELERATE ")]
    assert len(calls) == 2
    for rank, args in enumerate(calls):
        def flag(name):
            return args[args.index(name) + 1]

        assert args[0] == "launch" and flag("--config_file") == "launch/fsdp2.yaml"
        assert (flag("--machine_rank"), flag("--num_machines"), flag("--num_processes")) == (str(rank), "2", "8")
        assert (flag("--main_process_ip"), flag("--main_process_port")) == ("gpu-node-07", "29500")
        assert args[-6:] == ["-m", "peft_pipeline", "train", "cfg.yaml", "training.max_steps=5", "--resume"]
    r = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch")], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_each_process_puts_a_quantized_base_on_its_own_gpu(monkeypatch):
    """Never device_map="auto" (one copy spread over all GPUs, world size 1: trl #921)."""
    import accelerate

    from peft_pipeline.model.load import device_map_for

    class Rank3:
        local_process_index = 3

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate, "PartialState", Rank3)
    assert device_map_for(quantized=True) == {"": 3}
    assert device_map_for(quantized=False) is None  # the trainer moves it to this process's device


# --------------------------------------------------------------------------- DPO under two processes

PAIRS = [{"prompt": [{"role": "user", "content": f"Say the word after {w}."}],
          "chosen": [{"role": "assistant", "content": WORDS[(i + 1) % len(WORDS)]}],
          "rejected": [{"role": "assistant", "content": w}]} for i, w in enumerate(WORDS[:8])]


def dpo_config(tmp: Path, base: Path, **training) -> dict:
    """method: dpo on 8 pairs, constant LR, dropout 0: 2 steps of a global batch of 4 pairs."""
    cfg = run_config(tmp, base, **{"max_steps": 2, "per_device_train_batch_size": B, "save_steps": 2, **training})
    pairs = str(write_jsonl(tmp / "pairs.jsonl", PAIRS))
    cfg["method"] = "dpo"
    cfg["data"] = {"train": pairs, "eval": pairs, "cache": False, "retention": None}
    return cfg


@pytest.mark.distributed
def test_dpo_under_two_processes_follows_one_process_of_twice_the_batch(tmp_path, tiny_base):
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    launch(tmp_path / "two", "cpu-2proc.yaml", dpo_config(tmp_path / "two", tiny_base))
    run = tmp_path / "two" / "run"
    one = train(config_from_dict(dpo_config(tmp_path / "one", tiny_base, per_device_train_batch_size=2 * B)),
                progress=False)
    m = metrics(run)
    assert m["status"] == "complete" and m["method"] == "dpo"
    assert (m["world_size"], m["global_batch_size"], m["global_steps"]) == (2, 2 * B, 2)
    assert m["eval_rewards/accuracies"] is not None and not (run / "adapter" / "ref").exists()
    # The same 4 pairs per step (rank r takes batches r, r+2 of the one shuffle) and DDP averages the
    # per-rank mean losses' gradients: the DPO loss follows the one-process run.
    two, ref = step_losses(run), step_losses(one)
    assert sorted(two) == [1, 2] and max(abs(ref[s] - v) for s, v in two.items()) < LOSS_TOL, (two, ref)
    assert_same_weights(adapter_weights(run / "adapter"), adapter_weights(one / "adapter"))
