"""ImageRestorationModel hooks, schedulers, PSNRLoss, tiling and crash-safe saving (no pipelines)."""
import glob
import io
import math
import os

import pytest
import torch
from torch import nn

from basicsr.losses import build_loss
from basicsr.models import build_model
from basicsr.utils.registry import LOSS_REGISTRY, MODEL_REGISTRY

import perceive_ir_plugin.models.image_restoration_model as irm
from perceive_ir_plugin.models.lr_scheduler import (CosineAnnealingRestartCyclicLR, LinearWarmupCosineAnnealingLR,
                                                    TrueCosineAnnealingLR)
from perceive_ir_plugin.utils.atomic_io import atomic_torch_save
from perceive_ir_plugin.utils.checkpoint import CheckpointError
from perceive_ir_plugin.utils.launch import strip_local_rank
from perceive_ir_plugin.utils.tiling import pad_to_multiple, tiled_forward

TINY_NAFNET = {'type': 'NAFNet', 'width': 8, 'middle_blk_num': 1, 'enc_blk_nums': [1], 'dec_blk_nums': [1]}


def make_opt(tmp_path, network=None, train=None, val=None, is_train=True, path=None, **top):
    opt = {
        'name': 'unit', 'model_type': 'ImageRestorationModel', 'num_gpu': 0, 'dist': False, 'rank': 0,
        'world_size': 1, 'is_train': is_train, 'scale': 1,
        'network_g': dict(network or TINY_NAFNET),
        'path': {'models': str(tmp_path), 'training_states': str(tmp_path), **(path or {})},
        'train': {'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'betas': [0.9, 0.9]},
                  'scheduler': {'type': 'TrueCosineAnnealingLR', 'T_max': 10},
                  'pixel_opt': {'type': 'L1Loss'}, **(train or {})},
        'datasets': {'train': {'batch_size_per_gpu': 4, 'gt_size': 32}},
    }
    if val is not None:
        opt['val'] = val
    opt.update(top)
    return opt


def batch(n=2, size=32, **extra):
    g = torch.Generator().manual_seed(n * 100 + size)
    data = {'lq': torch.rand(n, 3, size, size, generator=g), 'gt': torch.rand(n, 3, size, size, generator=g),
            'lq_path': [f'img{i}.png' for i in range(n)]}
    data.update(extra)
    return data


def params_of(model):
    return [p.detach().clone() for p in model.net_g.parameters()]


def test_registration():
    assert 'ImageRestorationModel' in MODEL_REGISTRY
    assert 'PSNRLoss' in LOSS_REGISTRY


# ---------------------------------------------------------------- schedulers
def _lrs(scheduler_cls, n, lr=1.0, **kwargs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_cls(opt, **kwargs)
    values = [opt.param_groups[0]['lr']]
    for _ in range(n):
        opt.step()
        sched.step()
        values.append(opt.param_groups[0]['lr'])
    return values, sched, opt


def test_cyclic_cosine_matches_hand_values():
    # Restormer shape: constant for 2 iterations, then cosine 3e-4 -> 1e-6 over 4; held afterwards.
    values, _, _ = _lrs(CosineAnnealingRestartCyclicLR, 8, lr=3e-4, periods=[2, 4], restart_weights=[1, 1],
                        eta_mins=[3e-4, 1e-6])
    a, b = 3e-4, 1e-6
    expected = [a, a, a] + [b + 0.5 * (a - b) * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)] + [b, b]
    assert values == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # restart weight scales the start of a cycle
    values, _, _ = _lrs(CosineAnnealingRestartCyclicLR, 4, lr=1.0, periods=[2, 2], restart_weights=[1, 0.5],
                        eta_mins=[0.0, 0.0])
    assert values == pytest.approx([1.0, 0.5, 0.0, 0.5 * 0.5 * (1 + math.cos(math.pi / 2)), 0.0])


def test_true_cosine_equals_torch_until_t_max_then_holds():
    ours, _, _ = _lrs(TrueCosineAnnealingLR, 12, lr=1e-3, T_max=8, eta_min=1e-7)
    ref, _, _ = _lrs(torch.optim.lr_scheduler.CosineAnnealingLR, 8, lr=1e-3, T_max=8, eta_min=1e-7)
    assert ours[:9] == pytest.approx(ref, rel=1e-9)
    assert ours[9:] == pytest.approx([1e-7] * 4)


