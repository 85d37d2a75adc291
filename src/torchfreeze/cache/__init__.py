"""FeatureCache: compute a frozen, deterministic prefix once per sample, then replay it.

A frozen prefix whose inputs need no grad records no graph, but its forward
still runs on every step. If the prefix is deterministic and the data are the
same every epoch (no augmentation before it), its output for a sample never
changes, so it can be computed once and replayed. Over E epochs, with f the
prefix's share of forward FLOPs and backward ~ 2x forward, that is at most

    E(3 - 2f) / (f + 3E(1 - f))

times faster than the plain ``requires_grad=False`` loop (-> E as f -> 1).

The package is split by concern:

* ``_hook``: forward patches (instance attributes; copies and pickles of the
  model get the plain forward), prefix discovery for ``upto=``, placeholders
  and the cut proof;
* ``_storage``: the :class:`Storage` seam (one per namespace) and the byte
  budget the namespaces of a cache share;
* ``store`` (:class:`~torchfreeze.cache.store.SlabStore`), ``index``, ``slabs``,
  ``persist``: the feature store behind the seam: one dense slab per output
  tensor in RAM or in files, a tensor id index, and the ``path=`` directory
  that persists, is shared by the processes of a node and survives a killed writer;
* ``_path``: what a cache records in a ``path=`` store (namespace folders, the
  metadata it is checked against, the recorded prefix, each namespace's structure)
  and reads back: ``PathStore``, the one object a cache with ``path=`` calls;
* ``_guards``: every rule that can refuse or invalidate a replay, each written once
  with its message (input signature, trainable or changed tensors inside and
  outside the prefix modules, random ops, ids, ``validate=True`` digests): adding a
  guard touches this file;
* ``_feature_cache``: the public :class:`FeatureCache`, which orchestrates them
  (keys(), namespaces, replay, partial hits, storing).

Decisions worth knowing:

* **Parameter changes invalidate.** Each batch fingerprints the prefix's
  parameters and buffers (identity, ``data_ptr`` and the in-place version
  counter). If any changed every stored entry is dropped, recomputed on
  demand, ``invalidations`` is incremented and a :class:`UserWarning` names the tensor.
* **Refusals** (:class:`~torchfreeze.errors.CacheError`): trainable parameters
  in the prefix; active dropout or BatchNorm in train mode; outputs that are
  not a tensor, a flat tuple/list of tensors, or a mapping of tensors; a
  boundary output that requires grad; a path around the boundary.
* **Augmentation** before the cached prefix makes caching wrong. It cannot be
  detected in general; ``validate=True`` hashes every sample's inputs and
  raises when a known id arrives with different input.
"""

from ._feature_cache import FeatureCache
from ._storage import IdBatch, Storage, StorageMode

__all__ = ["FeatureCache", "IdBatch", "Storage", "StorageMode"]
