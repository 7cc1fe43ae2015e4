"""First questions: how the bundled models answer ten plain questions a new user might ask.

Each model is registered from its packages into a temporary store, loaded once in Covey's
engine, and asked each question alone, as `covey chat` asks it (the model's chat template,
greedy, 96 tokens). A reply counts as answered when it contains one of the question's
expected words; as parroting when it repeats the question. Prints a table and the totals.

    PYTHONPATH=. .venv/bin/python bench/first_questions.py [--tokens 96]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.engine import Engine, EngineConfig, GenerateRequest  # noqa: E402
from backends.store.bundled import GEMMA, QWEN  # noqa: E402
from backends.store.model_store import ModelStore  # noqa: E402

# (question, words any one of which shows it was answered), lower case.
QUESTIONS = (
    ("What is the capital of France?", ("paris",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What is 12 times 12?", ("144",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What gas do plants take in from the air?", ("carbon dioxide", "co2", "co₂")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("Translate 'thank you' into Spanish.", ("gracias",)),
    ("Write a Python function that returns the square of a number.", ("def ", "**2", "* x")),
    ("What is the largest ocean on Earth?", ("pacific",)),
)


def parrots(question: str, reply: str) -> bool:
    return question.lower().rstrip("?.") in reply.lower()


def ask_all(path: Path, tokens: int) -> tuple[list[str], float, float]:
    """The replies, the load time and the median generation tokens/s."""
    with Engine(EngineConfig(model_path=str(path), deterministic=True)) as engine:
        loaded = engine.wait_loaded()
        replies, speeds = [], []
        for i, (question, _) in enumerate(QUESTIONS):
            done = list(engine.generate(GenerateRequest(
                id=f"q{i}", messages=({"role": "user", "content": question},),
                max_tokens=tokens, temperature=0.0, deterministic=True)))[-1]
            replies.append(done.text)
            speeds.append(done.timings.generation_tokens_per_s)
    return replies, loaded.load_s, sorted(speeds)[len(speeds) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=96)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="covey-first-") as tmp:
        store = ModelStore(Path(tmp) / "models")
        for model in (GEMMA, QWEN):
            replies, load_s, tps = ask_all(store.ensure(model.name).path, args.tokens)
            answered = parroted = 0
            print(f"\n## {model.title} ({model.name}, {model.size / 1e6:.0f} MB)")
            for (question, words), reply in zip(QUESTIONS, replies, strict=True):
                ok = any(w in reply.lower() for w in words)
                echo = parrots(question, reply)
                answered += ok
                parroted += echo
                flat = " ".join(reply.split())[:90]
                print(f"- {'yes' if ok else 'no '}{' (parrot)' if echo else ''} {question} "
                      f"→ {flat}")
            print(f"answered {answered}/10, parroted {parroted}/10, load {load_s:.1f} s, "
                  f"median generation {tps:.1f} tokens/s")


if __name__ == "__main__":
    main()
