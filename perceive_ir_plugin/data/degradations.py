"""Synthetic degradations (NumPy, CPU) and the pending-noise step of training (torch, any device).

NumPy functions take and return (H, W, 3) uint8 RGB arrays and draw every random number from the
``np.random.Generator`` they are given, so a seed reproduces the output. They make the stand-in demo
data (:mod:`perceive_ir_plugin.data.demo_data`); they are simple physical models, not the recipes of
the real benchmarks.

Training-time Gaussian noise is added by :func:`apply_pending_noise` after the batch is on its device.
The noise value of a pixel is a counter-based hash of ``(noise_seed, row, column, channel)`` in the
coordinates of the whole (possibly upscaled) training image, so two crops of one image (``lq`` and
``lq_pos``) carry the same noise realisation where they overlap, whatever the flips, and the result is
identical on CPU and GPU up to float rounding.
"""
import math

import cv2
import numpy as np
import torch

from perceive_ir_plugin.data.tasks import DEFAULT_SIGMAS, check_task


def _to_uint8(x):
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# NumPy degradations
# ---------------------------------------------------------------------------------------------------
def add_gaussian_noise(img, sigma, rng):
    """``clip(round(img + sigma * N(0, 1)))``; img (H, W, C) uint8, sigma on the 0-255 scale."""
    return _to_uint8(img.astype(np.float32) + rng.standard_normal(img.shape, dtype=np.float32) * float(sigma))


def line_kernel(length, angle_deg):
    """Normalised anti-aliased line of ``length`` pixels at ``angle_deg`` (0 = horizontal), (k, k) float32."""
    length = max(1, int(length))
    size = length if length % 2 == 1 else length + 1
    kernel = np.zeros((size, size), np.float32)
    c = (size - 1) / 2.0
    half = (length - 1) / 2.0
    dx, dy = math.cos(math.radians(angle_deg)) * half, -math.sin(math.radians(angle_deg)) * half
    shift = 8  # sub-pixel precision of cv2.line
    p0 = (int(round((c - dx) * (1 << shift))), int(round((c - dy) * (1 << shift))))
    p1 = (int(round((c + dx) * (1 << shift))), int(round((c + dy) * (1 << shift))))
    cv2.line(kernel, p0, p1, 1.0, thickness=1, lineType=cv2.LINE_AA, shift=shift)
    if kernel.sum() <= 0:
        kernel[int(c), int(c)] = 1.0
    return kernel / kernel.sum()


def motion_blur(img, rng, length=None, angle=None):
    """Linear motion blur: convolution with a line kernel (reflect border).

    Args:
        img (np.ndarray): (H, W, 3) uint8 RGB.
        rng (np.random.Generator): Random source.
        length (int | None): Kernel length in pixels; default 2-6 % of the short side (>= 3).
        angle (float | None): Direction in degrees; default uniform in [0, 180).
    """
    short = min(img.shape[:2])
    if length is None:
        length = max(3, int(round(short * rng.uniform(0.02, 0.06))))
    if angle is None:
        angle = rng.uniform(0.0, 180.0)
    out = cv2.filter2D(img.astype(np.float32), -1, line_kernel(length, angle), borderType=cv2.BORDER_REFLECT)
    return _to_uint8(out)


def add_rain_streaks(img, rng, density=None, length=None, angle=None, intensity=None):
    """Rain streaks: sparse random drops smeared by a line kernel, screen-blended onto the image.

    Args:
        img (np.ndarray): (H, W, 3) uint8 RGB.
        rng (np.random.Generator): Random source.
        density (float | None): Fraction of pixels that start a streak (default 0.2-0.6 %).
        length (int | None): Streak length in pixels (default 5-12 % of the short side).
        angle (float | None): Degrees away from vertical (default uniform in [-25, 25]).
        intensity (float | None): Streak brightness in (0, 1] (default 0.6-0.9).
    """
    h, w = img.shape[:2]
    density = rng.uniform(0.002, 0.006) if density is None else density
    length = max(3, int(round(min(h, w) * rng.uniform(0.05, 0.12)))) if length is None else length
    angle = rng.uniform(-25.0, 25.0) if angle is None else angle
    intensity = rng.uniform(0.6, 0.9) if intensity is None else intensity
    drops = (rng.random((h, w)) < density).astype(np.float32) * rng.uniform(0.5, 1.0, (h, w)).astype(np.float32)
    streaks = cv2.filter2D(drops, -1, line_kernel(length, 90.0 + angle) * length, borderType=cv2.BORDER_CONSTANT)
    streaks = np.clip(cv2.GaussianBlur(streaks, (3, 3), 0), 0.0, 1.0)[..., None] * intensity
    base = img.astype(np.float32) / 255.0
    return _to_uint8((1.0 - (1.0 - base) * (1.0 - streaks)) * 255.0)


