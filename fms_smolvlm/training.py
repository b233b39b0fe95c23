"""Fine-tune SmolVLM on FMS: image–caption examples, padded batches, HF's loss, and FSDP.

* :func:`build_example` renders ``(image, prompt, caption)`` through the checkpoint's chat template as one user turn
  (image, then prompt) and one assistant turn (the caption), cut after the answer's ``<end_of_utterance>``, the token
  generation stops at. Labels are the token ids with the prompt, and so every image token, set to ``-100``.
* :func:`collate` pads examples right or left; position ids count real tokens only, so left padding shifts nothing.
* :func:`causal_lm_loss` is HF's ``ForCausalLMLoss`` (what ``Idefics3ForConditionalGeneration`` computes from
  ``labels``): shifted cross-entropy in float32, the mean over unmasked targets, or their sum over
  ``num_items_in_batch`` when a global count is given (gradient accumulation, data parallelism).
* :func:`fsdp_wrap` shards the model the way FMS's ``get_model(..., distributed_strategy="fsdp")`` does, on CPU too;
  :func:`unsharded_model` gathers it back (to export an HF checkpoint).
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from fms.models import _fsdp_autowrap_policy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy

from fms_smolvlm.processing import ImageInput, SmolVLMPreprocessor
from fms_smolvlm.prompts import IMAGE_TOKEN, image_prompt
from fms_smolvlm.smolvlm import SmolVLM, attention_mask_3d

IGNORE_INDEX = -100  # HF's label for "no loss here"
END_OF_UTTERANCE = "<end_of_utterance>"


@dataclass
class TrainingExample:
    input_ids: torch.Tensor  # int64 (seq,): prompt with the image expanded, then the answer
    labels: torch.Tensor  # int64 (seq,): input_ids with the prompt set to IGNORE_INDEX
    pixel_values: torch.Tensor  # uint8 (tiles, 3, M, M)


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor  # int64 (batch, seq)
    labels: torch.Tensor  # int64 (batch, seq), IGNORE_INDEX on padding too
    attention_mask: torch.Tensor  # bool (batch, seq): False on padding
    position_ids: torch.Tensor  # int64 (batch, seq)
    pixel_values: torch.Tensor  # uint8 (tiles of all examples in batch order, 3, M, M)

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def render_answer(preprocessor: SmolVLMPreprocessor, prompt: str, caption: str) -> str:
    """What the chat template writes after the generation prompt for an assistant turn holding ``caption``, through
    its ``<end_of_utterance>`` (for SmolVLM's template: ``" " + caption + "<end_of_utterance>"``). The newline the
    template adds after it is left out: it follows the last token generation would produce."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
    conversation = preprocessor.tokenizer.apply_chat_template(
        [user, assistant], chat_template=preprocessor.chat_template, tokenize=False
    )
    generation_prompt = preprocessor.render_prompt(prompt)
    if not conversation.startswith(generation_prompt):
        raise ValueError("the chat template renders an assistant turn that does not extend its generation prompt")
    answer = conversation[len(generation_prompt) :]
    end = answer.find(END_OF_UTTERANCE)
    if end < 0:
        raise ValueError(f"the chat template does not end an assistant turn with {END_OF_UTTERANCE}")
    return answer[: end + len(END_OF_UTTERANCE)]


def build_example(
    preprocessor: SmolVLMPreprocessor, image: ImageInput, prompt: str, caption: str
) -> TrainingExample:
    """One training example; raises :class:`~fms_smolvlm.processing.ImageError` for an unusable image."""
    processed = preprocessor.process_image(image)
    prompt_ids = preprocessor.prompt_ids(prompt, processed.rows, processed.cols)
    expanded_prompt = preprocessor.render_prompt(prompt).replace(
        IMAGE_TOKEN, image_prompt(processed.rows, processed.cols, preprocessor.image_seq_len)
    )
    # tokenized as one text, as HF's processor does; the prompt must come out as the same tokens as at inference
    ids = preprocessor.tokenizer(expanded_prompt + render_answer(preprocessor, prompt, caption))["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids.tolist():
        raise ValueError("the answer's first token merges with the prompt's last one; cannot mask the prompt")
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return TrainingExample(input_ids, labels, torch.from_numpy(processed.tiles))


def collate(examples: Sequence[TrainingExample], pad_id: int, padding_side: str = "right") -> TrainingBatch:
    """Pad to the longest example with ``pad_id`` (labels with IGNORE_INDEX) on ``padding_side``."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(example.input_ids) for example in examples)

    def pad(row: torch.Tensor, value) -> torch.Tensor:
        missing = length - len(row)
        return F.pad(row, (0, missing) if padding_side == "right" else (missing, 0), value=value)

    input_ids = torch.stack([pad(example.input_ids, pad_id) for example in examples])
    labels = torch.stack([pad(example.labels, IGNORE_INDEX) for example in examples])
    attention_mask = torch.stack(
        [pad(torch.ones_like(example.input_ids, dtype=torch.bool), False) for example in examples]
    )
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    pixel_values = torch.cat([example.pixel_values for example in examples])
    return TrainingBatch(input_ids, labels, attention_mask, position_ids, pixel_values)


def num_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The targets the shifted loss counts: HF Trainer's ``num_items_in_batch`` (sum it over micro-batches/ranks)."""
    return labels[..., 1:].ne(IGNORE_INDEX).sum()


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """HF's ``ForCausalLMLoss``: position ``i`` predicts label ``i + 1``; float32 cross-entropy ignoring -100."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def training_loss(model, batch: TrainingBatch, num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward ``batch`` through a :class:`SmolVLM` (plain or FSDP-wrapped) and return :func:`causal_lm_loss`."""
    logits = model(
        batch.input_ids,
        pixel_values=batch.pixel_values,
        position_ids=batch.position_ids,
        mask=attention_mask_3d(batch.attention_mask, batch.input_ids.shape[1]),
    )
    return causal_lm_loss(logits, batch.labels, num_items_in_batch)


# ---------------------------------------------------------------------------------------------
# FSDP


def fsdp_wrap(
    model: SmolVLM,
    mixed_precision: Optional[MixedPrecision] = None,
    sharding_strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD,
) -> FullyShardedDataParallel:
    """Shard a loaded SmolVLM over the default process group, as FMS's ``get_model(distributed_strategy="fsdp")``
    does: FSDP1 ``FullyShardedDataParallel`` with FMS's auto-wrap policy, whose units are every class named like a
    layer or block, or derived from one (here ``SiglipEncoderLayer``, its MLP, a ``FeedForwardBlock``, and
    ``LLaMABlock``), plus the root for the rest.

    Where this differs from FMS's wrapper, and why:
    * FMS passes ``device_id=device.index``, which is None for a CPU device, and FSDP1 then looks for an accelerator
      and fails ("FSDP needs a non-CPU accelerator device"); here it is the device of the model's parameters.
    * FMS always computes in bfloat16 (``MixedPrecision`` with bfloat16 params, reductions and buffers); here the
      model's own dtype is the default and ``mixed_precision`` opts in.
    * ``use_orig_params=True``: ``torch.compile`` of the wrapped model needs it, and the optimizer sees the original
      parameter names (for weight-decay groups).
    FMS's activation checkpointing matches none of these classes (it looks at base-class names), so there is none.

    Load the model on every rank with ``get_model`` *before* ``init_process_group``: once a process group of more
    than one rank exists, ``get_model`` without a strategy loads tensor-parallel shards.
    """
    return FullyShardedDataParallel(
        model,
        device_id=next(model.parameters()).device,
        auto_wrap_policy=_fsdp_autowrap_policy,  # private to fms.models; ibm-fms is pinned to the 1.13 line
        sharding_strategy=sharding_strategy,
        mixed_precision=mixed_precision,
        limit_all_gathers=True,
        use_orig_params=True,
    )


def unsharded_model(model: FullyShardedDataParallel) -> SmolVLM:
    """A plain SmolVLM holding the gathered weights, on every rank (collective: call it on all of them), e.g. for
    :func:`fms_smolvlm.export_hf_checkpoint` on rank 0.

    The weights stay on the model's device: FSDP1's ``offload_to_cpu`` crashes when they already are on the CPU
    (torch 2.13).
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        plain = SmolVLM(model.config)
    plain.load_state_dict(state, assign=True)
    plain.post_init()  # ties the head to the embedding again and builds RoPE on the weights' device
    return plain
