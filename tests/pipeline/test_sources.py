"""Reading shards as streams: bounded memory for a large shard, exact rows and order in every format, and one
end-of-shard marker per shard (its sample count, 0 when empty, -1 when the shard failed, also halfway)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from dataclasses import replace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources import (
    SHARD_ROW_SCHEMA,
    Shard,
    discover_shards,
    read_shard_batches,
    read_shards,
    shard_items,
)
from infra.local.s3_proxy import S3Proxy
from tests.pipeline.conftest import REPO


def write_tar(path, files: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def read_all(shard: Shard, batch_rows: int = 3, **options) -> list[pa.Table]:
    return list(read_shard_batches(shard_items([shard])[0], {}, batch_rows=batch_rows, **options))


def sample_rows(tables: list[pa.Table]) -> list[dict]:
    return [row for table in tables for row in table.to_pylist() if row["key"] is not None]


def markers(tables: list[pa.Table]) -> list[dict]:
    return [row for table in tables for row in table.to_pylist() if row["key"] is None]


# ---------------------------------------------------------------------------------------------
# memory: a shard much larger than a batch never sits in memory whole

SHARD_BYTES = 200 << 20
PAYLOAD_BYTES = 512 << 10
SAMPLES = SHARD_BYTES // PAYLOAD_BYTES

# runs in a fresh interpreter: its peak RSS is reset (clear_refs 5) after the imports, so VmHWM at the end is the
# highest RSS the read itself reached; every table is dropped once it is counted, as a Ray task sends it on
READ_AND_MEASURE = """
import json, sys
import pyarrow as pa
from pipeline.sources import SHARD_ROW_SCHEMA, read_shard_batches

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

item = {"shard_id": "big", "url": sys.argv[1], "format": sys.argv[2]}
pa.Table.from_pylist([], schema=SHARD_ROW_SCHEMA)  # pyarrow imports pandas (50 MB) on its first conversion
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
rows, largest, marker = 0, 0, None
for table in read_shard_batches(item, {}, batch_rows=8):
    for row in table.select(["key", "shard_size"]).to_pylist():
        rows += row["key"] is not None
        marker = row["shard_size"] if row["key"] is None else marker
    largest = max(largest, table.num_rows)
