"""Compiled artifacts on one machine (fms_smolvlm.compiled): a second engine of the same shape loads the graphs the
first compiled and compiles nothing; an artifact that is corrupt or was made for something else is set aside with a
warning and never run; an engine of one slot, whose graphs differ, is keyed apart."""

import json
import shutil

import pytest

from fms_smolvlm import Captioner
from fms_smolvlm.compiled import GRAPHS_DIR, MANIFEST
from fms_smolvlm.generation import compiled_steps
from tests.conftest import random_image

PROMPT = "Describe the image."


def test_a_second_engine_loads_the_graphs_and_gives_the_same_tokens(checkpoint, compiled_captioner):
    second = Captioner.from_pretrained(checkpoint, dtype="float32", max_batch_size=8, compile=True, warmup=True)
    stats = second.engine.stats()
    assert stats["compiled_graphs"] == 0
    assert stats["loaded_graphs"] == compiled_captioner.engine.stats()["compiled_graphs"] + compiled_captioner.engine.stats()["loaded_graphs"]
    images = [random_image(300, 200, seed=3), random_image(64, 500, seed=4)]
    assert [r.token_ids for r in second.generate(images, PROMPT, max_new_tokens=6)] == [
        r.token_ids for r in compiled_captioner.generate(images, PROMPT, max_new_tokens=6)
    ]


def copy_of_the_artifact(compiled_captioner, tmp_path):
    artifact = compiled_captioner.engine.compiled.directory
    copy = tmp_path / "cache" / artifact.name
    shutil.copytree(artifact, copy)
    return copy


@pytest.mark.parametrize("damage", ["corrupt graph", "foreign key", "unreadable manifest"])
def test_a_damaged_artifact_is_set_aside_and_never_run(checkpoint, compiled_captioner, tmp_path, caplog, damage):
    artifact = copy_of_the_artifact(compiled_captioner, tmp_path)
    if damage == "corrupt graph":
        for graph in (artifact / GRAPHS_DIR).iterdir():
            graph.write_bytes(graph.read_bytes()[: len(graph.read_bytes()) // 2])
    elif damage == "foreign key":
        manifest = json.loads((artifact / MANIFEST).read_text())
        manifest["key"]["torch"] = "0.0.1"
        (artifact / MANIFEST).write_text(json.dumps(manifest))
    else:
        (artifact / MANIFEST).write_text("{")
    engine = Captioner.from_pretrained(checkpoint, dtype="float32", max_batch_size=8, compile=True,
                                       compile_cache=tmp_path / "cache").engine
    assert engine.stats()["loaded_graphs"] == 0
    assert "ignoring the compiled artifact" in caplog.text
    assert not artifact.exists() and len(list((tmp_path / "cache").glob(f"{artifact.name}.broken-*"))) == 1


def test_one_slot_is_keyed_apart_from_several(compiled_captioner):
    model = compiled_captioner.model
    digests = {slots: compiled_steps(model, None, slots).digest for slots in (1, 2, 8, 32)}
    assert digests[1] != digests[2] == digests[8] == digests[32]
