"""weights.py: safetensors against malformed files and the safetensors library, DINOv2 and
Hugging Face names, one-channel folding, load_backbone on every supported file, save_hf
against transformers: AutoModel, AutoImageProcessor and pipeline() on real X-rays, and on a
fresh train.py run's export."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import phantoms
import raddino
import weights
from test_model import randomise, tiny
from test_train import tiny_run, train

COVID = Path(__file__).parents[1] / ".." / "shared" / "data" / "covid-cxr"
needs_covid = pytest.mark.skipif(not (COVID / "labels.csv").is_file(), reason="no covid-cxr")


# ----- one channel -----

def test_three_channel_weights_fold_exactly_into_one_channel(tmp_path):
    rgb = tiny()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    gray_model = weights.load_backbone(tmp_path / "rgb.pth", in_chans=1, num_heads=2)
    gray = torch.randn(2, 1, 56, 56)
    # An X-ray copied to 3 channels (same normalisation on each) through the 3-channel model
    # equals the single channel through the folded model.
    torch.testing.assert_close(gray_model(gray), rgb(gray.expand(-1, 3, -1, -1)),
                               atol=2e-5, rtol=1e-5)
    # ... and exporting back to 3 channels divides evenly, so the round trip is exact too.
    weights.save_hf(gray_model, tmp_path / "hf")
    back = weights.load_backbone(tmp_path / "hf")
    assert back.args["in_chans"] == 3
    torch.testing.assert_close(back(gray.expand(-1, 3, -1, -1)), gray_model(gray),
                               atol=2e-5, rtol=1e-5)
    # A 1-channel export keeps the kernel as it is; transformers' processors make RGB, so
    # it carries none.
    one = weights.save_hf(gray_model, tmp_path / "hf1", channels=1)
    assert json.loads((one / "config.json").read_text())["num_channels"] == 1
    assert (tmp_path / "hf" / "preprocessor_config.json").exists()
    assert not (one / "preprocessor_config.json").exists()
    torch.testing.assert_close(weights.load_backbone(one)(gray), gray_model(gray))


# ----- safetensors -----

def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(),
               "f16": torch.randn(2, 2).half(), "i64": torch.arange(7),
               "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5)}
    weights.write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    back, meta = weights.read_safetensors(tmp_path / "t.safetensors", return_metadata=True)
    assert meta == {"format": "pt"} and set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_safetensors_files_agree_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16(),
               "n": torch.arange(5, dtype=torch.int32)}
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
    ("unknown_dtype",
     raw_safetensors({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
     "unknown dtype"),
    ("shape_mismatch",
     raw_safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "needs 12 bytes"),
    ("out_of_range",
     raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
     "outside"),
    ("overlap", raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                bytes(12)), "overlap"),
    ("gap",
     raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
     "gap"),
    ("trailing",
     raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)),
     "cover"),
    ("bad_shape",
     raw_safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
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
        assert (not info["missing_keys"] and not info["unexpected_keys"]
                and not info["mismatched_keys"])
        # transformers interpolates by target size (no 0.1 offset): ours does too when asked.
        ours = weights.load_backbone(out_dir, interpolate_offset=0.0)
        for size in [(56, 56), (70, 42), (98, 98)]:
            x = torch.randn(2, 3, *size)
            out = ours.forward_features(x)
            with torch.no_grad():
                ref = hf.eval()(pixel_values=x).last_hidden_state
            torch.testing.assert_close(
                torch.cat([out["cls"][:, None], out["reg"], out["patch"]], 1), ref,
                atol=1e-4, rtol=1e-4)


def test_load_backbone_reads_hf_names_from_a_bare_safetensors_file(tmp_path):
    model = tiny()
    weights.write_safetensors(tmp_path / "backbone.safetensors",
                              weights.dinov2_to_hf(model.state_dict()))
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
    assert ("bad.pth" in message and "blocks.1.ls2.gamma" in message
            and "blocks.0.surprise" in message)
    assert "norm.bias" in message and "(65,)" in message
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        weights.load_backbone(tmp_path / "folder")
    # A missing DINOv2 hub file says where it is downloaded from; another missing file not.
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    with pytest.raises(FileNotFoundError, match=f"no such file; download it from {url}"):
        weights.load_backbone(tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(FileNotFoundError, match="no such file$"):
        weights.load_backbone(tmp_path / "mine.safetensors")


def test_checkpoints_are_pruned_and_an_unreadable_newest_one_is_passed_over(tmp_path):
    for step in (1, 2, 3):
        weights.save_checkpoint({"step": step}, tmp_path, keep=2)
    paths = weights.checkpoint_paths(tmp_path)
    assert [p.name for p in paths] == ["checkpoint_0000002.pt", "checkpoint_0000003.pt"]
    paths[1].write_bytes(paths[1].read_bytes()[:20])  # cut short
    warnings = []
    path, state = weights.read_newest_checkpoint(tmp_path, warn=warnings.append)
    assert path == paths[0] and state == {"step": 2}
    assert len(warnings) == 1 and "checkpoint_0000003.pt is unreadable" in warnings[0]
    paths[0].write_bytes(b"")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        weights.read_newest_checkpoint(tmp_path, warn=warnings.append)


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


def test_a_resumed_optimiser_keeps_its_own_implementation_flags():
    """A checkpoint written on a CPU (fused=False, here foreach=False) resumed where the run
    builds a faster AdamW keeps the faster one; the state and the hyperparameters load."""
    model = torch.nn.Linear(3, 2)
    on_cpu = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
    model(torch.randn(4, 3)).sum().backward()
    on_cpu.step()
    here = torch.optim.AdamW(model.parameters(), lr=0.5, foreach=True)
    weights.load_optimizer_state(here, on_cpu.state_dict())
    assert here.param_groups[0]["foreach"] is True
    assert here.param_groups[0]["lr"] == 0.1
    assert torch.equal(here.state[model.weight]["exp_avg"], on_cpu.state[model.weight]["exp_avg"])


def test_load_backbone_reads_training_checkpoints(tmp_path):
    student = tiny(in_chans=1, drop_path_rate=0.2, num_heads=4)
    model = raddino.StudentTeacher(student, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    torch.save({"model": model.state_dict(), "backbone_args": student.args}, tmp_path / "ckpt.pt")
    loaded = weights.load_backbone(tmp_path / "ckpt.pt")
    assert loaded.args["num_heads"] == 4 and loaded.args["drop_path_rate"] == 0.0
    x = torch.randn(2, 1, 56, 56)
    assert torch.equal(loaded(x), model.teacher.backbone.eval()(x))
    # The official DINOv2 training code saves {"teacher": {"backbone.*", "dino_head.*"}}.
    torch.save({"teacher": {"backbone." + k: v for k, v in student.state_dict().items()}},
               tmp_path / "official.pth")
    assert torch.equal(weights.load_backbone(tmp_path / "official.pth", num_heads=4)(x),
                       student.eval()(x))
    # ... and with block_chunks > 0 (ViT-L/g configs) its blocks are named blocks.{chunk}.{i}.
    chunked = {("backbone." + k).replace("blocks.1.", "blocks.0.1.")
               .replace("blocks.0.n", "blocks.0.0.n")
               .replace("blocks.0.a", "blocks.0.0.a").replace("blocks.0.l", "blocks.0.0.l")
               .replace("blocks.0.m", "blocks.0.0.m"): v for k, v in student.state_dict().items()}
    assert ("backbone.blocks.0.1.attn.qkv.weight" in chunked
            and "backbone.blocks.0.0.ls2.gamma" in chunked)
    torch.save({"teacher": chunked}, tmp_path / "chunked.pth")
    assert torch.equal(weights.load_backbone(tmp_path / "chunked.pth", num_heads=4)(x),
                       student.eval()(x))


# ----- the export, as a rad-dino user loads it -----


def covid_images(size):
    """Four real X-rays: landscape and portrait, each with an even and an odd number of rows
    (or columns) for the centre crop to drop at `size`, where an off-by-one would show."""
    shapes = {}
    for path in sorted((COVID / "images").glob("*.png")):
        with Image.open(path) as image:
            short, long = sorted(image.size)
            shapes.setdefault((image.width < image.height, int(size * long / short) % 2), path)
    assert len(shapes) == 4
    return list(shapes.values())


def transformers_flows(folder):
    """What microsoft/rad-dino's model card does, on our folder: (processor, model, pipeline).
    With torchvision installed transformers 5 picks the torchvision backend, whose bicubic is
    not Pillow's; backend="pil" then asks for the processor rad-dino was made with."""
    transformers = pytest.importorskip("transformers")
    pillow = {"backend": "pil"} if transformers.utils.is_torchvision_available() else {}
    processor = transformers.AutoImageProcessor.from_pretrained(folder, **pillow)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    extract = transformers.pipeline(task="image-feature-extraction", model=str(folder), pool=False,
                                    image_processor=processor if pillow else None)
    return processor, model, extract


