"""The backbone and its weight formats: DINOv2 key names, attention, position-embedding
interpolation, masking, grayscale folding, safetensors, load_backbone and save_hf."""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import raddino


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
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (mlp_hidden, dim), b + "mlp.fc1.bias": (mlp_hidden,),
                       b + "mlp.fc2.weight": (dim, mlp_hidden), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})
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
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert list(state)[:3] == ["cls_token", "pos_embed", "mask_token"]


def test_presets_match_dinov2_widths():
    for arch, (dim, depth, heads) in {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
                                      "vit_large": (1024, 24, 16)}.items():
        a = raddino.ARCHS[arch]
        assert (a["embed_dim"], a["depth"], a["num_heads"]) == (dim, depth, heads)
    # ViT-g/14's SwiGLU keeps (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096 hidden units (w12 holds two of them).
    ffn = raddino.SwiGLU(1536, 6144)
    assert ffn.w12.weight.shape == (8192, 1536) and ffn.w3.weight.shape == (1536, 4096)
    with pytest.raises(ValueError, match="vit_hugeee"):
        raddino.build_vit("vit_hugeee")


def test_hub_state_dict_loads_strictly_from_a_pth(tmp_path):
    state = hub_state_dict(depth=2, dim=64, grid=4)
    torch.save(state, tmp_path / "hub.pth")
    model = raddino.ViT(img_size=56, embed_dim=64, depth=2, num_heads=1)
    model.load_state_dict(torch.load(tmp_path / "hub.pth", weights_only=True), strict=True)
    loaded = raddino.load_backbone(tmp_path / "hub.pth", num_heads=1)
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
        Wh, Ww = bicubic_1d_matrix(16, gh, (gh + 0.1) / 16), bicubic_1d_matrix(16, gw, (gw + 0.1) / 16)
        expected = np.einsum("hi,wj,ijd->hwd", Wh, Ww, stored).reshape(gh * gw, -1)
        np.testing.assert_allclose(got[1:], expected, atol=1e-5)
        np.testing.assert_array_equal(got[0], model.pos_embed[0, 0].detach().numpy())  # CLS untouched
    assert model.interpolate_pos_embed(16, 16) is model.pos_embed  # stored grid: no interpolation


def test_interpolation_without_offset_uses_the_target_size():
    model = tiny(img_size=224, interpolate_offset=0.0)
    stored = model.pos_embed[0, 1:].detach().reshape(16, 16, -1).double().numpy()
    got = model.interpolate_pos_embed(7, 12)[0, 1:].detach().double().numpy()
    expected = np.einsum("hi,wj,ijd->hwd", bicubic_1d_matrix(16, 7, 7 / 16), bicubic_1d_matrix(16, 12, 12 / 16),
                         stored).reshape(84, -1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_register_models_default_to_antialias_without_offset():
    assert (tiny().interpolate_offset, tiny().interpolate_antialias) == (0.1, False)
    reg = tiny(num_register_tokens=4)
    assert (reg.interpolate_offset, reg.interpolate_antialias) == (0.0, True)
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
    assert out["cls"].shape == (3, 64) and out["patch"].shape == (3, 20, 64) and out["reg"].shape == (3, 0, 64)
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


# ----- one channel -----

def test_three_channel_weights_fold_exactly_into_one_channel(tmp_path):
    rgb = tiny()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    gray_model = raddino.load_backbone(tmp_path / "rgb.pth", in_chans=1, num_heads=2)
    gray = torch.randn(2, 1, 56, 56)
    # An X-ray copied to 3 channels (same normalisation on each) through the 3-channel model
    # equals the single channel through the folded model.
    torch.testing.assert_close(gray_model(gray), rgb(gray.expand(-1, 3, -1, -1)), atol=2e-5, rtol=1e-5)
    # ... and exporting back to 3 channels divides evenly, so the round trip is exact too.
    raddino.save_hf(gray_model, tmp_path / "hf")
    back = raddino.load_backbone(tmp_path / "hf")
    assert back.args["in_chans"] == 3
    torch.testing.assert_close(back(gray.expand(-1, 3, -1, -1)), gray_model(gray), atol=2e-5, rtol=1e-5)


# ----- safetensors -----

def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(7), "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    raddino.write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    back, meta = raddino.read_safetensors(tmp_path / "t.safetensors", return_metadata=True)
    assert meta == {"format": "pt"} and set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_safetensors_files_agree_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16(), "n": torch.arange(5, dtype=torch.int32)}
    raddino.write_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"who": "raddino"})
    theirs = st.load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    st.save_file(tensors, tmp_path / "lib.safetensors", metadata={"who": "library"})
    ours, meta = raddino.read_safetensors(tmp_path / "lib.safetensors", return_metadata=True)
    assert meta == {"who": "library"} and all(torch.equal(ours[k], v) for k, v in tensors.items())


