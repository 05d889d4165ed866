"""Fixed-shape numpy batches from encoded examples: length buckets, per-host shards,
deterministic order given a seed, and a checkpointable position (grain).

The batch plan is global: every host computes the same plan (the epoch's permutation from
``seed``, examples grouped by length bucket into *global* batches of ``batch_size *
shard_count`` rows, the batches shuffled), then takes its own ``batch_size`` rows of each
global batch. So at every step all hosts see the same bucket (same shapes, one compiled
program per bucket) and together they see each example of an epoch exactly once.

The iterator is grain's (``MapDataset.range(...).repeat().map_with_index(...)``): its state is
the index of the next batch, so ``set_state(get_state())`` continues exactly, in a fresh
process too, on every host (the checkpoint holds process 0's). The state also carries a
fingerprint of the plan; restoring it onto another dataset, seed, batch size or shard
count fails with DataError.

A batch: token features [batch_size, bucket_len] (input_ids, attention_mask, token_type_ids),
targets [batch_size, target_len], scalars [batch_size, ...] (label, mask_pos, ...),
``example_mask`` [batch_size] (0 for padding rows of a last partial batch) and ``idx``
(-1 for padding rows).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from typing import Optional, Sequence

import grain
import numpy as np

from peft_jax.data.readers import DataError
from peft_jax.data.tokenize import Encoded


def assign_buckets(lengths: np.ndarray, buckets: Optional[Sequence[int]]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Bucket index of every example (smallest bucket >= its length); buckets=None: one bucket
    of the longest length."""
    lengths = np.asarray(lengths)
    if buckets is None:
        buckets = (int(lengths.max()),)
    buckets = tuple(sorted(int(b) for b in buckets))
    too_long = np.nonzero(lengths > buckets[-1])[0]
    if too_long.size:
        i = int(too_long[0])
        raise DataError(f"example {i} has {int(lengths[i])} tokens, more than the largest bucket "
                        f"{buckets[-1]} ({too_long.size} such examples): encode with a smaller max_len "
                        "or add a bucket")
    return np.searchsorted(np.asarray(buckets), lengths, side="left"), buckets


def epoch_plan(bucket_of: np.ndarray, n_buckets: int, global_batch: int, seed: int, epoch: int,
               shuffle: bool, drop_remainder: bool) -> list[tuple[int, np.ndarray]]:
    """Global batches of one epoch: ``[(bucket, example indices [global_batch], -1 = padding)]``.

    ``drop_remainder``: a bucket's partial batch moves up into the next longer bucket (its
    examples are padded further), so only the longest bucket's final partial batch is dropped:
    fewer than ``global_batch`` examples an epoch, a different random set each epoch when
    shuffled. Otherwise every bucket's partial batch is padded with -1 rows (evaluation)."""
    n = len(bucket_of)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    batches, carry = [], order[:0]
    for b in range(n_buckets):
        members = order[bucket_of[order] == b]
        if drop_remainder and len(carry):
            members = np.concatenate([carry, members])
            members = members[np.argsort(position[members], kind="stable")]
        full = len(members) // global_batch
        for j in range(full):
            batches.append((b, members[j * global_batch:(j + 1) * global_batch]))
        rest = members[full * global_batch:]
        if drop_remainder:
            carry = rest
        elif len(rest):
            batches.append((b, np.concatenate([rest, np.full(global_batch - len(rest), -1, rest.dtype)])))
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[k] for k in perm]
    return batches


