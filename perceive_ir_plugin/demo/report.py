"""Results of the demo: per-task table (markdown + CSV), loss/PSNR plots and image strips.

Everything here takes plain Python data (dicts, lists, uint8 arrays) so it can be tested
without running any training. Plots use matplotlib's Agg backend (no display needed).
"""
import csv
import math
import os

import numpy as np

CSV_FIELDS = ('task', 'dataset', 'images', 'psnr_l1', 'ssim_l1', 'psnr_perceiveir', 'ssim_perceiveir', 'delta_psnr',
              'delta_ssim')
RUN_LABELS = {'l1': 'L1 only', 'perceiveir': 'Perceive-IR'}


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def results_rows(metrics, datasets):
    """Table rows: one per test dataset (task) plus the mean.

    Args:
        metrics (dict): ``{'l1': {dataset: {'psnr': .., 'ssim': ..}}, 'perceiveir': {...}}``
            as parsed from BasicSR's test logs.
        datasets (Sequence[tuple[str, str, int]]): ``(task, dataset name, number of images)``
            in display order.

    Returns:
        list[dict]: Rows with the keys of :data:`CSV_FIELDS`; the last row has task ``mean``.

    Raises:
        KeyError: A dataset missing from a run's metrics (names the run and dataset).
    """
    rows = []
    for task, name, count in datasets:
        row = {'task': task, 'dataset': name, 'images': int(count)}
        for run in ('l1', 'perceiveir'):
            run_metrics = metrics.get(run, {})
            if name not in run_metrics:
                raise KeyError(f"No test metrics of dataset '{name}' (task {task}) in the {RUN_LABELS[run]} run; "
                               f'got {sorted(run_metrics)}.')
            row[f'psnr_{run}'] = float(run_metrics[name].get('psnr', math.nan))
            row[f'ssim_{run}'] = float(run_metrics[name].get('ssim', math.nan))
        row['delta_psnr'] = row['psnr_perceiveir'] - row['psnr_l1']
        row['delta_ssim'] = row['ssim_perceiveir'] - row['ssim_l1']
        rows.append(row)
    mean = {'task': 'mean', 'dataset': '', 'images': sum(r['images'] for r in rows)}
    for key in CSV_FIELDS[3:]:
        mean[key] = _mean([r[key] for r in rows])
    rows.append(mean)
    return rows


def write_csv(path, rows):
    """Write the rows as CSV (header :data:`CSV_FIELDS`, floats with 4 decimals)."""
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f'{row[k]:.4f}' if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})


def markdown_table(rows):
    """The rows as a markdown table (PSNR in dB, SSIM; Δ = Perceive-IR − L1 only)."""
    lines = ['| task | dataset | images | L1 only PSNR / SSIM | Perceive-IR PSNR / SSIM | Δ PSNR | Δ SSIM |',
             '|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        task = f"**{r['task']}**" if r['task'] == 'mean' else r['task']
        lines.append(f"| {task} | {r['dataset']} | {r['images']} | {r['psnr_l1']:.2f} / {r['ssim_l1']:.4f} | "
                     f"{r['psnr_perceiveir']:.2f} / {r['ssim_perceiveir']:.4f} | {r['delta_psnr']:+.2f} | "
                     f"{r['delta_ssim']:+.4f} |")
    return '\n'.join(lines)


def write_markdown(path, rows, title, notes=(), extra_sections=()):
    """Write the report: title, notes (bullets), the table, then extra ``(heading, text)`` sections."""
    parts = [f'# {title}', '']
    if notes:
        parts += [f'- {n}' for n in notes] + ['']
    parts += ['## Per-task results (BasicSR test pipeline, RGB, no border crop)', '', markdown_table(rows), '']
    for heading, text in extra_sections:
        parts += [f'## {heading}', '', text.rstrip(), '']
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts))


def _pyplot():
    import matplotlib
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    return plt


