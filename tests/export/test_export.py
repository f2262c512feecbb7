"""Export: --quant parsing, finding llama.cpp and the merged model, the Ollama hand-off, and a tiny run
exported through llama.cpp's converter and quantizer and checked in llama.cpp itself (slow)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from peft_pipeline.errors import UserError

EXPORT_ROWS = [{"instruction": "Name the city.", "input": f"Ship to {c}.", "output": c} for c in ("Oslo", "Lima", "Accra")]


def _llama_cpp():
    """The install `make llama-cpp` makes (make test installs it); skip only when it is absent."""
    from peft_pipeline.export.llamacpp import locate

    try:
        return locate()
    except UserError as e:
        pytest.skip(f"llama.cpp not installed ({e}); `make llama-cpp` installs it")


# --------------------------------------------------------------------------- --quant


def test_quant_list_keeps_order_and_drops_repeats():
    from peft_pipeline.export.llamacpp import parse_quants

    assert parse_quants("f16, Q8_0,q4_k_m,f16") == ["f16", "q8_0", "q4_k_m"]


@pytest.mark.parametrize("text", ["f16,q3_k", "gguf", ",", "q4_k_m,q4_0"])
def test_unknown_quant_is_a_usage_error_naming_the_allowed_types(text):
    from peft_pipeline.export.llamacpp import parse_quants

    with pytest.raises(UserError) as e:
        parse_quants(text)
    assert e.value.exit_code == 2 and "f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m" in str(e.value)


def test_cli_rejects_an_unknown_quant_before_reading_the_run(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "peft_pipeline", "export", str(tmp_path / "nothing-here"), "--quant", "f16,q2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --quant: 'q2' is not a GGUF type this exporter writes; use a comma list of f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m"]


# --------------------------------------------------------------------------- finding llama.cpp


def test_missing_install_is_one_line_naming_make_llama_cpp(tmp_path, monkeypatch):
    from peft_pipeline.export.llamacpp import ENV_VAR, locate

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as e:
        locate()
    msg = str(e.value)
    assert "\n" not in msg and "make llama-cpp" in msg and f"{ENV_VAR}={tmp_path / 'nowhere'}" in msg


def test_override_dir_is_used_when_complete(tmp_path, monkeypatch):
    from peft_pipeline.export.llamacpp import ENV_VAR, locate

    inst = _llama_cpp()
    copy = tmp_path / "llama"
    copy.symlink_to(inst.root, target_is_directory=True)
    monkeypatch.setenv(ENV_VAR, str(copy))
    found = locate()
    assert found.root == inst.root.resolve() and found.libllama().name.startswith("libllama")
    (tmp_path / "partial" / "python").mkdir(parents=True)  # a half-made install is refused, not half-used
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "partial"))
    with pytest.raises(UserError, match="convert_hf_to_gguf.py"):
        locate()


def test_quantize_params_struct_matches_the_bundled_llama_h():
    """Our ctypes struct, field for field, against include/llama.h of the installed release."""
    from peft_pipeline.export.llamacpp import _params_struct

    header = (_llama_cpp().root / "llama.cpp" / "include" / "llama.h").read_text()
    body = re.search(r"typedef struct llama_model_quantize_params \{(.*?)\} llama_model_quantize_params;", header, re.S)
    declared = [re.sub(r"//.*", "", line).strip() for line in body.group(1).splitlines()]
    names = [re.search(r"(\w+)\s*;$", d).group(1) for d in declared if d.endswith(";")]
    assert names == [name for name, _ in _params_struct()._fields_]


def test_quantize_writes_a_smaller_file_and_reports_fallbacks(tmp_path, tiny_base):
    """llama_model_quantize through ctypes: q8_0 of the tiny f16 file, and q4_k_m's per-tensor fallbacks (rows of 64)."""
    from peft_pipeline.export.llamacpp import convert, quantize

    inst = _llama_cpp()
    f16 = tmp_path / "m-f16.gguf"
    convert(inst, tiny_base, f16, "f16")
    q8 = quantize(inst, f16, tmp_path / "m-q8_0.gguf", "q8_0", 1)
    q4 = quantize(inst, f16, tmp_path / "m-q4_k_m.gguf", "q4_k_m", 1)
    assert q8["fallback_tensors"] == 0 and q4["fallback_tensors"] > 0 and q4["tensors"] > q4["fallback_tensors"]
    assert (tmp_path / "m-q8_0.gguf").stat().st_size < 0.7 * f16.stat().st_size  # 0.63 measured (8.5 of 16 bits + scales)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf", "m-q4_k_m.gguf", "m-q8_0.gguf"]


