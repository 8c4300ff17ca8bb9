"""Early-exit U-ViT (DeeDiff, Tang et al. 2309.17074; AdaDiff): an output head and an uncertainty
probe at every layer, so a sample can stop as soon as its predicted uncertainty is small enough.

Exits are numbered 0..depth. Exit i < depth sits at the *input* of block i (exit 0 sees the
tokens right after the embedding); it has its own `OutputHead` (the backbone's head layout:
LayerNorm, Linear to patches, drop the extra tokens, unpatchify, 3x3 conv when the backbone has
one) and an uncertainty probe that maps the tokens (and the timestep) to u in [0, 1] (unbounded
for the seed design of the attention probe). Exit depth is the backbone's own head and is always
taken when no earlier exit was.

Probes (`classifier_type`, named as in the early-stopping-diffusion seed). Each comes in two designs,
chosen by the model config's `probe_design`: `duodiff` (this project's, the default, described
first) and `seed` (the seed's own, below). With the `duodiff` design:

- `attention_probe`: one per exit. A learned query attends (multi-head) over the LayerNormed
  tokens, whose keys and values are projected to `probe_hidden` dims; the pooled vector goes
  through a small MLP (Linear, GELU, Linear) and a sigmoid. The time token is one of the keys,
  so the probe knows t.
- `mlp_probe_per_layer`: one MLP per exit, shared across timesteps, on the pooled tokens
  (LayerNorm without affine parameters, then the mean over all tokens, time token included:
  a learned affine would be absorbed by the first Linear after the mean).
- `mlp_probe_per_timestep`: one probe per timestep (T of them), shared across exits.
- `mlp_probe_per_layer_per_timestep`: one probe per (exit, timestep), nothing shared.

With `probe_design: seed`, the seed's designs (razvanmatisan/duodiff, models/early_exit.py: its
MLPProbe and AttentionProbe, and EarlyExitUViT's per-timestep ModuleDicts of MLPProbes):

- `attention_probe` (SeedAttentionProbe): one learned d-dimensional query (zero-initialised)
  attends, as a single head of width d, over the tokens without the time token (the seed slices
  off token 0 "to ignore the time vector"; in a class-conditional U-ViT token 0 is the class
  token, so here the time token itself is dropped, as the seed meant); keys and values come from
  one Linear(d, 2d); the pooled vector goes through Linear(d, d), SiLU, Linear(d, 1) and
  *no* sigmoid, so its u is unbounded (the seed trains it by MSE against the [0, 1] target
  all the same). 3d^2 + 5d + 1 parameters per exit (788,993 for d = 512, as the seed's docstring says).
- `mlp_probe_per_layer` (SeedMLPProbe): Linear(d, 1) and a sigmoid on every token (time and
  class tokens included), then the mean over the tokens: d + 1 parameters per exit.
- `mlp_probe_per_timestep` / `mlp_probe_per_layer_per_timestep`: a bank of such per-token
  linear probes, one per timestep (and exit). The seed picks the probe of the batch's first
  timestep for the whole batch; here each sample uses its own, as in the `duodiff` banks.
- No U-ViT init: the seed's probes keep PyTorch's default Linear init (and a zero query).
- `probe_hidden` does not apply: the seed's probes have no hidden width of their own.

The per-timestep probes are banks of weights of shape (T, ...) (and (depth, T, ...)): each sample
gathers the rows of its own timestep and the batch is evaluated with one einsum, so a batch with
mixed t is exact and costs no Python loop. Their hidden width is `bank_hidden`, by default 0,
meaning a linear probe (logistic regression on the pooled tokens): with T = 1000, 13 exits and
d = 512 a hidden width of even 8 would give the per-layer-per-timestep bank 53M parameters, more
than the 44M backbone, while the linear bank has 6.7M (13 * 1000 * 513). `probe_hidden` (the
model config's key) is the hidden width of the per-layer MLPs and of the attention probe.

`forward` runs every exit (training, and the reference for tests); `forward_early_exit` really
skips work: at each exit only the still-active samples are probed, the ones with u <= threshold
get their head output and leave the batch (tokens and t are indexed once per exit with one index
tensor; each long-skip tensor is indexed once, when its out-block uses it, see CompactedSkips; the
label y is already inside the tokens as the class token), so samples that exit at layer k cost
about k / depth of the full model, and the loop stops when no sample is left.

The training loss (`EarlyExitUViT.loss`, `early_exit_loss`), with target = the noise
(predict_noise) or the clean image (predict_original), outputs g_0..g_depth (g_depth: the
backbone's own head) and uncertainties u_0..u_{depth-1}:

    L_simple = MSE(g_depth, target)
    û_i      = mean_pixels tanh|g_i - target|     (detached: the probes' fixed target)
    L_u      = sum_i mean_b (u_i - û_i)^2
    L_UAL    = sum_i mean_b (1 - û_i) mean_pixels (g_i - target)^2
    total    = L_simple + L_u + L_UAL  [+ sum_i mean_b mean_pixels (g_i - target)^2]

(DeeDiff, Tang et al. 2309.17074; all terms are batch means so the scale does not grow with the
batch size, unlike the seed's sum-reduced L_u.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from duodiff.core.study import CLASSIFIER_TYPES
from duodiff.models.uvit import UViT, init_weights, unpatchify

# The heads of the (duodiff design's) attention probe: probe_hidden must be a multiple of it.
PROBE_HEADS = 4
# The parts of the early-exit loss, as loss.csv names its columns.
LOSS_PARTS = ("loss_simple", "loss_u", "loss_ual", "loss_unweighted")


def early_exit_loss(outputs, uncertainties, target, use_unweighted_loss=False, weights=None):
    """DeeDiff's loss (the module docstring) -> (total, {part name: value}).

    weights (B,): per-sample weights of the image losses (GaussianDiffusion.loss_weights: Min-SNR-gamma); the
    probes' L_u stays unweighted, since its target is the error the probe must predict."""
    target = target.float()
    exits = [g.float() for g in outputs[:-1]]  # g_0 .. g_{depth-1}
    u = uncertainties.float()  # (B, depth)
    w = torch.ones(target.shape[0], device=target.device) if weights is None else weights.float()
    error = torch.stack([(g - target).square().flatten(1).mean(1) for g in exits], dim=1)  # (B, depth)
    with torch.no_grad():
        u_hat = torch.stack([torch.tanh((g - target).abs()).flatten(1).mean(1) for g in exits], dim=1)
    loss_simple = ((outputs[-1].float() - target).square().flatten(1).mean(1) * w).mean()
    loss_u = (u - u_hat).square().mean(0).sum()
    loss_ual = ((1 - u_hat) * error * w[:, None]).mean(0).sum()
    loss_unweighted = (error * w[:, None]).mean(0).sum()
    total = loss_simple + loss_u + loss_ual
    if use_unweighted_loss:
        total = total + loss_unweighted
    parts = dict(zip(LOSS_PARTS, (loss_simple, loss_u, loss_ual, loss_unweighted)))
    return total, parts


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, D): LayerNorm (no affine) per token, then the mean over all tokens."""
    # An explicit identity affine (weight 1, bias 0) gives the same numbers, but PyTorch's CPU
    # layer_norm kernel without weight and bias is ~2x slower than with them (torch 2.14).
    d = tokens.shape[-1]
    ones = torch.ones(d, dtype=tokens.dtype, device=tokens.device)
    return F.layer_norm(tokens, (d,), ones, torch.zeros_like(ones)).mean(dim=1)


class OutputHead(nn.Module):
    """An exit's head, laid out like the backbone's: tokens -> image."""

    def __init__(self, embed_dim: int, patch_size: int, in_chans: int, extras: int, conv: bool):
        super().__init__()
        self.in_chans = in_chans
        self.extras = extras
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

    def forward(self, tokens):
        x = self.decoder_pred(self.norm(tokens))[:, self.extras :, :]
        return self.final_layer(unpatchify(x, self.in_chans))


class MLPProbe(nn.Module):
    """Pooled tokens -> Linear, GELU, Linear -> sigmoid."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, tokens):
        return torch.sigmoid(self.fc2(self.act(self.fc1(pool_tokens(tokens))))).squeeze(-1)


