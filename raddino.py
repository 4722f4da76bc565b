"""RAD-DINO's model and method in one file, in the order the data flows.

    patch embedding -> attention -> block -> ViT          (the DINOv2 backbone)
    DINO head -> Sinkhorn-Knopp / centring -> losses      (each loss with its slow twin)
    StudentTeacher                                        (one training step)
    param_groups, collapse_diagnostics                    (what the training loop needs to know)

Papers: DINO (Caron et al., 2021, arXiv:2104.14294), iBOT (Zhou et al., 2022,
arXiv:2111.07832), DINOv2 (Oquab et al., 2024, arXiv:2304.07193), RAD-DINO (Perez-Garcia et
al., 2025, arXiv:2401.10815). Numbers and parameter names follow the official code
(facebookresearch/dinov2), so its released weights load with strict=True. There is no
xFormers: attention goes through torch's scaled_dot_product_attention, which picks a fused
kernel by itself.

This file imports nothing from the project, so it can be copied on its own. Weight files
(safetensors, DINOv2 .pth, Hugging Face folders) are weights.py's job.
"""

import copy
import functools
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ===== The backbone: a DINOv2 Vision Transformer =====


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each to a D-vector.

    A strided convolution is a per-patch linear layer. in_chans=1 suits X-rays; weights.py
    folds 3-channel weights into one channel exactly."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # -> (B, N, D), patches in row-major order


def attention_weights(q, k):
    """softmax(Q K^T / sqrt(d)): how much each query attends to each key, (B, H, Nq, N)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Nq, N)
    return scores.softmax(dim=-1)


def attention_reference(q, k, v):
    """softmax(Q K^T / sqrt(d)) V written out: what SDPA computes, for readers and tests."""
    return attention_weights(q, k) @ v  # (B, H, N, Dh)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows ordered q | k | v)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def qkv_heads(self, x):
        """Tokens (B, N, D) -> queries, keys and values, each (B, H, N, Dh)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4)  # (B, N, 3, H, Dh) -> 3 x (B, H, N, Dh)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)
        # A flash or memory-efficient kernel where the device and inputs allow one, else
        # torch's own math kernel: each computes what attention_reference writes out.
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, Dh) -> (B, N, D)
        return self.proj(x)


class SwiGLU(nn.Module):
    """ViT-g's feed-forward: silu(x W1) * (x W2), with W1 and W2 fused into w12.

    It keeps 2/3 of the nominal hidden width, so that its parameters match a plain MLP's,
    rounded up to a multiple of 8: 6144 -> 4096 (DINOv2's SwiGLUFFNFused)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        hidden_dim = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """A learnable per-channel scale on a residual branch (CaiT). Started tiny, every block
    begins near the identity."""

    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, rate, training):
    """Stochastic depth: drop a residual branch for whole samples, rescale the survivors.

    DINOv2 runs the branch on a random subset of the batch instead: the same expectation,
    less compute, more code."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1.0 - rate)  # (B, 1, 1): one draw per sample
    return x * keep / (1.0 - rate)


