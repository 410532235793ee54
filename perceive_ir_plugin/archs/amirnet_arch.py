"""AMIRNet (Zhang et al., ACM MM 2023, arXiv 2308.03021) as a BasicSR arch.

All-in-one restoration conditioned on a hierarchical degradation representation: a
NAFNet U-Net whose encoder blocks are feature transform blocks (:class:`FTB`) driven by
the soft tree path of a :class:`DegradationTreeEncoder`. Middle and decoder blocks are
plain NAFBlocks, as in the release. The tree itself (pseudo-labels, K-means growth) is
trained by :class:`perceive_ir_plugin.models.amirnet_model.AMIRNetModel`.

Differences from the released code (deliberate): the classifier uses raw logits unless
``sigmoid_logits=True``; the 15 -> C conditioning maps are single ``nn.Linear`` layers
(the release sums four per-level layers, i.e. four biases, mathematically the same map
with 3C redundant parameters per map); the degradation encoder is padded like the
backbone. Everything else - widths, block counts, encoder, heads, FTB modulations and
PyTorch's default initialisation of the maps (``cond_init='default'``) - follows it.
"""
from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.conditioning_arch import ConditionedNAFNet


@ARCH_REGISTRY.register()
class AMIRNet(ConditionedNAFNet):
    """NAFNet with FTBs in every encoder stage, conditioned on a degradation tree.

    Args:
        img_channel (int): Image channels. Default 3.
        width (int): Channels of the first level. Default 64 (released model; 32 is the small one).
        middle_blk_num (int): Plain NAFBlocks at the lowest resolution. Default 1.
        enc_blk_nums (list[int]): FTBs per encoder level. Default [1, 1, 1, 28].
        dec_blk_nums (list[int]): Plain NAFBlocks per decoder level. Default [1, 1, 1, 1].
        branching (int): Tree branching factor. Default 2.
        depth (int): Tree levels including the root. Default 4 (1/2/4/8 nodes, 15-d representation).
        encoder_channels (list[int]): Degradation-encoder widths. Default [64, 128, 256].
        head_hidden (int): Hidden width of the tree heads. Default 256.
        active_levels (int, optional): Levels feeding the representation; default all
            (inference). The training model sets it to the number of levels built.
        sigmoid_logits (bool): Literal released classifier (sigmoid before CE/softmax). Default False.
        cond_init (str): ``'default'`` (PyTorch init, as released) or ``'identity'``
            (every FTB starts as a plain NAFBlock). Default ``'default'``.
        backbone_weights (str, optional): Official NAFNet checkpoint of the same layout to
            start from (retrofit: the FTB maps then start at identity whatever ``cond_init`` says).
        backbone_param_key (str, optional): Its top-level key (None: detected).
        trust_checkpoint (bool): Allow pickled objects in that file. Default False.

    Shapes:
        ``forward(x, return_tree=False)``: (B, img_channel, H, W), RGB, [0, 1], any size ->
        (B, img_channel, H, W) (and the encoder dict with ``return_tree``).
    """

    def __init__(self,
                 img_channel=3,
                 width=64,
                 middle_blk_num=1,
                 enc_blk_nums=(1, 1, 1, 28),
                 dec_blk_nums=(1, 1, 1, 1),
                 branching=2,
                 depth=4,
                 encoder_channels=(64, 128, 256),
                 head_hidden=256,
                 active_levels=None,
                 sigmoid_logits=False,
                 cond_init='default',
                 backbone_weights=None,
                 backbone_param_key=None,
                 trust_checkpoint=False):
        super().__init__(
            img_channel=img_channel,
            width=width,
            middle_blk_num=middle_blk_num,
            enc_blk_nums=enc_blk_nums,
            dec_blk_nums=dec_blk_nums,
            cond_stages=('encoders', ),
            branching=branching,
            depth=depth,
            encoder_channels=encoder_channels,
            head_hidden=head_hidden,
            active_levels=active_levels,
            sigmoid_logits=sigmoid_logits,
            cond_init=cond_init,
            backbone_weights=backbone_weights,
            backbone_param_key=backbone_param_key,
            trust_checkpoint=trust_checkpoint)
