"""data.py: loading, tables, multi-crop, preprocessing, masks, collate, loader.

CPU only and fast: small phantoms, small crops. The real-data tests read
../shared/data/covid-cxr (relative to the repository) and skip if it is absent.
"""
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
import data  # noqa: E402
import phantoms  # noqa: E402

COVID = Path(__file__).parents[1] / ".." / "shared" / "data" / "covid-cxr"
needs_covid = pytest.mark.skipif(not (COVID / "labels.csv").is_file(), reason="no covid-cxr")

# Small crops keep the loader tests fast; the geometry is the same at any size.
SMALL = dict(global_size=32, local_size=16, n_local=2)


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    return phantoms.make_phantoms(tmp_path_factory.mktemp("synthetic"), n=24, size=64, seed=3)


def gray(height=256, width=264, seed=0):
    """A smooth random 8-bit image: structure at every scale, like a radiograph."""
    noise = np.random.default_rng(seed).random((height // 8, width // 8))
    image = Image.fromarray((noise * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(image).copy()


def plain(**changes):
    """A MultiCrop with every random photometric step off, for geometry tests."""
    settings = dict(flip_prob=0, jitter_prob=0, blur_probs=(0, 0, 0), solarize_prob=0)
    return data.MultiCrop(**{**settings, **changes})

# ===== loading =====

def save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def test_valid_files_load_as_gray(tmp_path):
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, 0  # fully transparent: alpha is dropped, not applied
    assert (data.load_image(save(tmp_path / "a.png", Image.fromarray(rgba))) == 100).all()
    palette = Image.new("P", (10, 8))
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.putdata([7] * 80)
    assert (data.load_image(save(tmp_path / "p.png", palette)) == 7).all()
    cmyk = data.load_image(save(tmp_path / "c.jpg", Image.new("CMYK", (10, 8), (0, 0, 0, 0))))
    assert cmyk.dtype == np.uint8 and cmyk.shape == (8, 10) and cmyk.min() > 250  # white
    deep = np.array([[0, 256, 65535]], np.uint16)
    loaded = data.load_image(save(tmp_path / "d.png", Image.fromarray(deep)))
    assert loaded.dtype == np.uint16 and loaded.tolist() == deep.tolist()
    tiff = data.load_image(save(tmp_path / "d.tif", Image.fromarray(deep)))
    assert tiff.tolist() == deep.tolist()
    big_endian = Image.frombytes("I;16B", (3, 1), deep.astype(">u2").tobytes())
    assert data.load_image(save(tmp_path / "b.tif", big_endian)).tolist() == deep.tolist()
    assert data.load_image(save(tmp_path / "one.png", Image.new("1", (4, 4), 1))).max() == 255
    unit = data.to_unit(deep)
    assert unit.dtype == np.float32 and np.allclose(unit, [[0, 256 / 65535, 1]])


def test_bad_files_raise_image_error_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    whole = io.BytesIO()
    Image.fromarray(gray(64, 64)).save(whole, "PNG")
    (tmp_path / "cut.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    save(tmp_path / "float.tif", Image.fromarray(np.ones((4, 4), np.float32)))
    causes = {"empty.png": "empty", "text.png": "not a PNG", "cut.png": "truncated",
              "missing.png": "no such file", "float.tif": "float"}
    for name, cause in causes.items():
        with pytest.raises(data.ImageError, match=cause) as error:
            data.load_image(tmp_path / name)
        assert name in str(error.value)
    bomb = save(tmp_path / "bomb.png", Image.new("L", (40, 40)))  # 1600 pixels
    for limit in (500, 1000):  # over 2x the limit Pillow raises; between 1x and 2x it warns
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(data.ImageError, match="bomb.png: too many pixels"):
            data.load_image(bomb)

# ===== DICOM =====

def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, syntax=None,
                **elements):
    """A minimal DICOM file of an (H, W) uint8, uint16 or int16 array, written by pydicom."""
    pydicom = pytest.importorskip("pydicom")
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = syntax or pydicom.uid.ExplicitVRLittleEndian
    dataset = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Rows = pixels.shape[0]
    dataset.Columns = pixels.shape[1]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = pixels.itemsize * 8
    dataset.BitsStored = bits_stored or pixels.itemsize * 8
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = int(pixels.dtype.kind == "i")
    dataset.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(dataset, key, value)
    if syntax is not None:  # a compressed syntax: the bytes must be encapsulated
        dataset.PixelData = pydicom.encaps.encapsulate([b"not really compressed" * 4])
        dataset["PixelData"].VR = "OB"
    try:
        dataset.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom 2.x: another keyword, and the encoding spelled out
        dataset.is_little_endian = True
        dataset.is_implicit_VR = False
        dataset.save_as(path, write_like_original=False)
    return path


def ramp(height=6, width=8, top=4095):
    """Every stored level from 0 to `top`, row by row, as uint16."""
    return np.linspace(0, top, height * width).round().astype(np.uint16).reshape(height, width)


def test_dicom_rescale_keeps_twelve_bits_over_the_whole_range(tmp_path):
    pixels = ramp()
    loaded = data.load_image(write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12,
                                         RescaleSlope=2, RescaleIntercept=-100))
    # A rising line maps 0..4095 onto 0..65535 whatever its slope and intercept.
    assert loaded.dtype == np.uint16
    assert loaded.tolist() == np.round(pixels * (65535 / 4095)).astype(np.uint16).tolist()
    deep = ramp(top=65535)
    assert data.load_image(write_dicom(tmp_path / "b.dicom", deep)).tolist() == deep.tolist()
    # A falling one (slope -1) turns it over: proof that the rescale is applied at all.
    falling = data.load_image(write_dicom(tmp_path / "c.dcm", pixels, bits_stored=12,
                                          RescaleSlope=-1, RescaleIntercept=0))
    assert (falling.astype(int) + loaded == 65535).all()


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = ramp()
    normal = data.load_image(write_dicom(tmp_path / "two.dcm", pixels, bits_stored=12))
    inverted = data.load_image(write_dicom(tmp_path / "one.dcm", pixels, "MONOCHROME1",
                                           bits_stored=12))
    assert (np.diff(inverted.ravel().astype(int)) < 0).all()  # the ramp now falls
    assert (inverted.astype(int) + normal == 65535).all()


def test_dicom_window_is_applied_in_rescaled_units(tmp_path):
    pixels = ramp(16, 16, top=1000)
    center = 300
    width = 401
    path = write_dicom(tmp_path / "w.dcm", pixels, bits_stored=12, RescaleSlope=2,
                       RescaleIntercept=-100, WindowCenter=center, WindowWidth=width)
    loaded = data.load_image(path)
    # DICOM PS3.3 C.11.2.1.2.1, the LINEAR window, on the rescaled values, written out:
    rescaled = pixels * 2.0 - 100
    expected = ((rescaled - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1) * 65535
    assert loaded.dtype == np.uint16 and np.abs(loaded - expected).max() <= 1
    assert loaded.min() == 0 and loaded.max() == 65535  # the window's whole range is used


def test_dicom_eight_bit_stays_eight_bit(tmp_path):
    pixels = ramp(top=255).astype(np.uint8)
    loaded = data.load_image(write_dicom(tmp_path / "a.dcm", pixels))
    assert loaded.dtype == np.uint8 and loaded.tolist() == pixels.tolist()
    seven = pixels // 2  # 7 bits stored in 8: stretched over 0..255 like 12 bits over 16
    loaded = data.load_image(write_dicom(tmp_path / "b.dcm", seven, bits_stored=7))
    assert loaded.dtype == np.uint8 and loaded.tolist() == np.round(seven / 127 * 255).tolist()


def test_dicom_that_is_no_radiograph_is_refused(tmp_path):
    pixels = ramp()
    without = write_dicom(tmp_path / "report.dcm", pixels)
    pydicom = pytest.importorskip("pydicom")
    dataset = pydicom.dcmread(without)
    del dataset.PixelData
    dataset.save_as(without)
    rgb = np.zeros((4, 5, 3), np.uint8)
    write_dicom(tmp_path / "rgb.dcm", rgb.reshape(4, 15), "RGB", Columns=5, SamplesPerPixel=3,
                PlanarConfiguration=0)
    write_dicom(tmp_path / "cine.dcm", ramp(12, 8), Rows=6, NumberOfFrames=2)
    (tmp_path / "text.dcm").write_text("a DICOM in name only")
    causes = {"report.dcm": "without (integer) pixel data", "rgb.dcm": "colour DICOM (RGB, 3",
              "cine.dcm": "2 frames", "text.dcm": "not a DICOM file"}
    for name, cause in causes.items():
        with pytest.raises(data.ImageError, match=re.escape(cause)) as error:
            data.load_image(tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name))


def test_dicom_compressed_without_a_decoder_names_the_syntax_and_the_plugin(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    syntaxes = {pydicom.uid.JPEG2000Lossless: ("JPEG 2000", "pylibjpeg-openjpeg"),
                pydicom.uid.JPEGLSLossless: ("JPEG-LS", "pylibjpeg-libjpeg")}
    for syntax, (name, plugin) in syntaxes.items():
        path = write_dicom(tmp_path / "c.dcm", ramp(), syntax=syntax)
        with pytest.raises(data.ImageError) as error:
            data.load_image(path)
        message = str(error.value)
        assert name in message and f"pip install pylibjpeg {plugin}" in message
        assert message.startswith(str(path)) and "\n" not in message


def test_dicom_without_pydicom_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "a.dcm").write_bytes(b"\0" * 128 + b"DICM")  # never opened: no pydicom
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now fails
    message = "a.dcm: reading DICOM needs pydicom: pip install pydicom"
    with pytest.raises(ImportError, match=message):
        data.load_image(tmp_path / "a.dcm")


def test_dicom_flows_through_crops_preprocess_and_batches(tmp_path):
    pixels = (ramp(64, 64, top=4095).T // 2 + 1000).astype(np.uint16)  # columns rise
    for k in range(4):
        write_dicom(tmp_path / f"{k}.dcm", pixels, bits_stored=12)
    paths = data.image_paths(tmp_path)
    assert [p.name for p in paths] == ["0.dcm", "1.dcm", "2.dcm", "3.dcm"]
    image = data.load_image(paths[0])
    assert image.dtype == np.uint16 and (image % 257 != 0).any()  # more than 8 bits' levels
    crops = data.MultiCrop(**SMALL)(image, np.random.default_rng(0))
    assert all(torch.isfinite(c).all() for c in crops["global"] + crops["local"])
    row = data.preprocess(image, size=64)[0, 32].numpy() * data.STD + data.MEAN
    assert np.allclose(row, image[32] / 65535, atol=2e-3)  # 64 -> 64: the values, unchanged
    batch = next(batches(paths, batch_size=4))
    assert batch["global"].shape == (8, 1, 32, 32) and batch["skipped"] == [0]

# ===== tables =====

def test_read_table_errors_name_the_csv_and_the_column(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "x.png")
    table = tmp_path / "labels.csv"
    cases = {"name,split\nx.png,train\n": "no 'image' column",
             "image\nx.png\n": "no 'sex' column",
             "image,split\nx.png,train\n": "no rows with split 'val'",
             "image,split\ngone.png,val\n": "line 2: no image file at 'gone.png'",
             "image,split\n,val\n": "line 2: no image file at ''"}
    for text, message in cases.items():
        table.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            data.read_table(tmp_path, split="val", require=("sex",) if "sex" in message else ())
        assert str(table) in str(error.value)
    table.write_text("image\nx.png\n")
    with pytest.raises(ValueError, match="no 'split' column"):
        data.read_table(table, split="train")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match="empty_folder: no images"):
        data.image_paths(tmp_path / "empty_folder")


def test_list_images_and_image_paths(tmp_path):
    for name in ("b/one.PNG", "a.jpg", "c/d/e.tiff", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    expected = [tmp_path / "a.jpg", tmp_path / "b/one.PNG", tmp_path / "c/d/e.tiff"]
    assert data.list_images(tmp_path) == expected == data.image_paths(tmp_path)


@needs_covid
def test_covid_table():
    rows = data.read_table(COVID)
    assert len(rows) == 653
    splits = [row["split"] for row in rows]
    assert [splits.count(s) for s in ("train", "val", "test")] == [409, 159, 85]
    assert sum(row["mask"] is not None for row in rows) == 192
    assert all(row["image"].is_absolute() and row["image"].is_file() for row in rows)
    assert len(data.image_paths(COVID, split="val")) == 159

# ===== multi-crop =====

def test_crop_sizes_and_dtype():
    crops = data.MultiCrop()(gray(), np.random.default_rng(0))
    assert [tuple(c.shape) for c in crops["global"]] == [(1, 224, 224)] * 2
    assert [tuple(c.shape) for c in crops["local"]] == [(1, 98, 98)] * 8
    assert all(c.dtype == torch.float32 for c in crops["global"] + crops["local"])


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_crop_box_scale_and_aspect_statistics(scale):
    rng, height, width = np.random.default_rng(0), 518, 560
    boxes = np.array([data.random_crop_box(height, width, scale, (3 / 4, 4 / 3), rng)
                      for _ in range(4000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert ((area > scale[0] * 0.97) & (area < scale[1] * 1.03)).mean() > 0.99
    log_aspect = np.log(w / h)
    assert abs(log_aspect.mean()) < 0.02 and np.abs(log_aspect).max() < math.log(4 / 3) + 0.05
    # Uniform in log aspect: the spread of a uniform on +-log(4/3) is log(4/3) / sqrt(3).
    assert abs(log_aspect.std() - math.log(4 / 3) / math.sqrt(3)) < 0.02


def test_crop_box_falls_back_to_a_centre_crop():
    rng = np.random.default_rng(0)  # an aspect range no box on a 100 x 400 image can meet
    assert data.random_crop_box(100, 400, (0.9, 1.0), (0.5, 0.6), rng) == (0, 170, 100, 60)


def test_crops_are_deterministic_under_a_seed():
    multicrop, image = data.MultiCrop(), gray()
    first, again, other = (multicrop(image, np.random.default_rng(s)) for s in (5, 5, 6))
    for kind in ("global", "local"):
        for a, b, c in zip(first[kind], again[kind], other[kind]):
            assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_is_a_bicubic_resize_of_the_box():
    # Whole-image box (scale 1, aspect 1 on a square image), no photometric steps: the crop
    # must be Pillow's bicubic resize, which torchvision uses on PIL images: torch's kernel
    # rounds differently on under 1% of pixels, by at most 2 gray levels.
    image = gray(200, 200)
    crop = plain(global_scale=(1, 1), ratio=(1, 1))(image, np.random.default_rng(0))["global"][0]
    pillow = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), np.float32)
    ours = crop[0].numpy() * data.STD + data.MEAN
    difference = np.abs(ours * 255 - pillow)
    assert difference.max() < 2.01 and (difference > 0.01).mean() < 0.01


def test_sixteen_bit_sources_keep_their_depth():
    image = np.full((200, 200), 30000, np.uint16)
    image[:, 100:] = 30100  # the same 8-bit level (30000 / 257 = 116.7, 30100 / 257 = 117.1)
    crop = plain(global_scale=(1, 1), ratio=(1, 1))(image, np.random.default_rng(0))["global"][0]
    unit = crop[0].numpy() * data.STD + data.MEAN
    assert np.allclose(unit[:, :100], 30000 / 65535, atol=1e-6)
    assert np.allclose(unit[:, -100:], 30100 / 65535, atol=1e-6)
    full = data.MultiCrop()(image, np.random.default_rng(0))  # and every step runs on it
    assert all(torch.isfinite(c).all() for c in full["global"] + full["local"])


def test_blur_and_solarize_hit_only_their_crops():
    # The upstream defect: DINOv2 passes 1 - p to RandomApply. Here p is the probability of
    # blurring, and each setting changes its own crop only (the random stream is fixed).
    assert data.MultiCrop().blur_probs == (1.0, 0.1, 0.5)  # the paper's, not the bug's
    image, rng = gray(), lambda: np.random.default_rng(1)
    base = plain()(image, rng())
    blurred = plain(blur_probs=(1, 0, 0))(image, rng())
    solarized = plain(solarize_prob=1)(image, rng())
    for changed, which in ((blurred, 0), (solarized, 1)):
        for k in range(2):
            assert torch.equal(changed["global"][k], base["global"][k]) == (k != which)
        assert all(torch.equal(a, b) for a, b in zip(changed["local"], base["local"]))
    def roughness(crop):
        return float(crop.diff(dim=-1).abs().mean())
    assert roughness(blurred["global"][0]) < roughness(base["global"][0])
    unit = base["global"][1] * data.STD + data.MEAN
    assert torch.allclose(solarized["global"][1] * data.STD + data.MEAN,
                          torch.minimum(unit, 1 - unit), atol=1e-6)


def test_gaussian_blur_matches_a_direct_convolution():
    image, sigma = np.random.default_rng(0).random((30, 40), dtype=np.float32), 1.3
    kernel = torch.exp(-0.5 * (torch.arange(-4.0, 5) / sigma) ** 2)
    kernel = kernel[:, None] * kernel[None, :] / kernel.sum() ** 2  # (9, 9), sums to 1
    padded = torch.nn.functional.pad(torch.from_numpy(image)[None, None], (4,) * 4, mode="reflect")
    expected = torch.nn.functional.conv2d(padded, kernel[None, None])[0, 0].numpy()
    assert np.abs(data.gaussian_blur(image, sigma) - expected).max() < 1e-5


def test_jitter_on_gray_levels_equals_jitter_on_pixels():
    pixels = gray(50, 60)
    counts = np.bincount(pixels.ravel(), minlength=256)
    levels, unit = data.GRAY_LEVELS, data.to_unit(pixels)
    for factor in (0.6, 1.0, 1.4):
        by_level = data.adjust_contrast(data.adjust_brightness(levels, 1.3), factor, counts)
        by_pixel = data.adjust_contrast(data.adjust_brightness(unit, 1.3), factor)
        assert np.abs(by_level[pixels] - by_pixel).max() < 1e-6

# ===== preprocess =====

def test_preprocess_shape_and_normalisation():
    out = data.preprocess(np.full((256, 300), 77, np.uint8))
    assert out.shape == (1, 518, 518) and out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor((77 / 255 - data.MEAN) / data.STD), atol=1e-6)
    ramp = np.tile(np.arange(67, dtype=np.uint8) * 3, (64, 1))  # (64, 67): 3 columns to drop
    out = data.preprocess(ramp, size=64)[0] * data.STD + data.MEAN
    assert np.allclose(out[0, [0, -1]].numpy() * 255, [3, 64 * 3], atol=1e-3)  # drop 1, keep 64
    out = data.preprocess(np.full((300, 256), 40000, np.uint16), size=64)
    assert out.shape == (1, 64, 64)
    assert torch.allclose(out, torch.tensor((40000 / 65535 - data.MEAN) / data.STD), atol=1e-5)


@needs_covid
def test_preprocess_matches_the_transformers_rad_dino_processor():
    transformers = pytest.importorskip("transformers")
    # transformers 5 names its Pillow implementation ...Pil; in 4.x the plain class is it.
    pillow_processor = getattr(transformers, "BitImageProcessorPil", None)
    processor = (pillow_processor or transformers.BitImageProcessor)(  # rad-dino's config
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": 518}, resample=3,
        do_center_crop=True, crop_size={"height": 518, "width": 518}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5307] * 3, image_std=[0.2583] * 3)
    # One image of each shape: landscape and portrait, an even and an odd number of columns
    # (or rows) for the centre crop to drop, where an off-by-one offset would show.
    shapes = {}
    for path in sorted((COVID / "images").glob("*.png")):
        with Image.open(path) as image:
            short, long = sorted(image.size)
            shapes.setdefault((image.width < image.height, int(518 * long / short) % 2), path)
    assert len(shapes) == 4
    for path in shapes.values():
        with Image.open(path) as image:
            theirs = processor(image, return_tensors="np")["pixel_values"][0]
        ours = data.preprocess(data.load_image(path)).numpy()
        assert theirs.shape == (3, 518, 518) and np.abs(theirs[0] - ours[0]).max() < 1e-5

# ===== masks and collate =====

def test_masks_never_exceed_their_target():
    generator, rng = data.MaskGenerator(16), np.random.default_rng(0)
    assert not generator(0, rng).any()
    fill = []
    for target in rng.integers(1, 129, size=300):
        mask = generator(int(target), rng)
        assert mask.shape == (16, 16) and 0 < mask.sum() <= target
        fill.append(mask.sum() / target)
    assert np.mean(fill) > 0.8  # blocks mostly reach the target
    assert data.MaskGenerator((3, 5)).n_patches == 15


def samples(n, seed=0):
    multicrop, image = data.MultiCrop(**SMALL), gray(64, 64)
    return [multicrop(image, np.random.default_rng([seed, i])) for i in range(n)]


def test_collate_masks_half_the_crops_with_stratified_ratios():
    generator, batch = data.MaskGenerator(16), samples(10)
    fractions = []
    for seed in range(5):
        out = data.collate(batch, generator, np.random.default_rng(seed))
        assert out["global"].shape == (20, 1, 32, 32) and out["local"].shape == (20, 1, 16, 16)
        assert out["masks"].shape == (20, 256) and out["masks"].dtype == torch.bool
        counts = out["masks"].sum(1)
        assert (counts > 0).sum() == 10  # exactly half of the 2B global crops
        bounds = np.linspace(0.1, 0.5, 11)
        # Stratified: the k-th smallest mask is under the k-th stratum's upper bound.
        assert (np.sort(counts[counts > 0].numpy()) <= 256 * bounds[1:]).all()
        fractions += (counts[counts > 0] / 256).tolist()
    assert 0.22 < np.mean(fractions) < 0.32  # targets average 0.3; blocks may fall short
    # Crop-major: rows 0..B-1 are every sample's first crop, then the second crops.
    assert torch.equal(out["global"][3], batch[3]["global"][0])
    assert torch.equal(out["global"][13], batch[3]["global"][1])
    assert torch.equal(out["local"][11], batch[1]["local"][1])


def test_collate_masks_do_not_depend_on_the_rank_split():
    generator, batch = data.MaskGenerator(16), samples(8)
    whole = data.collate(batch, generator, np.random.default_rng(7))["masks"]
    parts = [data.collate(batch[r * 4:(r + 1) * 4], generator, np.random.default_rng(7),
                          rank=r, world_size=2)["masks"] for r in range(2)]
    for r in range(2):  # rank r holds global samples 4r..4r+3, first crops then second
        assert torch.equal(parts[r][:4], whole[4 * r:4 * r + 4])
        assert torch.equal(parts[r][4:], whole[8 + 4 * r:8 + 4 * r + 4])

def test_collate_without_local_crops():
    multicrop = data.MultiCrop(**{**SMALL, "n_local": 0})
    batch = [multicrop(gray(64, 64), np.random.default_rng(i)) for i in range(3)]
    out = data.collate(batch, data.MaskGenerator(16), np.random.default_rng(0))
    assert out["global"].shape == (6, 1, 32, 32) and out["local"].shape[0] == 0

# ===== the loader =====

def batches(paths, num_workers=0, **kwargs):
    """An iterator over the pretraining batches of one source."""
    return data.iterate(dataset(paths, **kwargs), num_workers=num_workers)


def dataset(paths, **kwargs):
    settings = {"batch_size": 4, "seed": 11, **kwargs}
    sources = [{"name": "test", "paths": paths, "weight": 1.0}]
    return data.PretrainBatches(sources, data.MultiCrop(**SMALL), data.MaskGenerator(4), **settings)


def test_sharding_covers_every_sample_once_per_pass(phantom_set):
    paths = data.image_paths(phantom_set)  # 24 images, 2 ranks x 4: 3 steps a pass
    ranks = [dataset(paths, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_pass == 3
    for pass_index in range(2):
        seen = [i for step in range(3 * pass_index, 3 * pass_index + 3) for b in ranks
                for _, i in b.sample_draws(step, b.rank)]
        assert sorted(seen) == list(range(24))
    assert ranks[0].sample_draws(0, 0) != ranks[0].sample_draws(3, 0)  # reshuffled per pass
    with pytest.raises(ValueError, match="24 images cannot fill"):
        dataset(paths, batch_size=13, world_size=2)


def test_two_ranks_make_the_same_global_batch_as_one(phantom_set):
    paths = data.image_paths(phantom_set)
    one = next(batches(paths, batch_size=4, start_step=2))
    two = [next(batches(paths, batch_size=2, rank=r, world_size=2, start_step=2))
           for r in range(2)]
    for key, per_crop in (("global", 2), ("local", 2), ("masks", 2)):
        for c in range(per_crop):  # crop c of rank r's samples = crop c of samples 2r, 2r+1
            joined = torch.cat([two[r][key][2 * c:2 * c + 2] for r in range(2)])
            assert torch.equal(joined, one[key][4 * c:4 * c + 4]), key
    assert one["step"] == 2 and one["skipped"] == [0]


def test_resume_and_workers_give_the_same_batches(phantom_set):
    paths = data.image_paths(phantom_set)
    through = batches(paths)
    for _ in range(4):
        expected = next(through)
    resumed = next(batches(paths, start_step=3, num_workers=2))
    assert expected["step"] == resumed["step"] == 3
    for key in ("global", "local", "masks"):
        assert torch.equal(expected[key], resumed[key])


def test_bad_files_are_skipped_or_raised(phantom_set, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "empty.png").write_bytes(b"")
    paths = data.image_paths(phantom_set)[:6] + [tmp_path / "broken.png", tmp_path / "empty.png"]
    skipping = batches(paths, on_bad_file="skip")  # 8 paths, batch 4: 2 steps a pass
    skipped = [next(skipping) for _ in range(2)]
    assert all(b["global"].shape == (8, 1, 32, 32) for b in skipped)
    assert sum(b["skipped"][0] for b in skipped) >= 2  # both bad files, once each at least
    for workers in (0, 2):  # from a worker process too, the error is the file's own message
        raising = batches(paths, on_bad_file="error", num_workers=workers)
        with pytest.raises(data.ImageError) as error:
            for _ in range(2):  # the two bad files fall somewhere in these two batches
                next(raising)
        assert str(error.value).startswith(str(tmp_path)) and "\n" not in str(error.value)

# ===== mixtures of sources =====

def folder(path, n, seed=0):
    """A new folder of n small gray PNGs, 00.png, 01.png..."""
    path.mkdir()
    for k in range(n):
        Image.fromarray(gray(40, 40, seed + k)).save(path / f"{k:02d}.png")
    return path


def test_read_sources_reads_a_list_and_names_the_bad_source(tmp_path):
    a = folder(tmp_path / "a", 3)
    b = folder(tmp_path / "b", 4, seed=10)
    (b / "labels.csv").write_text("image,split\n00.png,train\n01.png,val\n02.png,val\n")
    sources = data.read_sources([str(a), {"root": b, "weight": 2, "split": "val"}], "train")
    assert [s["name"] for s in sources] == [str(a), str(b)]
    assert [len(s["paths"]) for s in sources] == [3, 2]  # a: every image; b: its val rows
    assert [s["weight"] for s in sources] == [1.0, 2.0]
    assert data.read_sources(str(b), "train")[0]["paths"] == [b / "00.png"]  # one, not a list
    cases = [([str(a), str(tmp_path / "gone")], "gone: no such folder or table"),
             ([{"root": a, "wieght": 2}], "unknown key wieght in the source"),
             ([{"weight": 2}], "has no root"),
             ([], "empty list"),
             ([{"root": a, "split": "train"}], "no labels.csv")]
    for weight in (0, -1, "a", True, float("nan"), float("inf")):
        cases.append(([str(b), {"root": a, "weight": weight}], f"{a}: weight must be a positive"))
    for spec, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            data.read_sources(spec, "train")


def fake_sources(*sizes_and_weights):
    """Sources of made-up paths (pass_order never opens them), named A, B, C..."""
    return [{"name": chr(65 + s), "paths": [f"{chr(65 + s)}{i}" for i in range(n)], "weight": w}
            for s, (n, w) in enumerate(sizes_and_weights)]


def test_draws_per_pass_follow_the_weights():
    sources = fake_sources((10, 1.0), (4, 2.5), (6, 0.5))
    orders = [data.pass_order(sources, seed=5, pass_index=p) for p in range(2)]
    for order in orders:
        drawn = [[i for s, i in order if s == source] for source in range(3)]
        assert [len(d) for d in drawn] == [10, 10, 3]  # round(weight x images)
        assert sorted(drawn[0]) == list(range(10))  # weight 1: every image exactly once
        assert sorted(drawn[1].count(i) for i in range(4)) == [2, 2, 3, 3]  # 2.5: 2 or 3 times
        assert [s for s, _ in order] != sorted(s for s, _ in order)  # the sources are mixed
    # The passes continue one chain of permutations, so over two passes weight 0.5 draws
    # each of its images once, and 2.5 each of its images 5 times.
    both = orders[0] + orders[1]
    assert sorted(i for s, i in both if s == 2) == list(range(6))
    assert [[i for s, i in both if s == 1].count(i) for i in range(4)] == [5] * 4
    assert orders[0] == data.pass_order(sources, seed=5, pass_index=0)  # a pure function
    assert orders[0] != data.pass_order(sources, seed=6, pass_index=0)


def mixture(tmp_path, **kwargs):
    """The batches of two folders, 6 images of weight 1 and 3 of weight 2: 12 draws a pass."""
    if not (tmp_path / "a").exists():
        folder(tmp_path / "a", 6)
        folder(tmp_path / "b", 3, seed=10)
    sources = data.read_sources([tmp_path / "a", {"root": tmp_path / "b", "weight": 2}])
    settings = {"batch_size": 4, "seed": 3, **kwargs}
    return data.PretrainBatches(sources, data.MultiCrop(**SMALL), data.MaskGenerator(4), **settings)


def same(one, other):
    return all(torch.equal(one[key], other[key]) for key in ("global", "local", "masks"))


def test_mixture_batches_are_a_pure_function_of_seed_step_and_rank(tmp_path):
    first = mixture(tmp_path)
    second = mixture(tmp_path)  # built apart, in another order of calls
    assert first.steps_per_pass == 3
    later = [second[k] for k in (4, 1)]
    assert same(first[1], later[1]) and same(first[4], later[0])
    assert same(first[4], mixture(tmp_path, start_step=4)[0])  # resume
    assert not same(first[4], mixture(tmp_path, seed=4)[4])
    halves = [mixture(tmp_path, batch_size=2, rank=r, world_size=2)[4] for r in range(2)]
    whole = first[4]
    for c in range(2):  # crop c of rank r = crop c of global samples 2r, 2r + 1
        joined = torch.cat([halves[r]["global"][2 * c:2 * c + 2] for r in range(2)])
        assert torch.equal(joined, whole["global"][4 * c:4 * c + 4])
    # Accumulating 2 micro-batches a step reads what 2 ranks read: items 8 and 9 are step 4.
    accumulated = mixture(tmp_path, batch_size=2, accum_steps=2)
    for j in range(2):
        micro_batch = accumulated[8 + j]
        assert micro_batch["step"] == 4
        assert same(micro_batch, halves[j])
        assert torch.equal(micro_batch["mask_indices"], halves[j]["mask_indices"])
    assert same(mixture(tmp_path, batch_size=2, accum_steps=2, start_step=4)[1], halves[1])
    # Rank 1 of 2 accumulating 2 reads parts 2 and 3 of 4: what ranks 2 and 3 of 4 read.
    quarters = [mixture(tmp_path, batch_size=1, rank=r, world_size=4)[4] for r in (2, 3)]
    second_rank = mixture(tmp_path, batch_size=1, rank=1, world_size=2, accum_steps=2)
    assert same(second_rank[8], quarters[0]) and same(second_rank[9], quarters[1])


def test_the_high_resolution_phase_starts_at_its_step(tmp_path):
    """Crops and masks switch to the phase's sizes from its first step on, whatever item
    index the step has (a resume starts the items anywhere)."""
    late = data.MultiCrop(**{**SMALL, "global_size": 48, "local_size": 24})
    batches = mixture(tmp_path, highres=(5, late, data.MaskGenerator(6)))
    for step in (4, 5, 6):
        batch = batches[step]
        size = 48 if step >= 5 else 32
        assert batch["global"].shape[-1] == size and batch["local"].shape[-1] == size // 2
        assert batch["masks"].shape[1] == (36 if step >= 5 else 16)
    resumed = mixture(tmp_path, highres=(5, late, data.MaskGenerator(6)), start_step=5)
    assert same(resumed[0], batches[5])


def test_an_image_drawn_twice_in_a_pass_gets_other_crops(tmp_path):
    batches = mixture(tmp_path, batch_size=12)  # the whole pass in one batch
    draws = batches.sample_draws(0, 0)
    batch = batches[0]
    twice = [(i, j) for i in range(12) for j in range(i + 1, 12) if draws[i] == draws[j]]
    assert len(twice) == 3  # each image of b, drawn twice
    for i, j in twice:  # rows 0..11 are every sample's first global crop
        assert not torch.equal(batch["global"][i], batch["global"][j])


def test_skipped_files_are_counted_for_their_own_source(tmp_path):
    good = folder(tmp_path / "good", 4)
    bad = folder(tmp_path / "bad", 2)
    (bad / "02.png").write_bytes(b"")
    (bad / "03.png").write_bytes(b"\x89PNG broken")
    sources = data.read_sources([good, bad])
    batches = data.PretrainBatches(sources, data.MultiCrop(**SMALL), data.MaskGenerator(4),
                                   batch_size=4, on_bad_file="skip")
    skipped = [batches[k]["skipped"] for k in range(2)]  # one pass: every file once
    assert sum(counts[0] for counts in skipped) == 0
    assert sum(counts[1] for counts in skipped) >= 2  # both broken files, once each at least


def test_train_py_takes_a_list_of_sources(tmp_path):
    a = folder(tmp_path / "a", 6)
    b = folder(tmp_path / "b", 3, seed=10)
    root = Path(__file__).parents[1]
    args = [f"out_dir={tmp_path / 'run'}", f"data.root=[{a}, {{root: {b}, weight: 2.5}}]",
            "data.workers=0", "model.arch=vit_tiny", "crops.global_size=28",
            "crops.local_size=14", "crops.n_local=2", "train.batch_size=4", "head.out_dim=16",
            "head.hidden_dim=16", "head.bottleneck_dim=8", "compile=false", "train.steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(root / "train.py"), *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: 6 images, weight 1, from {a}\n" in result.stdout
    assert f"data: 3 images, weight 2.5, from {b}\n" in result.stdout
