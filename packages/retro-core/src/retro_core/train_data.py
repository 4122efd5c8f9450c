"""What a training step reads: the seeded, resumable batch order and the training-time views of a
:class:`~retro_core.data.RetroDataset` (a subset of sequences, the retro-fit prefix cache, sampled
loss positions, swapped neighbours as negatives).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .retrofit import RetrofittedLM
from .train_config import TrainError

__all__ = [
    "NEIGHBOUR_KEYS",
    "BatchSampler",
    "PrefixCachedDataset",
    "SequenceSubset",
    "sample_positions",
    "swap_neighbours",
    "to_device",
]


class BatchSampler:
    """Infinite, seeded, resumable stream of micro-batches of sequence indices.

    The data order is a pure function of (seed, position): epoch e is ``randperm(N)`` from a
    generator seeded with (seed, e); batches run on across epoch boundaries. Starting at sample
    ``start`` continues exactly where a run that consumed ``start`` samples stopped.

    Data parallel: with ``world_size`` W > 1 every rank draws the same global micro-batches of
    ``batch_size`` B (``start`` counts global samples) and yields its contiguous slice
    ``batch[rank * B/W : (rank + 1) * B/W]``; the union over ranks is the single-process batch.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise TrainError(
                f"TrainConfig.batch_size={batch_size}: the global micro-batch must be divisible "
                f"by the number of processes WORLD_SIZE={world_size} (each rank takes "
                f"batch_size / WORLD_SIZE sequences of it)"
            )
        if not 0 <= rank < world_size:
            raise TrainError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_items, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.num_items)
        perm = self._perm(epoch)
        while True:
            batch: list[int] = []
            while len(batch) < self.batch_size:
                if offset == self.num_items:
                    epoch, offset = epoch + 1, 0
                    perm = self._perm(epoch)
                take = min(self.batch_size - len(batch), self.num_items - offset)
                batch.extend(perm[offset : offset + take])
                offset += take
            if self.world_size == 1:
                yield batch
            else:
                b = self.batch_size // self.world_size
                yield batch[self.rank * b : (self.rank + 1) * b]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (non-blocking copies)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def sample_positions(
    batch: dict[str, torch.Tensor], share: float, first: int, seed: int
) -> dict[str, torch.Tensor]:
    """Keep the loss at a seeded random ``share`` of the positions >= ``first`` (same for all B)."""
    n = batch["loss_mask"].shape[1]
    g = torch.Generator().manual_seed(seed % 2**63)
    cand = torch.arange(first, n)
    take = cand[torch.randperm(len(cand), generator=g)[: max(1, round(share * len(cand)))]]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[take] = True
    return {**batch, "loss_mask": batch["loss_mask"] & keep.to(batch["loss_mask"].device)}


NEIGHBOUR_KEYS = ("neighbours", "neighbour_lengths", "encoded_mask")


def swap_neighbours(batch: dict[str, torch.Tensor], share: float, seed: int) -> dict[str, Any]:
    """A seeded random ``share`` of the B sequences read the next sequence's neighbours (negatives).

    Everything that describes neighbours moves together (tokens, lengths, cached encodings).
    Batches of one sequence are returned unchanged.
    """
    B = batch["tokens"].shape[0]
    if B < 2:
        return batch
    g = torch.Generator().manual_seed(seed % 2**63)
    swap = torch.rand(B, generator=g) < share  # (B,)
    src = torch.where(swap, (torch.arange(B) + 1) % B, torch.arange(B))
    out = dict(batch)
    for key, v in batch.items():
        if key in NEIGHBOUR_KEYS or key.startswith("encoded."):
            out[key] = v[src.to(v.device)]
    return out


class SequenceSubset(Subset):
    """Some sequences of a :class:`RetroDataset`, keeping its metadata (``seq_len``, ``k``...)."""

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class PrefixCachedDataset(Dataset):
    """A training dataset whose items also carry the model's frozen prefix (computed once).

    Items are those of ``dataset`` plus ``prefix`` (n, d) in ``dtype``: the retro-fitted model's
    :meth:`~retro_core.retrofit.RetrofittedLM.frozen_prefix` of the item's tokens, computed on
    first access and kept in memory (n x d x 2 bytes per sequence in bfloat16). A model built with
    ``cca_from_base`` also gets its neighbours' encodings (they depend on no trainable weight
    either): ``encoded.<p>`` (l, k, r, d) per CCA layer p and ``encoded_mask`` (l, k, r), from
    :meth:`~retro_core.retrofit.RetrofittedLM.encode_neighbours` (l·k·r·d·|P| values a sequence).
    """

    def __init__(
        self, dataset: Dataset, model: RetrofittedLM, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.dataset, self.model, self.dtype = dataset, model, dtype
        self.cache: dict[int, torch.Tensor] = {}
        self.encoded: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the dataset's metadata (seq_len, k, ...)
        # Never forward protocol names: DataLoader fetches through ``__getitems__`` when the
        # dataset has one, and the wrapped Subset's would bypass the cache entirely.
        if name.startswith("__") or name in ("dataset", "model", "cache", "dtype", "encoded"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        h = self.cache.get(int(index))
        if h is None:
            device = next(self.model.parameters()).device
            h = self.model.frozen_prefix(item["tokens"][None].to(device))[0]
            h = h.to("cpu", self.dtype)
            self.cache[int(index)] = h
        item["prefix"] = h
        if self.model.config.cca_from_base:
            enc = self.encoded.get(int(index))
            if enc is None:
                device = next(self.model.parameters()).device
                got, mask = self.model.encode_neighbours(
                    item["neighbours"][None].to(device), item["neighbour_lengths"][None].to(device)
                )
                enc = {f"encoded.{p}": e[0].to("cpu", self.dtype) for p, e in got.items()}
                enc["encoded_mask"] = mask[0].cpu()
                self.encoded[int(index)] = enc
            item.update(enc)
        return item
