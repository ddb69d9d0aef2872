"""Throughput of eyas vs HF transformers `generate` on the same model, in one run.

Usage: python bench/engine_vs_hf.py [--model smollm2-135m-instruct] [--concurrency 1,4,16]
           [--new-tokens 128] [--threads 2] [--out docs/bench/engine_vs_hf.json]

At concurrency c, c requests of ~60 prompt tokens each generate exactly --new-tokens tokens
(EOS ignored) together; eyas runs them through continuous batching, HF as one padded batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

PROMPTS = [
    "Explain in a few paragraphs why the sky appears blue during the day and red at sunset, "
    "covering Rayleigh scattering, the role of the atmosphere, and what changes at dusk.",
    "Write a short story about a lighthouse keeper who discovers a message in a bottle that "
    "seems to be addressed to her, and describe what she decides to do next with it.",
    "Describe the main differences between Python lists, tuples, sets and dictionaries, "
    "with a small example of when each one is the right choice in everyday programs.",
    "You are planning a three day trip to a city you have never visited. Describe how you "
    "would choose what to see, where to eat, and how to get around without a car.",
]


def make_prompts(tok, n):
    base = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    tokenize=True) for p in PROMPTS]
    base = [list(b["input_ids"]) if isinstance(b, dict) or hasattr(b, "input_ids") else list(b) for b in base]
    return [base[i % len(base)] for i in range(n)]


def bench_eyas(llm, prompts, new_tokens):
    from eyas import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    return toks / dt, dt / new_tokens * 1000


def bench_hf(model, tok, prompts, new_tokens):
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    width = max(len(p) for p in prompts)
    device = model.device
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=4, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    toks = (out.shape[1] - width) * len(prompts)
    return toks / dt, dt / new_tokens * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (both engines)")
    ap.add_argument("--out", default="docs/bench/engine_vs_hf.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from eyas import LLM
    from eyas.hub import resolve_model

    path = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    llm = LLM(model=str(path), max_num_seqs=64, device=args.device, dtype=args.dtype,
              kv_cache_memory="4GiB")
    hf = None if args.no_hf else AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        prompts = make_prompts(llm.tokenizer, c)
        e_tps, e_ms = bench_eyas(llm, prompts, args.new_tokens)
        row = {"concurrency": c, "eyas_tok_s": round(e_tps, 1), "eyas_ms_step": round(e_ms, 1)}
        if hf is not None:
            h_tps, h_ms = bench_hf(hf, llm.tokenizer, prompts, args.new_tokens)
            row.update(hf_tok_s=round(h_tps, 1), hf_ms_step=round(h_ms, 1), speedup=round(e_tps / h_tps, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "dtype": args.dtype,
            "threads": args.threads, "torch": torch.__version__, "command": " ".join(sys.argv),
            "new_tokens": args.new_tokens, "prompt_tokens": [len(p) for p in make_prompts(llm.tokenizer, 4)]}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("| concurrency | eyas tok/s | HF tok/s | speedup |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['eyas_tok_s']} | {r.get('hf_tok_s', '-')} | {r.get('speedup', '-')} |")


if __name__ == "__main__":
    main()
