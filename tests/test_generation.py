"""The continuous-batching engine: HF-identical greedy tokens whatever the slot, the neighbours and the arrival order,
eager and compiled; no compile after the warm-up; per-request limits and seeds; the background engine."""

import asyncio
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
import torch.nn.functional as F

from fms_smolvlm import Captioner
from fms_smolvlm.processing import SmolVLMPreprocessor
from fms_smolvlm.generation import BackgroundEngine, Request, RowSampling, SamplingParams, choose_tokens, counter_uniform
from tests.conftest import random_image
from tests.hf_reference import hf_greedy

PROMPT = "Describe this image."
# different tile counts: 5 to 17 tiles of 32 px with the test processor (longest edge 128), and unsplit ones
SIZES = [(90, 60), (40, 110), (30, 30), (200, 50), (64, 64), (33, 99)]


def mixed_images(count: int = 6):
    return [random_image(*SIZES[i % len(SIZES)], seed=i + 1) for i in range(count)]


@pytest.fixture(scope="module")
def compiled(compiled_captioner):
    return compiled_captioner


@pytest.fixture(scope="module")
def eager(checkpoint):
    return Captioner.from_pretrained(checkpoint, max_batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def arrivals(checkpoint, eager):
    """24 image requests (5 to 17 tiles), limits from 2 to 24 tokens, a text-only one, and HF's greedy tokens for
    each (HF in batches of its own, each request to its own limit)."""
    images = mixed_images(24)
    limits = [2 + (7 * i) % 23 for i in range(24)]
    samples = eager.preprocess(images + [None], PROMPT)
    requests = [Request((s.input_ids,), s.tiles, (SamplingParams(limit),)) for s, limit in zip(samples, limits + [16])]
    stop_ids = set(eager.engine.stop_ids)
    expected = []
    for limit in sorted(set(limits)):
        chosen = [i for i, x in enumerate(limits) if x == limit]
        for i, tokens in zip(chosen, hf_greedy(checkpoint, [images[i] for i in chosen], [PROMPT] * len(chosen), limit, stop_ids)):
            expected.append((i, tokens))
    expected = [tokens for _, tokens in sorted(expected)] + hf_greedy(checkpoint, None, [PROMPT], 16, stop_ids)
    assert len({len(tokens) for tokens in expected}) >= 8, "caption lengths should vary"
    assert len({s.num_tiles for s in samples}) >= 4
    return requests, expected


def run_with_staggered_arrivals(engine, requests):
    """Submit a few requests, decode a round, submit more while those decode, and so on; results by request."""
    tickets, results = {}, {}
    pending = list(enumerate(requests))
    while pending or len(results) < len(requests):
        for index, request in pending[:3]:
            tickets[engine.submit(request)] = index
        pending = pending[3:]
        for ticket, generations in engine.step():
            results[tickets[ticket]] = generations[0].token_ids
    return [results[i] for i in range(len(requests))]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_greedy_equals_hf_with_requests_arriving_while_others_decode(request, arrivals, mode):
    captioner = request.getfixturevalue(mode)
    requests, expected = arrivals
    assert run_with_staggered_arrivals(captioner.engine, requests) == expected
    # the same requests in the reverse order, all at once: other slots, other neighbours, same tokens
    reversed_results = [g[0].token_ids for g in captioner.engine.generate(requests[::-1])]
    assert reversed_results[::-1] == expected


def varied_requests(checkpoint, eager, count: int = 300) -> list[Request]:
    """Text-only, 1-tile and 5..17-tile images, three prompt lengths, one to three prompts per image, limits from 1
    to 40 tokens (some run to their limit), and a video-sized request of 64 tiles."""
    rng = np.random.default_rng(0)
    unsplit = SmolVLMPreprocessor.from_pretrained(checkpoint, image_splitting=False)
    prompts = [PROMPT, "What?", "Write a detailed description of everything that is visible in this picture, please."]
    requests = []
    while len(requests) < count - 1:
        image = random_image(int(rng.integers(8, 240)), int(rng.integers(8, 240)), seed=len(requests))
        media = [None, image][int(rng.random() < 0.9)]
        preprocessor = unsplit if rng.random() < 0.2 else eager.preprocessor
        chosen = [prompts[i] for i in rng.choice(3, size=int(rng.integers(1, 4)), replace=False)]
        sample = preprocessor.process(media, chosen)
        params = tuple(SamplingParams(int(rng.integers(1, 41)), ignore_eos=bool(rng.random() < 0.3)) for _ in chosen)
        requests.append(Request(sample.prompt_ids, sample.tiles, params))
    ids = eager.preprocessor.prompt_ids(PROMPT, 0, 0).tolist()  # one unsplit tile's prompt, its image 64 times
    image_id = eager.preprocessor.image_token_id
    first, last = ids.index(image_id), len(ids) - ids[::-1].index(image_id)
    video_ids = np.asarray(ids[:first] + ids[first:last] * 64 + ids[last:], dtype=np.int64)
    video_tiles = np.random.default_rng(1).integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8)
    return requests + [Request((video_ids,), video_tiles, (SamplingParams(24),))]


