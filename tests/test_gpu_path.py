"""The GPU road, tested on the CPU where it can be: the compiled backbone, bf16 autocast,
the optimiser's groups, and (marked cuda, skipped without a GPU) the same on a GPU.

    python -m pytest -q -m cuda     # only the CUDA tests, on a machine with a GPU
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import raddino
import weights
from test_losses import make_batch, make_step

aten = torch.ops.aten
# Ops after which a GPU's host waits for the device: a value read back (item, bool, nonzero,
# a boolean index) or a tensor made from host data (torch.tensor(...) on the device).
SYNCING = {aten.nonzero.default, aten._local_scalar_dense.default, aten.is_nonzero.default,
           aten.masked_select.default, aten.item.default, aten.lift_fresh.default}


class OpCensus(TorchDispatchMode):
    """Every aten op under it: the syncing ones, and the peak memory held in buffers of
    `numel` elements (an (M, K) logits-sized tensor), in units of one fp32 copy."""

    def __init__(self, numel=None):
        super().__init__()
        self.numel = numel
        self.syncs = []
        self.buffers = {}  # storage address -> (weak reference, element size)
        self.peak = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in SYNCING or boolean_index:
            self.syncs.append(str(func))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel and t.is_floating_point():
                storage = t.untyped_storage()
                known = self.buffers.get(storage.data_ptr())
                if known is None or known[0].expired():  # views share their base's storage
                    self.buffers[storage.data_ptr()] = (StorageWeakRef(storage), t.element_size())
        # A buffer is alive while anything holds it, autograd's saved tensors included.
        self.buffers = {k: v for k, v in self.buffers.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.buffers.values()) / 4)
        return out


def graph_calls(graph_module, op):
    return any(node.target is op for node in graph_module.graph.nodes)


def compile_recording(step, backend=None):
    """Compiles step's networks with a backend that records every graph torch.compile
    captures (into the list returned), then runs it eagerly or hands it to `backend`."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        if backend is None:
            return graph_module.forward
        return backend(graph_module, example_inputs)

    step.compile_networks(backend=record)
    return graphs


def symbolic_inputs(graph_module):
    """The placeholders of a captured graph whose shapes are symbolic (dynamic)."""
    found = []
    for node in graph_module.graph.nodes:
        value = node.meta.get("example_value")
        if node.op == "placeholder" and isinstance(value, torch.Tensor):
            if any(isinstance(size, torch.SymInt) for size in value.shape):
                found.append(node.name)
        elif node.op == "placeholder" and isinstance(value, torch.SymInt):
            found.append(node.name)
    return found


def test_compile_networks_compiles_the_backbone_itself():
    """compile() wraps __call__; a step that called forward_features directly would compile
    only the heads. A recording backend sees every graph that torch.compile captures."""
    step = make_step()
    graphs = compile_recording(step)
    losses, _ = step(*make_batch(), teacher_temp=0.07)
    losses["loss"].backward()
    attention = F.scaled_dot_product_attention
    assert any(graph_calls(g, attention) for g in graphs), "no compiled graph holds attention"
    assert sum(graph_calls(g, attention) for g in graphs) >= 2  # the student's and the teacher's


def test_the_compiled_backbones_have_static_shapes():
    """One graph for the global crops and one for the local crops, each for its own size:
    no image input may be symbolic (automatic dynamic shapes would make the local-crop
    kernels shape-generic). Only the heads see a row count that changes, and after the
    second step (a new mask count) nothing compiles again."""
    step = make_step()
    graphs = compile_recording(step)
    counts = []
    for seed in range(3):
        global_crops, local_crops, masks = make_batch(seed=seed)
        masked = raddino.masked_tokens(masks)
        losses, _ = step(global_crops, local_crops, masks, 0.07, masked)
        losses["loss"].backward()
        counts.append((len(graphs), len(masked[0])))
    assert len({m for _, m in counts}) == 3  # the mask count changed every step
    assert counts[2][0] == counts[1][0]  # and the third step compiled nothing
    backbones = [g for g in graphs if graph_calls(g, F.scaled_dot_product_attention)]
    # the teacher's global crops; the student's masked global crops; its local crops
    assert len(backbones) == 3
    assert [symbolic_inputs(g) for g in backbones] == [[], [], []]


def test_a_model_step_never_makes_the_host_wait():
    """Forward, backward and EMA with the masked tokens taken from the loader, as train.py
    runs them: no op that reads a value back to the host or copies one from it. (Finding
    the masked tokens on the device would be one: nonzero.)"""
    for centering in ("centering", "sinkhorn_knopp"):
        step = make_step(centering)
        global_crops, local_crops, masks = make_batch()
        masked = raddino.masked_tokens(masks)
        census = OpCensus()
        with census:
            losses, _ = step(global_crops, local_crops, masks, 0.07, masked)
            losses["loss"].backward()
            step.update_teacher(0.99)
        assert census.syncs == [], centering
    with OpCensus() as census:
        step(global_crops, local_crops, masks, 0.07)
    assert census.syncs == ["aten.nonzero.default"]  # the test can see one


