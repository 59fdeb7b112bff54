"""Atomic writes: a reader (DVC, MLflow, a later stage) never sees a half-written model or metrics file.

Files are written to a temporary name in the same folder and renamed; folders are built under a temporary
name and swapped in with rename, so an interrupted stage leaves the previous output or nothing. A write that
fails (a full disk) raises `WriteFailed` naming the path, with the previous output intact.

Checksums: `write_checksums` records the sha256 of every file of a folder in `CHECKSUMS` (written last,
atomically); `checksum_problem` finds a file truncated or corrupted since (checkpoints, the teacher cache).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from kd_core.errors import WriteFailed

CHECKSUMS = "checksums.json"
# how libraries report a failed write: Rust's io::Error (safetensors), torch's zip writer (torch.save)
_OS_ERROR = re.compile(r"os error (\d+)")
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container")
# a failed write (not a missing input: FileNotFoundError inside a writer is a bug or bad input, left as it is)
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def write_failure(err: BaseException, path: str | Path) -> WriteFailed | None:
    """`err` as a `WriteFailed` naming `path` when it is a failed write (OSError, safetensors' or torch's
    report of one), else None (a bug: let it through). One raised inside a folder being built (`atomic_dir`)
    is named by the folder, not by the temporary file that failed."""
    if isinstance(err, WriteFailed):
        reason = getattr(err, "reason", str(err))
    elif isinstance(err, OSError):
        if err.errno not in WRITE_ERRNOS:
            return None
        reason = err.strerror or str(err)
    elif (found := _OS_ERROR.search(str(err))) is not None and int(found.group(1)) in WRITE_ERRNOS:
        reason = os.strerror(int(found.group(1)))
    elif isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITER):
        reason = f"short write ({str(err).splitlines()[0]})"
    else:
        return None
    failed = WriteFailed(f"{path}: cannot write ({reason}); the previous output there is intact")
    failed.reason = reason
    return failed


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (failed := write_failure(err, path)) is not None:
            raise failed from err
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def probe_write(folder: str | Path) -> None:
    """Create `folder` if needed and write (then remove) a file in it: permissions, read-only mounts, quotas."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".kd-preflight-", dir=folder)
    os.close(fd)
    os.unlink(name)


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if (failed := write_failure(err, path)) is not None:
            raise failed from err
        raise


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` to `dst` (no copy of the bytes), copying when they are on different devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: str | Path, dst: str | Path) -> None:
    """A folder's files hard-linked (or copied, see `link_or_copy`) into `dst`."""
    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


def tree_hash(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (a file or a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def file_hash(*paths: str | Path) -> str:
    """Short sha256 over the bytes of the files, in order (the data version of the splits)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:12]


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (`hashlib.file_digest`): checksums, DVC's md5 content hash."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def write_checksums(folder: str | Path) -> Path:
    """sha256 and size of every file under `folder` into `folder/CHECKSUMS` (written last, atomically: its
    presence says the files before it were complete)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS and not p.name.startswith("."))
    sums = {str(p.relative_to(folder)): {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in files}
    return write_json_atomic(folder / CHECKSUMS, sums)


def checksum_problem(folder: str | Path) -> str | None:
    """What is wrong with the files `folder/CHECKSUMS` lists (one line naming the file: missing, truncated,
    corrupted), None when all match or the folder has no checksums (written before they existed)."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return f"{folder / CHECKSUMS}: unreadable"
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: truncated or extended ({size} bytes, {want['bytes']} when written)"
        if file_digest(path) != want["sha256"]:
            return f"{path}: corrupted (sha256 differs from the one recorded when it was written)"
    return None


def size_text(n: int) -> str:
    """A byte count for people: 812 B, 3.4 KiB, 12.1 MiB, 2.0 GiB."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