def init_linears(module):
    """DINOv2 (like timm) starts every Linear at trunc-normal std 0.02 with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim, num_heads, mlp_ratio, ffn, layerscale_init, drop_path_rate):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if ffn == "swiglu":
            self.mlp = SwiGLU(dim, hidden)
        else:  # the plain MLP; GELU exact, not the tanh approximation
            fc1 = nn.Linear(dim, hidden)
            fc2 = nn.Linear(hidden, dim)
            self.mlp = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(), fc2=fc2))
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        attention = self.ls1(self.attn(self.norm1(x)))
        x = x + drop_path(attention, self.drop_path_rate, self.training)
        feed_forward = self.ls2(self.mlp(self.norm2(x)))
        return x + drop_path(feed_forward, self.drop_path_rate, self.training)


class ViT(nn.Module):
    """DINOv2's Vision Transformer under its exact parameter names.

    Tokens are [CLS, registers, patches]. img_size only fixes the stored grid of position
    embeddings (37 x 37 for 518 / 14); other input sizes interpolate it, as DINOv2 does."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, ffn="mlp", num_register_tokens=0,
                 layerscale_init=1e-5, drop_path_rate=0.0, interpolate_offset=None,
                 interpolate_antialias=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        # DINOv2's hub models interpolate position embeddings with a 0.1 offset and no
        # antialias (a quirk, kept so the weights behave as trained); the register models
        # ("reg4") use antialias and no offset.
        if interpolate_offset is None:
            interpolate_offset = 0.0 if num_register_tokens else 0.1
        if interpolate_antialias is None:
            interpolate_antialias = bool(num_register_tokens)
        # Everything needed to rebuild this model, kept once: saved in checkpoints, read by
        # weights.py, and by the methods below (embed_dim and patch_size are views of it).
        self.args = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, ffn=ffn,
            num_register_tokens=num_register_tokens, layerscale_init=layerscale_init,
            drop_path_rate=drop_path_rate, interpolate_offset=interpolate_offset,
            interpolate_antialias=interpolate_antialias)
        self.grad_checkpointing = False

        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # CLS and patches have position embeddings; registers have none.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        # Stands in for the masked patches of iBOT.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn, layerscale_init, drop_path_rate)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    @property
    def embed_dim(self):
        return self.args["embed_dim"]

    @property
    def patch_size(self):
        return self.args["patch_size"]

    def reset_parameters(self):
        """DINOv2's init. LayerScale gammas keep their init value."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.args["num_register_tokens"]:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        init_linears(self)

    def interpolate_pos_embed(self, grid_h, grid_w):
        """Position embeddings for a grid_h x grid_w grid of patches, (1, 1 + grid_h * grid_w, D).

        Bicubic, in fp32, from the stored M x M grid. With an offset, DINOv2 passes the scale
        factor (g + 0.1) / M rather than a size; the factor decides where bicubic samples, so
        we pass it too."""
        stored = self.pos_embed
        M = math.isqrt(stored.shape[1] - 1)
        if grid_h == M and grid_w == M:
            return stored
        cls_pos = stored[:, :1]
        patch_pos = stored[:, 1:].float().reshape(1, M, M, -1)
        patch_pos = patch_pos.permute(0, 3, 1, 2)  # (1, M, M, D) -> (1, D, M, M)
        offset = self.args["interpolate_offset"]
        if offset:
            scale = ((grid_h + offset) / M, (grid_w + offset) / M)
            target = dict(scale_factor=scale)
        else:
            target = dict(size=(grid_h, grid_w))
        patch_pos = F.interpolate(
            patch_pos, mode="bicubic", antialias=self.args["interpolate_antialias"], **target)
        assert patch_pos.shape[-2:] == (grid_h, grid_w), f"interpolated to {patch_pos.shape}"
        patch_pos = patch_pos.permute(0, 2, 3, 1)  # (1, D, h, w) -> (1, h, w, D)
        patch_pos = patch_pos.reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos.to(stored.dtype)], dim=1)

    def prepare_tokens(self, x, masks=None):
        """Image (B, C, H, W) -> token sequence (B, 1 + R + N, D), masked patches replaced."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            # The convolution would drop the border without a word.
            raise ValueError(
                f"input {H} x {W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            # The mask token replaces the patch embedding *before* the position embeddings
            # are added, so a masked token still knows where it is.
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)
        if self.args["num_register_tokens"]:  # after CLS, without position embeddings
            registers = self.register_tokens.expand(B, -1, -1)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        return x

    def split_tokens(self, x):
        """(B, 1 + R + N, D) -> {"cls": (B, D), "reg": (B, R, D), "patch": (B, N, D)}."""
        first_patch = 1 + self.args["num_register_tokens"]
        return {"cls": x[:, 0], "reg": x[:, 1:first_patch], "patch": x[:, first_patch:]}

    def forward_features(self, x, masks=None):
        """(B, C, H, W) and bool masks (B, N) or None -> the final-norm tokens, as
        split_tokens' dict."""
        x = self.prepare_tokens(x, masks)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                # Recompute activations in the backward pass: more compute, far less memory
                # (what 518-px global crops need; bench.py train --grad-checkpointing).
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.split_tokens(self.norm(x))

    def forward(self, x, masks=None, is_training=False):
        """The CLS token (B, D), as DINOv2's hub models return it; with is_training=True the
        whole forward_features dict. Training goes through here, not through forward_features,
        so that torch.compile, which wraps __call__, compiles the backbone."""
        out = self.forward_features(x, masks)
        return out if is_training else out["cls"]

    def get_intermediate_layers(self, x, n=1, blocks=None):
        """Outputs of the last n blocks (or of the blocks listed, 0-based), each through the
        final norm: a list, in block order, of (patch tokens (B, N, D), CLS (B, D)). This is
        what DINOv2's linear probe concatenates and what segmentation decoders read."""
        depth = len(self.blocks)
        if blocks is None:
            if not 1 <= n <= depth:
                raise ValueError(f"asked for the last {n} of {depth} blocks")
            blocks = range(depth - n, depth)
        if not all(0 <= i < depth for i in blocks):
            raise ValueError(f"blocks {list(blocks)} are not all in 0..{depth - 1}")
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks[:max(blocks) + 1]):
            x = block(x)
            if i in blocks:
                tokens = self.split_tokens(self.norm(x))
                outputs.append((tokens["patch"], tokens["cls"]))
        return outputs

    def last_cls_attention(self, x):
        """(B, C, H, W) -> (B, heads, N): how the last block's CLS query attends to each patch,
        softmax(q_cls K^T / sqrt(Dh)) over all tokens, registers and CLS dropped after the
        softmax. The maps of DINO's figures (Caron et al. 2021, figure 1; dino's
        visualize_attention.py)."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        q, k, _ = last.attn.qkv_heads(last.norm1(x))  # each (B, H, N, Dh)
        attention = attention_weights(q[:, :, :1], k)[:, :, 0]  # the CLS query's: (B, H, N)
        return attention[:, :, 1 + self.args["num_register_tokens"]:]  # (B, H, patches)


# Heads are 64 wide, as in DINOv2. vit_tiny (DeiT-Ti widths) is not a DINOv2 release: it is
# here for laptop CPUs.
ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def build_vit(arch, **kwargs):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ViT(**{**ARCHS[arch], **kwargs})


vit_tiny = functools.partial(build_vit, "vit_tiny")
vit_small = functools.partial(build_vit, "vit_small")
vit_base = functools.partial(build_vit, "vit_base")
vit_large = functools.partial(build_vit, "vit_large")
vit_giant2 = functools.partial(build_vit, "vit_giant2")


# ===== The head =====


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose rows are g * v / ||v||: torch's deprecated weight_norm written
    out under its parameter names, so that DINOv2 heads load as they are. Each row is a
    prototype; g bounds the logits."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's default init, which DINOv2 leaves in place for its prototypes.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x):
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised prototypes: (..., in_dim) -> (..., out_dim) logits.

    DINOv2's names: mlp.0 / mlp.2 / mlp.4 (GELU between), last_layer.weight_g / weight_v."""

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        # One layer is stored as a bare Linear in DINOv2 ("mlp.weight"), more as a Sequential.
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        init_linears(self.mlp)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x):
        x = self.mlp(x)
        # DINOv2's eps: 1e-12 underflows in fp16, so half precision gets 1e-6.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, eps=eps)
        return self.last_layer(x)


