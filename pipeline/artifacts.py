"""Writing stage outputs safely and fingerprinting them.

A stage writes each output into a temporary sibling and renames it into place only when it is
complete, so a crash or a validation error never leaves a half-written output that a later stage
(or DVC) would trust. The sibling's name carries the writing process's id
(``.<name>.<pid>.<random>.partial``): one left by a killed process is removed by the next write
of the same output, and one of a live process (another stage writing now) is left alone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove temporary siblings of ``target`` that a killed process left behind."""
    removed = []
    prefix = f".{target.name}."
    for leftover in target.parent.glob(f"{glob.escape(prefix)}*.partial"):
        pid = leftover.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue  # a stage writing this output right now
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        logger.warning("removed %s, left behind by an interrupted run", leftover)
        removed.append(leftover)
    return removed


def umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it can only be read by setting
    it, which for a moment changes what another thread creating a file would get."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_says(path: Path) -> None:
    """Give ``path`` (and a folder's contents) the permissions a plain ``mkdir`` or ``open``
    would: 0777 or 0666 less the umask, so outputs, released models first, can be shared as
    they are. Writers that go through a temporary file create it private and keep that after
    the rename: tempfile (0700 folders, 0600 files: our own temporary outputs), safetensors
    0.8 (every ``model.safetensors``; safetensors/safetensors#782)."""
    mask = umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if item.is_symlink():
            continue
        executable = item.is_dir() or item.stat().st_mode & 0o111
        os.chmod(item, (0o777 if executable else 0o666) & ~mask)


def _temporary_sibling(target: Path, make) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    return Path(make(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial",
                     dir=target.parent))


def _without_temporary_path(exc: PipelineError, tmp: Path, target: Path) -> PipelineError:
    """The same error naming the output, not the temporary folder it was being written in."""
    message = str(exc)
    for form in (str(tmp.resolve()), str(tmp)):
        message = message.replace(form, str(target))
    return exc if message == str(exc) else type(exc)(message)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` if the block succeeds."""
    target = Path(path)
    tmp = _temporary_sibling(target, tempfile.mkdtemp)
    try:
        yield tmp
    except PipelineError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        clean = _without_temporary_path(exc, tmp, target)
        if clean is exc:
            raise
        raise clean from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_as_umask_says(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    logger.info("wrote %s (%s)", target, human_size(dir_size(target)))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` if the block succeeds."""
    target = Path(path)

    def make_file(**kwargs) -> str:
        fd, name = tempfile.mkstemp(**kwargs)
        os.close(fd)
        return name

    tmp = _temporary_sibling(target, make_file)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    share_as_umask_says(tmp)
    os.replace(tmp, target)
    if not target.parent.name.endswith(".partial"):  # files inside an atomic_dir log with it
        logger.info("wrote %s (%s)", target, human_size(target.stat().st_size))


def log_inputs(*paths: str | os.PathLike) -> None:
    """Log what a stage reads, with sizes; a missing input is a clear error, not a traceback
    from deep inside a library."""
    for path in paths:
        if not Path(path).exists():
            raise PipelineError(f"{path} not found: run the stage that writes it first "
                                "(`dvc repro` runs them in order)")
        logger.info("read %s (%s)", path, human_size(dir_size(path)))


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


# Digests this process has computed, by resolved path, with the listing each was computed from.
_HASHES: dict[str, tuple[tuple, str]] = {}
# A file modified this recently may be modified again within its file system's timestamp
# resolution (up to 2 s) without its mtime changing: its folder's digest is not remembered.
_RECENT_NS = 2_000_000_000


def _listing(root: Path, files: list[Path]) -> tuple:
    """Each file's name, inode, size, mtime and ctime: any write, replacement (a new inode, as
    when :func:`atomic_dir` swaps a folder in), addition or removal changes it."""
    entries = []
    for file in files:
        st = file.stat()
        entries.append((str(file.relative_to(root)), st.st_dev, st.st_ino, st.st_size,
                        st.st_mtime_ns, st.st_ctime_ns))
    return tuple(entries)


def hash_path(path: str | os.PathLike) -> str:
    """SHA-256 over a file, or over a folder's relative file names and contents (sorted).

    A stage hashes the same large folders more than once (the checkpoint and the tokenized data
    for the resume fingerprint, then for the run's lineage tags), so a digest is remembered for
    this process and reused while the folder's listing (:func:`_listing`) is unchanged.
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    started = time.time_ns()
    key, listing = str(root.resolve()), _listing(root, files)
    known = _HASHES.get(key)
    if known is not None and known[0] == listing:
        return known[1]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() if file != root else b"")
        digest.update(b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    if all(entry[4] < started - _RECENT_NS for entry in listing):
        _HASHES[key] = (listing, digest.hexdigest())
    return digest.hexdigest()


def dir_size(path: str | os.PathLike) -> int:
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")
