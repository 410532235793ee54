"""LMDB packs: round trips, BasicSR compatibility, resume, map growth, error messages; tasks and folds."""
import os

import numpy as np
import pytest

from perceive_ir_plugin.data import folds, tasks
from perceive_ir_plugin.data.lmdb_io import (LmdbImageReader, LmdbImageWriter, LmdbRecordError, PackError,
                                             sanitize_key)


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {f'img{i:02d}': rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8) for i in range(n)}


@pytest.mark.parametrize('fmt', ['png', 'raw'])
def test_round_trip_pixels_equal(tmp_path, fmt):
    imgs = _images()
    path = str(tmp_path / 'gt.lmdb')
    with LmdbImageWriter(path, fmt=fmt, batch=3) as w:
        for k, v in imgs.items():
            assert w.put(k, v) is True
    r = LmdbImageReader(path, task='derain')
    assert r.keys == list(imgs)
    for k, v in imgs.items():
        out = r.read(k)
        assert out.dtype == np.uint8 and out.shape == v.shape
        np.testing.assert_array_equal(out, v)
        assert r.shape(k) == v.shape
    ext = 'png' if fmt == 'png' else 'raw'
    first = open(os.path.join(path, 'meta_info.txt')).readline().strip()
    assert first == f'img00.{ext} (20,30,3) {1 if fmt == "png" else 0}'


def test_basicsr_reads_png_pack(tmp_path):
    """BasicSR's paired_paths_from_lmdb + FileClient(lmdb) + imfrombytes read our PNG packs."""
    from basicsr.data.data_util import paired_paths_from_lmdb
    from basicsr.utils import FileClient, imfrombytes
    imgs = _images(3)
    lq = {k: 255 - v for k, v in imgs.items()}
    for name, data in (('gt', imgs), ('lq', lq)):
        with LmdbImageWriter(str(tmp_path / f'{name}.lmdb')) as w:
            for k, v in data.items():
                w.put(k, v)
    paths = paired_paths_from_lmdb([str(tmp_path / 'lq.lmdb'), str(tmp_path / 'gt.lmdb')], ['lq', 'gt'])
    assert [p['gt_path'] for p in paths] == sorted(imgs)
    client = FileClient('lmdb', db_paths=[str(tmp_path / 'lq.lmdb'), str(tmp_path / 'gt.lmdb')],
                        client_keys=['lq', 'gt'])
    for p in paths:
        bgr = imfrombytes(client.get(p['gt_path'], 'gt'), float32=False)
        np.testing.assert_array_equal(bgr[..., ::-1], imgs[p['gt_path']])
        bgr = imfrombytes(client.get(p['lq_path'], 'lq'), float32=False)
        np.testing.assert_array_equal(bgr[..., ::-1], lq[p['lq_path']])


def test_resume_skips_packed_keys_and_repairs_meta(tmp_path):
    imgs = _images(5)
    path = str(tmp_path / 'gt.lmdb')
    keys = list(imgs)
    with LmdbImageWriter(path, batch=1) as w:
        for k in keys[:3]:
            w.put(k, imgs[k])
    # Simulate a crash after the commit but before the meta line was appended, plus a torn last line.
    meta = os.path.join(path, 'meta_info.txt')
    lines = open(meta).read().splitlines()
    with open(meta, 'w') as f:
        f.write('\n'.join(lines[:1]) + '\nimg01.png (2')
    w = LmdbImageWriter(path, batch=2)
    assert w.n_resumed == 3 and keys[0] in w and keys[2] in w
    assert [w.put(k, imgs[k]) for k in keys] == [False, False, False, True, True]
    w.close()
    r = LmdbImageReader(path)
    assert sorted(r.keys) == sorted(keys) and len(r.keys) == 5
    for k in keys:
        np.testing.assert_array_equal(r.read(k), imgs[k])


def test_resume_refuses_other_format(tmp_path):
    path = str(tmp_path / 'gt.lmdb')
    with LmdbImageWriter(path, fmt='raw') as w:
        w.put('a', _images(1)['img00'])
    with pytest.raises(PackError, match='holds raw records; cannot append png'):
        LmdbImageWriter(path, fmt='png')


