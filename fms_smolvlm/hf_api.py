"""Hand a SmolVLM on FMS back to Hugging Face: the HF model API with FMS doing the compute, and HF checkpoints.

* :func:`to_hf_api` wraps the FMS model in a ``transformers`` ``PreTrainedModel`` + ``GenerationMixin``:
  ``forward`` takes what HF's processor returns and gives ``.logits``; ``generate`` and
  ``pipeline("image-text-to-text")`` run on it. The KV cache is FMS's own list of per-layer
  ``(keys, values)``, handed to HF in the output and back to FMS as ``past_key_value_states``.
* :func:`export_hf_checkpoint` writes an HF checkpoint: the ``hf`` adapter undone (unfuse, HF names, undo the
  RoPE permutation, check against the HF shapes), ``config.json`` and ``generation_config.json``.
"""

import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import transformers
from safetensors.torch import save_file
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from fms_smolvlm.hf_config import HF_ARCHITECTURES
from fms_smolvlm.smolvlm import (
    SmolVLM,
    SmolVLMConfig,
    _check_hf_checkpoint,
    attention_mask_3d,
    fms_to_hf_names,
    hf_weight_shapes,
    patch_mask_from_pixel_mask,
)

DEFAULT_ARCHITECTURE = "Idefics3ForConditionalGeneration"  # what the published SmolVLM-256M/500M-Instruct declare


def fms_to_hf_config(config: SmolVLMConfig, architecture: str = DEFAULT_ARCHITECTURE) -> PretrainedConfig:
    """The HF config (``Idefics3Config`` or ``SmolVLMConfig``) of this shape: the inverse of ``build_smolvlm_params``.

    FMS keeps no token ids besides the pad id and the image token: bos/eos live in the checkpoint's
    ``generation_config.json``.
    """
    if architecture not in HF_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(HF_ARCHITECTURES)}, got {architecture!r}")
    vision, text = config.vision_config, config.text_config
    if text.rope_scaling:
        raise ValueError(f"only SmolVLM's default RoPE has an HF config here, the text config has {text.rope_scaling}")
    config_class = getattr(transformers, architecture).config_class
    return config_class(
        vision_config=dict(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.nlayers,
            num_attention_heads=vision.nheads,
            num_channels=vision.num_channels,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_act=vision.hidden_act,
            layer_norm_eps=vision.layer_norm_eps,
            attention_dropout=vision.attention_dropout,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=text.src_vocab_size,
            hidden_size=text.emb_dim,
            intermediate_size=int(text.hidden_grow_factor * text.emb_dim),
            num_hidden_layers=text.nlayers,
            num_attention_heads=text.nheads,
            num_key_value_heads=text.kvheads or text.nheads,
            rms_norm_eps=text.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
            max_position_embeddings=text.max_expected_seq_len,
            pad_token_id=text.pad_id if text.pad_id >= 0 else None,
            bos_token_id=None,  # unknown to FMS, rather than LlamaConfig's defaults
            eos_token_id=None,
            tie_word_embeddings=config.tie_word_embeddings,
        ),
        scale_factor=config.scale_factor,
        image_token_id=config.image_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        architectures=[architecture],
    )


# ---------------------------------------------------------------------------------------------
# The HF model API


def real_tiles(pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor], patch_size: int):
    """HF's padded ``(batch, max_tiles, 3, H, W)`` -> the real tiles ``(tiles, 3, H, W)`` in prompt order, and their
    patch mask when some tile is partially padded (None when all are full). HF's rule: an all-zero tile is padding."""
    tiles = pixel_values.flatten(0, 1)
    real = tiles.flatten(1).ne(0).any(1)
    if pixel_attention_mask is None:
        return tiles[real], None
    patch_mask = patch_mask_from_pixel_mask(pixel_attention_mask.flatten(0, 1)[real], patch_size)
    return tiles[real], None if patch_mask.all() else patch_mask


class HFAdaptedSmolVLM(PreTrainedModel, GenerationMixin):
    """An FMS :class:`SmolVLM` behind the API of HF's ``SmolVLMForConditionalGeneration`` (inference only).

    ``generate`` supports greedy search and sampling; HF refuses beam search, as FMS's cache is not a reorderable
    ``Cache``.
    """

    main_input_name = "input_ids"

    def __init__(
        self, fms_model: SmolVLM, config: PretrainedConfig, generation_config: Optional[GenerationConfig] = None
    ):
        super().__init__(config)
        # no post_init(): it would re-initialise the FMS weights
        self.fms_model = fms_model
        if generation_config is not None:
            self.generation_config = generation_config

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not create a DynamicCache: forward returns FMS's cache and generate hands it back
        return False

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[list] = None,
        pixel_values: Optional[torch.Tensor] = None,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        return_dict: bool = True,
    ):
        """HF's arguments and defaults: ``attention_mask`` ``(batch, past + seq)`` (None: all valid), ``position_ids``
        (None: ``past + arange(seq)``), ``cache`` from a previous output, images only while nothing is cached."""
        batch, length = input_ids.shape
        past = 0 if cache is None else cache[0][0].shape[2]  # per layer (keys, values): (batch, heads, past, head_dim)
        if attention_mask is None:
            attention_mask = input_ids.new_ones(batch, past + length)
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device).expand(batch, -1)
        tiles, patch_mask = None, None
        if pixel_values is not None:
            patch_size = self.fms_model.config.vision_config.patch_size
            tiles, patch_mask = real_tiles(pixel_values, pixel_attention_mask, patch_size)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.fms_model(
            input_ids,
            pixel_values=tiles,
            patch_mask=patch_mask,
            position_ids=position_ids,
            past_key_value_states=cache,
            use_cache=use_cache,
            last_n_tokens=logits_to_keep,
            mask=attention_mask_3d(attention_mask, length),
        )
        logits, cache = out if use_cache else (out, None)
        output = CausalLMOutputWithPast(logits=logits, cache=cache)
        return output if return_dict else output.to_tuple()


