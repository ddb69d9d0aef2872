"""eyas: an LLM serving engine in plain PyTorch with lossless EAGLE-3 speculative decoding."""
from eyas.core import RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name):  # keep `import eyas` light: the engine pulls in transformers
    if name == "LLM":
        from eyas.llm import LLM

        return LLM
    if name == "LLMEngine":
        from eyas.engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
