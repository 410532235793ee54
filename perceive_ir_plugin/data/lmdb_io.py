"""LMDB image packs in BasicSR's format: ``data.mdb`` + ``meta_info.txt``, one record per image.

Records are either PNG bytes (what ``basicsr.utils.lmdb_util`` writes and ``LmdbBackend`` +
``imfrombytes`` read: the array given to ``cv2.imencode`` is BGR) or raw uint8 arrays with a small
self-describing header (no decode cost; only this plugin reads them). ``meta_info.txt`` has one line
per record, ``<key>.png (<h>,<w>,<c>) <compress_level>`` (``<key>.raw (...) 0`` for raw records), so
``basicsr.data.data_util.paired_paths_from_lmdb`` lists PNG packs unchanged.

The writer is append-only and resumable: records already in ``data.mdb`` are skipped, never
rewritten; ``meta_info.txt`` is appended after each committed transaction and repaired from the
database on reopen, so a killed packing run leaves a consistent pack that the next run completes.
"""
import os
import re
import struct

import cv2
import lmdb
import numpy as np
from basicsr.utils import get_root_logger

FORMATS = ('png', 'raw')
RAW_MAGIC = b'PIRRAW\x00\x01'
_RAW_HEADER = struct.Struct('<8sIII')
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_META_LINE = re.compile(r'^(\S+)\.(png|raw) \((\d+),(\d+),(\d+)\) (\d+)$')
_KEY_OK = re.compile(r'^[A-Za-z0-9_\-/]+$')
_KEY_BAD_CHARS = re.compile(r'[^A-Za-z0-9_\-/]')


class PackError(ValueError):
    """A pack cannot be written or read as asked (wrong layout, pairing, format, key, image)."""


class LmdbRecordError(RuntimeError):
    """A record is missing from or corrupt in an LMDB pack; the message names pack, key and task."""


def sanitize_key(name):
    """Make an LMDB key from a relative image path without extension.

    BasicSR takes the text before the first ``.`` of each ``meta_info.txt`` line as the key and splits
    lines on spaces, so dots become ``p`` (``0025_0.8_0.04`` -> ``0025_0p8_0p04``), OS separators
    become ``/`` and every other character outside ``[A-Za-z0-9_-/]`` becomes ``_``.
    """
    key = str(name).replace(os.sep, '/').replace('\\', '/').strip('/')
    key = key.replace('.', 'p')
    return _KEY_BAD_CHARS.sub('_', key)


def check_key(key):
    """Raise :class:`PackError` unless ``key`` is a valid (already sanitised) record key."""
    if not isinstance(key, str) or not _KEY_OK.match(key) or key.startswith('/'):
        raise PackError(f'Invalid LMDB key {key!r}: keys must be ASCII letters, digits, "_", "-" or "/" '
                        '(no dots or spaces, BasicSR splits meta_info.txt lines on them); '
                        'use perceive_ir_plugin.data.lmdb_io.sanitize_key')
    return key


def encode_record(rgb, fmt='png', compress_level=1):
    """Encode one image as an LMDB record.

    Args:
        rgb (np.ndarray): (H, W, 3) uint8, RGB.
        fmt (str): ``'png'`` (stored BGR-ordered through ``cv2.imencode`` like BasicSR) or ``'raw'``.
        compress_level (int): PNG compression level 0-9 (BasicSR uses 1).

    Returns:
        bytes: The record.
    """
    if fmt == 'png':
        ok, buf = cv2.imencode('.png', np.ascontiguousarray(rgb[..., ::-1]),
                               [cv2.IMWRITE_PNG_COMPRESSION, int(compress_level)])
        if not ok:
            raise PackError('cv2.imencode failed to encode a PNG record')
        return buf.tobytes()
    if fmt == 'raw':
        h, w, c = rgb.shape
        return _RAW_HEADER.pack(RAW_MAGIC, h, w, c) + np.ascontiguousarray(rgb).tobytes()
    raise PackError(f"Unknown pack format {fmt!r}; use one of {', '.join(FORMATS)}")


def record_format(buf):
    """``'png'``, ``'raw'`` or ``None`` from a record's first bytes."""
    head = bytes(buf[:8])
    if head == _PNG_MAGIC:
        return 'png'
    if head == RAW_MAGIC:
        return 'raw'
    return None