# ===== Teacher targets: Sinkhorn-Knopp or centring =====


def all_reduce(x, op="sum"):
    """Sum (or max) over ranks in place. Without a process group it does nothing, so every
    function below works unchanged in one process (DINOv2's iBOT Sinkhorn-Knopp crashes
    there)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    """Teacher targets by Sinkhorn-Knopp (SwAV, Caron et al. 2020; DINOv2 for ViT-L/g).

    (B, K) logits -> (B, K) distributions that use every prototype equally over the *global*
    batch. In Q (K x B), row sums (prototypes) are reduced across ranks; column sums
    (samples) stay local; B is the global number of samples. Always fp32."""
    logits = teacher_logits.float()
    # exp overflows fp32 past 88.7: a cosine of 0.9 at T = 0.01 is inf, and inf / inf NaN.
    # Q is divided by its total next, so subtracting one number from every logit changes
    # nothing but the range; it must be the same on every rank: the global maximum.
    # One full-size buffer, worked on in place: at RAD-DINO's scale an (M, K) copy of the
    # masked tokens' logits is 4 GiB.
    Q = logits.sub(all_reduce(logits.max(), op="max")).div_(teacher_temp).exp_().t()  # (K, B)
    K = Q.shape[0]
    # The global batch, summed on the device: new_full fills on the device, where
    # torch.tensor(...) would copy from the host and wait for it.
    B = all_reduce(Q.new_full((), Q.shape[1]))
    Q /= all_reduce(Q.sum())
    for _ in range(n_iterations):
        Q /= all_reduce(Q.sum(dim=1, keepdim=True))  # each prototype's total mass -> 1 ...
        Q /= K  # ... -> 1/K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample's total mass -> 1 ...
        Q /= B  # ... -> 1/B
    return Q.mul_(B).t()  # each sample's row sums to 1: (B, K)


def sinkhorn_knopp_reference(teacher_logits, teacher_temp, n_iterations=3):
    """sinkhorn_knopp's slow twin, one process: alternate row and column normalisation of an
    explicit K x B table of Python floats."""
    B, K = teacher_logits.shape
    Q = [[math.exp(float(teacher_logits[b, k]) / teacher_temp) for b in range(B)] for k in range(K)]
    total = sum(map(sum, Q))
    Q = [[q / total for q in row] for row in Q]
    for _ in range(n_iterations):
        Q = [[q / sum(row) / K for q in row] for row in Q]  # every prototype gets mass 1/K
        columns = [sum(Q[k][b] for k in range(K)) for b in range(B)]
        Q = [[Q[k][b] / columns[b] / B for b in range(B)] for k in range(K)]  # every sample 1/B
    return torch.tensor([[Q[k][b] * B for k in range(K)] for b in range(B)])


class Center(nn.Module):
    """DINO's centring: targets softmax((t - c) / T), c an EMA of the teacher's mean output
    over all ranks. softmax() uses the centre of earlier steps; update() then folds this
    step in (DINO, section 3.1)."""

    def __init__(self, dim, momentum=0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))  # in the state dict: resumes exactly

    @torch.no_grad()
    def softmax(self, teacher_logits, teacher_temp):
        # softmax((t - c) / T) in one full-size buffer, worked on in place
        probs = teacher_logits.float().sub(self.center).div_(teacher_temp)
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        return probs.div_(probs.sum(dim=-1, keepdim=True))

    @torch.no_grad()
    def update(self, teacher_logits):
        # The sum and the count travel together, so the mean is over all rows of all ranks
        # even when ranks hold different numbers of rows (as they do with masked patches).
        sums = teacher_logits.float().sum(dim=0)
        stats = all_reduce(torch.cat([sums, sums.new_full((1,), len(teacher_logits))]))
        batch_mean = stats[:-1] / stats[-1].clamp(min=1)
        # No rows on any rank (a step without masks) leaves the centre as it was. Decided on
        # the device: `if stats[-1] > 0` would make the host wait for the GPU every step.
        has_rows = stats[-1] > 0
        self.center.mul_(torch.where(has_rows, self.momentum, 1.0))
        self.center.add_(batch_mean * torch.where(has_rows, 1 - self.momentum, 0.0))


# ===== The losses, each with its slow twin =====


def cross_entropy_reference(teacher_probs, student_logits, student_temp):
    """-sum_k t_k log softmax(s / T)_k for one sample, in Python floats."""
    s = [float(v) / student_temp for v in student_logits]
    log_z = max(s) + math.log(sum(math.exp(v - max(s)) for v in s))
    return -sum(float(t) * (v - log_z) for t, v in zip(teacher_probs, s))


def dino_loss(student_logits, teacher_probs, student_temp=0.1):
    """The DINO loss (DINO, eq. 2): over every (student crop, teacher crop) pair of (B, K)
    tensors, the batch mean of -sum_k t_k log softmax(s / T_s)_k, summed."""
    total = 0.0
    for s in student_logits:
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for t in teacher_probs:
            total = total - (t * log_p).sum(dim=-1).mean()
    return total


def dino_loss_reference(student_logits, teacher_probs, student_temp=0.1):
    total = 0.0
    for s in student_logits:  # every student crop ...
        for t in teacher_probs:  # ... against every teacher crop ...
            for b in range(len(s)):  # ... averaged over the batch
                total += cross_entropy_reference(t[b], s[b], student_temp) / len(s)
    return total


def cat_rows(tensors):
    """torch.cat, without the copy when there is one tensor (an (M, K) copy is 4 GiB at
    RAD-DINO's scale)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def masked_tokens(masks):
    """(2B, N) bool masks of the global crops -> (indices, weights), what the step needs of
    them: the (M,) positions of the masked patches among the 2B * N, in flatten order, and
    each one's iBOT weight, 1 / (masked patches in its crop). Finding them is a host sync on
    a GPU (nonzero), so data.collate computes them on the loader's CPU, as DINOv2's
    collate_data_and_cast does."""
    indices = masks.flatten().nonzero().squeeze(1)  # (M,)
    per_crop = 1.0 / masks.sum(dim=1).clamp(min=1)  # (2B,)
    weights = per_crop.repeat_interleave(masks.shape[1])[indices]  # (M,)
    return indices, weights


def ibot_loss(student_masked_logits, teacher_masked_probs, mask_weights, n_global_crops,
              student_temp=0.1):
    """iBOT's masked-patch loss (iBOT, eq. 1; DINOv2's weighting).

    (M, K) logits and probabilities of the masked tokens, mask_weights (M,) from
    masked_tokens(): each token weighs 1 / (masked tokens in its crop), so each masked crop
    counts once whatever its mask size; the sum is divided by all 2B crops, masked or not."""
    log_p = F.log_softmax(student_masked_logits.float() / student_temp, dim=-1)  # (M, K)
    # Per token, sum_k t * log_p as a batched dot product: no third (M, K) buffer, which at
    # RAD-DINO's scale (~16k masked tokens x 65,536 prototypes) is 4 GiB.
    cross_entropy = -torch.einsum("mk,mk->m", teacher_masked_probs, log_p)  # (M,)
    return (cross_entropy * mask_weights).sum() / n_global_crops


def ibot_loss_reference(student_masked_logits, teacher_masked_probs, masks, student_temp=0.1):
    total = 0.0
    token = 0
    for image in range(masks.shape[0]):  # tokens come image by image, patch by patch
        n_masked = int(masks[image].sum())
        for patch in range(masks.shape[1]):
            if masks[image, patch]:
                teacher = teacher_masked_probs[token]
                student = student_masked_logits[token]
                total += cross_entropy_reference(teacher, student, student_temp) / n_masked
                token += 1
    return total / masks.shape[0]


def koleo_loss(x, eps=1e-8):
    """KoLeo (Sablayrolles et al. 2019; DINOv2, section 4): -mean_i log ||x_i - x_nn(i)||
    on L2-normalised rows, which spreads a batch's features apart. Always fp32: in fp16,
    near-duplicates round to distance 0 and the log is inf (a DINOv2 defect)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        similarity = x @ x.t()  # (B, B)
        similarity.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nearest = similarity.argmax(dim=1)
        # pairwise_distance adds eps inside the norm, as DINOv2's nn.PairwiseDistance does.
        distance = F.pairwise_distance(x, x[nearest], eps=eps)
        return -torch.log(distance + eps).mean()


def koleo_loss_reference(x, eps=1e-8):
    rows = [row / row.norm() for row in x.double()]
    total = 0.0
    for i, row in enumerate(rows):
        others = [j for j in range(len(rows)) if j != i]
        nearest = max(others, key=lambda j: float(row @ rows[j]))
        distance = float((row - rows[nearest] + eps).norm())
        total -= math.log(distance + eps)
    return total / len(rows)


# ===== The student-teacher step =====


class StudentTeacher(nn.Module):
    """DINOv2's training step: a student (backbone + heads) learns to match an EMA teacher.

    forward() computes every loss of a batch. The caller backpropagates losses["loss"],
    steps the optimiser on the student, then calls update_teacher(momentum)."""

    def __init__(self, backbone, out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
                 head_layers=3, separate_ibot_head=False, ibot_out_dim=None,
                 centering="centering", student_temp=0.1, center_momentum=0.9,
                 dino_weight=1.0, koleo_weight=0.1, ibot_weight=1.0):
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(
                f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        if ibot_out_dim and not separate_ibot_head:
            raise ValueError("ibot_out_dim needs separate_ibot_head: a shared head has one size")
        self.centering = centering
        self.student_temp = student_temp
        self.dino_weight = dino_weight
        self.koleo_weight = koleo_weight
        self.ibot_weight = ibot_weight
        ibot_out_dim = ibot_out_dim or out_dim
        width = backbone.embed_dim
        heads = dict(dino_head=DINOHead(width, out_dim, hidden_dim, bottleneck_dim, head_layers))
        if separate_ibot_head:
            heads["ibot_head"] = DINOHead(
                width, ibot_out_dim, hidden_dim, bottleneck_dim, head_layers)
        self.student = nn.ModuleDict(dict(backbone=backbone, **heads))
        # The teacher starts as an exact copy of the student, with no gradients and no drop
        # path: its outputs are targets, and targets should not be noisy.
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        for block in self.teacher.backbone.blocks:
            block.drop_path_rate = 0.0
        self.teacher.backbone.args["drop_path_rate"] = 0.0
        # Nor activation checkpointing, which a backbone built with it would hand down:
        # without gradients there is nothing to save memory for.
        self.teacher.backbone.grad_checkpointing = False
        self.dino_center = Center(out_dim, center_momentum)
        self.ibot_center = Center(ibot_out_dim, center_momentum)

    def heads(self, network, cls_tokens, patch_tokens):
        """(CLS logits, patch logits) of one network; with a shared head, in one call."""
        if "ibot_head" in network:
            return network.dino_head(cls_tokens), network.ibot_head(patch_tokens)
        logits = network.dino_head(torch.cat([cls_tokens, patch_tokens]))
        return logits[:len(cls_tokens)], logits[len(cls_tokens):]

    def teacher_heads(self, cls_tokens, patch_tokens):
        """The teacher's logits in fp32 under any autocast. At T_t = 0.01 a target is
        softmax(logit / 0.01): bf16's rounding of a logit (8 bits, ~0.004 on a cosine near 1)
        moves the targets by ~1% and, among similar images, can change the top prototype.
        The cost: at RAD-DINO's scale (ViT-B, 40 x 518 px, ~16k masked tokens, 65,536
        prototypes) the teacher's heads are ~0.8 TFLOP of a ~90 TFLOP step, run in TF32
        instead of bf16 on a GPU (train.py allows TF32 under precision=bf16)."""
        with torch.autocast(cls_tokens.device.type, enabled=False):
            return self.heads(self.teacher, cls_tokens.float(), patch_tokens.float())

    def targets(self, teacher_logits, center, teacher_temp):
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        probs = center.softmax(teacher_logits, teacher_temp)
        center.update(teacher_logits)
        return probs

    @torch.no_grad()
    def teacher_targets(self, micro_batches, teacher_temp):
        """The teacher's (DINO, iBOT) targets for each of a step's micro-batches, given as
        [(global_crops, mask_indices), ...]: both global crops, unmasked, no gradients.

        The centring statistics and Sinkhorn-Knopp cover every micro-batch (and, through
        all_reduce, every rank): k micro-batches of B behave as k more ranks, and one
        micro-batch is the plain step."""
        cls_logits = []
        patch_logits = []
        for global_crops, mask_indices in micro_batches:
            teacher_out = self.teacher.backbone(global_crops, is_training=True)
            first_view, second_view = teacher_out["cls"].chunk(2)
            # Swapped, so that the student's view A is matched to the teacher's view B.
            teacher_cls = torch.cat([second_view, first_view])
            # (2B, N, D) -> (M, D)
            teacher_patch = teacher_out["patch"].flatten(0, 1).index_select(0, mask_indices)
            cls, patch = self.teacher_heads(teacher_cls, teacher_patch)
            cls_logits.append(cls)
            patch_logits.append(patch)
        # (2B, K) and (M, K), over every micro-batch
        dino_targets = self.targets(cat_rows(cls_logits), self.dino_center, teacher_temp)
        ibot_targets = self.targets(cat_rows(patch_logits), self.ibot_center, teacher_temp)
        dino_targets = dino_targets.split([len(logits) for logits in cls_logits])
        ibot_targets = ibot_targets.split([len(logits) for logits in patch_logits])
        return list(zip(dino_targets, ibot_targets))

    def forward(self, global_crops, local_crops, masks, teacher_temp, masked=None,
                targets=None):
        """One batch -> (losses, diagnostics).

        global_crops: (2B, C, G, G), crop-major (every image's first crop, then every second
        crop); local_crops: (nB, C, L, L), crop-major, n >= 0; masks: (2B, N) bool for the
        global crops; masked: masked_tokens(masks), which train.py takes from the loader (on
        a GPU, computing it here would make the host wait); targets: this batch's
        teacher_targets() when train.py computed them for several micro-batches at once.
        losses: dino_local, dino_global, koleo, ibot and their weighted sum, loss.
        diagnostics: the student's CLS tokens and the teacher's DINO targets."""
        n_global_images = global_crops.shape[0] // 2
        n_local_crops = local_crops.shape[0] // n_global_images
        if masked is None:
            masked = masked_tokens(masks)
        mask_indices, mask_weights = masked  # (M,) into the 2B * N patches, (M,)
        if targets is None:
            [targets] = self.teacher_targets([(global_crops, mask_indices)], teacher_temp)
        dino_targets, ibot_targets = targets  # (2B, K), (M, K)

        # ----- the student: global crops masked, local crops not -----
        student_global = self.student.backbone(global_crops, masks=masks, is_training=True)
        cls_tokens = student_global["cls"]
        if n_local_crops:
            local_cls = self.student.backbone(local_crops, is_training=True)["cls"]
            cls_tokens = torch.cat([local_cls, cls_tokens])
        student_patch = student_global["patch"].flatten(0, 1).index_select(0, mask_indices)
        cls_logits, patch_logits = self.heads(self.student, cls_tokens, student_patch)
        local_logits = cls_logits[:len(local_crops)]
        global_logits = cls_logits[len(local_crops):]

        # ----- the losses, scaled exactly as DINOv2 scales them -----
        # 2 teacher targets x (n local + 1 other global) student crops: 2n + 2 terms, 18 for n = 8.
        n_terms = 2 * n_local_crops + 2
        losses = {}
        if n_local_crops:
            local_crops_logits = local_logits.chunk(n_local_crops)
            dino_local = dino_loss(local_crops_logits, dino_targets.chunk(2), self.student_temp)
            losses["dino_local"] = dino_local / n_terms
        else:
            losses["dino_local"] = global_logits.new_zeros(())
        # Both global crops in one (2B, K) term; its batch mean counts 2 pairs, hence the 2.
        dino_global = dino_loss([global_logits], [dino_targets], self.student_temp)
        losses["dino_global"] = dino_global * 2 / n_terms
        losses["ibot"] = ibot_loss(patch_logits, ibot_targets, mask_weights, len(masks),
                                   self.student_temp)
        # KoLeo within each global crop separately (two views of one image are close on
        # purpose), and only with the DINO loss, as in DINOv2.
        if self.dino_weight > 0:
            first_cls, second_cls = student_global["cls"].chunk(2)
            losses["koleo"] = koleo_loss(first_cls) + koleo_loss(second_cls)
        else:
            losses["koleo"] = global_logits.new_zeros(())

        dino = losses["dino_local"] + losses["dino_global"]
        loss = self.dino_weight * dino
        loss = loss + self.koleo_weight * losses["koleo"]
        loss = loss + self.ibot_weight * losses["ibot"]
        losses["loss"] = loss
        diagnostics = {"student_cls": student_global["cls"].detach(), "teacher_probs": dino_targets}
        return losses, diagnostics

    def compile_networks(self, **options):
        """torch.compile each network in place (state-dict names unchanged), before DDP wraps
        the model. compile() wraps __call__, which is why forward() calls the backbones
        through it and not through forward_features."""
        # Drop-path rates are Python floats that never change: compile them in as constants.
        # Left as graph inputs (torch's default), they break DDP's graph splitting under
        # torchrun ("'float' object has no attribute 'meta'", torch 2.13).
        torch._dynamo.config.specialize_float = True
        if self.student.backbone.grad_checkpointing and torch_version() < (2, 11):
            # Under DDP, dynamo splits each graph at the gradient buckets; torch 2.4 refuses
            # a graph with checkpointed blocks in it ("Found a higher order op"), torch 2.11
            # splits it. Versions between were not checked: one bucket per graph for them,
            # which overlaps less of the all-reduce with the backward pass.
            torch._dynamo.config.optimize_ddp = False
        for network in (*self.student.values(), *self.teacher.values()):
            if isinstance(network, ViT):
                # Static shapes: one graph for the global crops and one for the local crops,
                # each specialised to its size. Left to torch's automatic dynamic shapes, the
                # second size seen (the local crops) recompiles the backbone with a symbolic
                # batch, height and width, and every kernel becomes shape-generic.
                network.compile(dynamic=False, **options)
            else:
                # The heads' row count (2B + masked tokens) changes every step: dynamic.
                network.compile(**options)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """EMA over all parameters: teacher <- m * teacher + (1 - m) * student."""
        teacher = list(self.teacher.parameters())
        student = list(self.student.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


# ===== What the training loop needs to know =====


def torch_version():
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def allow_tf32(enabled):
    """TF32 on a GPU for the matmuls and convolutions that stay fp32 (under bf16 autocast:
    the teacher's heads, the losses). torch >= 2.9 has fp32_precision for it; mixing the
    legacy allow_tf32 setters with it raises inside inductor, so the new API when there is
    one."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def param_groups(student, layer_decay=0.9, patch_embed_lr_mult=0.2):
    """DINOv2's per-parameter optimiser settings, as AdamW groups with lr_mult, wd_mult,
    last_layer and backbone keys that the training loop multiplies into its schedules.

    - Layer-wise lr decay (BEiT, section 3.3): block i of L gets layer_decay ** (L - i);
      the patch embedding, position embedding and tokens layer_decay ** (L + 1); the final
      norm and the heads 1.
    - The patch embedding also gets x patch_embed_lr_mult (DINOv2: 0.2).
    - No weight decay on biases, norms and LayerScale gammas (wd_mult 0).
    - The prototypes (last_layer) are a group of their own: the loop freezes them at first.
      So is the backbone, which train.freeze_backbone_epochs holds still at first.
    - A one-channel patch embedding learns as a three-channel one would on a gray image.
      Its three kernels get the same gradient, so AdamW moves each by the same step and
      their sum (the one-channel kernel) three times as far: lr x 3. Weight decay shrinks
      each by lr x wd of itself, and so the sum too: wd x 1/3 keeps lr x wd. This is how
      RAD-DINO's (3-channel) patch embedding moved."""
    backbone = student["backbone"]
    depth = len(backbone.blocks)
    groups = {}
    for name, param in student.named_parameters():
        lr_mult = 1.0
        wd_mult = 1.0
        if name.startswith("backbone."):
            inner = name[len("backbone."):]
            if inner.startswith("blocks."):
                layer = int(inner.split(".")[1]) + 1
            elif inner.startswith("norm."):
                layer = depth + 1
            else:  # patch embedding, position embedding, CLS, mask and register tokens
                layer = 0
            lr_mult = layer_decay ** (depth + 1 - layer)
            if inner.startswith("patch_embed."):
                lr_mult *= patch_embed_lr_mult
            if inner == "patch_embed.proj.weight" and param.shape[1] == 1:
                lr_mult *= 3.0
                wd_mult /= 3.0
        if name.endswith(".bias") or "norm" in name or name.endswith(".gamma"):
            wd_mult = 0.0
        last_layer = ".last_layer." in name
        in_backbone = name.startswith("backbone.")
        key = (lr_mult, wd_mult, last_layer, in_backbone)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                           "last_layer": last_layer, "backbone": in_backbone}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