def test_converter_sees_legacy_config_keys_and_the_base_sentencepiece_model(tmp_path):
    from peft_pipeline.export.llamacpp import _converter_view

    merged = tmp_path / "merged"
    merged.mkdir()
    config = {"model_type": "gpt2", "n_positions": 1024, "n_embd": 64}
    (merged / "config.json").write_text(json.dumps(config))
    (merged / "model.safetensors").write_bytes(b"weights")
    sp = tmp_path / "base" / "tokenizer.model"
    sp.parent.mkdir()
    sp.write_bytes(b"sentencepiece")
    (tmp_path / "stage").mkdir()
    view = _converter_view(merged, tmp_path / "stage", sp)
    assert json.loads((view / "config.json").read_text())["n_ctx"] == 1024  # the key llama.cpp's converter reads
    assert (view / "model.safetensors").read_bytes() == b"weights" and (view / "tokenizer.model").read_bytes() == b"sentencepiece"
    assert json.loads((merged / "config.json").read_text()) == config and not (merged / "tokenizer.model").exists()
    (merged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _converter_view(merged, tmp_path / "stage", None) == merged  # nothing missing: the dir itself


# --------------------------------------------------------------------------- the merged model a run points at


def _run_target(run: Path):
    from peft_pipeline.rundir import Target

    return Target("run", run, run, run / "adapter", "base", None)


def _model_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def test_merged_dir_follows_the_merge_record(tmp_path):
    from peft_pipeline.rundir import merged_dir

    run = tmp_path / "run"
    run.mkdir()
    assert merged_dir(_run_target(run)) is None
    default = _model_dir(run / "merged")
    assert merged_dir(_run_target(run)) == default
    elsewhere = _model_dir(tmp_path / "out" / "m")
    (run / "merge_report.json").write_text(json.dumps({"status": "passed", "out_dir": str(elsewhere)}))
    assert merged_dir(_run_target(run)) == elsewhere
    (run / "merge_report.json").write_text(json.dumps({"status": "failed", "out_dir": str(elsewhere)}))
    assert merged_dir(_run_target(run)) == default  # a failed merge's directory is not the run's model
    shutil.rmtree(default)
    assert merged_dir(_run_target(run)) is None


def test_export_without_a_merge_says_what_to_run_or_pass(tmp_path):
    from peft_pipeline.export.run import find_merged

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError) as e:
        find_merged(_run_target(run))
    assert f"run `peft-pipeline merge {run}` first" in str(e.value) and "peft-pipeline export MERGED_DIR" in str(e.value)


# --------------------------------------------------------------------------- Ollama hand-off

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
ZEPHYR_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Ship 3 lamps to Oslo"},
     {"role": "assistant", "content": '{"item": "lamps"}'}, {"role": "user", "content": "And 2 chairs?"}],
]


def go_render(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of the Go templates handoff writes (the constructs it uses, nothing more):
    {{ if .System }}A{{ else }}B{{ end }}, {{ range .Messages }}{{ if ne .Role "system" }}..{{ end }}{{ end }}."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # Ollama's collate()

    def fill(text: str, m: dict | None) -> str:
        text = text.replace("{{ .System }}", system)
        return text.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) if m else text

    match = re.fullmatch(r'\{\{ if \.System \}\}(.*?)(?:\{\{ else \}\}(.*?))?\{\{ end \}\}'
                         r'\{\{ range \.Messages \}\}\{\{ if ne \.Role "system" \}\}(.*?)\{\{ end \}\}\{\{ end \}\}(.*)',
                         template, re.S)
    assert match, template
    with_system, without, turn, tail = match.groups()
    out = fill(with_system, None) if system else (without or "")
    return out + "".join(fill(turn, m) for m in messages if m["role"] != "system") + tail


@pytest.fixture
def tok_with(tokenizer):
    def make(template: str | None):
        tok = __import__("copy").deepcopy(tokenizer)
        tok.chat_template = template
        return tok
    return make


@pytest.mark.parametrize("template,name", [(None, "chatml"), (LLAMA3_TEMPLATE, "llama3")])
def test_go_template_renders_conversations_as_the_jinja_template(tok_with, tokenizer, template, name):
    from peft_pipeline.export.handoff import chat_format

    tok = tok_with(template or tokenizer.chat_template)
    fmt, why = chat_format(tok)
    assert fmt is not None and fmt.name == name, why
    for conversation in CONVERSATIONS:
        jinja = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        jinja = jinja.removeprefix(tok.bos_token) if template else jinja  # llama 3 writes BOS; llama.cpp/Ollama add it
        assert go_render(fmt.go_template(), conversation) == jinja


def test_smollm2_default_system_message_is_kept(tokenizer):
    from peft_pipeline.export.handoff import chat_format

    fmt, _ = chat_format(tokenizer)
    assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert go_render(fmt.go_template(), CONVERSATIONS[0]).startswith(f"<|im_start|>system\n{fmt.default_system}<|im_end|>")


