"""Two-process Perceive-IR stage-2 training (torchrun, gloo on CPU) on tiny demo data.

The run is the real entry point (``torchrun --nproc_per_node=2 -m perceive_ir_plugin.train -opt X
--launcher pytorch``). A ``sitecustomize`` module written into the run's PYTHONPATH (active only in
the torchrun workers, which have ``RANK`` set) records on every rank, without changing behaviour:

* every call of the contrastive loss's ``gather_negatives``: local batch and gathered batch size;
* every ``reduce_loss_dict`` call of the model (once per optimisation step): the rank's local loss
  terms and a checksum of its trainable parameters right after the optimizer step;
* every checkpoint write of the model (``atomic_torch_save``): the file name.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from perceive_ir_plugin.demo.pipeline import DemoConfig, build_options

ITERS = 3
BATCH = 2  # per rank

PROBE = r'''
import json, os
if os.environ.get('RANK') is not None and os.environ.get('PIR_PROBE_DIR'):
    import torch
    import perceive_ir_plugin.losses.degradation_contrastive_loss as cl_mod
    from basicsr.models.base_model import BaseModel

    _rank = int(os.environ['RANK'])
    _path = os.path.join(os.environ['PIR_PROBE_DIR'], f'rank{_rank}.jsonl')

    def _write(record):
        record['rank'] = _rank
        with open(_path, 'a') as f:
            f.write(json.dumps(record) + '\n')

    _gather = cl_mod.gather_negatives

    def gather_negatives(z, task):
        bank, bank_task = _gather(z, task)
        _write({'event': 'gather', 'local': int(z.shape[0]), 'gathered': int(bank.shape[0]),
                'tasks': [int(t) for t in bank_task]})
        return bank, bank_task

    cl_mod.gather_negatives = gather_negatives
    _reduce = BaseModel.reduce_loss_dict

    def reduce_loss_dict(self, loss_dict):
        local = {k: float(v.detach().float().mean()) for k, v in loss_dict.items()}
        net = self.get_bare_model(self.net_g)
        with torch.no_grad():
            checksum = float(sum(p.double().sum() * (i + 1) for i, p in
                                 enumerate(q for q in net.parameters() if q.requires_grad)))
        out = _reduce(self, loss_dict)
        _write({'event': 'step', 'local': local, 'checksum': checksum,
                'reduced': {k: float(v) for k, v in out.items()}})
        return out

    BaseModel.reduce_loss_dict = reduce_loss_dict

    import perceive_ir_plugin.models.image_restoration_model as irm
    _save = irm.atomic_torch_save

    def atomic_torch_save(obj, path, *args, **kwargs):
        _write({'event': 'save', 'path': os.path.basename(str(path))})
        return _save(obj, path, *args, **kwargs)

    irm.atomic_torch_save = atomic_torch_save
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    from basicsr.archs import build_network
    from perceive_ir_plugin.data.demo_data import make_demo_packs

    root = tmp_path_factory.mktemp('ddp')
    cfg = DemoConfig(out=str(root / 'demo'), device='cpu', quick=True, progress=False)
    make_demo_packs(cfg.dataroot, splits=('train', ), max_side=32)
    medium = []
    for k in range(2):  # random tiny proxies (the demo's medium restorers, untrained)
        torch.manual_seed(k)
        net = build_network(dict(build_options(cfg)['medium_fold0']['network_g']))
        medium.append(str(root / f'medium{k}.pth'))
        torch.save({'params': net.state_dict()}, medium[-1])
    opt = build_options(cfg, {'medium': medium})['stage2_perceiveir']
    opt['name'] = 'ddp_perceiveir'
    opt['train']['total_iter'] = ITERS
    opt['train']['scheduler']['T_max'] = ITERS
    opt['datasets']['train']['batch_size_per_gpu'] = BATCH
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2)
    opt_file = root / 'stage2.yml'
    opt_file.write_text(yaml.safe_dump(opt, sort_keys=False))

    probe_dir = root / 'probe'
    probe_dir.mkdir()
    (probe_dir / 'sitecustomize.py').write_text(PROBE)
    torchrun = shutil.which('torchrun', path=os.path.dirname(sys.executable))
    assert torchrun, 'torchrun is installed with torch'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PIR_PROBE_DIR': str(probe_dir),
           'PYTHONPATH': os.pathsep.join([str(probe_dir)] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
    cmd = [torchrun, '--nproc_per_node=2', '--master_addr', '127.0.0.1', '--master_port', str(_free_port()), '-m',
           'perceive_ir_plugin.train', '-opt', str(opt_file), '--launcher', 'pytorch']
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = {}
    for rank in (0, 1):
        path = probe_dir / f'rank{rank}.jsonl'
        assert path.is_file(), f'rank {rank} recorded nothing:\n{proc.stderr[-3000:]}'
        records[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    return {'root': root, 'records': records, 'exp': root / 'experiments' / 'ddp_perceiveir', 'proc': proc}


def _steps(records):
    return [r for r in records if r['event'] == 'step']


def test_both_ranks_train_the_same_model_and_agree_on_the_loss(ddp_run):
    steps = {rank: _steps(recs) for rank, recs in ddp_run['records'].items()}
    assert len(steps[0]) == len(steps[1]) == ITERS
    for s0, s1 in zip(steps[0], steps[1]):
        # DDP keeps the replicas identical after every optimizer step.
        assert s0['checksum'] == pytest.approx(s1['checksum'], rel=1e-9, abs=1e-9)
        assert set(s0['local']) == set(s1['local']) and {'l_pix', 'l_cl', 'l_clip', 'l_dpl'} <= set(s0['local'])
        # Different data per rank, one loss: rank 0 logs the mean of both ranks' local terms.
        for key, value in s0['reduced'].items():
            assert value == pytest.approx((s0['local'][key] + s1['local'][key]) / 2, rel=1e-5, abs=1e-7)
    log = next(ddp_run['exp'].glob('train_*.log')).read_text()
    assert 'World size (gpu number): 2' in log
    last = steps[0][-1]['reduced']
    assert f"l_pix: {last['l_pix']:.4e}" in log


def test_contrastive_negatives_are_gathered_across_ranks(ddp_run):
    for rank, recs in ddp_run['records'].items():
        gathers = [r for r in recs if r['event'] == 'gather']
        assert len(gathers) >= ITERS, f'rank {rank}: gather_negatives called {len(gathers)} times'
        for g in gathers:
            assert g['local'] == BATCH and g['gathered'] == 2 * BATCH
    # Both ranks see the same global bank of task ids at the same step.
    g0 = [r['tasks'] for r in ddp_run['records'][0] if r['event'] == 'gather']
    g1 = [r['tasks'] for r in ddp_run['records'][1] if r['event'] == 'gather']
    assert g0 == g1


def test_checkpoints_are_written_once(ddp_run):
    models = sorted(os.listdir(ddp_run['exp'] / 'models'))
    states = sorted(os.listdir(ddp_run['exp'] / 'training_states'))
    # save_checkpoint_freq 2 with 3 iterations: iteration 2, plus BasicSR's final "latest".
    nets = [m for m in models if m.startswith('net_g_')]
    assert nets == ['net_g_2.pth', 'net_g_latest.pth'], models
    assert states == ['2.state'], states
    assert not [m for m in models + states if 'tmp' in m or m.startswith('.')]
    # The saved weights are the replicas' final weights (rank 0 wrote them once; no frozen parts).
    params = torch.load(ddp_run['exp'] / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert not any(k.startswith(('sgm', 'dino', 'clip', 'vgg', 'proxies')) for k in params), list(params)[:5]
    # Exactly one write per file, all by rank 0.
    saves = {rank: [r['path'] for r in recs if r['event'] == 'save'] for rank, recs in ddp_run['records'].items()}
    assert saves[1] == []
    assert sorted(saves[0]) == sorted(set(saves[0])) == sorted(nets + states)
