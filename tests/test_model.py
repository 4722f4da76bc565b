"""The backbone: DINOv2 key names and parameter counts, attention against its written-out
twin, position-embedding interpolation against a written-out bicubic, masking, outputs."""

import math

import numpy as np
import pytest
import torch

import raddino
import weights


def randomise(model, seed=0):
    """Give every parameter a non-trivial value (LayerScale 1e-5 would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if p.dim() == 1 else 0.0))
    return model


def tiny(**kwargs):
    args = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2)
    return randomise(raddino.ViT(**{**args, **kwargs})).eval()


def hub_state_dict(depth, dim, grid, patch=14, registers=0, mlp_hidden=None):
    """A state dict laid out the way DINOv2's hub .pth files are, written from the published
    key list (not from our model), with random values."""
    mlp_hidden = mlp_hidden or 4 * dim
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim),
              "mask_token": (1, dim), "patch_embed.proj.weight": (dim, 3, patch, patch),
              "patch_embed.proj.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "ls1.gamma": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (mlp_hidden, dim), b + "mlp.fc1.bias": (mlp_hidden,),
                       b + "mlp.fc2.weight": (dim, mlp_hidden), b + "mlp.fc2.bias": (dim,),
                       b + "ls2.gamma": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


# ----- architecture and key names -----

def test_vit_base_518_has_dinov2_hub_keys_and_parameter_count():
    model = raddino.vit_base(img_size=518)
    state = model.state_dict()
    expected = hub_state_dict(depth=12, dim=768, grid=37)
    assert len(state) == 175
    assert sum(v.numel() for v in state.values()) == 86_580_480
    assert set(state) == set(expected)
    assert ({k: tuple(v.shape) for k, v in state.items()}
            == {k: tuple(v.shape) for k, v in expected.items()})
    assert list(state)[:3] == ["cls_token", "pos_embed", "mask_token"]


def test_presets_match_dinov2_widths():
    for arch, (dim, depth, heads) in {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
                                      "vit_large": (1024, 24, 16)}.items():
        a = raddino.ARCHS[arch]
        assert (a["embed_dim"], a["depth"], a["num_heads"]) == (dim, depth, heads)
    # ViT-g/14's SwiGLU keeps (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096 hidden units (w12 holds two
    # of them).
    ffn = raddino.SwiGLU(1536, 6144)
    assert ffn.w12.weight.shape == (8192, 1536) and ffn.w3.weight.shape == (1536, 4096)
    with pytest.raises(ValueError, match="vit_hugeee"):
        raddino.build_vit("vit_hugeee")


def test_hub_state_dict_loads_strictly_from_a_pth(tmp_path):
    state = hub_state_dict(depth=2, dim=64, grid=4)
    torch.save(state, tmp_path / "hub.pth")
    model = raddino.ViT(img_size=56, embed_dim=64, depth=2, num_heads=1)
    model.load_state_dict(torch.load(tmp_path / "hub.pth", weights_only=True), strict=True)
    loaded = weights.load_backbone(tmp_path / "hub.pth", num_heads=1)
    assert loaded.args["depth"] == 2 and loaded.args["img_size"] == 56 and not loaded.training
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(loaded(x), model.eval()(x))


def test_sdpa_matches_written_out_attention():
    attn = randomise(raddino.Attention(64, 4))
    x = torch.randn(2, 10, 64)
    q, k, v = attn.qkv(x).reshape(2, 10, 3, 4, 16).permute(2, 0, 3, 1, 4)
    reference = attn.proj(raddino.attention_reference(q, k, v).transpose(1, 2).reshape(2, 10, 64))
    torch.testing.assert_close(attn(x), reference, atol=1e-5, rtol=1e-5)


# ----- position embeddings -----

def bicubic_1d_matrix(n_in, n_out, scale):
    """Interpolation matrix of PyTorch's bicubic (a = -0.75, align_corners=False, border
    clamped), written from the textbook formula: source = (dest + 0.5) / scale - 0.5."""
    def kernel(t):
        t, a = abs(t), -0.75
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0
    W = np.zeros((n_out, n_in))
    for d in range(n_out):
        src = (d + 0.5) / scale - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            W[d, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return W


def test_interpolation_with_offset_matches_a_written_out_bicubic():
    """DINOv2 without registers: scale factor (g + 0.1) / M; checked for square, non-square
    and 98-px (7 x 7) grids against an independent bicubic."""
    model = tiny(img_size=224)  # stored grid 16 x 16
    stored = model.pos_embed[0, 1:].detach().reshape(16, 16, -1).double().numpy()
    for gh, gw in [(7, 7), (13, 9), (37, 37)]:
        got = model.interpolate_pos_embed(gh, gw)[0].detach().double().numpy()
        Wh, Ww = (bicubic_1d_matrix(16, gh, (gh + 0.1) / 16),
                  bicubic_1d_matrix(16, gw, (gw + 0.1) / 16))
        expected = np.einsum("hi,wj,ijd->hwd", Wh, Ww, stored).reshape(gh * gw, -1)
        np.testing.assert_allclose(got[1:], expected, atol=1e-5)
        np.testing.assert_array_equal(got[0],
                                      model.pos_embed[0, 0].detach().numpy())  # CLS untouched
    assert model.interpolate_pos_embed(16, 16) is model.pos_embed  # stored grid: no interpolation


def test_interpolation_without_offset_uses_the_target_size():
    model = tiny(img_size=224, interpolate_offset=0.0)
    stored = model.pos_embed[0, 1:].detach().reshape(16, 16, -1).double().numpy()
    got = model.interpolate_pos_embed(7, 12)[0, 1:].detach().double().numpy()
    expected = np.einsum("hi,wj,ijd->hwd", bicubic_1d_matrix(16, 7, 7 / 16),
                         bicubic_1d_matrix(16, 12, 12 / 16), stored).reshape(84, -1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_register_models_default_to_antialias_without_offset():
    plain = tiny().args
    assert (plain["interpolate_offset"], plain["interpolate_antialias"]) == (0.1, False)
    reg = tiny(num_register_tokens=4)
    assert (reg.args["interpolate_offset"], reg.args["interpolate_antialias"]) == (0.0, True)
    out = reg.forward_features(torch.randn(2, 3, 98, 70))
    assert out["reg"].shape == (2, 4, 64) and out["patch"].shape == (2, 35, 64)


# ----- tokens, masks, outputs -----

def test_masked_patches_become_the_mask_token_before_position_embedding():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = masks[1, 10] = True
    tokens = model.prepare_tokens(x, masks)
    plain = model.prepare_tokens(x)
    pos = model.pos_embed[0]
    torch.testing.assert_close(tokens[0, 1 + 3], model.mask_token[0] + pos[1 + 3])
    torch.testing.assert_close(tokens[1, 1 + 10], model.mask_token[0] + pos[1 + 10])
    keep = ~torch.nn.functional.pad(masks, (1, 0))  # CLS and unmasked patches are unchanged
    torch.testing.assert_close(tokens[keep], plain[keep])
    none = model.forward_features(x, masks=torch.zeros(2, 16, dtype=torch.bool))
    torch.testing.assert_close(none["patch"], model.forward_features(x)["patch"])


def test_outputs_and_intermediate_layers():
    model = tiny(depth=4)
    x = torch.randn(3, 3, 56, 70)
    out = model.forward_features(x)
    assert (out["cls"].shape == (3, 64) and out["patch"].shape == (3, 20, 64)
            and out["reg"].shape == (3, 0, 64))
    torch.testing.assert_close(model(x), out["cls"])
    layers = model.get_intermediate_layers(x, n=3)
    assert len(layers) == 3 and layers[-1][0].shape == (3, 20, 64)
    torch.testing.assert_close(layers[-1][0], out["patch"])
    torch.testing.assert_close(layers[-1][1], out["cls"])
    assert not torch.allclose(layers[0][1], layers[1][1])


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    x, masks = torch.randn(2, 3, 56, 56), torch.rand(2, 16) < 0.5
    model.forward_features(x, masks)["patch"].square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    model.forward_features(x, masks)["patch"].square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    """Stochastic depth: each sample's branch is kept whole (x 1 / (1 - rate), so the
    expectation is unchanged) or dropped whole, about rate of them; in eval mode, nothing."""
    torch.manual_seed(0)
    x = torch.randn(4000, 5, 3)
    ratio = raddino.drop_path(x, 0.25, training=True) / x
    per_sample = ratio[:, :1, :1]
    torch.testing.assert_close(ratio, per_sample.expand_as(ratio))  # one draw per sample
    kept = per_sample.flatten() > 0
    torch.testing.assert_close(per_sample.flatten()[kept], torch.full((int(kept.sum()),), 1 / 0.75))
    assert float(kept.float().mean()) == pytest.approx(0.75, abs=0.03)
    assert torch.equal(raddino.drop_path(x, 0.25, training=False), x)


def test_inputs_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        tiny()(torch.randn(1, 3, 56, 60))