def depth_like_map(img):
    """A smooth pseudo-depth in [0, 1] (1 = far): mostly 'higher in the frame is farther', plus blurred
    brightness (bright regions such as sky read as far). (H, W) float32."""
    h, w = img.shape[:2]
    rows = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    blurred = cv2.GaussianBlur(grey, (0, 0), sigmaX=max(h, w) / 20.0)
    depth = 0.65 * rows + 0.35 * blurred
    depth -= depth.min()
    return depth / max(float(depth.max()), 1e-6)


def add_haze(img, rng, beta=None, airlight=None, depth=None):
    """Haze by the atmospheric scattering model ``I = J * t + A * (1 - t)``, ``t = exp(-beta * d)``.

    Args:
        img (np.ndarray): (H, W, 3) uint8 RGB, the clear scene J.
        rng (np.random.Generator): Random source.
        beta (float | None): Scattering coefficient (default uniform in [0.8, 2.0]).
        airlight (float | None): Atmospheric light A in [0, 1] (default uniform in [0.75, 0.95]).
        depth (np.ndarray | None): (H, W) depth in [0, 1]; default :func:`depth_like_map`.
    """
    beta = rng.uniform(0.8, 2.0) if beta is None else beta
    airlight = rng.uniform(0.75, 0.95) if airlight is None else airlight
    depth = depth_like_map(img) if depth is None else depth
    t = np.exp(-beta * depth.astype(np.float32))[..., None]
    j = img.astype(np.float32) / 255.0
    return _to_uint8((j * t + airlight * (1.0 - t)) * 255.0)


def low_light(img, rng, gamma=None, scale=None, read_noise=None, shot_noise=None):
    """Low light: ``scale * J ** gamma`` plus signal-dependent Gaussian noise, quantised.

    Args:
        img (np.ndarray): (H, W, 3) uint8 RGB.
        rng (np.random.Generator): Random source.
        gamma (float | None): Darkening exponent (default uniform in [2.0, 3.0]).
        scale (float | None): Exposure factor (default uniform in [0.15, 0.4]).
        read_noise (float | None): Noise std on the 0-255 scale (default uniform in [1, 3]).
        shot_noise (float | None): Extra variance per unit of signal (default uniform in [0.02, 0.06]).
    """
    gamma = rng.uniform(2.0, 3.0) if gamma is None else gamma
    scale = rng.uniform(0.15, 0.4) if scale is None else scale
    read_noise = rng.uniform(1.0, 3.0) if read_noise is None else read_noise
    shot_noise = rng.uniform(0.02, 0.06) if shot_noise is None else shot_noise
    dark = scale * (img.astype(np.float32) / 255.0) ** gamma * 255.0
    std = np.sqrt(read_noise ** 2 + shot_noise * dark)
    return _to_uint8(dark + std * rng.standard_normal(dark.shape, dtype=np.float32))


def synthesize(img, task, rng, sigma=None):
    """Degrade a clean (H, W, 3) uint8 RGB image for ``task`` (denoise uses ``sigma`` or a random one of
    :data:`DEFAULT_SIGMAS`)."""
    check_task(task)
    if task == 'denoise':
        return add_gaussian_noise(img, rng.choice(DEFAULT_SIGMAS) if sigma is None else sigma, rng)
    if task == 'derain':
        return add_rain_streaks(img, rng)
    if task == 'dehaze':
        return add_haze(img, rng)
    if task == 'deblur':
        return motion_blur(img, rng)
    return low_light(img, rng)


