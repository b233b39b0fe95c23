"""Captioner.generate against HF generate on the same checkpoint, images and prompt."""

import io

import torch

import pytest

from fms_smolvlm import Captioner
from tests.conftest import random_image
from tests.hf_reference import hf_greedy

PROMPT = "Describe this image."


@pytest.mark.parametrize("name", ["gqa-s2-untied", "mha-s3-tied"])
def test_greedy_tokens_equal_hf_generate(checkpoint_factory, name):
    path = checkpoint_factory(name)
    sizes = [(90, 60), (40, 110), (30, 30), (200, 50)]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes, start=1)]
    captioner = Captioner.from_pretrained(path, max_batch_size=4, dtype="float32")
    results = captioner.generate(images, PROMPT, max_new_tokens=20)
    expected = hf_greedy(path, images, [PROMPT] * len(images), 20, set(captioner.engine.stop_ids))
    assert [r.token_ids for r in results] == expected
    long_rows = sum(r.num_generated_tokens >= 16 for r in results)
    assert long_rows >= 3, "random weights stopped too early for a meaningful comparison"
    assert len({r.num_image_tokens for r in results}) > 1  # the images tile differently


def test_results_fields_and_bad_image(checkpoint):
    captioner = Captioner.from_pretrained(checkpoint, dtype="float32")
    buffer = io.BytesIO()
    random_image(64, 48).save(buffer, "PNG")
    results = captioner.generate([buffer.getvalue(), b"not an image", random_image(50, 50)], max_new_tokens=5)
    good, bad, other = results
    assert bad.error == "not an image (unrecognised file format)"
    assert bad.text is None and bad.finish_reason is None and bad.token_ids == []
    for result in (good, other):
        assert result.error is None
        assert result.finish_reason in ("stop", "length")
        assert result.num_generated_tokens == len(result.token_ids) <= 5
        assert result.text == captioner.preprocessor.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert result.num_image_tokens % captioner.preprocessor.image_seq_len == 0
    # the same image alone gives the same caption: batching does not change greedy results
    assert captioner.generate([random_image(50, 50)], max_new_tokens=5)[0].token_ids == other.token_ids


def test_fms_generate_drives_the_model_with_images(checkpoint):
    """FMS's own generate loop, with the model's VLM hook, gives Captioner's greedy tokens."""
    from fms.utils.generation import generate

    captioner = Captioner.from_pretrained(checkpoint, dtype="float32")
    image = random_image(40, 110, seed=2)
    expected = captioner.generate([image], PROMPT, max_new_tokens=12)[0]
    assert len(expected.token_ids) >= 8  # random weights that stop at once would prove nothing
    sample = captioner.preprocess([image], PROMPT)[0]
    for use_cache in (True, False):
        output = generate(
            captioner.model,
            torch.tensor(sample.input_ids),
            max_new_tokens=12,
            do_sample=False,
            use_cache=use_cache,
            prepare_model_inputs_hook=captioner.model.prepare_inputs_for_generation,
            extra_kwargs={"pixel_values": torch.from_numpy(sample.tiles)},
        )
        generated = output[len(sample.input_ids) :].tolist()
        stop = next((i for i, t in enumerate(generated) if t in captioner.engine.stop_ids), len(generated))
        assert generated[:stop] == expected.token_ids, use_cache