class AttentionProbe(nn.Module):
    """Attention pooling with a learned query over the tokens, then a small MLP -> sigmoid."""

    def __init__(self, embed_dim: int, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(embed_dim)
        self.query = nn.Parameter(torch.zeros(1, num_heads, 1, hidden // num_heads))
        self.kv = nn.Linear(embed_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens):
        keys, values = rearrange(self.kv(self.norm(tokens)), "B N (K H D) -> K B H N D", K=2, H=self.num_heads)
        query = self.query.expand(tokens.shape[0], -1, -1, -1).to(keys.dtype)  # (B, H, 1 query, D)
        pooled = rearrange(F.scaled_dot_product_attention(query, keys, values), "B H Q D -> B (H Q D)")
        return torch.sigmoid(self.fc2(self.act(self.fc1(pooled)))).squeeze(-1)


class SeedMLPProbe(nn.Module):
    """The seed's MLP probe: sigmoid(w . token + b) on every token, averaged over the tokens."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(embed_dim, 1)

    def forward(self, tokens):
        return torch.sigmoid(self.fc(tokens)).mean(dim=1).squeeze(-1)


class SeedAttentionProbe(nn.Module):
    """The seed's attention probe: a learned query, one head of width d over the tokens without
    the time token, then Linear(d, d), SiLU, Linear(d, 1) and no sigmoid (u is unbounded)."""

    def __init__(self, embed_dim: int, time_index: int):
        super().__init__()
        # The seed drops token 0 ("Ignore time vector"): the time token of an unconditional
        # U-ViT. A class-conditional U-ViT puts the class token first, so the time token's
        # position is passed in and the class token stays, as the seed's comment intends.
        self.time_index = time_index
        self.query = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))  # (batch, head, query, width)
        self.kv = nn.Linear(embed_dim, 2 * embed_dim)
        self.fc1 = nn.Linear(embed_dim, embed_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(embed_dim, 1)

    def forward(self, tokens):
        tokens = torch.cat([tokens[:, : self.time_index], tokens[:, self.time_index + 1 :]], dim=1)
        keys, values = self.kv(tokens).unsqueeze(1).chunk(2, dim=-1)  # (B, 1 head, N - 1, d) each
        query = self.query.expand(tokens.shape[0], -1, -1, -1).to(keys.dtype)
        pooled = F.scaled_dot_product_attention(query, keys, values).flatten(1)  # scale 1/sqrt(d)
        return self.fc2(self.act(self.fc1(pooled))).squeeze(-1)


class TimestepProbeBank(nn.Module):
    """`banks` x T probes; each sample uses the probe of its own timestep.

    On the pooled tokens h: hidden = 0, linear probe sigmoid(w[t] . h + b[t]); hidden > 0, a
    one-hidden-layer MLP whose weights are all indexed by t. per_token (the seed's design, linear
    only): sigmoid(w[t] . token + b[t]) on every token, averaged over the tokens.
    """

    def __init__(self, banks: int, num_timesteps: int, embed_dim: int, hidden: int, per_token: bool = False):
        super().__init__()
        self.hidden = hidden
        self.per_token = per_token
        assert not (per_token and hidden), "the seed's per-timestep probes are linear (bank_hidden 0)"
        if hidden == 0:
            self.weight = nn.Parameter(torch.empty(banks, num_timesteps, embed_dim))
            self.bias = nn.Parameter(torch.zeros(banks, num_timesteps))
        else:
            self.weight1 = nn.Parameter(torch.empty(banks, num_timesteps, embed_dim, hidden))
            self.bias1 = nn.Parameter(torch.zeros(banks, num_timesteps, hidden))
            self.weight2 = nn.Parameter(torch.empty(banks, num_timesteps, hidden))
            self.bias2 = nn.Parameter(torch.zeros(banks, num_timesteps))
        if per_token:
            # The seed's probes are nn.Linear(d, 1) modules left at PyTorch's default init, which
            # draws weight and bias from U(-1/sqrt(d), 1/sqrt(d)).
            bound = embed_dim**-0.5
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
            return
        for name, param in self.named_parameters():
            if name.startswith("weight"):
                nn.init.trunc_normal_(param, std=0.02)

    def forward(self, bank: int, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # t is the network's time input (GaussianDiffusion.network_time): U-ViT's recipes feed
        # n = index + 1 or a continuous t * 999, so the bank row is the nearest step within [0, T).
        rows = self.bias.shape[-1] if self.hidden == 0 else self.bias2.shape[-1]
        t = t.round().long() if t.is_floating_point() else t
        t = t.clamp(0, rows - 1)
        if self.per_token:
            logits = torch.einsum("bnd,bd->bn", tokens, self.weight[bank, t].to(tokens.dtype))
            return torch.sigmoid(logits + self.bias[bank, t, None]).mean(dim=1)
        h = pool_tokens(tokens)
        if self.hidden == 0:
            logit = torch.einsum("bd,bd->b", h, self.weight[bank, t].to(h.dtype)) + self.bias[bank, t]
        else:
            h = torch.einsum("bd,bdh->bh", h, self.weight1[bank, t].to(h.dtype)) + self.bias1[bank, t]
            h = F.gelu(h)
            logit = torch.einsum("bh,bh->b", h, self.weight2[bank, t].to(h.dtype)) + self.bias2[bank, t]
        return torch.sigmoid(logit)


class CompactedSkips:
    """The long-skip stack of a batch that shrinks as samples exit (used as run_block's `skips`).

    A skip is indexed to the samples still running only when its out-block pops it; until then
    exits only compose its small row index. Each skip is thus copied at most once, however many
    exits happen between its in-block and its out-block (indexing every skip at every exit costs
    a few % of a small model's time when samples leave at every layer)."""

    def __init__(self):
        self._stack = []  # (skip tensor, rows of it the current batch holds, or None for all)

    def append(self, skip):
        self._stack.append((skip, None))

    def pop(self):
        skip, rows = self._stack.pop()
        return skip if rows is None else skip.index_select(0, rows)

    def keep(self, keep):
        """Samples `keep` (indices into the current batch) go on; the others have exited."""
        self._stack = [(skip, keep if rows is None else rows.index_select(0, keep)) for skip, rows in self._stack]

    def __len__(self):
        return len(self._stack)


class EarlyExitUViT(nn.Module):
    """The early-exit model around `backbone`; its probe settings (probe_hidden, probe_design) and
    its T are the backbone's (backbone.config, backbone.num_timesteps)."""

    def __init__(self, backbone: UViT, classifier_type: str, bank_hidden: int = 0, probe_heads: int = PROBE_HEADS):
        super().__init__()
        probe_hidden, probe_design = backbone.config.probe_hidden, backbone.config.probe_design
        num_timesteps = backbone.num_timesteps
        # Checked by `duodiff train`'s check pass (train/checks.py); the seed's attention probe
        # is one head of the full width, so probe_hidden and probe_heads do not apply to it.
        assert classifier_type in CLASSIFIER_TYPES and bank_hidden >= 0 and probe_heads >= 1, (classifier_type, bank_hidden)
        assert classifier_type != "attention_probe" or probe_design != "duodiff" or probe_hidden % probe_heads == 0
        self.backbone = backbone
        self.config = backbone.config
        self.classifier_type = classifier_type
        self.probe_design = probe_design
        self.depth = backbone.depth
        self.num_timesteps = num_timesteps
        d = backbone.embed_dim

        self.exit_heads = nn.ModuleList(
            [
                OutputHead(d, backbone.patch_size, backbone.in_chans, backbone.num_extras, backbone.conv)
                for _ in range(self.depth)
            ]
        )
        seed = probe_design == "seed"
        time_index = backbone.num_extras - 1  # the class token, if any, precedes the time token
        if classifier_type == "attention_probe":
            self.probes = nn.ModuleList(
                [
                    SeedAttentionProbe(d, time_index) if seed else AttentionProbe(d, probe_hidden, probe_heads)
                    for _ in range(self.depth)
                ]
            )
        elif classifier_type == "mlp_probe_per_layer":
            self.probes = nn.ModuleList(
                [SeedMLPProbe(d) if seed else MLPProbe(d, probe_hidden) for _ in range(self.depth)]
            )
        elif classifier_type == "mlp_probe_per_timestep":
            self.probes = TimestepProbeBank(1, num_timesteps, d, bank_hidden, per_token=seed)
        else:
            self.probes = TimestepProbeBank(self.depth, num_timesteps, d, bank_hidden, per_token=seed)
        self.exit_heads.apply(init_weights)  # the U-ViT reference init for the new heads and probes too
        # ...except the seed's probes, which keep the init the seed gave them (see the docstring).
        if isinstance(self.probes, nn.ModuleList) and not seed:
            self.probes.apply(init_weights)

    def freeze_backbone(self):
        """Train only the new heads and probes (the seed's --freeze_backbone)."""
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        return self

    def probe(self, i: int, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Uncertainty (B,) of exit i < depth for tokens at the input of block i: in [0, 1],
        except the seed's attention probe, whose output is unbounded."""
        if self.classifier_type == "mlp_probe_per_timestep":
            return self.probes(0, tokens, t)
        if self.classifier_type == "mlp_probe_per_layer_per_timestep":
            return self.probes(i, tokens, t)
        return self.probes[i](tokens)

    def exit_head(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        """Image predicted at exit i (exit depth is the backbone's own head)."""
        return self.backbone.head(tokens) if i == self.depth else self.exit_heads[i](tokens)

    def loss(self, output, target, weights, use_unweighted_loss=False):
        """DeeDiff's loss of `output` = forward(...) (the module docstring) -> (total, {part: value});
        weights (B,): the per-sample weights of the image losses."""
        return early_exit_loss(*output, target, use_unweighted_loss, weights)

    def forward(self, x, t, y=None):
        """Run every exit -> (outputs: depth + 1 images, uncertainties (B, depth))."""
        tokens = self.backbone.embed(x, t, y)
        skips = []
        outputs, uncertainties = [], []
        for i in range(self.depth):
            outputs.append(self.exit_head(i, tokens))
            uncertainties.append(self.probe(i, tokens, t))
            tokens = self.backbone.run_block(i, tokens, skips)
        outputs.append(self.backbone.head(tokens))
        return outputs, torch.stack(uncertainties, dim=1)

    def forward_early_exit(self, x, t, threshold, y=None):
        """-> (output (B, C, H, W), exit_layer LongTensor (B,)), computing only what is used.

        threshold: in [0, 1], as `duodiff sample` checked it."""
        B = x.shape[0]
        tokens = self.backbone.embed(x, t, y)
        skips = CompactedSkips()
        active = torch.arange(B, device=x.device)  # batch positions of the samples still running
        exit_layer = torch.full((B,), self.depth, dtype=torch.long, device=x.device)
        result = None
        for i in range(self.depth):
            leaving = self.probe(i, tokens, t) <= threshold
            # The one host sync per exit: how many samples leave fixes the shapes that follow.
            n_leaving = int(leaving.sum())
            if n_leaving:
                # A stable sort on the flag lists the staying samples first, then the leaving
                # ones, each in batch order: both index tensors without another sync.
                order = torch.argsort(leaving.to(torch.uint8), stable=True)
                n_keep = len(order) - n_leaving
                keep, out_index = order[:n_keep], order[n_keep:]
                # index_select / index_copy_: the same as x[idx] / x[idx] = v, several times
                # faster on CPU for these small batches.
                out = self.exit_head(i, tokens.index_select(0, out_index))
                if result is None:
                    result = out.new_empty((B, *out.shape[1:]))
                rows = active.index_select(0, out_index)
                result.index_copy_(0, rows, out)
                exit_layer.index_fill_(0, rows, i)
                if n_keep == 0:
                    return result, exit_layer
                # y needs no indexing: after the embedding it lives on as the class token.
                active, tokens, t = (v.index_select(0, keep) for v in (active, tokens, t))
                skips.keep(keep)
            tokens = self.backbone.run_block(i, tokens, skips)
        out = self.backbone.head(tokens)
        if result is None:
            return out, exit_layer
        result.index_copy_(0, active, out)
        return result, exit_layer