def test_linear_warmup_cosine_hand_values():
    values, _, _ = _lrs(LinearWarmupCosineAnnealingLR, 8, lr=2e-4, warmup_iters=3, max_iters=7)
    expected = [0.0, 1e-4, 2e-4] + [0.5 * 2e-4 * (1 + math.cos(math.pi * k / 4)) for k in range(5)] + [0.0]
    assert values == pytest.approx(expected, abs=1e-15)


def test_scheduler_state_resumes_with_weights_only():
    values, sched, opt = _lrs(CosineAnnealingRestartCyclicLR, 3, lr=1.0, periods=[3, 3], restart_weights=[1, 1],
                              eta_mins=[0.5, 0.0])
    buf = io.BytesIO()
    torch.save({'s': sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)['s']
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = CosineAnnealingRestartCyclicLR(opt2, periods=[3, 3], restart_weights=[1, 1], eta_mins=[0.5, 0.0])
    sched2.load_state_dict(state)
    for s, o in ((sched, opt), (sched2, opt2)):
        o.step()
        s.step()
    assert opt2.param_groups[0]['lr'] == pytest.approx(opt.param_groups[0]['lr'])
    assert opt.param_groups[0]['lr'] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))  # cycle 2, step 1 of 3


def test_scheduler_bad_options_name_the_key():
    with pytest.raises(ValueError, match='periods, restart_weights and eta_mins'):
        _lrs(CosineAnnealingRestartCyclicLR, 1, periods=[2, 2], restart_weights=[1], eta_mins=[0, 0])


def test_model_schedule_survives_basicsr_warmup(tmp_path):
    model = build_model(make_opt(tmp_path, train={'scheduler': {'type': 'TrueCosineAnnealingLR', 'T_max': 10}}))
    for it in range(1, 7):
        model.update_learning_rate(it, warmup_iter=4)
    # iteration 6 -> scheduler position 5, unaffected by the warm-up's overwriting of the lr
    assert model.get_current_learning_rate()[0] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 5 / 10)))


# ---------------------------------------------------------------- PSNR loss
def test_psnr_loss_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    loss = build_loss({'type': 'PSNRLoss', 'loss_weight': 0.5})(pred, target)
    mse = [((pred[i] - target[i]) ** 2).mean().item() for i in range(3)]
    expected = 0.5 * sum(10 / math.log(10) * math.log(m + 1e-8) for m in mse) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # minus the mean PSNR in dB for [0, 1] images
    psnr = [10 * math.log10(1 / m) for m in mse]
    assert build_loss({'type': 'PSNRLoss'})(pred, target).item() == pytest.approx(-sum(psnr) / 3, rel=1e-5)

    y_loss = build_loss({'type': 'PSNRLoss', 'toY': True})(pred, target)

    def luma(x):
        return (16 + 65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]) / 255

    mse_y = ((luma(pred) - luma(target)) ** 2).mean(dim=(1, 2))
    assert y_loss.item() == pytest.approx((10 / math.log(10) * torch.log(mse_y + 1e-8)).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- tiling / padding
def test_pad_to_multiple_modes():
    x = torch.arange(12.).view(1, 1, 3, 4)
    assert pad_to_multiple(x, 4, 'replicate')[0, 0, 3].tolist() == x[0, 0, 2].tolist()
    assert pad_to_multiple(x, 4, 'reflect')[0, 0, 3].tolist() == x[0, 0, 1].tolist()
    with pytest.raises(ValueError, match='val.pad_mode'):
        pad_to_multiple(x, 4, 'circular')


def test_tiled_forward_equals_untiled_for_local_network(seeded):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 3, 3, padding=1)).eval()  # receptive radius 3
    x = torch.rand(2, 3, 53, 70)
    with torch.no_grad():
        full = tiled_forward(net, x, tile=None, multiple=8)
        tiled = tiled_forward(net, x, tile=24, overlap=8, multiple=8)
        loose = tiled_forward(net, x, tile=24, overlap=0, multiple=8)
    assert full.shape == tiled.shape == x.shape
    assert (full - tiled).abs().max().item() < 1e-5
    assert (full - loose).abs().max().item() > 1e-3  # no overlap: tile seams differ (the test can fail)
    with pytest.raises(ValueError, match='multiple of the network size multiple 8'):
        tiled_forward(net, x, tile=20, overlap=4, multiple=8)


