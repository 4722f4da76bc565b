"""Heads, losses and the student-teacher step, each against a slow twin written the way the
papers state it (loops over crops, samples and tokens), or against an invariant."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import raddino
import weights

ROOT = Path(__file__).resolve().parents[1]


def softmax_rows(x):
    return torch.softmax(x, dim=-1)


# ----- losses against their twins -----

def test_dino_loss_equals_its_slow_twin():
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(4, 9, generator=g) for _ in range(3)]
    teachers = [softmax_rows(torch.randn(4, 9, generator=g) / 0.3) for _ in range(2)]
    assert float(raddino.dino_loss(students, teachers)) == pytest.approx(
        raddino.dino_loss_reference(students, teachers), rel=1e-6)


def test_cross_entropy_against_a_uniform_teacher_is_log_k():
    K = 1000
    uniform = torch.full((5, K), 1.0 / K)
    assert float(raddino.dino_loss([torch.zeros(5, K)], [uniform])) == pytest.approx(
        math.log(K), rel=1e-6)
    # Any non-uniform student pays more (Gibbs' inequality).
    assert float(raddino.dino_loss([torch.randn(5, K)], [uniform])) > math.log(K)


def test_ibot_loss_equals_its_slow_twin():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 12, generator=g) < 0.4
    masks[4:] = False  # unmasked crops still count in the denominator
    M = int(masks.sum())
    student, teacher = torch.randn(M, 7, generator=g), softmax_rows(torch.randn(M, 7, generator=g))
    _, weights = raddino.masked_tokens(masks)
    assert float(raddino.ibot_loss(student, teacher, weights, len(masks))) == pytest.approx(
        raddino.ibot_loss_reference(student, teacher, masks), rel=1e-6)


def test_koleo_equals_its_slow_twin_and_survives_duplicates_and_bf16():
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    assert float(raddino.koleo_loss(x)) == pytest.approx(raddino.koleo_loss_reference(x), rel=1e-6)
    duplicated = torch.cat([x[:5], x[:5]])
    assert torch.isfinite(raddino.koleo_loss(duplicated))
    near = (x[:1] + 1e-4 * x[1:]).bfloat16()  # rows bf16 cannot tell apart
    loss = raddino.koleo_loss(near)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_sinkhorn_knopp_equals_its_slow_twin_and_normalises():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    Q = raddino.sinkhorn_knopp(logits, teacher_temp=0.5)
    torch.testing.assert_close(Q, raddino.sinkhorn_knopp_reference(logits, 0.5, 3).float(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(6))  # each sample: a distribution
    # With enough iterations every prototype carries B / K of the mass.
    Q = raddino.sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200)
    torch.testing.assert_close(Q.sum(dim=0), torch.full((5,), 6 / 5), rtol=1e-4, atol=1e-5)


def test_sinkhorn_knopp_is_finite_at_any_logit_over_temperature():
    """A cosine of 0.9 at the short run's T = 0.01 is exp(90), past fp32's range: without the
    maximum taken out first, every target is NaN. Against the slow twin in float64."""
    logits = torch.tensor([[0.9, 0.0], [0.0, 0.2]])
    Q = raddino.sinkhorn_knopp(logits, teacher_temp=0.01)
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q, raddino.sinkhorn_knopp_reference(logits.double(), 0.01)
                               .float(), atol=1e-6, rtol=1e-5)


def test_centre_uses_only_earlier_steps():
    center = raddino.Center(4, momentum=0.9)
    batches = [torch.randn(3, 4) for _ in range(4)]
    expected_center = torch.zeros(4)
    for t in batches:
        probs = center.softmax(t, teacher_temp=0.2)
        torch.testing.assert_close(probs, softmax_rows((t - expected_center) / 0.2))
        center.update(t)
        expected_center = 0.9 * expected_center + 0.1 * t.mean(dim=0)
    torch.testing.assert_close(center.center[0], expected_center)


def test_dino_head_is_weight_normalised_with_dinov2_names():
    head = raddino.DINOHead(16, out_dim=10, hidden_dim=12, bottleneck_dim=8)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                       "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g",
                                       "last_layer.weight_v"]
    x = torch.randn(5, 16)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    z = F.normalize(head.mlp(x), dim=-1)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = torch.stack([torch.stack([g[k, 0] * (z[b] @ v[k]) / v[k].norm() for k in range(10)])
                            for b in range(5)])
    torch.testing.assert_close(head(x), expected)
    # The prototypes' scale lives in g alone: rescaling v changes nothing.
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)
    torch.testing.assert_close(head(x), expected)


# ----- the student-teacher step -----

def make_step(centering="centering", separate_ibot_head=False, koleo_weight=0.1, seed=0):
    torch.manual_seed(seed)
    backbone = raddino.ViT(img_size=56, patch_size=14, in_chans=1, embed_dim=32, depth=2,
                           num_heads=2, layerscale_init=0.5)
    return raddino.StudentTeacher(backbone, out_dim=24, hidden_dim=16, bottleneck_dim=8,
                                  centering=centering, separate_ibot_head=separate_ibot_head,
                                  koleo_weight=koleo_weight)


def make_batch(B=3, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * B, 16, generator=g) < 0.3
    masks[::2] = False  # half the global crops unmasked
    return (torch.randn(2 * B, 1, 56, 56, generator=g),
            torch.randn(n_local * B, 1, 28, 28, generator=g), masks)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate_ibot_head", [False, True])
def test_step_equals_a_per_image_slow_twin(centering, separate_ibot_head):
    """Every crop through the networks one image at a time, the losses assembled by the
    formulas of the DINO, iBOT and DINOv2 papers; the batched step must agree."""
    step = make_step(centering, separate_ibot_head)
    B, n_local = 3, 2
    global_crops, local_crops, masks = make_batch(B, n_local)
    with torch.no_grad():
        out, _ = step(global_crops, local_crops, masks, teacher_temp=0.07)
    S, T = step.student, step.teacher
    ibot_head = lambda m: m["ibot_head"] if separate_ibot_head else m["dino_head"]  # noqa: E731
    (teacher_cls, teacher_patches, student_cls, student_patches, student_local,
     backbone_cls) = {}, {}, {}, {}, {}, {}
    with torch.no_grad():
        for c in range(2):
            for b in range(B):
                i = c * B + b  # crop-major: crop c of image b
                t = T["backbone"].forward_features(global_crops[i:i + 1])
                teacher_cls[c, b] = T["dino_head"](t["cls"])[0]
                teacher_patches[c, b] = ibot_head(T)(t["patch"][0, masks[i]])
                s = S["backbone"].forward_features(global_crops[i:i + 1], masks[i:i + 1])
                backbone_cls[c, b] = s["cls"][0]
                student_cls[c, b] = S["dino_head"](s["cls"])[0]
                student_patches[c, b] = ibot_head(S)(s["patch"][0, masks[i]])
        for l in range(n_local):
            for b in range(B):
                student_local[l, b] = S["dino_head"](
                    S["backbone"](local_crops[l * B + b:l * B + b + 1]))[0]

    # Teacher targets: centring starts from a zero centre; Sinkhorn normalises over the batch.
    if centering == "centering":
        target = {k: softmax_rows(v / 0.07) for k, v in teacher_cls.items()}
        patch_target = {k: softmax_rows(v / 0.07) for k, v in teacher_patches.items()}
    else:
        keys = [(c, b) for c in (1, 0) for b in range(B)]  # the order the step stacks them in
        Q = raddino.sinkhorn_knopp(torch.stack([teacher_cls[k] for k in keys]), 0.07)
        target = {k: Q[n] for n, k in enumerate(keys)}
        pkeys = [(c, b) for c in range(2) for b in range(B)]
        Q = raddino.sinkhorn_knopp(torch.cat([teacher_patches[k] for k in pkeys]), 0.07)
        patch_target, start = {}, 0
        for k in pkeys:
            patch_target[k] = Q[start:start + len(teacher_patches[k])]
            start += len(teacher_patches[k])

    ce = lambda t, s: raddino.cross_entropy_reference(t, s, 0.1)  # noqa: E731
    n_terms = 2 * n_local + 2
    local = sum(ce(target[c, b], student_local[l, b]) / B
                for l in range(n_local) for c in range(2) for b in range(B))
    # Each student global crop meets the teacher's *other* global crop.
    glob = sum(ce(target[1 - c, b], student_cls[c, b]) / B for c in range(2) for b in range(B))
    ibot = sum(ce(patch_target[c, b][j], student_patches[c, b][j]) / len(student_patches[c, b])
               for c in range(2) for b in range(B)
               for j in range(len(student_patches[c, b]))) / (2 * B)
    # KoLeo within each global crop's batch of (pre-head) CLS embeddings.
    koleo = sum(raddino.koleo_loss_reference(torch.stack([backbone_cls[c, b] for b in range(B)]))
                for c in range(2))
    assert float(out["dino_local"]) == pytest.approx(local / n_terms, rel=1e-5)
    assert float(out["dino_global"]) == pytest.approx(glob / n_terms, rel=1e-5)
    assert float(out["ibot"]) == pytest.approx(ibot, rel=1e-5)
    assert float(out["koleo"]) == pytest.approx(koleo, rel=1e-4)
    total = local / n_terms + glob / n_terms + 0.1 * koleo + ibot
    assert float(out["loss"]) == pytest.approx(total, rel=1e-5)


def test_the_total_weights_each_term():
    """loss = dino_weight * (dino_local + dino_global) + koleo_weight * koleo + ibot_weight * ibot,
    with weights that are not 1 (the slow twin runs at DINOv2's 1 / 0.1 / 1)."""
    step = make_step(koleo_weight=0.3)
    step.dino_weight, step.ibot_weight = 0.5, 2.0
    with torch.no_grad():
        out, _ = step(*make_batch(), teacher_temp=0.07)
    expected = (0.5 * (out["dino_local"] + out["dino_global"]) + 0.3 * out["koleo"]
                + 2.0 * out["ibot"])
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)


