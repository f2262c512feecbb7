"""Generate the bundled datasets in data/: synthetic, seeded, stdlib only.

    python data/make_data.py [--out DIR] [--seed N]

Writes (under DIR, default: the folder this script lives in):
  orders/{train,validation,test}.jsonl  alpaca rows: sentence -> order JSON (extraction task)
  chat/{train,validation}.jsonl         OpenAI `messages` rows: a multi-turn shopping-list assistant
  longtail/train.jsonl                  alpaca rows with long-tailed lengths (packing/padding benchmark)
  intents/{train,validation}.jsonl      {"text", "label"} rows: customer message -> intent (classification)
  tools/{train,validation}.jsonl        OpenAI tool-calling rows: tools list, assistant tool_calls, tool results

The output is a pure function of the seed: the committed files are what this script writes with
the default seed, and tests/test_bundled_data.py checks that byte for byte. Each dataset draws
from its own random.Random, so editing one generator leaves the other files unchanged.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_SEED = 1234

# ---------------------------------------------------------------------------------------------
# orders: "Maya Chen from Leeds wants three desk lamps." -> {"customer", "item", "quantity", "city"}
# ---------------------------------------------------------------------------------------------

ORDERS_INSTRUCTION = "Extract the order from the sentence as JSON with the keys customer, item, quantity, city."
ORDERS_SPLITS = {"train": 400, "validation": 40, "test": 40}

FIRST_NAMES = [
    "Maya", "Liam", "Sofia", "Noah", "Aisha", "Lucas", "Chloe", "Mateo", "Hana", "Oliver",
    "Priya", "Ethan", "Zara", "Diego", "Emma", "Kenji", "Amara", "Jonas", "Leila", "Samuel",
    "Ines", "Tomás", "Freya", "Omar", "Nadia", "Felix", "Grace", "Ravi", "Elena", "Kwame",
    "Julia", "Arjun", "Marta", "Yusuf", "Clara", "Hugo", "Mei", "Pablo", "Ingrid", "Tariq",
]
LAST_NAMES = [
    "Chen", "Okafor", "Rossi", "Novak", "Patel", "García", "Müller", "Kim", "Silva", "Dubois",
    "Nakamura", "Haddad", "Larsen", "Kowalski", "Mensah", "O'Brien", "Ivanova", "Costa", "Singh", "Moreau",
    "Fischer", "Tanaka", "Ortiz", "Lindqvist", "Adeyemi", "Park", "Schmidt", "Alvarez", "Nguyen", "Walsh",
]
# (singular, plural): the output's `item` is the noun phrase exactly as the sentence writes it.
ITEMS = [
    ("desk lamp", "desk lamps"), ("coffee mug", "coffee mugs"), ("notebook", "notebooks"),
    ("USB cable", "USB cables"), ("yoga mat", "yoga mats"), ("water bottle", "water bottles"),
    ("backpack", "backpacks"), ("wireless mouse", "wireless mice"), ("phone case", "phone cases"),
    ("wool scarf", "wool scarves"), ("cast iron pan", "cast iron pans"), ("bike helmet", "bike helmets"),
    ("box of pencils", "boxes of pencils"), ("pair of headphones", "pairs of headphones"),
    ("pair of running shoes", "pairs of running shoes"), ("desk chair", "desk chairs"),
    ("monitor stand", "monitor stands"), ("tea kettle", "tea kettles"), ("umbrella", "umbrellas"),
    ("picture frame", "picture frames"), ("cutting board", "cutting boards"), ("board game", "board games"),
    ("bag of coffee beans", "bags of coffee beans"), ("mechanical keyboard", "mechanical keyboards"),
    ("plant pot", "plant pots"), ("travel adapter", "travel adapters"), ("rain jacket", "rain jackets"),
    ("set of towels", "sets of towels"), ("LED bulb", "LED bulbs"), ("wall clock", "wall clocks"),
]
CITIES = [
    "Leeds", "Porto", "Nairobi", "Osaka", "Denver", "Lyon", "Kraków", "Toronto", "Austin", "Bergen",
    "San Diego", "New York", "Cape Town", "Buenos Aires", "Melbourne", "Hamburg", "Dublin", "Seoul",
    "Mumbai", "Valencia", "Edinburgh", "Quito", "Accra", "Tallinn", "Salt Lake City", "Bristol",
]
SPELLED = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
           9: "nine", 10: "ten", 11: "eleven", 12: "twelve", 15: "fifteen", 20: "twenty"}

# {q} is the quantity as written, {item} agrees with it, {them} is "it"/"them".
ORDER_TEMPLATES = [
    "{name} ordered {q} {item} for delivery to {city}.",
    "Please ship {q} {item} to {name} in {city}.",
    "{name} from {city} wants {q} {item}.",
    "Can you send {q} {item} to {city}? The order is for {name}.",
    "New order: {q} {item}, customer {name}, shipping to {city}.",
    "{name} just bought {q} {item}; send {them} to {city}.",
    "We need {q} {item} delivered to {city} for {name}.",
    "Order for {name}: {q} {item}, destination {city}.",
    "{name} called from {city} asking for {q} {item}.",
    "Ship to {city}: {q} {item} ordered by {name}.",
    "Hi, this is {name}. I'd like {q} {item} sent to my address in {city}.",
    "{Q} {item} for {name}, please deliver {them} to {city}.",
    "The customer {name} placed an order of {q} {item} to be shipped to {city}.",
    "Deliver {q} {item} to {city}, the buyer is {name}.",
    "{name} in {city} has requested {q} {item}.",
    "Could {q} {item} go out to {name} at the {city} office?",
    "Put {name} down for {q} {item}, shipping address in {city}.",
    "From {city}, {name} would like to order {q} {item}.",
]


def _quantity(rng: random.Random) -> tuple[int, str]:
    """An int and how the sentence writes it: digits mostly, spelled-out words about a third of the time."""
    n = rng.choice([1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 24, 30, 40, 50])
    if n in SPELLED and rng.random() < 0.35:
        return n, SPELLED[n]
    return n, str(n)


def order_row(rng: random.Random) -> dict:
    """One extraction example; the output keys are always customer, item, quantity, city in that order."""
    name = rng.choice(FIRST_NAMES)
    if rng.random() < 0.6:
        name = f"{name} {rng.choice(LAST_NAMES)}"
    singular, plural = rng.choice(ITEMS)
    n, q = _quantity(rng)
    item = singular if n == 1 else plural
    city = rng.choice(CITIES)
    template = rng.choice(ORDER_TEMPLATES)
    sentence = template.format(name=name, q=q, Q=q[0].upper() + q[1:], item=item, city=city,
                               them="it" if n == 1 else "them")
    output = json.dumps({"customer": name, "item": item, "quantity": n, "city": city}, ensure_ascii=False)
    return {"instruction": ORDERS_INSTRUCTION, "input": sentence, "output": output}


def make_orders(seed: int) -> dict[str, list[dict]]:
    """Unique sentences split at random, so test and validation are held out but same-distribution."""
    rng = random.Random(f"{seed}:orders")
    total = sum(ORDERS_SPLITS.values())
    rows, seen = [], set()
    while len(rows) < total:
        row = order_row(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    splits, start = {}, 0
    for name in ("test", "validation", "train"):
        splits[name] = rows[start:start + ORDERS_SPLITS[name]]
        start += ORDERS_SPLITS[name]
    return splits


# ---------------------------------------------------------------------------------------------
# chat: a shopping-list assistant; every reply restates the whole list, so later turns depend on
# earlier ones ("remove the eggs", "make it 4 lemons") and the right answer is fully determined.
# ---------------------------------------------------------------------------------------------

CHAT_SPLITS = {"train": 80, "validation": 10}
CHAT_SYSTEM = [
    "You keep the user's shopping list. After every change, reply with the full list.",
    "You are a shopping-list assistant. Track the list across the conversation and always restate it.",
]
GROCERIES = [
    ("apple", "apples"), ("egg", "eggs"), ("banana", "bananas"), ("onion", "onions"),
    ("tomato", "tomatoes"), ("carrot", "carrots"), ("lemon", "lemons"), ("potato", "potatoes"),
    ("bottle of milk", "bottles of milk"), ("loaf of bread", "loaves of bread"),
    ("can of beans", "cans of beans"), ("bag of rice", "bags of rice"), ("avocado", "avocados"),
    ("pepper", "peppers"), ("cucumber", "cucumbers"), ("jar of honey", "jars of honey"),
]
_PLURAL = dict(GROCERIES)


def _phrase(item: str, n: int) -> str:
    return f"{n} {item if n == 1 else _PLURAL[item]}"


def _list_reply(items: dict[str, int]) -> str:
    if not items:
        return "Your list is empty."
    return "Your list: " + ", ".join(_phrase(k, v) for k, v in items.items()) + "."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _chat_turn(rng: random.Random, items: dict[str, int], first: bool) -> tuple[str, str]:
    """One user request and the assistant's reply; mutates `items` (insertion order = list order)."""
    kinds = ["add"] if first else ["add", "remove", "change", "count", "add"]
    kind = rng.choice(kinds if items else ["add"])
    if kind == "add":
        fresh = [g for g, _ in GROCERIES if g not in items]
        picks = rng.sample(fresh, rng.choice([1, 2, 2, 3]))
        added = {g: rng.randint(1, 6) for g in picks}
        items.update(added)
        verb = rng.choice(["Add", "Please add", "Put", "I also need"] if not first else ["Add", "Please add", "Start a list with"])
        tail = {"Add": " to my list.", "Please add": " to my list.", "Put": " on my list."}.get(verb, ".")
        return f"{verb} {_join([_phrase(k, v) for k, v in added.items()])}{tail}", _list_reply(items)
    if kind == "remove":
        item = rng.choice(list(items))
        removed = items.pop(item)
        ask = rng.choice(["Remove the {p}.", "Take the {p} off the list.", "I don't need the {p} anymore."])
        reply = _list_reply(items)
        return ask.format(p=item if removed == 1 else _PLURAL[item]), reply
    if kind == "change":
        item = rng.choice(list(items))
        n = rng.choice([v for v in range(1, 9) if v != items[item]])
        items[item] = n
        ask = rng.choice(["Make it {x} instead.", "Change the {p} to {n}.", "Actually, I want {x}."])
        return ask.format(x=_phrase(item, n), p=_PLURAL[item], n=n), _list_reply(items)
    total = sum(items.values())
    ask = rng.choice(["How many things are on my list?", "How many items is that in total?"])
    return ask, f"{total} in total: {_list_reply(items)[len('Your list: '):]}"


