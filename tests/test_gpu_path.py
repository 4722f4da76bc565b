"""The GPU road, tested on the CPU where it can be: the compiled backbone, bf16 autocast,
the optimiser's groups, and (marked cuda, skipped without a GPU) the same on a GPU.

    python -m pytest -q -m cuda     # only the CUDA tests, on a machine with a GPU
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import raddino
import weights
from test_losses import make_batch, make_step


def graph_calls(graph_module, op):
    return any(node.target is op for node in graph_module.graph.nodes)


def test_compile_networks_compiles_the_backbone_itself():
    """compile() wraps __call__; a step that called forward_features directly would compile
    only the heads. A recording backend sees every graph that torch.compile captures."""
    step = make_step()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    step.compile_networks(backend=record)
    losses, _ = step(*make_batch(), teacher_temp=0.07)
    losses["loss"].backward()
    attention = F.scaled_dot_product_attention
    assert any(graph_calls(g, attention) for g in graphs), "no compiled graph holds attention"
    assert sum(graph_calls(g, attention) for g in graphs) >= 2  # the student's and the teacher's


def test_bf16_step_stays_close_to_fp32_and_keeps_its_fp32_parts():
    """precision=bf16 runs the whole step under bf16 autocast, on the CPU as on a GPU.
    Tolerance: bf16 keeps 8 bits of mantissa, ~0.4% per rounding; losses of a 2-block ViT
    move by well under 2%."""
    step = make_step(centering="sinkhorn_knopp")
    batch = make_batch()
    with torch.no_grad():
        fp32, _ = copy.deepcopy(step)(*batch, teacher_temp=0.07)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, diagnostics = step(*batch, teacher_temp=0.07)
    for term in ("dino_local", "dino_global", "ibot", "koleo", "loss"):
        assert torch.isfinite(bf16[term])
        assert float(bf16[term]) == pytest.approx(float(fp32[term]), rel=2e-2), term
    # Sinkhorn-Knopp's targets and KoLeo are computed in fp32 whatever the autocast.
    assert diagnostics["teacher_probs"].dtype == torch.float32
    assert bf16["koleo"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = step(*batch, teacher_temp=0.07)
    losses["loss"].backward()
    grads = [p.grad for p in step.student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_teacher_targets_are_fp32_under_bf16_autocast():
    """At the short run's T_t = 0.01, bf16 logits would move the targets by ~1%; the
    teacher's heads run in fp32 whatever the autocast, so its targets are the fp32 ones."""
    torch.manual_seed(0)
    backbone = raddino.ViT(img_size=56, patch_size=14, in_chans=1, embed_dim=32, depth=1,
                           num_heads=2)
    # A head wide enough for rounding to show: 1,024 prototypes on a 64-d bottleneck
    step = raddino.StudentTeacher(backbone, out_dim=1024, hidden_dim=64, bottleneck_dim=64)
    cls = torch.randn(8, 32)
    patch = torch.randn(12, 32)
    with torch.no_grad():
        fp32 = step.heads(step.teacher, cls, patch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = step.teacher_heads(cls, patch)
            rounded = step.heads(step.teacher, cls, patch)
    for exact, ours, bf16 in zip(fp32, kept, rounded):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, exact)
        targets = torch.softmax(exact / 0.01, dim=1)
        moved = 0.5 * (torch.softmax(bf16.float() / 0.01, dim=1) - targets).abs().sum(1)
        assert moved.mean() > 5e-3  # what bf16 does (~1%): the test can tell
    # And a bf16 training step takes its targets from them.
    dtypes = []
    step.teacher.dino_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    global_crops, local_crops, masks = make_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        step(global_crops, local_crops, masks, teacher_temp=0.01)
    assert dtypes == [torch.float32]


def test_koleo_only_with_the_dino_loss():
    step = make_step()
    step.dino_weight = 0.0
    with torch.no_grad():
        losses, _ = step(*make_batch(), teacher_temp=0.07)
    assert float(losses["koleo"]) == 0.0
    assert float(losses["loss"]) == pytest.approx(float(losses["ibot"]))


