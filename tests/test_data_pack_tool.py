"""`perceive-ir pack`: aio / paired / demo layouts, resume, pairing errors, image conversions."""
import os

import cv2
import numpy as np
import pytest

from perceive_ir_plugin.cli import main
from perceive_ir_plugin.data.lmdb_io import LmdbImageReader, PackError
from perceive_ir_plugin.data.pack_layout import read_pack_info
from perceive_ir_plugin.data.packing import load_image_rgb, pair_folders


def _rgb(seed, h=24, w=32):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path, rgb_or_raw, raw=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = rgb_or_raw if raw else rgb_or_raw[..., ::-1]
    assert cv2.imwrite(path, img)


def _make_aio(root):
    """A miniature of the PromptIR/AdaIR layout with 2 images per task and split; returns expected pairs."""
    exp = {}
    t = os.path.join(root, 'Train')
    for i in range(2):
        g = _rgb(i)
        _write(f'{t}/Denoise/img{i}.png', g)
        exp[('train', 'denoise', f'img{i}')] = (None, g)
        g, lq = _rgb(10 + i), _rgb(20 + i)
        _write(f'{t}/Derain/gt/norain-{i + 1}.png', g)
        _write(f'{t}/Derain/rainy/rain-{i + 1}.png', lq)
        exp[('train', 'derain', f'rain-{i + 1}')] = (lq, g)
        g = _rgb(30 + i)
        _write(f'{t}/Dehaze/original/00{i}5.png', g)
        for beta in ('0.8', '1'):
            lq = _rgb(40 + i + 10 * len(beta))
            _write(f'{t}/Dehaze/synthetic/part1/00{i}5_{beta}_0.2.png', lq)
            exp[('train', 'dehaze', f'part1/00{i}5_{beta.replace(".", "p")}_0p2')] = (lq, g)
        g, lq = _rgb(50 + i), _rgb(60 + i)
        _write(f'{t}/Deblur/sharp/GOPR_{i}.png', g)
        _write(f'{t}/Deblur/blur/GOPR_{i}.png', lq)
        exp[('train', 'deblur', f'GOPR_{i}')] = (lq, g)
        g, lq = _rgb(70 + i), _rgb(80 + i)
        _write(f'{t}/Enhance/gt/{i}.png', g)
        _write(f'{t}/Enhance/low/{i}.png', lq)
        exp[('train', 'lowlight', str(i))] = (lq, g)
    s = os.path.join(root, 'test')
    g = _rgb(90)
    _write(f'{s}/denoise/bsd68/test001.png', g)
    exp[('test', 'denoise', 'test001')] = (None, g)
    g, lq = _rgb(91), _rgb(92)
    _write(f'{s}/derain/Rain100L/target/norain-001.png', g)
    _write(f'{s}/derain/Rain100L/input/rain-001.png', lq)
    exp[('test', 'derain', 'rain-001')] = (lq, g)
    g, lq = _rgb(93), _rgb(94)
    _write(f'{s}/dehaze/target/0001.png', g)
    _write(f'{s}/dehaze/input/0001_0.8_0.2.jpg', lq)  # JPEG: compare with what OpenCV decodes
    exp[('test', 'dehaze', '0001_0p8_0p2')] = (cv2.imread(f'{s}/dehaze/input/0001_0.8_0.2.jpg')[..., ::-1], g)
    g = _rgb(95)
    g16 = g.astype(np.uint16) * 257  # 16-bit GT -> converted to 8-bit exactly
    _write(f'{s}/deblur/gopro/target/a.png', g16[..., ::-1], raw=True)
    lq = _rgb(96)
    _write(f'{s}/deblur/gopro/input/a.png', lq)
    exp[('test', 'deblur', 'a')] = (lq, g)
    grey = _rgb(97)[..., 0]
    _write(f'{s}/enhance/lol/target/1.png', grey, raw=True)  # grey -> RGB
    lq = _rgb(98)
    rgba = np.concatenate([lq[..., ::-1], np.full(lq.shape[:2] + (1,), 255, np.uint8)], 2)
    _write(f'{s}/enhance/lol/input/1.png', rgba, raw=True)  # opaque RGBA -> RGB
    exp[('test', 'lowlight', '1')] = (lq, np.repeat(grey[..., None], 3, 2))
    return exp


