"""AMIRNet's degradation encoder with per-level tree heads (ACM MM 2023, arXiv 2308.03021).

The encoder maps a degraded image to a soft path through a degradation tree whose
level ``l`` has ``branching ** l`` nodes. For every level it predicts

* ``logits[l]`` - the node classifier (AMIRNet's "mask" head), trained by cross-entropy
  against the K-means pseudo-labels of :class:`~perceive_ir_plugin.utils.degradation_tree.DegradationTree`;
* ``preds[l]`` - one learned scalar per node (AMIRNet's "pred" head), trained only
  through the restoration loss;

and the representation ``r_l = softmax(logits[l]) * preds[l]``. The concatenation over
levels (length ``sum(branching ** l)``, 15 by default) conditions the restoration
network; levels at or beyond :attr:`DegradationTreeEncoder.active_levels` contribute zeros.
"""
import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY


class EncoderResBlock(nn.Module):
    """conv3x3-BN-LeakyReLU-conv3x3-BN plus a 1x1-conv-BN shortcut, then LeakyReLU.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the first conv and of the shortcut.
        negative_slope (float): LeakyReLU slope (0.1 in AMIRNet).
    """

    def __init__(self, in_channels, out_channels, stride=1, negative_slope=0.1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False), nn.BatchNorm2d(out_channels))
        self.negative_slope = negative_slope

    def forward(self, x):
        """(B, Cin, H, W) -> (B, Cout, ceil(H/stride), ceil(W/stride))."""
        return F.leaky_relu(self.body(x) + self.shortcut(x), self.negative_slope)


def _mlp(in_features, hidden, out_features, negative_slope):
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.LeakyReLU(negative_slope, inplace=True),
        nn.Linear(hidden, out_features))


