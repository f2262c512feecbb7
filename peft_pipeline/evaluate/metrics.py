"""Scores generated answers against expected ones: match rates, JSON fields, ROUGE-L, label metrics.

Pure stdlib, no model in sight: the eval stage hands it two lists of strings and writes the dict
`score` returns (JSON-serializable throughout). Rates are fractions in [0, 1]; over zero rows
they are 0.0 rather than an error, so an empty split still produces a report.

Which block `score` adds is chosen by `detect_kind(references)` unless `kind` is given:
- "json":  every reference parses as a JSON object.
- "label": every reference has at most 3 words and there are at most max(2, n/3) distinct
           normalized references, i.e. each label repeats about three times on average.
           Short-answer QA with many distinct answers therefore counts as "text"; a task with
           many rare labels may need `kind="label"` passed explicitly.
- "text":  anything else (ROUGE-L F1).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from typing import Any

KINDS = ("json", "label", "text")
OTHER = "<other>"
"""Confusion-matrix column for predictions that are none of the reference labels."""

LABEL_MAX_WORDS = 3

# ASCII punctuation plus the typographic quotes and marks models like to wrap answers in.
_EDGE_CHARS = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u00bf\u00a1"
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_TOKEN = re.compile(r"\w+")


def _rate(count: float, n: int) -> float:
    """count / n, or 0.0 when there are no rows."""
    return count / n if n else 0.0


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> int:
    """Row count, after checking the two lists pair up."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    return len(references)


def normalize(text: str) -> str:
    """Case-fold, collapse whitespace, strip surrounding punctuation and quotes."""
    text = " ".join(text.casefold().split())
    # Spaces join the set because quotes may enclose them: '" Paris. "' -> 'paris'.
    return text.strip(_EDGE_CHARS + " ")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of rows where prediction == reference, byte for byte."""
    n = _check_lengths(predictions, references)
    return _rate(sum(p == r for p, r in zip(predictions, references)), n)


def normalized_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of rows equal after `normalize`."""
    n = _check_lengths(predictions, references)
    return _rate(sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)), n)


# ---------------------------------------------------------------------------------------------
# JSON


