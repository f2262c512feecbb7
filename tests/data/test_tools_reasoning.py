"""Tool-calling and reasoning conversations: what carries loss, and the one-line errors for bad rows.

Templates: data/tools/chat_template.jinja (Qwen2.5-style tools) and QWEN3 below (drops the
reasoning of turns before the last user message, as Qwen3's public template does), both set on
the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import copy
import json

import pytest

from peft_pipeline.config import DataSection, DataSource
from peft_pipeline.data.build import build_datasets
from peft_pipeline.data.formats import Row, normalize
from peft_pipeline.data.template import ChatApply, render_all, tokenize
from peft_pipeline.errors import UserError
from conftest import REPO, decoded_runs, write_jsonl

TOOLS_TEMPLATE = (REPO / "data/tools/chat_template.jinja").read_text()

QWEN3 = (
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in message.content %}"
    "{%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture
def tok(tokenizer):
    t = copy.deepcopy(tokenizer)
    yield t


trained_text = decoded_runs


def test_bundled_tool_data_masks_calls_and_answers_never_results(tok, tmp_path):
    tok.chat_template = TOOLS_TEMPLATE
    section = DataSection(train=[DataSource(path=str(REPO / "data/tools/train.jsonl"))], cache=False)
    train, _, report = build_datasets(section, tok, 1024, 0, progress=False)
    rows = [json.loads(line) for line in (REPO / "data/tools/train.jsonl").read_text().splitlines()]
    assert len(train) == len(rows) == 60 and report.dropped_no_loss == 0
    for row, ids, labels in zip(rows, train["input_ids"], train["labels"]):
        want = []
        for m in row["messages"]:
            if m["role"] != "assistant":
                continue
            if m.get("tool_calls"):
                fn = m["tool_calls"][0]["function"]
                want.append(f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {json.dumps(json.loads(fn["arguments"]))}}}\n</tool_call><|im_end|>')
            else:
                want.append(m["content"] + "<|im_end|>")
        assert trained_text(ids, labels, tok) == want
        text = tok.decode(ids)
        for m in row["messages"]:
            if m["role"] == "tool":  # rendered (the model reads it), never trained
                assert m["content"] in text and not any(m["content"] in t for t in trained_text(ids, labels, tok))


def test_chat_apply_renders_exactly_like_apply_chat_template(tok):
    tok.chat_template = TOOLS_TEMPLATE
    row = json.loads((REPO / "data/tools/train.jsonl").read_text().splitlines()[0])
    ex = normalize(Row(row, "r"), "messages")
    fast = ChatApply(tok)
    for upto in range(1, len(ex["messages"]) + 1):
        for gen in (False, True):
            want = tok.apply_chat_template(ex["messages"][:upto], tools=ex["tools"], tokenize=False, add_generation_prompt=gen)
            assert fast(ex["messages"][:upto], gen, ex["tools"]) == want
    tok.chat_template = QWEN3
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    assert fast.__class__(tok)(msgs) == tok.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(name="get_wether"),
     "messages[2].tool_calls[0] calls 'get_wether', an undeclared tool"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='{"city": "Oslo",'),
     "messages[2].tool_calls[0].function.arguments is malformed JSON"),
    (lambda r: r["messages"].pop(2), "messages[2] is a tool result with no tool call before it"),
    (lambda r: r.pop("tools"), "an undeclared tool (the row declares no tools)"),
])
def test_bad_tool_rows_are_one_line_errors_naming_file_and_line(tok, tmp_path, change, message):
    tok.chat_template = TOOLS_TEMPLATE
    rows = [json.loads(line) for line in (REPO / "data/tools/train.jsonl").read_text().splitlines()[:3]]
    change(rows[1])
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(UserError) as e:
        build_datasets(DataSection(train=[DataSource(path=str(path))], cache=False), tok, 1024, 0, progress=False)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and "\n" not in str(e.value)


def test_template_without_tools_support_is_refused_not_silently_dropped(tok):
    row = json.loads((REPO / "data/tools/train.jsonl").read_text().splitlines()[0])
    with pytest.raises(UserError, match="does not render the `tools` list"):
        render_all(normalize(Row(row, "r"), "messages"), tok)  # SmolLM2's own template ignores tools


REASONING = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20", "reasoning_content": "5 times 4 is 20."},
]


@pytest.mark.parametrize("style", ["field", "think"])
def test_history_rewriting_template_trains_each_turn_with_its_own_history(tok, tmp_path, style):
    tok.chat_template = QWEN3
    messages = copy.deepcopy(REASONING)
    if style == "think":  # the same reasoning written inline, as many datasets do
        for m in messages[1::2]:
            m["content"] = f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content']}"
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": messages}])
    train, _, report = build_datasets(DataSection(train=[DataSource(path=str(path))], cache=False), tok, 512, 0,
                                      progress=False)
    assert len(train) == 2 and report.examples["train"] == 2  # one sequence per assistant turn
    first, second = (dict(input_ids=r["input_ids"], labels=r["labels"]) for r in train)
    assert trained_text(first["input_ids"], first["labels"], tok) == ["<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>"]
    assert trained_text(second["input_ids"], second["labels"], tok) == ["<think>\n5 times 4 is 20.\n</think>\n\n20<|im_end|>"]
    # each sequence is exactly what the template renders for that turn's history: the earlier turn's
    # reasoning is gone from the second one, as at inference
    want = tok.apply_chat_template(REASONING, tokenize=False)
    assert tok.decode(second["input_ids"]) == want and "2 plus 3" not in want
    assert tok.decode(first["input_ids"]) == tok.apply_chat_template(REASONING[:2], tokenize=False)
    ids, labels = tokenize(render_all(normalize(Row({"messages": messages}, "r"), "messages"), tok)[1], tok)
    assert ids == second["input_ids"] and labels == second["labels"]


def test_reasoning_with_a_template_that_cannot_show_it_is_refused(tok):
    ex = normalize(Row({"messages": REASONING[:2]}, "r"), "messages")
    with pytest.raises(UserError, match="does not render its reasoning_content"):
        render_all(ex, tok)  # SmolLM2's ChatML has no place for reasoning: training would drop it silently