@pytest.mark.parametrize('fmt', ['png', 'raw'])
def test_pack_aio_round_trip_and_resume(tmp_path, fmt, capsys):
    root, out = str(tmp_path / 'data'), str(tmp_path / 'packs')
    exp = _make_aio(root)
    assert main(['pack', '--layout', 'aio', root, out, '--format', fmt, '--no-progress']) == 0
    for (split, task, key), (lq, gt) in exp.items():
        d = os.path.join(out, split, task)
        info = read_pack_info(d, task, split)
        assert info['format'] == fmt and info['has_lq'] == (lq is not None)
        np.testing.assert_array_equal(LmdbImageReader(os.path.join(d, 'gt.lmdb')).read(key), gt)
        if lq is not None:
            np.testing.assert_array_equal(LmdbImageReader(os.path.join(d, 'lq.lmdb')).read(key), lq)
        else:
            assert not os.path.exists(os.path.join(d, 'lq.lmdb'))
    assert read_pack_info(os.path.join(out, 'train', 'dehaze'))['count'] == 4
    capsys.readouterr()
    # re-run: everything skipped, nothing rewritten
    mtime = os.path.getmtime(os.path.join(out, 'train', 'derain', 'pack.json'))
    assert main(['pack', '--layout', 'aio', root, out, '--format', fmt, '--no-progress']) == 0
    assert '| train | derain | 2 | 0 | 2 |' in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, 'train', 'derain', 'pack.json')) == mtime
    # a new image is appended on resume
    _write(f'{root}/Train/Derain/gt/norain-9.png', _rgb(5))
    _write(f'{root}/Train/Derain/rainy/rain-9.png', _rgb(6))
    assert main(['pack', '--layout', 'aio', root, out, '--format', fmt, '--no-progress', '--tasks', 'derain',
                 '--splits', 'train']) == 0
    assert '| train | derain | 3 | 1 | 2 |' in capsys.readouterr().out


def test_pairing_errors_name_every_unmatched_file(tmp_path, capsys):
    lq, gt = tmp_path / 'lq', tmp_path / 'gt'
    for n in ('a', 'b', 'c'):
        _write(str(lq / f'{n}.png'), _rgb(1))
    for n in ('a', 'd'):
        _write(str(gt / f'{n}.png'), _rgb(1))
    with pytest.raises(PackError) as err:
        pair_folders(str(lq), str(gt), 'same', 'deblur')
    msg = str(err.value)
    assert "task 'deblur': 3 unmatched file(s)" in msg
    for name in ('LQ without GT: ' + str(lq / 'b.png'), 'LQ without GT: ' + str(lq / 'c.png'),
                 'GT without LQ: ' + str(gt / 'd.png')):
        assert name in msg
    assert [p[0] for p in pair_folders(str(lq), str(gt), 'same', allow_unpaired=True)] == ['a']
    out = str(tmp_path / 'out')
    code = main(['pack', '--layout', 'paired', str(lq), str(gt), out, '--task', 'deblur', '--no-progress'])
    assert code == 2
    assert 'LQ without GT: ' + str(lq / 'b.png') in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing written when pairing fails
    # rain rule and scene rule
    _write(str(tmp_path / 'r/lq/rain-3.png'), _rgb(1))
    _write(str(tmp_path / 'r/gt/norain-3.png'), _rgb(1))
    assert pair_folders(str(tmp_path / 'r/lq'), str(tmp_path / 'r/gt'), 'rain')[0][0] == 'rain-3'
    _write(str(tmp_path / 's/gt/0001.png'), _rgb(1))
    _write(str(tmp_path / 's/gt/0001.jpg'), _rgb(1))
    _write(str(tmp_path / 's/lq/0001_0.8_0.2.png'), _rgb(1))
    with pytest.raises(PackError, match=r"GT files .*0001.jpg and .*0001.png both match id '0001'"):
        pair_folders(str(tmp_path / 's/lq'), str(tmp_path / 's/gt'), 'scene')


def test_pack_refuses_mismatched_sizes_and_transparency(tmp_path, capsys):
    lq, gt = tmp_path / 'lq', tmp_path / 'gt'
    _write(str(lq / 'a.png'), _rgb(1, 24, 32))
    _write(str(gt / 'a.png'), _rgb(1, 24, 30))
    assert main(['pack', '--layout', 'paired', str(lq), str(gt), str(tmp_path / 'o'), '--task', 'derain',
                 '--no-progress']) == 2
    err = capsys.readouterr().err
    assert "key 'a': LQ " + str(lq / 'a.png') + ' is 32x24 but GT ' + str(gt / 'a.png') + ' is 30x24' in err
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 128
    _write(str(tmp_path / 't.png'), rgba, raw=True)
    with pytest.raises(PackError, match=r't.png has transparent pixels .*min alpha 128'):
        load_image_rgb(str(tmp_path / 't.png'))
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(PackError, match=r'Cannot decode image .*bad.png'):
        load_image_rgb(str(tmp_path / 'bad.png'))


def test_pack_paired_clean_only_and_demo(tmp_path, capsys):
    gt = tmp_path / 'clean'
    for i in range(3):
        _write(str(gt / f'x{i}.png'), _rgb(i))
    out = str(tmp_path / 'p')
    assert main(['pack', '--layout', 'paired', '-', str(gt), out, '--task', 'denoise', '--clean-only',
                 '--split', 'test', '--no-progress']) == 0
    assert read_pack_info(os.path.join(out, 'test', 'denoise'))['count'] == 3
    assert main(['pack', '--layout', 'demo', str(tmp_path / 'demo'), '--max-side', '32', '--tasks', 'dehaze',
                 '--splits', 'test', '--no-progress']) == 0
    assert 'stand-ins' in capsys.readouterr().out
    assert read_pack_info(str(tmp_path / 'demo' / 'test' / 'dehaze'))['count'] == 3
    assert main(['pack', '--layout', 'paired', '-', str(gt), out, '--task', 'denoize', '--clean-only']) == 2
    assert "did you mean 'denoise'" in capsys.readouterr().err
