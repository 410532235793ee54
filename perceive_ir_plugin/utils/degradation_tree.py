"""State of AMIRNet's degradation tree: levels, node ids and per-sample pseudo-labels.

The tree has ``depth`` levels. Level ``l`` has ``branching ** l`` nodes (1/2/4/8 for the
default ``branching=2, depth=4``). Node ids are numbered consecutively inside a level,
children of the same parent being contiguous, so the id alone determines the parent::

    parent(node) = node // branching        children(node) = node * branching + 0 .. branching - 1

Level 0 (the root) exists from the start and holds every sample. Each call to
:meth:`DegradationTree.grow` adds one level by running K-means (``k = branching``)
separately inside every current leaf; older levels are never re-clustered.

Pseudo-labels are stored per sample under the dataset's stable sample key (for the
plugin's LMDB packs ``"<task>/<lmdb key>"``), so they survive shuffling, repeat factors
and resume. :meth:`state_dict` contains only ints, strings, lists and one tensor and can
be stored in BasicSR's training state (which is read back with ``weights_only=True``).
"""
import torch

from perceive_ir_plugin.utils.kmeans import kmeans_labels

UNKNOWN = -1  # label of a sample that has no node at a level (yet)


class DegradationTree:
    """Per-sample node assignments of a K-means degradation tree.

    Args:
        branching (int): Children per node (K of every K-means split). Default 2.
        depth (int): Number of levels including the root. Default 4 (1/2/4/8 nodes).
        seed (int): Base seed; the split of leaf ``p`` when level ``l`` is built uses
            ``seed + 1000 * l + p``.

    Attributes:
        num_levels (int): Levels built so far (1 = only the root).
        keys (list[str]): Sample keys in the order they were first registered.
        labels (Tensor): (len(keys), depth) int64 node ids, ``-1`` where unknown.
        history (list[dict]): One entry per split (level, iteration, sizes, seeds).
    """

    def __init__(self, branching=2, depth=4, seed=0):
        if int(branching) < 2:
            raise ValueError(f'branching must be >= 2, got {branching}.')
        if int(depth) < 1:
            raise ValueError(f'depth must be >= 1, got {depth}.')
        self.branching = int(branching)
        self.depth = int(depth)
        self.seed = int(seed)
        self.num_levels = 1
        self.keys = []
        self._index = {}
        self.labels = torch.full((0, self.depth), UNKNOWN, dtype=torch.long)
        self.history = []

    # ------------------------------------------------------------------ structure
    def nodes_at(self, level):
        """Number of nodes at ``level`` (``branching ** level``)."""
        self._check_level(level, built_only=False)
        return self.branching**level

    @property
    def level_sizes(self):
        """list[int]: Nodes per level, e.g. ``[1, 2, 4, 8]``."""
        return [self.branching**lvl for lvl in range(self.depth)]

    @property
    def rep_dim(self):
        """int: Length of the representation vector (total node count, 15 by default)."""
        return sum(self.level_sizes)

    @property
    def is_complete(self):
        """bool: Every level has been built."""
        return self.num_levels >= self.depth

    def parent(self, node):
        """Parent id (one level up) of node ``node`` (a node below the root)."""
        return int(node) // self.branching

    def children(self, node):
        """Ids (one level down) of the children of ``node``."""
        return [int(node) * self.branching + c for c in range(self.branching)]

    def ancestors(self, node, level):
        """Node ids from the root down to ``node`` (which lies at ``level``).

        Returns:
            list[int]: ``level + 1`` ids, the first being the root ``0``.
        """
        self._check_level(level, built_only=False)
        if not 0 <= int(node) < self.branching**level:
            raise ValueError(f'Node {node} does not exist at level {level} ({self.branching ** level} nodes).')
        path = [int(node)]
        for _ in range(level):
            path.append(path[-1] // self.branching)
        return path[::-1]

    def _check_level(self, level, built_only=True):
        limit = self.num_levels if built_only else self.depth
        if not 0 <= int(level) < limit:
            what = 'built levels' if built_only else 'levels'
            raise ValueError(f'Level {level} is out of range: the tree has {limit} {what}.')

    # ------------------------------------------------------------------ labels
    def __len__(self):
        return len(self.keys)

    def __contains__(self, key):
        return key in self._index

    def register(self, keys):
        """Add unseen sample keys (root label 0, deeper levels unknown)."""
        new = [k for k in dict.fromkeys(keys) if k not in self._index]
        if not new:
            return
        for k in new:
            if not isinstance(k, str):
                raise TypeError(f'Sample keys must be strings, got {type(k).__name__}: {k!r}.')
            self._index[k] = len(self.keys)
            self.keys.append(k)
        rows = torch.full((len(new), self.depth), UNKNOWN, dtype=torch.long)
        rows[:, 0] = 0
        self.labels = torch.cat([self.labels, rows])

    def labels_for(self, keys, level, device=None):
        """Pseudo-labels of ``keys`` at ``level``.

        Args:
            keys (Sequence[str]): Sample keys (e.g. a batch's ``key`` list).
            level (int): A built level.
            device: Device of the returned tensor.

        Returns:
            Tensor: (len(keys),) int64 node ids; ``-1`` for a key with no node at this
            level (the cross-entropy ignores it). Level 0 is 0 for every key.
        """
        self._check_level(level)
        if level == 0:
            return torch.zeros(len(keys), dtype=torch.long, device=device)
        out = [int(self.labels[self._index[k], level]) if k in self._index else UNKNOWN for k in keys]
        return torch.tensor(out, dtype=torch.long, device=device)

    def path(self, key):
        """Node ids of ``key`` on every built level (``-1`` where unknown)."""
        if key not in self._index:
            return [0] + [UNKNOWN] * (self.num_levels - 1)
        return self.labels[self._index[key], :self.num_levels].tolist()

    def node_sizes(self, level):
        """Number of registered samples in each node of a built level."""
        self._check_level(level)
        col = self.labels[:, level]
        col = col[col >= 0]
        return torch.bincount(col, minlength=self.nodes_at(level)).tolist()

    # ------------------------------------------------------------------ growth
    def grow(self, keys, features, backend='torch', n_init=10, current_iter=None):
        """Build the next level by splitting every current leaf with K-means.

        Samples are processed in sorted key order so the result does not depend on
        loader order or on how features were gathered across processes.

        Args:
            keys (Sequence[str]): Unique sample keys, one per feature row.
            features (Tensor): (N, D) degradation features of those samples.
            backend (str): K-means back-end, ``'torch'`` or ``'sklearn'``.
            n_init (int): K-means seedings per split.
            current_iter (int, optional): Training iteration, recorded in the history.

        Returns:
            dict: The history entry of the new level (``level``, ``iter``, ``num_samples``,
            ``unplaced`` (keys whose parent is unknown), ``node_sizes``, ``seeds``).

        Raises:
            RuntimeError: The tree already has ``depth`` levels.
            ValueError: Keys are not unique or do not match the feature rows.
        """
        if self.is_complete:
            raise RuntimeError(f'The degradation tree already has all {self.depth} levels; nothing to grow.')
        keys = list(keys)
        features = torch.as_tensor(features).detach().to('cpu', torch.float64)
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise ValueError(f'grow() needs one feature row per key: {len(keys)} keys, features of shape '
                             f'{tuple(features.shape)}.')
        if len(set(keys)) != len(keys):
            raise ValueError('grow() needs unique sample keys (average the features of repeated samples first).')
        self.register(keys)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        rows = torch.tensor([self._index[keys[i]] for i in order], dtype=torch.long)
        feats = features[order] if order else features
        level = self.num_levels
        parents = self.labels[rows, level - 1] if len(rows) else torch.zeros(0, dtype=torch.long)
        seeds = []
        for p in range(self.nodes_at(level - 1)):
            members = torch.nonzero(parents == p).flatten()
            seed = self.seed + 1000 * level + p
            seeds.append(seed)
            if len(members) == 0:
                continue
            sub = kmeans_labels(feats[members], self.branching, seed=seed, backend=backend, n_init=n_init)
            self.labels[rows[members], level] = p * self.branching + sub
        self.num_levels = level + 1
        entry = {
            'level': level,
            'iter': -1 if current_iter is None else int(current_iter),
            'num_samples': len(keys),
            'unplaced': int((parents < 0).sum()),
            'node_sizes': self.node_sizes(level),
            'seeds': seeds,
        }
        self.history.append(entry)
        return entry

    # ------------------------------------------------------------------ persistence
    def state_dict(self):
        """Everything needed to reproduce the labels (weights-only loadable)."""
        return {
            'branching': self.branching,
            'depth': self.depth,
            'seed': self.seed,
            'num_levels': self.num_levels,
            'keys': list(self.keys),
            'labels': self.labels.clone(),
            'history': [dict(h) for h in self.history],
        }

    def load_state_dict(self, state):
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: The saved tree has another ``branching``/``depth`` than this one,
                or its contents are inconsistent.
        """
        for name in ('branching', 'depth'):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f'Saved degradation tree has {name}={state[name]} but the network/options use '
                                 f'{name}={getattr(self, name)}; resume with the same tree settings.')
        labels = torch.as_tensor(state['labels']).long()
        keys = list(state['keys'])
        if labels.shape != (len(keys), self.depth):
            raise ValueError(f'Saved degradation tree is inconsistent: {len(keys)} keys but labels of shape '
                             f'{tuple(labels.shape)}.')
        if not 1 <= int(state['num_levels']) <= self.depth:
            raise ValueError(f"Saved degradation tree has num_levels={state['num_levels']} outside 1..{self.depth}.")
        self.seed = int(state['seed'])
        self.num_levels = int(state['num_levels'])
        self.keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self.labels = labels.clone()
        self.history = [dict(h) for h in state.get('history', [])]

    def __repr__(self):
        return (f'{type(self).__name__}(branching={self.branching}, depth={self.depth}, '
                f'num_levels={self.num_levels}, samples={len(self.keys)})')
