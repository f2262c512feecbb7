"""GRPO rewards from the config: built-in verifiable rewards and user functions by import path.

Each reward is a function with TRL's reward signature,
    f(prompts, completions, completion_ids, **columns) -> list[float | None]
where `columns` holds every other dataset column as a list (here `answer`: the row's reference answer).
Its __name__ is the reward's label, so TRL logs `rewards/<label>/mean` and `/std` every logging step.
The same functions score generations in `eval` (GRPO runs), before and after training, so the number
trained on is the number reported.

Built-ins (evaluate/metrics.py does the parsing and comparing, as for generation eval):
  exact_match  1.0 when the completion equals the answer (surrounding whitespace ignored), else 0.0
  json_valid   1.0 when the completion parses as a JSON object
  json_fields  1.0 when it is a JSON object with exactly the answer's keys (values not compared)
  json_values  the share of the answer's fields the JSON object gets right (partial credit: 0.75 for 3 of 4)
  regex        1.0 when `pattern` is found in the completion
  length       -(tokens over max_tokens) / max_tokens: 0 up to max_tokens, more negative past it
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from peft_pipeline.config import RewardSpec
from peft_pipeline.errors import UserError


def completion_text(c) -> str:
    """A completion as text (TRL passes strings for string prompts, [{"role": "assistant", ...}] for messages)."""
    return c if isinstance(c, str) else c[-1]["content"]


def _answers(kwargs: dict, n: int) -> list[str]:
    return kwargs.get("answer") or [""] * n


def exact_match(completions, answers) -> list[float]:
    """1.0 where the completion equals the reference answer (whitespace-trimmed)."""
    return [float(completion_text(c).strip() == a.strip()) for c, a in zip(completions, answers)]


def json_valid(completions) -> list[float]:
    """1.0 where the completion is a JSON object."""
    from peft_pipeline.evaluate.metrics import parse_json

    return [float(isinstance(parse_json(completion_text(c)), dict)) for c in completions]


def json_fields(completions, answers) -> list[float | None]:
    """1.0 where the completion is a JSON object with the reference's keys; None where the reference is not JSON."""
    from peft_pipeline.evaluate.metrics import parse_json

    out: list[float | None] = []
    for c, a in zip(completions, answers):
        want, got = parse_json(a), parse_json(completion_text(c))
        out.append(None if not isinstance(want, dict) else float(isinstance(got, dict) and set(got) == set(want)))
    return out


def json_values(completions, answers) -> list[float | None]:
    """Share of the reference object's fields with an equal value; 0.0 for no object; None where the reference is not JSON.

    Partial credit: after SFT nearly every completion is JSON with the right keys (json_fields 1.0 for all),
    so within a GRPO group only the values can tell a better sample from a worse one.
    """
    from peft_pipeline.evaluate.metrics import _json_equal, parse_json

    out: list[float | None] = []
    for c, a in zip(completions, answers):
        want, got = parse_json(a), parse_json(completion_text(c))
        if not isinstance(want, dict) or not want:
            out.append(None)
        elif not isinstance(got, dict):
            out.append(0.0)
        else:
            out.append(sum(k in got and _json_equal(got[k], v) for k, v in want.items()) / len(want))
    return out


def build(spec: RewardSpec, where: str = "rewards") -> Callable:
    """The reward function for one spec, named by its label (user functions imported: a bad path is one line)."""
    kind = spec.kind
    if kind == "python":
        fn = import_function(spec.function or "", f"{where}.function")
    elif kind == "exact_match":
        def fn(prompts, completions, completion_ids=None, **kw):
            return exact_match(completions, _answers(kw, len(completions)))
    elif kind == "json_valid":
        def fn(prompts, completions, completion_ids=None, **kw):
            return json_valid(completions)
    elif kind == "json_fields":
        def fn(prompts, completions, completion_ids=None, **kw):
            return json_fields(completions, _answers(kw, len(completions)))
    elif kind == "json_values":
        def fn(prompts, completions, completion_ids=None, **kw):
            return json_values(completions, _answers(kw, len(completions)))
    elif kind == "regex":
        pattern = re.compile(spec.pattern or "")

        def fn(prompts, completions, completion_ids=None, **kw):
            return [float(pattern.search(completion_text(c)) is not None) for c in completions]
    else:  # length
        limit = spec.max_tokens or 1

        def fn(prompts, completions, completion_ids=None, **kw):
            lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else \
                [len(completion_text(c).split()) for c in completions]
            return [-max(0, n - limit) / limit for n in lengths]
    if kind != "python":
        fn.__name__ = fn.__qualname__ = spec.label
        return fn

    def named(*args, **kwargs):
        return fn(*args, **kwargs)

    named.__name__ = named.__qualname__ = spec.label  # the label the config gave, else the function's name
    return named


def build_all(specs: list[RewardSpec]) -> list[Callable]:
    """Every configured reward, in order (their weights go to trl's reward_weights)."""
    return [build(s, f"rewards[{i}]") for i, s in enumerate(specs)]


def import_function(path: str, where: str) -> Callable:
    """'pkg.module:func' or 'pkg.module.func' imported; a one-line error naming the config key otherwise."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise UserError(f"{where}: {path!r} is not an import path; write 'package.module:function'", exit_code=2)
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{where}: cannot import {module!r} ({e}); is it on PYTHONPATH?", exit_code=2) from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UserError(f"{where}: {module} has no function {name!r}", exit_code=2)
    return fn


def score(specs: list[RewardSpec], prompts: list, completions: list[str], completion_ids: list[list[int]],
          answers: list[str]) -> dict[str, float | None]:
    """Mean of each reward over generated answers (None values skipped), and their weighted sum's mean."""
    means: dict[str, float | None] = {}
    total = [0.0] * len(completions)
    for spec, fn in zip(specs, build_all(specs)):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answers)
        if len(values) != len(completions):
            raise UserError(f"reward {spec.label}: returned {len(values)} values for {len(completions)} completions")
        kept = [float(v) for v in values if v is not None]
        means[spec.label] = sum(kept) / len(kept) if kept else None
        # TRL sums with NaN for None (nansum): a reward that does not apply adds nothing.
        total = [t + spec.weight * float(v or 0.0) for t, v in zip(total, values)]
    means["reward"] = sum(total) / len(total) if total else None
    return means
