"""A masked autoencoder (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners") in
plain torch, small enough to train on 32x32 images on a CPU, with the ``restore`` that BDMAE needs.

The parameter names are those of facebookresearch/mae's ``MaskedAutoencoderViT``, whose encoder
is timm's ``VisionTransformer`` layout (``patch_embed.proj``, ``blocks.N.attn.qkv``, ...), so
:func:`load_mae` reads both our own files and the official MAE checkpoints that keep the decoder.

Pretrained weights from outside, honestly: timm's hub MAE weights (``vit_base_patch16_224.mae``
and the like) hold the *encoder only*; a decoder is needed to restore masked tokens, so such a
file is refused with that reason. facebookresearch/mae's ``mae_visualize_vit_base.pth`` (and
``_large``), the checkpoint the BDMAE authors used, keeps the decoder and predicts plain
(ImageNet-normalized) pixels: it loads here. It works at 224x224 with 16-pixel patches, so a
32x32 victim image is upsampled to 224 for it (as the BDMAE code does), its 14x14 token grid then
spans the small image in 2.3-pixel cells, and the restoration is resized back. The "pretrain"
checkpoints of the same repository are encoder-only, and those trained with ``norm_pix_loss``
predict per-patch normalized pixels, which cannot be pasted into an image: neither can restore.

Its length: the MAE, its training loss and its weights-only file in one place, the file a
reader of BDMAE needs beside :mod:`.torch_model`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.io.safetensors_files import (
    NETWORK_SETTING_LIMIT,
    build_from_metadata,
    metadata_json,
    read_safetensors,
    write_safetensors,
)
from lightning_defense.io.shipped import resolve
from lightning_defense.io.torch_files import load_weights
from lightning_defense.victims.classifier import CIFAR10_MEAN, CIFAR10_STD

MAE_FORMAT = "lightning-defense-mae/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# facebookresearch/mae's head counts that do not follow the usual 64 channels per head
KNOWN_HEADS = {"encoder": {1280: 16}, "decoder": {512: 16}}
HOW_TO_GET_AN_MAE = (
    "The package ships one for 32x32 CIFAR-10 (checkpoints/cifar10_mae.safetensors). Train one on your unlabeled "
    "images with `lightning fit --config configs/bdmae/mae.yaml` (it writes runs/mae/version_N/mae.safetensors), "
    "or, online, download facebookresearch/mae's mae_visualize_vit_base.pth."
)


def sincos_position_embedding(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, (1 + grid², dim), with a zero row for the class token."""
    if dim % 4:
        raise ConfigurationError(
            f"The MAE's embedding widths must be multiples of 4 (sine-cosine positions), got {dim}."
        )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def embed(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # the official order: column coordinate first, then row
    table = torch.cat([embed(cols), embed(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def token_mask_to_pixels(token_mask: Tensor, grid_size: tuple[int, int], image_size: Sequence[int]) -> Tensor:
    """Token mask (N, L) -> pixel mask (N, 1, H, W): every pixel takes the token whose cell holds it."""
    cells = token_mask.reshape(-1, 1, *grid_size).float()
    return F.interpolate(cells, size=tuple(image_size), mode="nearest") > 0.5


def paste_masked(images: Tensor, reconstruction: Tensor, token_mask: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """BDMAE's eq. 1: the reconstruction inside the masked tokens, the image itself everywhere else
    (selected, not blended, so unmasked pixels keep their exact values)."""
    pixels = token_mask_to_pixels(token_mask, grid_size, images.shape[-2:])
    return torch.where(pixels, reconstruction.to(images.dtype), images)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigurationError(f"The MAE's width {dim} is not divisible by its {num_heads} attention heads.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class Block(nn.Module):
    """A pre-norm transformer block with timm's parameter names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), attn_mask)
        return tokens + self.mlp(self.norm2(tokens))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def default_patch_size(image_size: int) -> int:
    """A token cell for images of this side: an 8x8 grid up to 128 pixels (4 at 32, 8 at 64), then
    MAE's own 16 (a 14x14 grid at 224)."""
    return max(1, min(16, image_size // 8))


class MaskedAutoencoder(nn.Module):
    """A ViT masked autoencoder on [0, 1] images: the encoder sees the visible tokens only, the
    decoder predicts the pixels of every token. Normalization (``mean``/``std`` buffers) lives
    inside, like the victim's; predictions are normalized pixels, as in the official MAE without
    ``norm_pix_loss``.

    Token masks are boolean (N, L), True where a token is masked, L = (image_size / patch_size)²,
    row-major over the token grid. Rows may mask different numbers of tokens: the visible tokens
    are then padded to the longest row and the padding is kept out of attention.

    Args:
        image_size: side of the square images it works on; other sizes are resized to it and back.
        patch_size: side of a token's cell in pixels (4: an 8x8 grid on 32x32 images).
        embed_dim, depth, num_heads: the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder.
        mlp_ratio: hidden width of the blocks' MLPs over their width.
        mean, std: per-channel normalization of its inputs and predictions.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigurationError(
                f"The MAE's image_size {image_size} is not a multiple of its patch_size {patch_size}: the tokens "
                "must tile the image. Pick a patch_size that divides it (4 for 32x32 images)."
            )
        self.config = {
            "image_size": image_size,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "decoder_embed_dim": decoder_embed_dim,
            "decoder_depth": decoder_depth,
            "decoder_num_heads": decoder_num_heads,
            "mlp_ratio": mlp_ratio,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        }
        self.image_size, self.patch_size = image_size, patch_size
        grid = image_size // patch_size
        self.grid_size = (grid, grid)
        self.num_tokens = grid * grid
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_position_embedding(embed_dim, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_position_embedding(decoder_embed_dim, grid).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)
        self._initialize()

    def _initialize(self) -> None:
        # the official initialization: xavier for linear maps (the patch projection included), small tokens
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_token_mask(
        self,
        batch: int,
        mask_ratio: float,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A uniformly random token mask per image with ``mask_ratio`` of the tokens masked (MAE's count)."""
        keep = int(self.num_tokens * (1 - mask_ratio))
        order = torch.rand(batch, self.num_tokens, generator=generator).argsort(dim=1)
        mask = torch.zeros(batch, self.num_tokens, dtype=torch.bool).scatter_(1, order[:, keep:], True)
        return mask.to(device)

    def _model_input(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return (images - self.mean) / self.std

    def patchify(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, L, p * p * 3), the official pixel order within a patch."""
        p, grid = self.patch_size, self.grid_size[0]
        patches = images.reshape(len(images), 3, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(len(images), self.num_tokens, p * p * 3)

    def unpatchify(self, patches: Tensor) -> Tensor:
        p, grid = self.patch_size, self.grid_size[0]
        images = patches.reshape(len(patches), grid, grid, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return images.reshape(len(patches), 3, grid * p, grid * p)

    def encode(self, images: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output for the visible tokens (class token first) and their indices (N, K)."""
        tokens = self.patch_embed(self._model_input(images)) + self.pos_embed[:, 1:]
        visible_counts = (~token_mask).sum(dim=1)
        longest = int(visible_counts.max())
        # visible tokens first, in grid order; rows with fewer are padded with masked ones
        kept = token_mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :longest]
        tokens = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(tokens), -1, -1)
        tokens = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        attn_mask = None
        if bool((visible_counts < longest).any()):
            real = torch.arange(longest, device=tokens.device) < visible_counts.unsqueeze(1)
            attn_mask = torch.cat([real.new_ones(len(real), 1), real], dim=1)[:, None, None, :]
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        return self.norm(tokens), kept

    def decode(self, latent: Tensor, kept: Tensor, token_mask: Tensor) -> Tensor:
        """Predicted normalized pixels of every token, (N, L, p * p * 3)."""
        latent = self.decoder_embed(latent)
        width = latent.shape[-1]
        mask_tokens = self.mask_token.to(latent.dtype).expand(len(latent), self.num_tokens, width)
        tokens = mask_tokens.scatter(1, kept.unsqueeze(-1).expand(-1, -1, width), latent[:, 1:])
        # padding entries of `kept` point at masked tokens: those get the mask token back
        tokens = torch.where(token_mask.unsqueeze(-1), mask_tokens, tokens)
        tokens = torch.cat([latent[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            tokens = block(tokens)
        return self.decoder_pred(self.decoder_norm(tokens))[:, 1:]

    def forward(self, images: Tensor, token_mask: Tensor) -> Tensor:
        """Predicted normalized pixels of every token of [0, 1] ``images`` under ``token_mask``."""
        return self.decode(*self.encode(images, token_mask), token_mask)

    def loss(self, images: Tensor, predictions: Tensor, token_mask: Tensor) -> Tensor:
        """MAE's loss: mean squared error of the normalized pixels, over the masked tokens only."""
        target = self.patchify(self._model_input(images))
        per_token = (predictions.float() - target).pow(2).mean(dim=-1)
        return (per_token * token_mask).sum() / token_mask.sum().clamp(min=1)

    def to_images(self, predictions: Tensor, size: Sequence[int]) -> Tensor:
        """Predicted patches -> [0, 1] images of ``size``."""
        images = self.unpatchify(predictions.float()) * self.std + self.mean
        if tuple(size) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        return images.clamp(0, 1)

    def reconstruct(self, images: Tensor, token_mask: Tensor) -> Tensor:
        """The decoder's image, every token predicted, at the size of ``images``."""
        return self.to_images(self(images, token_mask), images.shape[-2:])

    def restore(self, images: Tensor, token_mask: Tensor) -> Tensor:
        """``images`` with the masked tokens replaced by their reconstruction (BDMAE's eq. 1)."""
        return paste_masked(images, self.reconstruct(images, token_mask), token_mask, self.grid_size)


def save_mae(path: str | Path, mae: MaskedAutoencoder, metadata: dict[str, str] | None = None) -> Path:
    """Write the MAE's weights and settings as one safetensors file, atomically."""
    info = {"format": MAE_FORMAT, "config": json.dumps(mae.config), **(metadata or {})}
    return write_safetensors(path, mae.state_dict(), info)


def _count_blocks(tensors: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"{prefix}\.(\d+)\.norm1\.weight")
    return len([name for name in tensors if pattern.fullmatch(name)])


def _heads(width: int, part: str) -> int:
    heads = KNOWN_HEADS[part].get(width, width // 64)
    if heads < 1 or width % heads:
        raise ConfigurationError(
            f"Cannot tell the attention heads of an MAE {part} {width} wide (the file does not record them, and "
            "it is not a facebookresearch/mae layout). Convert it with save_mae() from an instance built with "
            "the right num_heads."
        )
    return heads


def infer_mae_config(tensors: dict[str, Tensor], where: str) -> dict[str, Any]:
    """Settings of a facebookresearch/mae (timm-layout) state dict, read from its shapes."""
    if "patch_embed.proj.weight" not in tensors or "pos_embed" not in tensors:
        raise ConfigurationError(
            f"{where} is not an MAE: it has no patch_embed.proj.weight or pos_embed. {HOW_TO_GET_AN_MAE}"
        )
    if "decoder_pred.weight" not in tensors:
        raise ConfigurationError(
            f"{where} holds a ViT encoder without the MAE decoder (as timm's hub MAE weights and "
            "facebookresearch/mae's mae_pretrain_* files do): BDMAE restores masked tokens with the decoder. "
            + HOW_TO_GET_AN_MAE
        )
    embed_dim, channels, patch_size, _ = tensors["patch_embed.proj.weight"].shape
    grid = math.isqrt(tensors["pos_embed"].shape[1] - 1)
    if channels != 3 or grid * grid != tensors["pos_embed"].shape[1] - 1:
        raise ConfigurationError(f"{where}: only square RGB MAEs with a class token are supported.")
    decoder_embed_dim = tensors["decoder_embed.weight"].shape[0]
    return {
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": _count_blocks(tensors, "blocks"),
        "num_heads": _heads(embed_dim, "encoder"),
        "decoder_embed_dim": decoder_embed_dim,
        "decoder_depth": _count_blocks(tensors, "decoder_blocks"),
        "decoder_num_heads": _heads(decoder_embed_dim, "decoder"),
        "mlp_ratio": tensors["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        # the official MAEs take ImageNet-normalized inputs
        "mean": tensors["mean"].flatten().tolist() if "mean" in tensors else list(IMAGENET_MEAN),
        "std": tensors["std"].flatten().tolist() if "std" in tensors else list(IMAGENET_STD),
    }


def _read_torch_file(path: Path) -> dict[str, Tensor]:
    checkpoint = load_weights(path)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigurationError(f"{str(path)!r} holds no state dict of tensors (as a dict, or under 'model').")
    return state


def load_mae(path: str | Path) -> MaskedAutoencoder:
    """Load an MAE for inference (eval mode, no gradients): our ``mae.safetensors`` files, or a
    facebookresearch/mae checkpoint with its decoder (``.pth``, read with ``weights_only=True``,
    or converted to safetensors); see the module docstring for which outside weights can work."""
    path = resolve(path)  # the shipped MAE's checkpoints/ path works from any folder
    if not path.is_file():
        raise InputNotFoundError(f"MAE weights {str(path)!r} do not exist. {HOW_TO_GET_AN_MAE}")
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
    else:
        tensors, metadata = _read_torch_file(path), {}
    if metadata.get("format") == MAE_FORMAT:
        config = metadata_json(metadata, "config", repr(str(path)))
    else:
        config = infer_mae_config(tensors, repr(str(path)))
    mae = build_from_metadata(MaskedAutoencoder, config, repr(str(path)), "MAE", NETWORK_SETTING_LIMIT)
    # the official files carry no normalization buffers: the inferred ImageNet ones stay
    state = {"mean": mae.mean, "std": mae.std, **tensors}
    try:
        missing, unexpected = mae.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise ConfigurationError(f"{str(path)!r} does not fit the MAE it describes: {err}") from err
    if missing or unexpected:
        raise ConfigurationError(
            f"{str(path)!r} does not fit the MAE it describes (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}): it is not an MAE with a decoder. {HOW_TO_GET_AN_MAE}"
        )
    return mae.requires_grad_(False).eval()