def test_nothing_compiles_after_warm_up(checkpoint, compiled, eager):
    """300 requests of every shape the engine meets (varied prompts, 0 to 64 tiles, several prompts per image,
    captions up to their limit), after the warm-up: no graph compiles (Dynamo's counters and the engine's own), and
    the tokens are eager's."""
    requests = varied_requests(checkpoint, eager)
    assert len(requests) >= 300 and {len(r.params) for r in requests} == {1, 2, 3}
    assert {0, 1, 64} <= {0 if r.tiles is None else len(r.tiles) for r in requests}
    graphs_before, frames_before = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    compiled_before = compiled.engine.stats()["compiled_graphs"]
    results = compiled.engine.generate(requests)
    assert counters["stats"]["unique_graphs"] == graphs_before and counters["frames"]["total"] == frames_before
    assert compiled.engine.stats()["compiled_graphs"] == compiled_before
    expected = eager.engine.generate(requests)
    assert [[g.token_ids for g in r] for r in results] == [[g.token_ids for g in r] for r in expected]
    assert any(g.finish_reason == "length" for r in results for g in r)


def test_limits_stop_each_request_and_short_captions_free_their_slots(eager):
    samples = eager.preprocess(mixed_images(), PROMPT)
    limits = [3, 20, 5, 20, 2, 9]
    requests = [Request((s.input_ids,), s.tiles, (SamplingParams(limit, ignore_eos=True),)) for s, limit in zip(samples, limits)]
    steps_before = eager.engine.stats()["decode_steps"]
    together = [g[0] for g in eager.engine.generate(requests)]
    assert [len(g.token_ids) for g in together] == limits and all(g.finish_reason == "length" for g in together)
    # the longest request paces the run: no decode step beyond its 20 tokens (rounded up to the sync window)
    assert eager.engine.stats()["decode_steps"] - steps_before <= 20 + eager.engine.sync_every
    for request, generation in zip(requests, together):
        assert eager.engine.generate([request])[0][0].token_ids == generation.token_ids


def test_the_tail_of_a_run_decodes_in_a_smaller_bucket(eager):
    """When only one long request is left it moves to the lowest slot, and the decode step shrinks to one row."""
    samples = eager.preprocess(mixed_images(8), PROMPT)
    limits = [2] * 7 + [30]
    requests = [Request((s.input_ids,), s.tiles, (SamplingParams(limit, ignore_eos=True),)) for s, limit in zip(samples, limits)]
    results = eager.engine.generate(requests[::-1])  # the long one takes slot 0 ...
    results = eager.engine.generate(requests)  # ... and here slot 7
    assert [len(r[0].token_ids) for r in results] == limits
    assert (1, eager.engine.stats()["decode_shapes"][0][1]) in eager.engine.stats()["decode_shapes"]


def test_long_prompts_are_written_in_chunks_with_the_same_tokens(checkpoint, eager):
    chunked = Captioner.from_pretrained(checkpoint, max_batch_size=4, dtype="float32")
    chunked.engine.prefill_chunk = chunked.engine.max_prefill_tokens = 40  # a 17-tile prompt takes ~8 chunks
    samples = eager.preprocess(mixed_images(), PROMPT)
    requests = [Request((s.input_ids,), s.tiles, (SamplingParams(12),)) for s in samples]
    expected = [g[0].token_ids for g in eager.engine.generate(requests)]
    assert [g[0].token_ids for g in chunked.engine.generate(requests)] == expected
    assert chunked.engine.stats()["extend_calls"] >= max(len(s.input_ids) for s in samples) // 40


