"""Generation: prompts rendered as in training, left-padded batches equal one-by-one, stop tokens
end answers, prompt files in every format, and the generate/chat verbs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
from conftest import REPO, make_tiny_llama, write_jsonl
from peft_pipeline.cli import main
from peft_pipeline.errors import UserError
from peft_pipeline.evaluate.generate import Prompt, Sampling, _generate_batch, decode, encode, generate, read_prompts
from peft_pipeline.evaluate import generate as gen

ROWS = [
    {"instruction": "Extract the order as JSON.", "input": f"{n} {item} for {who}, deliver to {city}.",
     "output": json.dumps({"customer": who, "item": item, "quantity": n, "city": city})}
    for n, item, who, city in [(2, "mugs", "Ana", "Oslo"), (5, "lamps", "Bo", "Lima"), (7, "desks", "Cy", "Accra"),
                               (3, "pens", "Di", "Perth"), (9, "chairs", "Ed", "Quito")]
]
TEST_ROWS = ROWS[:4]
NEVER = [49151]  # a stop id the tiny model never produces in these tests (checked where it matters)


def make_run(tmp_path: Path, base: Path, tokenizer, seed: int = 1) -> Path:
    """A run dir with a random (non-no-op) adapter, eval split and test prompts."""
    return conftest.make_run(tmp_path, base, tokenizer, ROWS, test_rows=TEST_ROWS, seed=seed)


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory, tokenizer) -> Path:
    """A tiny llama with its own LM head: greedy output varies (a tied one just repeats the last token)."""
    return make_tiny_llama(tmp_path_factory.mktemp("untied") / "base", tokenizer, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_model(untied_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(untied_base, dtype=torch.float32).eval()


@pytest.fixture
def left_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    return tok


def chat_prompts() -> list[Prompt]:
    """Prompts of clearly different token lengths, chat and raw text, so batches need padding."""
    return [
        Prompt(messages=[{"role": "user", "content": "Hi"}]),
        Prompt(messages=[{"role": "user", "content": "Extract the order: " + "seven lamps for Bo in Lima " * 4}]),
        Prompt(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                         {"role": "assistant", "content": "Two."}, {"role": "user", "content": "Three?"}]),
        Prompt(text="Question: what is two plus two?\nAnswer:"),
        Prompt(messages=[{"role": "user", "content": "A medium length question about shipping mugs."}]),
    ]


# --- rendering ---------------------------------------------------------------------------------


def test_prompt_tokens_are_the_training_prefix_up_to_the_first_loss_token(tokenizer, tmp_path):
    """What eval feeds the model is exactly what training saw before the answer (template, system prompt)."""
    from peft_pipeline.data.formats import Row, normalize
    from peft_pipeline.data.template import render, tokenize

    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    for prompt, row in zip(read_prompts(path), ROWS):
        ids, labels = tokenize(render(normalize(Row(row, "x"), "alpaca"), tokenizer), tokenizer)
        first_trained = next(i for i, label in enumerate(labels) if label != -100)
        assert encode(prompt, tokenizer) == ids[:first_trained]
        assert prompt.expected == row["output"]


# --- batching and stopping ---------------------------------------------------------------------


def test_left_padded_batches_equal_one_by_one(tiny_model, left_tokenizer):
    prompts = chat_prompts()
    assert len({len(encode(p, left_tokenizer)) for p in prompts}) == len(prompts)  # padding really happens
    sampling = Sampling(max_new_tokens=8)
    batched = generate(tiny_model, left_tokenizer, prompts, NEVER, sampling, batch_size=len(prompts))
    single = generate(tiny_model, left_tokenizer, prompts, NEVER, sampling, batch_size=1)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    assert len({tuple(c.token_ids) for c in batched}) == len(prompts)  # not one token repeated everywhere
    assert all(c.new_tokens == 8 and not c.stopped for c in batched)


def test_generation_stops_at_the_stop_token(tiny_model, left_tokenizer):
    prompt = chat_prompts()[1]
    free = generate(tiny_model, left_tokenizer, [prompt], NEVER, Sampling(max_new_tokens=12))[0]
    assert not free.stopped and free.new_tokens == 12 and NEVER[0] not in free.token_ids
    # Make the token greedy decoding emits at step k the stop token: the answer must end right before it.
    k = next(i for i in range(2, 12) if free.token_ids[i] not in free.token_ids[:i])
    stop = free.token_ids[k]
    got = generate(tiny_model, left_tokenizer, [prompt], [stop], Sampling(max_new_tokens=12))[0]
    assert got.stopped and got.new_tokens == k
    assert got.token_ids == free.token_ids[:k]
    assert got.text == left_tokenizer.decode(free.token_ids[:k], skip_special_tokens=True).strip()
    # generate() itself halted at the stop token (no compute spent past it) ...
    raw = _generate_batch(tiny_model, left_tokenizer, [encode(prompt, left_tokenizer)], [stop], Sampling(max_new_tokens=12), None)
    assert raw == [free.token_ids[:k] + [stop]]
    # ... and in a batch, the stopped row holds only padding after its stop token.
    other = chat_prompts()[0]
    raw = _generate_batch(tiny_model, left_tokenizer, [encode(prompt, left_tokenizer), encode(other, left_tokenizer)],
                          [stop], Sampling(max_new_tokens=12), None)
    if stop not in raw[1]:  # the other row runs to max_new_tokens, so the batch is 12 wide
        assert raw[0][: k + 1] == free.token_ids[:k] + [stop]
        assert set(raw[0][k + 1:]) <= {left_tokenizer.pad_token_id}


def test_decode_cuts_at_the_first_stop_and_skips_special_tokens(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    hello = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    after = tokenizer(" never shown", add_special_tokens=False)["input_ids"]
    got = decode(hello + [im_start] + [im_end] + after + [im_end], [im_end], tokenizer)
    assert got.stopped and got.text == "Hello world" and got.token_ids == hello + [im_start]
    cut = decode(hello, [im_end], tokenizer)
    assert not cut.stopped and cut.new_tokens == len(hello)


def test_sampling_is_seeded(tiny_model, left_tokenizer):
    prompts = chat_prompts()[:2]
    hot = Sampling(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=3)
    a = generate(tiny_model, left_tokenizer, prompts, NEVER, hot)
    b = generate(tiny_model, left_tokenizer, prompts, NEVER, hot)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


# --- prompt files ------------------------------------------------------------------------------


def test_read_prompts_in_every_format(tmp_path):
    alpaca = read_prompts(write_jsonl(tmp_path / "a.jsonl", ROWS[:1]), system_prompt="Be exact.")
    assert alpaca[0].messages == [{"role": "system", "content": "Be exact."},
                                  {"role": "user", "content": ROWS[0]["instruction"] + "\n\n" + ROWS[0]["input"]}]
    assert alpaca[0].expected == ROWS[0]["output"] and alpaca[0].where.endswith("a.jsonl:1")

    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    msgs = read_prompts(write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}]))
    assert msgs[0].messages == conv[:3] and msgs[0].expected == "6"

    pc = read_prompts(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1\nA:", "completion": " 2"}]))
    assert pc[0].text == "Q: 1+1\nA:" and pc[0].messages is None and pc[0].expected == " 2"

    pcl = read_prompts(write_jsonl(tmp_path / "pcl.jsonl", [{"prompt": conv[:1], "completion": conv[1:2]}]))
    assert pcl[0].messages == conv[:1] and pcl[0].expected == "4"


def test_generate_accepts_rows_without_answers_but_eval_does_not(tmp_path):
    rows = [{"instruction": "Say hi."}, {"instruction": "Say bye.", "output": "bye"}]
    path = write_jsonl(tmp_path / "open.jsonl", rows)
    got = read_prompts(path, need_expected=False)
    assert [p.expected for p in got] == [None, "bye"]
    with pytest.raises(UserError, match=r"open\.jsonl:1: missing field 'output'"):
        read_prompts(path)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    assert read_prompts(chat, need_expected=False)[0].messages == [{"role": "user", "content": "Hi"}]
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "Once upon"}])
    assert read_prompts(bare, need_expected=False)[0].text == "Once upon"


def test_bad_prompt_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        read_prompts(bad)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}])
    with pytest.raises(UserError, match="text format have no prompt/answer split"):
        read_prompts(text)


# --- the generate verb ---------------------------------------------------------------------------


def test_generate_cli_prompt_and_prompts_file(tmp_path, untied_base, tokenizer, capsys):
    run = make_run(tmp_path, untied_base, tokenizer)
    assert main(["generate", str(run), "--prompt", "Hello there", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()

    out = tmp_path / "out.jsonl"
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS[:3])
    assert main(["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "4", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["expected"] for r in records] == [r["output"] for r in ROWS[:3]]
    assert all(set(r) >= {"where", "prompt", "completion", "stopped", "new_tokens"} for r in records)
    printed = capsys.readouterr().out
    assert printed.count("--- ") == 3 and str(prompts) + ":1" in printed

    # --base: the adapter (random B) changes the answer, so base and adapter differ somewhere.
    base_out = tmp_path / "base.jsonl"
    assert main(["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "4", "--base", "--out", str(base_out)]) == 0
    base = [json.loads(line)["completion"] for line in base_out.read_text().splitlines()]
    assert base != [r["completion"] for r in records]


def test_generate_cli_errors(tmp_path, tiny_base, capsys):
    with pytest.raises(SystemExit) as e:  # neither --prompt nor --prompts: usage error
        main(["generate", str(tiny_base)])
    assert e.value.code == 2 and "one of the arguments --prompt --prompts is required" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    assert main(["generate", str(tiny_base), "--prompt", "hi", "--base"]) == 2  # a merged model has no adapter
    assert "no adapter to switch off" in capsys.readouterr().err
    assert main(["generate", str(tiny_base), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err


# --- the chat verb -----------------------------------------------------------------------------


def test_chat_over_piped_stdin(tmp_path, untied_base, tokenizer):
    run = make_run(tmp_path, untied_base, tokenizer)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "peft_pipeline", "chat", str(run), "--max-new-tokens", "6"],
                          input="hello\n/exit\n", capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # the answer
    assert "Traceback" not in proc.stderr


def test_chat_keeps_history_resets_and_exits_on_eof(tmp_path, untied_base, tokenizer, monkeypatch):
    from peft_pipeline.evaluate.generate import Completion, chat

    run = make_run(tmp_path, untied_base, tokenizer)
    seen: list[list[dict]] = []

    def fake_generate(model, tok, prompts, stop_ids, sampling, streamer=None, **_):
        seen.append([dict(m) for m in prompts[0].messages])
        return [Completion(text=f"answer {len(seen)}", stopped=True, new_tokens=2, token_ids=[1, 2])]

    monkeypatch.setattr(gen, "generate", fake_generate)
    out = io.StringIO()
    code = chat(str(run), Sampling(), system="Be brief.", stdin=io.StringIO("one\ntwo\n/reset\nthree\n"), stdout=out)
    assert code == 0  # EOF after "three" ends the session cleanly
    assert out.getvalue().splitlines() == ["answer 1", "answer 2", "[history cleared]", "answer 3"]
    system = {"role": "system", "content": "Be brief."}
    assert seen[1] == [system, {"role": "user", "content": "one"}, {"role": "assistant", "content": "answer 1"},
                       {"role": "user", "content": "two"}]
    assert seen[2] == [system, {"role": "user", "content": "three"}]


# --- the embedded base, trained for real -------------------------------------------------------


@pytest.mark.slow
def test_short_fine_tune_ends_answers_at_im_end(tmp_path, monkeypatch):
    """The classic bug: EOS masked out of the loss (or never appended), so the model never stops."""
    from peft_pipeline.rundir import resolve
    from peft_pipeline.config import load_config
    from peft_pipeline.evaluate.generate import open_session
    from peft_pipeline.tasks import train

    monkeypatch.chdir(REPO)  # the quickstart config's data paths are relative to the checkout
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        # Quoted: a bare `no` is YAML for false.
        "training.max_steps=12", "training.eval_strategy='no'", "training.save_strategy='no'",
        "training.per_device_train_batch_size=4", "training.logging_steps=4", f"output_dir={tmp_path / 'run'}",
    ])
    run = train(cfg, progress=False)
    session = open_session(run)
    im_end = session.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in session.stop_ids
    prompts = read_prompts(REPO / "data" / "orders" / "test.jsonl")[:2]
    answers = generate(session.model, session.tokenizer, prompts, session.stop_ids, Sampling(max_new_tokens=96))
    for a in answers:
        assert a.stopped and a.new_tokens < 96, a.text
        assert a.text and "<|im_end|>" not in a.text and "<|im_start|>" not in a.text
    assert resolve(run).kind == "run"
