"""bench-data smoke test: a small generated file through both paths, each in a fresh interpreter.

The real numbers come from `make bench-data` (docs/data-scale.md); this checks that the Arrow build
(1 and 2 processes) and the per-row path yield the same rows and tokens, that every memory field is
measured, and that the table is rewritten between its markers with the prose around it kept.
"""

from __future__ import annotations

import json
import sys

import pytest

from peft_pipeline.tools.bench_data import BEGIN, END, anon_bytes, bench_data, make_rows


def test_generated_rows_are_a_pure_function_of_count_and_seed():
    assert list(make_rows(50)) == list(make_rows(50))
    assert list(make_rows(50))[:10] == list(make_rows(10))  # a bigger file starts with the smaller one
    assert list(make_rows(10, seed=1)) != list(make_rows(10))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is read from /proc")
def test_anonymous_memory_of_this_process_is_read():
    import mmap
    import os

    # A fresh anonymous mapping (not malloc, which may hand back heap pages an earlier test left resident)
    block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: anon, not shmem
    before = anon_bytes(os.getpid())
    for offset in range(0, len(block), 4096):  # touch every page: now resident
        block[offset] = 1
    assert anon_bytes(os.getpid()) - before > 48 * 2**20
    block.close()


@pytest.mark.slow
def test_both_paths_give_the_same_tokens_and_every_field_is_measured(tmp_path, base_dir):
    out = tmp_path / "data-scale.md"
    out.write_text(f"# Data\n\nProse written by hand.\n\n{BEGIN}\nold table\n{END}\n\nMore prose.\n")
    results = bench_data([300], [1, 2], per_row_max=300, out=out, folder=tmp_path, max_length=2048, progress=False)
    assert [(r["mode"], r["num_proc"]) for r in results] == [("per-row", 1), ("arrow", 1), ("arrow", 2)]
    assert {r["rows"] for r in results} == {300} and len({r["tokens"] for r in results}) == 1
    for r in results:
        assert r["seconds"] > 0 and r["rows_per_s"] > 0 and r["main_peak_mb"] > 0 and r["tree_peak_mb"] > 0
        if sys.platform.startswith("linux"):
            assert 0 < r["main_anon_mb"] <= r["tree_anon_mb"]
    text = out.read_text()
    assert "old table" not in text and "Prose written by hand." in text and text.endswith("More prose.\n")
    assert text.count("| 300 |") == 3 and "tree peak anon" in text
    assert json.loads(out.with_suffix(".json").read_text()) == results
