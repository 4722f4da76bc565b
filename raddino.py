"""RAD-DINO in one file, in the order the data flows: the DINOv2 Vision Transformer; the
DINO head, Sinkhorn-Knopp / centring and the DINO, iBOT and KoLeo losses; the student-teacher
step that train.py calls once per iteration; weights in and out (safetensors, DINOv2 hub
.pth, Hugging Face folders, our checkpoints).

Numbers follow DINOv2 (facebookresearch/dinov2) and RAD-DINO; parameter names are DINOv2's
hub names, so released weights load with strict=True. No xFormers: attention goes through
torch's scaled_dot_product_attention, which picks a fused kernel by itself.
"""

import copy
import functools
import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ===== The backbone: a DINOv2 Vision Transformer =====
class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each to a D-vector (a strided conv is a
    per-patch linear layer). in_chans=1 suits X-rays; see fold_channels for 3-channel weights."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # -> (B, N, D), patches in row-major order


def attention_reference(q, k, v):
    """softmax(Q K^T / sqrt(d)) V written out: what SDPA computes, for readers and tests."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    return scores.softmax(dim=-1) @ v  # (B, H, N, Dh)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows ordered q | k | v)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, D = x.shape
        # (B, N, 3D) -> (B, N, 3, H, Dh) -> (3, B, H, N, Dh) -> q, k, v each (B, H, N, Dh)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernel when available
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, H, N, Dh) -> (B, N, D)


class SwiGLU(nn.Module):
    """ViT-g's feed-forward: silu(x W1) * (x W2), W1|W2 fused. It keeps 2/3 of the nominal
    hidden width (parameters then match a plain MLP), rounded up to 8: 6144 -> 4096."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        hidden_dim = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Learnable per-channel scale of a residual branch, started tiny: blocks begin near identity."""

    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, rate, training):
    """Stochastic depth: drop a residual branch per sample, rescale the survivors. (DINOv2
    runs the branch on a random subset of the batch instead: same expectation, cheaper.)"""
    if rate == 0.0 or not training:
        return x
    return x * x.new_empty(x.shape[0], 1, 1).bernoulli_(1.0 - rate) / (1.0 - rate)


