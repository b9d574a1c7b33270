"""Atomic file output: a file appears complete under its final name, or not at all.

Data go to a temporary file in the destination's folder, named
``.<name>.<pid>.<random>.kpac-tmp``, which is flushed, fsync'ed and then renamed over the
destination with :func:`os.replace` (atomic on POSIX and Windows within one file system).
On any error the temporary file is removed and the destination is left untouched. The pid in
the name lets :func:`cleanup_stale_temps` tell leftovers of a killed run from a live write.
A destination that is a symbolic link is written through: the file it points to is replaced
(atomically, beside it) and the link stays, as a plain ``open(path, "w")`` would have it.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".kpac-tmp"
#: Temporary files older than this (by mtime) are stale even when their pid looks alive
#: (pids are reused after a crash).
STALE_AFTER_S = 60.0

_TEMP_RE = re.compile(r"^\..*\.(\d+)\.[0-9a-f]+\.kpac-tmp$")
_active: set[str] = set()  # temp files this process is writing right now
_active_lock = threading.Lock()


#: Bytes of the destination's name kept in a temporary name: with the dot, pid, random part
#: and suffix added it stays under NAME_MAX (255 bytes on most file systems).
_TEMP_NAME_BYTES = 180


def _name_prefix(name: str, limit: int) -> str:
    """The longest prefix of ``name`` (whole characters) whose file-system encoding fits in
    ``limit`` bytes: a name of non-ASCII characters takes 2-4 bytes per character in UTF-8."""
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def _through_symlink(dest: Path) -> Path:
    """The file a write to ``dest`` should replace: the target of a symbolic link (followed to
    its end, even a missing one), so that renaming onto it keeps the link and updates what it
    names; ``dest`` itself otherwise."""
    return Path(os.path.realpath(dest)) if os.path.islink(dest) else dest


def _new_temp(dest: Path) -> Path:
    """Create (O_EXCL) and return an empty temporary file next to ``dest``.

    Registered before it is created: a Ctrl-C or SIGTERM raised between its creation and the
    caller's ``try`` would otherwise leave it behind; :func:`_remove_unfinished_temps` removes
    whatever is still registered when the interpreter exits."""
    folder = dest.parent
    base = _name_prefix(dest.name, _TEMP_NAME_BYTES)
    while True:
        tmp = folder / f".{base}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        with _active_lock:
            _active.add(os.path.abspath(tmp))
        try:
            # 0o666 & ~umask, like an ordinary new file (mkstemp would give 0o600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except BaseException as e:
            with _active_lock:  # not ours (or not made): never to be removed at exit
                _active.discard(os.path.abspath(tmp))
            if isinstance(e, FileExistsError):
                continue
            raise
        os.close(fd)
        return tmp


@atexit.register
def _remove_unfinished_temps() -> None:
    """At exit, the temporary files of writes an interrupt stopped before they were committed
    or removed (nothing will finish them). Only this process's: a forked child inherits the
    set, and its parent's writes are not its own."""
    def own(name: str) -> bool:
        m = _TEMP_RE.match(os.path.basename(name))
        return m is not None and int(m.group(1)) == os.getpid()

    with _active_lock:
        left = [name for name in _active if own(name)]
        _active.difference_update(left)
    for name in left:
        try:
            os.unlink(name)
        except OSError:
            pass


def _release(tmp: Path, remove: bool) -> None:
    with _active_lock:
        _active.discard(os.path.abspath(tmp))
    if remove:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if sys.platform == "win32":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, dest: Path, sync: bool = True, replace: bool = True) -> None:
    """fsync ``tmp``, keep the permission bits of an existing ``dest``, rename into place.

    ``replace=False``: never replace an existing ``dest`` (FileExistsError), decided by the
    file system itself (a hard link fails if the name exists), so a file another process
    creates at the last moment is not clobbered either.
    """
    if sync:
        _fsync_path(tmp)
    if not replace:
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "exists", str(dest)) from None
        except OSError:  # no hard links here (e.g. FAT, some network shares): check, then rename
            if os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, "exists", str(dest)) from None
            os.replace(tmp, dest)
        else:
            os.unlink(tmp)
        _fsync_dir(dest.parent)
        return
    try:
        mode = os.stat(dest).st_mode & 0o7777
    except OSError:
        mode = None
    if mode is not None:
        try:
            os.chmod(tmp, mode)
        except OSError:
            pass
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination file. Its folder must exist.
    data : bytes
        The complete file content.
    replace : bool
        Replace an existing ``path`` (default). False: raise :class:`FileExistsError` if it
        exists when the file is committed, even if it appeared a moment before.

    Raises
    ------
    OSError
        When the folder is not writable, the disk is full, ``path`` is a directory, ...
        The destination is then unchanged and no temporary file remains.
    """
    dest = _through_symlink(Path(path)) if replace else Path(path)  # a link "exists" for replace=False
    tmp = _new_temp(dest)
    ok = False
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, dest, sync=False, replace=replace)  # already fsync'ed through the handle
        ok = True
    finally:
        _release(tmp, remove=not ok)


def write_output(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> None:
    """:func:`atomic_write_bytes` into ``path``'s folder, created first, for a command's
    outputs: a failure is an :class:`~.base.ImageError` that names ``path`` and the reason,
    not the folder or the temporary file beside it. :class:`FileExistsError` (``replace=False``
    and ``path`` exists) passes through as it is."""
    from .base import ImageError

    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(dest, f"cannot create its folder ({e.strerror or e})") from None
    try:
        atomic_write_bytes(dest, data, replace=replace)
    except FileExistsError:
        raise
    except OSError as e:
        raise ImageError(dest, f"cannot write ({e.strerror or e})") from None


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary path that replaces ``path`` on success.

    The yielded file already exists (empty) in the destination's folder; write it completely
    (by name, e.g. with a library's ``save(tmp)``). When the block exits normally the file is
    fsync'ed and renamed onto ``path``; when it raises, the file is deleted and ``path`` is
    untouched. The temporary name ends in ``.kpac-tmp``, so pass the format explicitly to
    writers that guess it from the extension.

    Examples
    --------
    >>> with atomic_output("model.safetensors") as tmp:   # doctest: +SKIP
    ...     save_file(tensors, str(tmp))
    """
    dest = _through_symlink(Path(path))
    tmp = _new_temp(dest)
    ok = False
    try:
        yield tmp
        _commit(tmp, dest)
        ok = True
    finally:
        _release(tmp, remove=not ok)


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        # os.kill would terminate the process on Windows: rely on the age rule there.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


def cleanup_stale_temps(folder: str | os.PathLike) -> int:
    """Remove temporary files (``.*.kpac-tmp``) left in ``folder`` by a killed run.

    A temporary file is stale when the process whose pid is encoded in its name no longer
    exists, or when it has not been modified for more than 60 s (the pid may have been
    reused). Files this process is writing right now are never touched. Other files are
    never touched.

    Returns
    -------
    int
        Number of files removed. A missing folder counts as nothing to clean.
    """
    root = Path(folder)
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    now = time.time()
    with _active_lock:
        active = set(_active)
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
            continue
        path = root / entry.name
        if os.path.abspath(path) in active:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        m = _TEMP_RE.match(entry.name)
        pid = int(m.group(1)) if m else None
        dead = pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if dead or age > STALE_AFTER_S:
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed
