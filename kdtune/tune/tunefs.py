"""The file system Tune writes a sweep's experiment to: the local disk, with every file written whole or not at
all.

:func:`atomic_local_fs` is a ``pyarrow.fs.PyFileSystem`` over the local disk whose output streams write to a
hidden temporary file beside the target (``.<name>.<pid>.<random>.tmp``, which no Tune pattern matches) and
rename it over the target when closed, after an fsync: a reader sees the old file or the new one, never a
part. Everything else is fsspec's local file system, as Ray itself uses it (``_ExcludingLocalFilesystem``).

Each file is whole; the files of one snapshot may still come from two snapshots (the driver killed between
two of them). That is why a resumed searcher is rebuilt from the restored trial list rather than trusted
(:meth:`kdtune.tune.search.GroupedOptunaSearch.rebuild`).

More: docs/sweep_storage.md §Tune's file system (why: Tune's copy of its snapshot writes in place).
"""

from __future__ import annotations

import os
import secrets

import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem


class _AtomicWriter:
    """A binary file-like object that becomes ``path`` on ``close()`` (``pyarrow.PythonFile`` wraps it)."""

    def __init__(self, path: str):
        d, name = os.path.split(path)
        self.path = path
        self.tmp = os.path.join(d, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._f = open(self.tmp, "wb")
        self.closed = False

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self._f.close()
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            raise


class AtomicLocalHandler(pafs.FSSpecHandler):
    """fsspec's local file system for pyarrow, with atomic output streams."""

    def __init__(self):
        super().__init__(LocalFileSystem(auto_mkdir=True))

    def __reduce__(self):  # travels to the trial workers (Tune pickles the storage context)
        return (AtomicLocalHandler, ())

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "kdtune-atomic-local"

    def open_output_stream(self, path, metadata):
        from pyarrow import PythonFile

        return PythonFile(_AtomicWriter(path), mode="w")


def atomic_local_fs() -> pafs.FileSystem:
    return pafs.PyFileSystem(AtomicLocalHandler())
