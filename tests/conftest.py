import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# compiled graphs go to one folder per session (never the user's cache): each shape compiles once per session
os.environ["FMS_SMOLVLM_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="fms-smolvlm-compiled-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import fms_smolvlm  # noqa: E402,F401  (registers SmolVLM with FMS)
from fms_smolvlm.testing import write_random_checkpoint  # noqa: E402

# Small random checkpoints covering the shapes that matter: GQA on/off, scale_factor 2 and 3,
# tied and untied heads, both HF layouts.
CHECKPOINT_CONFIGS = {
    "gqa-s2-untied": dict(seed=1),
    "mha-s3-tied": dict(
        seed=2,
        architecture="SmolVLMForConditionalGeneration",
        scale_factor=3,
        tie_word_embeddings=True,
        vision_config=dict(hidden_size=48, num_attention_heads=3, image_size=24),
        text_config=dict(hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=6),
    ),
    "wide-gqa4-s2": dict(
        seed=3,
        vision_config=dict(hidden_size=96, intermediate_size=192, num_attention_heads=6, image_size=64, patch_size=8),
        text_config=dict(
            hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2
        ),
    ),
}


def pytest_addoption(parser):
    parser.addoption(
        "--capture_expectation",
        action="store_true",
        help="rewrite the FMS model-suite expectation files in tests/resources/expectations",
    )


@pytest.fixture(scope="session")
def capture_expectation(request):
    return request.config.getoption("capture_expectation")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``checkpoint_factory(name)`` writes (once per session) the named random checkpoint and returns its path."""
    written = {}

    def make(name: str):
        if name not in written:
            written[name] = write_random_checkpoint(tmp_path_factory.mktemp(name), **CHECKPOINT_CONFIGS[name])
        return written[name]

    return make


@pytest.fixture(scope="session")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("gqa-s2-untied")


@pytest.fixture(scope="session")
def compiled_captioner(checkpoint):
    """The suite's checkpoint compiled (fp32, 8 slots) and warmed up, once: its artifact lands in the session's compile
    cache, from which every later compiled engine of this shape loads it (the job's replicas included)."""
    from fms_smolvlm import Captioner

    return Captioner.from_pretrained(checkpoint, dtype="float32", max_batch_size=8, compile=True, warmup=True)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (noise would make LANCZOS ringing the whole signal)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    return image if mode == "RGB" else image.convert(mode)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
