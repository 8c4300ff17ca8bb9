"""Files that appear whole or not at all.

Every writer here writes to a temporary file in the destination folder, flushes it to disk and
then renames it over the destination (os.replace is atomic on POSIX). A job killed mid-write
leaves at most a stray `.tmp-*` file, never a truncated result. `check_output_path` refuses, before
a command starts any work, an output that could not be written at all.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from duodiff.core.errors import DuodiffError, require


def check_output_path(flag: str, path, kind: str = "folder") -> None:
    """Refuse, before any work, an output that could not be written: DuodiffError naming `flag`.

    kind "folder": `path` is a folder (made if missing); "file": a file in a folder (made if
    missing). Nothing is created: the nearest existing folder on the way must be a folder, and one
    this process may write in (os.access, which also says no on a read-only file system).
    """
    path = Path(path)
    if kind == "folder":
        require(not path.exists() or path.is_dir(), f"{flag} {path} is a file; it must be a folder")
        existing = path
    else:
        require(not path.is_dir(), f"{flag} {path} is a folder; it must name a file")
        existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    require(
        existing.is_dir(),
        f"{flag} {path}: {existing} is a file, so no folder can be made inside it; choose a path under a folder",
    )
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        reason = "it is on a read-only file system" if read_only else "no write permission"
        raise DuodiffError(f"{flag} {path}: cannot write in {existing} ({reason}); choose a writable location")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; results on a shared cluster get the usual 0666 & ~umask.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stray_temporaries(folder) -> list[Path]:
    """Remove the `.tmp-*` files that writers killed mid-write (SIGKILL skips atomic_path's
    cleanup) left in `folder` and its subfolders, before a job resumes there; -> what was removed."""
    stray = sorted(Path(folder).rglob(".tmp-*")) if Path(folder).is_dir() else []
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_csv(path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    fieldnames = fieldnames or (list(rows[0].keys()) if rows else [])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


def torch_save(obj, path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# sha256 by (path, device, inode, size, mtime, ctime) of each file: a file hashed again in the same
# process (a sample job's two roles, a test that retrains in place) is read once, and a file
# rewritten at the same path (atomic_path: a new inode) is hashed anew, never matched by its path.
_SHA256_CACHE: dict = {}


def _stat_key(file: Path) -> tuple:
    st = file.stat()
    return (str(file.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name order):
    what identifies a model, a feature network, a statistics file or an autoencoder in the outputs
    and in every resumable state (core/fingerprint.py). Read in 1 MiB blocks; cached per process
    while the file's stat is unchanged."""
    path = Path(path)
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file() or not p.exists())
    key = (path.is_dir(), *(_stat_key(file) for file in files))  # a missing file raises here, as open would
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        for file in files:
            if path.is_dir():
                digest.update(file.relative_to(path).as_posix().encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]
