"""AMIRNetModel: loss terms, tree growth during training, DDP gathering, resume, demo option file pipelines."""
import io
import os
import re

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import default_collate

from basicsr.data import build_dataset
from basicsr.metrics.psnr_ssim import calculate_ssim_pt
from basicsr.models import build_model

from perceive_ir_plugin.models import amirnet_model
from perceive_ir_plugin.models.amirnet_model import AMIRNetModel, ssim
from log_capture import Capture as _Capture  # tests/ helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_OPT = os.path.join(REPO, 'options', 'train', 'AMIRNet', 'AMIRNet_demo.yml')
TINY_AMIRNET = {'type': 'AMIRNet', 'width': 8, 'enc_blk_nums': [1, 1], 'dec_blk_nums': [1, 1],
                'encoder_channels': [8, 8, 16], 'head_hidden': 16}


def test_ssim_matches_basicsr_metric():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 24, 20, generator=g)
    out = (gt + 0.1 * torch.randn(2, 3, 24, 20, generator=g)).clamp(0, 1)
    ref = calculate_ssim_pt(out, gt, crop_border=0).mean()
    assert float(ssim(out, gt)) == pytest.approx(float(ref), abs=1e-5)
    assert float(ssim(gt, gt)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match='train.ssim_weight: 0'):
        ssim(gt[..., :8, :8], gt[..., :8, :8])


def test_batch_keys_stable_key_sigma_and_fallback():
    batch = {'key': ['denoise/a', 'derain/b'], 'sigma': torch.tensor([25.0, 0.0])}
    assert AMIRNetModel.batch_keys(batch) == ['denoise/a@sigma25', 'derain/b']
    assert AMIRNetModel.batch_keys({'gt_path': ['/x/1.png']}) == ['/x/1.png']
    with pytest.raises(KeyError, match="stable per-sample 'key'"):
        AMIRNetModel.batch_keys({'lq': torch.zeros(1)})


@pytest.fixture(scope='module')
def paired_folder(tmp_path_factory):
    """8 paired 32x32 PNGs, two degradation families (strong noise / dark and blurred)."""
    root = tmp_path_factory.mktemp('amir_pairs')
    rng = np.random.default_rng(0)
    for sub in ('gt', 'lq'):
        os.makedirs(root / sub)
    for i in range(8):
        gt = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (32, 32), interpolation=cv2.INTER_CUBIC)
        if i % 2:
            lq = np.clip(gt + rng.normal(0, 40, gt.shape), 0, 255).astype(np.uint8)
        else:
            lq = (cv2.GaussianBlur(gt, (0, 0), 2.0) * 0.35).astype(np.uint8)
        cv2.imwrite(str(root / 'gt' / f'{i:02d}.png'), gt)
        cv2.imwrite(str(root / 'lq' / f'{i:02d}.png'), lq)
    return root


def _opt(root, tmp, **train):
    dataset = {'name': 'pairs', 'type': 'PairedImageDataset', 'dataroot_gt': str(root / 'gt'),
               'dataroot_lq': str(root / 'lq'), 'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}',
               'gt_size': 32, 'use_hflip': False, 'use_rot': False, 'phase': 'train', 'scale': 1,
               'batch_size_per_gpu': 4, 'num_worker_per_gpu': 0}
    train_opt = {'optim_g': {'type': 'AdamW', 'lr': 2e-3, 'betas': [0.9, 0.999]},
                 'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5},
                 'total_iter': 10, 'tree_split_iters': 2, 'tree_passes': 2, 'tree_batch_size': 3,
                 'tree_num_workers': 0}
    train_opt.update(train)
    return {'name': 'amir', 'model_type': 'AMIRNetModel', 'scale': 1, 'num_gpu': 0, 'is_train': True,
            'dist': False, 'rank': 0, 'world_size': 1, 'manual_seed': 0, 'datasets': {'train': dataset},
            'network_g': dict(TINY_AMIRNET), 'path': {'pretrain_network_g': None, 'strict_load_g': True,
                                                      'models': str(tmp), 'training_states': str(tmp)},
            'train': train_opt}


