"""SmolLM2-135M-Instruct: eyas greedy output is token-identical to HF transformers greedy.

A genuine near-tie may flip under fp32 reordering; it is allowed only as DESIGN.md defines it:
at the first differing token both tokens are within 1e-4 in log-probability under HF.
"""
import pytest
import torch

from eyas import LLM, SamplingParams

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "Give me three ideas for a birthday party.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Why do cats purr?",
]
NEW_TOKENS = 48


def check_close_or_tie(hf_model, prompt_ids, ours, ref, tol=1e-4):
    """Pass if equal, or if the first difference is a genuine near-tie under the reference."""
    if ours == ref:
        return
    k = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b) if any(
        a != b for a, b in zip(ours, ref)) else min(len(ours), len(ref))
    assert k < min(len(ours), len(ref)), f"lengths differ without a token difference: {len(ours)} vs {len(ref)}"
    ctx = torch.tensor([prompt_ids + ref[:k]])
    with torch.no_grad():
        logprobs = hf_model(ctx).logits[0, -1].float().log_softmax(-1)
    gap = abs(logprobs[ours[k]] - logprobs[ref[k]]).item()
    assert gap < tol, f"first difference at token {k}: ours {ours[k]} vs HF {ref[k]}, log-prob gap {gap:.2e}"


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def test_greedy_matches_hf(smollm2_path, hf_model):
    llm = LLM(model=str(smollm2_path), kv_cache_memory="256MiB", max_model_len=512)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    outs = llm.generate([{"messages": [{"role": "user", "content": p}]} for p in CHAT_PROMPTS], params)
    for prompt, out in zip(CHAT_PROMPTS, outs):
        ids = llm.engine.apply_chat_template([{"role": "user", "content": prompt}])
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        ref = gen[0, len(ids):].tolist()
        check_close_or_tie(hf_model, ids, out.token_ids, ref)
        assert out.finish_reason in ("stop", "length")