@ARCH_REGISTRY.register()
class DegradationTreeEncoder(nn.Module):
    """Degradation encoder + per-level node classifier and node regression heads.

    Args:
        in_channels (int): Image channels. Default 3.
        channels (Sequence[int]): Widths of the three residual stages (strides 1, 2, 2).
            Default ``(64, 128, 256)`` as in AMIRNet; the last one is the embedding size.
        branching (int): Children per node. Default 2.
        depth (int): Tree levels including the root. Default 4 (1/2/4/8 nodes).
        head_hidden (int): Hidden width of every head MLP. Default 256.
        active_levels (int, optional): Levels that contribute to the representation
            (``1..depth``); default ``depth`` (inference). The training model lowers it
            while the tree is being grown. Stored as a buffer, so checkpoints keep it.
        sigmoid_logits (bool): Reproduce the released code literally: pass the classifier
            output through a sigmoid before using it as CE logits and in the softmax.
            Default False (raw logits; the sigmoid caps the CE confidence).
        negative_slope (float): LeakyReLU slope. Default 0.1.
    """

    def __init__(self,
                 in_channels=3,
                 channels=(64, 128, 256),
                 branching=2,
                 depth=4,
                 head_hidden=256,
                 active_levels=None,
                 sigmoid_logits=False,
                 negative_slope=0.1):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f'DegradationTreeEncoder: channels must list 3 stage widths, got {list(channels)}.')
        if int(branching) < 2 or int(depth) < 1:
            raise ValueError(f'DegradationTreeEncoder: need branching >= 2 and depth >= 1, got {branching}, {depth}.')
        self.branching = int(branching)
        self.depth = int(depth)
        self.level_sizes = [self.branching**lvl for lvl in range(self.depth)]
        self.rep_dim = sum(self.level_sizes)
        self.sigmoid_logits = bool(sigmoid_logits)
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            EncoderResBlock(in_channels, c1, 1, negative_slope),
            EncoderResBlock(c1, c2, 2, negative_slope),
            EncoderResBlock(c2, c3, 2, negative_slope),
        )
        self.embed_dim = c3
        self.mask_heads = nn.ModuleList(_mlp(c3, head_hidden, n, negative_slope) for n in self.level_sizes)
        self.pred_heads = nn.ModuleList(_mlp(c3, head_hidden, n, negative_slope) for n in self.level_sizes)
        self.register_buffer('active_levels', torch.tensor(self.depth, dtype=torch.long))
        self.set_active_levels(self.depth if active_levels is None else active_levels)

    def set_active_levels(self, levels):
        """Set how many levels (from the root) feed the representation (``1..depth``)."""
        levels = int(levels)
        if not 1 <= levels <= self.depth:
            raise ValueError(f'active_levels must be in 1..{self.depth}, got {levels}.')
        self.active_levels.fill_(levels)

    def embed(self, x):
        """(B, C, H, W) image in [0, 1] -> (B, embed_dim) globally pooled features."""
        return self.body(x).mean((2, 3))

    def heads(self, emb):
        """Per-level classifier logits and node regressions of an embedding.

        Returns:
            tuple[list[Tensor], list[Tensor]]: ``logits[l]`` and ``preds[l]``, each (B, n_l).
        """
        logits = [head(emb) for head in self.mask_heads]
        if self.sigmoid_logits:
            logits = [torch.sigmoid(v) for v in logits]
        return logits, [head(emb) for head in self.pred_heads]

    def representation(self, logits, preds):
        """(B, rep_dim) concatenation of ``softmax(logits[l]) * preds[l]``; inactive levels are 0.

        Inactive levels are multiplied by zero rather than skipped, so every parameter
        takes part in the graph (DDP needs no ``find_unused_parameters``).
        """
        active = int(self.active_levels)
        parts = []
        for lvl, (logit, pred) in enumerate(zip(logits, preds)):
            part = torch.softmax(logit, dim=1) * pred
            parts.append(part if lvl < active else part * 0.0)
        return torch.cat(parts, dim=1)

    def forward(self, x):
        """Encode a degraded image.

        Args:
            x (Tensor): (B, C, H, W), RGB, [0, 1].

        Returns:
            dict: ``rep`` (B, rep_dim) representation; ``logits`` and ``preds``: lists of
            ``depth`` tensors (B, n_l); ``embedding`` (B, embed_dim).
        """
        emb = self.embed(x)
        logits, preds = self.heads(emb)
        return {'rep': self.representation(logits, preds), 'logits': logits, 'preds': preds, 'embedding': emb}

    @torch.no_grad()
    def tree_features(self, lq, gt, paths, mode='pred'):
        """Degradation features used to split the tree (content removed by subtracting the clean image).

        Args:
            lq (Tensor): (B, C, H, W) degraded images, RGB, [0, 1].
            gt (Tensor): (B, C, H, W) clean images, RGB, [0, 1].
            paths (Tensor): (B, L) int64 node ids of each sample on the ``L`` built levels
                (``-1`` where unknown).
            mode (str): ``'pred'`` (AMIRNet): for every built level, (pred head on ``lq`` -
                pred head on ``gt``) times the one-hot of the sample's node, concatenated
                (dimension 1, 3, 7 ... as levels are added). ``'embedding'``: the pooled
                encoder features ``embed(lq) - embed(gt)`` (dimension ``embed_dim``).

        Returns:
            Tensor: (B, D) float32 features.
        """
        e_lq, e_gt = self.embed(lq), self.embed(gt)
        if mode == 'embedding':
            return e_lq - e_gt
        if mode != 'pred':
            raise ValueError(f"Unknown tree feature mode '{mode}' (option 'train.tree_feature'); "
                             "choose 'pred' or 'embedding'.")
        parts = []
        for lvl in range(paths.shape[1]):
            head = self.pred_heads[lvl]
            diff = head(e_lq) - head(e_gt)
            node = paths[:, lvl].to(diff.device)
            onehot = F.one_hot(node.clamp_min(0), self.level_sizes[lvl]).to(diff.dtype)
            onehot = onehot * (node >= 0).to(diff.dtype)[:, None]
            parts.append(diff * onehot)
        return torch.cat(parts, dim=1)
