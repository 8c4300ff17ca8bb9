"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", 2209.12152).

Follows the paper's reference code (libs/uvit.py of baofff/U-ViT) layer for layer, with the same
module names, so its state_dict keys match the reference checkpoints:

- every input is a token: the patches (Conv2d with kernel = stride = patch size), the time
  (sinusoidal embedding, optionally through an MLP) and, when class-conditional, the class label
  (a learned embedding placed before the time token); a learned position embedding is added;
- `depth` pre-LayerNorm transformer blocks: depth // 2 "in" blocks, one "mid" block and
  depth // 2 "out" blocks; long skip connections join in-block i's output to the out-block
  mirrored to it (skip_linear on the concatenation, skips popped last-in first-out);
- final LayerNorm, a linear decoder back to patches, the extra tokens dropped, the patches put
  back into an image and an optional 3x3 convolution.

The model is built from a `UViTConfig` (the model YAML's keys, checked once when the config is
made, as nanoGPT's GPTConfig); the layers trust it.

Differences from the reference (none change the numbers): attention always through
`F.scaled_dot_product_attention` (the reference picks flash, xformers or math by a global flag),
no dropout (the reference's rates are 0), no gradient checkpointing,
and `normalize_timesteps`, which divides t by T before the embedding as the early-exit seed
repository does with --normalize_timesteps.

For early exit and FLOP counting the forward pass is also available in pieces:
`embed(x, t, y)`, `run_block(i, x, skips)` for i in execution order, and `head(tokens)`;
`forward` is exactly these in sequence.

DeepCache-style caching (`forward_cached`, sample/policies.py CacheDenoiser) rests on the long
skips: out-block depth-1-i reads in-block i, so with the first `keep` in-blocks and the last `keep`
out-blocks run afresh, everything between them (the inner in-blocks, the mid block, the inner
out-blocks) reduces to one tensor, the hidden state entering out-block depth-keep, which is taken
from the last full step.

Learning-to-Cache (Ma, Fang, Mi, Wang, NeurIPS 2024; `forward_routed`, models/router.py,
sample/policies.py RouterDenoiser) caches at a finer grain, as L2C's U-ViT does: each block's
attention and its MLP are two layers, each adding a residual to the hidden state; on a cache step
a gated-off layer adds the residual it added on the previous step instead of computing it (an
out-block's skip_linear, which merges the long skip, always runs, as in L2C).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from duodiff.core.errors import DuodiffError, check_choice, check_int, is_number, require

# The designs of the early-exit uncertainty probes (models/early_exit.py): this project's, or the
# early-stopping-diffusion seed's. Listed here, where model configs are checked, so that checking a
# config does not need the early-exit module.
PROBE_DESIGNS = ("duodiff", "seed")


@dataclass(frozen=True)
class UViTConfig:
    """A model config (config/models/*.yaml), checked once when it is made.

    The early-exit keys (EARLY_EXIT_KEYS) belong to the early-exit model; a plain U-ViT ignores
    them, so one YAML builds either. Made from a YAML or model.pt mapping with `from_dict`.
    """

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False
    num_classes: int = 0
    conv: bool = True
    normalize_timesteps: bool = False
    probe_hidden: int = 128
    # Model files written before this key existed have no probe_design: they load as "duodiff",
    # the only design there was.
    probe_design: str = "duodiff"

    def __post_init__(self):
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "probe_hidden"):
            check_int(key, getattr(self, key), minimum=1)
        check_int("num_classes", self.num_classes, minimum=0)
        check_choice("probe_design", self.probe_design, PROBE_DESIGNS)
        for key in ("qkv_bias", "mlp_time_embed", "conv", "normalize_timesteps"):
            require(isinstance(getattr(self, key), bool), f"{key} must be true or false; got {getattr(self, key)!r}")
        ratio = self.mlp_ratio
        require(
            is_number(ratio) and ratio > 0,
            f"mlp_ratio must be a positive number; got {ratio!r}",
        )
        require(
            self.img_size % self.patch_size == 0,
            f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})",
        )
        require(
            self.embed_dim % self.num_heads == 0,
            f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})",
        )
        require(
            self.depth % 2 == 1,
            f"depth must be odd (depth // 2 in-blocks, 1 mid-block, depth // 2 out-blocks); got {self.depth}",
        )

    @classmethod
    def from_dict(cls, config, source: str = "model config") -> UViTConfig:
        """The config of a mapping (a model YAML, or the one stored in model.pt); DuodiffError
        prefixed with `source` when a key is unknown or missing or a value is not allowed."""
        if not isinstance(config, dict):
            raise DuodiffError(f"{source}: expected a mapping of settings, got {type(config).__name__}")
        keys = [f.name for f in fields(cls)]
        unknown = [key for key in config if key not in keys]
        if unknown:
            raise DuodiffError(
                f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed keys: {', '.join(keys)}"
            )
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in config]
        if missing:
            raise DuodiffError(f"{source}: missing required key(s) {', '.join(missing)}")
        try:
            return cls(**config)
        except DuodiffError as error:
            raise DuodiffError(f"{source}: {error}") from None

    def to_dict(self) -> dict:
        """Every key with its value, defaults included."""
        return asdict(self)


