"""HF ``SmolVLMConfig`` / ``Idefics3Config`` -> ``SmolVLM`` kwargs, registered in FMS's HF config registry.

With this, ``fms.models.get_model("hf_pretrained", model_path=DIR)`` builds the right shape from the
checkpoint's own ``config.json``.
"""

from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY
from fms.models.hf.config_utils.param_builders import build_llama_params, build_siglip_vision_params
from fms.models.llama import LLaMAConfig
from fms.models.siglip_vision import SiglipVisionConfig
from transformers import PretrainedConfig

HF_ARCHITECTURES = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")


def _check_text_config(text: PretrainedConfig) -> None:
    if text.model_type != "llama":
        raise ValueError(f"SmolVLM's text model must be llama, the config has text_config.model_type={text.model_type!r}")
    if text.hidden_act != "silu":
        raise ValueError(f"SmolVLM's text model uses silu, the config has text_config.hidden_act={text.hidden_act!r}")
    head_dim = getattr(text, "head_dim", None)
    if head_dim is not None and head_dim * text.num_attention_heads != text.hidden_size:
        raise ValueError(
            f"text_config.head_dim={head_dim} differs from hidden_size/num_attention_heads; FMS LLaMA derives it"
        )


def _check_exact_width(inner: int, outer: int, what: str) -> None:
    # FMS sizes MLPs as int(hidden_grow_factor * emb_dim); make sure that lands on the checkpoint's width
    if int(inner / outer * outer) != inner:
        raise ValueError(f"{what}={inner} cannot be expressed as a hidden_grow_factor of {outer} in FMS")


def build_smolvlm_params(config: PretrainedConfig) -> dict:
    """Param builder for ``SmolVLMForConditionalGeneration`` and ``Idefics3ForConditionalGeneration``."""
    text = config.text_config
    _check_text_config(text)
    _check_exact_width(text.intermediate_size, text.hidden_size, "text_config.intermediate_size")
    vision = build_siglip_vision_params(config)
    _check_exact_width(vision["intermediate_size"], vision["hidden_size"], "vision_config.intermediate_size")
    text_params = build_llama_params(text)
    text_params["pad_id"] = text.pad_token_id if text.pad_token_id is not None else -1
    return {
        "vision_config": SiglipVisionConfig(**vision),
        "text_config": LLaMAConfig(**text_params),
        "scale_factor": config.scale_factor,
        "image_token_id": config.image_token_id,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def register_hf_architectures() -> None:
    for hf_architecture in HF_ARCHITECTURES:
        _FMS_MODEL_CONFIG_REGISTRY.register_model_arch_info(hf_architecture, "smolvlm", build_smolvlm_params)
