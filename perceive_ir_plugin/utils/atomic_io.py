"""Crash-safe file writes.

A checkpoint is first written to a hidden temporary file in the destination folder,
flushed and ``fsync``-ed, then moved over the destination with :func:`os.replace`
(atomic on POSIX and Windows when both paths are on the same file system), and finally
the folder itself is ``fsync``-ed so that the rename survives a power cut. A process
killed at any moment therefore leaves either the previous file or the complete new one,
never a truncated mix; a failed write removes its temporary file and leaves the old
file untouched.

Temporary names start with ``.`` and end with ``.tmp``, so BasicSR's resume scan
(``scandir(..., suffix='state')`` skips hidden files) never picks one up.
"""
import os
import tempfile

import torch


def _fsync_dir(folder):
    """Flush a directory entry to disk (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write_fn, mode='wb'):
    """Write ``path`` atomically.

    Args:
        path (str): Destination file. Its folder must exist.
        write_fn (callable): Called with an open file object; writes the content.
        mode (str): ``'wb'`` (default) or ``'w'`` (text, UTF-8).

    Raises:
        Exception: Whatever ``write_fn`` or the file system raised; the destination is
            then unchanged and no temporary file is left behind.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    fd, tmp_path = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        kwargs = {'encoding': 'utf-8'} if 'b' not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Args:
        obj (object): What to save (a dict of tensors and plain Python values, so that
            it loads back with ``torch.load(..., weights_only=True)``).
        path (str): Destination file; its folder must exist.
    """
    atomic_write(path, lambda f: torch.save(obj, f))