def test_map_size_grows(tmp_path):
    imgs = {f'k{i}': np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(8)}
    path = str(tmp_path / 'gt.lmdb')
    with LmdbImageWriter(path, fmt='raw', map_size=64 * 1024, batch=4) as w:
        for k, v in imgs.items():
            w.put(k, v)
        assert w._map_size > 64 * 1024
    r = LmdbImageReader(path)
    for k, v in imgs.items():
        np.testing.assert_array_equal(r.read(k), v)


def test_corrupt_and_missing_record_errors_name_pack_key_task(tmp_path):
    import lmdb
    path = str(tmp_path / 'gt.lmdb')
    with LmdbImageWriter(path) as w:
        w.put('good', _images(1)['img00'])
        w.put('bad', _images(1)['img00'])
    env = lmdb.open(path)
    with env.begin(write=True) as txn:
        txn.put(b'bad', b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    env.close()
    r = LmdbImageReader(path, task='dehaze')
    with pytest.raises(LmdbRecordError) as err:
        r.read('bad')
    assert "Record 'bad' of task 'dehaze'" in str(err.value) and path in str(err.value)
    assert 'corrupt' in str(err.value)
    with pytest.raises(LmdbRecordError, match=r"Record 'nope' of task 'dehaze' is missing from LMDB pack"):
        r.read('nope')


def test_missing_meta_info_and_pack(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LMDB pack not found: .*absent.lmdb \(task 'derain'\)"):
        LmdbImageReader(str(tmp_path / 'absent.lmdb'), task='derain')
    path = str(tmp_path / 'gt.lmdb')
    with LmdbImageWriter(path) as w:
        w.put('a', _images(1)['img00'])
    os.remove(os.path.join(path, 'meta_info.txt'))
    with pytest.raises(FileNotFoundError, match='meta_info.txt missing in LMDB pack'):
        LmdbImageReader(path)


def test_bad_keys_and_arrays(tmp_path):
    assert sanitize_key('part1/0025_0.8_0.04') == 'part1/0025_0p8_0p04'
    assert sanitize_key('a b(c)') == 'a_b_c_'
    with LmdbImageWriter(str(tmp_path / 'x.lmdb')) as w:
        with pytest.raises(PackError, match='Invalid LMDB key'):
            w.put('a.b', _images(1)['img00'])
        with pytest.raises(PackError, match=r"expected an \(H, W, 3\) uint8 RGB array, got uint16"):
            w.put('a', np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(PackError, match="must end with '.lmdb'"):
        LmdbImageWriter(str(tmp_path / 'x'))


def test_tasks_and_repeats():
    assert tasks.TASKS == ('denoise', 'derain', 'dehaze', 'deblur', 'lowlight')
    assert tasks.task_id('lowlight') == 4
    assert tasks.resolve_task_repeats(None, '3task') == {'denoise': 12, 'derain': 360, 'dehaze': 1}
    assert tasks.resolve_task_repeats(['deblur', 'denoise'], '5task') == {'denoise': 12, 'deblur': 30}
    assert tasks.resolve_task_repeats({'derain': 2}, '3task') == {'derain': 2}
    with pytest.raises(ValueError, match="Unknown task 'dehase' in option 'tasks'; did you mean 'dehaze'"):
        tasks.resolve_task_repeats(['dehase'])
    with pytest.raises(ValueError, match="did you mean 'lowlight'"):
        tasks.check_task('enhance')
    with pytest.raises(ValueError, match="did you mean '5task'"):
        tasks.check_setting('5tasks')


def test_fold_of_matches_sha1_definition():
    import hashlib
    for key in ('a', 'rain-12', 'part1/0025_0p8'):
        want = int(hashlib.sha1(f'derain|{key}'.encode()).hexdigest(), 16) % 2
        assert folds.fold_of('derain', key) == want
    counts = np.bincount([folds.fold_of('denoise', f'k{i}', 3) for i in range(300)], minlength=3)
    assert counts.min() > 70
