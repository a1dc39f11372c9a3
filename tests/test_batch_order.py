"""The length-grouped batch order: a function of (seed, epoch) alone, so a resumed epoch replays it."""

from __future__ import annotations

import random

from qlora_kit.train.batch_order import EpochSeededLengthGroupedSampler

RNG = random.Random(0)
LENGTHS = [RNG.randint(10, 500) for _ in range(400)]


def order(seed: int, epoch: int, batch: int = 4) -> list[int]:
    sampler = EpochSeededLengthGroupedSampler(batch, LENGTHS, seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    first = order(42, 1)
    assert sorted(first) == list(range(len(LENGTHS)))
    assert order(42, 1) == first  # a new sampler (a resumed process) gives the same epoch
    assert order(42, 0) != first and order(43, 1) != first  # but epochs and seeds differ


def test_iterating_twice_in_one_epoch_gives_the_same_order():
    sampler = EpochSeededLengthGroupedSampler(4, LENGTHS, 7)
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)


def test_batches_hold_rows_of_similar_length():
    indices = order(42, 0)
    spread = [max(LENGTHS[i] for i in indices[k:k + 4]) - min(LENGTHS[i] for i in indices[k:k + 4])
              for k in range(0, len(indices), 4)]
    shuffled = list(range(len(LENGTHS)))
    random.Random(1).shuffle(shuffled)
    random_spread = [max(LENGTHS[i] for i in shuffled[k:k + 4]) - min(LENGTHS[i] for i in shuffled[k:k + 4])
                     for k in range(0, len(shuffled), 4)]
    assert sum(spread) < 0.25 * sum(random_spread)