def test_model_test_tiled_equals_untiled_and_crops_back(tmp_path, seeded):
    local_nafnet = {'type': 'NAFNet', 'width': 8, 'middle_blk_num': 0, 'enc_blk_nums': [], 'dec_blk_nums': []}
    outputs = []
    torch.manual_seed(1)
    for val in ({'size_multiple': 8}, {'tile': {'size': 16, 'overlap': 8}, 'size_multiple': 8}):
        torch.manual_seed(1)
        model = build_model(make_opt(tmp_path, network=local_nafnet, val=val))
        model.feed_data({'lq': torch.rand(1, 3, 37, 45, generator=torch.Generator().manual_seed(3))})
        model._validating = True
        model.test()
        outputs.append(model.output)
        assert model.net_g.training  # test() restores train mode
    assert outputs[0].shape == (1, 3, 37, 45)
    assert (outputs[0] - outputs[1]).abs().max().item() < 1e-4


# ---------------------------------------------------------------- feed_data / training step
def test_feed_data_keeps_everything_and_progressive_crops(tmp_path):
    train = {'progressive': {'iters': [2, 2], 'mini_batch_sizes': [4, 2], 'gt_sizes': [16, 32]}}
    model = build_model(make_opt(tmp_path, train=train))
    data = batch(4, 32, task=torch.arange(4), task_name=['a', 'b', 'c', 'd'])
    model.update_learning_rate(1)
    model.feed_data(data)
    assert model.lq.shape == (4, 3, 16, 16) and model.gt.shape == (4, 3, 16, 16)
    assert model.data['task_name'] == ['a', 'b', 'c', 'd'] and model.data['task'].tolist() == [0, 1, 2, 3]
    model.update_learning_rate(3)
    model.feed_data(data)
    assert model.lq.shape == (2, 3, 32, 32) and model.data['task'].numel() == 2
    picked = model.data['task'].tolist()
    assert model.data['task_name'] == [['a', 'b', 'c', 'd'][i] for i in picked]
    assert torch.equal(model.lq, data['lq'][picked]) and torch.equal(model.gt, data['gt'][picked])
    model._validating = True  # validation batches are never cropped
    model.feed_data(batch(1, 40))
    assert model.lq.shape == (1, 3, 40, 40)


def test_progressive_options_are_checked(tmp_path):
    train = {'progressive': {'iters': [2], 'mini_batch_sizes': [8], 'gt_sizes': [16]}}
    with pytest.raises(ValueError, match='exceed datasets.train.batch_size_per_gpu=4'):
        build_model(make_opt(tmp_path, train=train))


def test_unknown_optimizer_and_scheduler_name_the_option(tmp_path):
    with pytest.raises(NotImplementedError, match='train.optim_g.type'):
        build_model(make_opt(tmp_path, train={'optim_g': {'type': 'Lion', 'lr': 1e-3}}))
    with pytest.raises(NotImplementedError, match='train.scheduler.type'):
        build_model(make_opt(tmp_path, train={'scheduler': {'type': 'OneCycle'}}))


def test_grad_clip_limits_the_update(tmp_path, seeded):
    train = {'optim_g': {'type': 'SGD', 'lr': 1.0}, 'use_grad_clip': True, 'grad_clip_norm': 0.01}
    model = build_model(make_opt(tmp_path, train=train))
    before = params_of(model)
    model.feed_data(batch())
    model.optimize_parameters(1)
    delta = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params_of(model), before)))
    assert delta.item() == pytest.approx(0.01, rel=1e-3)
    assert set(model.log_dict) == {'l_pix'}


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, seeded):
    model = build_model(make_opt(tmp_path, train={'max_nonfinite_steps': 2}))
    before = params_of(model)
    bad = batch()
    bad['lq'][0, 0, 0, 0] = float('nan')
    model.feed_data(bad)
    model.optimize_parameters(1)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    assert model.log_dict['nonfinite_steps'] == 1.0 and model.nonfinite_in_a_row == 1
    model.feed_data(batch())
    model.optimize_parameters(2)  # a good step resets the streak
    assert model.nonfinite_in_a_row == 0 and not all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    model.feed_data(bad)
    model.optimize_parameters(3)
    with pytest.raises(RuntimeError, match=r'2 non-finite steps in a row \(train.max_nonfinite_steps=2\)'):
        model.optimize_parameters(4)


def test_autocast_is_cuda_only_and_validated(tmp_path):
    model = build_model(make_opt(tmp_path, train={'autocast': 'fp16'}))
    assert model.autocast_dtype is None and model.grad_scaler is None  # CPU: ignored (logged)
    with pytest.raises(ValueError, match='train.autocast must be one of bf16, fp16'):
        build_model(make_opt(tmp_path, train={'autocast': 'fp8'}))


