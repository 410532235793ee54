"""Option validation: every misspelt key is reported with its full path and the closest spelling."""
import copy
import glob
import os

import pytest
import yaml

from perceive_ir_plugin.utils.option_check import (OptionError, check_option_file, check_options,
                                                   check_pipeline_argv, find_option_problems, load_option_file)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NAFNET = os.path.join(REPO, 'options', 'tiny', 'NAFNet_train_tiny.yml')
TINY_RESTORMER = os.path.join(REPO, 'options', 'tiny', 'Restormer_train_tiny.yml')


def tiny(path=TINY_RESTORMER):
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def problems_after(edit, path=TINY_RESTORMER, is_train=True):
    opt = tiny(path)
    edit(opt)
    return find_option_problems(opt, is_train=is_train, check_files=False)


def only_problem(edit, path=TINY_RESTORMER, is_train=True):
    found = problems_after(edit, path, is_train)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'options', '**', '*.yml'), recursive=True)))
def test_every_bundled_option_file_is_valid(path):
    opt = load_option_file(path)
    is_train = 'train' in opt and f'{os.sep}test{os.sep}' not in path
    assert find_option_problems(opt, is_train=is_train, check_files=False) == []


def test_plugin_dataset_sections_are_held_to_the_keys_the_dataset_accepts():
    """A key another plugin dataset reads (AllInOneDataset's ``tasks``) is still wrong for AllInOneTestDataset."""
    opt = load_option_file(os.path.join(REPO, 'options', 'test', 'PromptIR', 'PromptIR_3task.yml'))
    section = opt['datasets']['test_1']
    section['tasks'] = [section.pop('task')]
    section['sigmas'] = [section.pop('sigma')]
    assert find_option_problems(opt, is_train=False, check_files=False) == [
        "datasets.test_1.tasks: unknown option for AllInOneTestDataset; did you mean 'task'?",
        "datasets.test_1.sigmas: unknown option for AllInOneTestDataset; did you mean 'sigma'?"]


@pytest.mark.parametrize('edit, expected', [
    (lambda o: o['network_g'].update(num_blok=[1, 1, 1, 1]),
     "network_g.num_blok: Restormer takes no argument 'num_blok'; did you mean 'num_blocks'?"),
    (lambda o: o['train'].update(total_iters=o['train'].pop('total_iter')),
     "train.total_iters: unknown option; did you mean 'total_iter'?"),
    (lambda o: o['logger'].update(save_checkpoint_frq=o['logger'].pop('save_checkpoint_freq')),
     "logger.save_checkpoint_frq: unknown option; did you mean 'save_checkpoint_freq'?"),
    (lambda o: o['val'].update(val_frequency=o['val'].pop('val_freq')),
     "val.val_frequency: unknown option; did you mean 'val_freq'?"),
    (lambda o: o['path'].update(strict_lod_g=True),
     "path.strict_lod_g: unknown option; did you mean 'strict_load_g'?"),
    (lambda o: o.update(manual_sed=o.pop('manual_seed')),
     "manual_sed: unknown option; did you mean 'manual_seed'?"),
    (lambda o: o['datasets']['train'].update(use_hfilp=True),
     "datasets.train.use_hfilp: unknown option for PairedImageDataset; did you mean 'use_hflip'?"),
    (lambda o: o['train']['pixel_opt'].update(los_weight=1.0),
     "train.pixel_opt.los_weight: L1Loss takes no argument 'los_weight'; did you mean 'loss_weight'?"),
    (lambda o: o['train']['optim_g'].update(weight_decy=0.1),
     "train.optim_g.weight_decy: AdamW takes no argument 'weight_decy'; did you mean 'weight_decay'?"),
    (lambda o: o['train']['scheduler'].update(period=[2, 2]),
     "train.scheduler.period: CosineAnnealingRestartCyclicLR takes no argument 'period'; did you mean 'periods'?"),
])
def test_misspelt_key_names_its_path_and_the_closest_key(edit, expected):
    assert only_problem(edit).startswith(expected)


