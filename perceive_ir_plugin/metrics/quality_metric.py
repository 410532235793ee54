"""Stage-1 quality-perception metrics over low / medium / high triplets (SPEC §2.4).

Every function takes ``probs``: an array (N, 3, C) of class probabilities (softmax of the
quality perceiver's logits, C = 3 classes terrible / mediocre / excellent) for the low,
medium and high member of N triplets, in that order; tier t's correct class is t.
Extra option keys (``better``) are ignored, following BasicSR's metric convention.
"""
import numpy as np

from basicsr.utils.registry import METRIC_REGISTRY

TIER_NAMES = ('low', 'medium', 'high')


def _as_probs(probs):
    if hasattr(probs, 'detach'):
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[1] != len(TIER_NAMES):
        raise ValueError(f'Quality metrics expect probs of shape (N, 3, C) (low/medium/high rows); got {probs.shape}.')
    if probs.shape[0] == 0:
        raise ValueError('Quality metrics got no triplets (N = 0).')
    return probs


@METRIC_REGISTRY.register()
def calculate_tier_accuracy(probs, tier=None, **kwargs):
    """Share of images classified into their own tier.

    Args:
        probs (array | Tensor): (N, 3, C) probabilities.
        tier (str | None): ``'low'``, ``'medium'`` or ``'high'``; None or ``'all'`` = all 3N images.

    Returns:
        float: Accuracy in [0, 1].
    """
    pred = _as_probs(probs).argmax(axis=-1)  # (N, 3)
    correct = pred == np.arange(len(TIER_NAMES))[None]
    if tier is None or tier == 'all':
        return float(correct.mean())
    if tier not in TIER_NAMES:
        raise ValueError(f"calculate_tier_accuracy: option tier must be one of {TIER_NAMES}, 'all' or null; "
                         f"got '{tier}'.")
    return float(correct[:, TIER_NAMES.index(tier)].mean())


@METRIC_REGISTRY.register()
def calculate_strict_triplet_rate(probs, **kwargs):
    """Share of triplets whose three members are all classified correctly.

    Args:
        probs (array | Tensor): (N, 3, C) probabilities.

    Returns:
        float: Rate in [0, 1].
    """
    pred = _as_probs(probs).argmax(axis=-1)
    return float((pred == np.arange(len(TIER_NAMES))[None]).all(axis=1).mean())


@METRIC_REGISTRY.register()
def calculate_monotonic_rate(probs, **kwargs):
    """Share of triplets whose expected tier index rises strictly from low to medium to high.

    The expected tier index of an image is ``sum_k p_k * k``.

    Args:
        probs (array | Tensor): (N, 3, C) probabilities.

    Returns:
        float: Rate in [0, 1].
    """
    probs = _as_probs(probs)
    expected = (probs * np.arange(probs.shape[-1])[None, None]).sum(axis=-1)  # (N, 3)
    return float(((expected[:, 0] < expected[:, 1]) & (expected[:, 1] < expected[:, 2])).mean())
