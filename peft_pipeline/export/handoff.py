"""Hand-off files next to the GGUF(s): an Ollama Modelfile and a README saying how to run them.

Ollama does not run a GGUF's Jinja chat template; it needs a Go template (TEMPLATE), and a
fine-tuned model talks nonsense without the right one (ollama #6823). We write one only for the
chat formats we know (ChatML: SmolLM2, Qwen; Llama 3), and only after checking that format
against the run's own template: a conversation rendered by the tokenizer's Jinja template must
equal the same conversation rendered from the format (`render`), and the Go template is built
from the same pieces. Otherwise the Modelfile has no TEMPLATE and Ollama falls back to the
template stored in the GGUF, which the console says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as turn text: `turn` holds {role} and {content}; `generation` opens the assistant's turn."""

    name: str
    turn: str
    generation: str
    default_system: str | None = None  # what the template puts in when the conversation has no system message

    def render(self, messages: list[dict]) -> str:
        """The conversation as this format renders it, ending with the generation prompt."""
        system = next((m["content"] for m in messages if m["role"] == "system"), self.default_system)
        out = self.turn.format(role="system", content=system) if system is not None else ""
        for m in messages:
            if m["role"] != "system":
                out += self.turn.format(role=m["role"], content=m["content"])
        return out + self.generation

    def go_template(self) -> str:
        """The same rendering in Ollama's Go template syntax (.System, .Messages with .Role and .Content)."""
        head, tail = self.turn.split("{content}")
        system = head.format(role="system") + "{{ .System }}" + tail
        default = "" if self.default_system is None else "{{ else }}" + self.turn.format(role="system", content=self.default_system)
        turn = head.format(role="{{ .Role }}") + "{{ .Content }}" + tail
        return ("{{ if .System }}" + system + default + "{{ end }}"
                + '{{ range .Messages }}{{ if ne .Role "system" }}' + turn + "{{ end }}{{ end }}" + self.generation)


FORMATS = {
    "chatml": ChatFormat("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"),
    "llama3": ChatFormat("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
# Marks that identify a format in a Jinja template (checked by rendering afterwards, not trusted alone).
_MARKS = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|eot_id|>")}
_CHECK = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there"},
          {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour."}]


def chat_format(tok) -> tuple[ChatFormat | None, str]:
    """The tokenizer's chat template as a ChatFormat verified by rendering, or None and why not."""
    import dataclasses

    template = getattr(tok, "chat_template", None)
    if not isinstance(template, str):
        return None, "the model has no chat template"
    name = next((n for n, marks in _MARKS.items() if all(m in template for m in marks)), None)
    if name is None:
        return None, "its chat template is not ChatML or Llama 3, the formats converted here"
    fmt = FORMATS[name]
    fmt = dataclasses.replace(fmt, default_system=_default_system(fmt, _jinja(tok, _CHECK[1:2])))
    for conversation in (_CHECK, _CHECK[1:]):
        want, got = _jinja(tok, conversation), fmt.render(conversation)
        if want != got:
            return None, f"its {name}-like template renders differently from {name} ({want[:60]!r}... vs {got[:60]!r}...)"
    return fmt, f"{name} (checked by rendering a conversation both ways)"


def _jinja(tok, messages: list[dict]) -> str:
    """The tokenizer's own rendering, without the BOS a template writes (llama.cpp and Ollama add BOS themselves)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tok, "bos_token", None)
    writes_bos = "bos_token" in tok.chat_template  # SmolLM2's BOS is <|im_start|>: only strip what the template adds
    return text[len(bos):] if writes_bos and bos and text.startswith(bos) else text


def _default_system(fmt: ChatFormat, rendered: str) -> str | None:
    """The system message a template inserts on its own (SmolLM2: 'You are a helpful AI assistant ...')."""
    head, tail = fmt.turn.split("{content}")
    head = head.format(role="system")
    if not rendered.startswith(head) or tail not in rendered[len(head):]:
        return None
    return rendered[len(head):rendered.index(tail, len(head))]


def modelfile(gguf_name: str, fmt: ChatFormat | None, stop: list[str], system: str | None) -> str:
    """Ollama Modelfile text: FROM the GGUF, TEMPLATE (when converted), stop tokens, SYSTEM."""
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt is not None:
        lines += [f'TEMPLATE """{fmt.go_template()}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop]
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def readme(name: str, quants: list[dict], modelfile_gguf: str, template_note: str) -> str:
    """How to run the exported files in llama.cpp, Ollama and LM Studio, with the per-file check results."""
    rows = [f"| {Path(q['file']).name} | {q['quant']} | {q['bytes'] / 1e6:.1f} | {q['top1_agreement']:.1%} | "
            f"{q['greedy_identical']}/{q['probes']} | {_score(q)} |" for q in quants]
    return "\n".join([
        f"# {name} (GGUF)", "",
        "Exported by peft-pipeline from the merged model, converted and quantized by llama.cpp, and checked in",
        "llama.cpp against the merged model (export_report.json has the details).", "",
        "| file | type | MB | top-1 agreement | greedy identical | test exact match |", "|---|---|---|---|---|---|",
        *rows, "",
        "## llama.cpp", "", "```sh",
        f"llama-cli -m {modelfile_gguf} -cnv            # chat, with the GGUF's own chat template",
        f"llama-server -m {modelfile_gguf} --jinja      # OpenAI-compatible server on :8080", "```", "",
        "## Ollama", "", f"The Modelfile points at {modelfile_gguf}; {template_note}.", "", "```sh",
        f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", "",
        "## LM Studio", "", "```sh", f"lms import {modelfile_gguf}   # or copy it under ~/.lmstudio/models/<publisher>/<name>/",
        "```", "LM Studio reads the chat template stored in the GGUF.", ""])


def _score(q: dict) -> str:
    value = (q.get("test_scores") or {}).get("exact_match")
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def write(out_dir: Path, name: str, quants: list[dict], tok, stop_ids: list[int], system: str | None) -> dict:
    """Modelfile + README.md in `out_dir` for the first passing file; what was written and the template decision."""
    from peft_pipeline.paths import atomic_file

    ok = [q for q in quants if q["status"] == "ok"]
    if not ok:
        return {}
    gguf_name = Path(ok[0]["file"]).name
    fmt, why = chat_format(tok)
    note = (f"its TEMPLATE is the run's chat template converted to Go ({fmt.name})" if fmt else
            f"it has no TEMPLATE because {why}: Ollama will use the template stored in the GGUF")
    stop = [tok.convert_ids_to_tokens(i) for i in stop_ids]
    for file, text in (("Modelfile", modelfile(gguf_name, fmt, stop, system)), ("README.md", readme(name, ok, gguf_name, note))):
        with atomic_file(out_dir / file) as tmp:
            tmp.write_text(text)
    return {"modelfile": str(out_dir / "Modelfile"), "readme": str(out_dir / "README.md"), "from": gguf_name,
            "template": fmt.name if fmt else None, "template_note": note, "stop": stop, "system": system}
