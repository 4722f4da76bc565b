"""weights.py: safetensors against malformed files and the safetensors library, DINOv2 and
Hugging Face names, one-channel folding, load_backbone on every supported file, save_hf
against transformers."""

import json
import os
import pickle

import pytest
import torch

import raddino
import weights
from test_model import tiny


# ----- one channel -----

def test_three_channel_weights_fold_exactly_into_one_channel(tmp_path):
    rgb = tiny()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    gray_model = weights.load_backbone(tmp_path / "rgb.pth", in_chans=1, num_heads=2)
    gray = torch.randn(2, 1, 56, 56)
    # An X-ray copied to 3 channels (same normalisation on each) through the 3-channel model
    # equals the single channel through the folded model.
    torch.testing.assert_close(gray_model(gray), rgb(gray.expand(-1, 3, -1, -1)), atol=2e-5, rtol=1e-5)
    # ... and exporting back to 3 channels divides evenly, so the round trip is exact too.
    weights.save_hf(gray_model, tmp_path / "hf")
    back = weights.load_backbone(tmp_path / "hf")
    assert back.args["in_chans"] == 3
    torch.testing.assert_close(back(gray.expand(-1, 3, -1, -1)), gray_model(gray), atol=2e-5, rtol=1e-5)


# ----- safetensors -----

def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(7), "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    weights.write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    back, meta = weights.read_safetensors(tmp_path / "t.safetensors", return_metadata=True)
    assert meta == {"format": "pt"} and set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_safetensors_files_agree_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16(), "n": torch.arange(5, dtype=torch.int32)}
    weights.write_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"who": "raddino"})
    theirs = st.load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    st.save_file(tensors, tmp_path / "lib.safetensors", metadata={"who": "library"})
    ours, meta = weights.read_safetensors(tmp_path / "lib.safetensors", return_metadata=True)
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
        weights.read_safetensors(path)
    assert str(path) in str(error.value)


# ----- load_backbone and save_hf -----

def test_hf_export_round_trips_and_matches_transformers(tmp_path):
    for registers in (0, 4):
        model = tiny(img_size=56, num_register_tokens=registers)
        out_dir = weights.save_hf(model, tmp_path / f"hf{registers}")
        config = json.loads((out_dir / "config.json").read_text())
        assert config["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
        back = weights.load_backbone(out_dir)
        x = torch.randn(2, 3, 56, 56)
        assert torch.equal(back(x), model(x))
        assert back.args["num_register_tokens"] == registers
        transformers = pytest.importorskip("transformers")
        hf_class = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
        hf, info = hf_class.from_pretrained(out_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        # transformers interpolates by target size (no 0.1 offset): ours does too when asked.
        ours = weights.load_backbone(out_dir, interpolate_offset=0.0)
        for size in [(56, 56), (70, 42), (98, 98)]:
            x = torch.randn(2, 3, *size)
            out = ours.forward_features(x)
            with torch.no_grad():
                ref = hf.eval()(pixel_values=x).last_hidden_state
            torch.testing.assert_close(torch.cat([out["cls"][:, None], out["reg"], out["patch"]], 1), ref,
                                       atol=1e-4, rtol=1e-4)


def test_load_backbone_reads_hf_names_from_a_bare_safetensors_file(tmp_path):
    model = tiny()
    weights.write_safetensors(tmp_path / "backbone.safetensors", weights.dinov2_to_hf(model.state_dict()))
    weights.write_safetensors(tmp_path / "hub.safetensors", model.state_dict())
    x = torch.randn(1, 3, 56, 56)
    for name in ("backbone.safetensors", "hub.safetensors"):
        assert torch.equal(weights.load_backbone(tmp_path / name, num_heads=2)(x), model(x))


def test_load_backbone_reports_every_mismatch(tmp_path):
    state = tiny().state_dict()
    state.pop("blocks.1.ls2.gamma")
    state["blocks.0.surprise"] = torch.zeros(1)
    state["norm.bias"] = torch.zeros(65)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        weights.load_backbone(tmp_path / "bad.pth")
    message = str(error.value)
    assert "bad.pth" in message and "blocks.1.ls2.gamma" in message and "blocks.0.surprise" in message
    assert "norm.bias" in message and "(65,)" in message
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        weights.load_backbone(tmp_path / "folder")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_pth_files_never_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"cls_token": Exploit()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        weights.load_backbone(tmp_path / "evil.pth")
    assert not (tmp_path / "exploited").exists()


def test_load_backbone_reads_training_checkpoints(tmp_path):
    student = tiny(in_chans=1, drop_path_rate=0.2, num_heads=4)
    model = raddino.StudentTeacher(student, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    torch.save({"model": model.state_dict(), "backbone_args": student.args}, tmp_path / "ckpt.pt")
    loaded = weights.load_backbone(tmp_path / "ckpt.pt")
    assert loaded.args["num_heads"] == 4 and loaded.args["drop_path_rate"] == 0.0
    x = torch.randn(2, 1, 56, 56)
    assert torch.equal(loaded(x), model.teacher.backbone.eval()(x))
    # The official DINOv2 training code saves {"teacher": {"backbone.*", "dino_head.*"}}.
    torch.save({"teacher": {"backbone." + k: v for k, v in student.state_dict().items()}}, tmp_path / "official.pth")
    assert torch.equal(weights.load_backbone(tmp_path / "official.pth", num_heads=4)(x), student.eval()(x))
    # ... and with block_chunks > 0 (ViT-L/g configs) its blocks are named blocks.{chunk}.{i}.
    chunked = {("backbone." + k).replace("blocks.1.", "blocks.0.1.").replace("blocks.0.n", "blocks.0.0.n")
               .replace("blocks.0.a", "blocks.0.0.a").replace("blocks.0.l", "blocks.0.0.l")
               .replace("blocks.0.m", "blocks.0.0.m"): v for k, v in student.state_dict().items()}
    assert "backbone.blocks.0.1.attn.qkv.weight" in chunked and "backbone.blocks.0.0.ls2.gamma" in chunked
    torch.save({"teacher": chunked}, tmp_path / "chunked.pth")
    assert torch.equal(weights.load_backbone(tmp_path / "chunked.pth", num_heads=4)(x), student.eval()(x))