@pytest.mark.parametrize('edit, expected', [
    (lambda o: o['network_g'].update(type='Restormr'), "network_g.type: unknown network 'Restormr'; did you mean "
                                                       "'Restormer'?"),
    (lambda o: o.update(model_type='ImageRestorationModle'), "model_type: unknown model 'ImageRestorationModle'; "
                                                             "did you mean 'ImageRestorationModel'?"),
    (lambda o: o['datasets']['val'].update(type='PairedImageDatset'),
     "datasets.val.type: unknown dataset 'PairedImageDatset'; did you mean 'PairedImageDataset'?"),
    (lambda o: o['train']['pixel_opt'].update(type='L1loss'), "train.pixel_opt.type: unknown loss 'L1loss'; did "
                                                              "you mean 'L1Loss'?"),
    (lambda o: o['train']['optim_g'].update(type='adamw'), "train.optim_g.type: unknown optimizer 'adamw'; did you "
                                                           "mean 'AdamW'?"),
    (lambda o: o['val']['metrics']['psnr'].update(type='calculate_pnsr'),
     "val.metrics.psnr.type: unknown metric 'calculate_pnsr'; did you mean 'calculate_psnr'?"),
    (lambda o: o['datasets'].update(trian=o['datasets'].pop('train')),
     "datasets.trian: unknown phase 'trian': dataset keys are train, val or test"),
])
def test_unknown_registered_name_suggests_the_closest(edit, expected):
    found = problems_after(edit)
    assert any(p.startswith(expected) for p in found), found


def test_stock_srmodel_only_builds_adam():
    # BasicSR 1.4.2's SRModel knows Adam and its own schedulers only; the plugin model adds AdamW & co.
    def edit(o):
        o['model_type'] = 'SRModel'
        o['network_g'] = {'type': 'MSRResNet', 'num_feat': 8, 'num_block': 1, 'upscale': 1}
        o['train'].pop('mixing_augs')
        o.pop('val')

    found = problems_after(edit)
    assert any(p.startswith("train.optim_g.type: unknown optimizer 'AdamW'; did you mean 'Adam'?") for p in found)
    assert any(p.startswith("train.scheduler.type: unknown scheduler 'CosineAnnealingRestartCyclicLR'")
               for p in found)


def test_missing_required_argument_and_kwargs_targets():
    # calculate_psnr takes **kwargs, so any extra key is accepted there; a required argument is still required.
    assert problems_after(lambda o: o['val']['metrics']['psnr'].update(anything=1)) == []
    msg = only_problem(lambda o: o['val']['metrics']['psnr'].pop('crop_border'))
    assert msg == "val.metrics.psnr: calculate_psnr needs 'crop_border', which is not set"


def test_every_problem_is_reported_at_once():
    def edit(o):
        o['network_g']['dimm'] = 8
        o['train']['total_iters'] = 3
        o['datasets']['train']['gt_sise'] = 32

    opt = tiny()
    edit(opt)
    with pytest.raises(OptionError) as info:
        check_options(opt, check_files=False, source='my.yml')
    text = str(info.value)
    assert text.startswith("Invalid options in 'my.yml' (3 problems):")
    for needle in ("network_g.dimm: Restormer takes no argument 'dimm'; did you mean 'dim'?",
                   "train.total_iters: unknown option; did you mean 'total_iter'?",
                   "datasets.train.gt_sise: unknown option for PairedImageDataset; did you mean 'gt_size'?"):
        assert needle in text


def test_train_only_sections_are_not_required_in_test_mode():
    opt = load_option_file(os.path.join(REPO, 'options', 'tiny', 'PromptIR_test_tiny.yml'))
    assert find_option_problems(opt, is_train=False, check_files=False) == []
    assert 'train: required but not set' in find_option_problems(opt, is_train=True, check_files=False)


def test_python_object_tag_is_refused(tmp_path):
    marker = tmp_path / 'ran'
    text = open(TINY_NAFNET, encoding='utf-8').read().replace(
        'manual_seed: 10', f'manual_seed: !!python/object/apply:os.mkdir ["{marker}"]')
    bad = tmp_path / 'evil.yml'
    bad.write_text(text)
    with pytest.raises(OptionError, match=r'YAML tag that builds Python objects'):
        load_option_file(str(bad))
    with pytest.raises(OptionError, match=r"evil\.yml"):
        check_pipeline_argv(['-opt', str(bad)], is_train=True)
    assert not marker.exists()


