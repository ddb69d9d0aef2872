"""BenchConfig: what one `eyas bench` run measures (modes, concurrency sweep, lengths), validated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from eyas.errors import InvalidRequestError

MODES = ("nospec", "chain", "tree", "adaptive")
"""Engine modes, in the order they run. Every mode but nospec needs a draft."""
PEERS = ("hf",)
"""Reference implementations run on the same prompts (mode name = peer name)."""
DEFAULT_CONCURRENCY = (1, 4, 8, 16, 32, 64)
CPU_LENS = (128, 128)  # (input_len, output_len) defaults on CPU
GPU_LENS = (1024, 1024)  # ... and on a GPU


def default_num_prompts(concurrency: int) -> int:
    """Requests finished per concurrency level when --num-prompts is not given: two full waves,
    at least 32. At low concurrency a level of 8 requests lasted 7 s at c=4 on this project's
    CPU, where the machine's speed drifts by 10-25% over minutes, and its rate leant on the
    acceptance of a few prompts; 32 requests also make the end of the level (its drain, see
    metrics.py) a smaller share of it."""
    return max(2 * concurrency, 32)


def parse_int_list(field: str, text: str) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8), with an error naming `field` for anything else."""
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise InvalidRequestError(field, f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InvalidRequestError(field, f"expected at least one value, got {text!r}")
    return values


def parse_names(text: str) -> tuple[str, ...]:
    """'nospec, chain' -> ('nospec', 'chain')."""
    return tuple(x for x in text.replace(" ", "").split(",") if x)


def _positive(field: str, value: Optional[int]) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidRequestError(field, f"must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class BenchConfig:
    """One bench run. None means "pick the default" (see `resolved`)."""

    modes: Optional[tuple[str, ...]] = None  # None: all MODES with a draft, else nospec only
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    input_len: Optional[int] = None  # None: 128 on CPU, 1024 on GPU
    output_len: Optional[int] = None  # None: 128 on CPU, 1024 on GPU
    num_prompts: Optional[int] = None  # per concurrency level; None: default_num_prompts(c)
    temperature: float = 0.0
    peers: tuple[str, ...] = ()
    warmup: int = 2  # untimed requests per engine before the sweep
    # One untimed pass over every level (other prompts, up to 16 output tokens) before the first
    # mode: one-off per-shape costs (oneDNN primitive creation on CPU, kernel autotuning) are
    # process-wide, so otherwise they land on whichever mode runs first.
    prewarm: bool = True
    # rounds >= 2: every level runs `rounds` times per mode, the modes interleaved (a round runs
    # them in order, the next in reverse) on engines that all stay alive, each round on fresh
    # prompts; a level's record sums its rounds. Slow drift of a shared machine then lands on
    # every mode alike instead of on whichever ran during it.
    rounds: int = 1

    def __post_init__(self):
        if self.modes is not None:
            object.__setattr__(self, "modes", tuple(self.modes))
            if not self.modes:
                raise InvalidRequestError("modes", "give at least one mode")
            unknown = [m for m in self.modes if m not in MODES]
            if unknown:
                raise InvalidRequestError("modes", f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
            if len(set(self.modes)) != len(self.modes):
                raise InvalidRequestError("modes", f"a mode is listed twice: {','.join(self.modes)}")
        object.__setattr__(self, "concurrency", tuple(self.concurrency))
        if not self.concurrency:
            raise InvalidRequestError("concurrency", "give at least one level")
        for c in self.concurrency:
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise InvalidRequestError("concurrency", f"every level must be an integer >= 1, got {c!r}")
        if len(set(self.concurrency)) != len(self.concurrency):
            raise InvalidRequestError("concurrency", f"a level is listed twice: {self.concurrency}")
        _positive("input_len", self.input_len)
        _positive("output_len", self.output_len)
        _positive("num_prompts", self.num_prompts)
        _positive("rounds", self.rounds)
        if not self.temperature >= 0.0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        object.__setattr__(self, "peers", tuple(self.peers))
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise InvalidRequestError("peer", f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidRequestError("warmup", f"must be an integer >= 0, got {self.warmup!r}")

    def resolved(self, has_draft: bool, on_gpu: bool) -> "BenchConfig":
        """Fill the defaults. Modes other than nospec given without a draft are an error; with no
        modes given and no draft, only nospec runs."""
        modes = self.modes
        if modes is None:
            modes = MODES if has_draft else ("nospec",)
        elif not has_draft:
            spec = [m for m in modes if m != "nospec"]
            if spec:
                raise InvalidRequestError("modes", f"mode {spec[0]!r} needs a drafter: pass --draft "
                                                   "or use --modes nospec")
        modes = tuple(sorted(modes, key=MODES.index))  # nospec first: later speedups can use it
        lens = GPU_LENS if on_gpu else CPU_LENS
        return dataclasses.replace(self, modes=modes,
                                   input_len=self.input_len or lens[0], output_len=self.output_len or lens[1])

    def prompts_at(self, concurrency: int) -> int:
        """Requests that finish at one concurrency level."""
        return self.num_prompts or default_num_prompts(concurrency)


def check_fits(max_model_len: int, input_len: int, output_len: int) -> None:
    """Every request needs input_len + output_len positions."""
    if input_len + output_len > max_model_len:
        raise InvalidRequestError(
            "input_len", f"input_len + output_len = {input_len} + {output_len} = {input_len + output_len} "
                         f"exceeds max_model_len={max_model_len} (raise --max-model-len or shorten the lengths)")
