"""The batched engine: HF-identical greedy tokens eager and compiled, bounded recompiles, compaction, sampling."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from fms_smolvlm import Captioner
from fms_smolvlm.generation import Request, SamplingParams, choose_tokens, counter_uniform
from tests.conftest import random_image
from tests.hf_reference import hf_greedy

PROMPT = "Describe this image."
# different tile counts: 5 to 17 tiles of 32 px with the test processor (longest edge 128)
SIZES = [(90, 60), (40, 110), (30, 30), (200, 50), (64, 64), (33, 99)]


def mixed_images():
    return [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES, start=1)]


@pytest.fixture(scope="module")
def compiled(checkpoint):
    torch._dynamo.reset()
    return Captioner.from_pretrained(checkpoint, max_batch_size=8, compile=True, warmup=True)


@pytest.mark.parametrize("engine", ["eager", "compiled"])
def test_greedy_equals_hf_for_mixed_images_and_a_text_only_row(checkpoint, compiled, engine):
    captioner = compiled if engine == "compiled" else Captioner.from_pretrained(checkpoint, max_batch_size=8)
    images = mixed_images()
    results = captioner.generate(images + [None], PROMPT, max_new_tokens=16)
    stop_ids = set(captioner.engine.stop_ids.tolist())
    expected = hf_greedy(checkpoint, images, [PROMPT] * len(images), 16, stop_ids)
    expected += hf_greedy(checkpoint, None, [PROMPT], 16, stop_ids)
    assert [r.token_ids for r in results] == expected
    assert len({r.num_image_tokens for r in results}) >= 4 and results[-1].num_image_tokens == 0


def test_recompiles_are_bounded_over_many_batches(compiled):
    """12 batches of 1 to 8 images of varying sizes: graphs only for new (batch, cache length) buckets."""
    rng = np.random.default_rng(0)
    graphs_before = counters["stats"]["unique_graphs"]
    arenas_before = set(compiled.engine._arenas)
    for batch in range(12):
        count = int(rng.integers(1, 9))
        sizes = [(int(rng.integers(20, 240)), int(rng.integers(20, 240))) for _ in range(count)]
        images = [random_image(w, h, seed=100 * batch + i) for i, (w, h) in enumerate(sizes)]
        results = compiled.generate(images, PROMPT, max_new_tokens=int(rng.integers(4, 24)))
        assert all(r.error is None for r in results)
    new_graphs = counters["stats"]["unique_graphs"] - graphs_before
    new_shapes = set(compiled.engine._arenas) - arenas_before
    # one decode graph per new cache shape (a compaction adds one too); vision and prefill have dynamic shapes
    assert new_graphs <= len(new_shapes) + 2, (new_graphs, sorted(new_shapes))
    assert len(compiled.engine._arenas) <= len(compiled.engine.batch_buckets) * 4


def test_rows_stop_at_their_own_limits_and_compaction_keeps_results(checkpoint):
    captioner = Captioner.from_pretrained(checkpoint, max_batch_size=8)
    captioner.engine.stop_ids = captioner.engine.stop_ids[:0]  # fixed lengths: only the limits stop rows
    samples = captioner.preprocess(mixed_images(), PROMPT)
    limits = [3, 20, 5, 20, 2, 9]
    requests = [Request(s.input_ids, s.tiles, max_new_tokens=limit) for s, limit in zip(samples, limits)]
    together = captioner.engine.generate(requests, SamplingParams(max_new_tokens=20))
    assert [len(g.token_ids) for g in together] == limits and all(g.finish_reason == "length" for g in together)
    assert any(batch < 8 for batch, _ in captioner.engine._arenas)  # compacted into a smaller batch bucket
    captioner.engine.cache_budget_bytes = 1  # every new arena now frees all the others it can
    for request, generation in zip(requests, together):
        alone = captioner.engine.generate([request], SamplingParams(max_new_tokens=20))[0]
        assert alone.token_ids == generation.token_ids
    assert len(captioner.engine._arenas) == 1


def test_too_long_a_request_is_named(checkpoint):
    captioner = Captioner.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="plus 5000 new tokens exceeds the model's 4096 positions"):
        captioner.generate([random_image(40, 40)], PROMPT, max_new_tokens=5000)


def test_sampling_is_reproducible_and_independent_of_batching(checkpoint):
    captioner = Captioner.from_pretrained(checkpoint, max_batch_size=8)
    images = mixed_images()
    sample = dict(do_sample=True, temperature=1.3, top_p=0.9, top_k=50, max_new_tokens=12)
    first = [r.token_ids for r in captioner.generate(images, PROMPT, seed=7, **sample)]
    assert [r.token_ids for r in captioner.generate(images, PROMPT, seed=7, **sample)] == first
    assert [r.token_ids for r in captioner.generate(images, PROMPT, seed=8, **sample)] != first
    # image i draws with seed 7 + i: alone, it samples the same caption as in the batch
    alone = captioner.generate(images[2:3], PROMPT, seed=9, **sample)[0]
    assert alone.token_ids == first[2]
    greedy = [r.token_ids for r in captioner.generate(images, PROMPT, max_new_tokens=12)]
    assert greedy != first


def test_sampling_follows_the_distribution_and_its_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    seeds = torch.arange(4000, dtype=torch.int64)
    counts = torch.bincount(choose_tokens(logits, SamplingParams(do_sample=True), seeds, step=0), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    top_p = choose_tokens(logits, SamplingParams(do_sample=True, top_p=0.7), seeds, step=0)
    assert set(top_p.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7: the tail is cut
    top_k = choose_tokens(logits, SamplingParams(do_sample=True, top_k=1), seeds, step=0)
    assert set(top_k.tolist()) == {0}
    noise = counter_uniform(seeds[:3], step=5, vocab_size=6)
    assert torch.equal(noise, counter_uniform(seeds[:3], step=5, vocab_size=6)) and (noise > 0).all() and (noise < 1).all()


def test_invalid_sampling_parameters_are_named():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        SamplingParams(do_sample=True, temperature=0)