def smooth(values, window):
    """Trailing moving average (NaNs skipped); ``window`` <= 1 returns the values."""
    if window <= 1:
        return list(values)
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _plot_curve(ax, x, y, style, label, color=None):
    window = max(1, len(x) // 25) if len(x) > 30 else 1
    if window > 1:
        line, = ax.plot(x, y, style, alpha=0.2, color=color)
        ax.plot(x, smooth(y, window), style, color=line.get_color(), label=f'{label} (moving avg {window})')
    else:
        ax.plot(x, y, style, color=color, label=label)


def plot_losses(curves, path):
    """Loss curves of both runs.

    Args:
        curves (dict): ``{'l1': {'iter': [...], 'l_pix': [...]}, 'perceiveir': {'iter': [...],
            'l_pix': [...], 'l_cl': [...], ...}}`` (as from ``parse_train_log``).
        path (str): Output PNG.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run, style in (('l1', '--'), ('perceiveir', '-')):
        c = curves.get(run) or {}
        if c.get('iter') and 'l_pix' in c:
            _plot_curve(axes[0], c['iter'], c['l_pix'], style, f'{RUN_LABELS[run]}: L1 term')
    axes[0].set_xlabel('iteration')
    axes[0].set_ylabel('L1 (pixel) loss')
    axes[0].set_title('Reconstruction term, same data / seed / iterations')
    axes[0].legend()
    c = curves.get('perceiveir') or {}
    for key in [k for k in c if k.startswith('l_')]:
        _plot_curve(axes[1], c['iter'], c[key], '-', key, color='k' if key == 'l_total' else None)
    total = _total_curve(c)
    if total is not None:
        _plot_curve(axes[1], c['iter'], total, '-', 'L_total (weighted sum)', color='k')
    axes[1].set_xlabel('iteration')
    axes[1].set_ylabel('weighted loss term')
    axes[1].set_title('Perceive-IR loss terms')
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _total_curve(c):
    if c.get('l_total'):
        return None  # already plotted as its own term
    keys = [k for k in c if k.startswith('l_')]
    if len(keys) < 2:
        return None
    return [sum(c[k][i] for k in keys if math.isfinite(c[k][i])) for i in range(len(c['iter']))]


def plot_psnr(rows, path):
    """Grouped bars: PSNR per task for L1 only and Perceive-IR (the ``mean`` row included)."""
    plt = _pyplot()
    labels = [r['task'] if r['task'] != 'mean' else 'mean' for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4))
    for offset, run in ((-width / 2, 'l1'), (width / 2, 'perceiveir')):
        values = [r[f'psnr_{run}'] for r in rows]
        bars = ax.bar(x + offset, values, width, label=RUN_LABELS[run])
        for bar, v in zip(bars, values):
            ax.annotate(f'{v:.2f}', (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha='center',
                        va='bottom', fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_ylabel('PSNR (dB)')
    finite = [r[f'psnr_{run}'] for r in rows for run in ('l1', 'perceiveir') if math.isfinite(r[f'psnr_{run}'])]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 3), max(finite) + 2)
    ax.set_title('PSNR per task (test split)')
    ax.legend()
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label(img, text, height=18):
    import cv2
    bar = np.full((height, img.shape[1], 3), 255, np.uint8)
    scale = 0.4 if img.shape[1] < 160 else 0.5
    cv2.putText(bar, text, (3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def image_strip(panels, min_height=128, gap=4):
    """Side-by-side panels with a caption above each.

    Args:
        panels (Sequence[tuple[str, np.ndarray]]): ``(caption, (H, W, 3) uint8 RGB)``; all the
            same size (they are views of one test image).
        min_height (int): Small images are enlarged (nearest neighbour, integer factor) to at
            least this height so the pixels stay visible.
        gap (int): White pixels between panels.

    Returns:
        np.ndarray: (H', W', 3) uint8 RGB strip.
    """
    if not panels:
        raise ValueError('image_strip: no panels.')
    shapes = {p.shape for _, p in panels}
    if len(shapes) != 1:
        raise ValueError(f'image_strip: panels differ in shape: {sorted(shapes)}.')
    height = panels[0][1].shape[0]
    factor = max(1, int(math.ceil(min_height / max(1, height))))
    cells = []
    for caption, img in panels:
        img = np.ascontiguousarray(img, dtype=np.uint8)
        if factor > 1:
            img = img.repeat(factor, axis=0).repeat(factor, axis=1)
        cells.append(_label(img, caption))
        cells.append(np.full((cells[-1].shape[0], gap, 3), 255, np.uint8))
    return np.concatenate(cells[:-1], axis=1)


def stack_rows(strips, gap=6):
    """Stack strips vertically (padded with white to the widest)."""
    width = max(s.shape[1] for s in strips)
    rows = []
    for s in strips:
        pad = np.full((s.shape[0], width - s.shape[1], 3), 255, np.uint8)
        rows += [np.concatenate([s, pad], axis=1), np.full((gap, width, 3), 255, np.uint8)]
    return np.concatenate(rows[:-1], axis=0)


def save_png(path, rgb):
    """Write an (H, W, 3) uint8 RGB array as PNG."""
    import cv2
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f'Could not write {path}.')