def record_shape(buf):
    """(H, W, C) of a record from its header, without decoding it (``None`` if unrecognised)."""
    fmt = record_format(buf)
    if fmt == 'raw' and len(buf) >= _RAW_HEADER.size:
        _, h, w, c = _RAW_HEADER.unpack(bytes(buf[:_RAW_HEADER.size]))
        return (h, w, c)
    if fmt == 'png' and len(buf) >= 26:
        w, h = struct.unpack('>II', bytes(buf[16:24]))
        channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(buf[25], 3)
        return (h, w, channels)
    return None


def decode_record(buf):
    """Decode a record to an (H, W, 3) uint8 RGB array; ``None`` when it cannot be decoded."""
    fmt = record_format(buf)
    if fmt == 'raw':
        if len(buf) < _RAW_HEADER.size:
            return None
        _, h, w, c = _RAW_HEADER.unpack(bytes(buf[:_RAW_HEADER.size]))
        data = np.frombuffer(buf, dtype=np.uint8, offset=_RAW_HEADER.size)
        if c != 3 or data.size != h * w * c:
            return None
        return data.reshape(h, w, c)
    if fmt == 'png':
        img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            return None
        return img[..., ::-1]
    return None


def _parse_meta(meta_path):
    """Parse ``meta_info.txt`` -> (ordered {key: (shape, ext, level)}, number of unusable lines)."""
    entries, bad = {}, 0
    with open(meta_path, 'r', encoding='ascii', errors='replace') as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            m = _META_LINE.match(line)
            if m is None:
                bad += 1
                continue
            key, ext = m.group(1), m.group(2)
            entries[key] = ((int(m.group(3)), int(m.group(4)), int(m.group(5))), ext, int(m.group(6)))
    return entries, bad


def _meta_line(key, shape, fmt, compress_level):
    h, w, c = shape
    return f'{key}.{fmt} ({h},{w},{c}) {compress_level if fmt == "png" else 0}\n'


# One read-only environment per pack and process: py-lmdb refuses to open the same files twice in a
# process (several datasets may read one pack), and an environment inherited through fork() must not be
# used by the child, so a child closes the inherited handle and opens its own.
_SHARED_ENVS = {}


def _env_identity(lmdb_path):
    st = os.stat(os.path.join(lmdb_path, 'data.mdb'))
    return (os.path.realpath(lmdb_path), st.st_dev, st.st_ino)


