"""The file operations ckptkit makes in a run directory, safe against what it may find there.

A run directory is shared with the user, with schedulers and sometimes with an adversary, so:

- names are matched in a listing of the directory, never by ``glob``: a run directory's
  path may hold ``[``, ``*`` or ``?`` (a Hydra sweep over a list gives ``model.hidden=[128,64]``),
  and a glob over it would match a sibling run's files;
- every file ckptkit creates gets an unguessable temporary name, is created exclusively
  without following a link (``O_EXCL | O_NOFOLLOW`` on local disks), flushed, and renamed
  into place (a rename replaces a planted link, it never writes through it);
- nothing is removed unless ``lstat`` says it is a real file or directory (not a link);
  directory trees are removed by ``shutil.rmtree``, which unlinks links inside without
  following them.

Remote filesystems (``gs://``, ``s3://``, ``ram://``) have no links; there the same
operations go through ``tf.io.gfile``.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Sequence

from ckptkit import gfile

log = logging.getLogger("ckptkit")

#: Marks every temporary name ckptkit creates: ``<final name>.tmp-<random hex>``.
TMP_MARK = ".tmp-"


def _tf():
    import tensorflow as tf

    return tf


is_local = gfile.is_local  # a path without a scheme (gs://, ram://)


def temporary_name(path: str) -> str:
    """An unguessable sibling name for ``path`` (see :data:`TMP_MARK`)."""
    return f"{path}{TMP_MARK}{secrets.token_hex(8)}"


def listdir(directory: str) -> list[str]:
    """The names in ``directory`` ([] when it does not exist)."""
    try:
        return gfile.listdir(directory)
    except gfile.not_found() + (NotADirectoryError,):
        return []


def lstat(path: str) -> os.stat_result | None:
    """``os.lstat`` of a local path, None when it does not exist."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def is_real_file(path: str) -> bool:
    if not is_local(path):
        return _tf().io.gfile.exists(path) and not _tf().io.gfile.isdir(path)
    st = lstat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def is_real_dir(path: str) -> bool:
    if not is_local(path):
        return _tf().io.gfile.isdir(path)
    st = lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def is_link(path: str) -> bool:
    return is_local(path) and os.path.islink(path)


def fsync_path(path: str) -> None:
    """Flush a local file or directory to disk (no-op for remote filesystems)."""
    if not is_local(path):
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str, data: bytes) -> None:
    """Create ``path`` (which must not exist, not even as a link) and write ``data``; a write
    that fails (a full disk) removes the file it created."""
    if not is_local(path):
        if _tf().io.gfile.exists(path):
            raise FileExistsError(path)
        try:
            with _tf().io.gfile.GFile(path, "wb") as f:
                f.write(data)
        except BaseException:
            remove_file(path)
            raise
        return
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


#: How a full disk or an exhausted quota reads: errno (Python) or strerror (TensorFlow's messages).
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(e) for e in _FULL_ERRNOS) + ("ENOSPC", "EDQUOT")


def disk_full(exc: object) -> bool:
    """Whether ``exc`` (an exception or its text) says the disk or the quota is full."""
    if getattr(exc, "errno", None) in _FULL_ERRNOS:
        return True
    text = getattr(exc, "message", None) or str(exc)
    return any(t in text for t in _FULL_TEXTS)


def free_bytes(path: str) -> int | None:
    """Bytes free to this user on the filesystem holding ``path`` (its nearest existing
    parent); None where that cannot be told (a remote filesystem)."""
    if not is_local(path):
        return None
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        st = os.statvfs(path or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def read_text(path: str) -> str:
    with _tf().io.gfile.GFile(path, "r") as f:
        return f.read()


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a fresh temporary file, flushed, renamed into place."""
    tmp = temporary_name(path)
    write_new(tmp, text.encode("utf-8"))
    try:
        fsync_path(tmp)
        _tf().io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        remove_file(tmp)
        raise
    fsync_path(os.path.dirname(path) or ".")


def remove_file(path: str) -> bool:
    """Delete ``path`` if it is a real file; a link or anything else is left alone."""
    if not is_real_file(path):
        if is_link(path):
            log.warning("not deleting %s: it is a symbolic link, which ckptkit never made", path)
        return False
    _tf().io.gfile.remove(path)
    return True


def remove_tree(path: str) -> bool:
    """Delete the directory ``path`` if it is a real one; links inside are unlinked, never
    followed. A link or a file at ``path`` is left alone."""
    if not is_real_dir(path):
        if is_link(path):
            log.warning("not deleting %s: it is a symbolic link, which ckptkit never made", path)
        return False
    if is_local(path):
        shutil.rmtree(path)
        return True
    try:
        _tf().io.gfile.rmtree(path)
    except gfile.not_found():  # ram:// lists a directory whose files moved away
        pass
    return True


def make_dir_exclusive(path: str) -> None:
    """Create the directory ``path``; fail if anything (a link too) is already there."""
    if is_local(path):
        os.mkdir(path, 0o755)
    else:
        if _tf().io.gfile.exists(path):
            raise FileExistsError(path)
        _tf().io.gfile.makedirs(path)


def move_aside(path: str, into: str) -> str:
    """Rename ``path`` (a file, directory or link: the link itself moves, not its target)
    into the directory ``into``, created if needed; returns the new path."""
    if is_local(into):
        if os.path.lexists(into) and not is_real_dir(into):
            raise FileExistsError(f"{into} exists and is not a directory ckptkit can move files into")
        os.makedirs(into, exist_ok=True)
    else:
        _tf().io.gfile.makedirs(into)
    target = os.path.join(into, os.path.basename(path))
    if os.path.lexists(target) if is_local(target) else _tf().io.gfile.exists(target):
        target = f"{target}.{secrets.token_hex(4)}"
    rename(path, target)
    return target


def _files_under(top: str) -> list[str]:
    """The files under ``top``, as paths relative to it. A listed name that does not exist is
    left out: ``ram://`` matches names by prefix and lists ``assets/.extra`` for a sibling
    ``assets.extra``."""
    out = []
    for directory, _, names in _tf().io.gfile.walk(top):
        rel = "" if directory.rstrip("/") == top.rstrip("/") else os.path.relpath(directory, top)
        out += [os.path.join(rel, n) for n in names if _tf().io.gfile.exists(os.path.join(directory, n))]
    return out


def move_files(src: str, dst: str, last: Sequence[str] = ()) -> None:
    """Move the tree ``src`` to ``dst`` (which must not exist) file by file, for filesystems
    without an atomic directory rename; the relative paths in ``last`` move last, so their
    presence marks a complete tree. Fails if anything is left behind in ``src``."""
    files = sorted(_files_under(src), key=lambda rel: (rel in last, last.index(rel) if rel in last else 0))
    for rel in files:
        target = os.path.join(dst, rel)
        _tf().io.gfile.makedirs(os.path.dirname(target))
        _tf().io.gfile.rename(os.path.join(src, rel), target, overwrite=False)
    left = _files_under(src)
    if left:
        raise OSError(f"moving {src} to {dst} left {len(left)} files behind ({left[0]}, ...)")
    remove_tree(src)


def rename(src: str, dst: str) -> None:
    """Rename the file, link (the link itself) or directory ``src`` to ``dst``: atomically
    on a local disk; a directory file by file where the filesystem has no directory rename
    (``ram://`` moves only the name, object stores copy object by object)."""
    if is_local(src):
        os.rename(src, dst)
    elif _tf().io.gfile.isdir(src):
        move_files(src, dst)
    else:
        _tf().io.gfile.rename(src, dst)