def init_linears(module):
    """DINOv2 (and timm) start every Linear at trunc-normal std 0.02 with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim, num_heads, mlp_ratio, ffn, layerscale, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)  # the plain MLP: Linear -> GELU (exact, not tanh) -> Linear
        self.mlp = SwiGLU(dim, hidden) if ffn == "swiglu" else nn.Sequential(
            OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.ls2 = LayerScale(dim, layerscale)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


class ViT(nn.Module):
    """DINOv2's Vision Transformer under its exact parameter names. Tokens: [CLS, registers,
    patches]. img_size only fixes the stored position-embedding grid (37 x 37 for 518 / 14);
    other input sizes interpolate it, exactly as DINOv2 does."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, ffn="mlp", num_register_tokens=0, layerscale=1e-5, drop_path_rate=0.0,
                 interpolate_offset=None, interpolate_antialias=None):
        super().__init__()
        # Everything needed to rebuild this model; saved in checkpoints and used by load_backbone.
        self.args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        assert embed_dim % num_heads == 0, f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}"
        assert ffn in ("mlp", "swiglu"), f"ffn must be 'mlp' or 'swiglu', got {ffn!r}"
        self.patch_size, self.embed_dim, self.num_register_tokens = patch_size, embed_dim, num_register_tokens
        # DINOv2 hub defaults: the original models interpolate with a 0.1 offset and no antialias (a quirk,
        # kept so the weights behave as trained); the register models ("reg4") with antialias, no offset.
        self.interpolate_offset = (0.0 if num_register_tokens else 0.1) if interpolate_offset is None else interpolate_offset
        self.interpolate_antialias = bool(num_register_tokens) if interpolate_antialias is None else interpolate_antialias

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))  # CLS + patches; registers get none
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # stands in for masked patches (iBOT)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn, layerscale, drop_path_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        # DINOv2's init; LayerScale gammas start at their init value.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        init_linears(self)

    def interpolate_pos_embed(self, grid_h, grid_w):
        """Position embeddings for a grid_h x grid_w grid, (1, 1 + grid_h * grid_w, D): bicubic in
        fp32 from the stored M x M grid. With an offset DINOv2 passes the scale factor
        (g + 0.1) / M, not a size; the factor decides where bicubic samples, so we pass it too."""
        stored = self.pos_embed
        M = math.isqrt(stored.shape[1] - 1)
        if grid_h == grid_w == M:
            return stored
        cls_pos, patch_pos = stored[:, :1], stored[:, 1:].float()
        patch_pos = patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, M*M, D) -> (1, D, M, M)
        offset = self.interpolate_offset
        target = (dict(scale_factor=((grid_h + offset) / M, (grid_w + offset) / M)) if offset
                  else dict(size=(grid_h, grid_w)))
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **target)
        assert patch_pos.shape[-2:] == (grid_h, grid_w), f"interpolated to {tuple(patch_pos.shape[-2:])}"
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)  # (1, D, h, w) -> (1, h*w, D)
        return torch.cat([cls_pos, patch_pos.to(stored.dtype)], dim=1)

    def prepare_tokens(self, x, masks=None):
        """Image -> token sequence (B, 1 + R + N, D), with masked patches replaced."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:  # the conv would drop the border silently
            raise ValueError(f"input {H} x {W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            # The mask token replaces the patch embedding *before* position embeddings are
            # added, so a masked token still knows where it is.
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)
        if self.num_register_tokens:  # registers go after CLS and get no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def split_tokens(self, x):
        r = 1 + self.num_register_tokens
        return {"cls": x[:, 0], "reg": x[:, 1:r], "patch": x[:, r:]}

    def forward_features(self, x, masks=None):
        """(B, C, H, W), masks bool (B, N) or None -> final-norm {"cls": (B, D), "reg": (B, R, D), "patch": (B, N, D)}."""
        x = self.prepare_tokens(x, masks)
        for block in self.blocks:
            # Activation checkpointing trades ~30% more compute for far less memory (518-px crops).
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        return self.split_tokens(self.norm(x))

    def forward(self, x):
        return self.forward_features(x)["cls"]

    def get_intermediate_layers(self, x, n=1):
        """The last n blocks' outputs, each through the final norm: a list (oldest first) of
        (patch tokens (B, N, D), CLS (B, D)) -- what multi-block linear probes concatenate."""
        assert 1 <= n <= len(self.blocks), f"asked for the last {n} of {len(self.blocks)} blocks"
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                tokens = self.split_tokens(self.norm(x))
                outputs.append((tokens["patch"], tokens["cls"]))
        return outputs


# Heads are 64 wide, as in DINOv2. vit_tiny (DeiT-Ti widths) is ours, for laptop CPUs: not a DINOv2 release.
ARCHS = {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=3), "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
         "vit_base": dict(embed_dim=768, depth=12, num_heads=12), "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
         "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu")}


def build_vit(arch, **kwargs):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ViT(**{**ARCHS[arch], **kwargs})


vit_tiny, vit_small, vit_base, vit_large, vit_giant2 = (functools.partial(build_vit, name) for name in ARCHS)


# ===== Heads and losses =====
class WeightNormLinear(nn.Module):
    """Bias-free Linear with rows g * v / ||v||: torch's deprecated weight_norm written out under
    its parameter names (DINOv2 heads load as they are). Rows are prototypes; g bounds the logits."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's default init, which DINOv2 leaves in place for its prototypes.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x):
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised prototypes: (..., in_dim) -> (..., out_dim)
    logits. DINOv2's names: mlp.0 / mlp.2 / mlp.4 (GELU between), last_layer.weight_g / _v."""

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.GELU()] if i < nlayers - 1 else [])
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)  # DINOv2's names either way
        init_linears(self.mlp)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x):
        x = self.mlp(x)
        # DINOv2's eps: 1e-12 underflows in fp16, so half precision gets 1e-6.
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _all_reduce(x):
    """Sum over ranks in place; a no-op without a process group, so every loss below
    works unchanged in a single process (DINOv2's iBOT Sinkhorn-Knopp crashes there)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    """Teacher targets by Sinkhorn-Knopp (SwAV): (B, K) logits -> (B, K) distributions that
    use every prototype equally over the *global* batch. In Q (K x B) row sums (prototypes)
    are reduced across ranks; column sums (samples) stay local; B is the global count."""
    Q = torch.exp(teacher_logits.float() / teacher_temp).t()  # (B, K) -> (K, B)
    K = Q.shape[0]
    B = _all_reduce(torch.tensor(float(Q.shape[1]), device=Q.device))
    Q /= _all_reduce(Q.sum())
    for _ in range(n_iterations):
        Q /= _all_reduce(Q.sum(dim=1, keepdim=True))  # each prototype's total mass -> 1 ...
        Q /= K  # ... -> 1/K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample's total mass -> 1 ...
        Q /= B  # ... -> 1/B
    return (Q * B).t()  # columns sum to 1: one distribution per sample, (B, K)


class Center(nn.Module):
    """DINO's centring: targets softmax((t - c) / T), c an EMA of the teacher's mean output over all
    ranks. softmax() uses the centre of earlier steps; update() then folds this step in."""

    def __init__(self, dim, momentum=0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))  # in the state dict: resumes exactly

    @torch.no_grad()
    def softmax(self, teacher_logits, teacher_temp):
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits):
        # Sum and count travel together: the mean is over all rows of all ranks even when
        # ranks hold different numbers of rows (masked patches do).
        count = torch.tensor([len(teacher_logits)], dtype=torch.float, device=teacher_logits.device)
        stats = _all_reduce(torch.cat([teacher_logits.float().sum(dim=0), count]))
        if stats[-1] > 0:
            self.center.mul_(self.momentum).add_(stats[:-1] / stats[-1], alpha=1 - self.momentum)


def dino_loss(student_logits, teacher_probs, student_temp=0.1):
    """Sum over all (student, teacher) pairs of (B, K) tensors of the batch-mean CE -sum_k t_k log softmax(s / T_s)_k."""
    total = 0.0
    for s in student_logits:
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for t in teacher_probs:
            total = total - (t * log_p).sum(dim=-1).mean()
    return total


def ibot_loss(student_masked_logits, teacher_masked_probs, masks, student_temp=0.1):
    """Masked-patch cross-entropy. masks: (2B, N) bool of the global crops; the (M, K) logits
    and probs are the masked tokens in masks.flatten().nonzero() order. Each token weighs
    1 / (masked tokens in its image), so each masked image counts once whatever its mask
    size; the sum is divided by all 2B crops, masked or not."""
    per_image = 1.0 / masks.sum(dim=1).clamp(min=1)  # (2B,)
    token_weight = per_image.unsqueeze(1).expand_as(masks)[masks]  # (M,) in flatten-nonzero order
    ce = -(teacher_masked_probs * F.log_softmax(student_masked_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    return (ce * token_weight).sum() / masks.shape[0]


def koleo_loss(x, eps=1e-8):
    """KoLeo: -mean_i log ||x_i - x_nn(i)|| on L2-normalised rows spreads a batch's features out.
    Always fp32: in fp16 near-duplicates round to distance 0 and the log is inf (a DINOv2 defect)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        similarity = x @ x.t()  # (B, B)
        similarity.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nearest = similarity.argmax(dim=1)
        # pairwise_distance adds eps inside the norm, as DINOv2's nn.PairwiseDistance does.
        distance = F.pairwise_distance(x, x[nearest], eps=eps)
        return -torch.log(distance + eps).mean()