def test_a_step_without_masked_tokens_leaves_the_ibot_centre_alone():
    """The centre's update decides on the device whether any rank had rows; with none it must
    keep the centre, not divide by zero."""
    step = make_step()
    global_crops, local_crops, masks = make_batch()
    with torch.no_grad():
        step(global_crops, local_crops, masks, 0.07)
        before = step.ibot_center.center.clone()
        step(global_crops, local_crops, torch.zeros_like(masks), 0.07)
    assert before.abs().sum() > 0
    assert torch.equal(step.ibot_center.center, before)


def test_the_teacher_does_not_checkpoint(monkeypatch):
    """A backbone built with activation checkpointing hands it to the teacher's deep copy;
    without gradients it only costs time. Only the student's blocks may checkpoint."""
    torch.manual_seed(0)
    backbone = raddino.ViT(img_size=56, patch_size=14, in_chans=1, embed_dim=32, depth=2,
                           num_heads=2, layerscale_init=0.5)
    backbone.grad_checkpointing = True
    step = raddino.StudentTeacher(backbone, out_dim=24, hidden_dim=16, bottleneck_dim=8)
    calls = []
    checkpoint = raddino.checkpoint

    def counted(function, *args, **kwargs):
        calls.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(raddino, "checkpoint", counted)
    step(*make_batch(), teacher_temp=0.07)
    assert len(calls) == 2 * 2  # the student's global and local passes, 2 blocks each


def test_the_loss_chain_keeps_few_full_size_buffers():
    """At RAD-DINO's scale one (M, K) buffer (masked tokens x prototypes) is ~4 GiB in fp32.
    The teacher's targets hold one new buffer (worked on in place; 2 before); the student's
    bf16 step peaks at 3.5 fp32 copies (4 before): its bf16 logits (0.5), the targets, the
    scaled logits and their log-softmax, with no (M, K) product beside them."""
    logits = torch.randn(37, 1001)
    for make_targets in (lambda: raddino.sinkhorn_knopp(logits, 0.05),
                         lambda: raddino.Center(1001).softmax(logits, 0.05)):
        with OpCensus(numel=logits.numel()) as census:
            make_targets()
        assert census.peak == 1.0  # a buffer of its own; the input is not counted
    torch.manual_seed(0)
    backbone = raddino.ViT(img_size=56, patch_size=14, in_chans=1, embed_dim=32, depth=2,
                           num_heads=2, layerscale_init=0.5)
    K = 4099  # so that the (M, K) logits have a size nothing else has
    for centering in ("centering", "sinkhorn_knopp"):
        step = raddino.StudentTeacher(backbone, out_dim=K, hidden_dim=16, bottleneck_dim=8,
                                      centering=centering)
        global_crops, local_crops, masks = make_batch()
        census = OpCensus(numel=int(masks.sum()) * K)
        with census, torch.autocast("cpu", dtype=torch.bfloat16):
            losses, _ = step(global_crops, local_crops, masks, 0.07, raddino.masked_tokens(masks))
            losses["loss"].backward()
        assert census.peak == 3.5, centering


def test_compiled_ddp_with_split_buckets_and_checkpointing(tmp_path):
    """RAD-DINO's path: compiled networks inside DDP with buckets smaller than the model (so
    that dynamo splits each graph at bucket boundaries), activation checkpointing, a mask
    count that changes every step, bf16. Four steps: no graph breaks, finite losses, and
    nothing compiles after the second step. AOT autograd traces the backward as inductor
    would; world size 1 over gloo is enough for DDP's graph splitting."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        # ~2.4 MB of backbone: 3 buckets of torch's smallest, 1 MB
        backbone = raddino.ViT(img_size=56, patch_size=14, in_chans=1, embed_dim=128, depth=3,
                               num_heads=4, layerscale_init=0.5, drop_path_rate=0.1)
        backbone.grad_checkpointing = True
        step = raddino.StudentTeacher(backbone, out_dim=24, hidden_dim=16, bottleneck_dim=8)
        graphs = compile_recording(step, torch._dynamo.lookup_backend("aot_eager"))
        model = torch.nn.parallel.DistributedDataParallel(step, bucket_cap_mb=1,
                                                          broadcast_buffers=False)
        optimizer = torch.optim.AdamW(step.student.parameters(), lr=1e-3)
        counts = []
        for seed in range(4):
            global_crops, local_crops, masks = make_batch(seed=seed)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses, _ = model(global_crops, local_crops, masks, 0.07,
                                  raddino.masked_tokens(masks))
            assert torch.isfinite(losses["loss"]), seed
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            step.update_teacher(0.99)
            counts.append(len(graphs))
    finally:
        dist.destroy_process_group()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert counts[1] == counts[2] == counts[3]
    # Without DDP the first step compiles 5 graphs (the teacher's backbone and head, the
    # student's head and its backbone for the global and the local crops): more is the split,
    # which torch < 2.11 gives up for checkpointed blocks (see compile_networks).
    if raddino.torch_version() >= (2, 11):
        assert counts[0] > 5


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch < 2.9 has only the legacy TF32 flags")
def test_tf32_is_set_through_the_api_inductor_reads():
    """On torch >= 2.9 inductor reads fp32_precision and raises if the legacy allow_tf32
    setters were used beside it: allow_tf32 sets the new API there."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        raddino.allow_tf32(True)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        raddino.allow_tf32(False)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


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