def test_mixup_mixes_lq_and_gt_with_one_weight(tmp_path):
    model = build_model(make_opt(tmp_path, train={'mixing_augs': {'mixup': True, 'mixup_beta': 1.2}}))
    data = batch(4, 16)
    torch.manual_seed(3)
    model.feed_data(data)
    lq, gt = data['lq'], data['gt']
    # out = lam * x + (1 - lam) * x[perm] for one lam and permutation shared by lq and gt
    found = False
    for perm in __import__('itertools').permutations(range(4)):
        perm = list(perm)
        denom = lq - lq[perm]
        mask = denom.abs() > 1e-3
        lam = ((model.lq - lq[perm])[mask] / denom[mask]).median()
        if torch.allclose(model.lq, lam * lq + (1 - lam) * lq[perm], atol=1e-5) and \
                torch.allclose(model.gt, lam * gt + (1 - lam) * gt[perm], atol=1e-5):
            found = 0 < lam.item() < 1
            break
    assert found


def test_ema_and_param_key_round_trip(tmp_path, seeded):
    model = build_model(make_opt(tmp_path, train={'ema_decay': 0.5}))
    model.feed_data(batch())
    model.optimize_parameters(1)
    model.model_ema(0.5)
    model.save(0, 1)
    saved = torch.load(tmp_path / 'net_g_1.pth', weights_only=True)
    assert set(saved) == {'params', 'params_ema'}
    state = torch.load(tmp_path / '1.state', weights_only=True)
    assert state['iter'] == 1 and len(state['optimizers']) == 1 and len(state['schedulers']) == 1
    test_opt = make_opt(tmp_path, is_train=False, path={'pretrain_network_g': str(tmp_path / 'net_g_1.pth'),
                                                        'param_key': 'params_ema'})
    loaded = build_model(test_opt)
    for k, v in loaded.net_g.state_dict().items():
        assert torch.equal(v, model.net_g_ema.state_dict()[k])


# ---------------------------------------------------------------- crash-safe saving
class ExplodingPickle:
    def __reduce__(self):
        raise OSError('disk full (simulated)')


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    target = tmp_path / 'net_g_5.pth'
    atomic_torch_save({'params': {'w': torch.ones(2)}}, target)
    with pytest.raises(OSError, match='simulated'):
        atomic_torch_save({'params': {'w': torch.zeros(2)}, 'bad': ExplodingPickle()}, target)
    assert torch.equal(torch.load(target, weights_only=True)['params']['w'], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ['net_g_5.pth']  # no temporary left behind


def test_failed_network_save_skips_the_training_state(tmp_path, monkeypatch):
    model = build_model(make_opt(tmp_path))
    model.save(0, 2)
    good = torch.load(tmp_path / 'net_g_2.pth', weights_only=True)['params']
    monkeypatch.setattr(irm, 'SAVE_RETRY_DELAY', 0)

    def failing_save(obj, path):
        raise OSError('no space left on device (simulated)')

    monkeypatch.setattr(irm, 'atomic_torch_save', failing_save)
    with torch.no_grad():
        for p in model.net_g.parameters():
            p.add_(1)
    model.save(0, 2)
    model.save(0, 4)
    assert not (tmp_path / '4.state').exists() and not (tmp_path / 'net_g_4.pth').exists()
    after = torch.load(tmp_path / 'net_g_2.pth', weights_only=True)['params']
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert not glob.glob(str(tmp_path / '.*.tmp'))


# ---------------------------------------------------------------- loading
class CustomHparams:
    """Stands for arbitrary pickled objects in third-party checkpoints."""

    def __init__(self):
        self.lr = 2e-4


@pytest.mark.parametrize('layout', ['plain', 'ddp', 'lightning', 'params_ema'])
def test_load_network_layouts(tmp_path, layout, seeded):
    from basicsr.archs import build_network
    source = build_network(TINY_NAFNET)
    sd = source.state_dict()
    obj = {'plain': sd, 'ddp': {'module.' + k: v for k, v in sd.items()},
           'lightning': {'state_dict': {'net.' + k: v for k, v in sd.items()}, 'epoch': 3},
           'params_ema': {'params_ema': sd, 'params': {k: torch.zeros_like(v) for k, v in sd.items()}}}[layout]
    path = tmp_path / 'w.pth'
    torch.save(obj, path)
    extra = {'param_key_g': 'params_ema'} if layout == 'params_ema' else {}
    model = build_model(make_opt(tmp_path, is_train=False, path={'pretrain_network_g': str(path), **extra}))
    assert all(torch.equal(v, sd[k]) for k, v in model.net_g.state_dict().items())


def test_load_network_mismatch_names_option_and_keys(tmp_path):
    from basicsr.archs import build_network
    sd = build_network({**TINY_NAFNET, 'width': 16}).state_dict()
    torch.save({'params': sd}, tmp_path / 'w16.pth')
    opt = make_opt(tmp_path, is_train=False, path={'pretrain_network_g': str(tmp_path / 'w16.pth')})
    with pytest.raises(CheckpointError, match=r"option 'path.pretrain_network_g'.*\n.*shape difference") as err:
        build_model(opt)
    assert 'intro.weight: network (8, 3, 3, 3) vs checkpoint (16, 3, 3, 3)' in str(err.value)
    opt['path']['strict_load_g'] = False  # non-strict: loads what fits
    build_model(opt)


def test_pickled_objects_refused_unless_trusted(tmp_path):
    from basicsr.archs import build_network
    sd = build_network(TINY_NAFNET).state_dict()
    path = tmp_path / 'lightning.ckpt'
    torch.save({'state_dict': {'net.' + k: v for k, v in sd.items()}, 'hyper_parameters': CustomHparams()}, path)
    opt = make_opt(tmp_path, is_train=False, path={'pretrain_network_g': str(path)})
    with pytest.raises(CheckpointError, match='trust_checkpoint: true'):
        build_model(opt)
    model = build_model(make_opt(tmp_path, is_train=False, path={'pretrain_network_g': str(path)},
                                 trust_checkpoint=True))
    assert all(torch.equal(v, sd[k]) for k, v in model.net_g.state_dict().items())


def test_num_gpu_without_cuda_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match='set num_gpu: 0'):
        build_model(make_opt(tmp_path, num_gpu=1))