def warn_unseen(plan: list[tuple[int, np.ndarray]], n: int, shuffle: bool) -> int:
    """Warn when some examples can never be trained on: unshuffled, the examples left out of
    an epoch's plan (the longest bucket's final partial batch) are the same every epoch.
    Shuffled, a different random few are left out each epoch. Returns how many examples are
    never trained on."""
    if shuffle:
        return 0
    used = np.concatenate([rows for _, rows in plan]) if plan else np.zeros(0, np.int64)
    unseen = np.setdiff1d(np.arange(n), used[used >= 0])
    if unseen.size:
        shown = ", ".join(str(int(i)) for i in unseen[:8]) + (", ..." if unseen.size > 8 else "")
        warnings.warn(f"{unseen.size} of {n} training examples are never trained on (examples "
                      f"{shown}: unshuffled, the last partial batch is dropped every epoch): "
                      "shuffle, or use a batch size that divides the number of examples", stacklevel=3)
    return int(unseen.size)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class BatchIterator:
    """Iterator of batch dicts with ``get_state()``/``set_state()`` (JSON-serialisable)."""

    def __init__(self, encoded: Encoded, batch_size: int, buckets: Optional[Sequence[int]] = (32, 64, 128, 256),
                 seed: int = 0, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                 drop_remainder: bool = True, num_epochs: Optional[int] = None,
                 target_len: Optional[int] = None):
        if not 0 <= shard_index < shard_count:
            raise DataError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if len(encoded) == 0:
            raise DataError("make_batches: no examples")
        self.encoded = encoded
        self._lock, self._plans = threading.Lock(), {}
        self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count
        self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
        self.bucket_of, self.buckets = assign_buckets(encoded.lengths(), buckets)
        self.global_batch = batch_size * shard_count
        tl = encoded.target_lengths()
        self.target_len = target_len or (_round_up(int(tl.max()), 8) if encoded.targets else 0)
        if encoded.targets and tl.max() > self.target_len:
            raise DataError(f"a target has {int(tl.max())} tokens, more than target_len={self.target_len}")
        self.batches_per_epoch = len(self._plan(0))
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(encoded)} training examples make no full batch of "
                            f"{self.global_batch} rows ({batch_size} x {shard_count} hosts): lower "
                            "config.train.batch_size or add examples")
        if drop_remainder:
            warn_unseen(self._plan(0), len(encoded), shuffle)
        self.constants = encoded.constants
        h = hashlib.sha1()
        h.update(np.asarray(encoded.lengths()).tobytes())
        # not the shard index: the state (the next global batch) is the same on every host, and
        # the checkpoint holds process 0's
        h.update(repr((batch_size, shard_count, seed, shuffle, drop_remainder, self.buckets,
                       self.target_len, "carry-up")).encode())   # plans since partial batches move up
        self.fingerprint = h.hexdigest()[:16]
        ds = grain.MapDataset.range(self.batches_per_epoch).repeat(num_epochs)
        self._ds = ds.map_with_index(lambda k, _: self._batch(k)).to_iter_dataset()
        self._it = iter(self._ds)

    def _plan(self, epoch: int) -> list:
        """The epoch's global batches; the last two epochs' plans are kept (grain's prefetch
        threads call this concurrently, hence the lock)."""
        with self._lock:
            if epoch not in self._plans:
                if len(self._plans) >= 2:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = epoch_plan(self.bucket_of, len(self.buckets), self.global_batch,
                                                self.seed, epoch, self.shuffle, self.drop_remainder)
            return self._plans[epoch]

    def _batch(self, k: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(k, self.batches_per_epoch)
        b, rows = self._plan(epoch)[j]
        rows = rows[self.shard_index * self.batch_size:(self.shard_index + 1) * self.batch_size]
        return collate(self.encoded, rows, self.buckets[b], self.target_len)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        state = dict(self._it.get_state())
        state["fingerprint"] = self.fingerprint
        return state

    def set_state(self, state: dict) -> None:
        state = dict(state)
        fp = state.pop("fingerprint", None)
        if fp != self.fingerprint:
            raise DataError(f"data iterator state was saved for another dataset/seed/batching "
                            f"(fingerprint {fp}, this iterator {self.fingerprint})")
        self._it.set_state(state)


def collate(encoded: Encoded, rows: np.ndarray, length: int, target_len: int = 0) -> dict[str, np.ndarray]:
    """Rows of ``encoded`` (-1 = padding row) -> dict of [len(rows), ...] arrays; token
    features padded to ``length``, targets to ``target_len``."""
    valid = rows >= 0
    take = np.where(valid, rows, 0)
    out: dict[str, np.ndarray] = {}
    for groups, width in ((encoded.features, length), (encoded.targets, target_len)):
        for key, seqs in groups.items():
            arr = np.full((len(rows), width), encoded.pad.get(key, 0), np.int32)
            for r, i in enumerate(rows):
                if i >= 0:
                    s = seqs[i]
                    arr[r, :len(s)] = s
            out[key] = arr
    for key, values in encoded.scalars.items():
        v = values[take].copy()
        v[~valid] = 0
        out[key] = v
    out["idx"] = np.where(valid, encoded.scalars["idx"][take] if "idx" in encoded.scalars else rows, -1)
    out["row"] = np.where(valid, rows, -1).astype(np.int64)   # position in ``encoded``
    out["example_mask"] = valid.astype(np.int32)
    return out


def make_batches(encoded: Encoded, batch_size: int, buckets: Optional[Sequence[int]] = (32, 64, 128, 256),
                 seed: int = 0, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                 drop_remainder: bool = True, num_epochs: Optional[int] = None,
                 target_len: Optional[int] = None) -> BatchIterator:
    """Iterator of fixed-shape batches (see the module docstring). ``batch_size`` is per host;
    ``num_epochs=None`` repeats forever; for evaluation use ``shuffle=False,
    drop_remainder=False, num_epochs=1`` (padding rows have example_mask 0)."""
    return BatchIterator(encoded, batch_size, buckets, seed, shard_index, shard_count, shuffle,
                         drop_remainder, num_epochs, target_len)
