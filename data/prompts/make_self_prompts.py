"""Generate data/prompts/self.jsonl: user requests written by the target model itself.

    python data/prompts/make_self_prompts.py --model smollm2-135m-instruct [--out FILE]
        [--num 4000] [--seed 0] [--temperature 0.9] [--top-p 0.95] [--exclude FILE ...]

The target is fed only the chat template up to the start of a user turn (its default system
prompt, then `<|im_start|>user\\n`) and samples what a user would write there, until it closes the
turn. An instruction-tuned model has learnt the user side of its chats too, so the requests come
out in the phrasing, length and mix of subjects its own training chats had (the "Magpie" way of
making instruction data). Template prompts (train.jsonl, topics.jsonl) share a few dozen
phrasings, and a drafter trained on them reached 0.62 top-1 on held-out template prompts but 0.41
on the hand-written eval set; self-written requests are each phrased differently.

With --openers, each user turn starts with one of OPENERS (a few words a plain request begins
with: "How do I", "Translate into German:", "Give me", ...; `--openers forms` draws from
OPENERS_FORMS, other request forms), drawn at random per sample, and the
model writes the rest. The free requests run long and chatty (median 112 characters) where plain
one-line requests (median 57 in eval.jsonl) are what users type most; the openers and a
--max-chars limit steer the requests towards those without writing any of them by hand.

Kept: requests that closed their turn within --max-tokens, 16 to --max-chars characters, not starting with
something that is no request at all (a role tag), not starting like a prompt of eval.jsonl (first 36
characters), and not a repeat of an earlier
one's first 48 characters (case-insensitive), in this run or in the --exclude files (earlier runs
with other seeds). Deterministic for a seed and a model on one machine. Each kept line is
{"id": "self-SEED-NNNNN", "prompt": TEXT} ("ask-SEED-NNNNN" with --openers); train-drafter
applies the chat template.
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

END_OF_TURN = "<|im_end|>"

# How plain one-line requests begin: questions, instructions, conversions, translations,
# rewrites, small maths and greetings. Only the first words; the model writes the request.
OPENERS = (
    "What is", "What are", "What's the best way to", "What should I", "What happens when",
    "How do I", "How does", "How can I", "How many", "How long does it take to",
    "Why do", "Why is", "Why does", "When should I", "Where can I", "Who was", "Which is better,",
    "Is it true that", "Can you explain", "Can you help me", "Could you", "Should I",
    "Explain", "Describe", "Define", "Compare", "Summarise", "Summarize", "List", "Name",
    "Give me", "Tell me", "Suggest", "Recommend", "Help me", "Show me how to",
    "Write a short", "Write a poem about", "Write a story about", "Write a haiku about",
    "Write an email to", "Write a Python function that", "Write a function that",
    "Write a SQL query that", "Write a sentence", "Write a list of", "Create a", "Make a",
    "Plan a", "Draft a", "Rewrite this", "Correct the grammar:", "Paraphrase:", "Turn this into",
    "Convert", "Calculate", "Solve", "If a", "A train", "What is 15%", "Round",
    "Translate into French:", "Translate into Spanish:", "Translate into German:",
    "Translate into Italian:", "Translate to English:", "How do you say",
    "Hi!", "Hello,", "Hey, can you", "I'm", "I need", "I want to", "I have", "My",
    "Please", "Quick question:", "In one sentence,", "In three bullet points,",
)

# Other request forms than OPENERS (a second set, so a new round is not more of the same): yes/no
# and fact questions, named text kinds, editing and code tasks, formats, other languages, thanks.
OPENERS_FORMS = (
    "Is there", "Are there", "Do you know", "Can I", "Would it be", "Are",
    "What does", "What do", "What was", "What if", "What would happen if", "What's the difference between",
    "How much", "How often", "How far", "How to", "How would you", "Why are", "Who invented",
    "Who wrote", "When did", "Where is", "What is the capital of", "What year",
    "Give three", "Give an example of", "Give me a tip for", "Tell me a joke about",
    "Tell me a fun fact about", "Brainstorm", "Outline", "Generate", "Classify", "Sort these",
    "Find", "Fill in the blank:", "True or false:", "Spell", "Count", "Pick",
    "Write a limerick about", "Write a tweet about", "Write a product description for",
    "Write a cover letter for", "Write a thank-you note", "Write a slogan for", "Write a riddle",
    "Write a dialogue between", "Write a recipe for", "Write a JavaScript function that",
    "Write a bash command to", "Write a regex that", "Write a C program that", "Fix this code:",
    "What does this code do:", "Debug:", "Shorten this:", "Make this more formal:",
    "Make this sentence simpler:", "Continue the story:", "Finish this sentence:",
    "Format as a table:", "As a JSON object,", "In simple terms,", "Briefly,", "Step by step,",
    "Explain like I'm five:", "Translate into Portuguese:", "Translate into Dutch:",
    "Translate into Chinese:", "Translate into Japanese:", "What does this mean in English:",
    "Thanks!", "Good morning!", "Thank you, now", "Can you recommend", "Rate", "Convince me to",
    "Pretend you are", "Act as",
)
OPENER_SETS = {"plain": OPENERS, "forms": OPENERS_FORMS}


def user_turn_prefix(tokenizer) -> str:
    """The chat template rendered up to where a user's text begins: [system turn] + user header."""
    marker = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    if marker not in text:
        raise ValueError("the chat template does not place the user text verbatim")
    return text[:text.index(marker)]


