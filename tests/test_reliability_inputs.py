"""The bad-input matrix: each bad input gets a clear error naming its culprit, or an explicit conversion."""
import os

import cv2
import lmdb
import numpy as np
import pytest
import torch
import yaml

from basicsr.archs import build_network
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.models import build_model

from perceive_ir_plugin.data.lmdb_io import LmdbImageReader, LmdbImageWriter, LmdbRecordError
from perceive_ir_plugin.data.packing import PackError, load_image_rgb, write_task_pack
from perceive_ir_plugin.utils.atomic_io import atomic_torch_save
from perceive_ir_plugin.utils.checkpoint import CheckpointError
from perceive_ir_plugin.utils.option_check import OptionError
from log_capture import Capture  # tests/ helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NAFNET = os.path.join(REPO, 'options', 'tiny', 'NAFNet_train_tiny.yml')
NAF = {'type': 'NAFNet', 'width': 8, 'middle_blk_num': 1, 'enc_blk_nums': [1], 'dec_blk_nums': [1]}
RESTORMER = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
             'heads': [1, 1, 1, 1]}


def model(network=NAF, pretrain=None, train=None, val=None):
    opt = {'name': 'bad_inputs', 'model_type': 'ImageRestorationModel', 'num_gpu': 0, 'is_train': train is not None,
           'dist': False, 'scale': 1, 'network_g': dict(network), 'val': val or {},
           'path': {'pretrain_network_g': pretrain, 'strict_load_g': True}}
    if train is not None:
        opt['train'] = train
    return build_model(opt)


def write_png(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img)


def tiny_folders(root, gt_hw=(40, 40), lq_hw=(40, 40), n=2):
    rng = np.random.default_rng(0)
    for i in range(n):
        write_png(os.path.join(root, 'datasets', 'tiny', 'train', 'gt', f'{i}.png'),
                  rng.integers(0, 256, gt_hw + (3,), dtype=np.uint8))
        write_png(os.path.join(root, 'datasets', 'tiny', 'train', 'lq', f'{i}.png'),
                  rng.integers(0, 256, lq_hw + (3,), dtype=np.uint8))


def train_options(root, edit):
    with open(TINY_NAFNET, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    opt['datasets'].pop('val')
    opt.pop('val')
    edit(opt)
    path = os.path.join(root, 'opt.yml')
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f)
    return path


# ------------------------------------------------------------------------------------ options
def test_misspelt_option_stops_training_before_anything_is_written(tmp_path, monkeypatch):
    from perceive_ir_plugin.train import main
    monkeypatch.chdir(tmp_path)
    tiny_folders(str(tmp_path))
    opt_file = train_options(str(tmp_path), lambda o: o['network_g'].update(widht=o['network_g'].pop('width')))
    with pytest.raises(OptionError, match=r"network_g\.widht: NAFNet takes no argument 'widht'; did you mean "
                                          r"'width'\?"):
        main(['-opt', opt_file])
    assert not (tmp_path / 'experiments').exists()


def test_missing_weights_file_names_the_option_key(tmp_path, monkeypatch):
    from perceive_ir_plugin.test import main
    monkeypatch.chdir(tmp_path)
    tiny_folders(str(tmp_path))

    def edit(o):
        o['path']['pretrain_network_g'] = 'weights/net.pth'
        o['datasets'] = {'test': {'name': 't', 'type': 'PairedImageDataset', 'dataroot_gt': 'datasets/tiny/train/gt',
                                  'dataroot_lq': 'datasets/tiny/train/lq', 'io_backend': {'type': 'disk'}}}
        o.pop('train')

    with pytest.raises(OptionError, match=r"path\.pretrain_network_g: weights file not found: 'weights/net\.pth'"):
        main(['-opt', train_options(str(tmp_path), edit)])
    assert not (tmp_path / 'results').exists()
    # the model's own loader (used by every path, also without the entry point's check) names the key too
    with pytest.raises(FileNotFoundError, match=r"'weights/net\.pth' \(option 'path\.pretrain_network_g'\)"):
        model(pretrain='weights/net.pth')


