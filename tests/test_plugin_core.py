"""The plugin's own plumbing: import order, torchvision alias, CLI and the safe checkpoint loader."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from perceive_ir_plugin.utils import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def test_import_basicsr_first_then_plugin_twice():
    """`import basicsr` works before the plugin (start-up hook) and re-imports are harmless."""
    res = _run_python('import basicsr; import perceive_ir_plugin; import importlib; '
                      'importlib.reload(perceive_ir_plugin.archs); print("ok")')
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith('ok')


def test_plugin_import_installs_the_alias_itself():
    """Without the start-up hook's finder, importing the plugin first still makes basicsr importable."""
    res = _run_python(
        'import sys\n'
        'sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_AliasFinder"]\n'
        'assert "basicsr" not in sys.modules\n'
        'import perceive_ir_plugin, basicsr\n'
        'from torchvision.transforms.functional_tensor import rgb_to_grayscale\n'
        'print("ok")')
    assert res.returncode == 0, res.stderr
    assert 'ok' in res.stdout


def test_alias_install_is_idempotent():
    import perceive_ir_tv_alias
    assert perceive_ir_tv_alias.install() is False  # already installed at import
    finders = [f for f in sys.meta_path if type(f).__name__ == '_AliasFinder']
    assert len(finders) == 1
    import torchvision.transforms.functional as new
    import torchvision.transforms.functional_tensor as old
    assert old.rgb_to_grayscale is new.rgb_to_grayscale


def test_cli_lists_subcommands():
    res = subprocess.run([sys.executable, '-m', 'perceive_ir_plugin.cli', '--help'], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'perceive-ir' in res.stdout


class _Tiny(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)


class _NotAllowed:
    """A class that weights_only=True refuses to unpickle."""

    def __init__(self):
        self.value = 3


@pytest.mark.parametrize('layout', ['plain', 'params', 'params_ema', 'lightning', 'ddp', 'release'])
def test_loader_accepts_every_layout(tmp_path, layout):
    src = _Tiny()
    sd = src.state_dict()
    wrapped = {
        'plain': sd,
        'params': {'params': sd},
        'params_ema': {'params_ema': sd},
        'lightning': {'state_dict': {f'net.{k}': v for k, v in sd.items()}, 'epoch': 3, 'global_step': 7},
        'ddp': {'params': {f'module.{k}': v for k, v in sd.items()}},
        'release': {'model': sd, 'iteration': 500000},
    }[layout]
    path = tmp_path / 'w.pth'
    torch.save(wrapped, path)
    dst = _Tiny()
    report = ckpt.load_checkpoint_into(dst, str(path))
    assert report == {'missing': [], 'unexpected': [], 'shape': []}
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_loader_mismatch_message_lists_keys_and_shapes(tmp_path):
    sd = _Tiny().state_dict()
    sd['head.weight'] = torch.zeros(5, 4)
    sd['extra.bias'] = torch.zeros(1)
    del sd['conv.bias']
    path = tmp_path / 'bad.pth'
    torch.save({'params': sd}, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint_into(_Tiny(), str(path), option_key='path.pretrain_network_g')
    text = str(err.value)
    assert 'path.pretrain_network_g' in text
    assert '1 missing key(s): conv.bias' in text
    assert '1 unexpected key(s): extra.bias' in text
    assert 'head.weight: network (2, 4) vs checkpoint (5, 4)' in text


def test_loader_non_strict_loads_what_fits(tmp_path):
    src = _Tiny()
    sd = src.state_dict()
    sd['head.weight'] = torch.zeros(5, 4)
    path = tmp_path / 'partial.pth'
    torch.save(sd, path)
    dst = _Tiny()
    before = dst.head.weight.clone()
    report = ckpt.load_checkpoint_into(dst, str(path), strict=False)
    assert [k for k, _, _ in report['shape']] == ['head.weight']
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert torch.equal(dst.head.weight, before)


def test_loader_refuses_pickled_objects_unless_trusted(tmp_path):
    path = tmp_path / 'pickled.ckpt'
    torch.save({'state_dict': _Tiny().state_dict(), 'hparams': _NotAllowed()}, path)
    with pytest.raises(ckpt.CheckpointError, match='--trust-checkpoint'):
        ckpt.load_checkpoint_file(str(path))
    loaded = ckpt.load_checkpoint_file(str(path), trust=True)
    assert loaded['hparams'].value == 3


def test_loader_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="option 'path.pretrain_network_g'"):
        ckpt.load_checkpoint_file(str(tmp_path / 'nope.pth'), option_key='path.pretrain_network_g')
    bad = tmp_path / 'truncated.pth'
    torch.save({'params': _Tiny().state_dict()}, bad)
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError, match='corrupt, truncated or another format'):
        ckpt.load_checkpoint_file(str(bad))


@pytest.mark.parametrize('content', [bytes(range(256)) * 2, b'hello, not a checkpoint\n' * 20])
def test_loader_garbage_is_not_mistaken_for_pickled_code(tmp_path, content):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint_file(str(path), option_key='network_g.clip_weights')
    assert 'corrupt, truncated or another format' in str(err.value)
    assert 'network_g.clip_weights' in str(err.value)
    assert '--trust-checkpoint' not in str(err.value)


def test_extract_state_dict_errors():
    with pytest.raises(ckpt.CheckpointError, match="no top-level key 'params_ema'"):
        ckpt.extract_state_dict({'params': {'a': torch.zeros(1)}}, 'params_ema')
    with pytest.raises(ckpt.CheckpointError, match='No state dict found'):
        ckpt.extract_state_dict({'epoch': 1, 'optimizer': {}})


def test_pickle_error_type_is_what_torch_raises(tmp_path):
    """Guard the assumption the loader relies on: torch raises UnpicklingError for disallowed globals."""
    path = tmp_path / 'obj.pt'
    torch.save(_NotAllowed(), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
