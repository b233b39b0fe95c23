"""SmolVLM (Idefics3 architecture) on FMS modules.

Image tiles -> SigLIP-style vision tower (bucketed 2-D position ids, key mask for padded patches)
-> pixel shuffle + bias-free projection -> features replace the embeddings of the ``<image>``
tokens -> FMS LLaMA decoder -> LM head.

Tiles enter as uint8 ``(tiles, 3, H, W)``; they are normalised on the device. The HF
implementation (``transformers.models.smolvlm`` / ``idefics3``) is the numerical reference.
"""

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from typing_extensions import Unpack

from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy
from fms.models.llama import LLaMA, LLaMAConfig
from fms.models.siglip_vision import SiglipEncoder, SiglipVisionConfig
from fms.modules.attention import AttentionKwargs, get_attention_type, register_attention_op
from fms.modules.feedforward import FeedForwardBlock
from fms.modules.layernorm import LayerNormParameterized
from fms.utils import serialization
from fms.utils.config import ModelConfig
from fms.utils.headless import gather_outputs


@dataclass
class SmolVLMConfig(ModelConfig):
    """SmolVLM's shape. Field names follow HF's ``SmolVLMConfig``; the defaults are SmolVLM-256M.

    ``tie_word_embeddings`` and ``fused_weights`` are the source of truth for the whole model:
    they override ``text_config.tie_heads`` / the sub-configs' ``fused_weights`` when the
    modules are built.
    """

    vision_config: SiglipVisionConfig = field(
        default_factory=lambda: SiglipVisionConfig(
            hidden_size=768,
            intermediate_size=3072,
            nlayers=12,
            nheads=12,
            image_size=512,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
        )
    )
    text_config: LLaMAConfig = field(
        default_factory=lambda: LLaMAConfig(
            src_vocab_size=49280,
            emb_dim=576,
            nheads=9,
            kvheads=3,
            nlayers=30,
            hidden_grow_factor=1536 / 576,
            multiple_of=1,
            norm_eps=1e-5,
            rope_theta=100_000.0,
            max_expected_seq_len=8192,
            pad_id=2,
        )
    )
    scale_factor: int = 4
    image_token_id: int = 49190
    tie_word_embeddings: bool = False
    # the image processor's normalisation, applied on the device to uint8 tiles
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    fused_weights: bool = True

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def image_seq_len(self) -> int:
        """``<image>`` tokens per tile: patches per tile divided by the pixel-shuffle factor squared."""
        return self.patches_per_side**2 // self.scale_factor**2


def bucketed_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Position ids of a tile's patches, ``(tiles, h*w)``.

    A tile whose valid patches span ``rows x cols`` has its patch grid stretched over the full
    ``patches_per_side`` position grid: row ``i`` gets bucket ``floor(i * N / rows)``. Padded
    patches get id 0. For a fully valid ``N x N`` tile this is ``arange(N*N)``.

    Integer arithmetic: HF computes the same buckets with float32 ``bucketize``, which agrees for
    every grid of the published checkpoints (N = 27, 32) but misplaces a few rows for some others
    (e.g. N = 19, 25, 29) through rounding.
    """
    tiles, height, width = patch_mask.shape
    rows = patch_mask[:, :, 0].sum(1).clamp(min=1)
    cols = patch_mask[:, 0, :].sum(1).clamp(min=1)
    row_ids = torch.arange(height, device=patch_mask.device)
    col_ids = torch.arange(width, device=patch_mask.device)
    bucket_rows = (row_ids[None, :] * patches_per_side) // rows[:, None]
    bucket_cols = (col_ids[None, :] * patches_per_side) // cols[:, None]
    ids = bucket_rows[:, :, None] * patches_per_side + bucket_cols[:, None, :]
    return torch.where(patch_mask, ids, 0).flatten(1)


def patch_mask_from_pixel_mask(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(tiles, H, W)`` pixel mask -> ``(tiles, H/p, W/p)`` patch mask: a patch is valid if any pixel is."""
    patches = pixel_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return patches.sum(dim=(-1, -2)) > 0