def test_too_long_a_request_is_named(checkpoint, eager):
    with pytest.raises(ValueError, match="max_new_tokens=5000 exceeds the model's 4091 positions"):
        eager.generate([random_image(40, 40)], PROMPT, max_new_tokens=5000)
    # an image whose tiles make its prompt too long (16 x 16 + 1 tiles of 16 tokens) is that image's error alone
    large_budget = Captioner.from_pretrained(checkpoint, image_longest_edge=512, dtype="float32")
    square, wide = large_budget.generate([random_image(100, 100), random_image(200, 25)], PROMPT, max_new_tokens=4)
    assert square.error is not None and "exceeds the model's 4091 positions" in square.error and square.text is None
    assert wide.error is None and wide.num_generated_tokens > 0


def test_per_image_limits_in_captioner(eager):
    results = eager.generate(mixed_images(3), PROMPT, max_new_tokens=[1, 4, 7], ignore_eos=True)
    assert [r.num_generated_tokens for r in results] == [1, 4, 7]
    with pytest.raises(ValueError, match="2 limits for 3 images"):
        eager.generate(mixed_images(3), PROMPT, max_new_tokens=[1, 4])


def test_sampling_is_reproducible_and_independent_of_neighbours(eager):
    images = mixed_images()
    sample = dict(do_sample=True, temperature=1.3, top_p=0.9, top_k=50, max_new_tokens=12)
    first = [r.token_ids for r in eager.generate(images, PROMPT, seed=7, **sample)]
    assert [r.token_ids for r in eager.generate(images, PROMPT, seed=7, **sample)] == first
    assert [r.token_ids for r in eager.generate(images, PROMPT, seed=8, **sample)] != first
    # image i draws with seed 7 + i: alone, it samples the same caption as among the others
    assert eager.generate(images[2:3], PROMPT, seed=9, **sample)[0].token_ids == first[2]
    # greedy and sampling requests side by side: each keeps its own rule
    samples = eager.preprocess(images[:2], PROMPT)
    mixed = eager.engine.generate([
        Request((samples[0].input_ids,), samples[0].tiles, (SamplingParams(12),)),
        Request((samples[1].input_ids,), samples[1].tiles, (SamplingParams(**sample),), seed=8),
    ])
    assert mixed[0][0].token_ids == eager.generate(images[:1], PROMPT, max_new_tokens=12)[0].token_ids
    assert mixed[1][0].token_ids == first[1]


