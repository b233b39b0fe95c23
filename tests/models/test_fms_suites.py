"""FMS's own model test suites (shipped in ibm-fms) for the ``smolvlm`` architecture, with an image in the input.

Expectation files live in tests/resources/expectations; after a deliberate change of the model's
outputs or weight names, rewrite them with ``pytest tests/models/test_fms_suites.py --capture_expectation``.
"""

import pytest
import torch
from fms.models.llama import LLaMAConfig
from fms.models.siglip_vision import SiglipVisionConfig
from fms.testing._internal.model_test_suite import (
    ConfigFixtureMixin,
    ModelCompileTestSuite,
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
)

from fms_smolvlm import SmolVLM, SmolVLMConfig

# FMS's compile test feeds torch.arange(16) as input ids: with image_token_id 5 and one token per tile
# (an 8x8 tile of 4x4 patches, shuffled 2x2) that prompt holds exactly one image.
_config = SmolVLMConfig(
    vision_config=SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, nlayers=2, nheads=4, image_size=8, patch_size=4, hidden_act="gelu_pytorch_tanh"
    ),
    text_config=LLaMAConfig(
        src_vocab_size=64, emb_dim=32, nheads=4, kvheads=2, nlayers=2, hidden_grow_factor=2.5, multiple_of=1, pad_id=0
    ),
    scale_factor=2,
    image_token_id=5,
)


class TestSmolVLM(ModelConfigTestSuite, ModelConsistencyTestSuite, ModelCompileTestSuite, ConfigFixtureMixin):
    @pytest.fixture(scope="class", autouse=True)
    def uninitialized_model(self, config: SmolVLMConfig):
        return SmolVLM(config)

    @pytest.fixture(scope="class", autouse=True)
    def config(self) -> SmolVLMConfig:
        return _config

    @property
    def _get_signature_params(self):
        return ["input_ids_or_embeds"]

    @property
    def _get_signature_input_ids(self):
        return torch.arange(16).unsqueeze(0)

    @property
    def _get_signature_optional_params(self):
        generator = torch.Generator().manual_seed(0)
        tile = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=generator)
        return {"pixel_values": tile}

    def test_image_changes_the_output(self, model):
        ids = self._get_signature_input_ids
        tile = self._get_signature_optional_params["pixel_values"]
        with torch.no_grad():
            with_image = model(ids, pixel_values=tile)
            other_image = model(ids, pixel_values=255 - tile)
        assert not torch.allclose(with_image[:, 5:], other_image[:, 5:])
        assert torch.equal(with_image[:, :5], other_image[:, :5])  # causal: tokens before the image are untouched
