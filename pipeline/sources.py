"""Shards: discovery under an fsspec URL, and reading one shard as a stream of bounded row batches.

A shard is the unit of work and of checkpointing:
  * a WebDataset ``.tar`` (adjacent files sharing a key, the name up to its first dot, are one sample),
  * a Parquet file with an image-bytes column,
  * a folder of loose images or video clips (its direct children).

The read stage's rows (``SHARD_ROW_SCHEMA``), in batches of at most ``batch_rows`` rows / about ``batch_bytes``:
  * a sample row: ``shard_id``, ``index`` (position in the shard), ``key``, ``media`` (the image or video file's bytes),
    ``error`` (why the sample has none; else null), ``shard_size`` null;
  * then exactly one end-of-shard marker: ``key`` null, ``index`` -1, ``media`` null, and ``shard_size`` the
    number of samples (0 for an empty shard), or -1 with ``error`` set when the shard could not be read, also
    when that happened halfway: the commit stage then drops the rows it already got.
Memory per read task is a few batches, whatever the size of the shard.
"""

import io
import posixpath
import tarfile
from dataclasses import asdict, dataclass
from typing import BinaryIO, Callable, Iterator, Optional
from urllib.parse import quote

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.retry import RetryPolicy, StoreRetries, describe
from pipeline.storage import ResumingReader

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS  # either kind travels in a row's ``media`` field
KEY_COLUMN_CANDIDATES = ("key", "__key__", "id", "image_id", "filename", "file_name", "path", "name")
# images directly in --input: "." quoted by hand (quote() never produces it, so no real folder collides)
ROOT_FOLDER_SHARD_ID = "%2E"


@dataclass(frozen=True)
class Shard:
    shard_id: str  # stable across runs, safe as a file name
    url: str  # with protocol, so that any worker can open it
    format: str  # "webdataset" | "parquet" | "folder"
    size: Optional[int] = None  # a file's bytes, as listed; None for a folder


@dataclass
class Sample:
    key: str
    media: Optional[bytes]  # an image's or a video's bytes
    error: Optional[str] = None  # a sample that has no image or video gets an error row


class ShardReadError(ValueError):
    """The shard as a whole cannot be read (its samples are unknown)."""


def shard_id_for(relative_path: str) -> str:
    """The shard's path relative to --input, percent-quoted so that it is one safe, reversible file name."""
    return quote(relative_path, safe="-_.~") if relative_path else ROOT_FOLDER_SHARD_ID


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(name) else ""


def _hidden(relative_path: str) -> bool:
    return any(part.startswith(".") for part in relative_path.split("/"))


def _files_under(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, dict[str, int]]:
    """``(root, {file: size})``: a glob's matches (folders searched), a single file, or a directory searched
    recursively. The sizes come with the listing, at no extra request."""
    if fsspec.core.has_magic(path):
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        files = {}
        for match, info in fs.glob(path, detail=True).items():
            files.update(fs.find(match, detail=True) if info["type"] == "directory" else {match: info})
        return root, _sizes(files)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"input {path} does not exist") from None
    if info["type"] == "directory":
        return path, _sizes(fs.find(path, detail=True))
    return posixpath.dirname(path), _sizes({path: info})


def _sizes(details: dict) -> dict[str, int]:
    return {name: info["size"] for name, info in sorted(details.items())}


def discover_shards(
    fs: fsspec.AbstractFileSystem, path: str, exclude: Optional[str] = None, retries: Optional[StoreRetries] = None
) -> list[Shard]:
    """Every shard under a directory/prefix (recursively), a glob, or a single file; sorted by shard id.

    ``exclude``: a prefix to leave out, the job's output when it lies inside its input (so that a rerun
    does not read its own Parquet files as shards). The listing runs under ``retries`` (the default policy if None).
    """
    retries = retries or StoreRetries()
    root, files = retries.call(f"list {fs.unstrip_protocol(path)}", lambda: _files_under(fs, path))
    shards: dict[str, Shard] = {}
    for file, size in files.items():
        relative = posixpath.relpath(file, root) if root else file
        if _hidden(relative) or (exclude and (file + "/").startswith(exclude.rstrip("/") + "/")):
            continue
        extension = _extension(file)
        if extension == "tar":
            shard = Shard(shard_id_for(relative), fs.unstrip_protocol(file), "webdataset", size)
        elif extension == "parquet":
            shard = Shard(shard_id_for(relative), fs.unstrip_protocol(file), "parquet", size)
        elif extension in MEDIA_EXTENSIONS:
            folder = posixpath.dirname(relative)
            shard = Shard(shard_id_for(folder), fs.unstrip_protocol(posixpath.dirname(file)), "folder")
        else:
            continue
        shards.setdefault(shard.shard_id, shard)
    return sorted(shards.values(), key=lambda s: s.shard_id)