def test_gradients_reach_the_student_only():
    step = make_step()
    out, _ = step(*make_batch(), teacher_temp=0.04)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in step.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in step.student.parameters())


def test_teacher_starts_as_a_copy_and_follows_the_ema():
    step = make_step()
    step.student.backbone.blocks[0].drop_path_rate = 0.3
    step_copy = make_step()
    assert all(torch.equal(a, b)
               for a, b in zip(step.teacher.parameters(), step.student.parameters()))
    assert all(block.drop_path_rate == 0.0 for block in step_copy.teacher.backbone.blocks)
    with torch.no_grad():
        for p in step.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in step.teacher.parameters()]
    step.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, step.teacher.parameters()))
    step.update_teacher(0.0)
    assert all(torch.equal(a, b)
               for a, b in zip(step.teacher.parameters(), step.student.parameters()))
    step.update_teacher(0.0)  # now equal: a further EMA step keeps them equal
    student = [p.clone() for p in step.student.parameters()]
    with torch.no_grad():
        for p in step.student.parameters():
            p.add_(2.0)
    step.update_teacher(0.75)
    for t, s_old in zip(step.teacher.parameters(), student):
        torch.testing.assert_close(t, 0.75 * s_old + 0.25 * (s_old + 2.0))


def test_the_teacher_has_no_drop_path_when_the_student_has():
    """Targets must not be noisy. With the student at drop path 0.5 and everything in train
    mode, the teacher's outputs are the same on every call and equal its eval-mode outputs,
    and its exported args say 0. (A student built at rate 0 and changed afterwards, as an
    older test did, cannot see a teacher that kept the rate.)"""
    torch.manual_seed(0)
    backbone = raddino.ViT(img_size=56, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                           layerscale_init=0.5, drop_path_rate=0.5)
    step = raddino.StudentTeacher(backbone, out_dim=24, hidden_dim=16, bottleneck_dim=8).train()
    x = make_batch()[0]
    teacher = step.teacher.backbone
    with torch.no_grad():
        # the student does drop
        assert not torch.equal(step.student.backbone(x), step.student.backbone(x))
        first, second = teacher(x), teacher(x)
        in_eval = copy.deepcopy(teacher).eval()(x)
    assert teacher.training
    assert torch.equal(first, second)
    torch.testing.assert_close(first, in_eval)
    assert (teacher.args["drop_path_rate"] == 0.0
            and step.student.backbone.args["drop_path_rate"] == 0.5)


