"""Write peft_pipeline/resources/retention-general.jsonl: general prompts the embedded base answers correctly.

Asks every candidate below to the embedded SmolLM2-135M-Instruct exactly as the forgetting
check does (peft_pipeline.evaluate.retention.answer: one user turn, its chat template, greedy, 32 new tokens,
the pipeline's batched left-padded generate) and keeps the ones it gets right, recording its
answer. A fine-tune that loses one of them has forgotten something its base knew.

    .venv/bin/python data/make_retention.py            # rewrites peft_pipeline/resources/retention-general.jsonl
    .venv/bin/python data/make_retention.py --show     # also print the rejected candidates
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (prompt, expected answers: any one occurring as a word/phrase in the answer counts)
CANDIDATES: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of China?", ["Beijing"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Greece?", ["Athens"]),
    ("What is the capital of Portugal?", ["Lisbon"]),
    ("What is 2 + 2?", ["4", "four"]),
    ("What is 3 + 5?", ["8", "eight"]),
    ("What is 10 - 4?", ["6", "six"]),
    ("What is 5 times 2?", ["10", "ten"]),
    ("What is 9 + 1?", ["10", "ten"]),
    ("What is half of 10?", ["5", "five"]),
    ("How many days are in a week?", ["7 days", "seven days"]),
    ("How many months are in a year?", ["12 months", "twelve months"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("How many hours are in a day?", ["24", "twenty-four"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is the opposite of up?", ["down"]),
    ("What is the opposite of big?", ["small", "little"]),
    ("What is the opposite of day?", ["night"]),
    ("What is the opposite of fast?", ["slow"]),
    ("What is the opposite of happy?", ["sad", "unhappy"]),
    ("What is the opposite of open?", ["closed", "close", "shut"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("What color is a ripe banana?", ["yellow"]),
    ("What color is snow?", ["white"]),
    ("What color do you get by mixing blue and yellow?", ["green"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What star is at the center of our solar system?", ["Sun"]),
    ("What is the chemical formula of water?", ["H2O", "H₂O"]),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
    ("At what temperature in Celsius does water boil?", ["100"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("Who was the first president of the United States?", ["Washington"]),
    ("What language is mainly spoken in Brazil?", ["Portuguese"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("Which animal says moo?", ["cow"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("What is the freezing point of water in Fahrenheit?", ["32"]),
    ("What do bees make?", ["honey"]),
    ("What is the largest mammal?", ["blue whale", "whale"]),
    ("On which continent is Egypt?", ["Africa"]),
    ("What is the first letter of the English alphabet?", ["A"]),
    ("What is the plural of mouse?", ["mice"]),
    ("Which organ pumps blood through the body?", ["heart"]),
    ("What is the main ingredient of guacamole?", ["avocado", "avocados"]),
    ("How many continents are there?", ["7", "seven"]),
    ("What is the square root of 9?", ["3", "three"]),
    ("What is the capital of India?", ["New Delhi", "Delhi"]),
    ("What is the capital of Mexico?", ["Mexico City"]),
    ("What is the capital of Australia?", ["Canberra"]),
    ("What is the opposite of wet?", ["dry"]),
    ("What is the opposite of light?", ["dark", "heavy"]),
    ("What is the opposite of early?", ["late"]),
    ("What is the opposite of rich?", ["poor"]),
    ("What is the opposite of left?", ["right"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"]),
    ("What planet do we live on?", ["Earth"]),
    ("What is frozen water called?", ["ice"]),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "peft_pipeline" / "resources" / "retention-general.jsonl"))
    p.add_argument("--show", action="store_true", help="print every candidate with the base's answer")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from peft_pipeline.data.template import load_tokenizer, stop_ids
    from peft_pipeline.evaluate.retention import Item, answer, is_correct
    from peft_pipeline.paths import embedded_base_dir

    # The check's own question path (evaluate/retention.answer): template, greedy decoding, new-token budget.
    base = embedded_base_dir()
    tokenizer = load_tokenizer(str(base), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    items = [Item(q, expected, f"candidate {i}") for i, (q, expected) in enumerate(CANDIDATES, 1)]
    answers = answer(model, tokenizer, items, stop_ids(tokenizer), batch_size=8)
    kept = []
    for (q, expected), a in zip(CANDIDATES, answers):
        ok = is_correct(a, expected)
        if args.show:
            print(f"{'ok ' if ok else 'NO '} {q} -> {a!r}")
        if ok:
            kept.append({"prompt": q, "expected": expected, "base_answer": a})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    print(f"{len(kept)} of {len(CANDIDATES)} candidates answered correctly by the base -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