# ---------------------------------------------------------------------------------------------
# Reading one shard: samples as a stream, never more of the shard in memory than a read-ahead block

# fsspec read-ahead while streaming a shard (s3fs would buffer 50 MiB per open file otherwise); a shard file no
# larger than this is fetched whole instead, in one request
STREAM_BLOCK_SIZE = 8 << 20
# rows taken from a Parquet file at a time; pyarrow decodes a whole row group anyway, and larger slices than
# this cost memory when they span row groups (measured: 20 MB row groups, slices of 64 rows doubled the peak)
PARQUET_READ_ROWS = 8
FOLDER_READ_FILES = 16  # loose files fetched together (s3fs fetches them concurrently)


def iter_samples(
    shard: Shard, storage_options: dict, retries: StoreRetries, image_column=None, key_column=None
) -> Iterator[Sample]:
    """The shard's samples in order, read as they are needed; every read from the store under ``retries``' policy
    (a stream that breaks resumes from the byte it reached). Raises ShardReadError, also halfway through."""
    try:
        fs, path = fsspec.core.url_to_fs(shard.url, **storage_options)
        yield from SAMPLE_READERS[shard.format](fs, path, shard.size, retries, image_column, key_column)
    except ShardReadError:
        raise
    except Exception as error:  # corrupt tar, unreadable Parquet, vanished object, the store gone for too long
        raise ShardReadError(f"cannot read shard {shard.url}: {describe(error)}") from None


def _webdataset_name(member: tarfile.TarInfo) -> Optional[tuple[str, str]]:
    """``(key, extension)`` of a sample file: ``dir/abc.seg.png`` -> ``("dir/abc", "seg.png")``; None for others."""
    directory, name = posixpath.split(member.name)
    if not member.isfile() or name.startswith(".") or "." not in name:
        return None
    stem, extension = name.split(".", 1)
    return posixpath.join(directory, stem), extension.lower()


def _webdataset_sample(key: str, media: Optional[bytes], other_extensions: set) -> Sample:
    if media is not None:
        return Sample(key, media)
    return Sample(key, None, f"sample has no image or video file ({', '.join(sorted(other_extensions))})")


def _open_shard_file(fs, path: str, size: Optional[int], retries: StoreRetries) -> BinaryIO:
    """A shard file as a stream; a small one (its listed size at most one read-ahead block) is fetched whole, in
    one request. ``start=0`` asks for the object by range: asked for a whole object, s3fs sends a HEAD first, and
    on a remote store that round trip costs as much as the read of a small shard."""
    if size is not None and size <= STREAM_BLOCK_SIZE:
        return io.BytesIO(retries.call(f"read {fs.unstrip_protocol(path)}", lambda: fs.cat_file(path, start=0)))
    return ResumingReader(fs, path, retries, block_size=STREAM_BLOCK_SIZE)


def _read_webdataset(fs, path: str, size: Optional[int], retries, image_column, key_column) -> Iterator[Sample]:
    """A sample is complete when the next key starts (WebDataset writes a sample's files adjacently)."""
    with _open_shard_file(fs, path, size, retries) as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
        key, media, others = None, None, set()
        for member in archive:
            archive.members = []  # a streamed TarFile keeps every header it has seen: millions in a large shard
            name = _webdataset_name(member)
            if name is None:
                continue
            if name[0] != key:
                if key is not None:
                    yield _webdataset_sample(key, media, others)
                key, media, others = name[0], None, set()
            if media is None and name[1] in MEDIA_EXTENSIONS:  # the first media file; siblings are skipped unread
                media = archive.extractfile(member).read()
            else:
                others.add(name[1])
        if key is not None:
            yield _webdataset_sample(key, media, others)


def _read_folder(fs, path: str, size: Optional[int], retries, image_column, key_column) -> Iterator[Sample]:
    listed = retries.call(f"list {fs.unstrip_protocol(path)}", lambda: fs.ls(path, detail=False))
    files = sorted(f for f in listed if _extension(f) in MEDIA_EXTENSIONS and not _hidden(posixpath.basename(f)))
    for start in range(0, len(files), FOLDER_READ_FILES):
        chunk = files[start : start + FOLDER_READ_FILES]
        contents = retries.call(f"read {len(chunk)} files of {fs.unstrip_protocol(path)}", lambda: fs.cat(chunk))
        for file in chunk:
            yield Sample(posixpath.basename(file), contents[file])


def _image_column(schema: pa.Schema, requested: Optional[str], path: str) -> str:
    if requested:
        if requested not in schema.names:
            raise ShardReadError(f"{path}: no column {requested!r} (columns: {', '.join(schema.names)})")
        return requested
    for field in schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field.name
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:  # HF datasets' Image
            return field.name
    raise ShardReadError(f"{path}: no image-bytes column found; name one with --image-column")