def shared_read_env(lmdb_path):
    """The process-wide read-only environment of ``lmdb_path`` (opened on first use in each process)."""
    ident = _env_identity(lmdb_path)
    entry = _SHARED_ENVS.get(ident)
    if entry is not None:
        pid, env = entry
        if pid == os.getpid():
            return env
        try:  # inherited from the parent through fork(): release it, then open our own
            env.close()
        except lmdb.Error:
            pass
    env = lmdb.open(lmdb_path, readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
    _SHARED_ENVS[ident] = (os.getpid(), env)
    return env


def release_shared_env(lmdb_path):
    """Close this process's shared read environment of ``lmdb_path`` (before writing to it)."""
    real = os.path.realpath(str(lmdb_path))
    for ident in [k for k in _SHARED_ENVS if k[0] == real]:
        pid, env = _SHARED_ENVS.pop(ident)
        if pid == os.getpid():
            env.close()


def _atomic_write_text(path, text):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='ascii') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LmdbImageWriter:
    """Append-only, resumable writer of one ``*.lmdb`` image pack.

    Args:
        lmdb_path (str): Folder ending in ``.lmdb``; created if missing, resumed if present.
        fmt (str): ``'png'`` or ``'raw'``; must match the records already in a resumed pack.
        compress_level (int): PNG compression level (BasicSR's default 1).
        map_size (int | None): Initial LMDB map size in bytes (default 256 MiB); doubled whenever a
            transaction hits ``MapFullError``.
        batch (int): Records per transaction.
        task (str | None): Task name, only for error messages.

    ``put`` returns ``False`` for a key already packed (resume), ``True`` for a new record.
    """

    def __init__(self, lmdb_path, fmt='png', compress_level=1, map_size=None, batch=64, task=None):
        lmdb_path = str(lmdb_path)
        if not lmdb_path.endswith('.lmdb'):
            raise PackError(f"LMDB path must end with '.lmdb' (BasicSR requires it): {lmdb_path}")
        if fmt not in FORMATS:
            raise PackError(f"Unknown pack format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.lmdb_path = lmdb_path
        self.fmt = fmt
        self.compress_level = int(compress_level)
        self.batch = max(1, int(batch))
        self.task = task
        self.meta_path = os.path.join(lmdb_path, 'meta_info.txt')
        os.makedirs(lmdb_path, exist_ok=True)
        release_shared_env(lmdb_path)
        self._map_size = int(map_size or 256 * 1024**2)
        self.env = lmdb.open(lmdb_path, map_size=self._map_size, subdir=True)
        self._map_size = max(self._map_size, self.env.info()['map_size'])
        self._pending = []
        self._pending_keys = set()
        self._done = set()
        self.n_resumed = 0
        self._reconcile()

    # -- resume --------------------------------------------------------------------------------------
    def _reconcile(self):
        """Collect the keys already in data.mdb and make meta_info.txt list exactly those."""
        shapes = {}
        stored_fmt = None
        with self.env.begin(write=False) as txn:
            for key_b, val in txn.cursor():
                key = key_b.decode('ascii')
                if stored_fmt is None:
                    stored_fmt = record_format(val)
                shapes[key] = record_shape(val)
        if stored_fmt is not None and stored_fmt != self.fmt:
            self.env.close()
            raise PackError(f'LMDB pack {self.lmdb_path} holds {stored_fmt} records; cannot append {self.fmt} '
                            f'records to it (choose --format {stored_fmt} or a new output folder)')
        self._done = set(shapes)
        self.n_resumed = len(shapes)
        entries, bad = _parse_meta(self.meta_path) if os.path.exists(self.meta_path) else ({}, 0)
        keep = [k for k in entries if k in shapes]
        missing = sorted(k for k in shapes if k not in entries)
        if bad or missing or len(keep) != len(entries) or not os.path.exists(self.meta_path):
            lines = [_meta_line(k, entries[k][0], entries[k][1], entries[k][2]) for k in keep]
            lines += [_meta_line(k, shapes[k], self.fmt, self.compress_level) for k in missing]
            _atomic_write_text(self.meta_path, ''.join(lines))
            if entries or bad or missing:
                get_root_logger().info(f'Repaired {self.meta_path}: {len(missing)} record(s) added, '
                                       f'{bad + len(entries) - len(keep)} stale line(s) dropped.')

    def __contains__(self, key):
        return key in self._done or key in self._pending_keys

    def __len__(self):
        return len(self._done) + len(self._pending)

    @property
    def keys_done(self):
        """Keys committed so far (a set)."""
        return set(self._done)

    # -- writing -------------------------------------------------------------------------------------
    def put(self, key, rgb):
        """Queue one image; skip it if ``key`` is already packed.

        Args:
            key (str): Record key (see :func:`sanitize_key`).
            rgb (np.ndarray): (H, W, 3) uint8 RGB.

        Returns:
            bool: ``True`` if the record is new, ``False`` if it was already in the pack.
        """
        check_key(key)
        if key in self._done:
            return False
        if key in self._pending_keys:
            raise PackError(f'Key {key!r} is put twice into {self.lmdb_path} (task {self.task!r}); '
                            'two source images map to the same key')
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            desc = f'{rgb.dtype} {rgb.shape}' if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise PackError(f'Record {key!r} for {self.lmdb_path}: expected an (H, W, 3) uint8 RGB array, '
                            f'got {desc}')
        self._pending.append((key, encode_record(rgb, self.fmt, self.compress_level), rgb.shape))
        self._pending_keys.add(key)
        if len(self._pending) >= self.batch:
            self.flush()
        return True

    def flush(self):
        """Commit the queued records (growing the map as needed), then append their meta lines."""
        if not self._pending:
            return
        while True:
            txn = self.env.begin(write=True)
            try:
                for key, buf, _ in self._pending:
                    txn.put(key.encode('ascii'), buf, overwrite=False)
                txn.commit()
                break
            except lmdb.MapFullError:
                txn.abort()
                self._map_size *= 2
                self.env.set_mapsize(self._map_size)
                get_root_logger().info(f'LMDB map of {self.lmdb_path} grown to {self._map_size / 1024**3:.2f} GiB')
            except BaseException:
                txn.abort()
                raise
        with open(self.meta_path, 'a', encoding='ascii') as f:
            f.write(''.join(_meta_line(k, s, self.fmt, self.compress_level) for k, _, s in self._pending))
            f.flush()
            os.fsync(f.fileno())
        self._done.update(self._pending_keys)
        self._pending, self._pending_keys = [], set()

    def close(self):
        """Commit what is queued and close the environment."""
        if self.env is None:
            return
        try:
            self.flush()
        finally:
            self.env.close()
            self.env = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


class LmdbImageReader:
    """Read-only access to one ``*.lmdb`` image pack, opened lazily once per process (worker-safe; the
    environment is shared by all readers of the pack in a process, see :func:`shared_read_env`).

    Args:
        lmdb_path (str): Pack folder (``.../gt.lmdb``).
        task (str | None): Task name, only for error messages.

    Attributes:
        keys (list[str]): Record keys in ``meta_info.txt`` order.
    """

    def __init__(self, lmdb_path, task=None):
        self.lmdb_path = str(lmdb_path)
        self.task = task
        if not os.path.isdir(self.lmdb_path):
            raise FileNotFoundError(f'LMDB pack not found: {self.lmdb_path}' + self._task_note())
        meta = os.path.join(self.lmdb_path, 'meta_info.txt')
        if not os.path.isfile(meta):
            raise FileNotFoundError(f'meta_info.txt missing in LMDB pack {self.lmdb_path}{self._task_note()}; '
                                    'the pack is incomplete or not made by BasicSR/perceive-ir pack '
                                    '(re-run `perceive-ir pack` to resume it)')
        if not os.path.isfile(os.path.join(self.lmdb_path, 'data.mdb')):
            raise FileNotFoundError(f'data.mdb missing in LMDB pack {self.lmdb_path}{self._task_note()}')
        entries, bad = _parse_meta(meta)
        if bad:
            raise PackError(f'{meta}: {bad} malformed line(s); expected "<key>.png (<h>,<w>,<c>) <level>"')
        self._meta = {k: v[0] for k, v in entries.items()}
        self.keys = list(entries)

    def _task_note(self):
        return f" (task '{self.task}')" if self.task else ''

    def _txn_env(self):
        return shared_read_env(self.lmdb_path)

    def __len__(self):
        return len(self.keys)

    def __contains__(self, key):
        return key in self._meta

    def shape(self, key):
        """(H, W, C) of ``key`` as listed in ``meta_info.txt``."""
        return self._meta[key]

    def read_bytes(self, key):
        """The stored bytes of ``key``; raises :class:`LmdbRecordError` when absent."""
        with self._txn_env().begin(write=False) as txn:
            buf = txn.get(str(key).encode('ascii'))
        if buf is None:
            raise LmdbRecordError(f"Record {key!r} of task '{self.task}' is missing from LMDB pack "
                                  f'{self.lmdb_path} (listed in meta_info.txt: {key in self._meta}); '
                                  're-run `perceive-ir pack` on the source folders to add it')
        return buf

    def read(self, key):
        """Decode ``key`` to an (H, W, 3) uint8 RGB array.

        Raises:
            LmdbRecordError: The record is missing, cannot be decoded, or its shape differs from
                ``meta_info.txt``; the message names pack, key and task.
        """
        buf = self.read_bytes(key)
        img = decode_record(buf)
        expected = self._meta.get(key)
        if img is None or (expected is not None and tuple(img.shape) != tuple(expected)):
            got = 'undecodable' if img is None else f'shape {tuple(img.shape)}'
            raise LmdbRecordError(f"Record {key!r} of task '{self.task}' in LMDB pack {self.lmdb_path} is "
                                  f'corrupt ({len(buf)} bytes, {got}, meta_info.txt says {expected}); '
                                  'delete this pack folder and re-run `perceive-ir pack`')
        return img

    def close(self):
        """Close this process's environment of the pack (shared by every reader of it)."""
        release_shared_env(self.lmdb_path)
