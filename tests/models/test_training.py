"""Fine-tuning FMS SmolVLM vs HF on the same random checkpoint: the training batch, then five AdamW steps (fp32, CPU).

HF's side is built only from HF: its processor on the chat template's conversation (cut after the answer's
``<end_of_utterance>``), labels masked over the processor's own prompt length, and the loss HF's
``Idefics3ForConditionalGeneration`` computes from ``labels``.
"""

import pytest
import torch
from fms.models import get_model

from fms_smolvlm.hf_api import fms_to_hf_state_dict, real_tiles
from fms_smolvlm.processing import SmolVLMPreprocessor
from fms_smolvlm.training import IGNORE_INDEX, build_example, collate, training_loss
from tests.conftest import random_image
from tests.hf_reference import hf_model, hf_processor

END_OF_UTTERANCE = "<end_of_utterance>"
STEPS = 5
LR = 1e-3
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
# fp32 on both sides; FMS fuses q/k/v and gate/up into single matmuls and reorders the RoPE rows, so the same sums
# are taken in other orders: gradients differ by ~1e-6 of their scale. Measured over five steps: losses to ~3e-7
# relative, grad norms to ~4e-6.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4
# AdamW moves a weight by lr * m / (sqrt(v) + eps), normalised per element: a ~1e-6 relative gradient difference
# stays ~1e-6 of the step, except where a gradient is at rounding level (SigLIP's key bias has zero gradient in exact
# arithmetic: q.b_k shifts a whole softmax row), where the two sides' different rounding noise becomes different
# updates of a fraction of a step. Measured: < 0.05% of the weights differ by more than 1e-6, none by more than 2e-5.
WEIGHT_ATOL = 1e-4  # a tenth of one step (LR), for every weight
CLOSE_ATOL = 1e-6  # a thousandth of a step, ...
CLOSE_FRACTION = 0.999  # ... for all but 0.1% of the weights


def samples():
    """Three images of different tile counts (13, 9, 17 at 32-pixel tiles), prompts and captions of different
    lengths: a ragged batch."""
    return [
        (random_image(90, 60, seed=1), "Describe this image.", "a red dog on the grass."),
        (random_image(40, 110, seed=2), "What is it?", "two cats."),
        (random_image(50, 50, seed=3), "Caption.", "a small blue car near a house at night."),
    ]


def hf_conversation(processor, prompt: str, caption: str) -> str:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
    text = processor.apply_chat_template([user, assistant])
    return text[: text.rindex(END_OF_UTTERANCE) + len(END_OF_UTTERANCE)]


def hf_batch(path, padding_side: str) -> dict:
    processor = hf_processor(path)
    processor.tokenizer.padding_side = padding_side
    images = [[image] for image, _, _ in samples()]
    texts = [hf_conversation(processor, prompt, caption) for _, prompt, caption in samples()]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    for row, (image, prompt, _) in enumerate(samples()):
        generation_prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True,
        )
        prompt_len = len(processor(text=[generation_prompt], images=[[image]])["input_ids"][0])
        first = int(inputs["attention_mask"][row].argmax())  # left padding: where the row starts
        labels[row, first : first + prompt_len] = IGNORE_INDEX
    inputs["labels"] = labels
    return inputs


def fms_batch(path, padding_side: str):
    preprocessor = SmolVLMPreprocessor.from_pretrained(path)
    examples = [build_example(preprocessor, *sample) for sample in samples()]
    return collate(examples, preprocessor.tokenizer.pad_token_id, padding_side)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_matches_hf_processor(checkpoint, padding_side):
    ours, theirs = fms_batch(checkpoint, padding_side), hf_batch(checkpoint, padding_side)
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"].bool())
    assert torch.equal(ours.labels, theirs["labels"])
    assert [(row != IGNORE_INDEX).sum().item() for row in ours.labels] == [12, 7, 19]  # caption + end of utterance
    tiles, patch_mask = real_tiles(theirs["pixel_values"], theirs["pixel_attention_mask"], patch_size=4)
    assert patch_mask is None and tiles.shape[0] == ours.pixel_values.shape[0] == 13 + 9 + 17
    # the processor's normalisation of our uint8 tiles, as the model applies it
    assert torch.allclose((ours.pixel_values.float() / 255 - 0.5) / 0.5, tiles, atol=1e-6)


def assert_weights_close(actual: dict, expected: dict) -> None:
    differences = torch.cat([(actual[name] - expected[name]).abs().flatten() for name in actual])
    assert differences.max() <= WEIGHT_ATOL, f"max weight difference {differences.max():.2e}"
    close = (differences <= CLOSE_ATOL).double().mean()
    assert close >= CLOSE_FRACTION, f"only {close:.4%} of the weights agree to {CLOSE_ATOL}"


def train(step_loss, params, steps: int = STEPS):
    """AdamW with grad-norm clipping; the loss and the pre-clipping global grad norm of every step."""
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    losses, grad_norms = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = step_loss()
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item())
        losses.append(loss.item())
        optimizer.step()
    return losses, grad_norms


# right padding (the usual for training) on the default checkpoint; left padding on the tied-head, MHA, scale-3 one
@pytest.mark.parametrize("name, padding_side", [("gqa-s2-untied", "right"), ("mha-s3-tied", "left")])
def test_five_adamw_steps_match_hf(checkpoint_factory, name, padding_side):
    path = checkpoint_factory(name)
    ours = get_model("hf_pretrained", model_path=str(path)).train()
    theirs = hf_model(path).train()
    batch, inputs = fms_batch(path, padding_side), hf_batch(path, padding_side)
    assert torch.equal(batch.labels, inputs["labels"])
    # HF's default position ids (arange) would shift left-padded rows; both get the batch's
    position_ids = batch.position_ids

    our_losses, our_norms = train(lambda: training_loss(ours, batch), list(ours.parameters()))
    hf_losses, hf_norms = train(lambda: theirs(**inputs, position_ids=position_ids).loss, list(theirs.parameters()))

    assert our_losses == pytest.approx(hf_losses, rel=LOSS_RTOL)
    assert our_losses[-1] < our_losses[0]  # the steps did train
    assert our_norms == pytest.approx(hf_norms, rel=GRAD_NORM_RTOL)
    assert max(our_norms) > MAX_GRAD_NORM  # clipping took part
    ours_as_hf = fms_to_hf_state_dict(ours.state_dict(), ours.config)
    initial = hf_model(path).state_dict()
    assert max((ours_as_hf[key] - initial[key]).abs().max() for key in ours_as_hf) > 4 * LR  # five steps' worth
    assert_weights_close(ours_as_hf, theirs.state_dict())
