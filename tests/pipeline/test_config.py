"""The job's configuration: prompts from flags and files, their output columns, what a rerun may change, and the
capacity a run needs. No Ray here."""

import json

import pytest

from fms_smolvlm.captioner import DEFAULT_PROMPT
from pipeline.commit import OUTPUT_SCHEMA, output_schema
from pipeline.config import ConfigError, Prompt, parse_prompts
from pipeline.job import JobError, Resources, _check_capacity, _prompt_changes, prompts_fingerprint


def test_one_unnamed_prompt_is_todays_job():
    (prompt,) = parse_prompts(None, None, None)
    assert prompt == Prompt(None, DEFAULT_PROMPT, 64)
    assert prompts_fingerprint((prompt,)) == {"prompt": DEFAULT_PROMPT, "max_new_tokens": 64}
    assert output_schema([prompt.columns]) == OUTPUT_SCHEMA
    assert OUTPUT_SCHEMA.names == ["key", "shard_id", "caption", "error", "width", "height", "num_image_tokens",
                                   "num_generated_tokens", "finish_reason"]
    assert parse_prompts(["What is it?"], None, ["12"]) == (Prompt(None, "What is it?", 12),)


def test_named_prompts_and_their_limits():
    prompts = parse_prompts(["caption=A short caption.", "objects=List the objects: a=b?"], None,
                            ["20", "objects=48"])
    assert prompts == (Prompt("caption", "A short caption.", 20), Prompt("objects", "List the objects: a=b?", 48))
    schema = output_schema([p.columns for p in prompts], video=True)
    assert schema.names == ["key", "shard_id", "caption", "objects", "error", "width", "height", "num_image_tokens",
                            "caption_num_generated_tokens", "caption_finish_reason",
                            "objects_num_generated_tokens", "objects_finish_reason", "num_frames"]


@pytest.mark.parametrize("suffix, content", [
    (".json", json.dumps({"short": "Caption it.", "long": "Describe it in detail."})),
    (".yaml", "short: Caption it.\nlong: Describe it in detail.\n"),
])
def test_prompts_file(tmp_path, suffix, content):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    assert parse_prompts(None, str(path), ["long=80"]) == (
        Prompt("short", "Caption it.", 64), Prompt("long", "Describe it in detail.", 80)
    )


@pytest.mark.parametrize("prompts, file, limits, message", [
    (["a=x", "b"], None, None, "--prompt: name every prompt (NAME=TEXT) when there are several"),
    (["x", "y"], None, None, "--prompt: only one unnamed prompt; name them (NAME=TEXT)"),
    (["a=x", "a=y"], None, None, "--prompt a=... given twice"),
    (["error=x"], None, None, "prompt name 'error' is a column every row has already"),
    (["a=x", "a_finish_reason=y"], None, None, "prompt names 'a' and 'a_finish_reason' clash"),
    (["a=x"], None, ["b=3"], "--max-new-tokens b=3: no prompt is named 'b' (prompts: a)"),
    (["a=x"], None, ["a=0"], "--max-new-tokens a=0: must be a positive integer"),
    (["a=x"], "p.json", None, "give prompts with --prompt or with --prompts FILE, not both"),
    (None, "missing.yaml", None, "--prompts missing.yaml: cannot read it"),
], ids=["mixed", "two-unnamed", "twice", "reserved", "clash", "unknown-limit", "zero-limit", "both", "no-file"])
def test_bad_prompt_flags_are_named(prompts, file, limits, message):
    with pytest.raises(ConfigError) as error:
        parse_prompts(prompts, file, limits)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_prompts_file_is_named(tmp_path):
    (tmp_path / "list.json").write_text('["just", "a list"]')
    with pytest.raises(ConfigError, match="must be a mapping of prompt name to prompt text"):
        parse_prompts(None, str(tmp_path / "list.json"), None)
    (tmp_path / "broken.yaml").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_prompts(None, str(tmp_path / "broken.yaml"), None)


def test_a_rerun_is_told_which_prompts_changed():
    old = prompts_fingerprint(parse_prompts(["caption=A", "objects=B"], None, None))
    new = prompts_fingerprint(parse_prompts(["caption=A", "objects=C", "text=D"], None, ["caption=9"]))
    assert _prompt_changes(old, new) == ["prompt text added", "prompt caption changed", "prompt objects changed"]
    assert _prompt_changes(new, old) == ["prompt text dropped", "prompt caption changed", "prompt objects changed"]
    unnamed = prompts_fingerprint(parse_prompts(None, None, None))
    assert _prompt_changes(unnamed, old) == ["prompt caption added", "prompt objects added", "prompt dropped"]
    assert _prompt_changes(old, old) == []


def node(cpus: int, gpus: int = 0) -> dict:
    return {"Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


@pytest.mark.parametrize("nodes, device, replicas, message", [
    ([node(2)], "cpu", 2, "the replicas would hold 2 of the cluster's 2 CPUs (one each) and leave none"),
    ([node(4), node(4)], "cpu", 8, "use at most 7 replicas"),
    ([node(2, gpus=4), node(8)], "cuda", 4, "the GPU nodes have CPUs beside only 2 of their GPUs"),
], ids=["all-cpus", "two-nodes", "gpus-without-cpus"])
def test_a_run_that_could_never_start_is_refused(nodes, device, replicas, message):
    with pytest.raises(JobError) as error:
        _check_capacity(Resources(device, "float32", replicas, 8, False, "cpu"), nodes)
    assert message in str(error.value)


def test_a_run_that_fits_is_let_through():
    _check_capacity(Resources("cpu", "float32", 1, 8, False, "cpu"), [node(2)])
    _check_capacity(Resources("cuda", "bfloat16", 4, 32, True, "replica"), [node(16, gpus=4)])
