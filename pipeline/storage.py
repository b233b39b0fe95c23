"""Object storage through fsspec: resolve URLs, read and write whole files atomically."""

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def resolve(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path without protocol)`` for any fsspec URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path.rstrip("/") or path


def join(*parts: str) -> str:
    return "/".join(part.strip("/") if i else part.rstrip("/") for i, part in enumerate(parts))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a part.

    Local disk: write a temporary file beside it, then rename over it. Object stores (S3, GCS, ...):
    a PUT (or a completed multipart upload) publishes the whole object at once.
    """
    if isinstance(fs, LocalFileSystem):
        os.replace(write_temporary_beside(path, data), path)
    else:
        fs.pipe_file(path, data)


def write_temporary_beside(path: str, data: bytes) -> str:
    """A complete, synced local file next to ``path`` (same file system, so it can be renamed or linked there)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return temporary


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_json(fs: fsspec.AbstractFileSystem, path: str, value: Any) -> None:
    write_atomic(fs, path, json_bytes(value))


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def list_names(fs: fsspec.AbstractFileSystem, directory: str, suffix: str) -> list[str]:
    """Base names (without ``suffix``) of the files in ``directory``; empty if it does not exist."""
    fs.invalidate_cache(directory)  # another run (or process) may have written since we last listed
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
    return sorted(name[: -len(suffix)] for name in names if name.endswith(suffix))
