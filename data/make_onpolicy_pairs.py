"""On-policy preference pairs: a model's own wrong answers (from `peft-pipeline generate --out`) against the reference.

    peft-pipeline generate runs/demo-sft --prompts data/orders/train.jsonl --max-new-tokens 64 --out gen.jsonl
    python data/make_onpolicy_pairs.py gen.jsonl [more.jsonl ...] --out data/orders-pairs/onpolicy-train.jsonl

Each input record is {"where": "file:line", "prompt": [...messages], "completion": str, "stopped": bool,
"expected": str}. A record whose completion differs from `expected` (both stripped) becomes
  {"prompt": [...], "chosen": [{"role": "assistant", "content": expected}],
   "rejected": [{"role": "assistant", "content": completion}], "mistake": "<which JSON fields differ>",
   "source": "file:line", "stopped": bool}
Records that match are dropped: the model already gets them right. With several inputs (a greedy pass, then
sampled passes) a prompt may give several pairs, one per distinct wrong answer. Output order is the
inputs' order (files in the order given, records as written), so the file is a pure function of the inputs.

Why on-policy: DPO pushes down the rejected side. Synthetic mistakes (data/make_pairs.py) the model never
makes give it nothing to unlearn (docs/preference.md); its own mistakes are what it would generate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("customer", "item", "quantity", "city")


def mistake(answer: str, expected: str) -> str:
    """Which fields the answer gets wrong ('not_json' when it does not parse to an object)."""
    try:
        got = json.loads(answer)
    except json.JSONDecodeError:
        return "not_json"
    if not isinstance(got, dict):
        return "not_json"
    want = json.loads(expected)
    wrong = [k for k in KEYS if got.get(k) != want.get(k)] + sorted(set(got) - set(want))
    return "+".join(wrong) or "format"  # same fields, different text (spacing, key order)


def make_pairs(records: list[dict]) -> list[dict]:
    """One pair per (prompt, distinct wrong answer), in input order."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in records:
        answer, expected = r["completion"].strip(), r["expected"].strip()
        if answer == expected or not answer or (r["where"], answer) in seen:
            continue
        seen.add((r["where"], answer))
        prompt = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": expected}],
                    "rejected": [{"role": "assistant", "content": answer}], "mistake": mistake(answer, expected),
                    "source": r["where"], "stopped": r.get("stopped", True)})
    return out


def main(argv: list[str] | None = None) -> None:
    """Read generate records, write the pairs as JSONL."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generated", nargs="+", type=Path, help="`peft-pipeline generate --out` files (with expected answers)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    records = [json.loads(line) for path in a.generated for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [r["where"] for r in records if "expected" not in r]
    if missing:
        raise SystemExit(f"error: {missing[0]}: no expected answer; generate from rows that have one (alpaca output)")
    pairs = make_pairs(records)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"{a.out}: {len(pairs)} pairs from {len(records)} completions")


if __name__ == "__main__":
    main()
