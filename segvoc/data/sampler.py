"""Batches of same-size images, for exact batched inference at full resolution, sharded across processes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Yield batches of indices whose images all have the same ``(height, width)``.

    Whole-image inference on a padded batch is not the same as inference image by image: convolutions near the
    padded border and ASPP's image pooling see the padding. Grouping by size needs no padding, so batched
    validation gives exactly the per-image metrics. Batches keep the dataset's order of first appearance (the same
    every epoch). With ``num_replicas > 1`` rank ``rank`` gets every ``num_replicas``-th batch: each image is seen by
    exactly one process, none twice (unlike ``DistributedSampler``, which repeats images to even out the shares);
    batches are split when there are fewer than processes, so that every process gets one.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(index)
        batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
        if len(sizes) < num_replicas:
            raise ValueError(f"{len(sizes)} images cannot give each of {num_replicas} processes at least one")
        while len(batches) < num_replicas:  # every process needs a batch (Lightning fails on an empty loader)
            largest = max(batches, key=len)
            batches.remove(largest)
            half = (len(largest) + 1) // 2
            batches += [largest[:half], largest[half:]]
        batches.sort(key=lambda batch: batch[0])
        self.batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