def parse_json(text: str) -> Any:
    """The JSON value in `text`, else in its first ``` fence, else None."""
    # Plain parse first: a valid document may itself contain ``` inside a string value.
    for candidate in (text, *_FENCE.findall(text)[:1]):
        try:
            return json.loads(candidate)
        except (json.JSONDecodeError, TypeError):
            pass
    return None


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: like ==, except true != 1 and false != 0 (Python's bool is an int)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b


def json_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Validity rate of predictions, per-field accuracy and all-fields-correct rate vs JSON objects.

    Valid means the prediction parses to a JSON object, since the references are objects:
    a bare `"yes"` or `42` is well-formed JSON but not an answer of the expected shape.
    A field's accuracy is over the rows whose reference has that key. Keys the prediction adds
    beyond the reference are ignored, so all-fields-correct tolerates extra keys.
    """
    n = _check_lengths(predictions, references)
    preds = [parse_json(p) for p in predictions]
    refs = [parse_json(r) for r in references]
    bad = [i for i, r in enumerate(refs) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"reference row {bad[0]} is not a JSON object; score it with kind='text'")
    keys: dict[str, None] = {}  # insertion-ordered set: fields in order of first appearance
    for r in refs:
        keys.update(dict.fromkeys(r))
    hits, seen = dict.fromkeys(keys, 0), dict.fromkeys(keys, 0)
    all_correct = 0
    for p, r in zip(preds, refs):
        row_ok = isinstance(p, dict)
        for k, v in r.items():
            seen[k] += 1
            ok = isinstance(p, dict) and k in p and _json_equal(p[k], v)
            hits[k] += ok
            row_ok = row_ok and ok
        all_correct += row_ok
    return {
        "valid_rate": _rate(sum(isinstance(p, dict) for p in preds), n),
        "field_accuracy": {k: _rate(hits[k], seen[k]) for k in keys},
        "all_fields_correct": _rate(all_correct, n),
    }


# ---------------------------------------------------------------------------------------------
# Free text


def tokenize(text: str) -> list[str]:
    """Case-folded word tokens; whitespace and punctuation only separate them."""
    return _TOKEN.findall(text.casefold())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) x len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair: LCS over tokens, F1 of LCS/len(pred) and LCS/len(ref)."""
    p, r = tokenize(prediction), tokenize(reference)
    if not p or not r:
        # Two empty answers agree; one empty answer shares nothing with the other.
        return float(not p and not r)
    lcs = _lcs_length(p, r)
    return 2 * lcs / (len(p) + len(r))  # = 2PR/(P+R) with P = lcs/|p|, R = lcs/|r|


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over rows."""
    n = _check_lengths(predictions, references)
    return _rate(sum(rouge_l(p, r) for p, r in zip(predictions, references)), n)


# ---------------------------------------------------------------------------------------------
# Labels


def label_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix.

    Labels are compared after `normalize`. The classes are the distinct references, sorted;
    a prediction outside them counts against its row's class and lands in the "<other>" column,
    but is not a class of its own (free text would otherwise add one class per typo).
    A class nothing was predicted as has precision 0 (not undefined), and so F1 0.
    """
    n = _check_lengths(predictions, references)
    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    labels = sorted(set(refs))
    columns = labels + ([OTHER] if any(p not in labels for p in preds) else [])
    col = {c: j for j, c in enumerate(columns)}
    row = {c: i for i, c in enumerate(labels)}
    matrix = [[0] * len(columns) for _ in labels]
    for p, r in zip(preds, refs):
        matrix[row[r]][col[p if p in col else OTHER]] += 1
    per_class = {}
    for i, c in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(matrix[k][i] for k in range(len(labels)))
        precision = _rate(tp, predicted)
        recall = _rate(tp, sum(matrix[i]))
        f1 = _rate(2 * precision * recall, precision + recall)
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": sum(matrix[i])}
    k = len(labels)
    return {
        "accuracy": _rate(sum(p == r for p, r in zip(preds, refs)), n),
        "macro_precision": _rate(sum(m["precision"] for m in per_class.values()), k),
        "macro_recall": _rate(sum(m["recall"] for m in per_class.values()), k),
        "macro_f1": _rate(sum(m["f1"] for m in per_class.values()), k),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "columns": columns, "matrix": matrix},
    }


def format_confusion_matrix(cm: dict[str, Any]) -> str:
    """A text table: one row per reference label, one column per predicted label."""
    header = ["true \\ pred"] + list(cm["columns"])
    rows = [[label] + [str(v) for v in counts] for label, counts in zip(cm["labels"], cm["matrix"])]
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    # Labels left-aligned, counts right-aligned so digits line up.
    lines = [
        "  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(r, widths)))
        for r in [header] + rows
    ]
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# Entry points


def detect_kind(references: Sequence[str]) -> str:
    """Return "json", "label" or "text" by the rule in the module docstring."""
    if not references:
        return "text"
    if all(isinstance(parse_json(r), dict) for r in references):
        return "json"
    short = all(len(r.split()) <= LABEL_MAX_WORDS for r in references)
    if short and len({normalize(r) for r in references}) <= max(2, len(references) / 3):
        return "label"
    return "text"


def score(predictions: Sequence[str], references: Sequence[str], kind: str = "auto") -> dict[str, Any]:
    """Exact and normalized match, plus the block for `kind` ("auto" detects it from references)."""
    n = _check_lengths(predictions, references)
    if kind == "auto":
        kind = detect_kind(references)
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto' or one of {', '.join(KINDS)}, not {kind!r}")
    result: dict[str, Any] = {
        "n": n,
        "kind": kind,
        "exact_match": exact_match(predictions, references),
        "normalized_match": normalized_match(predictions, references),
    }
    if kind == "json":
        result["json"] = json_metrics(predictions, references)
    elif kind == "label":
        result["label"] = label_metrics(predictions, references)
    else:
        result["text"] = {"rouge_l_f1": rouge_l_f1(predictions, references)}
    return result