def test_tiny_training_grows_full_tree_lowers_loss_and_resumes(paired_folder, tmp_path):
    torch.manual_seed(0)
    opt = _opt(paired_folder, tmp_path)
    model = build_model(opt)
    assert isinstance(model, AMIRNetModel) and int(model.net_g.degradation_encoder.active_levels) == 1
    dataset = build_dataset(opt['datasets']['train'])
    batch = default_collate([dataset[i] for i in range(4)])
    restoration, logs = [], []
    for it in range(1, 11):
        model.update_learning_rate(it)
        model.feed_data(batch)
        model.optimize_parameters(it)
        log = model.get_current_log()
        logs.append(log)
        restoration.append(log['l_smooth_l1'] + log['l_ssim'])
    tree = model.tree
    assert tree.num_levels == 4 and [h['iter'] for h in tree.history] == [2, 4, 6]
    assert int(model.net_g.degradation_encoder.active_levels) == 4
    assert 'l_ce' not in logs[0] and 'l_ce_1' in logs[2] and 'l_ce_3' in logs[-1]
    assert logs[-1]['l_ce'] == pytest.approx(logs[-1]['l_ce_1'] + logs[-1]['l_ce_2'] + logs[-1]['l_ce_3'], rel=1e-5)
    # all 8 training images got a node on every level, consistent with their parents
    keys = sorted(dataset.paths[i]['gt_path'] for i in range(len(dataset)))
    assert sorted(tree.keys) == keys
    for level in (1, 2, 3):
        labels = tree.labels_for(keys, level)
        assert labels.min() >= 0 and labels.max() < 2**level
        assert torch.equal(labels // 2, tree.labels_for(keys, level - 1))
    assert sum(restoration[-3:]) < 0.8 * sum(restoration[:3])  # the restoration loss went down

    # the training state carries the tree; a resumed model gets the same labels and active levels
    buf = io.BytesIO()
    torch.save(model.extra_training_state(), buf)
    buf.seek(0)
    resumed = build_model(_opt(paired_folder, tmp_path))
    resumed.load_extra_training_state(torch.load(buf, weights_only=True))
    assert resumed.tree.num_levels == 4 and resumed.tree.history == tree.history
    assert torch.equal(resumed.tree.labels_for(keys, 3), tree.labels_for(keys, 3))
    assert int(resumed.net_g.degradation_encoder.active_levels) == 4
    assert not resumed.maybe_grow_tree(100)  # complete: nothing more to build
    with pytest.raises(KeyError, match='no degradation_tree'):
        resumed.load_extra_training_state({})


def test_tree_growth_under_ddp_gathers_to_rank0_and_broadcasts(paired_folder, tmp_path, monkeypatch):
    """Two simulated ranks (each extracts its shard) build the same tree as one process over all data."""
    torch.manual_seed(0)
    single = build_model(_opt(paired_folder, tmp_path, tree_split_iters=5))
    rank0 = build_model(_opt(paired_folder, tmp_path, tree_split_iters=5))
    rank1 = build_model(_opt(paired_folder, tmp_path, tree_split_iters=5))
    for other in (rank0, rank1):
        other.net_g.load_state_dict(single.net_g.state_dict())
    single.grow_tree(5)  # not distributed: the reference

    dist = {'rank': 1}
    monkeypatch.setattr(amirnet_model, 'get_dist_info', lambda: (dist['rank'], 2))
    shard1 = rank1.extract_tree_features()
    dist['rank'] = 0
    shard0 = rank0.extract_tree_features()
    assert len(shard0[0]) == len(shard1[0]) == 4 and not set(shard0[0]) & set(shard1[0])
    broadcast = {}

    def all_gather_object(out, obj):
        out[:] = [shard0, shard1]

    def broadcast_object_list(payload, src):
        assert src == 0
        if dist['rank'] == 0:
            broadcast['state'] = payload[0]
        else:
            payload[0] = broadcast['state']

    monkeypatch.setattr(torch.distributed, 'all_gather_object', all_gather_object)
    monkeypatch.setattr(torch.distributed, 'broadcast_object_list', broadcast_object_list)
    rank0.grow_tree(5)
    assert rank0.tree.keys == sorted(single.tree.keys)
    assert torch.equal(rank0.tree.labels_for(single.tree.keys, 1), single.tree.labels_for(single.tree.keys, 1))
    dist['rank'] = 1
    rank1.grow_tree(5)  # rank 1 does not cluster: it takes rank 0's tree
    assert rank1.tree.state_dict()['keys'] == rank0.tree.state_dict()['keys']
    assert torch.equal(rank1.tree.labels, rank0.tree.labels) and rank1.tree.history == rank0.tree.history
    assert int(rank1.net_g.degradation_encoder.active_levels) == 2


def test_amirnet_model_rejects_plain_network_and_missing_schedule(paired_folder, tmp_path):
    opt = _opt(paired_folder, tmp_path)
    opt['network_g'] = {'type': 'NAFNet', 'width': 8, 'enc_blk_nums': [1], 'dec_blk_nums': [1]}
    with pytest.raises(ValueError, match="tree-conditioned network_g .* got type 'NAFNet'"):
        build_model(opt)
    opt = _opt(paired_folder, tmp_path)
    del opt['train']['tree_split_iters']
    with pytest.raises(ValueError, match='train.tree_split_iters'):
        build_model(opt)


def test_demo_option_file_trains_on_demo_packs_and_runs_the_test_pipeline(tmp_path, monkeypatch):
    from perceive_ir_plugin.data.demo_data import make_demo_packs
    from perceive_ir_plugin.test import main as test_main
    from perceive_ir_plugin.train import main as train_main

    monkeypatch.chdir(tmp_path)
    make_demo_packs('datasets/demo/AiO', max_side=32, train_images=('astronaut', 'coins'), test_images=('camera', ))
    with open(DEMO_OPT, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    assert opt['datasets']['train']['dataroot'] == 'datasets/demo/AiO'
    # CPU-test sized: same file, fewer/smaller everything
    opt['network_g'].update(width=8, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], encoder_channels=[8, 8, 16],
                            head_hidden=16)
    opt['datasets']['train'].update(gt_size=24, batch_size_per_gpu=2)
    for key in [k for k in opt['datasets'] if k.startswith('val')]:
        opt['datasets'][key]['center_crop'] = 32
    opt['train'].update(total_iter=6, tree_split_iters=2, tree_passes=1, tree_batch_size=8)
    opt['train']['scheduler']['T_max'] = 6
    val_sets = {f'test_{k[4:]}': opt['datasets'].pop(k) for k in list(opt['datasets']) if k.startswith('val')}
    assert len(val_sets) == 5  # validated below through the test pipeline only (saves time)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=6)
    with open('train.yml', 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f)
    with _Capture() as log:
        assert train_main(['-opt', 'train.yml']) == 0
    text = '\n'.join(log.lines)
    for level, it in ((1, 2), (2, 4), (3, 6)):
        assert f'Degradation tree: built level {level} at iteration {it}' in text
    exp = tmp_path / 'experiments' / 'AMIRNet_demo'
    weights = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert int(weights['degradation_encoder.active_levels']) == 4
    state = torch.load(exp / 'training_states' / '6.state', weights_only=True)  # what --auto_resume reads
    assert state['degradation_tree']['num_levels'] == 4 and len(state['degradation_tree']['history']) == 3

    # the plugin's test pipeline on the trained network (the validation sets as test sets)
    test_opt = {'name': 'AMIRNet_demo_test', 'model_type': 'AMIRNetModel', 'scale': 1, 'num_gpu': 0,
                'manual_seed': 0, 'network_g': opt['network_g'],
                'datasets': val_sets,
                'path': {'pretrain_network_g': str(exp / 'models' / 'net_g_latest.pth'), 'strict_load_g': True},
                'val': {'save_img': False, 'metrics': opt['val']['metrics']}}
    with open('test.yml', 'w', encoding='utf-8') as f:
        yaml.safe_dump(test_opt, f)
    with _Capture() as log:
        assert test_main(['-opt', 'test.yml']) == 0
    text = '\n'.join(log.lines)
    for name in ('demo-denoise-sigma25', 'demo-derain', 'demo-dehaze', 'demo-deblur', 'demo-lowlight'):
        assert re.search(rf'Validation {name}\n\s+# psnr: \d+\.\d+', text), name


@pytest.mark.parametrize('name', ['demo', '3task', '5task'])
def test_option_files_are_valid_and_fit_the_tree_schedule(name):
    from perceive_ir_plugin.utils.option_check import find_option_problems, load_option_file
    opt = load_option_file(os.path.join(REPO, 'options', 'train', 'AMIRNet', f'AMIRNet_{name}.yml'))
    assert find_option_problems(opt, check_files=False) == []
    assert opt['model_type'] == 'AMIRNetModel' and opt['network_g']['type'] == 'AMIRNet'
    assert opt['datasets']['train']['type'] == 'AllInOneDataset'
    assert opt['datasets']['train']['num_worker_per_gpu'] >= 1 and opt['train']['tree_num_workers'] >= 1
    train = opt['train']
    assert (opt['network_g']['depth'] - 1) * train['tree_split_iters'] < train['total_iter']
    assert (train['smooth_l1_weight'], train['smooth_l1_beta'], train['ssim_weight']) == (0.85, 0.03, 0.15)
    assert train['optim_g']['lr'] == 5e-4 and train['optim_g']['betas'] == [0.9, 0.999]
    if name != 'demo':  # the released layout and recipe
        assert opt['network_g']['width'] == 64 and opt['network_g']['enc_blk_nums'] == [1, 1, 1, 28]
        assert opt['datasets']['train']['gt_size'] == 256 and opt['manual_seed'] == 3407
        assert opt['num_gpu'] * opt['datasets']['train']['batch_size_per_gpu'] == 32
    opt['train']['tree_split_iter'] = opt['train'].pop('tree_split_iters')
    assert any("did you mean 'tree_split_iters'" in p for p in find_option_problems(opt, check_files=False))