def test_checkpoint_with_wrong_keys_and_shapes_is_listed(tmp_path):
    sd = build_network(dict(NAF)).state_dict()
    sd['intro.w'] = sd.pop('intro.weight')
    sd['ending.bias'] = torch.zeros(5)
    path = str(tmp_path / 'other.pth')
    torch.save({'params': sd}, path)
    with pytest.raises(CheckpointError) as info:
        model(pretrain=path)
    text = str(info.value)
    assert f"Checkpoint '{path}' (option 'path.pretrain_network_g') does not fit NAFNet" in text
    assert '1 missing key(s): intro.weight' in text and '1 unexpected key(s): intro.w' in text
    assert '1 shape difference(s): ending.bias: network (3,) vs checkpoint (5,)' in text


# ------------------------------------------------------------------------------------- LMDB
def small_pack(folder, task='derain'):
    rng = np.random.default_rng(1)
    with LmdbImageWriter(os.path.join(folder, 'gt.lmdb'), task=task) as writer:
        for key in ('a', 'b'):
            writer.put(key, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return os.path.join(folder, 'gt.lmdb')


def test_corrupt_lmdb_record_names_pack_key_and_task(tmp_path):
    pack = small_pack(str(tmp_path))
    env = lmdb.open(pack, map_size=1 << 24)
    with env.begin(write=True) as txn:
        good = txn.get(b'b')
        txn.put(b'b', good[:len(good) // 2])  # a truncated PNG record
    env.close()
    reader = LmdbImageReader(pack, task='derain')
    assert reader.read('a').shape == (8, 8, 3)
    with pytest.raises(LmdbRecordError, match=rf"Record 'b' of task 'derain' in LMDB pack {pack} is corrupt"):
        reader.read('b')
    reader.close()


def test_missing_meta_info_names_the_pack(tmp_path):
    pack = small_pack(str(tmp_path))
    os.remove(os.path.join(pack, 'meta_info.txt'))
    with pytest.raises(FileNotFoundError, match=rf"meta_info\.txt missing in LMDB pack {pack} \(task 'dehaze'\)"):
        LmdbImageReader(pack, task='dehaze')


def test_packing_into_an_existing_pack_never_overwrites_it(tmp_path):
    pack = small_pack(str(tmp_path))
    before = LmdbImageReader(pack).read('a').copy()
    # a packing run killed after its LMDB commit but before meta_info.txt was appended
    with open(os.path.join(pack, 'meta_info.txt'), 'w') as f:
        f.write('a.png (8,8,3) 1\n')
    with LmdbImageWriter(pack, task='derain') as writer:  # the resumed run
        assert writer.put('a', np.zeros((8, 8, 3), np.uint8)) is False  # already packed: skipped
        assert writer.put('c', np.zeros((8, 8, 3), np.uint8)) is True
    reader = LmdbImageReader(pack)
    assert reader.keys == ['a', 'b', 'c']
    assert np.array_equal(reader.read('a'), before)
    reader.close()


# ------------------------------------------------------------------------------------ images
def test_gt_lq_size_mismatch_names_the_pair(tmp_path):
    write_png(tmp_path / 'lq' / 'x.png', np.zeros((30, 40, 3), np.uint8))
    write_png(tmp_path / 'gt' / 'x.png', np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(PackError, match=r"task 'derain', key 'x': LQ .*x\.png is 40x30 but GT .*x\.png is 40x32"):
        write_task_pack(str(tmp_path / 'out'), 'train', 'derain',
                        [('x', str(tmp_path / 'lq' / 'x.png'), str(tmp_path / 'gt' / 'x.png'))], progress=False)
    # nothing was written for that pair
    assert not os.path.exists(tmp_path / 'out' / 'train' / 'derain' / 'pack.json')


def test_validation_pair_with_different_sizes_names_the_files(tmp_path):
    """At validation BasicSR's paired dataset only crops GT down to LQ; an LQ larger than its GT reaches the
    model, which names the pair before any loss or metric sees it."""
    write_png(tmp_path / 'gt' / 'x.png', np.zeros((30, 40, 3), np.uint8))
    write_png(tmp_path / 'lq' / 'x.png', np.zeros((32, 40, 3), np.uint8))
    ds = PairedImageDataset({'dataroot_gt': str(tmp_path / 'gt'), 'dataroot_lq': str(tmp_path / 'lq'),
                             'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}', 'scale': 1, 'phase': 'val'})
    batch = {k: (v.unsqueeze(0) if torch.is_tensor(v) else [v]) for k, v in ds[0].items()}
    m = model()
    with pytest.raises(ValueError, match=r'lq .*lq/x\.png is 32x40 but gt .*gt/x\.png is 30x40'):
        m.feed_data(batch)
    # an aligned pair passes
    m.feed_data({'lq': torch.zeros(1, 3, 30, 40), 'gt': torch.zeros(1, 3, 30, 40)})
    assert m.lq.shape == m.gt.shape


def test_image_smaller_than_the_crop_names_the_file(tmp_path):
    tiny_folders(str(tmp_path), gt_hw=(24, 24), lq_hw=(24, 24), n=1)
    root = tmp_path / 'datasets' / 'tiny' / 'train'
    ds = PairedImageDataset({'dataroot_gt': str(root / 'gt'), 'dataroot_lq': str(root / 'lq'), 'io_backend':
                             {'type': 'disk'}, 'filename_tmpl': '{}', 'gt_size': 32, 'use_hflip': False,
                             'use_rot': False, 'scale': 1, 'phase': 'train'})
    with pytest.raises(ValueError, match=r'LQ \(24, 24\) is smaller than patch size \(32, 32\)\. Please remove '
                                         r'.*gt/0\.png'):
        ds[0]


@pytest.mark.parametrize('network', [NAF, RESTORMER], ids=['NAFNet', 'Restormer'])
@pytest.mark.parametrize('tile', [None, {'size': 32, 'overlap': 8}], ids=['whole', 'tiled'])
def test_odd_sizes_at_test_time_keep_the_input_size(network, tile):
    torch.manual_seed(0)
    m = model(network, val={'tile': tile} if tile else {})
    m.feed_data({'lq': torch.rand(1, 3, 37, 53)})
    m.test()
    assert m.output.shape == (1, 3, 37, 53)
    assert torch.isfinite(m.output).all()


def test_16bit_grey_and_rgba_pngs_are_converted_or_refused(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    write_png(tmp_path / 'grey.png', grey)
    assert np.array_equal(load_image_rgb(str(tmp_path / 'grey.png')), np.repeat(grey[..., None], 3, axis=2))

    deep = (np.arange(6 * 8 * 3, dtype=np.uint16).reshape(6, 8, 3) * 400)
    write_png(tmp_path / 'deep.png', deep)
    expected = np.round(deep[..., ::-1] / 257).astype(np.uint8)  # RGB, 16 -> 8 bit
    assert np.array_equal(load_image_rgb(str(tmp_path / 'deep.png')), expected)

    bgra = np.dstack([np.full((6, 8, 3), 7, np.uint8), np.full((6, 8), 255, np.uint8)])
    write_png(tmp_path / 'opaque.png', bgra)
    assert np.array_equal(load_image_rgb(str(tmp_path / 'opaque.png')), np.full((6, 8, 3), 7, np.uint8))
    bgra[0, 0, 3] = 10
    write_png(tmp_path / 'transparent.png', bgra)
    with pytest.raises(PackError, match=r'transparent\.png has transparent pixels'):
        load_image_rgb(str(tmp_path / 'transparent.png'))


def test_16bit_grey_and_rgba_pngs_in_basicsr_folders_are_converted(tmp_path):
    """BasicSR's own folder datasets decode with IMREAD_COLOR: every PNG becomes 8-bit, 3 channels."""
    deep = np.full((32, 32, 3), 40000, np.uint16)
    write_png(tmp_path / 'gt' / '0.png', deep)
    write_png(tmp_path / 'lq' / '0.png', np.full((32, 32), 90, np.uint8))
    ds = PairedImageDataset({'dataroot_gt': str(tmp_path / 'gt'), 'dataroot_lq': str(tmp_path / 'lq'),
                             'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}', 'scale': 1, 'phase': 'val'})
    item = ds[0]
    assert item['gt'].shape == item['lq'].shape == (3, 32, 32)
    assert torch.allclose(item['gt'], torch.full_like(item['gt'], round(40000 / 257) / 255), atol=1.5 / 255)
    assert torch.allclose(item['lq'], torch.full_like(item['lq'], 90 / 255))


def test_empty_dataset_is_reported_before_training(tmp_path, monkeypatch):
    from perceive_ir_plugin.train import main
    monkeypatch.chdir(tmp_path)
    os.makedirs('datasets/tiny/train/gt')
    os.makedirs('datasets/tiny/train/lq')
    with pytest.raises(OptionError, match=r"datasets\.train\.dataroot_gt: no image files in 'datasets/tiny/train/gt'"):
        main(['-opt', train_options(str(tmp_path), lambda o: None)])


# ------------------------------------------------------------------------------------ training
def test_nonfinite_loss_is_skipped_logged_and_stops_after_n_in_a_row():
    torch.manual_seed(0)
    train = {'total_iter': 10, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}, 'max_nonfinite_steps': 3,
             'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [10],
                                                                     'gamma': 0.5}}
    m = model(train=train)
    good = {'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 16, 16)}
    bad = {'lq': good['lq'].clone(), 'gt': good['gt'].clone()}
    bad['lq'][0, 0, 0, 0] = float('nan')
    weights = {k: v.clone() for k, v in m.net_g.state_dict().items()}
    with Capture() as log:
        for it in (1, 2):
            m.feed_data(bad)
            m.optimize_parameters(it)
        assert all(torch.equal(v, m.net_g.state_dict()[k]) for k, v in weights.items())  # steps skipped
        m.feed_data(good)
        m.optimize_parameters(3)  # a finite step resets the count
        assert any(not torch.equal(v, m.net_g.state_dict()[k]) for k, v in weights.items())
        for it in (4, 5):
            m.feed_data(bad)
            m.optimize_parameters(it)
        m.feed_data(bad)
        with pytest.raises(RuntimeError, match=r'Training stopped at iteration 6: 3 non-finite steps in a row '
                                               r'\(train\.max_nonfinite_steps=3\)'):
            m.optimize_parameters(6)
    skipped = [line for line in log.lines if 'non-finite loss' in line and 'step skipped' in line]
    assert len(skipped) == 5 and skipped[0].startswith('Iteration 1: non-finite loss (l_pix=nan)')


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / 'net_g_4.pth')
    atomic_torch_save({'params': {'w': torch.ones(3)}}, path)

    class Exploding:
        def __reduce_ex__(self, protocol):
            raise OSError('disk full')

    with pytest.raises(Exception, match='disk full'):
        atomic_torch_save({'params': {'w': torch.zeros(3)}, 'x': Exploding()}, path)
    assert torch.equal(torch.load(path, weights_only=True)['params']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['net_g_4.pth']  # no temporary file left behind


# ------------------------------------------------------------------------------------ proxies
def test_proxy_that_cannot_cover_a_task_is_refused(tmp_path):
    from perceive_ir_plugin.models.proxies import ProxyBank
    os.makedirs(tmp_path / 'proxy' / 'derain.lmdb')
    with pytest.raises(FileNotFoundError, match=r"train\.proxies\[0\] \('prx'\)\.pack: '.*dehaze\.lmdb' does not "
                                                r'exist'):
        ProxyBank([{'name': 'prx', 'tasks': ['derain', 'dehaze'], 'pack': str(tmp_path / 'proxy')}])
    with pytest.raises(ValueError, match=r"\('prx'\): a precomputed pack cannot serve 'denoise'"):
        ProxyBank([{'name': 'prx', 'tasks': ['denoise'], 'pack': str(tmp_path / 'proxy')}])
    with pytest.raises(ValueError, match=r"Unknown task 'dehase' in option 'train\.proxies\[0\]\.tasks'; did you "
                                         r"mean 'dehaze'\?"):
        ProxyBank([{'name': 'prx', 'tasks': ['dehase'], 'pack': str(tmp_path / 'proxy')}])
