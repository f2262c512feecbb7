"""Lines for people: every stage prints its progress through `say`, prefixed so users can grep them."""

from __future__ import annotations

PREFIX = "[peft-pipeline]"


def say(*lines: str, state=None, prefix: str = PREFIX) -> None:
    """Print each line with the prefix; with an accelerate `state`, on the main process only."""
    if state is not None and not state.is_main_process:
        return
    for line in lines:
        print(f"{prefix} {line}", flush=True)