def to_hf_api(
    model: SmolVLM, architecture: str = DEFAULT_ARCHITECTURE, generation_config: Optional[GenerationConfig] = None
) -> HFAdaptedSmolVLM:
    """The FMS model behind HF's model API. Pass the checkpoint's ``GenerationConfig`` for its stop tokens
    (``GenerationConfig.from_pretrained(checkpoint_dir)``); the FMS model itself knows only the pad id."""
    return HFAdaptedSmolVLM(model, fms_to_hf_config(model.config, architecture), generation_config)


# ---------------------------------------------------------------------------------------------
# FMS -> HF checkpoint: the ``hf`` adapter's steps inverted, in reverse order


def _weight_unfusion(input_sd: Mapping[str, Any], model_config: SmolVLMConfig, names: dict) -> dict[str, Any]:
    """``attn.in_proj.qkv_fused`` -> query/key/value (sized by the HF shapes); ``ff_sub_layer.wg1_fused`` -> wg, w1."""
    shapes = hf_weight_shapes(model_config)
    new_sd = {}
    for name, param in input_sd.items():
        if ".attn.in_proj.qkv_fused." in name:
            parts = [name.replace("qkv_fused", part) for part in ("query", "key", "value")]
            sizes = [shapes[names[part]][0] for part in parts]
        elif ".ff_sub_layer.wg1_fused." in name:
            parts = [name.replace("wg1_fused", part) for part in ("wg", "w1")]
            sizes = [param.shape[0] // 2] * 2
        else:
            new_sd[name] = param
            continue
        # clones, not views of one storage: safetensors refuses to save tensors that share memory
        new_sd.update((part, chunk.clone()) for part, chunk in zip(parts, param.split(sizes)))
    return new_sd


def _fms_to_hf_names(input_sd: Mapping[str, Any], model_config: SmolVLMConfig, names: dict) -> dict[str, Any]:
    new_sd = {names.get(name, name): param for name, param in input_sd.items()}  # the check names strangers
    if model_config.tie_word_embeddings:
        del new_sd["lm_head.weight"]  # HF's tied checkpoints store the embedding only
    return new_sd


_HF_ROPE_WEIGHT = re.compile(r"model\.text_model\.layers\.\d+\.self_attn\.[qk]_proj\.weight$")


def _fms_to_hf_rope(input_sd: Mapping[str, Any], model_config: SmolVLMConfig, names: dict) -> dict[str, Any]:
    """Inverse of FMS's LLaMA ``hf_to_fms_rope``: q/k rows from FMS's adjacent pairs back to HF's (i, i + d/2) halves."""
    head_dim = model_config.text_config.emb_dim // model_config.text_config.nheads
    new_sd = dict(input_sd)
    for name, param in input_sd.items():
        if _HF_ROPE_WEIGHT.match(name):
            heads = param.size(0) // head_dim
            new_sd[name] = param.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(param.shape)
    return new_sd


def fms_to_hf_state_dict(state_dict: Mapping[str, Any], model_config: SmolVLMConfig) -> dict[str, Any]:
    """An FMS SmolVLM state dict -> the HF checkpoint's tensors; ``CheckpointError`` unless exactly HF's keys/shapes."""
    names = fms_to_hf_names(model_config)
    for step in (_weight_unfusion, _fms_to_hf_names, _fms_to_hf_rope):
        state_dict = step(state_dict, model_config, names)
    return dict(_check_hf_checkpoint(state_dict, model_config))


def export_hf_checkpoint(
    model: SmolVLM,
    out_dir,
    architecture: str = DEFAULT_ARCHITECTURE,
    generation_config: Optional[GenerationConfig] = None,
) -> Path:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` that ``transformers`` loads as
    ``architecture``. The tokenizer, processor and chat template files are not written: copy them from the source
    checkpoint (and pass its ``GenerationConfig`` to keep its stop tokens)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = fms_to_hf_state_dict(model.state_dict(), model.config)
    save_file(
        {name: param.cpu() for name, param in tensors.items()},
        out_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = fms_to_hf_config(model.config, architecture)
    config.dtype = model.dtype
    config.save_pretrained(out_dir)
    (generation_config or GenerationConfig.from_model_config(config)).save_pretrained(out_dir)
    return out_dir
