"""Reading checkpoints of every common format into one flat ``name -> tensor`` dict.

Formats: ``torch.save`` pickles (``.pt``/``.pth``/``.bin``/``.ckpt``/``.pkl``, zip or
legacy), ``.safetensors`` (recognised by content, whatever the extension),
Hugging Face-style folders (``model.safetensors``, ``pytorch_model.bin`` or their
sharded ``*.index.json``), in-memory state dicts and ``nn.Module`` objects.
Training checkpoints (``{"epoch": ..., "state_dict": ...}``, ``{"model": ...}``,
Lightning ``.ckpt``) are unwrapped down to their weights.

Pickles are read with ``torch.load(weights_only=True)``: a pickle can run any code
while it is read, so anything beyond tensors and plain containers needs the
explicit ``unsafe_pickle=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import nn

from ._report import Report, fmt_count, short_path
from .errors import LoadError

__all__ = [
    "CheckpointInfo",
    "CheckpointRow",
    "Source",
    "inspect_checkpoint",
    "read_checkpoint",
    "read_state_dict",
]

#: What :func:`read_state_dict` and ``load_pretrained`` accept.
Source = Union[str, "os.PathLike[str]", Mapping[str, Any], nn.Module]

# Hugging Face's file names, in the order transformers itself prefers them.
_HF_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
# Keys under which training scripts nest the weights, most specific first.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network",
                 "model_state", "weights")
# Children of a training checkpoint that hold tensors but are not weights.
_NOT_WEIGHTS = re.compile(r"optim|sched|scaler|loop|callback|rng|ema", re.I)
_SCALARS = (int, float, str, bool)


@dataclass
class _Checkpoint:
    tensors: dict[str, torch.Tensor]
    origin: str
    format: str
    unwrapped: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# files


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length and a JSON
    # object; zip and legacy torch pickles cannot look like that.
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + n <= size


def _safetensors_api() -> Any:
    try:
        import safetensors
    except ImportError:
        raise LoadError(
            "reading a .safetensors checkpoint needs the 'safetensors' package, which is not "
            "installed. Install it with: pip install 'torchfreeze[safetensors]' "
            "(or pip install safetensors)."
        ) from None
    return safetensors


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    safetensors = _safetensors_api()
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:
        raise LoadError(
            f"cannot read {path} as safetensors ({_short(exc)}); the file "
            f"({_size(path)}) is corrupt or truncated. Download or save it again."
        ) from exc
    return tensors, meta


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200] + ("…" if len(text) > 200 else "")


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "size unknown"


def _refused_global(exc: BaseException) -> str | None:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if match is None:
        return None
    name = match.group(1)
    if name.startswith("torch.") and not _resolves(name):
        return None  # a name cut short: the pickle stream is truncated, not unsafe
    return name


def _resolves(dotted: str) -> bool:
    # look only at modules already imported: never import what a file names
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


_ZIP_MAGIC = b"PK\x03\x04"


def _sniff(path: Path) -> str | None:
    """What a file is when it cannot be a ``torch.save`` file, else None.

    ``torch.save`` writes a zip archive (``PK``) or, in its legacy format, a
    pickle (protocol 2+, first byte 0x80); a tar archive is the oldest format.
    Anything else is named here, so no error suggests unsafe loading for a file
    that is not a pickle at all.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
        return None
    if len(head) > 262 and head[257:262] == b"ustar":
        return None
    if not head:
        return "an empty file (0 bytes)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a checkpoint format torchfreeze knows (it starts with bytes {head[:8]!r})"
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return "a text file that starts like JSON"
        if isinstance(data, dict):
            keys = ", ".join(repr(k) for k in list(data)[:5])
            hint = " (a model config)" if {"architectures", "model_type"} & set(data) else ""
            return f"a JSON file{hint} with keys {keys}"
        return f"a JSON {type(data).__name__}"
    first = stripped.splitlines()[0][:60] if stripped else ""
    return f"a text file (it starts with {first!r})"


