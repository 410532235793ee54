"""Degradation contrastive loss (L_cl) on the compact degradation embeddings Z (SPEC §6)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_negatives(z, task):
    """Gather the (detached) embeddings and task ids of every rank's batch.

    Per-rank batches may have different sizes: sizes are exchanged first, tensors padded
    to the largest, gathered, then trimmed. Nothing gathered carries a gradient; the
    caller keeps its local ``z`` (with gradient) for the anchors.

    Args:
        z (Tensor): (B, D) local embeddings.
        task (Tensor): (B,) int64 local task ids.

    Returns:
        tuple[Tensor, Tensor]: (N, D) detached embeddings and (N,) task ids of the global
        batch, rank 0's samples first. Without an initialised process group: the inputs.
    """
    z = z.detach()
    if _world_size() == 1:
        return z, task
    world = _world_size()
    size = torch.tensor([z.shape[0]], device=z.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    pad = longest - z.shape[0]
    z_pad = torch.cat([z, z.new_zeros(pad, z.shape[1])]) if pad else z.contiguous()
    t_pad = torch.cat([task, task.new_full((pad, ), -1)]) if pad else task.contiguous()
    zs = [torch.empty_like(z_pad) for _ in range(world)]
    ts = [torch.empty_like(t_pad) for _ in range(world)]
    dist.all_gather(zs, z_pad)
    dist.all_gather(ts, t_pad)
    return (torch.cat([g[:n] for g, n in zip(zs, sizes)]), torch.cat([g[:n] for g, n in zip(ts, sizes)]))


@LOSS_REGISTRY.register()
class DegradationContrastiveLoss(nn.Module):
    """InfoNCE between two crops of the same degraded image, other tasks as negatives.

    For every anchor ``i`` (Z of the LQ crop), the positive is Z of the second crop of the
    same degraded image and the negatives are the **detached** anchor embeddings of all
    samples of the global batch (every rank under DDP) whose task differs from ``i``'s.
    The loss of an anchor is the cross-entropy of ``[pos, negs] / temperature`` with
    target 0; anchors without any cross-task negative are skipped; the result is the
    mean over the remaining anchors (0, still attached to the graph, when none is left).
    Gradients flow through the anchors and the positives only.

    Args:
        loss_weight (float): Multiplier of the loss. Default: 1.0.
        temperature (float): InfoNCE temperature τ. Default: 0.1 (release).
        gather_distributed (bool): Gather negatives across ranks when a process group
            is initialised. Default: True.
    """

    def __init__(self, loss_weight=1.0, temperature=0.1, gather_distributed=True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'DegradationContrastiveLoss: temperature must be > 0, got {temperature}.')
        self.loss_weight = loss_weight
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, anchor, positive, task):
        """Compute the loss.

        Args:
            anchor (Tensor): (B, D) embeddings of the LQ crops (L2-normalised again here).
            positive (Tensor): (B, D) embeddings of the second crops.
            task (Tensor): (B,) int64 task ids.

        Returns:
            Tensor: Scalar loss times ``loss_weight``.
        """
        if anchor.shape != positive.shape or anchor.dim() != 2:
            raise ValueError(f'DegradationContrastiveLoss: anchor {tuple(anchor.shape)} and positive '
                             f'{tuple(positive.shape)} must both be (B, D).')
        task = task.reshape(-1).to(device=anchor.device, dtype=torch.long)
        if task.numel() != anchor.shape[0]:
            raise ValueError(f'DegradationContrastiveLoss: {task.numel()} task ids for {anchor.shape[0]} anchors.')
        with torch.autocast(device_type=anchor.device.type, enabled=False):
            a = F.normalize(anchor.float(), dim=1)
            p = F.normalize(positive.float(), dim=1)
            if self.gather_distributed:
                bank, bank_task = gather_negatives(a, task)
            else:
                bank, bank_task = a.detach(), task
            neg_mask = task[:, None] != bank_task[None, :]
            valid = neg_mask.any(dim=1)
            if not bool(valid.any()):
                return (anchor.sum() + positive.sum()) * 0.0
            pos = (a * p).sum(dim=1, keepdim=True)
            neg = (a @ bank.t()).masked_fill(~neg_mask, float('-inf'))
            logits = torch.cat([pos, neg], dim=1)[valid] / self.temperature
            target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            loss = F.cross_entropy(logits, target)
        return loss * self.loss_weight
