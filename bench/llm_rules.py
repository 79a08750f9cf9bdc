"""The cost of a routing decision (read the signals, estimate complexity, apply the rules) and of
the LLM cache's key, by prompt size: no gateway, no network, one core.

    python bench/llm_rules.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bridgeway.config.models import Config  # noqa: E402
from bridgeway.dataplane.cache import digest  # noqa: E402
from bridgeway.llm.cache import canonical  # noqa: E402
from bridgeway.llm.rules import Routing, read_signals  # noqa: E402

DEPLOYMENT = {"provider": "openai", "model": "gpt-4o-mini", "base_url": "http://127.0.0.1:1/v1"}
CONFIG = Config.model_validate(
    {
        "models": {g: {"deployments": [DEPLOYMENT]} for g in ("big", "code", "eu", "small")},
        "routing": {
            "auto": {
                "rules": [
                    {"when": {"task": "code", "complexity": "high"}, "model": "big"},
                    {"when": {"task": ["code", "review"]}, "model": "code"},
                    {"when": {"tags": ["eu"]}, "model": "eu"},
                    {"when": {"complexity": "high"}, "model": "big"},
                ],
                "default": "small",
            }
        },
    }
)


def _per_call(fn, rounds: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    routing = Routing(CONFIG)
    granted = {"big", "code", "eu", "small"}.__contains__
    print("| prompt | decide, metadata given (us) | decide, estimated (us) | cache key (us) |")
    print("|---|---|---|---|")
    for chars in (100, 2_000, 20_000, 200_000):
        text = ("Refactor this step by step. " + "word " * (chars // 5))[:chars] + "\n```py\nx = 1\n```"
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
        given = {"model": "auto", "messages": messages, "metadata": {"task": "code", "complexity": "high"}}
        bare = {"model": "auto", "messages": messages}
        row = [
            _per_call(lambda b=given: routing.decide("auto", read_signals(b), granted), rounds),
            _per_call(lambda b=bare: routing.decide("auto", read_signals(b), granted), rounds),
            _per_call(
                lambda b=bare: digest(b"key:x", b"/v1/chat/completions", b"json", canonical(b)), rounds
            ),
        ]
        print(f"| {chars:,} chars | " + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
    main()
