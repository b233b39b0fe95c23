"""Shards: discovery under an fsspec URL and reading one shard into samples.

A shard is the unit of work and of checkpointing:
  * a WebDataset ``.tar`` (files grouped into samples by key: the name up to its first dot),
  * a Parquet file with an image-bytes column,
  * a folder of loose images (its direct children).
"""

import posixpath
import tarfile
from dataclasses import asdict, dataclass
from typing import Iterator, Optional
from urllib.parse import quote

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif")
KEY_COLUMN_CANDIDATES = ("key", "__key__", "id", "image_id", "filename", "file_name", "path", "name")
# images directly in --input: "." quoted by hand (quote() never produces it, so no real folder collides)
ROOT_FOLDER_SHARD_ID = "%2E"


@dataclass(frozen=True)
class Shard:
    shard_id: str  # stable across runs, safe as a file name
    url: str  # with protocol, so that any worker can open it
    format: str  # "webdataset" | "parquet" | "folder"


@dataclass
class Sample:
    key: str
    image: Optional[bytes]
    error: Optional[str] = None  # a sample that has no image gets an error row


class ShardReadError(ValueError):
    """The shard as a whole cannot be read (its samples are unknown)."""


def shard_id_for(relative_path: str) -> str:
    """The shard's path relative to --input, percent-quoted so that it is one safe, reversible file name."""
    return quote(relative_path, safe="-_.~") if relative_path else ROOT_FOLDER_SHARD_ID


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(name) else ""


def _hidden(relative_path: str) -> bool:
    return any(part.startswith(".") for part in relative_path.split("/"))


def _files_under(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, list[str]]:
    """``(root, files)``: a glob's matches (folders searched), a single file, or a directory searched recursively."""
    if fsspec.core.has_magic(path):
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        matches = sorted(fs.glob(path))
        return root, [f for match in matches for f in (sorted(fs.find(match)) if fs.isdir(match) else [match])]
    if fs.isfile(path):
        return posixpath.dirname(path), [path]
    if fs.isdir(path):
        return path, sorted(fs.find(path))
    raise FileNotFoundError(f"input {path} does not exist")


def discover_shards(fs: fsspec.AbstractFileSystem, path: str, exclude: Optional[str] = None) -> list[Shard]:
    """Every shard under a directory/prefix (recursively), a glob, or a single file; sorted by shard id.

    ``exclude``: a prefix to leave out, the job's output when it lies inside its input (so that a rerun
    does not read its own Parquet files as shards).
    """
    root, files = _files_under(fs, path)
    shards: dict[str, Shard] = {}
    for file in files:
        relative = posixpath.relpath(file, root) if root else file
        if _hidden(relative) or (exclude and (file + "/").startswith(exclude.rstrip("/") + "/")):
            continue
        extension = _extension(file)
        if extension == "tar":
            shard = Shard(shard_id_for(relative), fs.unstrip_protocol(file), "webdataset")
        elif extension == "parquet":
            shard = Shard(shard_id_for(relative), fs.unstrip_protocol(file), "parquet")
        elif extension in IMAGE_EXTENSIONS:
            folder = posixpath.dirname(relative)
            shard = Shard(shard_id_for(folder), fs.unstrip_protocol(posixpath.dirname(file)), "folder")
        else:
            continue
        shards.setdefault(shard.shard_id, shard)
    return sorted(shards.values(), key=lambda s: s.shard_id)


def read_shard(shard: Shard, storage_options: dict, image_column=None, key_column=None) -> list[Sample]:
    try:
        fs, path = fsspec.core.url_to_fs(shard.url, **storage_options)
        if shard.format == "webdataset":
            return list(_read_webdataset(fs, path))
        if shard.format == "parquet":
            return _read_parquet(fs, path, image_column, key_column)
        return _read_folder(fs, path)
    except ShardReadError:
        raise
    except Exception as error:  # corrupt tar, unreadable Parquet, vanished object: the whole shard fails
        raise ShardReadError(f"cannot read shard {shard.url}: {' '.join(str(error).split()) or type(error).__name__}") from None


def _read_webdataset(fs, path: str) -> Iterator[Sample]:
    samples: dict[str, dict[str, bytes]] = {}
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            directory, name = posixpath.split(member.name)
            if name.startswith(".") or "." not in name:
                continue
            stem, extension = name.split(".", 1)
            files = samples.setdefault(posixpath.join(directory, stem), {})
            if extension.lower() in IMAGE_EXTENSIONS:  # only image bytes are kept: sibling files cost memory
                files[extension.lower()] = archive.extractfile(member).read()
            else:
                files.setdefault(extension.lower(), b"")
    for key, files in samples.items():
        image = next((files[ext] for ext in files if ext in IMAGE_EXTENSIONS), None)
        error = None if image is not None else f"sample has no image file ({', '.join(sorted(files))})"
        yield Sample(key, image, error)


def _read_folder(fs, path: str) -> list[Sample]:
    files = sorted(f for f in fs.ls(path, detail=False) if _extension(f) in IMAGE_EXTENSIONS)
    contents = fs.cat(files) if files else {}
    return [Sample(posixpath.basename(f), contents[f]) for f in files]


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


def _read_parquet(fs, path: str, image_column, key_column) -> list[Sample]:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        image_name = _image_column(schema, image_column, path)
        key_name = _key_column(schema, key_column, path)
        table = parquet.read(columns=[image_name] + ([key_name] if key_name and key_name != image_name else []))
    images = table.column(image_name)
    if pa.types.is_struct(images.type):
        images = images.combine_chunks().field("bytes")
    images = images.to_pylist()
    keys = [str(k) for k in table.column(key_name).to_pylist()] if key_name else None
    width = len(str(max(len(images) - 1, 0)))
    samples = []
    for index, image in enumerate(images):
        key = keys[index] if keys else str(index).zfill(width)
        samples.append(Sample(key, image, None if image else "empty image cell"))
    return samples


# ---------------------------------------------------------------------------------------------
# As a Ray Data stage: one read task per shard, rows carry the shard's sample count


def shard_items(shards: list[Shard]) -> list[dict]:
    return [asdict(shard) for shard in shards]


def read_shard_rows(item: dict, storage_options: dict, image_column=None, key_column=None) -> list[dict]:
    """One shard -> its sample rows. An empty or unreadable shard gives one marker row (``key`` None), so the
    commit stage still learns about it."""
    shard = Shard(**item)
    marker = {"shard_id": shard.shard_id, "index": -1, "key": None, "image": None}
    try:
        samples = read_shard(shard, storage_options, image_column, key_column)
    except ShardReadError as error:
        return [{**marker, "shard_size": -1, "error": str(error)}]
    if not samples:
        return [{**marker, "shard_size": 0, "error": None}]
    return [
        {"shard_id": shard.shard_id, "shard_size": len(samples), "index": i, "key": s.key, "image": s.image, "error": s.error}
        for i, s in enumerate(samples)
    ]
