"""Safe loading: source scan of the package and refusal of checkpoints that carry pickled code."""
import ast
import os

import pytest
import torch

from basicsr.models import build_model

from perceive_ir_plugin.utils.checkpoint import CheckpointError, load_checkpoint_file
from perceive_ir_plugin.utils.launch import load_resume_state

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'perceive_ir_plugin')
LOADER = os.path.join(PACKAGE, 'utils', 'checkpoint.py')
TINY_NET = {'type': 'NAFNet', 'width': 8, 'middle_blk_num': 1, 'enc_blk_nums': [1], 'dec_blk_nums': [1]}


def package_calls():
    """(file, line, dotted callee, Call node) for every call in the package source."""
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith('.py'):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding='utf-8') as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield os.path.relpath(path, PACKAGE), node.lineno, ast.unparse(node.func), node


def keyword(node, name):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_source_has_no_eval_exec_or_unsafe_deserialisation():
    bad = []
    for path, line, callee, node in package_calls():
        where = f'{path}:{line} {callee}'
        if callee in ('eval', 'exec', 'compile', '__import__', 'builtins.eval', 'builtins.exec'):
            bad.append(f'{where}: evaluates code')
        elif callee in ('torch.jit.load', 'jit.load', 'pickle.load', 'pickle.loads', 'pickle.Unpickler',
                        'dill.load', 'dill.loads', 'yaml.unsafe_load', 'yaml.full_load', 'marshal.loads'):
            bad.append(f'{where}: deserialises code')
        elif callee == 'yaml.load':
            loader = keyword(node, 'Loader')
            if loader is None or 'Safe' not in ast.unparse(loader):
                bad.append(f'{where}: yaml.load without a SafeLoader')
        elif callee in ('np.load', 'numpy.load'):
            allow = keyword(node, 'allow_pickle')
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                bad.append(f'{where}: np.load with allow_pickle')
        elif callee == 'torch.load' or callee.endswith('.torch.load'):
            flag = keyword(node, 'weights_only')
            safe = isinstance(flag, ast.Constant) and flag.value is True
            if not safe and not (path == os.path.join('utils', 'checkpoint.py')):
                bad.append(f'{where}: torch.load without weights_only=True outside utils/checkpoint.py')
    assert bad == []


def test_the_only_full_unpickling_is_the_explicit_trust_path():
    """utils/checkpoint.py holds one weights_only=False load, reached only when trust is true."""
    calls = [(line, node) for path, line, callee, node in package_calls()
             if path == os.path.join('utils', 'checkpoint.py') and callee == 'torch.load']
    unsafe = [line for line, node in calls if not (isinstance(keyword(node, 'weights_only'), ast.Constant)
                                                  and keyword(node, 'weights_only').value is True)]
    assert len(unsafe) == 1
    with open(LOADER, encoding='utf-8') as f:
        source = f.read().splitlines()
    before = '\n'.join(source[max(0, unsafe[0] - 25):unsafe[0]])
    assert 'if not trust:' in before and 'raise CheckpointError' in before


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the stand-in for malicious code in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def evil_checkpoint(tmp_path):
    from basicsr.archs import build_network
    marker = str(tmp_path / 'code_ran')
    path = str(tmp_path / 'evil.pth')
    torch.save({'params': build_network(dict(TINY_NET)).state_dict(), 'extra': Payload(marker)}, path)
    return path, marker


def test_pickled_code_is_refused_by_the_loader(evil_checkpoint):
    path, marker = evil_checkpoint
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path, option_key='path.pretrain_network_g')
    text = str(info.value)
    assert f"Refusing to load '{path}' (option 'path.pretrain_network_g')" in text
    assert 'arbitrary code' in text and '--trust-checkpoint' in text and 'trust_checkpoint: true' in text
    assert not os.path.exists(marker)
    # the explicit opt-in loads it (and thereby runs its code, which is why it is opt-in)
    assert 'params' in load_checkpoint_file(path, trust=True)
    assert os.path.isdir(marker)


def test_pickled_code_is_refused_as_pretrained_weights(evil_checkpoint):
    path, marker = evil_checkpoint
    opt = {'name': 'x', 'model_type': 'ImageRestorationModel', 'num_gpu': 0, 'is_train': False, 'dist': False,
           'scale': 1, 'network_g': dict(TINY_NET), 'path': {'pretrain_network_g': path, 'strict_load_g': True}}
    with pytest.raises(CheckpointError, match=r"Refusing to load .*evil\.pth' \(option 'path\.pretrain_network_g'\)"):
        build_model(opt)
    assert not os.path.exists(marker)


def test_pickled_code_is_refused_as_resume_state(tmp_path):
    marker = str(tmp_path / 'code_ran')
    state = str(tmp_path / '4.state')
    torch.save({'iter': 4, 'epoch': 0, 'optimizers': [], 'schedulers': [], 'x': Payload(marker)}, state)
    opt = {'auto_resume': False, 'path': {'resume_state': state}}
    with pytest.raises(CheckpointError, match=r"Refusing to load .*4\.state' \(option 'path\.resume_state'\)"):
        load_resume_state(opt)
    assert not os.path.exists(marker)
