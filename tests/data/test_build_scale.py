"""The Arrow build (build_datasets) against the per-row path it replaced, on the bundled data.

The reference is load_examples + split_holdout + tokenize_examples: Python lists, the tokenizer's
own apply_chat_template and one tokenizer call per piece. Token ids, labels, order and every
count of the report must be equal, on one process and on two.
"""

from __future__ import annotations

import pytest

from peft_pipeline.cli import main
from peft_pipeline.config import DataSection, DataSource
from peft_pipeline.data.build import DataReport, build_datasets, load_examples, split_holdout, tokenize_examples
from peft_pipeline.errors import UserError
from conftest import REPO, write_jsonl

CASES = {
    "orders": dict(train=[DataSource(path=str(REPO / "data/orders/train.jsonl"))],
                   eval=[DataSource(path=str(REPO / "data/orders/validation.jsonl"))]),
    "chat": dict(train=[DataSource(path=str(REPO / "data/chat/train.jsonl"))], val_fraction=0.2),
    "longtail": dict(train=[DataSource(path=str(REPO / "data/longtail/train.jsonl"), weight=1.5),
                            DataSource(path=str(REPO / "data/orders/train.jsonl"), max_samples=50)],
                     val_fraction=0.1, overlong="truncate"),
    "longtail-drop": dict(train=[DataSource(path=str(REPO / "data/longtail/train.jsonl"))]),
}


def per_row(section: DataSection, tokenizer, max_length: int):
    report = DataReport()
    train = load_examples(section.train, section.system_prompt, 0, report)
    evals = load_examples(section.eval, section.system_prompt, 0, report) if section.eval else []
    if not section.eval:
        train, evals = split_holdout(train, section.val_fraction, 0)
    t = tokenize_examples(train, tokenizer, section, max_length, report, "train", progress=False)
    e = tokenize_examples(evals, tokenizer, section, max_length, report, "eval", progress=False)
    return t, e, report


# two processes once, on the case with mixing, a held-out split and truncation
@pytest.mark.parametrize("case, num_proc", [(case, 1) for case in CASES] + [("longtail", 2)])
def test_arrow_build_gives_the_per_row_tokens_masks_and_counts(tokenizer, case, num_proc):
    section = DataSection(cache=False, num_proc=num_proc, **CASES[case])
    train, evals, report = build_datasets(section, tokenizer, 256, 0, progress=False)
    want_train, want_eval, want = per_row(section, tokenizer, 256)
    assert train["input_ids"][:] == want_train["input_ids"] and train["labels"][:] == want_train["labels"]
    assert (evals["input_ids"][:] if evals is not None else []) == want_eval["input_ids"]
    assert (evals["labels"][:] if evals is not None else []) == want_eval["labels"]
    for count in ("dropped_overlong", "truncated", "dropped_no_loss", "duplicates"):
        assert getattr(report, count) == getattr(want, count), count
    assert report.tokens["train_total"] == sum(map(len, want_train["input_ids"]))
    assert report.sources == want.sources
    if case.startswith("longtail"):
        assert report.dropped_overlong + report.truncated > 0  # the length rules were exercised


def test_row_errors_from_other_processes_still_name_file_and_line(tokenizer, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    lines = path.read_text().splitlines()
    lines[36] = lines[36][:-1]  # line 37: cut off its closing brace
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:37: malformed JSON"):
        build_datasets(DataSection(train=[DataSource(path=str(path))], cache=False, num_proc=2), tokenizer, 64, 0,
                       progress=False)


def test_prepare_builds_the_cache_train_will_use(tmp_path, tiny_base, capsys, monkeypatch):
    monkeypatch.setenv("PEFT_PIPELINE_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tiny_base}}}\ndata: {{train: {REPO / 'data/orders/train.jsonl'}, val_fraction: 0.1}}\n"
                   f"training: {{max_length: 256}}\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["prepare", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rows: 400 read; examples: 360 train, 40 eval" in out and "cache: written " in out
    assert "dropped: 0 over max_length, 0 with nothing to learn" in out
    assert main(["prepare", str(cfg), "--no-progress"]) == 0
    assert "cache: hit " in capsys.readouterr().out


def test_a_row_cut_before_its_answer_counts_as_truncated_and_as_dropped():
    from peft_pipeline.data.build import DataReport, Rendered, _count, fit

    rendered = Rendered("x" * 20, [(15, 20)], True)
    status, ids, labels = fit(rendered, list(range(10)), [-100] * 8 + [8, 9], False, 4, "truncate")
    report = DataReport()
    assert _count(report, status) and (ids, labels) == ([], [])
    assert (report.truncated, report.dropped_no_loss, report.dropped_overlong) == (1, 1, 0)
    status, ids, labels = fit(rendered, list(range(10)), [-100] * 10, False, None, "truncate")
    report = DataReport()
    assert _count(report, status) and (report.truncated, report.dropped_no_loss) == (0, 1)