def test_unconverted_template_leaves_template_out_of_the_modelfile(tok_with, tmp_path):
    from peft_pipeline.export.handoff import chat_format, write

    tok = tok_with(ZEPHYR_TEMPLATE)
    assert chat_format(tok) == (None, "its chat template is not ChatML or Llama 3, the formats converted here")
    quants = [{"quant": "q8_0", "file": str(tmp_path / "m-q8_0.gguf"), "bytes": 2e6, "top1_agreement": 0.9,
               "greedy_identical": 3, "probes": 4, "status": "ok"}]
    h = write(tmp_path, "m", quants, tok, [tok.convert_tokens_to_ids("<|im_end|>")], "Answer in JSON.")
    text = (tmp_path / "Modelfile").read_text()
    assert text.splitlines() == ["FROM ./m-q8_0.gguf", "", 'PARAMETER stop "<|im_end|>"', "", 'SYSTEM """Answer in JSON."""']
    assert h["template"] is None and "Ollama will use the template stored in the GGUF" in h["template_note"]
    readme = (tmp_path / "README.md").read_text()
    assert "llama-server -m m-q8_0.gguf" in readme and "ollama create m -f Modelfile" in readme and "lms import" in readme


# --------------------------------------------------------------------------- the export verb, end to end


@pytest.mark.slow
def test_export_through_llama_cpp_checks_every_file(tmp_path, tokenizer, capsys, monkeypatch):
    """A tiny llama run: merge --out elsewhere, export f16 + q8_0, each file checked in llama.cpp; a failed check removes it."""
    import conftest
    from peft_pipeline.cli import main
    from peft_pipeline.export import verify

    _llama_cpp()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = conftest.make_tiny_llama(tmp_path / "base", tokenizer, initializer_range=0.2, tie_word_embeddings=False)
    run = conftest.make_run(tmp_path, base, tokenizer, EXPORT_ROWS, test_rows=EXPORT_ROWS)
    assert main(["export", str(run)]) == 1
    assert f"run `peft-pipeline merge {run}` first" in capsys.readouterr().err
    assert main(["merge", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert main(["export", str(run), "--quant", "f16,q8_0"]) == 0  # finds the merge where merge_report.json says
    report = json.loads((run / "export_report.json").read_text())
    assert report["status"] == "ok" and report["source"] == str((tmp_path / "elsewhere").resolve())
    f16, q8 = report["quants"]
    assert [f16["quant"], q8["quant"]] == ["f16", "q8_0"] and f16["tool"] == "convert_hf_to_gguf.py"
    assert q8["tool"] == "llama_model_quantize" and q8["bytes"] < 0.7 * f16["bytes"]
    for q in (f16, q8):  # answered by llama.cpp, with prompts rendered by the GGUF's own template
        assert Path(q["file"]).is_file() and q["probes"] == report["probes"] == 3 + 4
        assert q["prompt_tokens_identical"] == q["probes"] and q["test_scores"]["n"] == 3
    assert f16["diverged"] == [] and f16["greedy_identical"] + f16["greedy_ties"] == f16["probes"]
    assert f16["top1_agreement"] > 0.95 and q8["top1_agreement"] < f16["top1_agreement"]
    modelfile = (run / "export" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./run-f16.gguf") and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "run-q8_0.gguf" in (run / "export" / "README.md").read_text()
    assert not list((run / "export").glob(".*tmp*"))  # nothing half-written left behind

    monkeypatch.setattr(verify, "MIN_TOP1", 0.999)  # q8_0 of a random model agrees on far fewer positions
    assert main(["export", str(run), "--quant", "q8_0", "--out", str(tmp_path / "new" / "dir")]) == 1
    assert "q8_0: top-1 agreement" in capsys.readouterr().err
    report = json.loads((run / "export_report.json").read_text())
    assert report["status"] == "failed" and report["quants"][0]["status"] == "failed"
    assert Path(report["quants"][0]["file"]).parent == tmp_path / "new" / "dir"
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the failed file removed, the f16 it came from too


def test_export_adapter_writes_a_model_card(tmp_path, tiny_base, tokenizer):
    import conftest
    from peft_pipeline.cli import main

    run = conftest.make_run(tmp_path, tiny_base, tokenizer, EXPORT_ROWS)
    assert main(["export", str(run), "--format", "adapter"]) == 0
    out = run / "export" / "adapter"
    card = (out / "README.md").read_text()
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert f"base_model: {tiny_base}" in card and "LoRA: r=16" in card and "AutoPeftModelForCausalLM" in card


def test_export_rejects_a_format_it_does_not_have(tmp_path, tiny_base, tokenizer):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "peft_pipeline", "export", str(tmp_path), "--format", "onnx"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'onnx'" in r.stderr


# --------------------------------------------------------------------------- other families (tiny, from configs)

FAMILY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2)


def test_converter_reads_gpt_neox_rotary_pct_from_transformers_5_rope_parameters():
    """transformers 5 moved GPT-NeoX's rotary_pct into rope_parameters; the converter still reads rotary_pct
    (KeyError on every transformers 5 GPT-NeoX without llama_convert.py)."""
    from transformers import AutoConfig

    from peft_pipeline.export.llama_convert import legacy_keys

    hparams = AutoConfig.for_model("gpt_neox", rotary_pct=0.25).to_dict()
    assert "rotary_pct" not in hparams
    assert legacy_keys(hparams) == {"rotary_pct": 0.25}
    assert legacy_keys({**hparams, "rotary_pct": 0.5}) == {}  # a config that has it keeps its own
    assert legacy_keys(AutoConfig.for_model("llama").to_dict()) == {}


def _tiny_family(path: Path, model_type: str, tokenizer) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **FAMILY_SIZES)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3", "mistral", "olmo2", "gpt2", "gpt_neox"])
def test_other_families_convert_and_reproduce_in_llama_cpp(tmp_path, tokenizer, model_type, monkeypatch):
    """f16 from llama.cpp's converter answers like the transformers model (llama: the test above)."""
    from peft_pipeline.export import verify
    from peft_pipeline.export.run import make_files, probe_prompts
    from peft_pipeline.rundir import Target

    inst = _llama_cpp()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    d = _tiny_family(tmp_path / model_type, model_type, tokenizer)
    out = tmp_path / f"{model_type}-f16.gguf"
    make_files(inst, d, {"f16": out}, model_type)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    probes = verify.reference(d, tokenizer, probe_prompts(Target("merged", d, None, None, str(d), None), tokenizer), stop, 24)
    [answer] = verify.run_probe(inst, [out], probes)
    r = verify.compare("f16", probes, answer, stop, tokenizer)
    assert r["status"] == "ok" and r["prompt_tokens_identical"] == r["probes"] == 4, r
    assert r["top1_agreement"] > 0.95, r


@pytest.mark.slow
@pytest.mark.parametrize("model_type,why", [
    ("qwen2", "BPE pre-tokenizer was not recognized"),  # transformers 5 loads SmolLM2's tokenizer as Qwen2Tokenizer here
    ("gemma2", "tokenizer.model"),  # SentencePiece families: real checkpoints ship one (and the base's is passed on)
    ("phi3", "tokenizer.model"),
])
def test_families_the_converter_refuses_say_why_in_one_line(tmp_path, tokenizer, model_type, why):
    """Known refusals of this llama.cpp release for tiny models with SmolLM2's tokenizer (README: Export)."""
    from peft_pipeline.export.run import make_files

    inst = _llama_cpp()
    d = _tiny_family(tmp_path / model_type, model_type, tokenizer)
    with pytest.raises(UserError) as e:
        make_files(inst, d, {"f16": tmp_path / "x-f16.gguf"}, model_type)
    assert why in str(e.value) and "convert_hf_to_gguf.py failed" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))  # nothing half-written left


