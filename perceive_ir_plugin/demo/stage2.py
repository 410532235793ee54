"""Stage-2 option builders shared by the demo, the benchmarks and the multi-process test.

One place that knows how to put a plain backbone option dict into Perceive-IR's wrapper
(:class:`~perceive_ir_plugin.archs.perceiveir_wrapper_arch.PerceiveIRWrapper`) and into a
``PerceiveIRModel`` training configuration, so callers only choose sizes and weight files.
"""
import copy


def wrapper_network_options(backbone_opt, scale='small', sgm_weights=None):
    """``network_g`` of the Perceive-IR wrapper around ``backbone_opt``.

    Args:
        backbone_opt (dict): ``{type: Restormer|NAFNet|PromptIR, ...}``.
        scale (str): ``'full'`` (DINOv2 ViT-B/14, the release's SGM) or ``'small'`` (the tiny
            random ViT config of the same code path).
        sgm_weights (str, optional): Local DINOv2 weights; None keeps random weights (allowed
            explicitly, and logged by the encoder).

    Returns:
        dict: Options for ``build_network``.
    """
    return {'type': 'PerceiveIRWrapper', 'backbone': copy.deepcopy(dict(backbone_opt)),
            'sgm_config': 'dinov2_vitb14' if (scale == 'full' or sgm_weights) else 'tiny',
            'sgm_weights': sgm_weights, 'sgm_allow_random': sgm_weights is None}