print(json.dumps({"rows": rows, "marker": marker, "largest_table": largest, "growth": (kib("VmHWM") - before) * 1024}))
"""


def write_large_webdataset(path) -> None:
    """Incompressible payloads, each sample a .jpg and a .json sibling."""
    with tarfile.open(path, "w") as archive:
        for i in range(SAMPLES):
            for name, payload in ((f"s{i:05d}.jpg", os.urandom(PAYLOAD_BYTES)), (f"s{i:05d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def write_large_parquet(path) -> None:
    """Incompressible payloads in row groups of 8 (4 MB)."""
    schema = pa.schema([("id", pa.string()), ("jpg", pa.binary())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, SAMPLES, 8):
            keys = [f"s{i:05d}" for i in range(start, start + 8)]
            writer.write_table(pa.table({"id": keys, "jpg": [os.urandom(PAYLOAD_BYTES) for _ in keys]}, schema=schema))


@pytest.mark.parametrize(
    "fmt, write, limit",
    [
        # a reader that held the shard would grow by its 200 MB; streamed, it holds a few 4 MB batches
        ("webdataset", write_large_webdataset, 1 / 5),
        # pyarrow decodes a row group at a time (measured: ~75 MB for 4 MB row groups, whatever the file size);
        # with its default pre_buffer it would read the whole file ahead (measured: more than the file)
        ("parquet", write_large_parquet, 1 / 2),
    ],
)
def test_a_large_shard_is_read_in_bounded_memory(tmp_path, fmt, write, limit):
    path = tmp_path / f"big.{'tar' if fmt == 'webdataset' else 'parquet'}"
    write(path)
    try:
        assert path.stat().st_size >= SHARD_BYTES
        result = subprocess.run([sys.executable, "-c", READ_AND_MEASURE, str(path), fmt], cwd=REPO,
                                capture_output=True, text=True, check=True)
        measured = json.loads(result.stdout)
        assert measured["rows"] == SAMPLES and measured["marker"] == SAMPLES
        assert measured["largest_table"] <= 9  # 8 sample rows, plus the marker in the last table
        assert measured["growth"] < path.stat().st_size * limit, measured
    finally:
        path.unlink()  # pytest keeps recent tmp dirs: do not leave 200 MB behind


# ---------------------------------------------------------------------------------------------
# exact rows and order


def test_webdataset_rows_in_tar_order_in_bounded_batches(tmp_path):
    write_tar(tmp_path / "a.tar", [
        ("b.jpg", b"jpeg-b"), ("b.json", b"{}"),
        ("a.png", b"png-a"), ("a.txt", b"caption"),
        ("clip.mp4", b"video-bytes"), ("clip.json", b"{}"),
        ("sub/x.cls", b"3"), ("sub/x.webp", b"webp-x"), ("sub/x.jpg", b"second-image"),
        ("meta.json", b"{}"),  # a sample without any media file
        (".hidden.jpg", b"skipped"),
        ("c.JPEG", b"jpeg-c"),
        ("d.seg.png", b"not-an-image-extension"),
    ])
    tables = read_all(Shard("a.tar", str(tmp_path / "a.tar"), "webdataset"), batch_rows=3)

    assert all(table.schema == SHARD_ROW_SCHEMA for table in tables)
    assert [table.num_rows for table in tables] == [3, 3, 1 + 1]  # 7 samples, the marker with the last ones
    assert [(r["index"], r["key"], r["media"], r["error"]) for r in sample_rows(tables)] == [
        (0, "b", b"jpeg-b", None),
        (1, "a", b"png-a", None),
        (2, "clip", b"video-bytes", None),  # a video is a sample's media file too
        (3, "sub/x", b"webp-x", None),  # the first media file; later ones are not read
        (4, "meta", None, "sample has no image or video file (json)"),
        (5, "c", b"jpeg-c", None),
        (6, "d", None, "sample has no image or video file (seg.png)"),
    ]
    assert all(row["shard_id"] == "a.tar" and row["shard_size"] is None for row in sample_rows(tables))
    assert markers(tables) == [{"shard_id": "a.tar", "shard_size": 7, "index": -1, "key": None, "media": None,
                                "error": None}]
    assert tables[-1].to_pylist()[-1]["key"] is None  # the marker is the shard's last row


def test_a_batch_is_sent_on_when_its_bytes_reach_the_limit(tmp_path):
    write_tar(tmp_path / "v.tar", [(f"{i}.mp4", bytes(1000)) for i in range(5)])
    tables = read_all(Shard("v.tar", str(tmp_path / "v.tar"), "webdataset"), batch_rows=100, batch_bytes=2000)
    assert [table.num_rows for table in tables] == [2, 2, 1 + 1]


def test_parquet_rows_across_row_groups(tmp_path):
    keys = [f"img-{i}" for i in range(10)]
    images = [f"bytes-{i}".encode() for i in range(10)]
    images[4] = None
    pq.write_table(pa.table({"id": keys, "jpg": pa.array(images, pa.binary())}), tmp_path / "p.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "p.parquet").num_row_groups == 4

    tables = read_all(Shard("p.parquet", str(tmp_path / "p.parquet"), "parquet"), batch_rows=4)
    assert [table.num_rows for table in tables] == [4, 4, 2 + 1]
    assert [(r["index"], r["key"], r["media"], r["error"]) for r in sample_rows(tables)] == [
        (i, keys[i], images[i], "empty image cell" if images[i] is None else None) for i in range(10)
    ]
    assert [m["shard_size"] for m in markers(tables)] == [10]


def test_parquet_hf_image_structs_without_a_key_column(tmp_path):
    images = pa.array([{"bytes": f"b{i}".encode(), "path": None} for i in range(12)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": list(range(12))}), tmp_path / "hf.parquet", row_group_size=5)
    tables = read_all(Shard("hf.parquet", str(tmp_path / "hf.parquet"), "parquet"), batch_rows=5)
    # no key column: zero-padded positions, as wide as the largest
    assert [(r["key"], r["media"]) for r in sample_rows(tables)] == [(f"{i:02d}", f"b{i}".encode()) for i in range(12)]


def test_a_folder_of_video_clips_in_name_order(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    files = {"c.mkv": b"clip-c", "a.mp4": b"clip-a", "b.webm": b"clip-b", "d.MOV": b"clip-d", "e.avi": b"clip-e",
             "notes.txt": b"-", ".f.mp4": b"hidden"}
    for name, data in files.items():
        (folder / name).write_bytes(data)

    [shard] = discover_shards(fsspec.filesystem("file"), str(tmp_path))
    assert (shard.shard_id, shard.format) == ("clips", "folder")  # a folder of clips alone is a shard
    tables = read_all(shard, batch_rows=2)
    assert [(r["index"], r["key"], r["media"]) for r in sample_rows(tables)] == [
        (0, "a.mp4", b"clip-a"), (1, "b.webm", b"clip-b"), (2, "c.mkv", b"clip-c"), (3, "d.MOV", b"clip-d"),
        (4, "e.avi", b"clip-e"),
    ]
    assert [m["shard_size"] for m in markers(tables)] == [5]


# ---------------------------------------------------------------------------------------------
# end-of-shard markers


def test_an_empty_shard_is_one_marker_of_size_0(tmp_path):
    write_tar(tmp_path / "empty.tar", [])
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "jpg": pa.array([], pa.binary())}), tmp_path / "e.parquet")
    for shard in (Shard("empty.tar", str(tmp_path / "empty.tar"), "webdataset"),
                  Shard("e.parquet", str(tmp_path / "e.parquet"), "parquet")):
        tables = read_all(shard)
        assert [table.to_pylist() for table in tables] == [
            [{"shard_id": shard.shard_id, "shard_size": 0, "index": -1, "key": None, "media": None, "error": None}]
        ]


def test_a_shard_that_fails_halfway_ends_with_a_failure_marker(tmp_path):
    write_tar(tmp_path / "whole.tar", [(f"s{i}.jpg", bytes(4000)) for i in range(10)])
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])  # cut inside a member's data
    url = str(tmp_path / "cut.tar")

    tables = read_all(Shard("cut.tar", url, "webdataset"), batch_rows=2)
    assert len(sample_rows(tables)) >= 2  # rows left before the failure was met
    [marker] = markers(tables)
    assert marker["shard_size"] == -1 and marker["index"] == -1
    assert marker["error"].startswith(f"cannot read shard {url}: ") and "\n" not in marker["error"]
    assert tables[-1].to_pylist() == [marker]  # the marker is the last row; no partial batch follows


def test_an_unreadable_shard_is_one_failure_marker(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "n": [1]}), tmp_path / "noimg.parquet")
    tables = read_all(Shard("noimg.parquet", str(tmp_path / "noimg.parquet"), "parquet"))
    assert [(m["shard_size"], m["error"]) for m in markers(tables)] == [
        (-1, f"{tmp_path}/noimg.parquet: no image-bytes column found; name one with --image-column")
    ]
    missing = read_all(Shard("gone.tar", str(tmp_path / "gone.tar"), "webdataset"))
    assert [m["shard_size"] for m in markers(missing)] == [-1] and not sample_rows(missing)


# ---------------------------------------------------------------------------------------------
# the Ray Data stage


def test_ray_data_map_batches_streams_every_shard_with_its_marker(ray_local, tmp_path):
    """The job's read stage: blocks leave the read task as its batches are yielded, not one block per shard."""
    import ray

    write_tar(tmp_path / "a.tar", [(f"a{i}.jpg", bytes(3000)) for i in range(7)])
    write_tar(tmp_path / "b.tar", [])
    shards = [Shard("a.tar", str(tmp_path / "a.tar"), "webdataset"), Shard("b.tar", str(tmp_path / "b.tar"), "webdataset")]
    context = ray.data.DataContext.get_current()
    default_block_size, context.target_max_block_size = context.target_max_block_size, 1024  # < a batch's bytes
    try:
        dataset = ray.data.from_items(shard_items(shards), override_num_blocks=2).map_batches(
            read_shards, batch_size=1, batch_format="pyarrow", fn_kwargs={"storage_options": {}, "batch_rows": 3}
        )
        blocks = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    finally:
        context.target_max_block_size = default_block_size
    rows = [row for block in blocks for row in block.to_pylist()]
    assert sorted((r["shard_id"], r["index"], r["shard_size"]) for r in rows if r["key"] is None) == [
        ("a.tar", -1, 7), ("b.tar", -1, 0)
    ]
    assert sorted(r["index"] for r in rows if r["key"] is not None) == list(range(7))
    assert len([block for block in blocks if block.num_rows]) >= 3  # 3 + 3 + (1 + marker) from a.tar, at least


