"""Write peft_pipeline/resources/replay-general.jsonl: general questions with short correct answers, for replay.

`data.replay` mixes these rows into training so a fine-tune keeps rehearsing plain question answering
while it learns its task (docs/retention.md). Templated from small fact tables below (arithmetic,
capitals, planets, colors, opposites, plurals, units, animals, calendar, simple definitions), in a
fixed order: the file is the same on every run. No row asks a question of the retention set
(peft_pipeline/resources/retention-general.jsonl), nor about the same fact: replaying the test
questions would make the forgetting check measure rehearsal, not retention. The script refuses to
write a file that overlaps.

    python data/make_replay.py            # rewrites peft_pipeline/resources/replay-general.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "peft_pipeline" / "resources" / "replay-general.jsonl"
RETENTION = ROOT / "peft_pipeline" / "resources" / "retention-general.jsonl"

# Countries the retention set does not ask about.
CAPITALS = [("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"),
            ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Argentina", "Buenos Aires"),
            ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Turkey", "Ankara"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Cuba", "Havana"),
            ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Iran", "Tehran"),
            ("Iraq", "Baghdad"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
            ("the Czech Republic", "Prague"), ("Romania", "Bucharest"), ("New Zealand", "Wellington"),
            ("Venezuela", "Caracas"), ("Saudi Arabia", "Riyadh"), ("Colombia", "Bogotá"), ("Nigeria", "Abuja")]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
COLORS = [("a lemon", "yellow"), ("a tomato", "red"), ("coal", "black"), ("milk", "white"), ("a carrot", "orange"),
          ("a strawberry", "red"), ("a lime", "green"), ("chocolate", "brown"), ("a cucumber", "green"),
          ("a ripe cherry", "red"), ("a polar bear's fur", "white"), ("a crow", "black"), ("a pumpkin", "orange"),
          ("a fire truck", "red"), ("an eggplant", "purple"), ("a school bus in the United States", "yellow")]
MIXES = [("red", "white", "pink"), ("red", "yellow", "orange"), ("blue", "red", "purple"), ("black", "white", "gray")]
OPPOSITES = [("tall", "short"), ("full", "empty"), ("hard", "soft"), ("heavy", "light"), ("strong", "weak"),
             ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("inside", "outside"), ("above", "below"),
             ("first", "last"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("true", "false"),
             ("alive", "dead"), ("cheap", "expensive"), ("near", "far"), ("good", "bad"), ("north", "south"),
             ("east", "west"), ("give", "take"), ("friend", "enemy"), ("question", "answer"), ("summer", "winter"),
             ("front", "back"), ("top", "bottom"), ("asleep", "awake"), ("young", "old"), ("always", "never"),
             ("remember", "forget"), ("arrive", "leave"), ("safe", "dangerous"), ("smooth", "rough"),
             ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"), ("young", "old")]
PLURALS = [("child", "children"), ("man", "men"), ("woman", "women"), ("tooth", "teeth"), ("foot", "feet"),
           ("goose", "geese"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"), ("box", "boxes"),
           ("city", "cities"), ("baby", "babies"), ("wolf", "wolves"), ("potato", "potatoes"), ("sheep", "sheep")]
BABIES = [("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
          ("duck", "duckling"), ("bear", "cub"), ("frog", "tadpole"), ("goat", "kid"), ("swan", "cygnet")]
SOUNDS = [("dog", "bark"), ("cat", "meow"), ("duck", "quack"), ("lion", "roar"), ("sheep", "baa"),
          ("pig", "oink"), ("snake", "hiss"), ("horse", "neigh")]
LEGS = [("dog", 4), ("bird", 2), ("insect", 6), ("horse", 4), ("chicken", 2), ("ant", 6)]
UNITS = [("centimeters", "meter", 100), ("grams", "kilogram", 1000), ("meters", "kilometer", 1000),
         ("seconds", "minute", 60), ("millimeters", "centimeter", 10), ("milliliters", "liter", 1000),
         ("days", "leap year", 366), ("years", "decade", 10), ("years", "century", 100), ("inches", "foot", 12)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DEFINITIONS = [
    ("a noun", "A noun is a word that names a person, place, or thing."),
    ("a verb", "A verb is a word that describes an action or a state."),
    ("an adjective", "An adjective is a word that describes a noun."),
    ("a triangle", "A triangle is a shape with three sides."),
    ("a square", "A square is a shape with four equal sides and four right angles."),
    ("a mammal", "A mammal is a warm-blooded animal that feeds its young with milk."),
    ("a volcano", "A volcano is an opening in the Earth's crust through which lava erupts."),
    ("an island", "An island is a piece of land surrounded by water."),
    ("a dictionary", "A dictionary is a book that lists words and their meanings."),
    ("a thermometer", "A thermometer is an instrument that measures temperature."),
    ("a calendar", "A calendar is a chart of the days, weeks and months of a year."),
    ("a prime number", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
    ("photosynthesis", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make food."),
    ("gravity", "Gravity is the force that pulls objects toward each other, such as toward the Earth."),
    ("a desert", "A desert is a dry region that gets very little rain."),
    ("a synonym", "A synonym is a word that means the same as another word."),
]


def rows() -> list[dict[str, str]]:
    """Every templated row, in a fixed order."""
    out: list[tuple[str, str]] = []
    for a in range(1, 13):  # arithmetic: every sum and product in small grids, a few differences
        for b in (3, 6, 7, 11):
            out.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
    for a in range(2, 10):
        for b in (3, 4, 6, 7, 8):
            out.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for a in (12, 15, 20, 25, 30, 40, 50):
        for b in (3, 7, 9):
            out.append((f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."))
    for n in (4, 8, 20, 30, 50, 100):
        out.append((f"What is half of {n}?", f"Half of {n} is {n // 2}."))
    for country, city in CAPITALS:
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        out.append((f"Which city is the capital of {country}?", f"{city} is the capital of {country}."))
    for i, planet in enumerate(PLANETS):
        out.append((f"Which planet is {ORDINALS[i]} from the Sun?", f"{planet} is the {ORDINALS[i]} planet from the Sun."))
        out.append((f"What is the position of {planet} in order from the Sun?", f"{planet} is the {ORDINALS[i]} planet from the Sun."))
    out.append(("How many planets are in our solar system?", "There are eight planets in our solar system."))
    for thing, color in COLORS:
        out.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}."))
    for a, b, c in MIXES:
        out.append((f"What color do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {c}."))
    for word, opposite in dict.fromkeys(OPPOSITES):
        out.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for one, many in PLURALS:
        out.append((f"What is the plural of {one}?", f"The plural of {one} is {many}."))
    for animal, baby in BABIES:
        out.append((f"What is a baby {animal} called?", f"A baby {animal} is called a {baby}."))
    for animal, sound in SOUNDS:
        out.append((f"What sound does a {animal} make?", f"A {animal} makes a {sound} sound."))
    for animal, n in LEGS:
        out.append((f"How many legs does a {animal} have?", f"A {animal} has {n} legs."))
    for small, big, n in UNITS:
        out.append((f"How many {small} are in a {big}?", f"There are {n} {small} in a {big}."))
    for n in (2, 3, 5):
        out.append((f"How many minutes are in {n} hours?", f"There are {60 * n} minutes in {n} hours."))
        out.append((f"How many centimeters are in {n} meters?", f"There are {100 * n} centimeters in {n} meters."))
        out.append((f"How many grams are in {n} kilograms?", f"There are {1000 * n} grams in {n} kilograms."))
    for seq, kind in ((DAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(seq):
            out.append((f"What {kind} comes after {name}?", f"{seq[(i + 1) % len(seq)]} comes after {name}."))
    for thing, definition in DEFINITIONS:
        out.append((f"What is {thing}?", definition))
    return [{"instruction": q, "output": a} for q, a in out]


def overlaps(replay: list[dict[str, str]], retention_file: Path) -> list[str]:
    """Replay questions that are a retention prompt, or ask its subject ('capital of France', 'opposite of hot')."""
    norm = lambda s: re.sub(r"[^a-z0-9 ]", "", s.casefold()).strip()  # noqa: E731
    retention = [norm(json.loads(line)["prompt"]) for line in retention_file.read_text().splitlines() if line.strip()]
    subject = lambda q: re.sub(r"^(what|which|who|how many|at what)( \w+)? (is|are|does|do)( the)? ", "", q)  # noqa: E731
    asked = {subject(p) for p in retention}
    return [r["instruction"] for r in replay if norm(r["instruction"]) in retention or subject(norm(r["instruction"])) in asked]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    data = rows()
    bad = overlaps(data, RETENTION)
    if bad:
        raise SystemExit(f"replay rows overlap the retention set: {bad}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    print(f"{len(data)} rows -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
