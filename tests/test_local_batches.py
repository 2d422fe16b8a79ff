"""A client's local batches drawn up front (mllmfl_dist/data/local_batches.py) are the batches a step-by-step
loop would draw, and survive the one-copy packing an accelerator gets."""

from __future__ import annotations

import pytest
import torch

from mllmfl_dist.data import apply_augmentation, augment_batch
from mllmfl_dist.data.local_batches import draw_local_batches, pack, to_device, unpack

CASES = [
    # n, batch_size, epochs, crop_padding, hflip, random_crop
    (13, 4, 2, 2, True, True),  # ragged last batch of 1: skipped, draws nothing
    (9, 4, 1, 0, True, True),  # no padding: no offsets
    (17, 8, 3, 4, False, True),
    (10, 3, 2, 2, True, False),
    (1, 4, 2, 2, True, True),  # one sample: no step at all
]


def step_by_step(n, batch_size, epochs, generator, crop_padding, hflip, random_crop):
    """The draws of the loop train_client ran before the batches were drawn up front, written with torch's own
    calls so that the order is pinned here and not by the code under test: a permutation per epoch, then for
    each batch of two or more its crop offsets, then its flips."""
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            if rows.numel() < 2:
                continue
            b = rows.numel()
            offsets = None
            if random_crop and crop_padding > 0:
                offsets = torch.randint(0, 2 * crop_padding + 1, (2, b), generator=generator)
            flips = torch.rand(b, generator=generator) < 0.5 if hflip else None
            out.append((rows, offsets, flips))
    return out


@pytest.mark.parametrize("n,batch_size,epochs,pad,hflip,random_crop", CASES)
def test_drawn_up_front_equals_drawn_step_by_step(n, batch_size, epochs, pad, hflip, random_crop):
    before, after = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = step_by_step(n, batch_size, epochs, before, pad, hflip, random_crop)
    steps = draw_local_batches(n, batch_size, epochs, after, pad, hflip, random_crop)
    assert len(steps) == len(expected)
    for step, (rows, offsets, flips) in zip(steps, expected):
        assert torch.equal(step.rows, rows)
        for got, want in ((step.offsets, offsets), (step.flips, flips)):
            assert (got is None) == (want is None)
            if want is not None:
                assert torch.equal(got, want)
    # The generator is left where the step-by-step loop leaves it: later draws from it are unchanged.
    assert torch.equal(before.get_state(), after.get_state())


def test_augment_batch_applies_the_draws_of_draw_augmentation():
    """augment_batch (one batch, drawing as it goes) equals the up-front draws applied to the same batch."""
    images = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for pad, hflip, random_crop in ((2, True, True), (0, True, True), (3, False, True), (2, True, False)):
        (step,) = draw_local_batches(6, 6, 1, torch.Generator().manual_seed(9), pad, hflip, random_crop)
        gen = torch.Generator().manual_seed(9)
        torch.randperm(6, generator=gen)  # the permutation draw_local_batches took first
        augmented = augment_batch(images[step.rows], gen, pad, hflip, random_crop)
        assert torch.equal(apply_augmentation(images[step.rows], step.offsets, step.flips, pad), augmented)


@pytest.mark.parametrize("n,batch_size,epochs,pad,hflip,random_crop", CASES[:4])
def test_pack_and_unpack_give_back_every_step(n, batch_size, epochs, pad, hflip, random_crop):
    steps = draw_local_batches(n, batch_size, epochs, torch.Generator().manual_seed(5), pad, hflip, random_crop)
    packed = pack(steps)
    assert packed.dtype == torch.int64 and packed.shape[1] == sum(s.rows.numel() for s in steps)
    back = unpack(packed, [s.rows.numel() for s in steps], steps[0].offsets is not None, steps[0].flips is not None)
    assert len(back) == len(steps)
    for got, want in zip(back, steps):
        assert torch.equal(got.rows, want.rows)
        for a, b in ((got.offsets, want.offsets), (got.flips, want.flips)):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_to_device_on_the_cpu_copies_nothing():
    steps = draw_local_batches(20, 4, 1, torch.Generator().manual_seed(0), 2, True, True)
    assert to_device(steps, "cpu") is steps
    assert to_device([], "cuda") == []
