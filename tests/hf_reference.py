"""The Hugging Face side of the parity tests: HF's model, processor and generate on the same checkpoint."""

import torch
from transformers import AutoModelForImageTextToText, Idefics3Processor


def hf_model(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def hf_processor(path, **image_kwargs):
    # SmolVLMProcessor needs torchvision for its video half; Idefics3Processor expands prompts identically
    processor = Idefics3Processor.from_pretrained(path, **image_kwargs)
    processor.tokenizer.padding_side = "left"
    return processor


def chat_prompt(processor, text: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def hf_inputs(processor, prompts, images=None, **kwargs):
    """Left-padded batch; ``images``: one image per prompt or None for text-only prompts."""
    texts = [chat_prompt(processor, p, with_image=images is not None) for p in prompts]
    image_lists = None if images is None else [[image] for image in images]
    return processor(text=texts, images=image_lists, return_tensors="pt", padding=True, **kwargs)


def generate_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """What HF generate uses: positions count real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hf_greedy(path, images, prompts, max_new_tokens: int, stop_ids) -> list[list[int]]:
    """HF generate's greedy tokens per row, cut at the first stop id (``images`` None: text-only prompts)."""
    import torch

    inputs = hf_inputs(hf_processor(path), prompts, images)
    with torch.no_grad():
        output = hf_model(path).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    rows = []
    for row in output[:, inputs["input_ids"].shape[1] :].tolist():
        rows.append(row[: next((i for i, token in enumerate(row) if token in stop_ids), len(row))])
    return rows