def chat_row(rng: random.Random) -> dict:
    """A 2-3 turn conversation, with a system message about half the time."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(CHAT_SYSTEM)})
    items: dict[str, int] = {}
    for turn in range(rng.choice([2, 3, 3])):
        user, assistant = _chat_turn(rng, items, first=turn == 0)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def make_chat(seed: int) -> dict[str, list[dict]]:
    """Unique conversations, split at random into validation and train."""
    rng = random.Random(f"{seed}:chat")
    rows, seen = [], set()
    while len(rows) < sum(CHAT_SPLITS.values()):
        row = chat_row(rng)
        key = json.dumps(row["messages"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return {"validation": rows[:CHAT_SPLITS["validation"]], "train": rows[CHAT_SPLITS["validation"]:]}


# ---------------------------------------------------------------------------------------------
# longtail: maintenance logs whose lengths are lognormal, so a batch mixes ~100-token rows with a
# few 1000-2000-token ones: the case where padding wastes most compute and packing pays off.
# ---------------------------------------------------------------------------------------------

LONGTAIL_ROWS = 600
# Each row draws a target length in SmolLM2 tokens (chat-templated, default system prompt
# included) from a lognormal, then converts it to a number of log sentences with the measured
# costs below. sigma 0.8 puts p99 near 1000 tokens; the cap keeps every row under ~2000.
LONGTAIL_MEDIAN_TOKENS = 150
LONGTAIL_SIGMA = 0.8
LONGTAIL_MAX_TOKENS = 1900
LONGTAIL_BASE_TOKENS = 85  # a one-sentence row: template, system prompt, instruction, answer
# Tokens one more log sentence adds: once in the input, twice for "bullets" (input and output).
LONGTAIL_SENTENCE_TOKENS = {"summary": 20, "count": 22, "bullets": 42}

SITES = ["the north pump station", "substation 4", "the river intake", "warehouse B", "the east tower",
         "the cold store", "line 2 of the bottling plant", "the rooftop chiller", "the main gate", "tunnel 7"]
TECHS = ["Ruth", "Marco", "Ade", "Kai", "Sven", "Lina", "Bo", "Yara", "Theo", "Ines"]
PARTS = ["a bearing", "the drive belt", "a pressure valve", "the control board", "two fuses", "the air filter",
         "a seal kit", "the fan motor", "a temperature sensor", "the hydraulic hose"]
FINDINGS = ["a slow leak", "unusual vibration", "a loose connector", "corrosion on the housing",
            "a worn gasket", "an intermittent fault code", "low oil pressure", "a cracked cover", "a failed relay"]
LOG_TEMPLATES = [
    "On day {d}, {tech} inspected {site} and found {finding}.",
    "{tech} replaced {part} at {site} after reports of {finding}.",
    "The crew at {site} logged {finding} during the {shift} shift and scheduled a follow-up.",
    "{tech} tested {part} at {site}; readings were within limits for {h} hours.",
    "A routine check of {site} on day {d} took {h} hours and showed {finding}.",
    "{tech} ordered {part} for {site}, expected to arrive in {h} days.",
]
SHIFTS = ["morning", "afternoon", "night"]
LONGTAIL_TASKS = ["summary", "summary", "bullets", "count"]
LONGTAIL_INSTRUCTIONS = {
    "summary": "Summarize the maintenance log in one or two sentences.",
    "bullets": "Rewrite the maintenance log as a bullet list, one entry per line.",
    "count": "How many log entries mention each site? Answer one site per line.",
}


def _log_sentence(rng: random.Random) -> tuple[str, str]:
    site = rng.choice(SITES)
    text = rng.choice(LOG_TEMPLATES).format(
        d=rng.randint(1, 90), tech=rng.choice(TECHS), site=site, part=rng.choice(PARTS),
        finding=rng.choice(FINDINGS), shift=rng.choice(SHIFTS), h=rng.randint(1, 12))
    return text[0].upper() + text[1:], site


def longtail_row(rng: random.Random) -> dict:
    """One log of lognormal length and a deterministic answer derived from it."""
    task = rng.choice(LONGTAIL_TASKS)
    target = min(LONGTAIL_MAX_TOKENS, LONGTAIL_MEDIAN_TOKENS * rng.lognormvariate(0, LONGTAIL_SIGMA))
    n = max(1, 1 + round((target - LONGTAIL_BASE_TOKENS) / LONGTAIL_SENTENCE_TOKENS[task]))
    entries = [_log_sentence(rng) for _ in range(n)]
    counts: dict[str, int] = {}
    for _, site in entries:
        counts[site] = counts.get(site, 0) + 1
    if task == "summary":
        top = max(counts, key=lambda s: (counts[s], s))
        output = (f"The log has {n} {'entry' if n == 1 else 'entries'} covering {len(counts)} "
                  f"{'site' if len(counts) == 1 else 'sites'}; {top} appears most often ({counts[top]}).")
    elif task == "bullets":
        output = "\n".join(f"- {text}" for text, _ in entries)
    else:
        output = "\n".join(f"{site}: {c}" for site, c in sorted(counts.items()))
    return {"instruction": LONGTAIL_INSTRUCTIONS[task], "input": " ".join(t for t, _ in entries), "output": output}


def make_longtail(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(f"{seed}:longtail")
    return {"train": [longtail_row(rng) for _ in range(LONGTAIL_ROWS)]}


# ---------------------------------------------------------------------------------------------
# intents: customer messages about an order -> one of five intents (task: classification).
# Every class mentions orders, items and order numbers, and many phrasings avoid the obvious
# keyword ("I no longer want it" is cancel, "where is it" is track), so a bag of words is not enough.
# ---------------------------------------------------------------------------------------------

INTENTS_PER_CLASS = {"train": 60, "validation": 20}
INTENT_TEMPLATES = {
    "cancel": [
        "Please cancel order {order}, I no longer need the {item}.",
        "I changed my mind about the {item}. Can you stop order {order} before it ships?",
        "I don't want the {item} anymore, please call off the order.",
        "Cancel my order for the {item}, I ordered it by mistake.",
        "Is it too late to cancel {order}? I found the {item} cheaper elsewhere.",
        "Please don't send the {item}, I want to withdraw order {order}.",
        "Could you void order {order}? We no longer need the {item}.",
        "Stop the order for the {item} please, I placed it twice.",
        "I'd like to cancel the {item} I ordered {days} days ago.",
        "Scrap order {order}, nobody here needs the {item} after all.",
    ],
    "refund": [
        "I returned the {item} {days} days ago and still haven't got my money back.",
        "Can I get a refund for the {item} from order {order}?",
        "The {item} arrived broken; I want my money back, not a replacement.",
        "Please refund the {item}, I was charged twice for order {order}.",
        "When will the refund for order {order} reach my card?",
        "I sent the {item} back to your {city} warehouse. Where is my reimbursement?",
        "I'd like the payment for the {item} reversed, it was the wrong size.",
        "You charged me for the {item} but it never shipped; please pay me back.",
        "How long does a refund take? I returned the {item} from {order}.",
        "Credit my account for the {item}, it was damaged when it came.",
    ],
    "track": [
        "Where is my {item}? Order {order} was placed {days} days ago.",
        "Can you tell me when order {order} will arrive in {city}?",
        "Has the {item} shipped yet?",
        "What is the tracking number for order {order}?",
        "The website says my {item} is in transit for {days} days now; where is it?",
        "Is my {item} still on its way to {city}?",
        "When should I expect the {item}? I ordered it {days} days ago.",
        "Please give me a delivery date for order {order}.",
        "Which courier has my {item} and where is it right now?",
        "I'm waiting for the {item} from order {order}, any update on its status?",
    ],
    "change_address": [
        "I moved to {city}; please send order {order} to my new address.",
        "Can I change the shipping address for the {item}?",
        "Please deliver the {item} to my office in {city} instead of my home.",
        "I typed the wrong street for order {order}, can you update it?",
        "Ship the {item} to {city} rather than the address on file.",
        "Could you redirect order {order} to my neighbour's house?",
        "The delivery address on order {order} is outdated; the new one is in {city}.",
        "Please update where the {item} goes, I'll be staying in {city}.",
        "Before the {item} ships, change the destination to my parents' place.",
        "I need order {order} sent to a different address, I'm no longer at the old flat.",
    ],
    "complaint": [
        "The courier left the {item} in the rain and it was soaked.",
        "I'm unhappy with how I was treated on the phone about order {order}.",
        "The {item} from order {order} is poor quality, really disappointing.",
        "Your driver was rude when delivering the {item} in {city}.",
        "This is the third time order {order} came late, it is unacceptable.",
        "The packaging of the {item} was ripped open and half of it was missing.",
        "I waited {days} days on hold with support; terrible service.",
        "The {item} looks nothing like the photos on your website.",
        "Nobody answered my emails about order {order}, I'm very frustrated.",
        "The {item} smells of smoke, I expected much better from your shop.",
    ],
}
INTENT_OPENERS = ["", "", "Hi, ", "Hello, ", "Hey there. ", "Good morning. ", "Quick question: "]
INTENT_CLOSERS = ["", "", " Thanks.", " Thank you!", " Regards, {name}.", " - {name}"]


def intent_row(rng: random.Random, label: str) -> dict:
    """One message of class `label`: a template with random slots, opener and sign-off."""
    singular, _ = rng.choice(ITEMS)
    text = rng.choice(INTENT_TEMPLATES[label]).format(
        item=singular, order=f"#{rng.randint(10000, 99999)}", city=rng.choice(CITIES), days=rng.randint(2, 21))
    opener = rng.choice(INTENT_OPENERS)
    if opener.endswith(", ") and not text.startswith(("I ", "I'")):
        text = text[0].lower() + text[1:]  # "Hi, can you ..." ("I" stays capital)
    closer = rng.choice(INTENT_CLOSERS).format(name=rng.choice(FIRST_NAMES))
    return {"text": opener + text + closer, "label": label}


def make_intents(seed: int) -> dict[str, list[dict]]:
    """Balanced, unique messages; each split shuffled so classes interleave."""
    rng = random.Random(f"{seed}:intents")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {name: [] for name in INTENTS_PER_CLASS}
    for name in ("validation", "train"):
        for label in INTENT_TEMPLATES:
            made = 0
            while made < INTENTS_PER_CLASS[name]:
                row = intent_row(rng, label)
                if row["text"] not in seen:
                    seen.add(row["text"])
                    splits[name].append(row)
                    made += 1
        rng.shuffle(splits[name])
    return splits


# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# tools: OpenAI tool-calling conversations (tools list, assistant tool_calls, tool results)
# ---------------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "source": {"type": "string"}, "target": {"type": "string"}},
            "required": ["amount", "source", "target"]}}},
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Status of an order by its id.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
]
TOOLS_SPLITS = {"train": 60, "validation": 10}
CURRENCIES = ["EUR", "USD", "GBP", "JPY", "CHF"]
ORDER_STATES = ["shipped", "packed", "out for delivery", "delivered", "waiting for stock"]


def _call(rng: random.Random, n: int) -> tuple[str, dict, dict, str]:
    """(user ask, call, tool result, answer) for one of the three tools."""
    kind = rng.choice(["get_weather", "convert_currency", "lookup_order"])
    if kind == "get_weather":
        city, temp = rng.choice(CITIES), rng.randint(-5, 34)
        sky = rng.choice(["sunny", "cloudy", "raining", "windy"])
        return (f"What's the weather in {city}?", {"city": city, "unit": "celsius"},
                {"temperature": temp, "sky": sky}, f"It is {temp} degrees C and {sky} in {city}.")
    if kind == "convert_currency":
        amount, (a, b) = rng.randint(5, 900), rng.sample(CURRENCIES, 2)
        rate = round(rng.uniform(0.5, 1.6), 4)
        return (f"How much is {amount} {a} in {b}?", {"amount": amount, "source": a, "target": b},
                {"result": round(amount * rate, 2)}, f"{amount} {a} is {round(amount * rate, 2)} {b}.")
    order, state = f"A{rng.randint(10000, 99999)}", rng.choice(ORDER_STATES)
    return (f"Where is my order {order}?", {"order_id": order}, {"status": state},
            f"Order {order} is {state}.")


def tools_row(rng: random.Random, index: int) -> dict:
    """One or two calls (each answered by a tool result, then a reply), or a reply with no call needed."""
    messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant with tools."}]
    for turn in range(rng.choice([1, 1, 2])):
        if rng.random() < 0.15:
            messages += [{"role": "user", "content": "Thanks, that's all."},
                         {"role": "assistant", "content": "You're welcome!"}]
            continue
        ask, args, result, answer = _call(rng, index)
        call_id = f"call_{index}_{turn}"
        name = next(t["function"]["name"] for t in TOOLS if set(args) <= set(t["function"]["parameters"]["properties"]))
        messages += [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": name, "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
            {"role": "assistant", "content": answer},
        ]
    return {"tools": TOOLS, "messages": messages}


def make_tools(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(f"{seed}:tools")
    return {split: [tools_row(rng, i) for i in range(n)] for split, n in TOOLS_SPLITS.items()}


GENERATORS = {"orders": make_orders, "chat": make_chat, "longtail": make_longtail, "intents": make_intents,
              "tools": make_tools}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, "\\n" line endings: identical bytes on every platform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out: Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write every dataset under `out`; returns the files written."""
    written = []
    for name, make in GENERATORS.items():
        for split, rows in make(seed).items():
            path = Path(out) / name / f"{split}.jsonl"
            write_jsonl(path, rows)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write into (default: the folder holding this script)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"random seed (default {DEFAULT_SEED}: the committed files)")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.seed):
        with open(path, encoding="utf-8") as f:
            print(f"{sum(1 for _ in f):5d} rows  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
