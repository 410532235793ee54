"""Perceive-IR's quality perceiver: a frozen CLIP with three learned quality prompts.

Stage 1 of Perceive-IR learns, for each quality tier ``terrible`` / ``mediocre`` /
``excellent`` (low / medium / high quality), a CoOp-style class-specific prompt: 16
context token embeddings fed, between CLIP's fixed start-of-text embedding and its
end-of-text + padding embeddings, through CLIP's frozen text transformer. An image is
classified into a tier by the cosine similarity of its CLIP image feature with the three
prompt features. Stage 2 uses the frozen perceiver as the "CLIP-aware" loss.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.clip_util import CLIP_MEAN, CLIP_STD, build_frozen_clip
from perceive_ir_plugin.utils.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file

DEFAULT_CLASS_NAMES = ('terrible', 'mediocre', 'excellent')
PROMPTS_FORMAT = 'perceive-ir-quality-prompts'
PROMPTS_VERSION = 1
_PROMPT_KEYS = ('context', 'token_prefix', 'token_suffix', 'tokenized_prompts')


def _text_tower(clip):
    """Return the object holding CLIP's text modules (``CLIP`` itself or ``CustomTextCLIP.text``)."""
    tower = clip.text if isinstance(getattr(clip, 'text', None), nn.Module) else clip
    needed = ('token_embedding', 'positional_embedding', 'transformer', 'ln_final', 'text_projection')
    missing = [name for name in needed if not hasattr(tower, name)]
    if missing:
        raise ValueError(f'The CLIP text tower ({type(tower).__name__}) lacks {missing}: only open_clip models with '
                         "CLIP's own text transformer are supported by the quality perceiver.")
    pool_type = getattr(tower, 'text_pool_type', getattr(tower, 'pool_type', 'argmax'))
    if pool_type != 'argmax':
        raise ValueError(f"The CLIP text tower pools with '{pool_type}'; the quality perceiver needs 'argmax' "
                         '(end-of-text position) pooling.')
    return tower


class QualityPromptLearner(nn.Module):
    """Class-specific learnable prompts (CoOp) for CLIP's text encoder.

    For class ``c`` the prompt fed to the text transformer is
    ``[token_prefix[c] | context[c] | token_suffix[c]]`` (``context_length`` tokens):
    the start-of-text embedding, ``n_ctx`` learnable vectors, then the end-of-text and
    padding embeddings. The context is initialised from N(0, ``init_std``²) and its last
    slot is overwritten with the token embedding of the class word, so the class word is
    learnable too.

    Args:
        token_embedding (nn.Embedding): CLIP's (frozen) token embedding, (vocab, width).
        tokenizer (callable): open_clip tokenizer (``__call__`` → (N, L) ids, ``encode``).
        class_names (Sequence[str]): One single-token word per class.
        n_ctx (int): Learnable context vectors per class.
        context_length (int): CLIP's text length L (77).
        init_std (float): Standard deviation of the context initialisation.

    Attributes:
        context (Parameter): (C, n_ctx, width), the only trainable tensor.
        token_prefix (Tensor): (C, 1, width) buffer, start-of-text embedding.
        token_suffix (Tensor): (C, L - 1 - n_ctx, width) buffer, end-of-text + padding.
        tokenized_prompts (Tensor): (C, L) int64 buffer; its argmax is the end-of-text position.
    """

    def __init__(self, token_embedding, tokenizer, class_names, n_ctx, context_length, init_std=0.02):
        super().__init__()
        class_names = tuple(class_names)
        if len(class_names) < 2:
            raise ValueError(f'class_names needs at least two classes, got {class_names!r}.')
        if not isinstance(n_ctx, int) or n_ctx < 1 or n_ctx + 2 > context_length:
            raise ValueError(f'n_ctx must be an int in [1, {context_length - 2}] (CLIP context length '
                             f'{context_length}), got {n_ctx!r}.')
        class_ids = []
        for name in class_names:
            ids = tokenizer.encode(name)
            if len(ids) != 1:
                raise ValueError(f"class_names: '{name}' is {len(ids)} CLIP BPE tokens; each class name must be "
                                 'a single token.')
            class_ids.append(ids[0])
        placeholder = ' '.join(['X'] * n_ctx)
        tokenized = tokenizer([placeholder] * len(class_names), context_length=context_length).long()
        eot = tokenized.argmax(dim=-1)
        if not bool((eot == n_ctx + 1).all()):
            raise ValueError(f'The placeholder prompt of {n_ctx} words did not tokenise to {n_ctx} tokens.')
        weight = token_embedding.weight.detach()
        with torch.no_grad():
            embedded = F.embedding(tokenized.to(weight.device), weight).float().cpu()
            context = torch.empty(len(class_names), n_ctx, weight.shape[1]).normal_(0.0, init_std)
            context[:, -1] = weight[torch.tensor(class_ids, device=weight.device)].float().cpu()
        self.class_names = class_names
        self.n_ctx = n_ctx
        self.context = nn.Parameter(context)
        self.register_buffer('token_prefix', embedded[:, :1].clone())
        self.register_buffer('token_suffix', embedded[:, 1 + n_ctx:].clone())
        self.register_buffer('tokenized_prompts', tokenized)

    def forward(self):
        """Prompt embeddings (C, L, width) for CLIP's text transformer."""
        return torch.cat([self.token_prefix, self.context.to(self.token_prefix.dtype), self.token_suffix], dim=1)


