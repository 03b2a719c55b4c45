"""Atomic outputs that survive interruptions: temporary names that carry the writer's process
id, renames onto the final name, an atomic folder swap, a lock per output folder, and a sweep
of what killed runs left behind.

Every temporary file or folder is named ``.<final name>.<pid>@<host>.<random>.<kind>``; a
later run on the same machine removes those whose process is gone (``SIGKILL``, power loss),
so nothing hidden piles up. Another machine's (a SLURM array's shards writing one --out on a
shared file system) are left to it, unless a day old.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryosam.errors import InputError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?\.[^.]+\."
                   r"(?P<kind>part.*|partial|old|probe)$")
_HOST = socket.gethostname()
_HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "-", _HOST)[:63] or "host"  # as temporary names carry it
FOREIGN_AGE = 24 * 3600.0  # seconds after which another machine's temporaries are swept too
NEW_LOCK = 60.0  # seconds a lock may stay empty while its writer fills it in


def _tag() -> str:
    """``<pid>@<host>`` of this process, for temporary names."""
    return f"{os.getpid()}@{_HOST_TAG}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is someone else's
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` defaults to the final suffix(es) of ``path`` so that libraries that infer the
    format from the extension (e.g. ``.mrc``, ``.png``) keep working. On any exception (a
    signal included) the temporary file is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes[-2:]) if final.suffixes else ""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{_tag()}.",
                                    suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual permissions
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def temp_dir(final: Path, kind: str) -> Path:
    """A new hidden folder beside ``final`` named for this process (``kind``: partial, old)."""
    path = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_tag()}.", suffix=f".{kind}",
                                 dir=final.parent))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are for the group too
    return path


def sweep_stale(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove what runs that are gone left in ``folder`` (only ``name``'s, when given):
    temporary files and staging folders; a swapped-out old output whose new one never
    arrived is put back. Returns what was removed or restored."""
    root = Path(folder)
    done: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return done
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m["name"] != name) or not _gone(entry, m):
            continue
        final = root / m["name"]
        with contextlib.suppress(OSError):
            if m["kind"] == "old" and not final.exists():
                inner = entry / m["name"]
                os.replace(inner if inner.exists() else entry, final)  # recover the old output
                if entry.exists():
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            done.append(entry)
    lock = root / f".{name}.lock" if name else None
    for path in [lock] if lock else root.glob(".*.lock"):
        if path.exists() and not _lock_alive(path):
            with contextlib.suppress(OSError):
                path.unlink()
                done.append(path)
    return done


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system cannot, so the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder at ``out``: a plain rename when ``out`` does not
    exist, else one atomic swap (then the old output is deleted). Where the swap is not
    available, the old output is first moved to a hidden ``.old`` folder that a later run
    restores if this one is killed in between. An existing ``out`` keeps its mode and group."""
    if not out.exists():
        os.replace(staging, out)
        return
    with contextlib.suppress(OSError):
        st = out.stat()
        os.chmod(staging, st.st_mode & 0o7777)
        os.chown(staging, -1, st.st_gid)
    if exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old output
        return
    trash = temp_dir(out, "old")
    os.replace(out, trash / out.name)
    os.replace(staging, out)
    shutil.rmtree(trash, ignore_errors=True)


def _gone(entry: Path, m: re.Match[str]) -> bool:
    """Whether the run that made the temporary ``entry`` is gone: its process on this
    machine (names without a host are this machine's), or another machine's after a day."""
    if m["host"] is not None and m["host"] != _HOST_TAG:
        try:
            return time.time() - entry.lstat().st_mtime > FOREIGN_AGE
        except OSError:
            return False
    return not pid_alive(int(m["pid"]))


def _lock_alive(path: Path) -> bool:
    try:
        host, pid = path.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):  # empty: its writer may be filling it in right now
        try:
            return time.time() - path.stat().st_mtime < NEW_LOCK
        except OSError:
            return False
    return host != _HOST or pid_alive(int(pid))  # another machine's lock: trust it


def held_lock(folder: Path, pattern: str) -> Path | None:
    """The first live lock in ``folder`` whose file name matches ``pattern`` (a glob such as
    ``.batch-*.csv.lock``), if any: another run writing beside this one."""
    for path in sorted(folder.glob(pattern)):
        if _lock_alive(path):
            return path
    return None


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``.<out>.lock`` beside ``out`` while writing it: a second run on the same folder
    is refused with one line. The lock is removed when the block ends (signals included);
    a lock whose process is gone is swept. Re-entrant within one process. Folders created
    for it are removed again when the block fails."""
    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    mine = f"{_HOST} {os.getpid()}\n"
    with contextlib.suppress(OSError):
        if lock.read_text(encoding="utf-8") == mine:  # this process holds it already
            yield
            return
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    for _ in range(2):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _lock_alive(lock):
                holder = lock.read_text(encoding="utf-8", errors="replace").split()
                raise InputError(
                    f"{out}: another cryosam run (pid {holder[1] if len(holder) > 1 else '?'}"
                    f" on {holder[0] if holder else '?'}) is writing this --out; wait for it "
                    "or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its run was killed
            continue
        except OSError as exc:  # a folder that cannot be made or written in
            raise InputError(f"{out}: cannot write there ({exc.strerror or exc}); choose "
                             "a folder you can write in") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(mine)
        break
    failed = True
    try:
        yield
        failed = False
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text(encoding="utf-8") == mine:
                lock.unlink()
        if failed:  # remove the folders made for an output that never came (if still empty)
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def check_writable(path: str | os.PathLike[str], what: str, folder: bool = True,
                   into: bool = False) -> None:
    """Refuse, before any work, an output ``path`` that cannot be made there: a file where a
    folder goes (or a folder where a file goes), or a place under a file or under a folder
    without write permission. ``into``: files are written into the folder ``path`` (a cache,
    simulate's folder), so an existing one must itself be writable; otherwise ``path`` is
    made or replaced as a whole, in its parent. ``what`` (e.g. ``--out``) starts the line."""
    p = Path(path)
    if p.exists() and folder and not p.is_dir():
        raise InputError(f"{what} {p}: exists and is not a folder; choose another {what}")
    if p.exists() and not folder and p.is_dir():
        raise InputError(f"{what} {p}: is a folder; give a file name")
    if into and p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{what} {p}: cannot write in it; choose another {what}")
        return
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {p}: cannot write under {parent}; choose another {what}")


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn a failed write of ``path`` (a folder that cannot be made, a full disk) into one
    line naming it, as the option ``what`` gave it."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write there ({exc.strerror or exc}); "
                         "choose a place you can write in") from None
