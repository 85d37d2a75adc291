"""Every rule that can refuse or invalidate a FeatureCache replay, each written once.

A replay is valid only if the stored rows are what the prefix would compute now.
Each rule below guards one way that can fail, and owns its message:

=====================  ==============================================================
rule                   what it guards
=====================  ==============================================================
:func:`check_frozen`   a trainable parameter inside the prefix (a replay carries no
                       gradient to it)
:func:`check_deterministic` / :class:`RandomOps`
                       randomness in the prefix: dropout/BatchNorm by class, and any
                       random op that runs (``bernoulli``, ``rand*``, stochastic depth,
                       functional dropout, batch statistics) by the ops themselves
                       (the op rule lives in ``_random_ops``, shared with ``tfz.check``)
:func:`signature` / :func:`check_signature`
                       the prefix called with other shapes, dtypes, devices or options
                       (dynamic padding, another ``max_length``)
:func:`digest_inputs` / :func:`check_digests`
                       ``validate=True``: a known id with a different input
:class:`Lineage`       parameters and buffers outside the prefix modules whose values
                       reach the boundary's output (a ViT's ``self.pos``): watched
                       like the prefix's own; a trainable one is refused
:func:`grad_sources`   the boundary's output requires grad: from a trainable tensor
                       (refused, named) or only from ``requires_grad_()`` inside the
                       model (Hugging Face ``enable_input_require_grads``: allowed)
:func:`normalize_ids`  ids that cannot name a sample by value (floats, bools, objects
                       hashed by identity); 0-d integer tensors become ints
=====================  ==============================================================

The invalidation rule (a watched tensor changed: drop the entries, or refuse a
``path=`` store) is :class:`Watch`. :class:`Steady` checks a batch replayed like the
last one in one pass: it compares the input of every per-batch rule above, so a new
per-batch rule adds its input there too.
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .._compat import own_tensor_dicts, pytree, tensor_version, version_and_grad
from .._random_ops import DROPOUT
from .._random_ops import RandomOps as _RandomOps
from ..errors import CacheError
from ..norm import is_batchnorm
from ._hook import describe
from ._storage import IdBatch

__all__ = [
    "DROPOUT",
    "Lineage",
    "RandomOps",
    "Registrations",
    "Steady",
    "Watch",
    "check_deterministic",
    "check_digests",
    "check_frozen",
    "check_signature",
    "digest_inputs",
    "grad_sources",
    "is_deterministic",
    "normalize_ids",
    "signature",
]


def _where(module: nn.Module, name: str) -> str:
    return f"the prefix module {name!r} ({describe(module)})" if name else \
        f"this {describe(module)}"


# ------------------------------------------------------------------------ trainable
def check_frozen(module: nn.Module, name: str) -> None:
    """Refuse a prefix module with a trainable parameter."""
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        shown = ", ".join(trainable[:4]) + (", ..." if len(trainable) > 4 else "")
        raise CacheError(
            f"FeatureCache cannot cache {_where(module, name)}: {len(trainable)} of its "
            f"parameters are trainable ({shown}). A replayed output carries no gradient to "
            f"them. Freeze it first (tfz.freeze(model, '{name or '<its name>'}')) or cache a "
            "smaller, fully frozen prefix."
        )


def trainable_outside_error(boundary: str, names: list[str]) -> CacheError:
    shown = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
    return CacheError(
        f"FeatureCache(upto={boundary!r}): {shown} "
        f"{'is trainable and reaches' if len(names) == 1 else 'are trainable and reach'} the "
        "output of the boundary, outside the prefix modules (the model's own code uses it "
        "before the boundary returns: a class token, a position embedding). "
        "Replaying a stored output would silently cut its gradient. Freeze it too "
        f"(tfz.freeze(model, {names[0]!r})), or choose an earlier boundary."
    )


def grad_sources(out: list[torch.Tensor], params: dict[int, str],
                 inputs: set[int]) -> tuple[list[str], bool]:
    """Where the gradient of a boundary output would flow: (trainable tensors by name,
    whether a tensor given to the model requires grad). A leaf that is neither (made
    with ``requires_grad_()`` inside the model, as Hugging Face's
    ``enable_input_require_grads`` does) has nothing upstream to update."""
    names: list[str] = []
    from_input = False
    seen: set[int] = set()
    stack = [t.grad_fn for t in out if t.grad_fn is not None]
    for t in out:
        if t.requires_grad and t.grad_fn is None:
            if id(t) in params:
                names.append(params[id(t)])
            from_input |= id(t) in inputs
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        leaf = getattr(fn, "variable", None)
        if isinstance(leaf, torch.Tensor):
            if id(leaf) in params:
                names.append(params[id(leaf)])
            from_input |= id(leaf) in inputs
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return sorted(set(names)), from_input


def input_grad_error(boundary: str) -> CacheError:
    return CacheError(
        f"FeatureCache: the output of the boundary {boundary!r} requires grad because a "
        "tensor given to the model requires grad, and a replayed output would silently cut "
        "its gradient. Pass data that does not require grad, or run this call outside "
        "cache.keys()."
    )


def module_input_grad_error(module: nn.Module) -> CacheError:
    return CacheError(
        f"An input of the cached {describe(module)} requires grad, so replaying a stored "
        "output would silently cut its gradient. Cache a prefix whose inputs are data (not "
        "trainable activations), or run this call outside cache.keys(). (Hugging Face's "
        "gradient_checkpointing_enable() makes embedding outputs require grad: call "
        "model.disable_input_require_grads(), or cache with upto=, which knows that "
        "nothing upstream is trainable.)"
    )


# --------------------------------------------------------------------- randomness
def is_deterministic(module: nn.Module) -> bool:
    """No dropout module active and no BatchNorm using batch statistics (by class)."""
    return not any(
        (isinstance(m, DROPOUT) and m.training and m.p > 0)
        or (is_batchnorm(m) and (m.training or getattr(m, "running_mean", True) is None))
        for m in module.modules()
    )


def check_deterministic(module: nn.Module, name: str) -> None:
    """Refuse active dropout modules and BatchNorm on batch statistics (by class, before
    anything runs; :class:`RandomOps` catches every other random op when it runs)."""
    what = _where(module, name)
    for sub, m in module.named_modules():
        where = ".".join(p for p in (name, sub) if p) or "<root>"
        if isinstance(m, DROPOUT) and m.training and m.p > 0:
            raise CacheError(
                f"FeatureCache cannot cache {what}: dropout {where!r} (p={m.p}) is active "
                "because it is in train mode, so the output changes from call to call. "
                "Pass pin_eval=True to keep the cached prefix in eval mode through "
                "model.train(), or call .eval() on it."
            )
        if is_batchnorm(m) and (m.training or getattr(m, "running_mean", True) is None):
            raise CacheError(
                f"FeatureCache cannot cache {what}: BatchNorm {where!r} normalises with "
                "batch statistics (train mode, or no running statistics), so a sample's "
                "output depends on its batch. Freeze it with tfz.freeze(..., bn='eval') "
                "(the default: pinned in eval), pass pin_eval=True, or call .eval() on it."
            )


def random_error(where: str, op: str) -> CacheError:
    return CacheError(
        f"FeatureCache cannot cache this prefix: {op} runs inside {where} before the "
        "boundary returns (dropout, stochastic depth / DropPath, torch.rand*, bernoulli, or "
        "batch statistics in train mode), so the prefix's output changes from call to call "
        "and one draw would be replayed forever. Pass pin_eval=True to keep the cached "
        "prefix in eval mode through model.train(), or call .eval() on it."
    )


class RandomOps(_RandomOps):
    """The random-op detector of ``_random_ops`` (one rule, shared with ``tfz.check``):
    the first random op that runs; ``where()`` names the module running at that
    moment, and :meth:`check` refuses with the fix."""

    def __init__(self, where: Callable[[], str | None]) -> None:
        super().__init__(where)

    def check(self) -> None:
        if self.found is not None:
            raise random_error(*self.found)


# ---------------------------------------------------------------------- signature
_Sig = tuple[Any, ...]


def _sig(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # dim 0 is the batch (its size varies); every other dim, the dtype and the
        # device must match what the stored entries were computed from
        return ("tensor", value.shape[1:], value.dim(), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *map(_sig, value))
    if isinstance(value, dict):
        return ("dict", *((k, _sig(v)) for k, v in sorted(value.items(), key=str)))
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return describe(value)  # an object: only its type is compared


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Sig:
    """What a call was made with: per tensor argument its shape past the batch dim,
    dtype and device; the value of every plain argument; the type of other objects."""
    if kwargs:
        return (*map(_sig, args), *((k, _sig(v)) for k, v in sorted(kwargs.items())))
    return tuple(map(_sig, args))


def _show(sig: Any) -> str:
    if isinstance(sig, tuple) and sig and sig[0] == "tensor":
        _, shape, dim, dtype, device = sig
        per = f"per-sample shape {tuple(shape)}" if dim else "a 0-d tensor"
        name = str(dtype).replace("torch.", "")
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name} tensor of {per} on {device}"
    return repr(sig)


def _difference(stored: _Sig, now: _Sig) -> str:
    if len(stored) != len(now):
        return f"{len(now)} arguments now, {len(stored)} when stored"
    for i, (a, b) in enumerate(zip(stored, now)):
        if a == b:
            continue
        name = f"argument {i}"
        if isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], str) and \
                isinstance(a, tuple) and len(a) == 2 and a[0] == b[0]:
            name, a, b = f"argument {b[0]!r}", a[1], b[1]
        return f"{name} is {_show(b)} now, {_show(a)} when stored"
    return "the arguments differ"


def check_signature(where: str, stored: _Sig, now: _Sig, *, path: str | None) -> None:
    """Refuse a call whose signature differs from the one the entries were stored under."""
    if stored == now:
        return
    fix = (f"use another path= for inputs of this shape, or overwrite=True to empty the "
           f"store at {path}" if path is not None else "clear() the cache")
    raise CacheError(
        f"FeatureCache: {where} is called differently than when its entries were stored "
        f"({_difference(stored, now)}), so the stored features belong to other inputs "
        "(dynamic padding, another max_length?). Pad every batch to one fixed length "
        f"(e.g. padding='max_length'), or {fix}."
    )


# ---------------------------------------------------------------------- lineage
class Lineage(TorchFunctionMode):
    """Which parameters and buffers of the model each tensor's value depends on (one
    pass: the first one inside ``keys()``, until the boundary returns)."""

    def __init__(self, tensors: dict[int, str]) -> None:
        super().__init__()
        self.tensors = tensors
        self.of: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.active = True

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.active:
            return out
        sources: set[str] = set()
        for x in pytree.tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor):
                name = self.tensors.get(id(x))
                if name is not None:
                    sources.add(name)
                known = self.of.get(x)
                if known:
                    sources |= known
        if sources:
            frozen_sources = frozenset(sources)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and id(t) not in self.tensors:
                    self.of[t] = self.of.get(t, frozenset()) | frozen_sources
        return out

    def reaching(self, out: list[torch.Tensor]) -> set[str]:
        found: set[str] = set()
        for t in out:
            found |= self.of.get(t, frozenset())
            name = self.tensors.get(id(t))
            if name is not None:
                found.add(name)
        return found


def named_tensors(root: nn.Module) -> dict[int, str]:
    """id -> name of every parameter and buffer of ``root``."""
    return {id(t): n for n, t in (*root.named_parameters(remove_duplicate=False),
                                  *root.named_buffers(remove_duplicate=False))}


# ----------------------------------------------------------------------- watching
_DATA_PTR = torch.Tensor.data_ptr  # unbound: no method lookup per tensor
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_TRAINING = operator.attrgetter("training")


class Registrations:
    """Counts parameter/buffer/module assignments anywhere (torch's global registration
    hooks), so a watch rebuilds its flat list of tensors only when one happened."""

    count = 0
    installed = False

    @classmethod
    def bump(cls, *args: Any) -> None:
        cls.count += 1

    @classmethod
    def install(cls) -> None:
        if not cls.installed:
            from torch.nn.modules import module as _module

            _module.register_module_parameter_registration_hook(cls.bump)
            _module.register_module_buffer_registration_hook(cls.bump)
            _module.register_module_module_registration_hook(cls.bump)
            cls.installed = True


class Watch:
    """The tensors whose values the stored entries depend on, checked every batch.

    One flat pass per batch over C-level loops (``_version`` counters, ``data_ptr``,
    ``requires_grad`` and each module's ``training`` flag); names only on a finding.
    """

    def __init__(self) -> None:
        self.structure = -1  # Registrations.count when the flat lists were built
        self.named: list[tuple[str, nn.Module]] = []  # (label, module): prefix + boundary
        self.outside: list[tuple[str, nn.Module, str]] = []  # (name, owner, attribute)
        self.tensors: list[torch.Tensor] = []
        self.modules: list[nn.Module] = []
        self.random: list[tuple[str, nn.Module, nn.Module]] = []
        self.key: list[Any] = []
        self.fingerprint: dict[str, tuple[int, int, int]] = {}

    def names_and_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        for label, module in self.named:
            for name, t in (*module.named_parameters(), *module.named_buffers()):
                yield (f"{label}.{name}" if label else name), t
        yield from self.names_and_tensors_outside()

    def take_fingerprint(self) -> dict[str, tuple[int, int, int]]:
        # _version counts in-place writes (optimizer steps, copy_, load_state_dict);
        # data_ptr and id catch `.data =` and replaced tensors.
        return {name: (id(t), t.data_ptr(), version_and_grad(t)[0])
                for name, t in self.names_and_tensors()}

    def rebuild(self) -> None:
        dicts: list[dict[str, Any]] = []
        self.modules = []
        self.random = []
        for label, top in self.named:
            for m in top.modules():
                dicts += own_tensor_dicts(m)
                self.modules.append(m)
                if isinstance(m, DROPOUT) or is_batchnorm(m):
                    self.random.append((label, top, m))
        self.tensors = [t for d in dicts for t in d.values() if t is not None]
        self.tensors += [t for _, t in self.names_and_tensors_outside()]
        self.key = []
        self.structure = Registrations.count

    def stale(self) -> bool:
        """Whether a parameter, buffer or module was (re)assigned anywhere since
        :meth:`rebuild` (maybe here: rebuild)."""
        return self.structure != Registrations.count

    def names_and_tensors_outside(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name, owner, attr in self.outside:
            params, buffers = own_tensor_dicts(owner)
            t = params.get(attr, buffers.get(attr))
            if t is not None:
                yield name, t

    def _now(self) -> list[Any]:
        ts = self.tensors  # three C-level passes, no object per tensor
        return [*map(tensor_version, ts), *map(_REQUIRES_GRAD, ts), *map(_DATA_PTR, ts)]

    def changed(self) -> bool:
        """Whether any watched tensor was written, replaced or unfrozen since the last
        call (cheap: runs every batch); the caller checks what changed."""
        key = self._now()
        if key == self.key:
            return False
        self.key = key
        return True

    def unchanged(self) -> bool:
        """Whether no watched tensor changed since the last :meth:`changed` (which
        then stays the one to report a change)."""
        return self._now() == self.key

    def forget(self) -> None:
        """Make the next :meth:`changed` report a change (after a refusal)."""
        self.key = [None]

    def training(self) -> tuple[bool, ...]:
        return tuple(map(_TRAINING, self.modules))

    def check_frozen(self, boundary: str) -> None:
        for label, top in self.named:
            check_frozen(top, label)
        trainable = [n for n, t in self.names_and_tensors_outside() if t.requires_grad]
        if trainable:
            raise trainable_outside_error(boundary, trainable)

    def check_random(self) -> None:
        for label, top, m in self.random:
            if m.training and not is_deterministic(m):
                check_deterministic(top, label)

    def differences(self) -> list[str]:
        """Names of the watched tensors that changed since the last fingerprint (and
        take the new one)."""
        now = self.take_fingerprint()
        if now == self.fingerprint:
            return []
        changed = sorted(k for k in now.keys() | self.fingerprint.keys()
                         if now.get(k) != self.fingerprint.get(k))
        self.fingerprint = now
        return changed


class Steady:
    """What one namespace's last fully replayed batch was checked against, so that the
    next batch can be checked in one pass (the steady replay).

    Every input of a per-batch rule of the general path is compared here: nothing
    (re)registered since, the watched tensors (:meth:`Watch.unchanged`), the train/eval
    state (verified free of random ops when it was taken), the call signature, and the
    random modules' rule runs again. A per-batch rule added to the general path must add
    its input here too, or the steady replay would skip it. The caller checks the batch
    size, the namespace and that every id is stored.
    """

    __slots__ = ("signature", "training")

    def __init__(self, watch: Watch, signature: _Sig) -> None:
        self.training = watch.training()
        self.signature = signature

    def holds(self, watch: Watch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call passes every rule as the snapshot's batch did (``False``: the
        general path decides); raises like the general path for a random module. (A
        rebuilt watch has no key until the general path has checked it.)"""
        if watch.stale() or not watch.unchanged() or watch.training() != self.training or \
                signature(args, kwargs) != self.signature:
            return False
        if watch.random:
            watch.check_random()
        return True


def changed_error(path: str, changed: list[str]) -> CacheError:
    return CacheError(
        f"FeatureCache(path={path!r}): {changed[0]!r} of the cached prefix changed "
        f"({len(changed)} tensor(s)), so the stored entries belong to other weights. A "
        "persistent store keeps one prefix: create the FeatureCache again with another "
        "path=, or with overwrite=True to empty it."
    )


def warn_dropped(changed: list[str], dropped: int) -> None:
    warnings.warn(
        f"FeatureCache: {changed[0]!r} of the cached prefix changed since its outputs "
        f"were stored ({len(changed)} tensor(s) changed); the {dropped} stored entries "
        "were dropped and will be recomputed.",
        UserWarning,
        stacklevel=6,
    )


# ------------------------------------------------------------------------- ids
def _not_an_id(i: object) -> CacheError:
    return CacheError(
        f"sample id {i!r} ({describe(i)}) cannot be a cache key: an id must name a sample by "
        "value; use ints or strings (a dataset index, a file name)."
    )


def normalize_ids(sample_ids: Any) -> tuple[IdBatch, int]:
    """A 1-D long CPU tensor for integer ids (tensors, 0-d integer tensors, numpy), a
    list for other hashables; anything that cannot name a sample by value is refused."""
    if isinstance(sample_ids, torch.Tensor):
        if sample_ids.dtype is torch.long and sample_ids.dim() == 1 and sample_ids.is_cpu:
            return sample_ids, sample_ids.shape[0]  # the usual batch: nothing to convert
        if sample_ids.dim() != 1 or sample_ids.is_floating_point() or sample_ids.is_complex() \
                or sample_ids.dtype == torch.bool:
            raise CacheError(
                f"sample_ids must be a 1-D integer tensor or a sequence of hashables, got a "
                f"{sample_ids.dtype} tensor of shape {tuple(sample_ids.shape)}."
            )
        if sample_ids.dtype != torch.long or sample_ids.device.type != "cpu":
            sample_ids = sample_ids.to("cpu", torch.long)
        return sample_ids, sample_ids.shape[0]
    if hasattr(sample_ids, "tolist") and not isinstance(sample_ids, (str, bytes)):
        sample_ids = sample_ids.tolist()  # numpy arrays
    if isinstance(sample_ids, (str, bytes)) or not isinstance(sample_ids, Iterable):
        raise CacheError(
            f"sample_ids must be a sequence with one id per sample, got "
            f"{describe(sample_ids)}."
        )
    ids = list(sample_ids)
    for k, i in enumerate(ids):
        if isinstance(i, torch.Tensor):
            # a tensor hashes by identity: an epoch later the same index is another key
            if i.dim() != 0 or i.is_floating_point() or i.is_complex() or \
                    i.dtype == torch.bool:
                raise _not_an_id(i)
            ids[k] = i = int(i.item())
        elif type(i).__module__ == "numpy" and hasattr(i, "item"):
            ids[k] = i = i.item()
        if isinstance(i, bool) or not isinstance(i, Hashable) or isinstance(i, float) or \
                type(i).__hash__ is object.__hash__:
            raise _not_an_id(i)
    if ids and all(type(i) is int for i in ids):
        return torch.tensor(ids, dtype=torch.long), len(ids)
    return ids, len(ids)


# ------------------------------------------------------------------- validate=True
def is_batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def digest_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int,
                  skip: type | None = None) -> list[bytes]:
    """One hash per sample of the batched tensor arguments (and of the others)."""
    hashers = [hashlib.blake2b(digest_size=16) for _ in range(batch)]
    for value in (*args, *(v for _, v in sorted(kwargs.items()))):
        if skip is not None and isinstance(value, skip):
            continue
        if is_batched(value, batch):
            flat = value.detach().reshape(batch, -1).contiguous()
            if flat.dtype == torch.bool:
                flat = flat.to(torch.uint8)
            raw = flat.view(torch.uint8).cpu()
            try:
                arr = raw.numpy()
            except RuntimeError as exc:  # torch built without numpy
                raise CacheError("validate=True needs numpy to hash inputs.") from exc
            tag = f"{value.dtype}{tuple(value.shape[1:])}".encode()
            for i in range(batch):
                hashers[i].update(tag)
                hashers[i].update(arr[i].tobytes())
        else:
            tag = repr(value if not isinstance(value, torch.Tensor)
                       else (value.dtype, tuple(value.shape))).encode()
            for h in hashers:
                h.update(tag)
    return [h.digest() for h in hashers]


def check_digests(ids: IdBatch, digests: list[bytes], hashes: dict[Hashable, bytes],
                  call: int) -> None:
    """Refuse a known id whose input hash differs; record the new ones."""
    keys = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    seen: dict[Hashable, bytes] = {}
    for key, digest in zip(keys, digests):
        known = hashes.get(key, seen.get(key))
        if known is not None and known != digest:
            where = f" (call {call + 1} of the boundary in this keys() block)" if call else ""
            raise CacheError(
                f"Sample id {key!r} came back with a different input{where} than the one "
                "its output was stored from. An id must always name the same input: data "
                "augmentation or a changed dataset before the cached prefix, or a batch "
                "whose ids do not match its rows, or a model that calls the prefix in a "
                "different order than before (calls are keyed by their order inside one "
                "keys() block). Move augmentation after the prefix, fix the ids, or do not "
                "cache."
            )
        seen.setdefault(key, digest)
    for key, digest in seen.items():
        hashes.setdefault(key, digest)