# ===== The student-teacher step =====
class StudentTeacher(nn.Module):
    """DINOv2's training step: a student (backbone + heads) learns to match an EMA teacher.
    forward() computes every loss of a batch; the caller backpropagates `loss`, steps the
    optimiser on the student, then calls update_teacher(momentum)."""

    def __init__(self, backbone, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3,
                 separate_ibot_head=False, ibot_out_dim=None, centering="centering", student_temp=0.1,
                 center_momentum=0.9, dino_weight=1.0, koleo_weight=0.1, ibot_weight=1.0):
        super().__init__()
        assert centering in ("centering", "sinkhorn_knopp"), f"unknown centering {centering!r}"
        self.centering, self.student_temp = centering, student_temp
        self.dino_weight, self.koleo_weight, self.ibot_weight = dino_weight, koleo_weight, ibot_weight
        ibot_out_dim = ibot_out_dim or out_dim
        heads = dict(dino_head=DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers))
        if separate_ibot_head:
            heads["ibot_head"] = DINOHead(backbone.embed_dim, ibot_out_dim, hidden_dim, bottleneck_dim, head_layers)
        self.student = nn.ModuleDict(dict(backbone=backbone, **heads))
        # The teacher starts as an exact copy of the student, without drop path or gradients.
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        for block in self.teacher.backbone.blocks:
            block.drop_path_rate = 0.0
        self.teacher.backbone.args["drop_path_rate"] = 0.0
        self.dino_center = Center(out_dim, center_momentum)
        self.ibot_center = Center(ibot_out_dim if separate_ibot_head else out_dim, center_momentum)

    def heads(self, module, cls_tokens, patch_tokens):
        """(cls logits, patch logits): one DINO-head call for all tokens, unless the iBOT head is separate."""
        if "ibot_head" in module:
            return module.dino_head(cls_tokens), module.ibot_head(patch_tokens)
        logits = module.dino_head(torch.cat([cls_tokens, patch_tokens]))
        return logits[: len(cls_tokens)], logits[len(cls_tokens):]

    def targets(self, logits, center, teacher_temp):
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, teacher_temp)
        probs = center.softmax(logits, teacher_temp)
        center.update(logits)
        return probs

    def forward(self, global_crops, local_crops, masks, teacher_temp):
        """global_crops: (2B, C, G, G) crop-major (all first crops, then all second crops);
        local_crops: (nB, C, L, L) crop-major, n >= 0; masks: (2B, N) bool for the globals."""
        n_local_crops = local_crops.shape[0] // (global_crops.shape[0] // 2)
        masked = masks.flatten().nonzero().squeeze(1)  # (M,) indices into (2B * N) patch tokens

        # ----- teacher: both global crops, unmasked, no gradients -----
        with torch.no_grad():
            out = self.teacher.backbone.forward_features(global_crops)
            first, second = out["cls"].chunk(2)
            swapped_cls = torch.cat([second, first])  # student view A is matched to teacher view B
            teacher_patch = out["patch"].flatten(0, 1)[masked]  # (2B, N, D) -> (M, D)
            cls_logits, patch_logits = self.heads(self.teacher, swapped_cls, teacher_patch)
            dino_targets = self.targets(cls_logits, self.dino_center, teacher_temp)  # (2B, K)
            ibot_targets = self.targets(patch_logits, self.ibot_center, teacher_temp)  # (M, K)

        # ----- student: globals with masks, locals without; one head call for all tokens -----
        student_global = self.student.backbone.forward_features(global_crops, masks=masks)
        cls_tokens = [student_global["cls"]]
        if n_local_crops:
            cls_tokens.insert(0, self.student.backbone.forward_features(local_crops)["cls"])
        student_patch = student_global["patch"].flatten(0, 1)[masked]
        cls_logits, patch_logits = self.heads(self.student, torch.cat(cls_tokens), student_patch)
        local_logits, global_logits = cls_logits[: len(local_crops)], cls_logits[len(local_crops):]

        # ----- losses, scaled exactly as DINOv2 -----
        # 2 teacher targets x (n local + 1 other global) student crops = 2n + 2 terms (18 for n = 8).
        n_terms = 2 * n_local_crops + 2
        losses = dict(
            dino_local=dino_loss(local_logits.chunk(n_local_crops), dino_targets.chunk(2), self.student_temp) / n_terms
            if n_local_crops else global_logits.new_zeros(()),
            # both globals in one (2B, K) term: its batch mean counts 2 pairs, hence the 2.
            dino_global=dino_loss([global_logits], [dino_targets], self.student_temp) * 2 / n_terms,
            # KoLeo within each global crop separately (two views of one image are close on purpose).
            koleo=sum(koleo_loss(x) for x in student_global["cls"].chunk(2)),
            ibot=ibot_loss(patch_logits, ibot_targets, masks, self.student_temp),
        )
        losses["loss"] = (self.dino_weight * (losses["dino_local"] + losses["dino_global"])
                          + self.koleo_weight * losses["koleo"] + self.ibot_weight * losses["ibot"])
        losses["student_cls"] = student_global["cls"].detach()  # for collapse diagnostics
        losses["teacher_probs"] = dino_targets
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum):
        """EMA over all parameters: teacher <- m * teacher + (1 - m) * student."""
        teacher, student = list(self.teacher.parameters()), list(self.student.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def load_pretrained(self, head_path):
        """Start both heads from a DINOv2-style head file (mlp.*, last_layer.weight_g/v),
        optionally prefixed dino_head. / student.dino_head. / teacher.dino_head.."""
        state = _read_weights(head_path)
        for prefix in ("student.dino_head.", "teacher.dino_head.", "dino_head."):
            state = _strip_prefix(state, prefix)
        for module in (self.student.dino_head, self.teacher.dino_head):
            _load_strict(module, state, head_path)


# ===== Weights in and out =====

# safetensors dtype names; the format is plain: 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64":
                       torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_safetensors(path, return_metadata=False):
    """Read a .safetensors file into {name: tensor}, trusting nothing in it: every
    malformation is a ValueError that names the file and the fault."""
    data = Path(path).read_bytes()

    def check(ok, why):
        if not ok:
            raise ValueError(f"{path}: not a valid safetensors file: {why}")

    check(len(data) >= 8, f"truncated: {len(data)} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    check(n <= _MAX_HEADER, f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
    check(8 + n <= len(data), f"header length {n} runs past the end of the {len(data)}-byte file")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        header = f"not JSON ({e})"
    check(isinstance(header, dict), f"the header is {header if isinstance(header, str) else 'not a JSON object'}")
    metadata, size, spans = header.pop("__metadata__", None) or {}, len(data) - 8 - n, []
    for name, entry in header.items():
        dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None for k in ("dtype", "shape", "data_offsets"))
        check(dtype in _SAFETENSORS_DTYPES, f"tensor {name!r} has unknown dtype {dtype!r}")
        check(isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
              and all(type(v) is int and v >= 0 for v in shape + offsets), f"tensor {name!r}: bad shape or offsets")
        (begin, end), itemsize = offsets, _SAFETENSORS_DTYPES[dtype].itemsize
        check(begin <= end <= size, f"tensor {name!r}: offsets [{begin}, {end}] outside the {size}-byte data")
        check(math.prod(shape) * itemsize == end - begin,
              f"tensor {name!r}: shape {shape} of {dtype} needs {math.prod(shape) * itemsize} bytes, offsets give {end - begin}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):  # the byte ranges must tile the data: no overlap, no gap
        check(begin == position, f"tensor {name!r} starts at {begin}, expected {position} ({'overlap' if begin < position else 'gap'})")
        position = end
    check(position == size, f"tensors cover {position} of {size} data bytes")
    out = {}
    for begin, end, name in spans:  # copy out of the file buffer: aligned, and the buffer can go
        dtype = _SAFETENSORS_DTYPES[header[name]["dtype"]]
        out[name] = torch.frombuffer(bytearray(data[8 + n + begin:8 + n + end]), dtype=dtype).reshape(header[name]["shape"]) \
            if end > begin else torch.empty(header[name]["shape"], dtype=dtype)
    return (out, metadata) if return_metadata else out


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as .safetensors (atomically: temporary file, fsync, rename)."""
    names, header, blobs = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}, {}, []
    for name, t in tensors.items():
        offset = sum(map(len, blobs))
        blobs.append(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as the library does
    atomic_write(path, lambda f: f.writelines([len(raw).to_bytes(8, "little"), raw, *blobs]))


def atomic_write(path, write):
    """write(file) to a temporary file, fsync, rename over `path`: a crash leaves the old file or the new."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# DINOv2 hub names <-> transformers Dinov2Model names as stored on disk. Inside a block, q, k
# and v are the three thirds of DINOv2's fused qkv; everything else is a rename.
_HF_TOP = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token", "norm.bias": "layernorm.bias",
           "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight", "norm.weight": "layernorm.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias"}
_HF_BLOCK = {"norm1": "norm1", "attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1",
             "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in",
             "mlp.w3": "mlp.weights_out", "ls2.gamma": "layer_scale2.lambda1"}
_QKV = ("query", "key", "value")


def _split_key(key, prefix):
    """'blocks.3.attn.proj.weight' -> ('3', 'attn.proj', '.weight'); gammas have no suffix."""
    i, rest = key[len(prefix):].split(".", 1)
    part, dot, kind = rest.rpartition(".")
    return (i, part, dot + kind) if kind in ("weight", "bias") else (i, rest, "")


def dinov2_to_hf(state):
    out = {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        i, part, kind = _split_key(key, "blocks.")
        names = [f"attention.attention.{q}" for q in _QKV] if part == "attn.qkv" else [_HF_BLOCK[part]]
        for name, chunk in zip(names, value.chunk(len(names))):
            out[f"encoder.layer.{i}.{name}{kind}"] = chunk
    return out


def hf_to_dinov2(state):
    out, top, block = {}, {v: k for k, v in _HF_TOP.items()}, {v: k for k, v in _HF_BLOCK.items()}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key.startswith("encoder.layer."):
            i, part, kind = _split_key(key, "encoder.layer.")
            if part == "attention.attention.query":
                value = torch.cat([state[key.replace("query", q)] for q in _QKV])
            if not part.startswith("attention.attention.") or part.endswith("query"):
                out[f"blocks.{i}.{'attn.qkv' if 'query' in part else block.get(part, part)}{kind}"] = value
        else:
            out[key] = value  # unknown: left for the strict load to report
    return out


def fold_channels(weight, in_chans):
    """Patch kernel (D, C, p, p) -> in_chans. 3 -> 1 sums over channels: exact for an X-ray copied to 3
    channels, as RAD-DINO normalises each with the same mean and std. 1 -> 3 divides evenly back."""
    if weight.shape[1] == in_chans:
        return weight
    if (weight.shape[1], in_chans) == (3, 1):
        return weight.sum(dim=1, keepdim=True)
    if (weight.shape[1], in_chans) == (1, 3):
        return weight.expand(-1, 3, -1, -1) / 3
    raise ValueError(f"cannot convert a {weight.shape[1]}-channel patch embedding to {in_chans} channels")


def _read_weights(path):
    """A state dict from .safetensors or a torch file (loaded with weights_only: no code runs)."""
    path = Path(path)  # a missing file raises FileNotFoundError, which names it
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as torch weights with weights_only=True ({e})") from e


def _strip_prefix(state, prefix):
    """The tensors under `prefix`, renamed without it; the state unchanged if there are none."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner or state


def _load_strict(module, state, source):
    """strict=True loading whose error names the file and every missing, unexpected, mis-shaped tensor."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: weights do not fit {type(module).__name__}: missing {len(missing)} {missing[:10]}, "
                         f"unexpected {len(unexpected)} {unexpected[:10]}, mis-shaped {len(shapes)} {shapes[:10]}")
    module.load_state_dict(state, strict=True)


def _infer_args(state, config):
    """ViT(...) arguments from the tensors themselves, refined by config.json if present."""
    D, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    swiglu = "blocks.0.mlp.w12.weight" in state
    # SwiGLU stores 2/3 of the nominal hidden width, twice (see SwiGLU).
    hidden = state["blocks.0.mlp.w12.weight"].shape[0] * 3 // 4 if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
    args = dict(img_size=math.isqrt(state["pos_embed"].shape[1] - 1) * patch, patch_size=patch,
                in_chans=state["patch_embed.proj.weight"].shape[1], embed_dim=D,
                depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
                num_heads=D // 64, mlp_ratio=hidden / D, ffn="swiglu" if swiglu else "mlp",  # DINOv2 heads are 64 wide
                num_register_tokens=state["register_tokens"].shape[1] if "register_tokens" in state else 0)
    if config:
        if config.get("layer_norm_eps", 1e-6) != 1e-6 or not config.get("qkv_bias", True):
            raise ValueError(f"config.json: only layer_norm_eps 1e-6 with qkv_bias is supported, got {config}")
        args.update(num_heads=config.get("num_attention_heads", args["num_heads"]),
                    mlp_ratio=config.get("mlp_ratio", args["mlp_ratio"]))
    return args


def load_backbone(path, **overrides):
    """A ready ViT in eval mode from a DINOv2 hub .pth (registers or not), a Hugging Face
    folder (config.json + model.safetensors, e.g. microsoft/rad-dino), a bare .safetensors in
    either naming, or a train.py checkpoint (its teacher). Overrides: any ViT argument, e.g.
    in_chans=1 (folds the patch embedding), drop_path_rate, interpolate_offset."""
    path, config = Path(path), None
    if path.is_dir():
        for name in ("config.json", "model.safetensors"):
            if not (path / name).exists():
                raise FileNotFoundError(f"{path}: a Hugging Face folder needs {name}, which is missing")
        config, path = json.loads((path / "config.json").read_text()), path / "model.safetensors"
    state, args = _read_weights(path), None
    if isinstance(state, dict) and "backbone_args" in state and "model" in state:  # a train.py checkpoint
        state, args = _strip_prefix(state["model"], "teacher.backbone."), {**state["backbone_args"], "drop_path_rate": 0.0}
    elif isinstance(state, dict) and isinstance(state.get("teacher"), dict):  # an official DINOv2 one
        state = _strip_prefix(state["teacher"], "backbone.")
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: holds no backbone weights")
    # Official training checkpoints with block_chunks > 0 name blocks.{chunk}.{i}.*: flatten them.
    state = {re.sub(r"^blocks\.\d+\.(\d+\.)", r"blocks.\1", k): v for k, v in state.items()}
    try:
        state = hf_to_dinov2(state) if "embeddings.cls_token" in state else state
        args = {**(args or _infer_args(state, config)), **overrides}
    except KeyError as e:
        raise ValueError(f"{path}: not a DINOv2 backbone, tensor {e} is missing") from e
    state["patch_embed.proj.weight"] = fold_channels(state["patch_embed.proj.weight"], args["in_chans"])
    model = ViT(**args)
    _load_strict(model, {k: v.float() for k, v in state.items()}, path)
    return model.eval()


def save_hf(model, out_dir, channels=3):
    """config.json + model.safetensors that transformers' Dinov2Model (Dinov2WithRegistersModel) loads
    with no missing or unexpected keys; 3 channels by default, as microsoft/rad-dino ships."""
    out_dir, a = Path(out_dir), model.args
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state["patch_embed.proj.weight"] = fold_channels(state["patch_embed.proj.weight"], channels)
    registers, mlp_ratio = a["num_register_tokens"], a["mlp_ratio"]
    config = dict(architectures=["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
                  model_type="dinov2_with_registers" if registers else "dinov2", hidden_size=a["embed_dim"],
                  num_hidden_layers=a["depth"], num_attention_heads=a["num_heads"],
                  mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio,  # transformers wants an int
                  patch_size=a["patch_size"], image_size=a["img_size"], num_channels=channels, layer_norm_eps=1e-6,
                  layerscale_value=a["layerscale"], use_swiglu_ffn=a["ffn"] == "swiglu", qkv_bias=True,
                  hidden_act="gelu", drop_path_rate=0.0, use_mask_token=True, torch_dtype="float32",
                  **(dict(num_register_tokens=registers) if registers else {}))
    write_safetensors(out_dir / "model.safetensors", dinov2_to_hf(state), metadata={"format": "pt"})
    atomic_write(out_dir / "config.json", lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    return out_dir
