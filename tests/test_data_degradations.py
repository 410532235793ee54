"""Synthetic degradations, protocol noise, pending training noise, demo packs."""
import numpy as np
import pytest
import torch

from perceive_ir_plugin.data import degradations as deg
from perceive_ir_plugin.data.lmdb_io import LmdbImageReader
from perceive_ir_plugin.data.pack_layout import read_pack_info


def _img(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(30, 220, (h, w, 3), dtype=np.uint8)


def test_line_kernel_and_motion_blur():
    k = deg.line_kernel(9, 0.0)
    assert k.shape == (9, 9) and abs(k.sum() - 1) < 1e-6
    assert k[4].sum() > 0.99  # horizontal line through the centre row
    img = np.zeros((21, 21, 3), np.uint8)
    img[10, 10] = 255
    out = deg.motion_blur(img, np.random.default_rng(0), length=7, angle=90.0)
    col = out[:, 10, 0].astype(int)
    assert (col[7:14] > 0).all() and col[:6].sum() == 0 and out[10, :9].sum() == 0


def test_haze_follows_scattering_model():
    img = _img()
    depth = np.full(img.shape[:2], 0.5, np.float32)
    out = deg.add_haze(img, np.random.default_rng(0), beta=1.0, airlight=0.9, depth=depth)
    t = np.exp(-0.5)
    want = np.clip(np.round((img / 255.0 * t + 0.9 * (1 - t)) * 255), 0, 255)
    assert np.abs(out.astype(int) - want).max() <= 1
    d = deg.depth_like_map(img)
    assert d.shape == img.shape[:2] and d.min() == 0 and abs(d.max() - 1) < 1e-6


@pytest.mark.parametrize('task', ['denoise', 'derain', 'dehaze', 'deblur', 'lowlight'])
def test_synthesize_is_seeded_and_degrades(task):
    img = _img(96, 128)
    a = deg.synthesize(img, task, np.random.default_rng(3))
    b = deg.synthesize(img, task, np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - img).mean() > 0.5
    if task == 'lowlight':
        assert a.mean() < 0.5 * img.mean()


def test_protocol_noise_numpy_and_torch_deterministic():
    clean = _img(32, 32)
    rs1, rs2 = np.random.RandomState(0), np.random.RandomState(0)
    a, b = deg.protocol_noise_numpy(clean, 25, rs1), deg.protocol_noise_numpy(clean, 25, rs2)
    np.testing.assert_array_equal(a, b)
    want = np.clip(clean + np.random.RandomState(0).randn(32, 32, 3) * 25, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(a, want)
    t1, t2 = deg.protocol_noise_torch(clean, 25, 3407), deg.protocol_noise_torch(clean, 25, 3407)
    np.testing.assert_array_equal(t1, t2)
    assert not np.array_equal(t1, deg.protocol_noise_torch(clean, 25, 3408))
    assert abs(np.std(t1.astype(float) - clean) - 25) < 2.5


@pytest.mark.parametrize('sigma', [15, 25, 50])
def test_pending_noise_statistics_cpu(sigma):
    """std of the added noise within 5 % of sigma on a mid-grey crop (no clamping)."""
    b, h, w = 4, 64, 64
    clean = torch.full((b, 3, h, w), 0.5)
    data = {'lq': clean.clone(), 'gt': clean.clone(), 'sigma': torch.full((b,), float(sigma)),
            'noise_seed': torch.arange(b, dtype=torch.int64) * 7919 + 11,
            'crop': torch.zeros(b, 4, dtype=torch.int64)}
    out = deg.apply_pending_noise(data)
    noise = (out['lq'] - clean) * 255
    assert abs(noise.std().item() / sigma - 1) < 0.05
    assert abs(noise.mean().item()) < 0.05 * sigma
    assert torch.equal(out['gt'], clean)
    once = out['lq'].clone()
    deg.apply_pending_noise(out)  # second call: no-op
    assert torch.equal(out['lq'], once)
    # different seeds give different (uncorrelated) noise
    c = torch.corrcoef(torch.stack([noise[0].flatten(), noise[1].flatten()]))[0, 1]
    assert abs(c.item()) < 0.05


def test_pending_noise_only_on_denoise_samples_and_noop():
    x = torch.rand(2, 3, 8, 8)
    data = {'lq': x.clone(), 'sigma': torch.tensor([0.0, 25.0]), 'noise_seed': torch.tensor([1, 2]),
            'crop': torch.zeros(2, 4, dtype=torch.int64)}
    deg.apply_pending_noise(data)
    assert torch.equal(data['lq'][0], x[0]) and not torch.equal(data['lq'][1], x[1])
    data = {'lq': x.clone(), 'sigma': torch.zeros(2)}
    assert torch.equal(deg.apply_pending_noise(data)['lq'], x)


def test_pending_noise_same_realisation_on_overlap_with_flips():
    """lq at (top 3, left 5) and a flipped lq_pos at (top 6, left 2) of one image share noise on the overlap."""
    h = w = 16
    clean = torch.full((1, 3, h, w), 0.5)
    data = {'lq': clean.clone(), 'lq_pos': clean.clone(), 'sigma': torch.tensor([25.0]),
            'noise_seed': torch.tensor([1234]), 'crop': torch.tensor([[3, 5, 0, 0]]),
            'crop_pos': torch.tensor([[6, 2, 1, 1]])}
    deg.apply_pending_noise(data)
    full = torch.full((3, 40, 40), float('nan'))
    full[:, 3:3 + h, 5:5 + w] = data['lq'][0]
    pos = data['lq_pos'][0].flip(-1).flip(-2)  # undo the flips -> image coordinates
    overlap = full[:, 6:6 + h, 2:2 + w]
    mask = ~torch.isnan(overlap)
    assert mask.sum() == 3 * 13 * 13
    assert torch.allclose(overlap[mask], pos[mask])
    assert not torch.allclose(data['lq'][0], clean[0])


def test_demo_packs_build(tmp_path):
    from perceive_ir_plugin.data.demo_data import make_demo_packs
    out = make_demo_packs(str(tmp_path), max_side=48, fmt='raw', train_images=('astronaut', 'rocket'),
                          test_images=('coffee',))
    assert set(out) == {(s, t) for s in ('train', 'test') for t in ('denoise', 'derain', 'dehaze', 'deblur',
                                                                    'lowlight')}
    info = read_pack_info(str(tmp_path / 'train' / 'derain'), 'derain', 'train')
    assert info['count'] == 2 and info['format'] == 'raw' and info['has_lq'] and info['source']['kind'] == 'demo'
    assert not (tmp_path / 'train' / 'denoise' / 'lq.lmdb').exists()
    lq = LmdbImageReader(str(tmp_path / 'train' / 'derain' / 'lq.lmdb')).read('astronaut')
    gt = LmdbImageReader(str(tmp_path / 'train' / 'derain' / 'gt.lmdb')).read('astronaut')
    assert lq.shape == gt.shape == (48, 48, 3) and not np.array_equal(lq, gt)
    again = make_demo_packs(str(tmp_path), max_side=48, fmt='raw', train_images=('astronaut', 'rocket'),
                            test_images=('coffee',))
    assert all(v['added'] == 0 for v in again.values())
