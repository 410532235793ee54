"""K-means for splitting the leaves of AMIRNet's degradation tree.

Two interchangeable back-ends return the same *canonical* labelling:

* ``'torch'`` - a small Lloyd's algorithm with greedy k-means++ seeding, written for
  this project (CPU or GPU tensors, float64, deterministic for a given seed);
* ``'sklearn'`` - :class:`sklearn.cluster.KMeans` (what the released AMIRNet uses).

Cluster ids returned by either back-end are renumbered so that cluster ``0`` is the
cluster of sample ``0``, cluster ``1`` the cluster of the first sample not in cluster
``0``, and so on. Two runs that find the same partition therefore return identical
label vectors, whatever order the algorithm discovered the centres in.
"""
import math
import warnings

import numpy as np
import torch

KMEANS_BACKENDS = ('torch', 'sklearn')


def canonical_labels(labels):
    """Renumber cluster ids in order of first appearance.

    Args:
        labels (Tensor | ndarray): (N,) integer cluster ids.

    Returns:
        Tensor: (N,) int64, ids ``0..m-1`` where ``m`` is the number of distinct ids and
        id ``j`` is the ``j``-th distinct id met when reading ``labels`` from the start.
    """
    labels = torch.as_tensor(np.asarray(labels)).long()
    mapping = {}
    out = torch.empty_like(labels)
    for i, value in enumerate(labels.tolist()):
        if value not in mapping:
            mapping[value] = len(mapping)
        out[i] = mapping[value]
    return out


def _sq_dist(x, centers):
    """(N, D), (K, D) -> (N, K) squared Euclidean distances, clamped at 0."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centers.T + (centers * centers).sum(1)[None]
    return d.clamp_min_(0.0)


def kmeans_plusplus(x, k, generator, n_local_trials=None):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, with ``2 + ln k`` trials per centre).

    Args:
        x (Tensor): (N, D) float64 samples.
        k (int): Number of centres.
        generator (torch.Generator): CPU generator that drives every random choice.
        n_local_trials (int, optional): Candidates tried per centre; ``2 + int(ln k)`` when None.

    Returns:
        Tensor: (k, D) initial centres (rows of ``x``).
    """
    n = x.shape[0]
    trials = n_local_trials or 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = _sq_dist(x, x[first:first + 1])[:, 0]
    for _ in range(1, k):
        potential = closest.sum()
        if potential <= 0:  # every point already coincides with a centre
            centers.append(x[int(torch.randint(n, (1,), generator=generator))])
            continue
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), draws).clamp_(max=n - 1)
        cand_dist = torch.minimum(closest[None], _sq_dist(x, x[candidates]).T)  # (trials, N)
        best = int(torch.argmin(cand_dist.sum(1)))
        centers.append(x[candidates[best]])
        closest = cand_dist[best]
    return torch.stack(centers)


def _lloyd(x, centers, max_iter, tol):
    """Lloyd iterations from ``centers``; returns (labels, centers, inertia)."""
    k = centers.shape[0]
    for _ in range(max_iter):
        labels = _sq_dist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        new = centers.clone()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        if not bool(filled.all()):
            # Re-seed an empty cluster on the point farthest from its centre.
            far = _sq_dist(x, new).min(1).values
            for j in torch.nonzero(~filled).flatten().tolist():
                idx = int(far.argmax())
                new[j] = x[idx]
                far[idx] = -1.0
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    dist = _sq_dist(x, centers)
    labels = dist.argmin(1)
    inertia = float(dist.gather(1, labels[:, None]).sum())
    return labels, centers, inertia


def kmeans_torch(x, k, n_init=10, max_iter=300, tol=1e-4, seed=0):
    """K-means with greedy k-means++ seeding, best of ``n_init`` runs.

    ``tol`` is relative to the mean per-feature variance of ``x``, as in scikit-learn.

    Args:
        x (Tensor): (N, D) samples (any float dtype and device; computed in float64).
        k (int): Number of clusters, ``1 <= k``.
        n_init (int): Independent seedings; the run with the lowest inertia is kept.
        max_iter (int): Lloyd iterations per run.
        tol (float): Relative centre-shift tolerance that stops a run.
        seed (int): Seed of the CPU generator used for seeding.

    Returns:
        tuple[Tensor, Tensor, float]: labels (N,) int64 (raw, not canonical), centres
        (k, D) float64, inertia (sum of squared distances to the assigned centre).
    """
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f'kmeans_torch expects a non-empty (N, D) feature matrix, got shape {tuple(x.shape)}.')
    generator = torch.Generator().manual_seed(int(seed))
    abs_tol = float(x.var(0, unbiased=False).mean()) * tol
    best = None
    for _ in range(max(1, n_init)):
        init = kmeans_plusplus(x, k, generator)
        result = _lloyd(x, init, max_iter, abs_tol)
        if best is None or result[2] < best[2]:
            best = result
    return best


def kmeans_labels(features, k, seed=0, backend='torch', n_init=10, max_iter=300):
    """Cluster ``features`` into at most ``k`` groups and return canonical labels.

    With fewer distinct samples than ``k`` some clusters stay empty; the returned ids
    are then ``0..m-1`` with ``m < k``.

    Args:
        features (Tensor | ndarray): (N, D) samples, N >= 1.
        k (int): Number of clusters.
        seed (int): Random seed (``random_state`` for scikit-learn).
        backend (str): ``'torch'`` or ``'sklearn'``.
        n_init (int): Number of seedings (best inertia kept).
        max_iter (int): Lloyd iterations per seeding.

    Returns:
        Tensor: (N,) int64 canonical cluster ids (see :func:`canonical_labels`).
    """
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"Unknown K-means backend '{backend}' (option 'train.tree_kmeans'); "
                         f'choose one of {KMEANS_BACKENDS}.')
    x = torch.as_tensor(features).detach().to('cpu', torch.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if k <= 1 or n == 1:
        return torch.zeros(n, dtype=torch.long)
    if n <= k:
        return canonical_labels(torch.arange(n))
    if backend == 'sklearn':
        from sklearn.cluster import KMeans
        with warnings.catch_warnings():
            # Fewer distinct points than k: scikit-learn warns and leaves clusters empty.
            warnings.simplefilter('ignore')
            raw = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=int(seed)).fit_predict(
                x.numpy())
    else:
        raw = kmeans_torch(x, k, n_init=n_init, max_iter=max_iter, seed=seed)[0]
    return canonical_labels(raw)