def our_tokens(model, path, size):
    """data.preprocess + our ViT on one channel -> (1, 1 + R + N, D), laid out as transformers'
    last_hidden_state: [CLS, registers, patches]."""
    x = data.preprocess(data.load_image(path), size)[None]  # (1, 1, size, size)
    with torch.no_grad():
        out = model.forward_features(x)
    return x, torch.cat([out["cls"][:, None], out["reg"], out["patch"]], 1)


# Tolerances. Pixels: equal, since Pillow's bicubic resizes each channel of the 8-bit RGB
# copy exactly as it resizes the one gray channel, and both sides then compute (x / 255 - mean)
# / std in float32 (measured difference 0). Tokens: float32 rounding only (measured <= 2.3e-6
# on tokens of size ~2): our folded kernel sums 1 channel where transformers sums 3, and the
# attention kernels differ. A wrong mean, std, resample or crop moves tokens by > 1e-2.
PIXEL_ATOL = 1e-6
TOKEN_ATOL = 1e-5


@needs_covid
@pytest.mark.parametrize("registers", [0, 4])
def test_the_export_works_in_transformers_as_rad_dino_does(tmp_path, registers):
    """AutoImageProcessor + AutoModel and pipeline("image-feature-extraction") on the
    folder save_hf writes give our features on real X-rays, with no extra step. At the stored
    grid size, so neither side interpolates position embeddings (transformers has no 0.1
    offset: see test_hf_export_round_trips_and_matches_transformers)."""
    size = 112  # an 8 x 8 grid of 14-px patches
    ours = randomise(raddino.ViT(img_size=size, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                                 in_chans=1, num_register_tokens=registers)).eval()
    folder = weights.save_hf(ours, tmp_path / "export")
    processor, model, extract = transformers_flows(folder)
    assert type(processor).__name__ in ("BitImageProcessorPil", "BitImageProcessor")  # rad-dino's
    for path in covid_images(size):
        x, expected = our_tokens(ours, path, size)
        with Image.open(path) as image:
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        # The processor makes the 3 equal channels the exported 3-channel kernel expects.
        torch.testing.assert_close(pixels, x.expand(-1, 3, -1, -1), atol=PIXEL_ATOL, rtol=0)
        with torch.no_grad():
            hidden = model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(hidden, expected, atol=TOKEN_ATOL, rtol=0)
        # pipeline(pool=False) returns nested lists: [image][token][channel].
        piped = torch.tensor(extract(str(path)))
        torch.testing.assert_close(piped, expected, atol=TOKEN_ATOL, rtol=0)


