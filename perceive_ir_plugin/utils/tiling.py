"""Padding to a size multiple and overlapping-tile inference for image-to-image networks.

Used by :class:`~perceive_ir_plugin.models.image_restoration_model.ImageRestorationModel`
(``val: size_multiple / pad_mode / tile``) and by tools that run a restoration network on
large images.
"""
import torch
import torch.nn.functional as F

PAD_MODES = ('reflect', 'replicate', 'constant')


def pad_to_multiple(x, multiple, mode='reflect'):
    """Pad the bottom and right of ``x`` so that H and W are multiples of ``multiple``.

    Args:
        x (Tensor): (B, C, H, W) images.
        multiple (int): Required multiple (1 means no padding).
        mode (str): ``'reflect'`` (mirror without repeating the edge; falls back to
            ``'replicate'`` when the image is too small to mirror), ``'replicate'`` or
            ``'constant'`` (zeros).

    Returns:
        Tensor: (B, C, H', W') with H' = ceil(H / multiple) * multiple (same for W).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"Unknown pad mode '{mode}' (option val.pad_mode); use one of {PAD_MODES}.")
    multiple = int(multiple or 1)
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    if mode == 'reflect' and (pad_h >= h or pad_w >= w):
        mode = 'replicate'
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _tile_starts(length, size, stride):
    """Start offsets of tiles of ``size`` with ``stride`` covering ``[0, length)``."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def tiled_forward(fn, x, tile=None, overlap=32, multiple=1, pad_mode='reflect'):
    """Run ``fn`` on ``x`` padded to ``multiple``, optionally in overlapping tiles.

    Without tiling (``tile`` is falsy, or the padded image fits in one tile) this is
    ``fn(pad(x))`` cropped back to the input size. With tiling, ``fn`` sees square tiles of
    ``tile`` pixels (smaller only where the image is smaller) placed every
    ``tile - overlap`` pixels, the last one flush with the border. Every tile drops a
    margin of ``overlap // 2`` pixels on each side that lies inside the image (the part
    most affected by the missing context), and where the kept parts of neighbouring
    tiles still overlap they are averaged. So a network whose receptive field reaches at
    most ``overlap // 2`` pixels gives exactly the untiled result; networks with global
    operations (channel attention, global pooling) give a close approximation.

    Args:
        fn (callable): Maps (B, C, h, w) to (B, C', s*h, s*w) for an integer scale ``s``
            (1 for restoration). A list/tuple result uses its last element.
        x (Tensor): (B, C, H, W) input, any value range.
        tile (int, optional): Tile size in input pixels; must be a multiple of
            ``multiple`` and larger than ``overlap``. None or 0: no tiling.
        overlap (int): Overlap between neighbouring tiles in input pixels. Default: 32.
        multiple (int): The network's size multiple (inputs are padded to it).
        pad_mode (str): See :func:`pad_to_multiple`.

    Returns:
        Tensor: (B, C', s*H, s*W), in ``fn``'s dtype promoted to at least float32 when
        tiles were merged.
    """
    def run(inp):
        out = fn(inp)
        return out[-1] if isinstance(out, (list, tuple)) else out

    multiple = int(multiple or 1)
    h, w = x.shape[-2:]
    padded = pad_to_multiple(x, multiple, pad_mode)
    big_h, big_w = padded.shape[-2:]
    if not tile or (big_h <= tile and big_w <= tile):
        out = run(padded)
        scale = _scale_of(out, big_h, big_w)
        return out[..., :h * scale, :w * scale]

    tile, overlap = int(tile), int(overlap)
    if tile % multiple:
        raise ValueError(f'val.tile.size={tile} must be a multiple of the network size multiple {multiple}.')
    if not 0 <= overlap < tile:
        raise ValueError(f'val.tile.overlap={overlap} must be >= 0 and smaller than val.tile.size={tile}.')
    tile_h, tile_w = min(tile, big_h), min(tile, big_w)
    margin = overlap // 2
    canvas = weight = None
    scale = 1
    for y in _tile_starts(big_h, tile_h, tile - overlap):
        for x0 in _tile_starts(big_w, tile_w, tile - overlap):
            out = run(padded[..., y:y + tile_h, x0:x0 + tile_w])
            if canvas is None:
                scale = _scale_of(out, tile_h, tile_w)
                dtype = torch.promote_types(out.dtype, torch.float32)
                canvas = out.new_zeros((*out.shape[:-2], big_h * scale, big_w * scale), dtype=dtype)
                weight = out.new_zeros((1, 1, big_h * scale, big_w * scale), dtype=dtype)
            top = margin if y > 0 else 0
            bottom = tile_h - margin if y + tile_h < big_h else tile_h
            left = margin if x0 > 0 else 0
            right = tile_w - margin if x0 + tile_w < big_w else tile_w
            region = (..., slice((y + top) * scale, (y + bottom) * scale),
                      slice((x0 + left) * scale, (x0 + right) * scale))
            canvas[region] += out[..., top * scale:bottom * scale, left * scale:right * scale]
            weight[region] += 1
    return (canvas / weight)[..., :h * scale, :w * scale]


def _scale_of(out, in_h, in_w):
    out_h, out_w = out.shape[-2:]
    if out_h % in_h or out_w % in_w or out_h // in_h != out_w // in_w:
        raise ValueError(f'The network mapped a {in_h}x{in_w} input to {out_h}x{out_w}: padding and tiling '
                         'need an integer scale factor shared by height and width.')
    return out_h // in_h
