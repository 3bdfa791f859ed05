"""The one collector: data streamed batch by batch, level outputs cached within a budget."""

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse._collect import Collector, FusionData
from zoo import ConvBN, mlp, seeded


class CountingData:
    """A re-iterable source of (inputs, labels) batches that counts its passes and never hands out all rows."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch = x, y, batch
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for s in range(0, len(self.x), self.batch):
            yield self.x[s : s + self.batch], self.y[s : s + self.batch]


def test_a_reiterable_source_is_streamed_not_materialised():
    x = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(96) % 4
    a, b = seeded(ConvBN, 0), seeded(ConvBN, 1)
    src = CountingData(x, y, 16)
    fused = fxfuse.fuse([a, b], src, method="kf-linear", progress=False)
    n_levels = len(fused.meta["fxfuse"]["levels"])
    # the first batch read up front, then per level one pass to collect and one to run the solved level
    assert src.passes == 1 + 2 * n_levels
    ref = fxfuse.fuse([a, b], (x, y), method="kf-linear", progress=False)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_a_generator_is_read_once():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    gen = (x[s : s + 8] for s in range(0, 64, 8))
    fused = fxfuse.fuse([mlp(), mlp(seed=1)], gen, method="kf-linear", progress=False)
    ref = fxfuse.fuse([mlp(), mlp(seed=1)], x, method="kf-linear", progress=False)
    torch.testing.assert_close(fused(x), ref(x))


def test_recomputing_beyond_the_budget_gives_the_same_fusion():
    x = torch.randn(80, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = seeded(ConvBN, 0), seeded(ConvBN, 1)
    cached = fxfuse.fuse([a, b], x, method="kf-linear", progress=False, batch_size=16)
    recomputed = fxfuse.fuse([a, b], x, method="kf-linear", progress=False, batch_size=16, memory_budget=0)
    torch.testing.assert_close(recomputed(x), cached(x))


def test_collector_cache_stays_within_its_budget():
    chain = [nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)]
    data = FusionData(torch.randn(100, 8))
    budget = 10 * 32 * 4 * 2  # room for 20 of the 100 samples' outputs
    col = Collector(data, [chain], batch_size=10, budget=budget)
    for i in range(3):
        for b, (h,), _ in col.inputs(i):
            with torch.no_grad():
                col.store(0, i, b, chain[i](h))
    assert 0 < col.peak_bytes <= budget
    # inputs served from the cache and recomputed ones agree
    with torch.no_grad():
        expect = chain[1](chain[0](data.materialise()[0]))
    got = torch.cat([ins[0] for _, ins, _ in col.inputs(2)])
    torch.testing.assert_close(got, expect)


def test_batches_that_mix_labelled_and_unlabelled_are_refused():
    x = torch.randn(32, 16)
    mixed = [(x[:16], torch.zeros(16, dtype=torch.long)), x[16:]]
    with pytest.raises(ValueError, match=r"some batches have labels and some do not \(batch 1\)"):
        fxfuse.fuse([mlp(), mlp(seed=1)], mixed, method="kf-linear", progress=False)
    with pytest.raises(ValueError, match="empty"):
        fxfuse.fuse([mlp(), mlp(seed=1)], [], method="kf-linear", progress=False)


class Augmented:
    """A source whose inputs change on every pass, like random augmentation."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        g = torch.Generator().manual_seed(self.passes)
        for _ in range(4):
            yield torch.randn(8, 16, generator=g)


def test_data_that_changes_between_passes_is_refused():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(32, 16)
    with pytest.raises(ValueError, match="shuffle=True.*shuffle=False"):
        fxfuse.fuse([mlp(), mlp(seed=1)], DataLoader(TensorDataset(x), batch_size=8, shuffle=True), progress=False)
    with pytest.raises(ValueError, match=r"batch 0 differs from one pass to the next"):
        fxfuse.fuse([mlp(), mlp(seed=1)], Augmented(), method="kf-linear", progress=False)


def test_dataloader_batches_of_one_tensor_or_with_extras():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(32, 16), torch.arange(32) % 3
    ref = fxfuse.fuse([mlp(), mlp(seed=1)], x, method="kf-linear", progress=False)
    for loader in (DataLoader(TensorDataset(x), batch_size=8), DataLoader(TensorDataset(x, y, y * 0), batch_size=8)):
        got = fxfuse.fuse([mlp(), mlp(seed=1)], loader, method="kf-linear", progress=False)
        torch.testing.assert_close(got(x), ref(x))
