"""Stage-2 model: option files, proxies, epoch probe, a tiny end-to-end run, backbone retrofit."""
import copy
import os

import pytest
import torch
import yaml

from basicsr.archs import build_network
from basicsr.models import build_model
from basicsr.utils.options import ordered_yaml
from perceive_ir_plugin.archs.perceiveir_arch import count_trainable_parameters
from perceive_ir_plugin.data.demo_data import make_demo_packs
from perceive_ir_plugin.data.folds import fold_of
from perceive_ir_plugin.data.lmdb_io import LmdbImageWriter
from perceive_ir_plugin.models.dpl_probe import build_probe_set
from perceive_ir_plugin.models.proxies import ProxyBank, psnr_per_sample


# Tiny tensors: one intra-op thread is faster, and much faster on a loaded machine.
pytestmark = pytest.mark.usefixtures('one_torch_thread')


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETS = ('perceiveirnet', 'restormer', 'nafnet', 'promptir')
TASKS3 = ['denoise', 'derain', 'dehaze']
TINY_RESTORMER = dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])


def load_options(kind, setting, net):
    with open(os.path.join(REPO, 'options', kind, 'PerceiveIR', f'{setting}_{net}.yml')) as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


@pytest.fixture(scope='module')
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp('stage2_packs')
    make_demo_packs(str(root), tasks=TASKS3, splits=('train', ), max_side=40)
    return str(root)


def _save_tiny_restormer(path, seed):
    torch.manual_seed(seed)
    net = build_network(dict(TINY_RESTORMER))
    torch.save({'params': net.state_dict()}, path)
    return net


# ------------------------------------------------------------------------------ option files
@pytest.mark.parametrize('setting', ['3task', '5task'])
def test_option_files_carry_the_release_numbers(setting):
    for net in NETS:
        opt = load_options('train', setting, net)
        assert opt['model_type'] == 'PerceiveIRModel'
        train = opt['train']
        assert train['total_iter'] == 500000 and train['autocast'] == 'bf16'
        assert train['optim_g'] == {'type': 'AdamW', 'lr': 2e-4, 'weight_decay': 1e-4, 'betas': [0.9, 0.999]}
        assert train['scheduler'] == {'type': 'TrueCosineAnnealingLR', 'T_max': 500000, 'eta_min': 1e-6}
        weights = {k: train[k]['loss_weight'] for k in ('pixel_opt', 'contrastive_opt', 'clip_opt', 'dpl_opt')}
        assert weights == {'pixel_opt': 1.0, 'contrastive_opt': 0.1, 'clip_opt': 0.05, 'dpl_opt': 0.1}
        assert train['contrastive_opt']['temperature'] == 0.1 and train['clip_opt']['logit_scale'] is None
        assert train['dpl_opt']['layer_weights'] == pytest.approx([1 / 12, 1 / 6, 1 / 3, 1])
        assert (train['dpl_opt']['hard_alpha'], train['dpl_opt']['easy_alpha'], train['dpl_opt']['lq_weight']) == (
            1.25, 0.75, 2.0)
        ds = opt['datasets']['train']
        assert ds['gt_size'] == 256 and ds['use_hflip'] and ds['use_vflip'] and ds['return_lq_pos']
        assert ds['batch_size_per_gpu'] * opt['num_gpu'] == (8 if setting == '3task' else 4)
        expected = {'denoise': 12, 'derain': 360, 'dehaze': 1}
        if setting == '5task':
            expected.update(deblur=30, lowlight=140)
        assert dict(ds['tasks']) == expected
        test = load_options('test', setting, net)
        assert test['network_g'] == opt['network_g'] and test['model_type'] == 'PerceiveIRModel'
        assert opt['network_g'] == load_options('train', '3task', net)['network_g']
        if net != 'perceiveirnet':
            assert opt['network_g']['type'] == 'PerceiveIRWrapper' and opt['path']['pretrain_network_backbone']