# ---------------------------------------------------------------------------------------------------
# Evaluation-protocol noise (SPEC §8.4), uint8 in / uint8 out
# ---------------------------------------------------------------------------------------------------
def protocol_noise_numpy(clean, sigma, rs):
    """3-task protocol step: ``clip(clean + rs.randn(*shape) * sigma, 0, 255).astype(uint8)`` (truncating,
    as PromptIR's test set does); ``rs`` is the shared ``np.random.RandomState`` advanced in place."""
    noise = rs.randn(*clean.shape) * float(sigma)
    return np.clip(clean.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def protocol_noise_torch(clean, sigma, seed):
    """5-task protocol: noise from ``torch.Generator().manual_seed(seed)`` drawn in (C, H, W) order on the
    0-255 scale, clamped and rounded to uint8. ``clean`` is (H, W, 3) uint8 RGB; returns the same layout."""
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.from_numpy(np.ascontiguousarray(clean.transpose(2, 0, 1))).float()
    noisy = (x + torch.randn(x.shape, generator=gen) * float(sigma)).clamp_(0, 255).round_()
    return noisy.to(torch.uint8).numpy().transpose(1, 2, 0).copy()


# ---------------------------------------------------------------------------------------------------
# Counter-based Gaussian noise in torch (pending training noise)
# ---------------------------------------------------------------------------------------------------
def _signed(v):
    return v - (1 << 64) if v >= (1 << 63) else v


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_GOLDEN2 = _signed((2 * 0x9E3779B97F4A7C15) % (1 << 64))
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_COORD_BITS = 20  # rows and columns below 2**20 = 1,048,576 pixels


def _shr(x, s):
    """Logical right shift of int64 tensors."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z):
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def hashed_normal(seeds, rows, cols, channels=3):
    """Standard normal values indexed by (seed, row, column, channel).

    Args:
        seeds (Tensor): (B,) int64.
        rows (Tensor): (B, H) int64 absolute row of each output row.
        cols (Tensor): (B, W) int64 absolute column of each output column.
        channels (int): Number of channels C.

    Returns:
        Tensor: (B, C, H, W) float32 N(0, 1) on the device of ``seeds``.
    """
    dev = seeds.device
    base = _mix64(seeds.to(torch.int64)).view(-1, 1, 1, 1)
    ch = torch.arange(channels, device=dev, dtype=torch.int64).view(1, -1, 1, 1)
    index = ((rows.view(rows.shape[0], 1, -1, 1) << _COORD_BITS) + cols.view(cols.shape[0], 1, 1, -1)) * 4 + ch
    bits = _mix64(base + index * _GOLDEN2)
    # two 23-bit uniforms in (0, 1) from disjoint bit ranges of one 64-bit hash
    u1 = (_shr(bits, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    u2 = (((bits >> 9) & ((1 << 23) - 1)).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def crop_noise(shape, seeds, boxes, device=None):
    """Noise of crops in whole-image coordinates.

    Args:
        shape (tuple): (B, C, H, W) of the crops.
        seeds (Tensor): (B,) int64 noise seeds.
        boxes (Tensor | None): (B, 4) int64 ``[top, left, hflip, vflip]`` of each crop in its image
            (flips applied after cropping); ``None`` means crops at (0, 0) without flips.
        device (torch.device | None): Defaults to the device of ``seeds``.

    Returns:
        Tensor: (B, C, H, W) float32 N(0, 1).
    """
    b, c, h, w = shape
    device = seeds.device if device is None else device
    seeds = seeds.to(device)
    if boxes is None:
        boxes = torch.zeros(b, 4, dtype=torch.int64, device=device)
    boxes = boxes.to(device=device, dtype=torch.int64).view(b, 4)
    i = torch.arange(h, device=device, dtype=torch.int64).view(1, h)
    j = torch.arange(w, device=device, dtype=torch.int64).view(1, w)
    rows = boxes[:, 0:1] + torch.where(boxes[:, 3:4] > 0, h - 1 - i, i)
    cols = boxes[:, 1:2] + torch.where(boxes[:, 2:3] > 0, w - 1 - j, j)
    return hashed_normal(seeds, rows, cols, c)


def apply_pending_noise(data):
    """Add the Gaussian noise that the dataset left pending, on the device the tensors are on.

    For every sample with ``sigma > 0``, ``lq`` and ``lq_pos`` (if present) become
    ``clamp(x + sigma / 255 * n, 0, 1)`` (not quantised, like the official training), with ``n`` from
    :func:`crop_noise` using ``noise_seed`` and the crop boxes ``crop`` / ``crop_pos``. Samples with
    ``sigma == 0`` are untouched. Sets ``data['noise_applied']`` so that a second call is a no-op; keeps
    ``sigma`` (models may use it). Works on batched ((B, 3, H, W), ``sigma`` (B,)) and single-sample
    ((3, H, W), scalar ``sigma``) dicts.

    Args:
        data (dict): Batch from :class:`AllInOneDataset` (``lq``, ``sigma``, ``noise_seed``, ``crop``,
            optionally ``lq_pos``, ``crop_pos``).

    Returns:
        dict: ``data``, modified in place.
    """
    if 'sigma' not in data or 'lq' not in data:
        return data
    lq = data['lq']
    device = lq.device
    sigma = torch.as_tensor(data['sigma'], device=device, dtype=torch.float32)
    single = lq.dim() == 3
    sigma = sigma.reshape(-1)
    applied = data.get('noise_applied')
    if applied is not None and bool(torch.as_tensor(applied).all()):
        return data
    active = (sigma > 0).nonzero().flatten()
    if active.numel() > 0:
        seeds = torch.as_tensor(data.get('noise_seed', torch.zeros_like(sigma, dtype=torch.int64)),
                                device=device).reshape(-1).to(torch.int64)
        for name, box_name in (('lq', 'crop'), ('lq_pos', 'crop_pos')):
            if name not in data:
                continue
            x = data[name]
            xb = x.unsqueeze(0) if single else x
            boxes = data.get(box_name)
            boxes = None if boxes is None else torch.as_tensor(boxes, device=device).reshape(-1, 4)
            sub = xb.index_select(0, active).float()
            noise = crop_noise(tuple(sub.shape), seeds.index_select(0, active),
                               None if boxes is None else boxes.index_select(0, active), device)
            sub = (sub + noise * (sigma.index_select(0, active) / 255.0).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
            xb = xb.index_copy(0, active, sub.to(xb.dtype))
            data[name] = xb.squeeze(0) if single else xb
    flag = torch.ones(sigma.shape, dtype=torch.bool, device=device)
    data['noise_applied'] = flag.squeeze(0) if single else flag
    return data