def raw_safetensors(header, data=b"", length=None):
    raw = json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("name, content, fault", [
    ("short", b"\x01\x02", "truncated"),
    ("past_end", (1000).to_bytes(8, "little") + b"{}", "past the end"),
    ("huge_header", (2 ** 40).to_bytes(8, "little") + b"{}", "exceeds"),
    ("not_json", (4).to_bytes(8, "little") + b"{{{{", "not JSON"),
    ("unknown_dtype", raw_safetensors({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
     "unknown dtype"),
    ("shape_mismatch", raw_safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "needs 12 bytes"),
    ("out_of_range", raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
     "outside"),
    ("overlap", raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
    ("gap", raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "gap"),
    ("trailing", raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)), "cover"),
    ("bad_shape", raw_safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
     "bad shape"),
    ("not_object", raw_safetensors([1, 2]), "not a JSON object"),
])
def test_malformed_safetensors_raise_clear_errors(tmp_path, name, content, fault):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=fault) as error:
        raddino.read_safetensors(path)
    assert str(path) in str(error.value)


# ----- load_backbone and save_hf -----

def test_hf_export_round_trips_and_matches_transformers(tmp_path):
    for registers in (0, 4):
        model = tiny(img_size=56, num_register_tokens=registers)
        out_dir = raddino.save_hf(model, tmp_path / f"hf{registers}")
        config = json.loads((out_dir / "config.json").read_text())
        assert config["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
        back = raddino.load_backbone(out_dir)
        x = torch.randn(2, 3, 56, 56)
        assert torch.equal(back(x), model(x))
        assert back.args["num_register_tokens"] == registers
        transformers = pytest.importorskip("transformers")
        hf_class = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
        hf, info = hf_class.from_pretrained(out_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        # transformers interpolates by target size (no 0.1 offset): ours does too when asked.
        ours = raddino.load_backbone(out_dir, interpolate_offset=0.0)
        for size in [(56, 56), (70, 42), (98, 98)]:
            x = torch.randn(2, 3, *size)
            out = ours.forward_features(x)
            with torch.no_grad():
                ref = hf.eval()(pixel_values=x).last_hidden_state
            torch.testing.assert_close(torch.cat([out["cls"][:, None], out["reg"], out["patch"]], 1), ref,
                                       atol=1e-4, rtol=1e-4)


def test_load_backbone_reads_hf_names_from_a_bare_safetensors_file(tmp_path):
    model = tiny()
    raddino.write_safetensors(tmp_path / "backbone.safetensors", raddino.dinov2_to_hf(model.state_dict()))
    raddino.write_safetensors(tmp_path / "hub.safetensors", model.state_dict())
    x = torch.randn(1, 3, 56, 56)
    for name in ("backbone.safetensors", "hub.safetensors"):
        assert torch.equal(raddino.load_backbone(tmp_path / name, num_heads=2)(x), model(x))


def test_load_backbone_reports_every_mismatch(tmp_path):
    state = tiny().state_dict()
    state.pop("blocks.1.ls2.gamma")
    state["blocks.0.surprise"] = torch.zeros(1)
    state["norm.bias"] = torch.zeros(65)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        raddino.load_backbone(tmp_path / "bad.pth")
    message = str(error.value)
    assert "bad.pth" in message and "blocks.1.ls2.gamma" in message and "blocks.0.surprise" in message
    assert "norm.bias" in message and "(65,)" in message
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        raddino.load_backbone(tmp_path / "folder")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_pth_files_never_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"cls_token": Exploit()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        raddino.load_backbone(tmp_path / "evil.pth")
    assert not (tmp_path / "exploited").exists()


def test_load_backbone_reads_training_checkpoints(tmp_path):
    student = tiny(in_chans=1, drop_path_rate=0.2, num_heads=4)
    model = raddino.StudentTeacher(student, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    torch.save({"model": model.state_dict(), "backbone_args": student.args}, tmp_path / "ckpt.pt")
    loaded = raddino.load_backbone(tmp_path / "ckpt.pt")
    assert loaded.args["num_heads"] == 4 and loaded.args["drop_path_rate"] == 0.0
    x = torch.randn(2, 1, 56, 56)
    assert torch.equal(loaded(x), model.teacher.backbone.eval()(x))
    # The official DINOv2 training code saves {"teacher": {"backbone.*", "dino_head.*"}}.
    torch.save({"teacher": {"backbone." + k: v for k, v in student.state_dict().items()}}, tmp_path / "official.pth")
    assert torch.equal(raddino.load_backbone(tmp_path / "official.pth", num_heads=4)(x), student.eval()(x))
    # ... and with block_chunks > 0 (ViT-L/g configs) its blocks are named blocks.{chunk}.{i}.
    chunked = {("backbone." + k).replace("blocks.1.", "blocks.0.1.").replace("blocks.0.n", "blocks.0.0.n")
               .replace("blocks.0.a", "blocks.0.0.a").replace("blocks.0.l", "blocks.0.0.l")
               .replace("blocks.0.m", "blocks.0.0.m"): v for k, v in student.state_dict().items()}
    assert "backbone.blocks.0.1.attn.qkv.weight" in chunked and "backbone.blocks.0.0.ls2.gamma" in chunked
    torch.save({"teacher": chunked}, tmp_path / "chunked.pth")
    assert torch.equal(raddino.load_backbone(tmp_path / "chunked.pth", num_heads=4)(x), student.eval()(x))


def test_inputs_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        tiny()(torch.randn(1, 3, 56, 60))