def test_a_separate_ibot_head_has_its_own_size():
    torch.manual_seed(0)
    backbone = raddino.ViT(img_size=56, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    step = raddino.StudentTeacher(backbone, out_dim=24, hidden_dim=16, bottleneck_dim=8,
                                  separate_ibot_head=True, ibot_out_dim=40)
    assert step.student.ibot_head.last_layer.weight_v.shape == (40, 8)
    assert step.ibot_center.center.shape == (1, 40)
    with torch.no_grad():
        losses, _ = step(*make_batch(), teacher_temp=0.07)
    assert torch.isfinite(losses["ibot"])
    with pytest.raises(ValueError, match="separate_ibot_head"):
        raddino.StudentTeacher(backbone, out_dim=24, ibot_out_dim=40)


def adamw_steps(backbone, images, n_steps=5):
    """n AdamW steps with raddino.param_groups' settings (lr 1e-2, weight decay 0.05)."""
    groups = raddino.param_groups(torch.nn.ModuleDict({"backbone": backbone}))
    for group in groups:
        group["lr"] = 1e-2 * group["lr_mult"]
        group["weight_decay"] = 0.05 * group["wd_mult"]
    optimizer = torch.optim.AdamW(groups)
    for _ in range(n_steps):
        optimizer.zero_grad()
        backbone.forward_features(images)["patch"].square().mean().backward()
        optimizer.step()


def test_one_channel_training_follows_the_three_channel_trajectory():
    """RAD-DINO trained a 3-channel patch embedding on gray images: its three kernels get
    the same gradient and AdamW moves each by the same step, so their sum moves three
    times as far as a 1-channel kernel would at the same lr. param_groups gives the
    1-channel kernel lr x 3 and weight decay x 1/3: after some AdamW steps, the folded
    3-channel weights equal the 1-channel weights. In float64: the folded forward differs
    from the 3-channel one by fp32 rounding, and AdamW's first steps are sign(gradient),
    which rounding flips where a gradient is near 0."""
    torch.manual_seed(0)
    rgb = raddino.ViT(img_size=56, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                      layerscale_init=0.5)
    gray = raddino.ViT(img_size=56, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                       layerscale_init=0.5)
    state = rgb.state_dict()
    state["patch_embed.proj.weight"] = weights.fold_channels(state["patch_embed.proj.weight"], 1)
    gray.load_state_dict(state)
    rgb.double()
    gray.double()
    images = torch.randn(4, 1, 56, 56, dtype=torch.float64)
    adamw_steps(rgb, images.expand(-1, 3, -1, -1))
    adamw_steps(gray, images)
    folded = weights.fold_channels(rgb.patch_embed.proj.weight.detach(), 1)
    start = state["patch_embed.proj.weight"].double()
    assert (folded - start).abs().max() > 1e-3  # it did move
    torch.testing.assert_close(gray.patch_embed.proj.weight.detach(), folded, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gray.blocks[1].mlp.fc1.weight, rgb.blocks[1].mlp.fc1.weight,
                               rtol=1e-4, atol=1e-7)


# ===== on a GPU =====

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_compiled_bf16_step_matches_eager_fp32():
    """train.py's GPU step (bf16 autocast, compiled networks) against the eager fp32 step on
    the same batch, at a realistic size (ViT-S/14 on 2 x 224 + 8 x 98, K = 4096)."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    backbone = raddino.build_vit("vit_small", img_size=224, in_chans=1, layerscale_init=0.1)
    eager = raddino.StudentTeacher(backbone, out_dim=4096).to(device)
    compiled = copy.deepcopy(eager)
    compiled.compile_networks()
    B = 8
    g = torch.Generator(device="cpu").manual_seed(0)
    global_crops = torch.randn(2 * B, 1, 224, 224, generator=g).to(device)
    local_crops = torch.randn(8 * B, 1, 98, 98, generator=g).to(device)
    masks = (torch.rand(2 * B, 256, generator=g) < 0.3).to(device)
    masks[B:] = False
    with torch.no_grad():
        reference, _ = eager(global_crops, local_crops, masks, teacher_temp=0.07)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast, _ = compiled(global_crops, local_crops, masks, teacher_temp=0.07)
    for term in ("dino_local", "dino_global", "ibot", "koleo", "loss"):
        assert float(fast[term]) == pytest.approx(float(reference[term]), rel=2e-2), term