def test_the_step_centres_with_earlier_steps_and_then_updates():
    """Centring through StudentTeacher.forward over two steps, by hand: step 1's targets use
    the zero centre, then each centre moves 1 - 0.9 of the way to its teacher's mean logits
    (CLS: both views; patches: the masked ones); step 2's targets use that centre."""
    step = make_step()
    global_crops, local_crops, masks = make_batch()
    with torch.no_grad():
        t = step.teacher.backbone(global_crops, is_training=True)
        first_view, second_view = t["cls"].chunk(2)
        cls_logits = step.teacher.dino_head(torch.cat([second_view, first_view]))
        patch_logits = step.teacher.dino_head(t["patch"][masks])
        cls_mean, patch_mean = cls_logits.mean(dim=0), patch_logits.mean(dim=0)
        _, one = step(global_crops, local_crops, masks, teacher_temp=0.07)
        torch.testing.assert_close(step.dino_center.center[0], 0.1 * cls_mean)
        torch.testing.assert_close(step.ibot_center.center[0], 0.1 * patch_mean)
        _, two = step(global_crops, local_crops, masks, teacher_temp=0.07)
    torch.testing.assert_close(one["teacher_probs"], softmax_rows(cls_logits / 0.07))
    torch.testing.assert_close(two["teacher_probs"],
                               softmax_rows((cls_logits - 0.1 * cls_mean) / 0.07))
    torch.testing.assert_close(step.dino_center.center[0], 0.19 * cls_mean)
    torch.testing.assert_close(step.ibot_center.center[0], 0.19 * patch_mean)