def write_one_shard_of_each_format(tmp_path) -> None:
    write_tar(tmp_path / "a.tar", [(f"a{i}.jpg", f"tar {i}".encode()) for i in range(5)])
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(5)], "jpg": [f"pq {i}".encode() for i in range(5)]}),
                   tmp_path / "b.parquet", row_group_size=2)
    (tmp_path / "c").mkdir()
    for i in range(5):
        (tmp_path / "c" / f"c{i}.png").write_bytes(f"png {i}".encode())


@pytest.mark.parametrize("size_known", [True, False], ids=["fetched-whole", "streamed"])
def test_every_format_is_read_from_s3(s3_server, tmp_path, size_known):
    fs, options = s3_server
    prefix = f"captions-test/sources-{uuid.uuid4().hex}"
    write_one_shard_of_each_format(tmp_path)
    fs.put(str(tmp_path) + "/", prefix, recursive=True)

    shards = discover_shards(fs, prefix)
    assert [(s.shard_id, s.format) for s in shards] == [("a.tar", "webdataset"), ("b.parquet", "parquet"), ("c", "folder")]
    assert [s.size for s in shards] == [(tmp_path / "a.tar").stat().st_size, (tmp_path / "b.parquet").stat().st_size, None]
    for shard, expected in zip(shards, (b"tar", b"pq", b"png")):
        item = shard_items([shard if size_known else replace(shard, size=None)])[0]
        tables = list(read_shard_batches(item, options, batch_rows=2))
        assert [r["media"] for r in sample_rows(tables)] == [expected + f" {i}".encode() for i in range(5)]
        assert [m["shard_size"] for m in markers(tables)] == [5]


def test_a_small_shard_file_is_one_request(s3_server, tmp_path):
    """Its listed size is below the read-ahead block: one GET, no HEAD first (on a remote store that round trip
    would cost as much as the read)."""
    fs, options = s3_server
    prefix = f"captions-test/requests-{uuid.uuid4().hex}"
    write_one_shard_of_each_format(tmp_path)
    fs.put(str(tmp_path) + "/", prefix, recursive=True)
    webdataset, parquet, _ = discover_shards(fs, prefix)
    with S3Proxy(options["client_kwargs"]["endpoint_url"]) as proxy:
        proxied = {**options, "client_kwargs": {"endpoint_url": proxy.endpoint}, "skip_instance_cache": True}
        for shard in (webdataset, parquet):
            before = proxy.counts.requests
            assert len(sample_rows(list(read_shard_batches(shard_items([shard])[0], proxied)))) == 5
            assert proxy.counts.requests - before == 1, shard