def _key_column(schema: pa.Schema, requested: Optional[str], path: str) -> Optional[str]:
    if requested:
        if requested not in schema.names:
            raise ShardReadError(f"{path}: no column {requested!r} (columns: {', '.join(schema.names)})")
        return requested
    return next((name for name in KEY_COLUMN_CANDIDATES if name in schema.names), None)


def _read_parquet(fs, path: str, size: Optional[int], retries, image_column, key_column) -> Iterator[Sample]:
    with _open_shard_file(fs, path, size, retries) as handle:
        # pyarrow's default pre_buffer reads every row group ahead, the whole file; without it a read task holds
        # about one row group (decoded) plus buffered column chunks
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=STREAM_BLOCK_SIZE)
        schema = parquet.schema_arrow
        image_name = _image_column(schema, image_column, path)
        key_name = _key_column(schema, key_column, path)
        columns = [image_name] + ([key_name] if key_name and key_name != image_name else [])
        width = len(str(max(parquet.metadata.num_rows - 1, 0)))  # keys without a key column: zero-padded indices
        index = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_READ_ROWS, columns=columns):
            images = batch.column(image_name)
            if pa.types.is_struct(images.type):
                images = images.field("bytes")
            keys = [str(k) for k in batch.column(key_name).to_pylist()] if key_name else None
            for offset in range(batch.num_rows):
                image = images[offset].as_py()
                yield Sample(keys[offset] if keys else str(index).zfill(width), image, None if image else "empty image cell")
                index += 1


SAMPLE_READERS: dict[str, Callable[..., Iterator[Sample]]] = {
    "webdataset": _read_webdataset,
    "parquet": _read_parquet,
    "folder": _read_folder,
}


# ---------------------------------------------------------------------------------------------
# As a Ray Data stage: one read task per shard, its rows leave in bounded batches, an end-of-shard marker last

SHARD_ROW_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("shard_size", pa.int64()),  # null on sample rows; the marker's sample count, or -1: the shard failed
        ("index", pa.int64()),  # position in the shard; -1 on the marker
        ("key", pa.string()),  # null on the marker (the stages downstream pass such rows through)
        ("media", pa.large_binary()),  # an image's or a video's bytes; 64-bit offsets: a batch of video clips may pass 2 GiB
        ("error", pa.string()),
    ]
)
DEFAULT_BATCH_ROWS = 32
# the job sets Ray's DataContext.target_max_block_size to this too: a batch cut for its bytes is a block of its
# own, smaller batches are sent on together once they reach it; with Ray's default (128 MiB) they would wait
DEFAULT_BATCH_BYTES = 16 << 20


def shard_items(shards: list[Shard]) -> list[dict]:
    return [asdict(shard) for shard in shards]


def end_of_shard(shard_id: str, shard_size: int, error: Optional[str] = None) -> dict:
    return {"shard_id": shard_id, "shard_size": shard_size, "index": -1, "key": None, "media": None, "error": error}


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SHARD_ROW_SCHEMA)


def read_shard_batches(
    item: dict,
    storage_options: dict,
    image_column: Optional[str] = None,
    key_column: Optional[str] = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    retry: RetryPolicy = RetryPolicy(),
    report_retry: Optional[Callable[[str], None]] = None,
) -> Iterator[pa.Table]:
    """One shard (a ``shard_items`` entry) -> tables of at most ``batch_rows`` sample rows, each sent on once
    it holds ``batch_rows`` rows or ``batch_bytes`` of media, the end-of-shard marker in the last one. The store is
    read under ``retry``; ``report_retry(kind)`` hears of every retry."""
    shard = Shard(**item)
    retries = StoreRetries(retry, report_retry)
    rows, rows_bytes, count = [], 0, 0
    try:
        for sample in iter_samples(shard, storage_options, retries, image_column, key_column):
            rows.append({"shard_id": shard.shard_id, "shard_size": None, "index": count, "key": sample.key,
                         "media": sample.media, "error": sample.error})
            count += 1
            rows_bytes += len(sample.media or b"")
            if len(rows) == batch_rows or rows_bytes >= batch_bytes:
                yield _table(rows)
                rows, rows_bytes = [], 0
    except ShardReadError as error:  # the rows sent so far are dropped by the commit stage
        yield _table([end_of_shard(shard.shard_id, -1, str(error))])
        return
    yield _table(rows + [end_of_shard(shard.shard_id, count)])


def read_shards(items: pa.Table, **options) -> Iterator[pa.Table]:
    """``read_shard_batches`` for ``Dataset.map_batches`` (which hands over a batch of ``shard_items``):
    its shards one after another, every table yielded as it is made."""
    for item in items.to_pylist():
        yield from read_shard_batches(item, **options)
