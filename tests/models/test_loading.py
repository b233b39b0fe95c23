"""Loading SmolVLM through FMS's own entry points, and what a bad checkpoint gets told."""

import json
import shutil

import pytest
import torch
from fms.models import get_model, list_variants
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Idefics3Config, Idefics3ForConditionalGeneration

from fms_smolvlm import Captioner, CheckpointError, SmolVLM
from fms_smolvlm.checkpoint import check_checkpoint_dir
from fms_smolvlm.hf_config import build_smolvlm_params

# The published HuggingFaceTB/SmolVLM-256M-Instruct config.json (model part)
SMOLVLM_256M_CONFIG = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "image_token_id": 49190,
    "scale_factor": 4,
    "tie_word_embeddings": False,
    "vision_config": {
        "model_type": "idefics3_vision",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "text_config": {
        "model_type": "llama",
        "vocab_size": 49280,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
    },
}


def copy_checkpoint(source, destination):
    shutil.copytree(source, destination)
    return destination


@pytest.mark.parametrize("name", ["gqa-s2-untied", "mha-s3-tied"])
def test_hf_pretrained_builds_both_layouts_from_their_config(checkpoint_factory, name):
    path = checkpoint_factory(name)
    hf_config = AutoConfig.from_pretrained(path)
    model = get_model("hf_pretrained", model_path=str(path))
    assert isinstance(model, SmolVLM)
    assert hf_config.architectures[0] in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    assert model.config.scale_factor == hf_config.scale_factor
    assert model.config.image_token_id == hf_config.image_token_id
    assert model.config.tie_word_embeddings == hf_config.tie_word_embeddings
    assert model.config.text_config.kvheads == hf_config.text_config.num_key_value_heads
    assert model.config.vision_config.image_size == hf_config.vision_config.image_size
    tied = model.language_model.head.weight is model.language_model.base_model.embedding.weight
    assert tied == hf_config.tie_word_embeddings


def test_named_variant_loads_with_source_hf(checkpoint):
    """``get_model("smolvlm", variant, model_path=..., source="hf")``, shaped to the small checkpoint."""
    overrides = build_smolvlm_params(AutoConfig.from_pretrained(checkpoint))
    model = get_model("smolvlm", "256m", model_path=str(checkpoint), source="hf", **overrides)
    reference = get_model("hf_pretrained", model_path=str(checkpoint))
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name


def published_config(text: dict, vision: dict, **top) -> dict:
    """A published config.json: SmolVLM-256M's with the differences stated (values of shared/reference/smolvlm-hf.md)."""
    return {
        **SMOLVLM_256M_CONFIG,
        **top,
        "vision_config": {**SMOLVLM_256M_CONFIG["vision_config"], **vision},
        "text_config": {**SMOLVLM_256M_CONFIG["text_config"], **text},
    }


PUBLISHED_CONFIGS = {
    "256m": SMOLVLM_256M_CONFIG,  # HuggingFaceTB/SmolVLM-256M-Instruct
    "500m": published_config(  # HuggingFaceTB/SmolVLM-500M-Instruct
        text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
        vision={},
    ),
    "2.2b": published_config(  # HuggingFaceTB/SmolVLM-Instruct
        text=dict(
            vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
            num_key_value_heads=32, rope_theta=273768.0, max_position_embeddings=16384,
        ),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        scale_factor=3,
        image_token_id=49153,
    ),
}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_CONFIGS))
def test_variants_are_the_published_shapes(variant):
    assert list_variants("smolvlm") == ["256m", "500m", "2.2b"]
    derived = build_smolvlm_params(Idefics3Config(**PUBLISHED_CONFIGS[variant]))
    registered = get_model("smolvlm", variant, device_type="meta").config
    for key, value in derived.items():
        expected = value.as_dict() if hasattr(value, "as_dict") else value
        actual = getattr(registered, key)
        assert (actual.as_dict() if hasattr(actual, "as_dict") else actual) == expected, key
    assert registered.image_seq_len == {"256m": 64, "500m": 64, "2.2b": 81}[variant]


def test_real_256m_shapes_run_and_count_like_hf():
    config = Idefics3Config(**SMOLVLM_256M_CONFIG)
    with torch.device("meta"):
        hf_params = sum(p.numel() for p in Idefics3ForConditionalGeneration(config).parameters())
    model = get_model("smolvlm", "256m").eval()
    assert sum(p.numel() for p in model.parameters()) == hf_params
    assert model.config.image_seq_len == 64

    tile = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    ids = torch.tensor([[1, 11, 12] + [model.config.image_token_id] * 64 + [13, 14]])
    with torch.no_grad():
        logits = model(ids, pixel_values=tile)
    assert logits.shape == (1, ids.shape[1], 49280)
    assert torch.isfinite(logits).all()


def rewrite_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("model.text_model.layers.0.mlp.up_proj.weight"), "missing tensors model.text_model.layers.0.mlp.up_proj.weight"),
        (lambda w: w.pop("model.connector.modality_projection.proj.weight"), "missing tensors model.connector.modality_projection.proj.weight"),
        (
            lambda w: w.update({"model.vision_model.post_layernorm.weight": torch.ones(7)}),
            "wrong shapes: model.vision_model.post_layernorm.weight (7,) (config says (64,))",
        ),
        (lambda w: w.update({"model.extra.weight": torch.ones(3)}), "unexpected tensors model.extra.weight"),
        (
            lambda w: [w.pop(k) for k in list(w) if k.startswith("model.text_model.layers.1.")],
            "the checkpoint has no weights for language_model.base_model.layers.1.",
        ),
    ],
    ids=["missing-key", "missing-non-layer-key", "wrong-shape", "unexpected-key", "missing-layer"],
)
def test_bad_checkpoint_is_named(checkpoint, tmp_path, edit, message):
    path = copy_checkpoint(checkpoint, tmp_path / "bad")
    rewrite_weights(path, edit)
    with pytest.raises(CheckpointError) as error:
        get_model("hf_pretrained", model_path=str(path))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unsupported_architecture_is_refused(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint, tmp_path / "llava")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architecture \\['LlavaForConditionalGeneration'\\] is not SmolVLM"):
        check_checkpoint_dir(path)
    with pytest.raises(ValueError, match="not SmolVLM"):
        Captioner.from_pretrained(path)


def test_non_llama_text_model_is_refused(checkpoint):
    config = AutoConfig.from_pretrained(checkpoint)
    config.text_config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="text_config.hidden_act='gelu'"):
        build_smolvlm_params(config)


def test_checkpoint_without_safetensors_is_refused(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint, tmp_path / "bin")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        Captioner.from_pretrained(path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Captioner.from_pretrained(tmp_path / "nowhere")


def test_tiles_normalise_like_the_hf_processor(checkpoint):
    """uint8 -> (x / 255 - 0.5) / 0.5 on the device equals HF's float64 rescale then float32 normalise, for every value."""
    import numpy as np

    model = get_model("hf_pretrained", model_path=str(checkpoint))
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    expected = ((values.numpy().astype(np.float64) * (1 / 255)).astype(np.float32) - 0.5) / 0.5
    assert torch.equal(model.normalize_pixels(values), torch.from_numpy(expected.astype(np.float32)))
