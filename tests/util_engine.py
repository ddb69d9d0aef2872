"""A tiny random Llama in an HF-style folder with the SmolLM2 tokenizer, and engine factories."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def make_random_drafter(target: Path, out: Path, draft_vocab: int = 4096) -> Path:
    """Save (fp32) a random-init EAGLE-3 drafter for the target folder, its draft vocabulary a
    random draft_vocab-token subset of the target's."""
    from transformers import AutoConfig

    from eyas.models.eagle3 import Eagle3Drafter, build_vocab_maps, random_drafter_config, save_drafter

    cfg = AutoConfig.from_pretrained(target)
    drafter = Eagle3Drafter(random_drafter_config(cfg, draft_vocab_size=draft_vocab))
    drafter.init_random_(torch.Generator().manual_seed(0))
    counts = torch.zeros(cfg.vocab_size)
    counts[torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(1))[:draft_vocab]] = 1.0
    drafter.set_vocab_maps(*build_vocab_maps(counts, draft_vocab))
    return save_drafter(drafter, out, dtype=torch.float32)


def make_tiny_llama_folder(folder: Path, tokenizer_src: Path, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer random LlamaForCausalLM that uses the tokenizer files of tokenizer_src."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    src_cfg = AutoConfig.from_pretrained(tokenizer_src)
    kw = dict(vocab_size=src_cfg.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=src_cfg.bos_token_id, eos_token_id=src_cfg.eos_token_id, tie_word_embeddings=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tokenizer_src / name).is_file() and name != "generation_config.json":
            shutil.copy(tokenizer_src / name, folder / name)
    return folder