@torch.no_grad()
def collapse_diagnostics(teacher_probs, student_cls):
    """Three numbers that tell the two ways DINO collapses (DINO, section 5.3) apart:

    - teacher_entropy: the mean entropy of the teacher's targets over log K. 1 = uniform
      targets, the collapse that too much centring (or too little signal) gives;
    - teacher_batch_entropy: the entropy of the batch's mean target, in nats. Near 0 =
      every image on one prototype, the collapse that too much sharpening gives;
    - cls_spread: the spread of the student's L2-normalised CLS tokens, ~1 when they point
      every way, ~0 when all are alike."""
    probs = teacher_probs.float()
    log_k = math.log(probs.shape[1])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean()
    batch_mean = probs.mean(dim=0)
    batch_entropy = -(batch_mean * batch_mean.clamp_min(1e-12).log()).sum()
    cls = F.normalize(student_cls.float(), dim=-1)
    spread = cls.std(dim=0).mean() * math.sqrt(cls.shape[1])
    return {"teacher_entropy": float(entropy) / log_k,
            "teacher_batch_entropy": float(batch_entropy),
            "cls_spread": float(spread)}


def looks_collapsed(diagnostics):
    """Near-uniform targets (entropy within 5% of log K: a run whose DINO terms stay at
    ~0.95 log K has learned nothing), every image on one prototype, or all CLS alike."""
    return (diagnostics["teacher_entropy"] > 0.95
            or diagnostics["teacher_batch_entropy"] < 0.1
            or diagnostics["cls_spread"] < 0.02)
