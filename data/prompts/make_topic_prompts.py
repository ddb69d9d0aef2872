"""Generate data/prompts/topics.jsonl: one prompt per topic word, for topical breadth.

    python data/prompts/make_topic_prompts.py --tokenizer DIR [--out FILE] [--num 3000] [--seed 0]

train.jsonl's templates cover many kinds of request but only a few hundred subjects, and a
drafter trained on them reached validation top-1 0.61 on held-out template prompts against
0.41 on the hand-written eval set. Here each prompt is about its own
subject: noun-like whole words of the target's tokenizer vocabulary (lower-case alphabetic
tokens with a leading space, at least 7 letters, with a noun ending or a plural s), each put
into one of the request forms below, some after a system prompt. Deterministic for a seed and a
tokenizer; prompts whose text is in eval.jsonl are dropped. Measured (docs/DRAFTER.md): new to
the drafter (validation loss 3.69 -> 2.84 after one epoch on their answers), but the eval set's
accept length did not move, so subjects were not what it missed.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # its sibling script, also when loaded by file path (tests)
    sys.path.insert(0, str(HERE))
from make_prompts import eval_texts  # noqa: E402

NOUN_ENDINGS = ("tion", "sion", "ment", "ness", "ism", "ity", "ology", "ship", "ance", "ence",
                "ist", "er", "or", "ure", "age", "ery", "cy")

FORMS = [
    "Tell me something interesting about {w}.",
    "What should a beginner know about {w}?",
    "Explain {w} in simple terms.",
    "Write a short poem about {w}.",
    "Give me three fun facts about {w}.",
    "Write a short story in which {w} play an important part.",
    "What are the pros and cons of {w}?",
    "Describe {w} to someone who has never heard of them.",
    "I'm writing an essay about {w}. Can you suggest an outline?",
    "What questions should I ask an expert on {w}?",
    "How have {w} changed over the last hundred years?",
    "Why do people care about {w}?",
    "Write a short paragraph for a school textbook about {w}.",
    "What is a common misconception about {w}?",
    "List five words associated with {w} and explain each briefly.",
    "How would you explain {w} to a ten-year-old?",
    "Write a haiku about {w}.",
    "What jobs involve working with {w}?",
    "Give me a quick quiz with three questions about {w}, with answers.",
    "My friend keeps talking about {w}. What is that about?",
    "Summarise what you know about {w} in three bullet points.",
    "What is the connection between {w} and {w2}?",
    "Compare {w} and {w2}.",
    "Write a dialogue between two people who disagree about {w}.",
    "Write a tweet about {w}.",
    "What are some good books or resources for learning about {w}?",
]

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Keep answers short.",
    "You are a friendly teacher.",
    "You are an enthusiastic science communicator.",
]


def topic_words(tokenizer_dir: str) -> list[str]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    words = set()
    for token in vocab:
        w = token[1:]
        if not (token.startswith("\u0120") and w.isalpha() and w.islower() and len(w) >= 7):
            continue
        plural = w.endswith("s") and not w.endswith(("ss", "us", "is"))
        if plural or w.endswith(NOUN_ENDINGS):
            words.add(w)
    return sorted(words)


def build(words: list[str], num: int, seed: int, eval_path: Path = HERE / "eval.jsonl") -> list[dict]:
    held_out = eval_texts(eval_path)
    rng = random.Random(seed)
    picked = rng.sample(words, min(num, len(words)))
    rows = []
    for i, w in enumerate(picked):
        text = rng.choice(FORMS).format(w=w, w2=rng.choice(words))
        if text.strip().lower() in held_out:
            continue
        if rng.random() < 0.2:
            rows.append({"id": f"topic-{i:05d}", "messages": [
                {"role": "system", "content": rng.choice(SYSTEMS)},
                {"role": "user", "content": text}]})
        else:
            rows.append({"id": f"topic-{i:05d}", "prompt": text})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder of the target's tokenizer")
    ap.add_argument("--out", default=str(HERE / "topics.jsonl"))
    ap.add_argument("--num", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = build(topic_words(args.tokenizer), args.num, args.seed)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(rows)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