def test_strip_local_rank(monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert strip_local_rank(['-opt', 'x.yml', '--local-rank=1', '--launcher', 'pytorch']) == \
        ['-opt', 'x.yml', '--launcher', 'pytorch']
    assert os.environ['LOCAL_RANK'] == '1'
    assert strip_local_rank(['--local_rank', '0', '-opt', 'y.yml']) == ['-opt', 'y.yml']


def test_force_yml_is_parsed_safely():
    from perceive_ir_plugin.utils.launch import apply_overrides, split_force_yml
    rest, entries = split_force_yml(['-opt', 'x.yml', '--force_yml', 'train:ema_decay=0.999',
                                     'train:optim_g:betas=[0.9, 0.99]', '--auto_resume'])
    assert rest == ['-opt', 'x.yml', '--auto_resume']
    opt = {'train': {'ema_decay': 0, 'optim_g': {'betas': [0.9, 0.9], 'lr': 1e-3}}, 'name': 'a'}
    apply_overrides(opt, entries + ['name=__import__("os").getcwd()', 'train:optim_g:lr=!!float 2e-4'])
    assert opt['train'] == {'ema_decay': 0.999, 'optim_g': {'betas': [0.9, 0.99], 'lr': 2e-4}}
    assert opt['name'] == '__import__("os").getcwd()'  # a string, never evaluated
    with pytest.raises(KeyError, match="'train:ema_decy' does not exist; did you mean 'train:ema_decay'"):
        apply_overrides(opt, ['train:ema_decy=0.5'])


def test_auto_resume_looks_under_root_and_loads_on_cpu(tmp_path, monkeypatch):
    from perceive_ir_plugin.utils.launch import load_resume_state
    root = tmp_path / 'root'
    states = root / 'experiments' / 'exp' / 'training_states'
    states.mkdir(parents=True)
    for it in (4, 12, 8):
        torch.save({'epoch': 0, 'iter': it, 'optimizers': [], 'schedulers': []}, states / f'{it}.state')
    (states / '.16.state.abc.tmp').write_bytes(b'partial write of a killed run')
    monkeypatch.chdir(tmp_path)  # the working directory is not the root
    opt = {'name': 'exp', 'auto_resume': True, 'root_path': str(root), 'network_g': {'type': 'X'},
           'path': {'training_states': str(states), 'models': str(root / 'experiments' / 'exp' / 'models'),
                    'resume_state': None, 'param_key_g': 'params_ema'}}
    state = load_resume_state(opt)
    assert state['iter'] == 12 and opt['path']['resume_state'] == str(states / '12.state')
    assert opt['path']['pretrain_network_g'].endswith('net_g_12.pth') and opt['path']['param_key_g'] == 'params'