def pixel_shuffle(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Space-to-depth on a square patch grid: ``(tiles, n*n, d) -> (tiles, (n/r)^2, r*r*d)``.

    Output token ``(i, j)`` of the coarse grid concatenates the ``r x r`` block of patches
    ``(i*r + dy, j*r + dx)`` in (dy, dx, d) order, which is HF's channel order.
    """
    tiles, seq, dim = x.shape
    side = math.isqrt(seq)
    if side * side != seq or side % scale_factor:
        raise ValueError(
            f"pixel shuffle needs a square patch grid divisible by scale_factor={scale_factor}, got {seq} patches"
        )
    coarse = side // scale_factor
    x = x.view(tiles, coarse, scale_factor, coarse, scale_factor, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(tiles, coarse * coarse, scale_factor * scale_factor * dim)


def merge_image_features(embeds: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Replace the embeddings at ``image_mask`` (row-major over batch and sequence) by ``features`` in order.

    Shapes stay static (a gather and a select), so this compiles without graph breaks.
    """
    if not torch.compiler.is_compiling():
        check_image_token_count(int(image_mask.sum()), features.shape[0])
    order = (image_mask.flatten().cumsum(0) - 1).clamp(0, max(features.shape[0] - 1, 0))
    gathered = features[order].view_as(embeds)
    return torch.where(image_mask[..., None], gathered.to(embeds.dtype), embeds)


def attention_mask_3d(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """HF's 2-D ``(batch, kv_len)`` key mask -> FMS's boolean ``(batch, query_len, kv_len)``. The queries are the
    last ``query_len`` positions; each sees the valid keys up to itself, a padding query itself (no empty row)."""
    kv_len = attention_mask.shape[1]
    keys = torch.arange(kv_len, device=attention_mask.device)
    queries = keys[kv_len - query_len :, None]
    return ((keys <= queries)[None] & attention_mask.bool()[:, None, :]) | (keys == queries)[None]


def check_image_token_count(num_image_tokens: int, num_features: int) -> None:
    if num_image_tokens != num_features:
        raise ValueError(
            f"the prompts hold {num_image_tokens} <image> tokens but the images give {num_features} features; "
            "expand each image placeholder to the image's tiles times image_seq_len tokens"
        )


class SmolVLMVisionEmbeddings(nn.Module):
    """Patch embedding plus learned position embeddings looked up through bucketed position ids."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patches_per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.patches_per_side**2, config.hidden_size)

    def reset_parameters(self):
        nn.init.normal_(self.position_embedding.weight, std=self.position_embedding.embedding_dim**-0.5)
        fan_in = self.patch_embedding.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embedding.weight, std=fan_in**-0.5)
        nn.init.zeros_(self.patch_embedding.bias)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return embeds + self.position_embedding(bucketed_position_ids(patch_mask, self.patches_per_side))


GELU_TANH_SCALE = 2 * math.sqrt(2 / math.pi)  # twice tanh's argument scale: tanh(u) = 2 * sigmoid(2u) - 1


class TanhGELU(nn.GELU):
    """SigLIP's GELU (tanh approximation). Compiled for the CPU it is computed as ``x * sigmoid(2u)``, the same
    function as ``0.5 * x * (1 + tanh(u))`` up to float rounding: Inductor's vectorised CPU tanh is slow (over 6.5 M
    floats the tanh form compiles to 11.9 ms, this one to 2.5 ms), and it made the activation 15% of the compiled
    vision tower's time (0.38 of 2.4 ms per tile)."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.device.type == "cpu":
            return x * torch.sigmoid(GELU_TANH_SCALE * (x + 0.044715 * x * x * x))
        return super().forward(x)


# oneDNN computes bf16 here (natively, or emulated on AVX512 CPUs without it)
MKLDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class SigLIPFeedForward(FeedForwardBlock):
    """SigLIP's MLP with its tanh GELU. A bf16 tower's inference on the CPU runs the first linear and the GELU as one
    oneDNN primitive, the GELU applied to the fp32 accumulator before the output is rounded to bf16 (HF rounds the
    linear's output, then the GELU's: ours is the more exact): over 8 tiles of 1,024 patches 58 ms per layer
    against 52 + 27 for the two (AVX512-BF16, 2 cores). Elsewhere FMS's modules, as HF computes them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = x.dtype == torch.bfloat16 and MKLDNN_BF16
        if fused and _cpu_half_inference(x, self.w1.weight, p_dropout=self.p_dropout):
            return self.w2(_linear_tanh_gelu(x, self.w1.weight, self.w1.bias))
        return super().forward(x)


def siglip_feed_forward(config: SiglipVisionConfig) -> SigLIPFeedForward:
    return SigLIPFeedForward(config.hidden_size, hidden_grow_factor=config.intermediate_size / config.hidden_size,
                             activation_fn=TanhGELU(), p_dropout=config.attention_dropout, use_bias=True,
                             linear_config=config.linear_config)


@torch.library.custom_op("fms_smolvlm::linear_tanh_gelu", mutates_args=())
def _linear_tanh_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")`` by oneDNN's inner product with a GELU post-op. An operator
    of its own: Inductor lowers oneDNN's fused linears only for the weights it prepacks itself."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")


@_linear_tanh_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class SigLIPLayerNorm(LayerNormParameterized):
    """SigLIP's LayerNorm as HF computes it, ``F.layer_norm``: statistics and the affine in fp32, rounded once to the
    model's dtype. FMS's ``LayerNormParameterized`` subtracts the mean and applies the affine in the model's dtype
    (bits lost in bf16) in several passes over the activations: on the CPU in bf16, 13 ms per norm over 8 512-px
    tiles against 1.1. (With it, our bf16 vision tower computes what HF's computes, bit for bit, under SDPA.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.normalized_shape,), self.weight, self.bias, self.eps)


def siglip_layer_norm(config: SiglipVisionConfig) -> SigLIPLayerNorm:
    return SigLIPLayerNorm(config.hidden_size, elementwise_shift=True, use_mean=True, eps=config.layer_norm_eps)


VISION_ATTENTION = "smolvlm_vision"


def _vision_store(keys, values, key_cache, value_cache, **attn_kwargs):
    """No cache: every tile attends to its own patches."""
    return keys, values, keys, values


def _vision_attention(query, keys, values, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs):
    """Bidirectional attention of each tile's patches, given ``(tiles, patches, heads, dim)``; ``mask``
    ``(tiles, 1, patches)`` masks padded patches as keys."""
    mask = attn_kwargs.get("mask")
    if _cpu_half_inference(query, p_dropout=p_dropout):
        scale = scale_factor if scale_factor is not None else query.shape[-1] ** -0.5
        return _attention_by_pairs(query, keys, values, mask, scale)
    query, keys, values = query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    mask = None if mask is None else mask[:, None]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=p_dropout, scale=scale_factor)
    return out.transpose(1, 2).contiguous()


def _cpu_half_inference(tensor: torch.Tensor, *weights: torch.Tensor, p_dropout: float = 0.0) -> bool:
    """A bf16/fp16 vision tower's inference on the CPU, which takes kernels of its own: attention by matmuls
    (:func:`_attention_by_pairs`) and, in bf16, the MLP's first linear fused with its GELU
    (:class:`SigLIPFeedForward`). Training keeps SDPA and the plain modules (dropout, and gradients through
    SDPA's backward rather than every pair's scores)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (tensor, *weights))
    return half_precision_on_cpu(tensor) and p_dropout == 0 and not needs_grad


def half_precision_on_cpu(tensor: torch.Tensor) -> bool:
    """Where PyTorch's CPU SDPA kernel is slow (it computes bf16 and fp16 at fp32 speed, or slower), and this
    package's attention takes matmuls instead: here for the vision tower, in ``generation`` for decode steps."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.bfloat16, torch.float16)


@torch.library.custom_op("fms_smolvlm::attention_by_pairs", mutates_args=())
def _attention_by_pairs(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float) -> torch.Tensor:
    """Attention as HF's eager attention computes it in bf16, one (tile, head) pair at a time, on the strided
    ``(tiles, patches, heads, dim)`` views of the fused projection (no copies): the scores by a matmul with fp32
    accumulation, scaled there and rounded once (HF scales the rounded scores; the same bits when the scale is a
    power of two, as SigLIP's 64-dim heads make it), a softmax computed in fp32 and rounded once, the weighted sum
    by a matmul. PyTorch's CPU flash kernel takes 142 ms per layer over 8 tiles of 1,024 patches, this 60
    (AVX512-BF16, 2 cores; scores upcast to fp32 around the softmax, 86). An operator of its own, so that
    compiled graphs call it as it is (the loop over a dynamic tile count would not trace)."""
    tiles, patches, heads, dim = query.shape
    out = query.new_empty(query.shape)
    no_bias = query.new_zeros(())
    for tile in range(tiles):
        padded = None if mask is None else ~mask[tile, 0]
        for head in range(heads):
            scores = torch.addmm(no_bias, query[tile, :, head], keys[tile, :, head].t(), beta=0, alpha=scale)
            if padded is not None:
                scores.masked_fill_(padded, float("-inf"))
            out[tile, :, head] = torch.mm(scores.softmax(-1), values[tile, :, head])
    return out


@_attention_by_pairs.register_fake
def _(query, keys, values, mask, scale):
    return query.new_empty(query.shape)


register_attention_op(VISION_ATTENTION, _vision_store, _vision_attention)


class SmolVLMVisionTransformer(nn.Module):
    """SigLIP encoder (FMS modules) over tiles of any size that is a multiple of the patch size."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SmolVLMVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        for layer in self.encoder.layers:  # FMS builds SigLIP's MLP with a plain nn.GELU(approximate="tanh")
            if isinstance(layer.mlp.a, nn.GELU) and layer.mlp.a.approximate == "tanh":
                layer.mlp = siglip_feed_forward(config)
            layer.layer_norm1, layer.layer_norm2 = siglip_layer_norm(config), siglip_layer_norm(config)
        self.post_layernorm = siglip_layer_norm(config)

    def reset_parameters(self):
        self.embeddings.reset_parameters()
        self.encoder.reset_parameters()
        self.post_layernorm.reset_parameters()

    def forward(self, pixel_values: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``pixel_values`` ``(tiles, C, H, W)`` normalised; ``patch_mask`` ``(tiles, H/p, W/p)`` bool or None (all valid)."""
        attn_kwargs: dict[str, Any] = {"attn_name": VISION_ATTENTION}
        if patch_mask is None:
            p = self.config.patch_size
            patch_mask = pixel_values.new_ones(
                (pixel_values.shape[0], pixel_values.shape[2] // p, pixel_values.shape[3] // p), dtype=torch.bool
            )
        else:
            # padded patches are masked out as keys; their own outputs are computed and ignored
            attn_kwargs["mask"] = patch_mask.flatten(1)[:, None, :]
        hidden = self.embeddings(pixel_values, patch_mask)
        hidden, _ = self.encoder(hidden, **attn_kwargs)
        return self.post_layernorm(hidden)


class SmolVLMConnector(nn.Module):
    """Pixel shuffle then a bias-free projection into the text embedding space."""

    def __init__(self, config: SmolVLMConfig):
        super().__init__()
        self.scale_factor = config.scale_factor
        self.proj = nn.Linear(
            config.vision_config.hidden_size * config.scale_factor**2, config.text_config.emb_dim, bias=False
        )

    def reset_parameters(self):
        nn.init.trunc_normal_(self.proj.weight, std=0.02)

    def forward(self, vision_hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(vision_hidden, self.scale_factor))


class SmolVLM(nn.Module):
    def __init__(
        self,
        config: Optional[SmolVLMConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        self.config = (config if config is not None else SmolVLMConfig()).updated(**kwargs)
        self.distributed_strategy = distributed_strategy
        vision_config = self.config.vision_config.updated(fused_weights=self.config.fused_weights)
        text_config = self.config.text_config.updated(
            fused_weights=self.config.fused_weights, tie_heads=self.config.tie_word_embeddings
        )
        self.vision_tower = SmolVLMVisionTransformer(vision_config)
        self.connector = SmolVLMConnector(self.config)
        self.language_model = LLaMA(text_config, distributed_strategy)

    @classmethod
    def from_config(cls, config: SmolVLMConfig) -> "SmolVLM":
        return cls(config)

    def get_config(self) -> SmolVLMConfig:
        return self.config

    def reset_parameters(self):
        self.vision_tower.reset_parameters()
        self.connector.reset_parameters()
        self.language_model.reset_parameters()

    def post_init(self):
        self.language_model.post_init()
        check_all_weights_loaded(self)

    @property
    def device(self) -> torch.device:
        return self.language_model.base_model.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.base_model.embedding.weight.dtype

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 tiles -> the vision tower's dtype, normalised in float32 like HF; float input is taken as already
        normalised. In float32 first, then cast: HF's processor hands the model float32 pixels, so a bf16 model
        sees exactly HF's pixels rounded once."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        if pixel_values.dtype == torch.uint8:
            mean = torch.tensor(self.config.image_mean, device=pixel_values.device).view(1, -1, 1, 1)
            std = torch.tensor(self.config.image_std, device=pixel_values.device).view(1, -1, 1, 1)
            # (x / 255 - mean) / std in float32, as the HF image processor computes it
            pixel_values = (pixel_values.float() / 255.0 - mean) / std
        return pixel_values.to(dtype)

    def image_features(self, pixel_values: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Real tiles ``(tiles, C, H, W)`` -> text-space features ``(tiles * image_seq_len, emb_dim)``."""
        hidden = self.vision_tower(self.normalize_pixels(pixel_values), patch_mask)
        features = self.connector(hidden)
        return features.flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings, with ``image_features`` (from :meth:`image_features`) in place of the ``<image>`` tokens."""
        embeds = self.language_model.base_model.embedding(input_ids)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids == self.config.image_token_id, image_features)

    def decode(
        self,
        embeds: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        past_key_value_states=None,
        use_cache: bool = False,
        **attn_kwargs: Unpack[AttentionKwargs],
    ):
        """Run the LLaMA layers and final norm on input embeddings (FMS's LLaMA.forward only takes token ids)."""
        base = self.language_model.base_model
        layers_past = past_key_value_states or [None] * len(base.layers)
        hidden = embeds
        cache = []
        for layer, layer_past in zip(base.layers, layers_past):
            out = layer(
                x=hidden,
                position_ids=position_ids,
                past_key_value_state=layer_past,
                use_cache=use_cache,
                **attn_kwargs,
            )
            if use_cache:
                hidden, layer_cache = out
                cache.append(layer_cache)
            else:
                hidden = out
        return base.dec_norm(hidden), cache

    def forward(
        self,
        input_ids_or_embeds: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        patch_mask: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_value_states=None,
        use_cache: bool = False,
        last_n_tokens: int = 0,
        **attn_kwargs: Unpack[AttentionKwargs],
    ):
        """
        input_ids_or_embeds: ``(batch, seq)`` token ids with each image expanded to its tiles' ``<image>`` tokens, or
            ``(batch, seq, emb_dim)`` embeddings with the images already merged (FMS's convention for VLMs).
        pixel_values: the real tiles of all images of the batch, in prompt order, ``(tiles, 3, H, W)``:
            uint8 (normalised here) or an already normalised float tensor. Only on the prefill.
        patch_mask: ``(tiles, H/p, W/p)`` bool for partially padded tiles; None when all are full.
        image_features: the vision tower's output for those tiles (:meth:`image_features`), instead of pixel_values.
        """
        get_attention_type(**attn_kwargs)["validate_attn_kwargs"](
            input_ids=input_ids_or_embeds,
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            **attn_kwargs,
        )
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("pass pixel_values or image_features, not both")
            image_features = self.image_features(pixel_values, patch_mask)
        if input_ids_or_embeds.is_floating_point():
            if image_features is not None:
                raise ValueError("embeddings come with their images merged: pass token ids to merge images here")
            embeds = input_ids_or_embeds
        else:
            embeds = self.embed(input_ids_or_embeds, image_features)
        hidden, cache = self.decode(embeds, position_ids, past_key_value_states, use_cache, **attn_kwargs)
        logits = self.language_model.head(gather_outputs(hidden, last_n_tokens, **attn_kwargs))
        return (logits, cache) if use_cache else logits

    def prepare_inputs_for_generation(self, iteration: int, input_ids: torch.Tensor, kwargs: dict):
        """FMS's generation hook: ``fms.utils.generation.generate(model, ids, ..., prepare_model_inputs_hook=
        model.prepare_inputs_for_generation, extra_kwargs={"pixel_values": tiles})``. The prefill runs the vision
        tower once and hands its features to ``forward``; with a cache the decode steps see only new tokens (no
        images), without one every step merges the same features into the whole sequence again."""
        if iteration == 0 and "pixel_values" in kwargs:
            kwargs["image_features"] = self.image_features(kwargs.pop("pixel_values"), kwargs.pop("patch_mask", None))
        elif iteration > 0 and kwargs.get("use_cache"):
            kwargs.pop("image_features", None)  # the images are in the cache
        return input_ids, kwargs


def check_all_weights_loaded(model: nn.Module) -> None:
    """After loading, any parameter still on the meta device was absent from the checkpoint."""
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.is_meta]
    if missing and len(missing) < len(params):  # an all-meta model is a deliberate meta-device build
        raise CheckpointError(f"the checkpoint has no weights for {_summarize_names(missing)}")


def _summarize_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model built from its config."""


# ---------------------------------------------------------------------------------------------
# Published shapes (HuggingFaceTB/SmolVLM-{256M,500M}-Instruct, SmolVLM-Instruct)

_256m_config = SmolVLMConfig()

_500m_config = SmolVLMConfig(
    text_config=LLaMAConfig(
        src_vocab_size=49280,
        emb_dim=960,
        nheads=15,
        kvheads=5,
        nlayers=32,
        hidden_grow_factor=2560 / 960,
        multiple_of=1,
        norm_eps=1e-5,
        rope_theta=100_000.0,
        max_expected_seq_len=8192,
        pad_id=2,
    ),
)

_2_2b_config = SmolVLMConfig(
    vision_config=SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        nlayers=27,
        nheads=16,
        image_size=384,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
    ),
    text_config=LLaMAConfig(
        src_vocab_size=49155,
        emb_dim=2048,
        nheads=32,
        kvheads=32,
        nlayers=24,
        hidden_grow_factor=8192 / 2048,
        multiple_of=1,
        norm_eps=1e-5,
        rope_theta=273_768.0,
        max_expected_seq_len=16384,
        pad_id=2,
    ),
    scale_factor=3,
    image_token_id=49153,
)

_architecture_name = "smolvlm"


def _smolvlm_factory_factory(config: SmolVLMConfig):
    def factory(**kwargs):
        return SmolVLM(config, **kwargs)

    return factory


models.register_model(_architecture_name, "256m", _smolvlm_factory_factory(_256m_config))
models.register_model(_architecture_name, "500m", _smolvlm_factory_factory(_500m_config))
models.register_model(_architecture_name, "2.2b", _smolvlm_factory_factory(_2_2b_config))


# ---------------------------------------------------------------------------------------------
# HF checkpoint -> FMS: small pure steps ``(state_dict, model_config) -> state_dict``

@dataclass(frozen=True)
class _Tower:
    """A part of the HF checkpoint that FMS already knows how to convert: its own SigLIP encoder or LLaMA."""

    hf_prefix: str  # in the SmolVLM checkpoint
    fms_source_prefix: str  # what FMS's own HF adapter expects in its place
    architecture: str  # whose registered "hf" adapter converts it
    config_field: str  # SmolVLMConfig's sub-config for that adapter
    adapted_prefix: str  # the prefix FMS's adapter gives the converted names ...
    module_prefix: str  # ... and where they live in SmolVLM


_TOWERS = (
    _Tower("model.vision_model.", "vision_model.", "siglip_vision", "vision_config", "base_model.", "vision_tower."),
    _Tower("model.text_model.", "model.", "llama", "text_config", "", "language_model."),
    _Tower("lm_head.", "lm_head.", "llama", "text_config", "", "language_model."),
)
_CONNECTOR = ("model.connector.modality_projection.", "connector.")  # SmolVLM's own part: a rename


def _tower_of(hf_name: str) -> Optional[_Tower]:
    return next((tower for tower in _TOWERS if hf_name.startswith(tower.hf_prefix)), None)


def _hf_towers_to_fms(
    input_sd: Mapping[str, Any], model_config: Optional[SmolVLMConfig] = None, **kwargs
) -> Mapping[str, Any]:
    """HF tensors -> SmolVLM's: each tower through FMS's own registered ``hf`` adapter (SigLIP: names and q/k/v
    fusion; LLaMA: names, the RoPE permutation of q/k, fusion), the connector renamed."""
    if model_config is None:
        raise ValueError("SmolVLM's hf adapter needs the model config (head sizes, weight fusion)")
    new_sd = {}
    by_tower: dict[_Tower, dict] = {}
    for name, tensor in input_sd.items():
        tower = _tower_of(name)
        if tower is None:
            new_sd[name.replace(*_CONNECTOR)] = tensor
        else:
            by_tower.setdefault(tower, {})[tower.fms_source_prefix + name[len(tower.hf_prefix) :]] = tensor
    for tower, tensors in by_tower.items():
        sub_config = getattr(model_config, tower.config_field).updated(fused_weights=model_config.fused_weights)
        adapted = serialization.get_adapted(tower.architecture, "hf", tensors, {"model_config": sub_config})
        new_sd.update((tower.module_prefix + name.removeprefix(tower.adapted_prefix), t) for name, t in adapted.items())
    return new_sd


def fms_to_hf_names(model_config: SmolVLMConfig) -> dict[str, str]:
    """Unfused SmolVLM parameter name -> HF name: the adapter above run name by name (on meta tensors)."""
    unfused = model_config.updated(fused_weights=False)
    names = {}
    for hf_name, shape in hf_weight_shapes(model_config).items():
        adapted = _hf_towers_to_fms({hf_name: torch.empty(shape, device="meta")}, unfused)
        names[next(iter(adapted))] = hf_name
    return names


def hf_weight_shapes(config: SmolVLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF SmolVLM/Idefics3 checkpoint with this config, and its shape."""
    vision, text = config.vision_config, config.text_config
    d, p = vision.hidden_size, vision.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.vision_model.embeddings.patch_embedding.weight": (d, vision.num_channels, p, p),
        "model.vision_model.embeddings.patch_embedding.bias": (d,),
        "model.vision_model.embeddings.position_embedding.weight": (config.patches_per_side**2, d),
        "model.vision_model.post_layernorm.weight": (d,),
        "model.vision_model.post_layernorm.bias": (d,),
    }
    vision_mlp = vision.intermediate_size
    for i in range(vision.nlayers):
        layer = f"model.vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (d,)
            shapes[f"{layer}{norm}.bias"] = (d,)
        shapes[f"{layer}mlp.fc1.weight"] = (vision_mlp, d)
        shapes[f"{layer}mlp.fc1.bias"] = (vision_mlp,)
        shapes[f"{layer}mlp.fc2.weight"] = (d, vision_mlp)
        shapes[f"{layer}mlp.fc2.bias"] = (d,)

    e, vocab = text.emb_dim, text.src_vocab_size
    head_dim = e // text.nheads
    kv_dim = (text.kvheads or text.nheads) * head_dim
    text_mlp = int(text.hidden_grow_factor * e)
    shapes["model.connector.modality_projection.proj.weight"] = (e, d * config.scale_factor**2)
    shapes["model.text_model.embed_tokens.weight"] = (vocab, e)
    shapes["model.text_model.norm.weight"] = (e,)
    shapes["lm_head.weight"] = (vocab, e)
    for i in range(text.nlayers):
        layer = f"model.text_model.layers.{i}."
        shapes[f"{layer}self_attn.q_proj.weight"] = (text.nheads * head_dim, e)
        shapes[f"{layer}self_attn.k_proj.weight"] = (kv_dim, e)
        shapes[f"{layer}self_attn.v_proj.weight"] = (kv_dim, e)
        shapes[f"{layer}self_attn.o_proj.weight"] = (e, text.nheads * head_dim)
        shapes[f"{layer}mlp.gate_proj.weight"] = (text_mlp, e)
        shapes[f"{layer}mlp.up_proj.weight"] = (text_mlp, e)
        shapes[f"{layer}mlp.down_proj.weight"] = (e, text_mlp)
        shapes[f"{layer}input_layernorm.weight"] = (e,)
        shapes[f"{layer}post_attention_layernorm.weight"] = (e,)
    return shapes


def _layer_group(name: str) -> str:
    """The unit FMS loads together: everything up to the first layer index, or '' for non-layer tensors."""
    match = re.match(r"(.*?\.\d+\.)", name)
    return match.group(1) if match else ""


def _check_hf_checkpoint(
    input_sd: Mapping[str, Any], model_config: Optional[SmolVLMConfig] = None, **kwargs
) -> Mapping[str, Any]:
    """Fail with the names of unexpected, misshapen or missing tensors instead of loading garbage."""
    if model_config is None:
        return input_sd
    expected = hf_weight_shapes(model_config)
    problems = []
    unexpected = [k for k in input_sd if k not in expected]
    if unexpected:
        problems.append(f"unexpected tensors {_summarize_names(unexpected)}")
    misshapen = [
        f"{k} {tuple(input_sd[k].shape)} (config says {expected[k]})"
        for k in input_sd
        if k in expected and tuple(input_sd[k].shape) != expected[k]
    ]
    if misshapen:
        problems.append(f"wrong shapes: {_summarize_names(misshapen)}")
    # FMS loads one layer (or all non-layer tensors) at a time: a group it hands us must be complete
    groups = {_layer_group(k) for k in input_sd}
    optional = {"lm_head.weight"} if model_config.tie_word_embeddings else set()
    missing = [k for k in expected if _layer_group(k) in groups and k not in input_sd and k not in optional]
    if missing:
        problems.append(f"missing tensors {_summarize_names(missing)}")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))
    return input_sd


serialization.register_adapter_step(_architecture_name, "hf_checkpoint_check", _check_hf_checkpoint)
serialization.register_adapter_step(_architecture_name, "hf_towers_to_fms", _hf_towers_to_fms)
serialization.register_adapter(_architecture_name, "hf", ["hf_checkpoint_check", "hf_towers_to_fms"])
