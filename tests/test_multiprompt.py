"""Several prompts per image in one pass: the image's tiles, vision and prompt prefix once, the tokens of asking
each prompt alone."""

import pytest
import torch

from fms_smolvlm import Captioner
from tests.conftest import random_image

PROMPTS = [
    "Caption:",
    "Describe this image in detail, with every object you can see.",
    "What text is visible?",
]
# 5 to 17 tiles of 32 px (longest edge 128), and an unsplit-sized one
SIZES = [(90, 60), (40, 110), (30, 30), (200, 50), (64, 64), (33, 99), (150, 150), (128, 20)]


@pytest.fixture(scope="module")
def images():
    return [random_image(w, h, seed=40 + i) for i, (w, h) in enumerate(SIZES)] + [b"not an image at all"]


@pytest.fixture(scope="module")
def alone(checkpoint, images):
    """What each prompt gives asked alone, per image."""
    captioner = Captioner.from_pretrained(checkpoint, max_batch_size=8, dtype="float32")
    return [[r.token_ids for r in captioner.generate(images, prompt, max_new_tokens=limit)]
            for prompt, limit in zip(PROMPTS, (6, 20, 12))]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_several_prompts_give_each_prompts_own_tokens(checkpoint, images, alone, compile):
    torch._dynamo.reset()
    captioner = Captioner.from_pretrained(checkpoint, max_batch_size=8, compile=compile, warmup=compile, dtype="float32")
    before = captioner.engine.stats()
    results = captioner.generate(images, prompts=PROMPTS, max_new_tokens=[6, 20, 12])
    assert [[r.token_ids for r in per_image] for per_image in results[:-1]] == [list(t) for t in zip(*alone)][:-1]
    assert sum(len(tokens) for prompt in alone for tokens in prompt) >= 60  # captions, not stops at once
    bad = results[-1]
    assert len(bad) == 3 and all(r.error == "not an image (unrecognised file format)" and r.text is None for r in bad)
    stats = captioner.engine.stats()
    tiles = sum(captioner.preprocess([image], PROMPTS[0])[0].num_tiles for image in images[:-1])
    assert stats["vision_tiles"] - before["vision_tiles"] == tiles  # each image's tiles once, not once per prompt
    # each image's prefix (template start and image tokens) was written once for its three prompts
    first_difference = [
        next(i for i, tokens in enumerate(zip(*sample.prompt_ids)) if len(set(tokens)) > 1)
        for sample in captioner.preprocess_prompts(images[:-1], PROMPTS)
    ]
    assert stats["shared_prefix_tokens"] - before["shared_prefix_tokens"] == sum(first_difference)


def test_per_prompt_limits_and_the_single_prompt_form(checkpoint):
    captioner = Captioner.from_pretrained(checkpoint, max_batch_size=4, dtype="float32")
    image = random_image(90, 60, seed=1)
    results = captioner.generate([image], prompts=PROMPTS, max_new_tokens=[1, 3, 5], ignore_eos=True)[0]
    assert [r.num_generated_tokens for r in results] == [1, 3, 5]
    single = captioner.generate([image], PROMPTS[2], max_new_tokens=5, ignore_eos=True)[0]
    assert single.token_ids == results[2].token_ids and single.num_image_tokens == results[2].num_image_tokens
    with pytest.raises(ValueError, match="2 limits for 3 prompts"):
        captioner.generate([image], prompts=PROMPTS, max_new_tokens=[1, 3])


def test_a_request_with_more_prompts_than_slots_is_refused(checkpoint):
    captioner = Captioner.from_pretrained(checkpoint, max_batch_size=2, dtype="float32")
    with pytest.raises(ValueError, match="a request of 3 prompts needs as many slots; the engine has 2"):
        captioner.generate([random_image(40, 40)], prompts=PROMPTS)