def request_key(text: str) -> str:
    """What two requests must not share: their first 48 characters, case and spacing aside."""
    return " ".join(text.lower().split())[:48]


def eval_key(text: str) -> str:
    """What no training request may share with an evaluation prompt: its first 36 characters,
    case and spacing aside (so an eval prompt's opening words, not just its whole text, stay out)."""
    return request_key(text)[:36]


def keep_request(text: str, finish_reason: str, seen: set[str], banned: set[str],
                 max_chars: int = 600) -> bool:
    """Whether a sampled user turn becomes a prompt; records its key in `seen` when it does."""
    text = text.strip()
    if finish_reason != "stop" or not 16 <= len(text) <= max_chars:
        return False
    if text.startswith(("<|", "system", "assistant", "user")) or eval_key(text) in banned:
        return False
    key = request_key(text)
    if key in seen:
        return False
    seen.add(key)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(HERE / "self.jsonl"))
    ap.add_argument("--num", type=int, default=4000, help="requests to sample (kept: fewer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-chars", type=int, default=600, help="longest request kept")
    ap.add_argument("--openers", nargs="?", const="plain", default=None, choices=sorted(OPENER_SETS),
                    help="start each request with an opener of this set (bare: plain = OPENERS), "
                         "drawn at random")
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="prompt files whose requests must not be repeated")
    args = ap.parse_args(argv)

    from eyas import LLM, SamplingParams
    from eyas.prompts import read_prompt_file

    # read before the long sampling run, so a bad --exclude file fails at once
    seen = {request_key(spec.prompt) for path in args.exclude
            for spec in read_prompt_file(path) if spec.prompt is not None}
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, dtype=args.dtype,
              enable_prefix_caching=True)
    prefix = user_turn_prefix(llm.tokenizer)
    rng = random.Random(args.seed)
    openers = OPENER_SETS[args.openers] if args.openers else ("",)
    starts = [rng.choice(openers) for _ in range(args.num)]
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed * 1_000_003 + i, stop=(END_OF_TURN,))
              for i in range(args.num)]
    outs = llm.generate([prefix + start for start in starts], params, use_tqdm=True)
    banned = {eval_key(t) for t in eval_texts(HERE / "eval.jsonl")}
    kept = [start + o.text for start, o in zip(starts, outs)
            if keep_request(start + o.text, o.finish_reason, seen, banned, args.max_chars)]
    name = "ask" if args.openers else "self"
    with open(args.out, "w") as f:
        for i, text in enumerate(kept):
            f.write(json.dumps({"id": f"{name}-{args.seed}-{i:05d}", "prompt": text.strip()}) + "\n")
    print(f"kept {len(kept)} of {args.num} sampled requests -> {args.out} "
          f"({llm.last_stats['tok_s']:.0f} tok/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
