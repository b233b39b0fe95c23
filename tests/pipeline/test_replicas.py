"""How the job's replicas start: compiled graphs shared through the output (a scheduled rerun on a fresh machine starts
from them), and the dtype that --dtype auto gives on CPUs with and without native bf16."""

import json
import shutil

import pytest

from pipeline import job
from pipeline.testing import write_sample_shards
from tests.pipeline.cluster import JobProcess

RUN_TIMEOUT_S = 300


def test_a_rerun_on_a_fresh_machine_loads_the_compiled_graphs_from_the_output(run_job, checkpoint, compiled_captioner,
                                                                              tmp_path):
    """A compiled run publishes its replicas' graphs in OUTPUT/_compiled. The next run, on a machine whose compile
    and Inductor caches are empty, with the output moved elsewhere and a shard added to the input, fetches them from
    the output and compiles nothing."""
    write_sample_shards(tmp_path / "input", shards=2, images_per_shard=1)
    assert run_job(tmp_path / "input", tmp_path / "first", "--compile") == 0
    [artifact] = (tmp_path / "first" / "_compiled").glob("*.tar")
    moved = shutil.move(tmp_path / "first", tmp_path / "moved")
    write_sample_shards(tmp_path / "more", shards=3, images_per_shard=1, seed=7)
    shutil.copy(tmp_path / "more" / "part-00002.tar", tmp_path / "input" / "part-00002.tar")
    fresh = {"FMS_SMOLVLM_COMPILE_CACHE": str(tmp_path / "empty-cache"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-inductor")}
    flags = ["--input", tmp_path / "input", "--output", moved, "--model", checkpoint, "--max-new-tokens", "6",
             "--dtype", "float32", "--compile"]
    rerun = JobProcess(flags, env=fresh)
    try:
        status = rerun.wait(timeout=RUN_TIMEOUT_S)
    finally:
        rerun.stop()
    assert status == 0, rerun.tail()
    summary = json.loads((moved / "_summary.json").read_text())
    assert (summary["shards_done"], summary["shards_skipped"]) == (1, 2)
    [start] = summary["replicas"].values()
    graphs = compiled_captioner.engine.stats()["compiled_graphs"]
    assert start["artifact"] == "fetched" and start["graphs_compiled"] == 0 and start["graphs_loaded"] == graphs, start
    assert list((tmp_path / "empty-cache").iterdir()) == [tmp_path / "empty-cache" / artifact.stem]  # from the output


@pytest.mark.parametrize("native_bf16, dtype", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_is_bf16_only_where_the_cpu_computes_it(run_job, tmp_path, monkeypatch, native_bf16, dtype):
    """``--dtype auto`` (the default) on CPU replicas: bf16 on a CPU with AMX or AVX512-BF16, fp32 on others (the
    detection is simulated both ways); the job's file and its summary record the dtype the replicas ran."""
    monkeypatch.setattr(job, "cpu_computes_bf16", lambda: native_bf16)
    write_sample_shards(tmp_path / "input", shards=1, images_per_shard=2)
    assert run_job(tmp_path / "input", tmp_path / "output", "--dtype", "auto") == 0
    assert json.loads((tmp_path / "output" / "_job.json").read_text())["dtype"] == dtype
    [start] = json.loads((tmp_path / "output" / "_summary.json").read_text())["replicas"].values()
    assert start["dtype"] == dtype and start["artifact"] is None  # eager: nothing compiled, nothing loaded
