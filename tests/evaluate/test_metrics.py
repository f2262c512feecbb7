"""Metrics against values computed by hand on small inputs."""

import json

import pytest

from peft_pipeline.evaluate.metrics import OTHER, detect_kind, exact_match, format_confusion_matrix, json_metrics, label_metrics, normalize, normalized_match, parse_json, rouge_l, rouge_l_f1, score


# --- match -------------------------------------------------------------------------------------


def test_normalize_strips_case_space_and_edge_punctuation():
    assert normalize('  "Paris."  ') == "paris"
    assert normalize("\u201cNew   York\u201d") == "new york"
    assert normalize('" Paris. "') == "paris"
    # Inner punctuation is content, not decoration.
    assert normalize("U.S.A.") == "u.s.a"
    assert normalize("it's fine") == "it's fine"


def test_exact_and_normalized_match():
    preds = ["Paris", "paris.", "  Berlin ", "Rome"]
    refs = ["Paris", "Paris", "Berlin", "Madrid"]
    # Exact: only row 0. Normalized: rows 0, 1, 2.
    assert exact_match(preds, refs) == 0.25
    assert normalized_match(preds, refs) == 0.75


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_empty_lists_score_zero():
    assert score([], []) == {"n": 0, "kind": "text", "exact_match": 0.0, "normalized_match": 0.0,
                             "text": {"rouge_l_f1": 0.0}}


# --- JSON --------------------------------------------------------------------------------------


def test_parse_json_plain_fenced_and_invalid():
    assert parse_json('{"a": 1}') == {"a": 1}
    assert parse_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json('Here you go:\n```\n{"a": 1}\n```\nDone.') == {"a": 1}
    assert parse_json('{"a": 1') is None
    assert parse_json("not json") is None
    # A valid document containing a fence inside a string is parsed as is, not cut at the fence.
    assert parse_json('{"code": "```x```"}') == {"code": "```x```"}


def test_json_metrics_per_field():
    refs = [
        '{"name": "Ada", "age": 36}',
        '{"name": "Alan", "age": 41}',
        '{"name": "Grace", "age": 85}',
        '{"name": "Linus", "age": 54}',
    ]
    preds = [
        '```json\n{"name": "Ada", "age": 36}\n```',  # fenced, both fields right
        '{"name": "Alan", "age": 40}',  # name right, age wrong
        '{"name": "Grace", "age": 85',  # invalid JSON: both wrong
        '["Linus", 54]',  # valid JSON but not an object: not valid, both wrong
    ]
    m = json_metrics(preds, refs)
    assert m["valid_rate"] == 0.5  # rows 0, 1
    assert m["field_accuracy"] == {"name": 0.5, "age": 0.25}  # name: rows 0, 1; age: row 0
    assert m["all_fields_correct"] == 0.25  # row 0
    assert list(m["field_accuracy"]) == ["name", "age"]  # order of first appearance


def test_json_metrics_bool_is_not_int_and_extra_keys_ignored():
    refs = ['{"ok": true, "n": 1}', '{"ok": false, "n": 0}']
    preds = ['{"ok": 1, "n": 1}', '{"ok": false, "n": 0, "extra": "x"}']
    m = json_metrics(preds, refs)
    # Row 0: `1` is not `true`; row 1: all reference fields right, the extra key is ignored.
    assert m["field_accuracy"] == {"ok": 0.5, "n": 1.0}
    assert m["all_fields_correct"] == 0.5


def test_json_metrics_fields_missing_from_some_references():
    refs = ['{"a": 1}', '{"a": 2, "b": 3}']
    preds = ['{"a": 1}', '{"a": 0, "b": 3}']
    m = json_metrics(preds, refs)
    # "b" is scored over the one row that expects it.
    assert m["field_accuracy"] == {"a": 0.5, "b": 1.0}


def test_json_metrics_rejects_non_object_references():
    with pytest.raises(ValueError, match="reference row 1"):
        json_metrics(["{}", "{}"], ['{"a": 1}', "plain"])


# --- ROUGE-L -----------------------------------------------------------------------------------


def test_rouge_l_known_pairs():
    # LCS of "the cat lay on the mat" / "the cat sat on the mat" = the cat on the mat = 5 tokens;
    # P = R = 5/6, F1 = 5/6.
    assert rouge_l("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # LCS("the cat", "the cat sat") = 2: P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8.
    assert rouge_l("the cat", "the cat sat") == pytest.approx(0.8)
    # Order matters: LCS("b a", "a b") = 1, P = R = 1/2.
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    # Punctuation and case only separate tokens.
    assert rouge_l("Hello, world!", "hello world") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "x") == 0.0


