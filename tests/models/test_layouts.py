"""Every checkpoint layout people have: the hub's, transformers 5.x's save_pretrained (also written by HF itself
here), for both architectures. Each loads through FMS, the preprocessor and Captioner with HF-identical tokens."""

import json
import shutil
from unittest import mock

import pytest
from fms.models import get_model
from transformers import AutoModelForImageTextToText, AutoTokenizer, Idefics3Processor, ProcessorMixin, SmolVLMProcessor
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

from fms_smolvlm import Captioner, SmolVLM
from fms_smolvlm.checkpoint import ProcessorConfigError, VideoSampling, read_processor_config
from fms_smolvlm.processing import SmolVLMPreprocessor
from fms_smolvlm.testing import write_random_checkpoint
from tests.conftest import random_image
from tests.hf_reference import hf_greedy

ARCHITECTURES = ["Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"]
LAYOUTS = ["hub", "transformers", "hf-saved"]
PROMPT = "Describe this image."


def save_with_transformers(hub_dir, out_dir):
    """What a user's fine-tuning script leaves: HF loads the hub checkpoint and saves model and processor."""
    AutoModelForImageTextToText.from_pretrained(hub_dir).save_pretrained(out_dir)
    preprocessor = json.loads((hub_dir / "preprocessor_config.json").read_text())
    if "video_sampling" not in preprocessor:
        Idefics3Processor.from_pretrained(hub_dir).save_pretrained(out_dir)
        return out_dir
    # SmolVLMProcessor.from_pretrained needs torchvision for its video processor class lookup, which cannot be
    # installed here; build the same objects from the same files and let HF's save_pretrained write them
    template = json.loads((hub_dir / "chat_template.json").read_text())["chat_template"]
    seq_len = json.loads((hub_dir / "processor_config.json").read_text())["image_seq_len"]
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *args: None):
        processor = SmolVLMProcessor(
            image_processor=SmolVLMImageProcessorPil.from_pretrained(hub_dir),
            tokenizer=AutoTokenizer.from_pretrained(hub_dir),
            video_processor=SmolVLMVideoProcessor(**preprocessor),
            image_seq_len=seq_len,
            chat_template=template,
        )
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def layout_checkpoint(tmp_path_factory):
    """``layout_checkpoint(architecture, layout)``: one random checkpoint (the same weights) per layout, written once."""
    written = {}

    def make(architecture: str, layout: str):
        if (architecture, layout) not in written:
            directory = tmp_path_factory.mktemp(f"{architecture[:8]}-{layout}")
            if layout == "hf-saved":
                written[architecture, layout] = save_with_transformers(make(architecture, "hub"), directory)
            else:
                written[architecture, layout] = write_random_checkpoint(
                    directory, seed=5, architecture=architecture, layout=layout
                )
        return written[architecture, layout]

    return make


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_transformers_save_pretrained_writes_our_transformers_layout(layout_checkpoint, architecture):
    ours, theirs = layout_checkpoint(architecture, "transformers"), layout_checkpoint(architecture, "hf-saved")
    assert not (theirs / "preprocessor_config.json").exists()
    read = lambda d: json.loads((d / "processor_config.json").read_text())  # noqa: E731
    assert read(ours) == read(theirs)
    assert (ours / "chat_template.jinja").read_text() == (theirs / "chat_template.jinja").read_text()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_layout_loads_and_gives_hf_tokens(layout_checkpoint, architecture, layout):
    path = layout_checkpoint(architecture, layout)
    assert isinstance(get_model("hf_pretrained", model_path=str(path)), SmolVLM)
    config = read_processor_config(path)
    assert config.image_seq_len == 16 and config.image["size"] == {"longest_edge": 128}
    video = VideoSampling(fps=1, max_frames=64, longest_edge=128, tile_size=32)
    assert config.video == (video if architecture == "SmolVLMForConditionalGeneration" else None)

    images = [random_image(90, 60, seed=1), random_image(40, 110, seed=2)]
    captioner = Captioner.from_pretrained(path, max_batch_size=2, dtype="float32")
    results = captioner.generate(images, PROMPT, max_new_tokens=12)
    expected = hf_greedy(path, images, [PROMPT] * 2, 12, set(captioner.engine.stop_ids))
    assert [r.token_ids for r in results] == expected
    assert sum(len(tokens) for tokens in expected) >= 12  # not two empty captions


def test_the_same_settings_whatever_the_layout(layout_checkpoint):
    hub = SmolVLMPreprocessor.from_pretrained(layout_checkpoint(ARCHITECTURES[1], "hub"))
    saved = SmolVLMPreprocessor.from_pretrained(layout_checkpoint(ARCHITECTURES[1], "hf-saved"))
    assert hub.settings == saved.settings and hub.chat_template == saved.chat_template
    assert hub.image_seq_len == saved.image_seq_len
    assert read_processor_config(layout_checkpoint(ARCHITECTURES[1], "hub")).video == read_processor_config(
        layout_checkpoint(ARCHITECTURES[1], "hf-saved")
    ).video


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: edit_json(d / "processor_config.json", lambda c: c.update(image_processor={"size": {"longest_edge": 64}})),
            "size is {'longest_edge': 128} in preprocessor_config.json but {'longest_edge': 64} in processor_config.json (image_processor)",
        ),
        (
            lambda d: (d / "chat_template.jinja").write_text("{{ messages }}"),
            "the chat templates in chat_template.jinja and chat_template.json differ",
        ),
        (
            lambda d: edit_json(
                d / "processor_config.json",
                lambda c: c.update(video_processor={"fps": 2, "num_frames": 64, "size": {"longest_edge": 128}}),
            ),
            "the video sampling is VideoSampling(fps=1, max_frames=64, longest_edge=128, tile_size=32, resample=1) in "
            "preprocessor_config.json (video_sampling) but VideoSampling(fps=2, max_frames=64, longest_edge=128, "
            "tile_size=364, resample=1) in processor_config.json (video_processor)",
        ),
        (
            lambda d: edit_json(
                d / "processor_config.json",
                lambda c: c.update(video_processor={"size": {"longest_edge": 128}, "image_mean": [0.48, 0.45, 0.4]}),
            ),
            "image_mean is [0.5, 0.5, 0.5] in preprocessor_config.json but [0.48, 0.45, 0.4] in processor_config.json "
            "(video_processor)",
        ),
    ],
    ids=["image-size", "chat-template", "video-sampling", "video-normalisation"],
)
def test_two_files_that_disagree_are_both_named(layout_checkpoint, tmp_path, edit, message):
    path = shutil.copytree(layout_checkpoint(ARCHITECTURES[1], "hub"), tmp_path / "conflict")
    edit(path)
    with pytest.raises(ProcessorConfigError) as error:
        SmolVLMPreprocessor.from_pretrained(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_directory_without_processor_files_is_named(layout_checkpoint, tmp_path):
    path = shutil.copytree(layout_checkpoint(ARCHITECTURES[0], "transformers"), tmp_path / "bare")
    (path / "processor_config.json").unlink()
    with pytest.raises(ProcessorConfigError, match="no image processor settings .* not a SmolVLM checkpoint directory"):
        Captioner.from_pretrained(path)