def test_a_folder_from_before_the_processor_config_and_card_still_loads(tmp_path):
    """Exports written before save_hf wrote preprocessor_config.json and README.md hold
    config.json + model.safetensors only; load_backbone never needed more."""
    model = tiny()
    folder = weights.save_hf(model, tmp_path / "old", card="a card")
    (folder / "preprocessor_config.json").unlink()
    (folder / "README.md").unlink()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(weights.load_backbone(folder)(x), model(x))


def test_save_hf_writes_the_model_card_only_when_given(tmp_path):
    card = "---\nlibrary_name: transformers\n---\n# A test encoder\n"
    with_card = weights.save_hf(tiny(), tmp_path / "card", card=card)
    assert (with_card / "README.md").read_text() == card
    without = weights.save_hf(tiny(), tmp_path / "plain")
    assert sorted(p.name for p in without.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    processor = json.loads((without / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 56}
    assert processor["crop_size"] == {"height": 56, "width": 56}


def test_the_model_card_describes_the_network_the_run_and_the_data():
    config = {"model.arch": "vit_tiny", "train.batch_size": 4, "crops.n_local": 2,
              "crops.global_size": 56, "crops.local_size": 28}
    sources = [{"name": "data/a", "paths": ["x.png"] * 6, "weight": 2.5}]
    card = weights.model_card(tiny(), config, sources, "torchrun train.py", "abc1234", 7, 2)
    assert card.startswith("---\nlibrary_name: transformers") and "`abc1234`" in card
    assert "ViT, patch 14, width 64, 2 blocks, 2 heads, 0 register tokens" in card
    assert f"mean {data.MEAN}, std {data.STD}" in card  # the processor's, as save_hf writes it
    assert "7 steps of 8 images (2 x 4 per process), 4 crops per image" in card
    assert "(56 px global, 28 px local)" in card
    assert "  - `data/a`: 6 images, weight 2.5\n" in card and "torchrun train.py\n" in card


@needs_covid
def test_a_training_runs_export_has_its_card_and_works_in_transformers(tmp_path):
    """End to end: a fresh train.py run's export describes itself (model card, config) and
    gives our features in transformers' pipeline on a real X-ray."""
    phantom_set = tmp_path / "phantoms"
    phantoms.make_phantoms(phantom_set, n=24, size=64, seed=0)
    out = tmp_path / "run"
    train(tiny_run(phantom_set, out, "train.steps=2", "train.save_every=2"))
    export = out / "export"
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "ViT, patch 14, width 192, 12 blocks" in card  # vit_tiny
    assert "2 steps of 4 images" in card
    assert f"`{phantom_set}`: " in card and "images, weight 1" in card
    assert "Research use only: not a medical device" in card
    assert (export / "training_config.yaml").is_file()
    ours = weights.load_backbone(export, in_chans=1)
    size = ours.args["img_size"]
    assert size == 56  # crops.global_size: the export's stored grid, and its processor's size
    _, _, extract = transformers_flows(export)
    path = covid_images(size)[0]
    _, expected = our_tokens(ours, path, size)
    torch.testing.assert_close(torch.tensor(extract(str(path))), expected, atol=TOKEN_ATOL, rtol=0)