def _read_pickle(path: Path, *, unsafe_pickle: bool) -> Any:
    what = _sniff(path)
    if what is not None:
        raise LoadError(
            f"{path} is {what}, not a checkpoint. Expected weights: a .safetensors file, a "
            "torch.save file (.pt/.pth/.bin/.ckpt), a Hugging Face model folder or a sharded "
            "*.index.json. For a Hugging Face model, pass its folder or model.safetensors."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as exc:
        name = None if unsafe_pickle else _refused_global(exc)
        if name is not None:
            raise LoadError(
                f"{path} contains a pickled Python object ({name}), not just tensors. "
                "torchfreeze reads pickles with torch.load(weights_only=True) because "
                "unpickling arbitrary objects can execute arbitrary code. If you trust this "
                "file, pass unsafe_pickle=True (on the command line: --unsafe-pickle); or "
                "allow just that class with "
                f"torch.serialization.add_safe_globals([{name}])."
            ) from exc
        raise _corrupt(path, exc) from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _corrupt(path: Path, exc: BaseException) -> LoadError:
    why = _short(exc)
    if "weights_only" in why:
        # torch's text suggests weights_only=False; for a damaged file that is never
        # the fix (refused classes are handled before, with their own message)
        why = "the pickle stream is damaged"
    return LoadError(
        f"cannot read {path} ({_size(path)}) as a PyTorch checkpoint: {why}. The "
        "file is corrupt, truncated or not a checkpoint; save or download it again."
    )


def _read_sharded(index: Path, *, unsafe_pickle: bool) -> tuple[dict[str, torch.Tensor], str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("'weight_map' is not an object")
    except Exception as exc:
        raise LoadError(
            f"cannot read the shard index {index}: {_short(exc)}. A sharded checkpoint "
            "index is JSON with a 'weight_map' {name: shard file}; save or download it again."
        ) from exc
    shards = list(dict.fromkeys(weight_map.values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise LoadError(
                f"shard {shard} named in {index} does not exist next to it. Download every "
                f"shard ({len(shards)} files) into {index.parent}."
            )
        tensors.update(_read_file(shard_path, unsafe_pickle=unsafe_pickle).tensors)
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise LoadError(
            f"{len(absent)} tensors listed in {index} are in none of its shards (e.g. "
            f"{absent[0]!r} in {weight_map[absent[0]]}); the shards are incomplete or from "
            "another checkpoint. Download the checkpoint again."
        )
    kind = "safetensors" if str(shards[0]).endswith(".safetensors") else "pickle"
    return tensors, f"sharded {kind} ({len(shards)} shards)"


def _pick_in_folder(folder: Path) -> Path:
    for name in _HF_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    )
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates[:8]) or "no weight files"
    raise LoadError(
        f"folder {folder} has none of {', '.join(_HF_FILES)} (found: {found}). Pass the "
        "weights file itself instead of the folder."
    )


def _read_file(path: Path, *, unsafe_pickle: bool) -> _Checkpoint:
    if path.name.endswith(".index.json"):
        tensors, fmt = _read_sharded(path, unsafe_pickle=unsafe_pickle)
        return _Checkpoint(tensors, str(path), fmt)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        tensors, meta = _read_safetensors(path)
        return _Checkpoint(tensors, str(path), "safetensors", metadata=meta)
    obj = _read_pickle(path, unsafe_pickle=unsafe_pickle)
    ckpt = _unwrap(obj, str(path))
    ckpt.format = "pickle (torch.load)"
    return ckpt


def _read_path(path: Path, *, unsafe_pickle: bool) -> _Checkpoint:
    if not path.exists():
        raise LoadError(
            f"checkpoint {path} does not exist (looked at {path.absolute()}). Check the path; "
            "torchfreeze reads local files only (fetch hub models first, e.g. with "
            "huggingface_hub.snapshot_download)."
        )
    if path.is_dir():
        inner = _pick_in_folder(path)
        ckpt = _read_file(inner, unsafe_pickle=unsafe_pickle)
        ckpt.format = f"folder: {inner.name}, {ckpt.format}"
        ckpt.origin = str(path)
        return ckpt
    return _read_file(path, unsafe_pickle=unsafe_pickle)


# ---------------------------------------------------------------------------
# unwrapping nested checkpoints


def _has_tensors(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, nn.Module):
        return True
    if isinstance(obj, Mapping) and depth < 6:
        return any(_has_tensors(v, depth + 1) for v in obj.values())
    return False


def _unwrap(obj: Any, origin: str) -> _Checkpoint:
    trail: list[str] = []
    metadata: dict[str, str] = {}
    while True:
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise LoadError(
                f"{origin} holds a {type(obj).__name__}, not a state_dict. Save the weights "
                "with torch.save(model.state_dict(), path) or pass the model itself."
            )
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        metadata.update({str(k): str(v) for k, v in obj.items() if isinstance(v, _SCALARS)})
        children = [k for k, v in obj.items()
                    if isinstance(v, (Mapping, nn.Module)) and _has_tensors(v)]
        chosen = next((k for k in _WRAPPER_KEYS if k in children), None)
        if chosen is None:
            weights = [k for k in children if not _NOT_WEIGHTS.search(str(k))]
            if len(weights) == 1:
                chosen = weights[0]
        if chosen is None:
            break
        trail.append(str(chosen))
        obj = obj[chosen]
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    _flatten(obj, "", tensors, dropped)
    where = origin + "".join(f"[{k!r}]" for k in trail)
    if not tensors:
        keys = ", ".join(repr(str(k)) for k in list(obj)[:8]) or "(empty)"
        raise LoadError(
            f"{where} contains no tensors (keys: {keys}). Pass the state_dict itself, "
            "e.g. checkpoint['<key with the weights>']."
        )
    return _Checkpoint(tensors, origin, "", tuple(trail), metadata, dropped)


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], dropped: list[str]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, nn.Module):
            _flatten(value.state_dict(), name + ".", out, dropped)
        elif isinstance(value, Mapping):
            _flatten(value, name + ".", out, dropped)
        else:
            dropped.append(name)


