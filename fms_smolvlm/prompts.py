"""How SmolVLM's prompts hold images and videos: the strings HF's ``Idefics3Processor`` / ``SmolVLMProcessor`` write.

* An image becomes, per tile, ``<fake_token_around_image><row_r_col_c><image>×seq`` (rows ended by a newline),
  then ``\\n<fake_token_around_image><global-img><image>×seq<fake_token_around_image>`` for the global tile
  (an unsplit image: the global part alone).
* A video becomes an intro line (the frame count in words, the duration as ``H:MM:SS``), per frame
  ``\\nFrame from MM:SS:`` and one unsplit image block, and a blank line.
* The user turn is rendered with the checkpoint's chat template; for a video, with HF's SmolVLM2 template, which
  ``SmolVLMProcessor.apply_chat_template`` substitutes whenever the conversation holds one.
"""

from datetime import timedelta
from typing import Optional, Sequence

from num2words import num2words
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_TOKEN = "<global-img>"
VIDEO_TOKEN = "<video>"  # what the chat template writes for a {"type": "video"} item
VIDEO_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE  # renders a video item as <video>, and ": " after the role
VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MEDIA_OUTRO = "\n\n"
PLACEHOLDERS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that stands for one image cut into ``rows x cols`` tiles plus the global one (``0 x 0``: unsplit)."""
    image_tokens = IMAGE_TOKEN * image_seq_len
    global_part = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{image_tokens}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_part
    grid = "".join(
        "".join(f"{FAKE_TOKEN}<row_{r}_col_{c}>{image_tokens}" for c in range(1, cols + 1)) + "\n"
        for r in range(1, rows + 1)
    )
    return f"{grid}\n{global_part}"


def video_prompt(timestamps: Sequence[float], duration: float, image_seq_len: int) -> str:
    """``SmolVLMProcessor.replace_video_token``: the text that replaces ``<video>``. Whole seconds throughout; frame
    timestamps are ``MM:SS`` with minutes not wrapped into hours."""
    prompt = VIDEO_INTRO.format(
        frame_count=num2words(len(timestamps)), video_duration=str(timedelta(seconds=int(duration)))
    )
    for second in timestamps:
        timestamp = f"{int(second // 60):02d}:{int(second % 60):02d}"
        prompt += FRAME_TIMESTAMP.format(timestamp=timestamp) + image_prompt(0, 0, image_seq_len)
    return prompt + MEDIA_OUTRO


def render_user_turn(tokenizer, chat_template: str, prompt: str, media: Optional[str]) -> str:
    """One user turn (the ``media`` item, ``"image"`` or ``"video"``, then ``prompt``; None: text only) and the
    generation prompt, with the media's placeholder left for its expansion."""
    content = ([{"type": media}] if media else []) + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=VIDEO_CHAT_TEMPLATE if media == "video" else chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    if media and text.count(PLACEHOLDERS[media]) != 1:
        raise ValueError(f"the chat template must place exactly one {PLACEHOLDERS[media]}, got {text!r}")
    return text
