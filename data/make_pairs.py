"""Preference pairs from the bundled order-extraction data: seeded, stdlib only.

    python data/make_pairs.py [--out DIR] [--seed N]

Reads data/orders/{train,validation,test}.jsonl (alpaca rows) and writes
orders-pairs/{train,validation,test}.jsonl under DIR (default: the folder this script lives in):
  {"prompt": [{"role": "user", "content": ...}],          the user turn SFT trains on (instruction + sentence)
   "chosen": [{"role": "assistant", "content": right}],   the row's exact JSON
   "rejected": [{"role": "assistant", "content": wrong}],  a plausible wrong one (one mistake, see MISTAKES)
   "mistake": "..."}                                       which mistake (for reading results)
The prompt is the same user turn as the SFT rows (formats.alpaca_user_turn), so DPO after SFT sees
the prompts the SFT adapter learned. Output is a pure function of the seed and the orders files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_SEED = 1234
HERE = Path(__file__).resolve().parent
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 12: "twelve", 15: "fifteen", 20: "twenty"}


def _quantity_off(order: dict, rng: random.Random, pool: dict) -> dict:
    q = order["quantity"]
    return {**order, "quantity": q + rng.choice([-1, 1]) if q > 1 else q + 1}


def _quantity_as_word(order: dict, rng: random.Random, pool: dict) -> dict:
    q = order["quantity"]
    return {**order, "quantity": NUMBER_WORDS.get(q, str(q))}  # a string, not a number


def _other_city(order: dict, rng: random.Random, pool: dict) -> dict:
    return {**order, "city": rng.choice([c for c in pool["city"] if c != order["city"]])}


def _first_name_only(order: dict, rng: random.Random, pool: dict) -> dict:
    parts = order["customer"].split()
    if len(parts) > 1:
        return {**order, "customer": parts[0]}
    return {**order, "customer": rng.choice([c for c in pool["customer"] if c != order["customer"]])}


def _singular_item(order: dict, rng: random.Random, pool: dict) -> dict:
    item = order["item"]
    wrong = item[:-1] if item.endswith("s") else item + "s"
    return {**order, "item": wrong}


def _missing_city(order: dict, rng: random.Random, pool: dict) -> dict:
    return {k: v for k, v in order.items() if k != "city"}


MISTAKES = {"quantity_off": _quantity_off, "quantity_as_word": _quantity_as_word, "other_city": _other_city,
            "first_name_only": _first_name_only, "item_plural": _singular_item, "missing_city": _missing_city}


def make_pairs(rows: list[dict], rng: random.Random) -> list[dict]:
    """One pair per alpaca row: the right JSON against one plausible mistake (drawn in turn, seeded)."""
    orders = [json.loads(r["output"]) for r in rows]
    pool = {key: sorted({o[key] for o in orders}) for key in ("city", "customer")}
    names = list(MISTAKES)
    out = []
    for i, (row, order) in enumerate(zip(rows, orders)):
        name = names[(i + rng.randrange(len(names))) % len(names)]
        wrong = json.dumps(MISTAKES[name](order, rng, pool), ensure_ascii=False)
        if wrong == row["output"]:  # a mistake that changed nothing (a singular-looking item): another one
            name = "other_city"
            wrong = json.dumps(_other_city(order, rng, pool), ensure_ascii=False)
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input", "").strip() else "")
        out.append({"prompt": [{"role": "user", "content": user}],
                    "chosen": [{"role": "assistant", "content": row["output"]}],
                    "rejected": [{"role": "assistant", "content": wrong}], "mistake": name})
    return out


def main(argv: list[str] | None = None) -> None:
    """Write orders-pairs/{train,validation,test}.jsonl."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    a = ap.parse_args(argv)
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (HERE / "orders" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        pairs = make_pairs(rows, random.Random(f"{a.seed}:{split}"))
        path = a.out / "orders-pairs" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        print(f"{path}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
