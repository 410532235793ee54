"""Demo helpers without training: log capture/parsing, results table, plots, strips."""
import csv
import math

import cv2
import numpy as np
import pytest

from basicsr.utils import get_root_logger
from basicsr.utils.logger import MessageLogger
from perceive_ir_plugin.demo import logs, report


def test_parse_train_line_reads_iter_lr_and_every_loss():
    line = ('[Perce..][epoch:  1, iter:   1,234, lr:(2.000e-04,1.000e-05,)] [eta: 0:00:01, time (data): 0.512 '
            '(0.004)] l_pix: 1.2345e-01 l_cl: 2.0000e+00 l_dpl: nan ')
    rec = logs.parse_train_line(line)
    assert rec['iter'] == 1234 and rec['epoch'] == 1 and rec['lr'] == pytest.approx(2e-4)
    assert rec['l_pix'] == pytest.approx(0.12345) and rec['l_cl'] == 2.0 and math.isnan(rec['l_dpl'])
    assert 'eta' not in rec and 'data' not in rec and 'time' not in rec
    assert logs.parse_train_line('Validation denoise-25') is None


def test_capture_records_basicsr_messages_into_file_and_progress(tmp_path):
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

        def set_postfix(self, *a, **k):
            pass

    bar = Bar()
    opt = {'name': 'demo_run', 'logger': {'print_freq': 1, 'use_tb_logger': False}, 'train': {'total_iter': 3}}
    with logs.capture_basicsr_log(str(tmp_path / 'run.log'), progress=bar) as messages:
        msg_logger = MessageLogger(opt, start_iter=1)
        for it, loss in ((1, 0.5), (2, 0.25), (3, 0.125)):
            msg_logger({'epoch': 0, 'iter': it, 'lrs': [1e-3], 'time': 0.1, 'data_time': 0.01, 'l_pix': loss})
        get_root_logger().info('Validation tiny-set\n\t # psnr: 25.1234\tBest: 25.1234 @ demo iter\n'
                               '\t # ssim: 0.8123\tBest: 0.8123 @ demo iter\n')
    get_root_logger().info('after the block: not captured')
    assert bar.n == 3
    curves = logs.parse_train_log(messages)
    assert curves == {'iter': [1, 2, 3], 'lr': [1e-3] * 3, 'l_pix': [0.5, 0.25, 0.125]}
    assert logs.parse_validation_log(messages) == {'tiny-set': {'psnr': 25.1234, 'ssim': 0.8123}}
    text = (tmp_path / 'run.log').read_text()
    assert 'l_pix: 2.5000e-01' in text and 'not captured' not in text


def _metrics():
    return {'l1': {'denoise-25': {'psnr': 28.0, 'ssim': 0.80}, 'derain': {'psnr': 30.0, 'ssim': 0.90}},
            'perceiveir': {'denoise-25': {'psnr': 28.5, 'ssim': 0.81}, 'derain': {'psnr': 29.0, 'ssim': 0.91}}}


def test_results_rows_table_and_csv(tmp_path):
    rows = report.results_rows(_metrics(), [('denoise', 'denoise-25', 3), ('derain', 'derain', 2)])
    assert [r['task'] for r in rows] == ['denoise', 'derain', 'mean']
    assert rows[0]['delta_psnr'] == pytest.approx(0.5) and rows[1]['delta_psnr'] == pytest.approx(-1.0)
    assert rows[2]['psnr_l1'] == pytest.approx(29.0) and rows[2]['psnr_perceiveir'] == pytest.approx(28.75)
    assert rows[2]['images'] == 5
    report.write_csv(str(tmp_path / 'r.csv'), rows)
    with open(tmp_path / 'r.csv', newline='') as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(report.CSV_FIELDS) and float(back[1]['psnr_l1']) == 30.0
    md = report.markdown_table(rows)
    assert '| denoise | denoise-25 | 3 | 28.00 / 0.8000 | 28.50 / 0.8100 | +0.50 | +0.0100 |' in md
    with pytest.raises(KeyError, match="dataset 'dehaze' \\(task dehaze\\) in the L1 only run"):
        report.results_rows(_metrics(), [('dehaze', 'dehaze', 1)])


def test_plots_and_strips_are_written(tmp_path):
    rows = report.results_rows(_metrics(), [('denoise', 'denoise-25', 3), ('derain', 'derain', 2)])
    curves = {'l1': {'iter': [1, 2, 3], 'l_pix': [0.3, 0.2, 0.1]},
              'perceiveir': {'iter': [1, 2, 3], 'l_pix': [0.3, 0.2, 0.1], 'l_cl': [0.2, 0.1, 0.1],
                             'l_dpl': [0.05, 0.04, 0.03]}}
    report.plot_losses(curves, str(tmp_path / 'losses.png'))
    report.plot_psnr(rows, str(tmp_path / 'psnr.png'))
    for name in ('losses.png', 'psnr.png'):
        img = cv2.imread(str(tmp_path / name))
        assert img is not None and img.shape[0] > 200 and img.std() > 5
    a = np.zeros((32, 40, 3), np.uint8)
    b = np.full((32, 40, 3), 200, np.uint8)
    strip = report.image_strip([('degraded', a), ('gt', b)], min_height=64, gap=4)
    # Enlarged 2x (64 px) under an 18 px caption bar; two 80 px panels and a 4 px gap.
    assert strip.shape == (18 + 64, 80 + 4 + 80, 3)
    assert (strip[18:, :80] == 0).all() and (strip[18:, 84:] == 200).all()
    grid = report.stack_rows([strip, strip[:, :100]], gap=6)
    assert grid.shape == (2 * strip.shape[0] + 6, strip.shape[1], 3)
    report.save_png(str(tmp_path / 's' / 'strip.png'), strip)
    assert cv2.imread(str(tmp_path / 's' / 'strip.png')).shape == strip.shape
    with pytest.raises(ValueError, match='differ in shape'):
        report.image_strip([('a', a), ('b', b[:16])])


def test_smooth_is_a_trailing_mean_that_skips_nan(tmp_path):
    assert report.smooth([1.0, 3.0, float('nan'), 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
    assert report.smooth([1.0, 2.0], 1) == [1.0, 2.0]
    curves = {'l1': {'iter': list(range(1, 61)), 'l_pix': [1.0 / i for i in range(1, 61)]}}
    # Long runs plot the raw curve faintly plus its moving average.
    report.plot_losses(curves, str(tmp_path / 'long.png'))
    assert cv2.imread(str(tmp_path / 'long.png')) is not None