def test_sampling_follows_the_distribution_and_its_filters():
    rows = 4000
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(rows, 4)

    def sampling(**params):
        p = SamplingParams(do_sample=True, **params)
        full = lambda value, dtype: torch.full((rows,), value, dtype=dtype)  # noqa: E731
        return RowSampling(full(True, torch.bool), full(p.temperature, torch.float32), full(p.top_p, torch.float32),
                           full(p.top_k, torch.int64), torch.arange(rows), full(0, torch.int64))

    counts = torch.bincount(choose_tokens(logits, sampling()), minlength=4)
    assert torch.allclose(counts / rows, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert set(choose_tokens(logits, sampling(top_p=0.7)).tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert set(choose_tokens(logits, sampling(top_k=1)).tolist()) == {0}
    greedy_rows = replace(sampling(), do_sample=torch.arange(rows) % 2 == 0)
    assert (choose_tokens(logits, greedy_rows)[1::2] == 0).all()
    noise = counter_uniform(torch.arange(3), torch.full((3,), 5), vocab_size=6)
    assert torch.equal(noise, counter_uniform(torch.arange(3), torch.full((3,), 5), vocab_size=6))
    assert (noise > 0).all() and (noise < 1).all()


def test_invalid_sampling_parameters_are_named():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        SamplingParams(do_sample=True, temperature=0)


def test_background_engine_serves_concurrent_callers(eager, arrivals):
    requests, expected = arrivals
    background = BackgroundEngine(lambda: eager.engine)
    try:

        async def caller(chunk):  # an async caller awaiting its own requests, as the job's replicas do
            futures = [asyncio.wrap_future(background.submit(requests[i])) for i in chunk]
            return [generations[0].token_ids for generations in await asyncio.gather(*futures)]

        async def callers():
            return await asyncio.gather(*(caller(range(start, len(requests), 3)) for start in range(3)))

        by_caller = asyncio.run(callers())
        for start, tokens in enumerate(by_caller):
            assert tokens == expected[start::3]
        too_long = replace(requests[0], params=(SamplingParams(5000),))
        with pytest.raises(ValueError, match="exceeds the model's"):
            background.submit(too_long).result(timeout=60)
        assert background.submit(requests[1]).result(timeout=60)[0].token_ids == expected[1]  # still serving
    finally:
        background.close()


def test_a_video_sized_request_and_small_images_decode_together(checkpoint, eager):
    """One request with 64 tiles (a 64-frame clip's worth) among 5-tile ones: the vision tower takes them in calls
    of bounded size, and every request gets the tokens it gets alone."""
    captioner = Captioner.from_pretrained(checkpoint, max_batch_size=4, dtype="float32")
    captioner.engine.max_vision_tiles = 40
    small = eager.preprocess(mixed_images(3), PROMPT)
    ids = eager.preprocessor.prompt_ids(PROMPT, 0, 0).tolist()  # one unsplit tile
    image_id = eager.preprocessor.image_token_id
    first, last = ids.index(image_id), len(ids) - ids[::-1].index(image_id)
    video_ids = np.asarray(ids[:first] + ids[first:last] * 64 + ids[last:], dtype=np.int64)  # 64 tiles' tokens
    video_tiles = np.random.default_rng(0).integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8)
    requests = [Request((video_ids,), video_tiles, (SamplingParams(8, ignore_eos=True),))] + [
        Request((s.input_ids,), s.tiles, (SamplingParams(8, ignore_eos=True),)) for s in small
    ]
    together = [g[0].token_ids for g in captioner.engine.generate(requests)]
    assert together == [g[0].token_ids for request in requests for g in eager.engine.generate([request])]
    assert captioner.engine.stats()["vision_calls"] >= 2  # 64 + 3 x (5..17) tiles do not fit one call of 40


def test_read_only_tiles_are_taken_without_a_warning(eager, arrivals):
    """The job's tiles are views of Arrow's read-only buffers: no warning (each Ray replica would print it on the
    user's console), the same tokens."""
    requests, expected = arrivals
    request = next(r for r in requests if r.tiles is not None)
    read_only = np.frombuffer(request.tiles.tobytes(), dtype=np.uint8).reshape(request.tiles.shape)
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [generations] = eager.engine.generate([replace(request, tiles=read_only)])
    assert generations[0].token_ids == expected[requests.index(request)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_decode_step_in_half_precision_attends_in_fp32_at_least_as_exactly_as_sdpa(dtype):
    """A bf16/fp16 decode step on the CPU attends with fp32 scores (SDPA's CPU kernel is ~7x slower there): the same
    attention as fp32 SDPA over grouped heads and a ragged mask, no further from it than half-precision SDPA."""
    from fms_smolvlm.generation import _grouped_attention

    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, length, dim = 3, 9, 3, 40, 16
    query = torch.randn(rows, 1, heads, dim, generator=generator)
    keys, values = (torch.randn(rows, kv_heads, length, dim, generator=generator) for _ in range(2))
    mask = torch.arange(length)[None, None, :] < torch.tensor([5, 23, 40])[:, None, None]  # (rows, 1, length)

    def attend(q, k, v):
        return _grouped_attention(q, k, v, heads, kv_heads, 0.0, None, mask=mask, attend="leading")

    exact = attend(query, keys, values)  # fp32: SDPA
    half = attend(query.to(dtype), keys.to(dtype), values.to(dtype)).float()
    sdpa = F.scaled_dot_product_attention(query.transpose(1, 2).to(dtype), keys.to(dtype), values.to(dtype),
                                          attn_mask=mask[:, None], enable_gqa=True).transpose(1, 2).float()
    assert (half - exact).abs().max() <= (sdpa - exact).abs().max()
    assert torch.allclose(half, exact, atol=1e-2)
