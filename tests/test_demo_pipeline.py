"""`perceive-ir demo --quick` end to end into a temporary folder, and the demo's option handling."""
import csv
import json
import math
import os

import cv2
import numpy as np
import pytest
import yaml

from basicsr.metrics import calculate_psnr
from perceive_ir_plugin import cli
from perceive_ir_plugin.demo import pipeline
from perceive_ir_plugin.demo.pipeline import DemoConfig, build_options

TASK_DATASETS = ['denoise-s25', 'derain', 'dehaze', 'deblur', 'lowlight']


@pytest.fixture(scope='module')
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo') / 'results'
    code = cli.main(['demo', '--quick', '--out', str(out), '--device', 'cpu', '--no-progress'])
    assert code == 0
    return out


def test_quick_demo_writes_table_csv_plots_and_strips(quick_demo):
    out = quick_demo
    with open(out / 'results.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['task'] for r in rows] == ['denoise', 'derain', 'dehaze', 'deblur', 'lowlight', 'mean']
    assert [r['dataset'] for r in rows[:-1]] == TASK_DATASETS
    for r in rows:
        for key in ('psnr_l1', 'psnr_perceiveir'):
            assert math.isfinite(float(r[key])) and 3 < float(r[key]) < 60, r
        for key in ('ssim_l1', 'ssim_perceiveir'):
            assert -1 <= float(r[key]) <= 1, r
        assert float(r['delta_psnr']) == pytest.approx(float(r['psnr_perceiveir']) - float(r['psnr_l1']), abs=2e-4)
    assert float(rows[-1]['psnr_l1']) == pytest.approx(np.mean([float(r['psnr_l1']) for r in rows[:-1]]), abs=1e-3)
    md = (out / 'results.md').read_text()
    for name in TASK_DATASETS:
        assert f'| {name} |' in md
    for png in ('losses.png', 'psnr_per_task.png'):
        img = cv2.imread(str(out / png))
        assert img is not None and img.shape[0] >= 300 and img.std() > 5
    strips = sorted(os.listdir(out / 'strips'))
    assert strips == ['all_tasks.png', 'deblur.png', 'dehaze.png', 'denoise_denoise-s25.png', 'derain.png',
                      'lowlight.png']
    strip = cv2.imread(str(out / 'strips' / 'derain.png'))
    # Four equal panels (degraded | L1 only | Perceive-IR | ground truth) separated by 4-pixel gaps.
    assert (strip.shape[1] - 3 * 4) % 4 == 0


def test_table_values_are_the_test_pipelines_metrics(quick_demo):
    """The PSNR in the table is what BasicSR computed on the saved restorations against GT."""
    from basicsr.data import build_dataset
    work = quick_demo / 'work'
    with open(work / 'options' / 'demo_test_l1.yml') as f:
        opt = yaml.safe_load(f)
    ds_opt = dict(opt['datasets']['test_2'], phase='test')
    assert ds_opt['name'] == 'derain'
    dataset = build_dataset(ds_opt)
    values = []
    for i in range(len(dataset)):
        sample = dataset[i]
        name = os.path.splitext(os.path.basename(sample['lq_path']))[0]
        restored = cv2.imread(str(work / 'results' / 'demo_test_l1' / 'visualization' / 'derain' /
                                  f'{name}_demo_test_l1.png'))
        gt = (sample['gt'].numpy().transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8)
        values.append(calculate_psnr(restored, gt, crop_border=0))
    with open(quick_demo / 'results.csv', newline='') as f:
        row = [r for r in csv.DictReader(f) if r['dataset'] == 'derain'][0]
    assert float(row['psnr_l1']) == pytest.approx(np.mean(values), abs=1e-3)


def test_quick_demo_labels_random_weights_and_trains_both_runs_alike(quick_demo):
    summary = json.loads((quick_demo / 'summary.json').read_text())
    assert summary['random_weights'] == ['clip', 'dino', 'vgg']
    md = (quick_demo / 'results.md').read_text()
    for name in ('CLIP', 'DINOv2', 'VGG-16'):
        assert f'**{name}: RANDOM-INITIALISED' in md
    curves = summary['curves']
    assert curves['l1']['iter'] == curves['perceiveir']['iter'] == [1, 2, 3]
    assert {'l_pix', 'l_cl', 'l_clip', 'l_dpl'} <= set(curves['perceiveir'])
    assert set(k for k in curves['l1'] if k.startswith('l_')) == {'l_pix'}
    assert all(math.isfinite(v) for v in curves['perceiveir']['l_pix'])
    # Same data, seed and initial backbone weights: the very first L1 term is identical.
    assert curves['l1']['l_pix'][0] == pytest.approx(curves['perceiveir']['l_pix'][0], rel=1e-4)
    work = quick_demo / 'work'
    with open(work / 'options' / 'demo_stage2_perceiveir.yml') as f:
        pir = yaml.safe_load(f)
    with open(work / 'options' / 'demo_stage2_l1.yml') as f:
        l1 = yaml.safe_load(f)
    assert pir['network_g']['backbone'] == l1['network_g']
    assert pir['datasets']['train'] == l1['datasets']['train'] and pir['manual_seed'] == l1['manual_seed']
    assert pir['path']['pretrain_network_backbone'] == l1['path']['pretrain_network_g']
    assert pir['train']['proxies'][0]['fold_checkpoints'] == [
        str(work / 'experiments' / f'demo_medium_fold{k}' / 'models' / 'net_g_latest.pth') for k in (0, 1)]
    assert pir['train']['clip_opt']['perceiver']['prompt_weights'].endswith('quality_prompts_latest.pth')


def test_weight_files_switch_the_frozen_networks_and_are_checked(tmp_path):
    clip = tmp_path / 'ViT-B-32.pt'
    clip.write_bytes(b'x')
    cfg = DemoConfig(out=str(tmp_path / 'out'), device='cpu', quick=True, clip_weights=str(clip),
                     vgg_weights=str(tmp_path / 'missing_vgg.pth'))
    with pytest.raises(FileNotFoundError, match="--vgg-weights: weights file '.*missing_vgg.pth' does not exist"):
        pipeline.check_weight_files(cfg)
    cfg.vgg_weights = str(clip)
    cfg.dino_weights = str(clip)
    opts = build_options(cfg, {'prompts': 'p.pth'})
    perceiver = opts['stage2_perceiveir']['train']['clip_opt']['perceiver']
    assert perceiver['clip_model'] == 'ViT-B-32-quickgelu' and perceiver['clip_weights'] == str(clip)
    assert opts['prompts']['network_g']['clip_weights'] == str(clip)
    assert opts['stage2_perceiveir']['train']['dpl_opt']['allow_random_vgg'] is False
    for name in ('stage2_perceiveir', 'test_perceiveir'):
        net = opts[name]['network_g']
        assert net['sgm_config'] == 'dinov2_vitb14' and net['sgm_weights'] == str(clip)
        assert net['sgm_allow_random'] is False
    labels = pipeline.weight_labels(cfg)
    assert not any(pipeline.RANDOM_NOTE in v for v in labels.values())


def test_work_folder_not_made_by_the_demo_is_never_deleted(tmp_path):
    cfg = DemoConfig(out=str(tmp_path), device='cpu', quick=True)
    os.makedirs(cfg.work)
    (tmp_path / 'work' / 'precious.txt').write_text('keep')
    with pytest.raises(FileExistsError, match='was not created by perceive-ir demo'):
        pipeline.prepare_work_dir(cfg)
    assert (tmp_path / 'work' / 'precious.txt').read_text() == 'keep'