def test_missing_files_name_the_option_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = tiny(TINY_NAFNET)
    opt['path']['pretrain_network_g'] = 'weights/missing.pth'
    opt['path']['resume_state'] = 'states/4.state'
    found = find_option_problems(opt)
    assert "path.pretrain_network_g: weights file not found: 'weights/missing.pth'" in '\n'.join(found)
    assert "path.resume_state: training state not found: 'states/4.state'" in '\n'.join(found)
    assert "datasets.train.dataroot_gt: data folder not found: 'datasets/tiny/train/gt'" in '\n'.join(found)
    # with --auto_resume the state is found by BasicSR, not read from path.resume_state
    opt['auto_resume'] = True
    assert not any(p.startswith('path.resume_state') for p in find_option_problems(opt))


def test_network_weight_argument_must_exist(tmp_path):
    opt = load_option_file(os.path.join(REPO, 'options', 'train', 'PerceiveIR', 'stage1_prompts.yml'))
    opt['network_g']['clip_weights'] = str(tmp_path / 'ViT-B-32.pt')
    found = find_option_problems(opt)
    assert f"network_g.clip_weights: weights file not found: '{tmp_path / 'ViT-B-32.pt'}'" in '\n'.join(found)


def test_lmdb_without_meta_info_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for side in ('gt', 'lq'):
        os.makedirs(f'packs/{side}.lmdb')
        open(f'packs/{side}.lmdb/data.mdb', 'wb').close()
    open('packs/gt.lmdb/meta_info.txt', 'w').close()
    opt = tiny(TINY_NAFNET)
    opt.pop('val')
    opt['datasets'].pop('val')
    opt['datasets']['train'].update(dataroot_gt='packs/gt.lmdb', dataroot_lq='packs/lq.lmdb', io_backend={'type': 'lmdb'})
    assert find_option_problems(opt) == [
        "datasets.train.dataroot_lq: LMDB folder 'packs/lq.lmdb' has no meta_info.txt (incomplete pack, or not made "
        'by BasicSR / perceive-ir pack)']


def test_force_yml_overrides_are_checked_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for split in ('train', 'val'):
        for side in ('gt', 'lq'):
            os.makedirs(f'datasets/tiny/{split}/{side}')
            open(f'datasets/tiny/{split}/{side}/0.png', 'wb').close()
    opt = check_option_file(TINY_NAFNET, overrides=['train:total_iter=3'])
    assert opt['train']['total_iter'] == 3
    with pytest.raises(OptionError, match=r"--force_yml: option 'train:total_iters' does not exist; did you mean "
                                          r"'train:total_iter'\?"):
        check_pipeline_argv(['-opt', TINY_NAFNET, '--force_yml', 'train:total_iters=3'], is_train=True)
    with pytest.raises(OptionError, match=r"network_g.widht: NAFNet takes no argument 'widht'; did you mean 'width'"):
        bad = copy.deepcopy(tiny(TINY_NAFNET))
        bad['network_g']['widht'] = bad['network_g'].pop('width')
        path = tmp_path / 'bad.yml'
        path.write_text(yaml.safe_dump(bad))
        check_pipeline_argv(['-opt', str(path), '--auto_resume'], is_train=True)


def test_loss_weight_argument_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = tiny()
    opt['train']['dpl_opt'] = {'type': 'DifficultyAdaptivePerceptualLoss', 'vgg_weights': 'vgg/vgg16.pth'}
    assert "train.dpl_opt.vgg_weights: weights file not found: 'vgg/vgg16.pth'" in '\n'.join(find_option_problems(opt))
    opt['train']['dpl_opt']['vgg_weigths'] = opt['train']['dpl_opt'].pop('vgg_weights')
    assert any(p.startswith("train.dpl_opt.vgg_weigths: DifficultyAdaptivePerceptualLoss takes no argument "
                            "'vgg_weigths'; did you mean 'vgg_weights'?") for p in find_option_problems(opt))