# ---------------------------------------------------------------------------
# public readers


def read_checkpoint(source: Source, *, unsafe_pickle: bool = False) -> _Checkpoint:
    """:func:`read_state_dict` plus where the tensors came from (library use)."""
    if isinstance(source, nn.Module):
        sd = source.state_dict()
        return _Checkpoint(dict(sd), f"{type(source).__name__} object", "nn.Module")
    if isinstance(source, Mapping):
        ckpt = _unwrap(source, "the given dict")
        ckpt.format = "dict"
        return ckpt
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source).expanduser(), unsafe_pickle=unsafe_pickle)
    raise LoadError(
        f"cannot load weights from a {type(source).__name__}. Pass a checkpoint path "
        "(.pt/.pth/.bin/.ckpt/.pkl/.safetensors, a Hugging Face folder or *.index.json), "
        "a state_dict, or an nn.Module."
    )


def read_state_dict(source: Source, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read any supported checkpoint into a flat ``{name: tensor}`` dict.

    Args:
        source: a path (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``,
            ``.safetensors``, a Hugging Face-style folder, a sharded
            ``*.index.json``), a (possibly nested) state dict, or an ``nn.Module``.
            Training checkpoints are unwrapped (``state_dict``, ``model``,
            ``module``, Lightning ``.ckpt``); nested dicts are flattened with dots.
        unsafe_pickle: read pickles with ``weights_only=False``. A pickle can run
            arbitrary code while it is read: only for files you trust.

    Returns:
        Checkpoint key -> tensor (on the CPU for files), in checkpoint order.

    Raises:
        LoadError: the path is missing, the file is unreadable, corrupt or
            truncated, a pickle holds objects other than tensors (without
            ``unsafe_pickle``), or there are no tensors in it.

    Example:
        >>> import torch.nn as nn, torchfreeze.load as tl
        >>> sd = tl.read_state_dict({"epoch": 3, "state_dict": nn.Linear(2, 1).state_dict()})
        >>> sorted(sd)
        ['bias', 'weight']
    """
    return read_checkpoint(source, unsafe_pickle=unsafe_pickle).tensors


# ---------------------------------------------------------------------------
# inspect


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CheckpointRow:
    """One row of :class:`CheckpointInfo`: a module prefix, or one tensor.

    Attributes:
        name: module prefix (``""`` for top-level tensors) or tensor name.
        tensors: number of tensors in the row.
        params: number of floating-point (and complex) values in them: what
            can be a parameter. Integer tensors (``position_ids``, BatchNorm's
            ``num_batches_tracked``) are never counted; float buffers (running
            statistics) are, as a checkpoint does not say which is which.
        shapes: each tensor's shape, row order.
        dtypes: distinct dtypes, first-seen order.
        nbytes: bytes of tensor data.
    """

    name: str
    tensors: int
    params: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class CheckpointInfo(Report):
    """The module tree of a checkpoint: tensors, shapes, dtypes, parameter counts.

    Attributes:
        source: where it was read from.
        format: e.g. ``"safetensors"``, ``"pickle (torch.load)"``, ``"folder: ..."``.
        rows: one per module prefix (``depth`` given) or per tensor.
        tensors, params, nbytes: totals over the checkpoint.
        dtypes: dtype -> number of tensors.
        depth: the ``depth`` asked for.
        unwrapped: keys descended to reach the weights (e.g. ``("state_dict",)``).
        metadata: scalar entries beside the weights (epoch, versions, safetensors
            metadata), as strings.
    """

    source: str
    format: str
    rows: tuple[CheckpointRow, ...]
    tensors: int
    params: int
    nbytes: int
    dtypes: dict[str, int]
    depth: int | None = None
    unwrapped: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def _rich(self) -> RenderableType:
        table = Table(title=f"checkpoint {short_path(self.source)}", title_justify="left")
        table.add_column("tensor" if self.depth is None else "module", overflow="fold",
                         ratio=1)
        table.add_column("tensors", justify="right", no_wrap=True)
        table.add_column("params", justify="right", no_wrap=True)
        table.add_column("shape", no_wrap=True)
        table.add_column("dtype", no_wrap=True)
        for r in self.rows:
            if len(r.shapes) <= 2:
                shape = ", ".join(_fmt_shape(s) for s in r.shapes)
            else:
                shape = f"{len(set(r.shapes))} shapes"
            table.add_row(r.name or "(top level)", str(r.tensors), fmt_count(r.params),
                          shape, ", ".join(r.dtypes))
        dtypes = ", ".join(f"{k} x{v}" for k, v in self.dtypes.items())
        lines: list[RenderableType] = [table, Text(
            f"{self.tensors} tensors, {fmt_count(self.params)} values "
            f"({self.nbytes / 2**20:.1f} MiB; {dtypes}); format: {self.format}"
            + (f"; weights under {''.join(f'[{k!r}]' for k in self.unwrapped)}"
               if self.unwrapped else ""), style="bold")]
        if self.metadata:
            meta = ", ".join(f"{k}={v}" for k, v in list(self.metadata.items())[:8])
            lines.append(Text(f"metadata: {meta}", style="dim"))
        return Group(*lines)


def _can_be_parameter(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def inspect_checkpoint(
    source: Source, *, depth: int | None = None, unsafe_pickle: bool = False
) -> CheckpointInfo:
    """Describe a checkpoint's module tree without loading it into a model.

    Args:
        source: anything :func:`read_state_dict` accepts.
        depth: group tensors by the first ``depth`` dotted levels of their module
            path; ``None`` lists every tensor.
        unsafe_pickle: see :func:`read_state_dict`.

    Returns:
        A :class:`CheckpointInfo` (prints as a table; ``to_dict()`` for JSON).

    Raises:
        LoadError: as :func:`read_state_dict`; also for a negative ``depth``.

    Example:
        >>> import torch.nn as nn, torchfreeze.load as tl
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> info = tl.inspect_checkpoint(net, depth=1)
        >>> [(r.name, r.tensors, r.params) for r in info.rows]
        [('0', 2, 40), ('1', 5, 32)]
    """
    if depth is not None and depth < 0:
        raise LoadError(f"depth must be None or >= 0, got {depth}; use depth=1 for top-level.")
    ckpt = read_checkpoint(source, unsafe_pickle=unsafe_pickle)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in ckpt.tensors.items():
        key = name if depth is None else ".".join(name.split(".")[:-1][:depth])
        groups.setdefault(key, []).append((name, t))
    rows = tuple(
        CheckpointRow(
            name=key,
            tensors=len(items),
            params=sum(t.numel() for _, t in items if _can_be_parameter(t)),
            shapes=tuple(tuple(t.shape) for _, t in items),
            dtypes=tuple(dict.fromkeys(_dtype(t) for _, t in items)),
            nbytes=sum(t.numel() * t.element_size() for _, t in items),
        )
        for key, items in groups.items()
    )
    values = list(ckpt.tensors.values())
    return CheckpointInfo(
        source=ckpt.origin,
        format=ckpt.format,
        rows=rows,
        tensors=len(values),
        params=sum(t.numel() for t in values if _can_be_parameter(t)),
        nbytes=sum(r.nbytes for r in rows),
        dtypes=dict(Counter(_dtype(t) for t in values)),
        depth=depth,
        unwrapped=ckpt.unwrapped,
        metadata=ckpt.metadata,
    )
