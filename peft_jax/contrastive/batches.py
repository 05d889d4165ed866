"""Fixed-shape, resumable batches of tokenized sentences for the contrastive trainer.

Every class yields dicts of ``[b, max_length]`` int32 arrays and is resumable through
``get_state()`` / ``set_state(state)`` (the loop checkpoints the position).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def pad_rows(seqs: Sequence[Sequence[int]], max_length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ``input_ids, attention_mask [n, max_length]`` (int32, right padding)."""
    ids = np.full((len(seqs), max_length), pad_id, np.int32)
    mask = np.zeros((len(seqs), max_length), np.int32)
    for r, t in enumerate(seqs):
        ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
    return ids, mask


class SentenceBatches:
    """Endless shuffled fixed-shape batches of tokenized sentences (``[b, max_length]``);
    resumable: ``get_state()`` / ``set_state(state)`` give/restore ``(epoch, position)``."""

    def __init__(self, token_ids: Sequence[Sequence[int]], batch_size: int, max_length: int,
                 pad_id: int, seed: int = 0):
        if len(token_ids) < batch_size:
            raise ValueError(f"SimCSE needs at least batch_size={batch_size} sentences, "
                             f"got {len(token_ids)}")
        self.ids = [list(t)[:max_length] for t in token_ids]
        self.batch_size, self.max_length, self.pad_id, self.seed = batch_size, max_length, pad_id, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["position"])
        self._order = self._perm(self.epoch)

    def peek(self) -> dict:
        """The first batch of the current epoch's order (shapes for initialization); the
        iterator's position does not move."""
        return self._batch(self._order[:self.batch_size])

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.pos + self.batch_size > len(self._order):  # drop the ragged tail of an epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        rows = self._order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self._batch(rows)

    def _batch(self, rows: np.ndarray) -> dict:
        ids, mask = self._pad([self.ids[i] for i in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def _pad(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token lists -> ``input_ids, attention_mask [b, max_length]`` (int32)."""
        return pad_rows(seqs, self.max_length, self.pad_id)


class TripletBatches(SentenceBatches):
    """Endless shuffled batches of tokenized triplets: ``input_ids``/``attention_mask``
    (anchors), ``pos_*`` and ``neg_*``, each ``[b, max_length]``; resumable as
    :class:`SentenceBatches` (same shuffling over triplet indices)."""

    def __init__(self, anchor_ids: Sequence[Sequence[int]], pos_ids: Sequence[Sequence[int]],
                 neg_ids: Sequence[Sequence[int]], batch_size: int, max_length: int,
                 pad_id: int, seed: int = 0):
        if not len(anchor_ids) == len(pos_ids) == len(neg_ids):
            raise ValueError(f"triplet columns differ in length: anchors {len(anchor_ids)}, "
                             f"positives {len(pos_ids)}, negatives {len(neg_ids)}")
        if len(anchor_ids) < batch_size:
            raise ValueError(f"supervised SimCSE needs at least batch_size={batch_size} "
                             f"triplets, got {len(anchor_ids)}")
        super().__init__(anchor_ids, batch_size, max_length, pad_id, seed)
        self.pos_ids = [list(t)[:max_length] for t in pos_ids]
        self.neg_ids = [list(t)[:max_length] for t in neg_ids]

    def _batch(self, rows: np.ndarray) -> dict:
        out = super()._batch(rows)
        for name, col in (("pos", self.pos_ids), ("neg", self.neg_ids)):
            ids, mask = self._pad([col[i] for i in rows])
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = ids, mask
        return out


class RankBatches(SentenceBatches):
    """:class:`SentenceBatches` whose batches also carry each row's ``rank_vec [b, N]``
    (row ``i`` of ``table`` belongs to sentence ``i``; RankEncoder). ``table``: an array, or
    anything indexable by an index array with a length (``objectives.LazyRankTable``)."""

    def __init__(self, token_ids: Sequence[Sequence[int]], table: np.ndarray, batch_size: int,
                 max_length: int, pad_id: int, seed: int = 0):
        if len(table) != len(token_ids):
            raise ValueError(f"rank table has {len(table)} rows for {len(token_ids)} sentences")
        super().__init__(token_ids, batch_size, max_length, pad_id, seed)
        self.table = (np.asarray(table, np.float32) if isinstance(table, (np.ndarray, list, tuple))
                      else table)

    def _batch(self, rows: np.ndarray) -> dict:
        out = super()._batch(rows)
        out["rank_vec"] = self.table[rows]
        return out