@pytest.mark.parametrize('net', NETS)
def test_option_networks_build(net):
    net_opt = copy.deepcopy(load_options('train', '3task', net)['network_g'])
    net_opt['sgm_weights'] = None  # placeholder path: build with a random DINOv2 on the meta device
    net_opt['sgm_allow_random'] = True
    with torch.device('meta'):
        model = build_network(net_opt)
    if net == 'perceiveirnet':
        assert count_trainable_parameters(model) == 33_901_111
    else:
        assert type(model.backbone).__name__ == net_opt['backbone']['type']
        assert len(model.pgm) == len(net_opt['sgm_layers'])
    assert model.semantic_encoder.embed_dim == 768


def _tiny_options(tmp_path, packs, net='perceiveirnet'):
    """The real 3-task option file with tiny sizes and local tiny weights."""
    opt = load_options('train', '3task', net)
    opt.update(num_gpu=0, dist=False, rank=0, world_size=1, is_train=True, root_path=str(tmp_path))
    opt['path'] = {'experiments_root': str(tmp_path), 'models': str(tmp_path / 'models'),
                   'training_states': str(tmp_path / 'states'), 'log': str(tmp_path), 'visualization': str(tmp_path),
                   'pretrain_network_g': None, 'strict_load_g': True}
    os.makedirs(opt['path']['models'], exist_ok=True)
    ds = opt['datasets']['train']
    ds.update(dataroot=packs, tasks={'denoise': 1, 'derain': 1, 'dehaze': 1}, gt_size=32, phase='train',
              num_worker_per_gpu=0, prefetch_mode=None, pin_memory=False)
    opt['datasets'] = {'train': ds}
    if net == 'perceiveirnet':
        opt['network_g'] = dict(type='PerceiveIRNet', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                heads=[1, 1, 2, 2], sgm_config='tiny', sgm_allow_random=True, cfe_dim=8,
                                cfe_channels=[4, 4, 8, 8])
    train = opt['train']
    train['optim_g']['lr'] = 1e-3
    train['clip_opt']['perceiver'] = {'type': 'QualityPerceiver', 'clip_model': 'perceive-ir-tiny-clip'}
    train['dpl_opt'].update(vgg_weights=None, allow_random_vgg=True)
    _save_tiny_restormer(tmp_path / 'fold0.pth', 1)
    _save_tiny_restormer(tmp_path / 'fold1.pth', 2)
    _save_tiny_restormer(tmp_path / 'promptir_stand_in.pth', 3)
    medium, other = train['proxies']
    medium['network'] = dict(TINY_RESTORMER)
    medium['fold_checkpoints'] = [str(tmp_path / 'fold0.pth'), str(tmp_path / 'fold1.pth')]
    other['network'] = dict(TINY_RESTORMER)
    other['checkpoint'] = str(tmp_path / 'promptir_stand_in.pth')
    train['dpl_probe'].update(per_task=2, candidates=4, crop=32, batch_size=3)
    opt.pop('val', None)
    return opt


def _batches(opt, n):
    from basicsr.data import build_dataset
    dataset = build_dataset(opt['datasets']['train'])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    return dataset, [b for _, b in zip(range(n), loader)]


