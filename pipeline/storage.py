"""Object storage through fsspec: resolve URLs, read and write whole files atomically, read a file as a stream that
survives the store's failures.

These are single calls to the store; callers run them under the job's one retry policy (:mod:`pipeline.retry`).
"""

import io
import json
import os
import uuid
from typing import Any, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.retry import StoreRetries


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


class ResumingReader(io.RawIOBase):
    """A store's file as a seekable stream whose reads survive the store's failures: a read that fails is tried again
    (under ``retries``' policy) on a newly opened file, from the byte the stream had reached, so that a consumer
    (a streamed tar, a Parquet reader) sees every byte once, in order, however often the store drops it.

    ``open_kwargs`` go to ``fs.open`` (a read-ahead ``block_size``). Opened at the first read, not before."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, retries: StoreRetries, **open_kwargs):
        super().__init__()
        self.fs = fs
        self.path = path
        self.retries = retries
        self.open_kwargs = open_kwargs
        self.position = 0
        self._handle: Optional[io.IOBase] = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # SEEK_END needs the file's size, which opening it asks the store for
        self.position = self.retries.call(f"read {self.fs.unstrip_protocol(self.path)}",
                                          lambda: self._file().seek(offset, whence))
        return self.position

    def read(self, size: int = -1) -> bytes:
        return self.retries.call(f"read {self.fs.unstrip_protocol(self.path)}", lambda: self._read_once(size))

    def close(self) -> None:
        self._discard()
        super().close()

    def _read_once(self, size: int) -> bytes:
        try:
            data = self._file().read(size)
        except Exception:
            self._discard()  # the next attempt opens the file again, at the byte this one started from
            raise
        self.position += len(data)
        return data

    def _file(self) -> io.IOBase:
        if self._handle is None:
            handle = self.fs.open(self.path, "rb", **self.open_kwargs)
            handle.seek(self.position)
            self._handle = handle
        return self._handle

    def _discard(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # a read-only file that broke has nothing to flush: closing it cannot lose data
                pass