@pytest.mark.slow
def test_gemma2_merged_without_tokenizer_model_converts_with_the_bases(tmp_path, monkeypatch):
    """transformers 5 saves a SentencePiece tokenizer without tokenizer.model, which llama.cpp's converter
    needs for gemma: export passes the base's on, and the result answers like the model in llama.cpp."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from conftest import make_spm_tokenizer
    from peft_pipeline.export import verify
    from peft_pipeline.export.run import base_tokenizer_model, make_files, probe_prompts
    from peft_pipeline.rundir import Target

    inst = _llama_cpp()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = make_spm_tokenizer(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma2", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **FAMILY_SIZES)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    merged = tmp_path / "merged"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(merged)
    tok.save_pretrained(merged)
    assert not (merged / "tokenizer.model").exists()  # what makes the converter fail without the base's
    sp = base_tokenizer_model(Target("run", tmp_path, tmp_path, tmp_path / "adapter", str(base), None))
    assert sp == base / "tokenizer.model"
    out = tmp_path / "g-f16.gguf"
    with pytest.raises(UserError, match="tokenizer.model"):
        make_files(inst, merged, {"f16": out}, "g")
    make_files(inst, merged, {"f16": out}, "g", sp)
    stop = [tok.eos_token_id]
    probes = verify.reference(merged, tok, probe_prompts(Target("merged", merged, None, None, str(merged), None), tok), stop, 24)
    [answer] = verify.run_probe(inst, [out], probes)
    r = verify.compare("f16", probes, answer, stop, tok)
    assert r["status"] == "ok" and r["prompt_tokens_identical"] == r["probes"] == 4 and r["top1_agreement"] > 0.95, r