def test_tiny_stage2_run_lowers_total_loss_and_keeps_frozen_parts_frozen(tmp_path, packs):
    torch.manual_seed(0)
    opt = _tiny_options(tmp_path, packs)
    model = build_model(opt)
    dataset, (batch, ) = _batches(opt, 1)
    assert model.iters_per_epoch() == len(dataset) // 2  # BasicSR drops the last incomplete batch
    # A batch with two tasks so that L_cl has negatives.
    batch = {k: (v[[0, 1]] if torch.is_tensor(v) else v) for k, v in batch.items()}
    if batch['task'][0] == batch['task'][1]:
        other = next(dataset[i] for i in range(len(dataset)) if dataset[i]['task'] != batch['task'][0])
        for k, v in other.items():
            batch[k] = torch.stack([batch[k][0], v]) if torch.is_tensor(v) else [batch[k][0], v]
    totals = []
    for it in range(1, 7):
        model.update_learning_rate(it)
        model.feed_data(copy.copy(batch))
        model.optimize_parameters(it)
        totals.append(model.log_dict['l_total'])
    logged = model.log_dict
    assert {'l_pix', 'l_cl', 'l_clip', 'l_dpl', 'dpl_hard', 'l_total', 'dpl_ref_psnr'} <= set(logged)
    assert logged['l_cl'] > 0 and 0 < logged['l_clip'] < 1 and logged['l_dpl'] > 0
    assert totals[-1] < totals[0], totals
    # The probe ran once (iteration 1 starts epoch 0) and stays until the next epoch.
    assert model._probe_epoch == 0 and model.reference_psnr == logged['dpl_ref_psnr']
    # Frozen parts: no gradients, not in net_g's parameters or saved params.
    net = model.net_g
    frozen = {'dino': net.semantic_encoder, 'vgg': model.cri_dpl.vgg, 'clip': model.cri_clip.perceiver}
    for name, module in frozen.items():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
    for proxy in model.proxies.proxies:
        for proxy_net in proxy.nets:
            assert all(p.grad is None and not p.requires_grad for p in proxy_net.parameters())
    ids = {id(p) for p in model.optimizer_g.param_groups[0]['params']}
    assert ids == {id(p) for p in net.parameters()}
    model.save(0, 6)
    saved = torch.load(tmp_path / 'models' / 'net_g_6.pth')['params']
    assert set(saved) == set(net.state_dict()) and not any('vit' in k or 'sgm' in k for k in saved)


def test_probe_runs_at_every_epoch_start_and_after_resume(tmp_path, packs, monkeypatch):
    opt = _tiny_options(tmp_path, packs)
    opt['train'].pop('clip_opt')
    opt['train'].pop('contrastive_opt')
    opt['train']['dpl_probe']['interval'] = 2
    model = build_model(opt)
    calls = []

    def fake_probe(current_iter=None):
        calls.append(current_iter)
        model.reference_psnr = 20.0

    monkeypatch.setattr(model, 'update_reference_psnr', fake_probe)
    _, (batch, ) = _batches(opt, 1)
    for it in range(1, 5):
        model.feed_data(copy.copy(batch))
        model.optimize_parameters(it)
    assert calls == [1, 3]
    model.resume_training({'optimizers': [model.optimizer_g.state_dict()],
                           'schedulers': [s.state_dict() for s in model.schedulers], 'epoch': 5, 'iter': 10})
    for it in range(11, 14):
        model.feed_data(copy.copy(batch))
        model.optimize_parameters(it)
    assert calls == [1, 3, 11, 13]  # BasicSR restarts the epoch at the resumed iteration


def test_probe_set_follows_the_spec_recipe(packs):
    probe = build_probe_set(packs, TASKS3, per_task=6, candidates=5, crop=32, sigmas=(15, 25, 50))
    assert probe['lq'].shape == (6 + 5 + 5, 3, 32, 32)  # demo packs have 5 candidates per task
    again = build_probe_set(packs, TASKS3, per_task=6, candidates=5, crop=32)
    assert torch.equal(probe['lq'], again['lq'])
    noisy = [i for i, t in enumerate(probe['task']) if t == 'denoise']
    residual = (probe['lq'][noisy] - probe['gt'][noisy]).flatten(1).std(dim=1)
    assert residual[:2].mean() < residual[2:4].mean() < residual[4:6].mean()  # 2 crops per sigma 15/25/50
    few = build_probe_set(packs, ['derain'], per_task=3, candidates=5, crop=32)
    psnr_all = psnr_per_sample(probe['lq'][6:11], probe['gt'][6:11])
    picked = psnr_per_sample(few['lq'], few['gt'])
    # evenly spaced quantiles of the input PSNR: the lowest, the median and the highest
    assert torch.allclose(picked, torch.stack([psnr_all.min(), psnr_all.median(), psnr_all.max()]), atol=1e-4)


