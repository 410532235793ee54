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


def perceiveir_model_options(opt, backbone_opt, sgm_config='tiny', sgm_weights=None,
                             clip_model='perceive-ir-tiny-clip', clip_weights=None, prompt_weights=None,
                             vgg_weights=None, proxies=(), dataroot=None, probe_crop=256, loss_weights=(0.1, 0.05, 0.1)):
    """Turn base training options into a ``PerceiveIRModel`` configuration (in place).

    Args:
        opt (dict): Options with ``train`` (optimizer, scheduler, ``pixel_opt``) and ``path``.
        backbone_opt (dict): The backbone wrapped by ``PerceiveIRWrapper``.
        sgm_config, sgm_weights: DINOv2 config name and local weights (None: random, allowed).
        clip_model, clip_weights, prompt_weights: The quality perceiver of L_clip.
        vgg_weights (str, optional): VGG-16 of L_dpl (None: random, allowed).
        proxies (Sequence[tuple[dict, str]]): ``(network options, checkpoint)`` of each proxy.
        dataroot (str, optional): Packs of the DPL probe (and of ``datasets.train`` if absent).
        probe_crop (int): Crop size of the DPL probe.
        loss_weights (tuple): λ of L_cl, L_clip, L_dpl.

    Returns:
        dict: ``opt``.
    """
    opt['model_type'] = 'PerceiveIRModel'
    opt['network_g'] = {'type': 'PerceiveIRWrapper', 'backbone': copy.deepcopy(dict(backbone_opt)),
                        'sgm_config': sgm_config, 'sgm_weights': sgm_weights, 'sgm_allow_random': sgm_weights is None}
    train = opt['train']
    train['contrastive_opt'] = {'type': 'DegradationContrastiveLoss', 'loss_weight': loss_weights[0],
                                'temperature': 0.1}
    train['clip_opt'] = {'type': 'QualityCLIPLoss', 'loss_weight': loss_weights[1],
                         'perceiver': {'type': 'QualityPerceiver', 'clip_model': clip_model,
                                       'clip_weights': clip_weights, 'prompt_weights': prompt_weights}}
    train['dpl_opt'] = {'type': 'DifficultyAdaptivePerceptualLoss', 'loss_weight': loss_weights[2],
                        'vgg_weights': vgg_weights, 'allow_random_vgg': vgg_weights is None}
    train['proxies'] = [{'name': f'proxy{i}-{net["type"]}', 'tasks': 'all', 'network': copy.deepcopy(dict(net)),
                         'checkpoint': path} for i, (net, path) in enumerate(proxies)]
    datasets = opt.setdefault('datasets', {})
    ds = datasets.setdefault('train', {})
    ds.setdefault('return_lq_pos', True)
    if dataroot is not None:
        ds.setdefault('dataroot', dataroot)
        ds.setdefault('tasks', ['denoise', 'derain', 'dehaze', 'deblur', 'lowlight'])
        ds.setdefault('sigmas', [15, 25, 50])
    # One probe at the first step, then none during a benchmark (interval in iterations).
    train['dpl_probe'] = {'interval': 10**9, 'per_task': 1, 'candidates': 2, 'crop': int(probe_crop),
                          'batch_size': 2}
    return opt


def build_parts(opt, device):
    """The frozen / auxiliary parts of a ``PerceiveIRModel`` configuration, built alone (for timing).

    Returns:
        dict: ``wrapper`` (the network), ``cfe``, ``sgm`` (the frozen DINOv2 encoder),
        ``clip_loss``, ``dpl_loss`` and ``proxy_bank``.
    """
    from basicsr.archs import build_network
    from basicsr.losses import build_loss

    from perceive_ir_plugin.models.proxies import ProxyBank
    wrapper = build_network(copy.deepcopy(opt['network_g']))
    train = opt['train']
    bank = ProxyBank(copy.deepcopy(train['proxies'])) if train.get('proxies') else None
    if bank is not None:
        bank.to(device)
    return {'wrapper': wrapper.to(device), 'cfe': wrapper.cfe, 'sgm': wrapper.semantic_encoder,
            'clip_loss': build_loss(copy.deepcopy(train['clip_opt'])).to(device),
            'dpl_loss': build_loss(copy.deepcopy(train['dpl_opt'])).to(device), 'proxy_bank': bank}