EARLY_EXIT_KEYS = ("probe_hidden", "probe_design")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (B,) -> (B, dim): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """B (h w) (p1 p2 C) -> B C (h p1) (w p2), the inverse of the reference's patchify."""
    patch_size = int(round((x.shape[2] // channels) ** 0.5))
    h = w = int(round(x.shape[1] ** 0.5))
    assert h * w == x.shape[1] and patch_size**2 * channels == x.shape[2], (x.shape, channels)
    return rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=h, p1=patch_size, p2=patch_size)


def init_weights(m):
    """The reference `_init_weights`: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class Mlp(nn.Module):
    """timm's Mlp without dropout: fc1, GELU, fc2."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as the reference
        return self.proj(rearrange(x, "B H L D -> B L (H D)"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; out-blocks first merge the long skip with skip_linear."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x

    def forward_routed(self, x, skip=None, run=(True, True), cached=None, gates=None):
        """-> (output, (attention residual, MLP residual)). `run` (attention, MLP): a layer that
        does not run adds its residual in `cached` (the previous step's) and is not computed;
        `gates` (training, L2C's relaxation): every layer runs and adds g * fresh + (1 - g) *
        cached. With both layers run and no gates, the same operations as `forward`."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        residuals = []
        for j, (norm, layer) in enumerate(((self.norm1, self.attn), (self.norm2, self.mlp))):
            if run[j]:
                residual = layer(norm(x))
                if gates is not None:
                    # one gate for the batch (2,), or one per sample (B, 2): each its own cache step
                    g = gates[..., j] if gates.dim() == 1 else gates[:, j, None, None]
                    residual = g * residual + (1 - g) * cached[j]
            else:
                residual = cached[j]
            residuals.append(residual)
            x = x + residual
        return x, tuple(residuals)


class PatchEmbed(nn.Module):
    """Image to patch tokens: Conv2d with kernel = stride = patch size, then flatten."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class UViT(nn.Module):
    def __init__(self, config: UViTConfig, num_timesteps: int = 1000):
        super().__init__()
        assert isinstance(config, UViTConfig) and num_timesteps > 0, (config, num_timesteps)
        self.config = config
        img_size, patch_size, in_chans = config.img_size, config.patch_size, config.in_chans
        embed_dim, depth, num_classes = config.embed_dim, config.depth, config.num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_classes = num_classes
        self.conv = config.conv
        self.normalize_timesteps = config.normalize_timesteps
        self.num_timesteps = num_timesteps

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.num_patches = (img_size // patch_size) ** 2
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if config.mlp_time_embed
            else nn.Identity()
        )
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        # Tokens before the patches: the time token and, when class-conditional, the class token.
        self.num_extras = 1 + (num_classes > 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extras + self.num_patches, embed_dim))

        block_args = dict(dim=embed_dim, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias)
        self.in_blocks = nn.ModuleList([Block(**block_args) for _ in range(depth // 2)])
        self.mid_block = Block(**block_args)
        self.out_blocks = nn.ModuleList([Block(**block_args, skip=True) for _ in range(depth // 2)])

        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if config.conv else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)

    def block(self, i: int) -> Block:
        """The i-th block in execution order (in-blocks, mid-block, out-blocks)."""
        half = self.depth // 2
        if i < half:
            return self.in_blocks[i]
        if i == half:
            return self.mid_block
        return self.out_blocks[i - half - 1]

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Image, timesteps (and labels) -> tokens (B, extras + L, D): [class], time, patches."""
        if (y is not None) != (self.num_classes > 0):
            raise DuodiffError(
                f"this U-ViT has num_classes={self.num_classes}: labels y must be "
                + ("given" if self.num_classes > 0 else "None")
            )
        x = self.patch_embed(x)
        timesteps = t.float() / self.num_timesteps if self.normalize_timesteps else t
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim)).unsqueeze(dim=1)
        x = torch.cat((time_token.to(x.dtype), x), dim=1)
        if y is not None:
            label_emb = self.label_emb(y).unsqueeze(dim=1)
            x = torch.cat((label_emb.to(x.dtype), x), dim=1)
        return x + self.pos_embed

    def run_block(self, i: int, x: torch.Tensor, skips: list) -> torch.Tensor:
        """Run block i (execution order); in-blocks push their output to `skips`, out-blocks pop."""
        half = self.depth // 2
        if i < half:
            x = self.in_blocks[i](x)
            skips.append(x)
            return x
        if i == half:
            return self.mid_block(x)
        return self.out_blocks[i - half - 1](x, skips.pop())

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> image: final norm, decoder, drop the extra tokens, unpatchify, 3x3 conv."""
        x = self.norm(x)
        x = self.decoder_pred(x)
        x = x[:, self.num_extras :, :]
        x = unpatchify(x, self.in_chans)
        return self.final_layer(x)

    def forward_cached(self, x, t, y=None, keep: int = 1, cache: torch.Tensor | None = None):
        """-> (output, cache). Without `cache`: the whole network (the same operations as `forward`,
        so its output is bitwise `forward`'s), and the hidden state entering block depth-keep (the
        first of the last `keep` out-blocks) as the cache. With `cache`: the embedding, in-blocks
        0..keep-1, then out-blocks depth-keep..depth-1 on top of the cached state (their long skips
        from the fresh in-blocks), and the head; the blocks between are not run at all."""
        assert 1 <= keep <= self.depth // 2, (keep, self.depth)  # checked where keep comes from
        x = self.embed(x, t, y)
        skips = []
        if cache is None:
            for i in range(self.depth):
                if i == self.depth - keep:
                    cache = x
                x = self.run_block(i, x, skips)
            return self.head(x), cache
        for i in range(keep):
            x = self.run_block(i, x, skips)
        x = cache
        for i in range(self.depth - keep, self.depth):
            x = self.run_block(i, x, skips)
        return self.head(x), cache

    def forward_routed(self, x, t, y=None, run=None, cache=None, gates=None):
        """-> (output, residuals): Learning-to-Cache's routed pass. `residuals` lists, per block in
        execution order, the (attention, MLP) residuals this pass added: the next step's cache.
        Without `cache`: the whole network (the operations of `forward`, bitwise its output).
        With `cache` and `run` (depth x (attention, MLP) booleans): a layer whose entry is False
        re-adds its cached residual and is not computed. With `cache` and `gates` (a (depth, 2)
        tensor in [0, 1], or (B, depth, 2): one row per sample; router training): every layer
        runs, its residual interpolated g * fresh + (1 - g) * cached."""
        x = self.embed(x, t, y)
        skips, residuals = [], []
        half = self.depth // 2
        for i in range(self.depth):
            block = self.block(i)
            kwargs = {}
            if cache is not None:
                kwargs["cached"] = cache[i]
                if gates is not None:
                    kwargs["gates"] = gates[i] if gates.dim() == 2 else gates[:, i]
                elif run is not None:
                    kwargs["run"] = run[i]
            x, parts = block.forward_routed(x, skips.pop() if i > half else None, **kwargs)
            if i < half:
                skips.append(x)
            residuals.append(parts)
        return self.head(x), residuals

    @staticmethod
    def loss(output, target, weights, use_unweighted_loss=False):
        """DDPM's L_simple: MSE(output, target) per sample, times its weight (B,), averaged over the
        batch -> (loss, {}: no parts). use_unweighted_loss belongs to the early-exit loss."""
        per_sample = (output.float() - target.float()).square().flatten(1).mean(1)
        return (per_sample * weights).mean(), {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x, t, y)
        skips = []
        for i in range(self.depth):
            x = self.run_block(i, x, skips)
        return self.head(x)