def test_pretrained_head_loads_into_student_and_teacher(tmp_path):
    step = make_step()
    head = raddino.DINOHead(32, out_dim=24, hidden_dim=16, bottleneck_dim=8)
    torch.save({"dino_head." + k: v for k, v in head.state_dict().items()}, tmp_path / "head.pth")
    weights.load_head(step, tmp_path / "head.pth")
    for module in (step.student.dino_head, step.teacher.dino_head):
        assert all(torch.equal(a, b)
                   for a, b in zip(module.state_dict().values(), head.state_dict().values()))
    torch.save({"mlp.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        weights.load_head(step, tmp_path / "bad.pth")


def test_two_processes_give_the_targets_of_one(tmp_path):
    """Centring and Sinkhorn-Knopp under a 2-process gloo group equal one process on the
    concatenated batch, even with uneven numbers of rows per rank (masked patches)."""
    script = ROOT / "tests" / "distributed_targets.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=240, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sys.path.insert(0, str(script.parent))
    from distributed_targets import ROWS, teacher_outputs
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    center = raddino.Center(5)
    for i, step in enumerate(teacher_outputs()):
        everything = torch.cat(step)
        probs = center.softmax(everything, 0.1)
        center.update(everything)
        sinkhorn = raddino.sinkhorn_knopp(everything, 0.1)
        for r in range(2):
            rows = slice(sum(ROWS[:r]), sum(ROWS[:r + 1]))
            torch.testing.assert_close(ranks[r][i]["centred"], probs[rows])
            torch.testing.assert_close(ranks[r][i]["center"], center.center)
            torch.testing.assert_close(ranks[r][i]["sinkhorn"], sinkhorn[rows])


def test_collapse_diagnostics_tell_the_two_collapses_apart():
    """Entropy of the targets over log K, entropy of their batch mean in nats, and the spread
    of the CLS tokens, against values known in closed form."""
    k, b = 16, 8
    spread_cls = torch.randn(b, 64)
    uniform = raddino.collapse_diagnostics(torch.full((b, k), 1 / k), spread_cls)
    assert uniform["teacher_entropy"] == pytest.approx(1.0)
    assert uniform["teacher_batch_entropy"] == pytest.approx(math.log(k))
    one_prototype = raddino.collapse_diagnostics(F.one_hot(torch.full((b,), 3), k).float(),
                                                 spread_cls)
    assert one_prototype["teacher_entropy"] == pytest.approx(0.0)
    assert one_prototype["teacher_batch_entropy"] == pytest.approx(0.0)
    own_prototypes = F.one_hot(torch.arange(b), k).float()
    healthy = raddino.collapse_diagnostics(own_prototypes, spread_cls)
    assert healthy["teacher_batch_entropy"] == pytest.approx(math.log(b))
    assert 0.7 < healthy["cls_spread"] < 1.3  # random directions
    alike = raddino.collapse_diagnostics(own_prototypes, spread_cls[:1].expand(b, -1) * 3)
    assert alike["cls_spread"] == pytest.approx(0.0, abs=1e-6)
    assert not raddino.looks_collapsed(healthy)
    for collapsed in (uniform, one_prototype, alike):
        assert raddino.looks_collapsed(collapsed)
    # Near-uniform targets are collapse too: a run at 0.96 log K has learned nothing.
    assert raddino.looks_collapsed({**healthy, "teacher_entropy": 0.96})
    assert not raddino.looks_collapsed({**healthy, "teacher_entropy": 0.9})