def test_rouge_l_f1_is_the_row_mean():
    assert rouge_l_f1(["the cat", "x"], ["the cat sat", "x"]) == pytest.approx((0.8 + 1.0) / 2)


# --- labels ------------------------------------------------------------------------------------


def test_label_metrics_three_classes_by_hand():
    refs = ["cat", "cat", "cat", "dog", "dog", "bird"]
    preds = ["cat", "Cat.", "dog", "dog", "bird", "bird"]
    # Confusion matrix (rows true, columns predicted, labels sorted):
    #          bird cat dog
    #   bird     1   0   0
    #   cat      0   2   1
    #   dog      1   0   1
    # precision: bird 1/2, cat 2/2, dog 1/2       -> macro 2/3
    # recall:    bird 1/1, cat 2/3, dog 1/2       -> macro (1 + 2/3 + 1/2)/3 = 13/18
    # F1:        bird 2/3, cat 0.8, dog 1/2       -> macro (2/3 + 4/5 + 1/2)/3 = 59/90 ~= 0.6556
    # accuracy:  4/6
    m = label_metrics(preds, refs)
    assert m["confusion_matrix"] == {
        "labels": ["bird", "cat", "dog"],
        "columns": ["bird", "cat", "dog"],
        "matrix": [[1, 0, 0], [0, 2, 1], [1, 0, 1]],
    }
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx(13 / 18)
    assert m["macro_f1"] == pytest.approx(59 / 90)
    cat = {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert m["per_class"]["cat"] == pytest.approx(cat)


def test_label_never_predicted_has_precision_zero_and_off_label_goes_to_other():
    refs = ["yes", "yes", "no", "no"]
    preds = ["yes", "yes", "yes", "maybe"]
    # "no" is never predicted: precision 0 (not undefined), recall 0, F1 0.
    # "yes": precision 2/3, recall 1, F1 0.8. "maybe" is no class: it only fills <other>.
    m = label_metrics(preds, refs)
    assert m["per_class"]["no"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_class"]["yes"]["precision"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(0.4)
    assert m["confusion_matrix"] == {
        "labels": ["no", "yes"],
        "columns": ["no", "yes", OTHER],
        "matrix": [[0, 1, 1], [0, 2, 0]],
    }


def test_format_confusion_matrix():
    cm = {"labels": ["no", "yes"], "columns": ["no", "yes", OTHER], "matrix": [[0, 1, 1], [0, 12, 0]]}
    assert format_confusion_matrix(cm) == (
        "true \\ pred  no  yes  <other>\n"
        "no            0    1        1\n"
        "yes           0   12        0"
    )


# --- kind detection and score ------------------------------------------------------------------


@pytest.mark.parametrize(
    "refs, kind",
    [
        (['{"a": 1}', '```json\n{"b": 2}\n```'], "json"),
        (['{"a": 1}', "[1, 2]", "an array of the two numbers"], "text"),  # not all objects
        (["yes", "no", "yes"], "label"),  # 2 distinct <= max(2, 1)
        (["a", "b", "c"], "text"),  # 3 distinct > max(2, 1)
        (["positive", "negative", "neutral", "positive", "negative", "neutral"] * 2, "label"),  # 3 <= 4
        (["very much positive indeed"] * 6, "text"),  # 4 words is not a label
        (["The cat sat on the mat.", "A dog ran."], "text"),
        ([], "text"),
    ],
)
def test_detect_kind(refs, kind):
    assert detect_kind(refs) == kind


def test_score_blocks_and_json_serializable():
    s = score(["yes", "No"], ["yes", "no"])
    assert s["kind"] == "label" and s["exact_match"] == 0.5 and s["normalized_match"] == 1.0
    assert s["label"]["accuracy"] == 1.0
    s = score(['```json\n{"a": 1}\n```'], ['{"a": 1}'])
    assert s["kind"] == "json" and s["json"]["all_fields_correct"] == 1.0 and s["exact_match"] == 0.0
    s = score(["the cat"], ["the cat sat"], kind="text")
    assert s["text"] == {"rouge_l_f1": pytest.approx(0.8)}
    for s in (score(["a"], ["b"], kind=k) for k in ("label", "text")):
        assert json.loads(json.dumps(s)) == s


def test_score_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be"):
        score(["a"], ["a"], kind="regression")
