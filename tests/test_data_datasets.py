"""AllInOneDataset / AllInOneTestDataset: repeats, crops and flips, pending noise, folds, protocols, errors."""
import os

import numpy as np
import pytest
import torch
from basicsr.data import build_dataloader, build_dataset

from perceive_ir_plugin.data import all_in_one_test_dataset as test_ds_mod
from perceive_ir_plugin.data.degradations import apply_pending_noise
from perceive_ir_plugin.data.folds import fold_of
from perceive_ir_plugin.data.lmdb_io import LmdbImageWriter, PackError
from perceive_ir_plugin.data.pack_layout import write_pack_info
from perceive_ir_plugin.data.packing import write_task_pack


def _coded(h, w, blue):
    """R = 60 + row, G = 60 + column, B = blue: pixel values encode their position."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 60 + np.arange(h)[:, None]
    img[..., 1] = 60 + np.arange(w)[None, :]
    img[..., 2] = blue
    return img


@pytest.fixture(scope='module')
def coded_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('coded'))
    for task in ('denoise', 'derain', 'dehaze'):
        items = []
        for i in range(5 if task != 'dehaze' else 3):
            h, w = 40 + 4 * i, 48 + 2 * i
            gt = _coded(h, w, 128)
            items.append((f'img{i}', None if task == 'denoise' else _coded(h, w, 200), gt))
        write_task_pack(root, 'train', task, items, progress=False)
    # test split: clean denoise images + one paired task
    write_task_pack(root, 'test', 'denoise', [(f't{i}', None, _coded(36 + i, 50 - i, 100)) for i in range(4)],
                    progress=False)
    write_task_pack(root, 'test', 'derain', [(f't{i}', _coded(35, 41, 10), _coded(35, 41, 20)) for i in range(2)],
                    fmt='raw', progress=False)
    return root


def _train(root, **kw):
    opt = dict(name='train', type='AllInOneDataset', phase='train', dataroot=root, gt_size=16)
    opt.update(kw)
    return build_dataset(opt)


def test_repeat_factors_and_sigma_cycle(coded_root):
    ds = _train(coded_root, tasks={'denoise': 6, 'derain': 4, 'dehaze': 1}, sigmas=[15, 25, 50])
    assert len(ds) == 5 * 6 + 5 * 4 + 3 * 1
    counts = {}
    sig = {}
    for idx in range(len(ds)):
        task, key, rep, i = ds.locate(idx)
        counts[task] = counts.get(task, 0) + 1
        if task == 'denoise':
            sig.setdefault(key, []).append(ds.sigma_of(task, i, rep))
    assert counts == {'denoise': 30, 'derain': 20, 'dehaze': 3}
    for levels in sig.values():  # repeat 6 -> each image twice per sigma
        assert sorted(levels) == [15, 15, 25, 25, 50, 50]
    d3 = _train(coded_root, setting='3task')
    assert d3.repeats == {'denoise': 12, 'derain': 360, 'dehaze': 1}
    assert len(d3) == 5 * 12 + 5 * 360 + 3


def _check_box(img, box, p):
    """img (3, p, p) in [0,1] holds coded positions; box = [top, left, hflip, vflip]."""
    top, left, hflip, vflip = [int(v) for v in box]
    rows = torch.arange(p).flip(0) if vflip else torch.arange(p)
    cols = torch.arange(p).flip(0) if hflip else torch.arange(p)
    want_r = (60 + top + rows).float().view(p, 1).expand(p, p) / 255
    want_g = (60 + left + cols).float().view(1, p).expand(p, p) / 255
    assert torch.allclose(img[0], want_r) and torch.allclose(img[1], want_g)


def test_crop_flip_alignment_of_lq_gt_lq_pos(coded_root):
    ds = _train(coded_root, tasks={'derain': 20}, return_lq_pos=True)
    flips = set()
    for idx in range(0, len(ds), 3):
        s = ds[idx]
        assert s['lq'].shape == s['gt'].shape == s['lq_pos'].shape == (3, 16, 16)
        _check_box(s['gt'], s['crop'], 16)
        _check_box(s['lq'], s['crop'], 16)
        _check_box(s['lq_pos'], s['crop_pos'], 16)
        assert torch.allclose(s['lq'][2], torch.full((16, 16), 200 / 255))  # lq comes from lq.lmdb
        assert torch.allclose(s['gt'][2], torch.full((16, 16), 128 / 255))
        assert s['task'].item() == 1 and s['task_name'] == 'derain' and s['sigma'].item() == 0
        assert s['key'].startswith('derain/img') and s['lq_path'].endswith('lq.lmdb/' + s['key'].split('/')[1])
        flips.add((int(s['crop'][2]), int(s['crop'][3])))
    assert flips == {(0, 0), (0, 1), (1, 0), (1, 1)}
    no_flip = _train(coded_root, tasks={'derain': 3}, use_hflip=False, use_vflip=False)
    assert all(no_flip[i]['crop'][2:].sum() == 0 for i in range(len(no_flip)))


def test_denoise_same_noise_on_lq_and_lq_pos_overlap(coded_root):
    torch.manual_seed(0)
    ds = _train(coded_root, tasks={'denoise': 3}, sigmas=[15], return_lq_pos=True, gt_size=24)
    checked = 0
    for idx in range(len(ds)):
        s = ds[idx]
        assert s['sigma'].item() == 15 and torch.equal(s['lq'], s['gt'])  # clean until the model adds noise
        clean_lq, clean_pos = s['lq'].clone(), s['lq_pos'].clone()
        batch = {k: (v.unsqueeze(0) if torch.is_tensor(v) else [v]) for k, v in s.items()}
        apply_pending_noise(batch)
        noisy_lq, noisy_pos = batch['lq'][0], batch['lq_pos'][0]
        def pos_of(img):
            return torch.round(img[0] * 255).long() - 60, torch.round(img[1] * 255).long() - 60
        ry, rx = pos_of(clean_lq)
        py, px = pos_of(clean_pos)
        grid = torch.full((3, 100, 100), float('nan'))
        grid[:, ry, rx] = noisy_lq  # noisy lq placed at its image coordinates
        at_pos = grid[:, py, px]
        hit = ~torch.isnan(at_pos)
        assert torch.allclose(at_pos[hit], noisy_pos[hit], atol=1e-6)
        checked += int(hit.sum())
        assert not torch.allclose(noisy_lq, clean_lq)
    assert checked > 100


def test_noise_statistics_through_dataset(coded_root):
    ds = _train(coded_root, tasks={'denoise': 12}, sigmas=[25], gt_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    batch = next(iter(loader))
    clean = batch['lq'].clone()
    apply_pending_noise(batch)
    noise = (batch['lq'] - clean) * 255
    assert abs(noise.std().item() / 25 - 1) < 0.05
    assert torch.equal(batch['gt'], clean)


def test_small_images_are_upscaled(coded_root):
    ds = _train(coded_root, tasks={'dehaze': 2}, gt_size=64)  # images are 40-48 px high
    s = ds[0]
    assert s['lq'].shape == (3, 64, 64) and s['gt'].shape == (3, 64, 64)


def test_fold_filter(coded_root):
    parts = [_train(coded_root, tasks={'derain': 1}, folds=[k]) for k in (0, 1)]
    keys = [set(p.keys['derain']) for p in parts]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == 5
    assert all(fold_of('derain', k) == 0 for k in keys[0])
    with pytest.raises(ValueError, match=r"option 'folds' must list fold ids in \[0, 1\]"):
        _train(coded_root, tasks={'derain': 1}, folds=[2])


@pytest.mark.parametrize('workers', [0, 2])
def test_basicsr_dataloader_collates(coded_root, workers):
    opt = dict(name='train', type='AllInOneDataset', phase='train', dataroot=coded_root, gt_size=16,
               return_lq_pos=True, batch_size_per_gpu=4, num_worker_per_gpu=workers, pin_memory=False)
    ds = build_dataset(opt)
    ds[0]  # the parent opens the packs first: forked workers must open their own environments
    loader = build_dataloader(ds, opt, num_gpu=0, dist=False, seed=0)
    batch = next(iter(loader))
    for k in ('lq', 'gt', 'lq_pos'):
        assert batch[k].shape == (4, 3, 16, 16) and batch[k].dtype == torch.float32
    assert batch['task'].shape == (4,) and batch['sigma'].shape == (4,) and batch['crop'].shape == (4, 4)
    assert all(torch.is_tensor(v) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
               for v in batch.values())


def _protocol_reference_3task(clean_images, sigma, sigmas=(15, 25, 50)):
    rs = np.random.RandomState(0)
    out = None
    for s in sigmas:
        res = [np.clip(img.astype(np.float64) + rs.randn(*img.shape) * s, 0, 255).astype(np.uint8)
               for img in clean_images]
        if s == sigma:
            out = res
    return out


def test_test_noise_3task_protocol_and_determinism(coded_root):
    test_ds_mod._STREAM_CACHE.clear()
    opt = dict(name='bsd', type='AllInOneTestDataset', phase='val', dataroot=coded_root, task='denoise',
               sigma=25, protocol='3task')
    a = build_dataset(opt)
    first = [a[i]['lq'] for i in range(len(a))]
    test_ds_mod._STREAM_CACHE.clear()
    b = build_dataset(opt)
    assert all(torch.equal(x, b[i]['lq']) for i, x in enumerate(first))
    # reference: x16 centre crop of each sorted image, one RandomState(0) over sigma 15 then 25
    cleans = []
    for i in range(4):
        img = _coded(36 + i, 50 - i, 100)
        h, w = img.shape[:2]
        ch, cw = h % 16, w % 16
        cleans.append(img[ch // 2:h - ch + ch // 2, cw // 2:w - cw + cw // 2])
    ref = _protocol_reference_3task(cleans, 25)
    for i in range(4):
        got = torch.round(first[i] * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, ref[i])
        assert got.shape[0] % 16 == 0 and got.shape[1] % 16 == 0
    s = a[0]
    assert s['noise_level'].item() == 25 and s['lq_path'].endswith('t0_s25') and 'sigma' not in s


def test_test_noise_5task_protocol(coded_root):
    ds = build_dataset(dict(name='bsd', type='AllInOneTestDataset', phase='val', dataroot=coded_root,
                            task='denoise', sigma=25, protocol='5task'))
    for i in (0, 2):
        clean = torch.from_numpy(_coded(36 + i, 50 - i, 100).transpose(2, 0, 1).copy()).float()
        gen = torch.Generator().manual_seed(3407 + i)
        want = (clean + torch.randn(clean.shape, generator=gen) * 25).clamp(0, 255).round()
        got = torch.round(ds[i]['lq'] * 255)
        assert got.shape == want.shape and torch.equal(got, want)


def test_test_dataset_paired_and_center_crop(coded_root):
    ds = build_dataset(dict(name='rain', type='AllInOneTestDataset', phase='val', dataroot=coded_root,
                            task='derain', center_crop=16))
    s = ds[1]
    assert s['lq'].shape == (3, 16, 16) and s['task'].item() == 1 and s['key'] == 'derain/t1'
    assert torch.allclose(s['lq'][2], torch.full((16, 16), 10 / 255))


def test_errors_name_the_culprit(coded_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No pack for task 'deblur' \(split 'train'\)"):
        _train(coded_root, tasks=['deblur'])
    with pytest.raises(ValueError, match="Unknown task 'derian' in option 'tasks'; did you mean 'derain'"):
        _train(coded_root, tasks=['derian'])
    with pytest.raises(ValueError, match="Unknown option key 'gt_szie'.*did you mean 'gt_size'"):
        _train(coded_root, gt_szie=16)
    with pytest.raises(ValueError, match="task 'denoise' needs option 'sigma'"):
        build_dataset(dict(name='x', type='AllInOneTestDataset', phase='val', dataroot=coded_root, task='denoise'))
    with pytest.raises(ValueError, match="io_backend type 'disk' is not supported"):
        _train(coded_root, io_backend={'type': 'disk'})
    # interrupted pack (no pack.json)
    os.makedirs(tmp_path / 'train' / 'derain' / 'gt.lmdb')
    with pytest.raises(FileNotFoundError, match='pack.json is missing: the pack of task .derain. is incomplete'):
        _train(str(tmp_path), tasks=['derain'])
    # GT/LQ size mismatch inside a pack written by hand
    d = tmp_path / 'train' / 'dehaze'
    with LmdbImageWriter(str(d / 'gt.lmdb')) as w:
        w.put('a', _coded(20, 20, 0))
    with LmdbImageWriter(str(d / 'lq.lmdb')) as w:
        w.put('a', _coded(20, 24, 0))
    write_pack_info(str(d), {'task': 'dehaze', 'split': 'train', 'count': 1, 'format': 'png', 'has_lq': True})
    ds = _train(str(tmp_path), tasks=['dehaze'])
    with pytest.raises(PackError, match=r"Task 'dehaze', key 'a' in .*LQ is 24x20 but GT is 20x20"):
        ds[0]
    # missing meta_info.txt
    os.remove(d / 'gt.lmdb' / 'meta_info.txt')
    with pytest.raises(FileNotFoundError, match=r"meta_info.txt missing in LMDB pack .*gt.lmdb \(task 'dehaze'\)"):
        _train(str(tmp_path), tasks=['dehaze'])


def test_empty_after_folds_is_an_error(tmp_path):
    write_task_pack(str(tmp_path), 'train', 'derain', [('only', _coded(20, 20, 1), _coded(20, 20, 2))],
                    progress=False)
    other = 1 - fold_of('derain', 'only')
    with pytest.raises(ValueError, match=rf"task 'derain' has no samples in .* after the fold filter folds=\[{other}\]"):
        _train(str(tmp_path), tasks=['derain'], folds=[other])