# ------------------------------------------------------------------------------ proxies
def test_proxy_bank_folds_tasks_and_packs(tmp_path, packs):
    nets = [_save_tiny_restormer(tmp_path / f'f{k}.pth', 10 + k).eval() for k in range(2)]
    keys = ['a', 'b', 'c', 'd']
    pack_dir = tmp_path / 'proxy_pack'
    rng = torch.Generator().manual_seed(0)
    full = {k: (torch.rand(20, 24, 3, generator=rng) * 255).to(torch.uint8).numpy() for k in keys}
    writer = LmdbImageWriter(str(pack_dir / 'derain.lmdb'), fmt='png', task='derain')
    for k in keys:
        writer.put(k, full[k])
    writer.close()
    bank = ProxyBank([
        {'name': 'medium', 'network': dict(TINY_RESTORMER), 'fold_checkpoints': [str(tmp_path / 'f0.pth'),
                                                                                str(tmp_path / 'f1.pth')]},
        {'name': 'rain_pack', 'tasks': ['derain'], 'pack': str(pack_dir)},
    ])
    lq = torch.rand(4, 3, 16, 16)
    data = {'task': torch.tensor([1, 1, 0, 2]), 'key': [f'derain/{k}' for k in keys[:2]] + ['denoise/c', 'dehaze/d'],
            'crop': torch.tensor([[2, 3, 0, 0], [0, 8, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]), 'lq': lq}
    out, mask = bank(data, lq)
    assert out.shape == (4, 2, 3, 16, 16) and mask.tolist() == [[1, 1], [1, 1], [1, 0], [1, 0]]
    with torch.no_grad():
        for i, key in enumerate(data['key']):
            fold = fold_of(*key.split('/', 1), n_folds=2)
            assert torch.allclose(out[i, 0], nets[fold](lq[i:i + 1])[0].clamp(0, 1), atol=1e-6)
    expected0 = torch.from_numpy(full['a'][2:18, 3:19].copy()).permute(2, 0, 1).float() / 255
    expected1 = torch.from_numpy(full['b'][0:16, 8:24][::-1, ::-1].copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(out[0, 1], expected0) and torch.allclose(out[1, 1], expected1)
    assert out[2, 1].abs().sum() == 0  # invalid task: not run, zeros, m_k = 0


def test_proxy_option_errors(tmp_path):
    with pytest.raises(ValueError, match='exactly one of'):
        ProxyBank([{'name': 'x', 'network': dict(TINY_RESTORMER)}])
    with pytest.raises(ValueError, match="cannot serve 'denoise'"):
        ProxyBank([{'name': 'x', 'pack': str(tmp_path)}])
    with pytest.raises(ValueError, match="Unknown task 'rain'"):
        ProxyBank([{'name': 'x', 'tasks': ['rain'], 'pack': str(tmp_path)}])
    with pytest.raises(ValueError, match='unknown option'):
        ProxyBank([{'name': 'x', 'pack': str(tmp_path), 'weights': 'y'}])
    with pytest.raises(FileNotFoundError, match=r"train.proxies\[0\].checkpoint"):
        ProxyBank([{'name': 'x', 'network': dict(TINY_RESTORMER), 'checkpoint': str(tmp_path / 'none.pth')}])


# ------------------------------------------------------------------------------ retrofit
def test_pretrain_network_backbone_gives_the_backbone_output(tmp_path, packs):
    bare = _save_tiny_restormer(tmp_path / 'official.pth', 5).eval()
    opt = _tiny_options(tmp_path, packs, net='restormer')
    opt['network_g'].update(backbone=dict(TINY_RESTORMER), sgm_config='tiny', sgm_weights=None, sgm_allow_random=True,
                            cfe_dim=8,
                            cfe_channels=[4, 4, 8, 8])
    opt['path']['pretrain_network_backbone'] = str(tmp_path / 'official.pth')
    opt['is_train'] = False
    opt['val'] = {'pad_mode': 'replicate'}
    model = build_model(opt)
    lq = torch.rand(1, 3, 20, 28)  # not a multiple of 8: the test path pads and crops back
    model.feed_data({'lq': lq})
    model.test()
    padded = torch.nn.functional.pad(lq, (0, 4, 0, 4), mode='replicate')
    with torch.no_grad():
        assert torch.allclose(model.output, bare(padded)[..., :20, :28], atol=1e-6)
    opt['network_g'] = dict(TINY_RESTORMER)
    with pytest.raises(ValueError, match='needs network_g.type PerceiveIRWrapper'):
        build_model(opt)
