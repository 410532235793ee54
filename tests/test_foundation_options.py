"""The shipped option files parse like BasicSR parses them and build the official networks."""
import glob
import json
import os

import pytest
import torch
import yaml
from torch import nn

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

from perceive_ir_plugin.data.tasks import TASKS
from perceive_ir_plugin.models.image_restoration_model import OPTIMIZERS, SCHEDULERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Vendored copy of shared/reference/official_state_dicts.json (CI has no ../shared).
REFERENCE = os.path.join(REPO, 'tests', 'data', 'backbones', 'official_state_dicts.json')
# The all-in-one datasets are held to the keys they declare (and check at run time).
ALL_IN_ONE_KEYS = {name: set(DATASET_REGISTRY.get(name).option_keys) | {'name', 'type'}
                   for name in ('AllInOneDataset', 'AllInOneTestDataset')}
LOADER_KEYS = {'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode', 'pin_memory',
               'persistent_workers', 'num_prefetch_queue'}
OFFICIAL = sorted(glob.glob(os.path.join(REPO, 'options', '*', 'Restormer', '*.yml')) +
                  glob.glob(os.path.join(REPO, 'options', '*', 'NAFNet', '*.yml')) +
                  glob.glob(os.path.join(REPO, 'options', '*', 'PromptIR', '*.yml')))
TINY = sorted(glob.glob(os.path.join(REPO, 'options', 'tiny', '*.yml')))

# Which official configuration (shared/reference/official_state_dicts.json) each file must build.
REFERENCE_CONFIG = {
    'Deraining_Restormer': 'Restormer_WithBias_default',
    'Deblurring_Restormer': 'Restormer_WithBias_default',
    'MotionDeblurring_Restormer': 'Restormer_WithBias_default',
    'DefocusDeblur_Single_8bit_Restormer': 'Restormer_WithBias_default',
    'RealDenoising_Restormer': 'Restormer_BiasFree_denoise_color',
    'GaussianColorDenoising_Restormer': 'Restormer_BiasFree_denoise_color',
    'GoPro-width32': 'NAFNet_GoPro_width32',
    'GoPro-width64': 'NAFNet_GoPro_width64',
    'SIDD-width32': 'NAFNet_SIDD_width32',
    'SIDD-width64': 'NAFNet_SIDD_width64',
    'PromptIR_3task': 'PromptIR_official_decoder_true',
}


def load(path):
    with open(path, encoding='utf-8') as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def reference_for(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    for prefix in sorted(REFERENCE_CONFIG, key=len, reverse=True):
        if stem.startswith(prefix):
            return REFERENCE_CONFIG[prefix]
    raise AssertionError(f'no reference configuration for {path}')


def test_every_backbone_has_train_and_test_options():
    for family in ('Restormer', 'NAFNet', 'PromptIR'):
        for phase in ('train', 'test'):
            assert glob.glob(os.path.join(REPO, 'options', phase, family, '*.yml')), (phase, family)


@pytest.mark.parametrize('path', OFFICIAL + TINY, ids=lambda p: os.path.relpath(p, REPO))
def test_options_parse_and_name_registered_classes(path):
    opt = load(path)
    assert opt['model_type'] in MODEL_REGISTRY and opt['scale'] == 1
    for phase, dataset in opt['datasets'].items():
        assert phase.split('_')[0] in ('train', 'val', 'test'), phase
        if dataset['type'] in ALL_IN_ONE_KEYS:  # the data area's datasets: keys of the shared contract
            assert set(dataset) <= ALL_IN_ONE_KEYS[dataset['type']] | LOADER_KEYS, (path, sorted(dataset))
            tasks = (dataset.get('tasks') or []) if dataset['type'] == 'AllInOneDataset' else [dataset['task']]
            assert set(tasks) <= set(TASKS) and dataset['io_backend'] == {'type': 'lmdb'}
        else:
            assert dataset['type'] in DATASET_REGISTRY, f"{path}: dataset type {dataset['type']} is not registered"
    train = opt.get('train')
    if '/train/' in path.replace(os.sep, '/') or os.path.basename(path).startswith(('NAFNet_train', 'Restormer_train')):
        assert train['optim_g']['type'] in OPTIMIZERS and train['scheduler']['type'] in SCHEDULERS
        param = nn.Parameter(torch.zeros(1))
        optim_opt = dict(train['optim_g'])
        optimizer = OPTIMIZERS[optim_opt.pop('type')]([param], **{**optim_opt, 'betas': tuple(optim_opt['betas'])})
        sched_opt = dict(train['scheduler'])
        SCHEDULERS[sched_opt.pop('type')](optimizer, **sched_opt)  # keys are constructor arguments
        build_loss(dict(train['pixel_opt']))
        for key in ('total_iter', 'warmup_iter'):
            assert isinstance(train[key], int), (path, key)
        assert isinstance(opt['logger']['save_checkpoint_freq'], (int, float))


@pytest.mark.parametrize('path', OFFICIAL, ids=lambda p: os.path.relpath(p, REPO))
def test_official_options_build_the_official_network(path):
    with open(REFERENCE, encoding='utf-8') as f:
        reference = json.load(f)['configs'][reference_for(path)]
    network_opt = dict(load(path)['network_g'])
    with torch.device('meta'):
        net = build_network(network_opt)
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert shapes == reference['state_dict']
    assert list(shapes) == list(reference['state_dict'])  # official key order too


def test_progressive_and_schedules_match_the_recipes():
    rain = load(os.path.join(REPO, 'options', 'train', 'Restormer', 'Deraining_Restormer.yml'))
    assert sum(rain['datasets']['train']['iters']) == rain['train']['total_iter'] == 300000
    assert sum(rain['train']['scheduler']['periods']) == 300000
    promptir = load(os.path.join(REPO, 'options', 'train', 'PromptIR', 'PromptIR_3task.yml'))
    epoch = (5144 * 9 + 199 * 120 + 72135) // 32
    sched = promptir['train']['scheduler']
    assert (sched['warmup_iters'], sched['max_iters'], promptir['train']['total_iter']) == \
        (15 * epoch, 150 * epoch, 120 * epoch)
