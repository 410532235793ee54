"""BasicSR train/test pipelines through the plugin's entry points, checkpoint retrofit and convert."""
import math
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr
from basicsr.models.base_model import BaseModel
from basicsr.utils import img2tensor, tensor2img

from perceive_ir_plugin import cli
from perceive_ir_plugin.tools.convert import convert_checkpoint
from perceive_ir_plugin.utils.checkpoint import CheckpointError
from perceive_ir_plugin.utils.tiling import pad_to_multiple
from log_capture import Capture  # tests/ helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'options', 'tiny')
TINY_PROMPTIR = {'type': 'PromptIR', 'dim': 48, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                 'decoder': True}


def make_paired_folders(root, splits=(('train', 4, (40, 40)), ('val', 2, (36, 44)))):
    """Paired PNG folders ``root/datasets/tiny/<split>/{gt,lq}`` (LQ = GT + noise), as the tiny options expect."""
    rng = np.random.default_rng(0)
    for split, count, (h, w) in splits:
        for sub in ('gt', 'lq'):
            os.makedirs(os.path.join(root, 'datasets', 'tiny', split, sub), exist_ok=True)
        for i in range(count):
            base = cv2.resize(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8), (w, h))
            noisy = np.clip(base.astype(int) + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(os.path.join(root, 'datasets', 'tiny', split, 'gt', f'{i:03d}.png'), base)
            cv2.imwrite(os.path.join(root, 'datasets', 'tiny', split, 'lq', f'{i:03d}.png'), noisy)


def write_options(src, dst, edit=None):
    with open(src, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    if edit:
        edit(opt)
    with open(dst, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f)
    return str(dst)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    make_paired_folders(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_has_foundation_commands():
    names = cli.build_parser()._subparsers._group_actions[0].choices
    assert {'train', 'test', 'convert'} <= set(names)


@pytest.mark.parametrize('name', ['NAFNet_train_tiny.yml', 'Restormer_train_tiny.yml'])
def test_train_writes_checkpoints_and_resumes(workdir, name):
    from perceive_ir_plugin.train import main as train_main
    opt_file = os.path.join(TINY, name)
    with Capture() as log:
        assert train_main(['-opt', opt_file]) == 0
    exp = workdir / 'experiments' / yaml.safe_load(open(opt_file))['name']
    last = yaml.safe_load(open(opt_file))['train']['total_iter']
    assert sorted(os.listdir(exp / 'training_states')) == sorted(f'{i}.state' for i in range(2, last + 1, 2))
    assert re.search(r'# psnr: \d+\.\d{4}', log.text())  # validation ran
    if name.startswith('Restormer'):
        assert 'Progressive training from iteration 3: patch size 32, batch size 1' in log.text()

    # Simulate a crash after iteration last-2: its newest files are gone, then --auto_resume (on CPU).
    os.remove(exp / 'training_states' / f'{last}.state')
    os.remove(exp / 'models' / f'net_g_{last}.pth')
    before = torch.load(exp / 'models' / f'net_g_{last - 2}.pth', weights_only=True)['params']
    with Capture() as log:
        assert cli.main(['train', '-opt', opt_file, '--auto_resume']) == 0
    assert f'Resuming training from epoch: {(last - 2) // 2 - 1}, iter: {last - 2}.' in log.text()
    iters = [int(m) for m in re.findall(r'iter:\s+(\d+),', log.text())]
    assert iters == list(range(last - 1, last + 1))  # continues the count, no restart from 1
    state = torch.load(exp / 'training_states' / f'{last}.state', weights_only=True)
    assert state['iter'] == last
    after = torch.load(exp / 'models' / f'net_g_{last}.pth', weights_only=True)['params']
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _direct_psnr_and_images(weights, root):
    """Restore the tiny val set outside BasicSR: reflect-pad to 8, run, crop; PSNR like BasicSR's metric."""
    net = build_network(TINY_PROMPTIR)
    net.load_state_dict(weights)
    net.eval()
    psnrs, images = [], {}
    folder = os.path.join(root, 'datasets', 'tiny', 'val')
    for name in sorted(os.listdir(os.path.join(folder, 'lq'))):
        lq = cv2.imread(os.path.join(folder, 'lq', name)).astype(np.float32) / 255.
        gt = cv2.imread(os.path.join(folder, 'gt', name))
        x = img2tensor(lq, bgr2rgb=True, float32=True).unsqueeze(0)
        with torch.no_grad():
            out = net(pad_to_multiple(x, 8, 'reflect'))[..., :x.shape[-2], :x.shape[-1]]
        restored = tensor2img([out])
        images[name] = restored
        psnrs.append(calculate_psnr(restored, gt, crop_border=0))
    return sum(psnrs) / len(psnrs), images


def _logged_psnr(text):
    return float(re.findall(r'# psnr: (-?\d+\.\d+)', text)[-1])


def test_promptir_lightning_checkpoint_retrofit_round_trip(workdir):
    torch.manual_seed(0)
    net = build_network(TINY_PROMPTIR)
    with torch.no_grad():  # make the output depend on the weights in a visible way
        for p in net.parameters():
            p.mul_(1.5)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    os.makedirs('experiments/pretrained_models')
    ckpt = 'experiments/pretrained_models/PromptIR_tiny.ckpt'  # the path PromptIR_test_tiny.yml names
    torch.save({'state_dict': {'net.' + k: v for k, v in weights.items()}, 'epoch': 0, 'global_step': 0,
                'pytorch-lightning_version': '2.0.1', 'optimizer_states': [], 'lr_schedulers': []}, ckpt)
    expected_psnr, expected_images = _direct_psnr_and_images(weights, str(workdir))

    # 1) the .ckpt straight from path.pretrain_network_g
    with Capture() as log:
        assert cli.main(['test', '-opt', os.path.join(TINY, 'PromptIR_test_tiny.yml')]) == 0
    assert _logged_psnr(log.text()) == pytest.approx(expected_psnr, abs=1e-4)
    for name, img in expected_images.items():
        # val.suffix is not set: BasicSR's KeyError is avoided and the option name is used
        saved = cv2.imread(f'results/PromptIR_tiny_test/visualization/tiny-val/{name[:-4]}_PromptIR_tiny_test.png')
        assert np.abs(saved.astype(int) - img.astype(int)).max() <= 1

    # 2) convert -> {'params'} that stock BasicSR loads strictly -> test_pipeline
    converted = 'experiments/pretrained_models/PromptIR_tiny.pth'
    assert cli.main(['convert', ckpt, converted, '--arch', 'PromptIR', '--arch-opt', 'decoder=true',
                     'num_blocks=[1,1,1,1]', 'num_refinement_blocks=1']) == 0
    saved = torch.load(converted, weights_only=True)
    assert list(saved) == ['params'] and all(torch.equal(saved['params'][k], v) for k, v in weights.items())
    stock = build_network(TINY_PROMPTIR)
    BaseModel.load_network(BaseModel({'num_gpu': 0, 'is_train': False}), stock, converted, True, 'params')
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in weights.items())

    def use_converted(opt):
        opt['name'] = 'PromptIR_tiny_converted'
        opt['path'].update(pretrain_network_g=converted, param_key_g='params', strict_load_g=True)

    opt_file = write_options(os.path.join(TINY, 'PromptIR_test_tiny.yml'), workdir / 'converted.yml', use_converted)
    from perceive_ir_plugin.test import main as test_main
    with Capture() as log:
        assert test_main(['-opt', opt_file]) == 0
    assert _logged_psnr(log.text()) == pytest.approx(expected_psnr, abs=1e-4)
    assert math.isfinite(expected_psnr)


def test_convert_reports_missing_unexpected_and_shape(tmp_path, capsys):
    net_opt = {'type': 'NAFNet', 'width': 8, 'middle_blk_num': 1, 'enc_blk_nums': [1], 'dec_blk_nums': [1]}
    sd = build_network(net_opt).state_dict()
    sd['intro.w'] = sd.pop('intro.weight')
    sd['ending.bias'] = torch.zeros(5)
    src = tmp_path / 'bad.pth'
    torch.save({'params': sd}, src)
    argv = ['convert', str(src), str(tmp_path / 'out.pth'), '--arch', 'NAFNet', '--arch-opt', 'width=8',
            'middle_blk_num=1', 'enc_blk_nums=[1]', 'dec_blk_nums=[1]']
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert '1 missing key(s): intro.weight' in err
    assert '1 unexpected key(s): intro.w' in err
    assert '1 shape difference(s): ending.bias: network (3,) vs checkpoint (5,)' in err
    assert not (tmp_path / 'out.pth').exists()


class PickledConfig:
    """An arbitrary object inside a checkpoint (needs full unpickling)."""

    def __init__(self):
        self.epochs = 120


def test_convert_refuses_pickled_code_unless_trusted(tmp_path, capsys):
    net_opt = {'type': 'NAFNet', 'width': 8}
    sd = build_network(net_opt).state_dict()
    src = tmp_path / 'third_party.ckpt'
    torch.save({'state_dict': {'net.' + k: v for k, v in sd.items()}, 'hparams': PickledConfig()}, src)
    out = tmp_path / 'out.pth'
    assert cli.main(['convert', str(src), str(out), '--arch', 'NAFNet', '--arch-opt', 'width=8']) == 1
    assert '--trust-checkpoint' in capsys.readouterr().err and not out.exists()
    assert cli.main(['convert', str(src), str(out), '--arch', 'NAFNet', '--arch-opt', 'width=8',
                     '--trust-checkpoint']) == 0
    assert all(torch.equal(torch.load(out, weights_only=True)['params'][k], v) for k, v in sd.items())
    with pytest.raises(FileExistsError, match='--overwrite'):
        convert_checkpoint(str(src), str(out), 'NAFNet', {'width': 8}, trust=True)
    with pytest.raises(CheckpointError, match="Unknown --arch 'Restormr'"):
        convert_checkpoint(str(src), str(tmp_path / 'x.pth'), 'Restormr', trust=True)


def test_torchrun_two_cpu_ranks_gloo(tmp_path):
    make_paired_folders(str(tmp_path))
    torchrun = shutil.which('torchrun', path=os.path.dirname(sys.executable))
    assert torchrun, 'torchrun is installed with torch'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    cmd = [torchrun, '--nproc_per_node=2', '--master_port', str(29400 + os.getpid() % 500), '-m',
           'perceive_ir_plugin.train', '-opt', os.path.join(TINY, 'NAFNet_train_tiny.yml'), '--launcher', 'pytorch']
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'NAFNet_tiny'
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
    state = torch.load(exp / 'training_states' / '6.state', weights_only=True)
    assert state['iter'] == 6
    log = open(next((exp).glob('train_*.log'))).read()
    assert 'World size (gpu number): 2' in log
