"""AMIRNet degradation tree: K-means splits, node bookkeeping, persistence, encoder heads."""
import io

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from perceive_ir_plugin.utils.degradation_tree import DegradationTree
from perceive_ir_plugin.utils.kmeans import canonical_labels, kmeans_labels, kmeans_torch


def _blobs(centers, per, std, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.as_tensor(centers, dtype=torch.float64)
    x = torch.cat([c + std * torch.randn(per, centers.shape[1], generator=g, dtype=torch.float64) for c in centers])
    truth = torch.arange(len(centers)).repeat_interleave(per)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], truth[perm]


def test_canonical_labels_orders_by_first_appearance():
    assert canonical_labels(np.array([5, 5, 2, 7, 2, 5])).tolist() == [0, 0, 1, 2, 1, 0]
    assert canonical_labels(torch.tensor([1, 0, 1])).tolist() == [0, 1, 0]


@pytest.mark.parametrize('k', [2, 4])
def test_kmeans_recovers_synthetic_clusters_and_matches_sklearn(k):
    centers = [[0, 0, 0], [6, 0, 0], [0, 6, 0], [0, 0, 6]][:k]
    x, truth = _blobs(centers, per=30, std=0.6, seed=k)
    ours = kmeans_labels(x, k, seed=3, backend='torch')
    sk = kmeans_labels(x, k, seed=3, backend='sklearn')
    assert torch.equal(ours, canonical_labels(truth))  # every blob recovered exactly
    assert torch.equal(ours, sk)
    # same objective as scikit-learn's own fit
    _, _, inertia = kmeans_torch(x, k, seed=0)
    ref = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert inertia == pytest.approx(ref, rel=1e-9)


def test_kmeans_degenerate_inputs():
    assert kmeans_labels(torch.ones(6, 2), 2).tolist() == [0] * 6  # identical points: one cluster
    assert kmeans_labels(torch.ones(6, 2), 2, backend='sklearn').tolist() == [0] * 6
    assert kmeans_labels(torch.tensor([[0.], [1.]]), 2).tolist() == [0, 1]  # as many points as clusters
    assert kmeans_labels(torch.zeros(1, 3), 2).tolist() == [0]
    with pytest.raises(ValueError, match="train.tree_kmeans"):
        kmeans_labels(torch.zeros(4, 2), 2, backend='faiss')