@ARCH_REGISTRY.register()
class QualityPerceiver(nn.Module):
    """Frozen CLIP + learned quality prompts: image → logits over (terrible, mediocre, excellent).

    Image path: (B, 3, H, W) RGB in [0, 1] → bicubic resize to CLIP's input size (224)
    → CLIP mean/std normalisation → ``encode_image`` → L2 norm. Text path: the prompt
    learner's embeddings + positional embedding → CLIP's causal text transformer →
    ``ln_final`` at the end-of-text position → ``text_projection`` → L2 norm.
    Logits = ``exp(CLIP logit_scale)`` (≈100 for OpenAI CLIP) · cosine.

    CLIP is built from the open_clip config ``clip_model`` and the local file
    ``clip_weights`` (see :mod:`perceive_ir_plugin.archs.clip_util` for the accepted files,
    including OpenAI's TorchScript ``ViT-B-32.pt``, read without running its code); it is
    always fp32, frozen and in eval mode. Only ``prompt_learner.context`` is trainable.
    Gradients still flow through the frozen image encoder into the input image (the
    stage-2 CLIP-aware loss needs that).

    The network's checkpoint is the small prompts file (:meth:`save_prompts`): context,
    buffers and metadata. Giving ``prompt_weights`` loads such a file and freezes the
    prompts (:meth:`freeze` caches the three text features).

    Args:
        clip_model (str): open_clip config name. ``'perceive-ir-tiny-clip'`` is a tiny
            random CLIP for tests (fixed seed; no weights file needed).
        clip_weights (str, optional): Local CLIP weights file; required except for the tiny config.
        prompt_weights (str, optional): Trained prompts file (this class's format, the
            official Perceive-IR ``quality_prompts_*.pth``, or a BasicSR ``net_g`` file).
        n_ctx (int): Learnable context vectors per class (16).
        class_names (Sequence[str]): Tier words, low to high quality.
    """

    def __init__(self,
                 clip_model='ViT-B-32-quickgelu',
                 clip_weights=None,
                 prompt_weights=None,
                 n_ctx=16,
                 class_names=DEFAULT_CLASS_NAMES):
        super().__init__()
        import open_clip
        self.clip_model_name = clip_model
        self.clip = build_frozen_clip(clip_model, clip_weights, option_key='clip_weights')
        text = _text_tower(self.clip)
        tokenizer = open_clip.get_tokenizer(clip_model)
        self.context_length = int(text.positional_embedding.shape[0])
        self.prompt_learner = QualityPromptLearner(text.token_embedding, tokenizer, class_names, n_ctx,
                                                   self.context_length)
        self.class_names = self.prompt_learner.class_names
        self.n_ctx = n_ctx
        image_size = self.clip.visual.image_size
        self.image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.register_buffer('mean', torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('text_features', None, persistent=False)
        self.prompt_meta = {}
        if prompt_weights is not None:
            self.load_prompts(prompt_weights, option_key='prompt_weights')
            self.freeze()

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode; CLIP itself always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def is_frozen(self):
        """True when the prompts are frozen and the text features cached."""
        return self.text_features is not None

    def freeze(self):
        """Freeze the prompt context and cache the (C, D) L2-normalised text features."""
        self.prompt_learner.context.requires_grad_(False)
        with torch.no_grad():
            self.text_features = self._compute_text_features().detach()
        return self

    def unfreeze(self):
        """Make the prompt context trainable again and drop the cached text features."""
        self.prompt_learner.context.requires_grad_(True)
        self.text_features = None
        return self

    # ------------------------------------------------------------------------------------------
    # features
    # ------------------------------------------------------------------------------------------
    def _compute_text_features(self):
        text = _text_tower(self.clip)
        prompts = self.prompt_learner()
        x = prompts + text.positional_embedding.to(prompts.dtype)
        transformer = text.transformer
        batch_first = getattr(transformer, 'batch_first', False)
        if not batch_first:
            x = x.permute(1, 0, 2)
        x = transformer(x, attn_mask=getattr(text, 'attn_mask', None))
        if not batch_first:
            x = x.permute(1, 0, 2)
        x = text.ln_final(x)
        eot = self.prompt_learner.tokenized_prompts.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        projection = text.text_projection
        x = projection(x) if isinstance(projection, nn.Module) else x @ projection
        return F.normalize(x, dim=-1)

    def get_text_features(self):
        """L2-normalised prompt features (C, D): the cache when frozen, else computed (with gradients)."""
        if self.text_features is not None:
            return self.text_features
        return self._compute_text_features()

    def encode_image(self, img):
        """L2-normalised CLIP image features.

        Args:
            img (Tensor): (B, 3, H, W), RGB, [0, 1] (any size; resized bicubically).

        Returns:
            Tensor: (B, D).
        """
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f'QualityPerceiver expects images of shape (B, 3, H, W) (RGB, [0, 1]); got '
                             f'{tuple(img.shape)}.')
        x = img
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode='bicubic', align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def cosine(self, img):
        """Cosine similarities (B, C) between images (B, 3, H, W) RGB [0, 1] and the prompts."""
        image_features = self.encode_image(img)
        text_features = self.get_text_features()
        return image_features @ text_features.to(image_features.dtype).t()

    @property
    def logit_scale(self):
        """CLIP's learned logit scale ``exp(logit_scale)`` as a 0-dim tensor (≈100 for OpenAI CLIP)."""
        return self.clip.logit_scale.detach().exp().reshape(())

    def forward(self, img):
        """Quality logits.

        Args:
            img (Tensor): (B, 3, H, W), RGB, [0, 1].

        Returns:
            Tensor: (B, C) = CLIP logit scale · cosine(image, prompt); C = 3 in the order
            of ``class_names`` (terrible, mediocre, excellent).
        """
        cosine = self.cosine(img)
        return self.logit_scale.to(cosine.dtype) * cosine

    def probabilities(self, img, logit_scale=None):
        """Softmax over the prompts.

        Args:
            img (Tensor): (B, 3, H, W), RGB, [0, 1].
            logit_scale (None | float | 'clip'): Multiplier of the cosines before the
                softmax. ``None`` = raw cosines (scale 1), which is what the released
                Perceive-IR stage-2 CLIP loss does; a float = that scale; ``'clip'`` = CLIP's
                learned scale (as in stage-1 training and :meth:`forward`).

        Returns:
            Tensor: (B, C) probabilities (rows sum to 1).
        """
        cosine = self.cosine(img)
        if logit_scale is None:
            scale = 1.0
        elif isinstance(logit_scale, str):
            if logit_scale != 'clip':
                raise ValueError(f"logit_scale must be None, a number or 'clip'; got '{logit_scale}'.")
            scale = self.logit_scale.to(cosine.dtype)
        else:
            scale = float(logit_scale)
        return torch.softmax(scale * cosine, dim=-1)

    def quality_score(self, img):
        """Expected quality tier in [0, 1] (0 = terrible, 1 = excellent), CLIP-scaled softmax.

        Args:
            img (Tensor): (B, 3, H, W), RGB, [0, 1].

        Returns:
            Tensor: (B,).
        """
        probs = self.probabilities(img, logit_scale='clip')
        levels = torch.linspace(0.0, 1.0, probs.shape[1], device=probs.device, dtype=probs.dtype)
        return probs @ levels

    # ------------------------------------------------------------------------------------------
    # prompts file
    # ------------------------------------------------------------------------------------------
    def prompt_checkpoint(self, **meta):
        """The prompts file's content: a dict loadable with ``torch.load(weights_only=True)``.

        Layout (compatible with the official Perceive-IR prompts checkpoint):
        ``prompt_learner`` (``context`` (C, n_ctx, width), ``token_prefix``, ``token_suffix``,
        ``tokenized_prompts``), ``quality_names``, ``context_length`` (= n_ctx),
        ``clip_model``, ``embed_width``, ``format``, ``version`` and any extra ``meta``
        (e.g. ``iteration``, ``task_balanced``).
        """
        state = {k: v.detach().cpu().clone() for k, v in self.prompt_learner.state_dict().items()}
        checkpoint = {
            'format': PROMPTS_FORMAT,
            'version': PROMPTS_VERSION,
            'prompt_learner': state,
            'quality_names': list(self.class_names),
            'context_length': self.n_ctx,
            'clip_model': self.clip_model_name,
            'embed_width': int(state['context'].shape[-1]),
        }
        checkpoint.update(meta)
        return checkpoint

    def save_prompts(self, path, **meta):
        """Write the prompts file atomically (see :meth:`prompt_checkpoint`)."""
        from perceive_ir_plugin.utils.atomic_io import atomic_torch_save
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        atomic_torch_save(self.prompt_checkpoint(**meta), path)

    def load_prompts(self, path, option_key='prompt_weights'):
        """Load trained prompts (read with ``weights_only=True``).

        Accepts this class's prompts file, the official Perceive-IR prompts checkpoint
        (``prompt_learner`` entry) and BasicSR network files whose state dict holds
        ``prompt_learner.*`` keys (or bare ``context`` ...).

        Raises:
            FileNotFoundError: Missing file (message names ``option_key``).
            CheckpointError: No prompt context in the file, a shape that does not fit,
                or buffers computed from a different CLIP than this one.
            ValueError: The file's class names differ from ``class_names``.
        """
        where = f"'{path}' (option '{option_key}')"
        checkpoint = load_checkpoint_file(path, option_key=option_key)
        meta = {}
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get('prompt_learner'), dict):
            state = checkpoint['prompt_learner']
            meta = {k: v for k, v in checkpoint.items()
                    if k != 'prompt_learner' and isinstance(v, (str, int, float, bool, list, tuple))}
        else:
            try:
                state, _ = extract_state_dict(checkpoint)
            except CheckpointError as err:
                raise CheckpointError(f'Prompts file {where}: {err}') from err
        found = {}
        for key, value in state.items():
            short = key.split('prompt_learner.')[-1]
            if short in _PROMPT_KEYS and (short == key or key.endswith('prompt_learner.' + short)):
                found[short] = value
        if 'context' not in found:
            raise CheckpointError(f'Prompts file {where} holds no prompt context (expected a '
                                  f"'prompt_learner' entry or 'prompt_learner.context'); keys: {sorted(state)[:8]}.")
        names = meta.get('quality_names')
        if names is not None and tuple(names) != tuple(self.class_names):
            raise ValueError(f'Prompts file {where} was trained for classes {tuple(names)}, but this perceiver '
                             f'has class_names {tuple(self.class_names)}.')
        own = self.prompt_learner
        if tuple(found['context'].shape) != tuple(own.context.shape):
            raise CheckpointError(
                f'Prompts file {where} has context of shape {tuple(found["context"].shape)}, but this perceiver '
                f"expects {tuple(own.context.shape)} (classes, n_ctx, text width of clip_model "
                f"'{self.clip_model_name}').")
        for name in ('token_prefix', 'token_suffix'):
            saved = found.get(name)
            if saved is None:
                continue
            mine = getattr(own, name)
            if tuple(saved.shape) != tuple(mine.shape) or not torch.allclose(
                    saved.float().cpu(), mine.float().cpu(), rtol=1e-3, atol=1e-6):
                raise CheckpointError(
                    f'Prompts file {where}: its {name} differs from the token embeddings of this CLIP '
                    f"('{self.clip_model_name}' with the given clip_weights): the prompts were learned on a "
                    'different CLIP. Use the CLIP weights they were trained with.')
        if 'tokenized_prompts' in found:
            saved_eot = found['tokenized_prompts'].long().argmax(dim=-1).cpu()
            if not torch.equal(saved_eot, own.tokenized_prompts.argmax(dim=-1).cpu()):
                raise CheckpointError(f'Prompts file {where}: end-of-text positions {saved_eot.tolist()} differ '
                                      f'from this prompt layout ({self.n_ctx} context tokens).')
        with torch.no_grad():
            own.context.copy_(found['context'].to(own.context.dtype))
        self.prompt_meta = meta
        if self.is_frozen:
            self.freeze()
        return meta
