"""Drafter quantization: `eyas quantize-draft --fp8` (checkpoint.py) and loading (apply.py)."""