def test_tree_structure_node_ids_parents_levels():
    tree = DegradationTree(branching=2, depth=4)
    assert tree.level_sizes == [1, 2, 4, 8] and tree.rep_dim == 15
    assert [tree.parent(n) for n in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert tree.children(2) == [4, 5]
    assert tree.ancestors(5, 3) == [0, 1, 2, 5]
    tri = DegradationTree(branching=3, depth=3)
    assert tri.level_sizes == [1, 3, 9] and tri.rep_dim == 13 and tri.children(2) == [6, 7, 8]
    with pytest.raises(ValueError, match='does not exist at level 2'):
        tree.ancestors(4, 2)
    with pytest.raises(ValueError, match='Level 1 is out of range'):
        tree.labels_for(['a'], 1)  # not built yet


def _grow_full(tree, keys, feats):
    entries = []
    while not tree.is_complete:
        entries.append(tree.grow(keys, feats, current_iter=10 * tree.num_levels))
    return entries


def test_tree_growth_recovers_hierarchy_and_keeps_older_levels():
    # 8 well separated groups arranged hierarchically: coordinate 0 splits first (largest gap).
    codes = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float64)
    centers = codes * torch.tensor([100.0, 10.0, 1.0])
    x, truth = _blobs(centers, per=6, std=0.05, seed=0)
    keys = [f'task/{i:03d}' for i in range(len(x))]
    order = np.random.RandomState(0).permutation(len(keys))  # feed in a shuffled order
    tree = DegradationTree(branching=2, depth=4, seed=1)
    level1_before = None
    entries = []
    while not tree.is_complete:
        entries.append(tree.grow([keys[i] for i in order], x[order], current_iter=5 * tree.num_levels))
        if tree.num_levels == 2:
            level1_before = tree.labels[:, 1].clone()
    assert tree.num_levels == 4 and [e['level'] for e in entries] == [1, 2, 3]
    assert [e['iter'] for e in entries] == [5, 10, 15]
    assert torch.equal(tree.labels[:, 1], level1_before)  # older levels frozen
    leaf = tree.labels_for(keys, 3)
    # each leaf holds exactly one ground-truth group, and parent(child) is the stored level above
    for node in range(8):
        assert len(set(truth[leaf == node].tolist())) == 1 and int((leaf == node).sum()) == 6
    for lvl in (1, 2, 3):
        assert torch.equal(tree.labels[:, lvl] // 2, tree.labels[:, lvl - 1])
    assert tree.node_sizes(1) == [24, 24] and tree.node_sizes(3) == [6] * 8
    assert tree.path(keys[0]) == tree.ancestors(tree.path(keys[0])[-1], 3)
    assert tree.labels_for(['unknown/key', keys[0]], 2).tolist()[0] == -1
    with pytest.raises(RuntimeError, match='already has all 4 levels'):
        tree.grow(keys, x)


def test_tree_state_round_trip_through_weights_only_load():
    x, _ = _blobs([[0, 0], [5, 5]], per=8, std=0.3, seed=2)
    keys = [f'derain/{i}' for i in range(16)]
    tree = DegradationTree(seed=7)
    tree.grow(keys, x, current_iter=3)
    buf = io.BytesIO()
    torch.save({'iter': 3, 'degradation_tree': tree.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # what BasicSR's resume does on torch >= 2.6
    restored = DegradationTree(seed=0)
    restored.load_state_dict(state['degradation_tree'])
    assert restored.num_levels == 2 and restored.seed == 7 and restored.keys == keys
    assert torch.equal(restored.labels_for(keys, 1), tree.labels_for(keys, 1))
    # resuming reproduces the next split exactly
    x2, _ = _blobs([[0, 0], [0, 9], [5, 5], [5, 14]], per=4, std=0.2, seed=3)
    a = tree.grow(keys, x2, current_iter=6)
    b = restored.grow(keys, x2, current_iter=6)
    assert a == b and torch.equal(tree.labels, restored.labels)
    with pytest.raises(ValueError, match='branching=2 but the network/options use branching=3'):
        DegradationTree(branching=3).load_state_dict(tree.state_dict())


def test_encoder_heads_representation_and_features():
    from perceive_ir_plugin.archs.degradation_tree_arch import DegradationTreeEncoder
    torch.manual_seed(0)
    enc = DegradationTreeEncoder(channels=(8, 8, 16), head_hidden=16, active_levels=2).eval()
    out = enc(torch.rand(3, 3, 20, 24))
    assert out['rep'].shape == (3, 15) and [v.shape[1] for v in out['logits']] == [1, 2, 4, 8]
    expected = torch.softmax(out['logits'][1], 1) * out['preds'][1]
    assert torch.allclose(out['rep'][:, 1:3], expected)
    assert torch.allclose(out['rep'][:, 0], out['preds'][0][:, 0])  # one node: softmax is 1
    assert torch.count_nonzero(out['rep'][:, 3:]) == 0  # levels 2 and 3 inactive
    assert int(enc.state_dict()['active_levels']) == 2
    lq, gt = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    paths = torch.tensor([[0, 1], [0, 0], [0, -1]])
    feat = enc.tree_features(lq, gt, paths)
    assert feat.shape == (3, 3)
    assert feat[0, 1] == 0 and feat[1, 2] == 0 and feat[2, 1:].abs().sum() == 0
    assert torch.allclose(feat[:, 0], (enc.pred_heads[0](enc.embed(lq)) - enc.pred_heads[0](enc.embed(gt)))[:, 0])
    literal = DegradationTreeEncoder(channels=(8, 8, 16), head_hidden=16, sigmoid_logits=True)
    logits = literal(torch.rand(2, 3, 16, 16))['logits']
    assert all(((v > 0) & (v < 1)).all() for v in logits)
    with pytest.raises(ValueError, match='active_levels must be in 1..4'):
        enc.set_active_levels(5)
