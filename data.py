"""Images in, crops and masks out: everything RAD-DINO pretraining and evaluation read.

In data order: load an image (PNG, JPEG, BMP, TIFF, or DICOM through the optional pydicom);
find images in folders, tables and mixtures of them; multi-crop augmentation; iBOT block
masks; collate; the batches of pretraining and the loader over them; and, for evaluation,
the rad-dino image processor on one channel.

Augmentation numbers are DINOv2's (facebookresearch/dinov2, dinov2/data/augmentations.py
and the DINOv2 paper, appendix); block masks are BEiT's (Bao et al. 2022, section 2.5) as
DINOv2's dinov2/data/masking.py draws them.
"""
import csv
import math
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

import raddino

# Intensity statistics of MIMIC-CXR, from the microsoft/rad-dino image processor, for x in
# [0, 1]. The processor repeats them on 3 channels; we keep the one a radiograph has.
MEAN = 0.5307
STD = 0.2583

# Every random number here comes from np.random.default_rng([seed, STREAM, ...]): a batch is
# then a pure function of its coordinates, and no two purposes ever share a stream. Each
# purpose keeps a fixed number of coordinates, because SeedSequence pads short lists with
# zeros: [seed, 0, 5] and [seed, 0, 5, 0] are the same stream.
_PERMUTATION, _AUGMENT, _REPLACE, _MASKS, _SHUFFLE = range(5)

# ===== loading an image =====


class ImageError(ValueError):
    """A file that is not a usable image. The message starts with the path."""

DICOM_SUFFIXES = (".dcm", ".dicom")


def load_image(path):
    """One radiograph as an (H, W) array: uint8, or uint16 for 16-bit files (kept: that is
    how many X-ray sets ship). Colour becomes luma (Pillow's ITU-R 601 weights; an X-ray
    stored as RGB has R = G = B). Alpha is dropped, not composited on black: in an exported
    X-ray it is nearly always opaque, and where not, we keep the recorded densities rather
    than invent a background. 1-bit files load as 0/255. DICOM files: see load_dicom."""
    if not Path(path).is_file():  # these two first: Pillow's messages for them say little
        raise ImageError(f"{path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return load_dicom(path)
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG", "JPEG", "BMP", "TIFF")) as image:
                image.load()  # decode it all now, so truncation is caught here, not later
                mode = image.mode
                gray = mode.startswith("I") or mode in ("L", "F")
                pixels = np.array(image if gray else image.convert("L"))  # a copy: writable
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: too many pixels, refused as a decompression bomb ({error})")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a PNG, JPEG, BMP or TIFF image") from None
    except Exception as error:  # Pillow's decoders raise a zoo of types for broken files
        raise ImageError(f"{path}: truncated or corrupt ({type(error).__name__}: {error})")
    if mode == "F":  # float pixels have no fixed white level, so no honest scaling
        raise ImageError(f"{path}: 32-bit float pixels; save it as 8- or 16-bit")
    if mode == "I" and (pixels.min() < 0 or pixels.max() > 65535):
        raise ImageError(f"{path}: 32-bit integer pixels outside 0..65535")
    # I;16, I;16B (big-endian), I;16N and in-range I all become native uint16.
    return pixels if pixels.dtype == np.uint8 else pixels.astype(np.uint16)


def load_dicom(path):
    """A DICOM radiograph as it is meant to be seen, (H, W): uint8 if it stores at most 8
    bits, else uint16. The display chain of DICOM PS3.4 N.2.1 in order: the Modality LUT
    (Rescale Slope and Intercept), the first VOI LUT or window if the file has one, and
    MONOCHROME1 inverted, so that dense is white as in every other format. The whole range
    that chain can output is stretched over 0..255 or 0..65535: nothing is clipped, and a
    12-bit image keeps its 4096 levels. One single-frame gray image per file; anything else
    is an ImageError. pydicom is imported here, so only DICOM data sets need it."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # not an ImageError: on_bad_file=skip must not skip every file
        raise ImportError(f"{path}: reading DICOM needs pydicom: pip install pydicom") from None
    try:  # pydicom 3 moved these from pixel_data_handlers.util to pixels
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError:
        raise ImageError(f"{path}: not a DICOM file (no 'DICM' after the preamble)") from None
    except Exception as error:  # like Pillow's, pydicom's errors for broken files vary
        raise ImageError(f"{path}: truncated or corrupt DICOM ({type(error).__name__}: {error})")
    # Refuse what is not one gray radiograph before decoding anything.
    if "PixelData" not in dataset:  # a report, or float or double float pixels
        raise ImageError(f"{path}: DICOM without (integer) pixel data")
    photometric = dataset.get("PhotometricInterpretation", "")
    samples = dataset.get("SamplesPerPixel", 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"{path}: colour DICOM ({photometric}, {samples} samples per pixel), "
                         f"not an X-ray")
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(f"{path}: {frames} frames (a series, not one radiograph)")
    bits = dataset.get("BitsStored", 0)
    if not 1 <= bits <= 16:
        raise ImageError(f"{path}: {bits} bits stored per pixel; radiographs have 1 to 16")
    try:
        stored = dataset.pixel_array
    except Exception as error:
        reason = " ".join(str(error).split())  # pydicom's messages span several lines
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        if syntax is None or not syntax.is_compressed:
            raise ImageError(f"{path}: truncated or corrupt DICOM pixel data ({reason})")
        # pydicom decodes these only through optional plugins (its "Pixel Data" guide).
        if "JPEG 2000" in syntax.name:
            plugin = "pylibjpeg pylibjpeg-openjpeg"
        elif "JPEG" in syntax.name:  # JPEG baseline, extended, lossless, and JPEG-LS
            plugin = "pylibjpeg pylibjpeg-libjpeg"
        else:
            plugin = "python-gdcm"
        raise ImageError(f"{path}: cannot decode its {syntax.name} pixel data ({reason}); "
                         f"pydicom needs a plugin for it: pip install {plugin}")
    # The chain is computed once for each value a pixel can store, 2 ** bits of them, and
    # looked up: cheaper than on every pixel, and it gives the exact output range.
    signed = dataset.get("PixelRepresentation", 0) == 1
    lowest = -(2 ** (bits - 1)) if signed else 0
    levels = np.arange(lowest, lowest + 2 ** bits)
    values = apply_modality_lut(levels, dataset)  # float64 when it rescales
    if np.array_equal(values, np.round(values)):  # a VOI LUT is indexed by whole numbers
        values = values.astype(np.int64)
    values = apply_voi_lut(values, dataset).astype(np.float64)
    if photometric == "MONOCHROME1":  # its lowest value is white
        values = -values
    white = 255 if bits <= 8 else 65535
    span = values.max() - values.min()
    table = np.round((values - values.min()) * (white / span if span > 0 else 0))
    table = table.astype(np.uint8 if bits <= 8 else np.uint16)
    # Clipped, because a few writers leave garbage in the bits above BitsStored.
    index = np.clip(stored.astype(np.int32), lowest, lowest + 2 ** bits - 1) - lowest
    return table[index]

def to_unit(image):
    """uint8 or uint16 pixels -> float32 in [0, 1], scaled by the dtype's white level."""
    return image.astype(np.float32) / np.iinfo(image.dtype).max

# ===== data sets: folders and tables =====
def list_images(root):
    """Every image file under root, recursively, sorted so that the order is reproducible."""
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES}
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in suffixes)

def read_table(path, split=None, require=()):
    """Rows of a labels.csv (path: the csv or its folder) as dicts of strings, '' -> None.
    "image" and "mask" become absolute Paths (relative to the csv's folder) and must exist:
    a table that points at missing files fails here, naming the line, not mid-training."""
    table = Path(path) / "labels.csv" if Path(path).is_dir() else Path(path)
    if not table.is_file():
        raise ValueError(f"{table}: no such table")
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        rows = [({k: v or None for k, v in row.items()}, reader.line_num) for row in reader]
    columns = reader.fieldnames or []
    for column in ("image", *require, *(["split"] if split is not None else [])):
        if column not in columns:
            raise ValueError(f"{table}: no '{column}' column (columns: {', '.join(columns)})")
    rows = [(row, line) for row, line in rows if split is None or row["split"] == split]
    if not rows and split is not None:
        raise ValueError(f"{table}: no rows with split '{split}' in the 'split' column")
    for row, line in rows:
        for column in ("image", "mask"):  # an empty image is an error, an empty mask is not
            if row.get(column) or column == "image":
                row[column] = table.parent.absolute() / (value := row[column] or "")
                if not row[column].is_file():
                    raise ValueError(f"{table}, line {line}: no {column} file at '{value}'")
    return [row for row, _ in rows]

def read_sources(spec, split=None):
    """Pretraining sources -> [{"name", "paths", "weight"}].

    spec is one source or a list of them. A source is a folder of images, a folder with a
    labels.csv, or a csv; written as a path, or as {"root": path, "split": ..., "weight": w}
    to give it its own split or weight. `split` is the default split of the sources that
    have a table ("" or None: every row). A weight says how often each of the source's
    images is drawn per pass over the data on average (default 1: every image once); 0.5
    halves a large archive, 3 triples a small one. RAD-DINO mixed five public archives and
    a private one this way."""
    entries = spec if isinstance(spec, list) else [spec]
    if not entries:
        raise ValueError("data.root is an empty list: give at least one folder or table")
    sources = []
    for entry in entries:
        if not isinstance(entry, dict):
            entry = {"root": entry}
        unknown = [str(key) for key in entry if key not in ("root", "split", "weight")]
        if unknown:
            raise ValueError(f"unknown key {', '.join(unknown)} in the source {entry!r}: "
                             f"a source is a path or {{root, split, weight}}")
        if "root" not in entry:
            raise ValueError(f"the source {entry!r} has no root: give {{root: path, ...}}")
        root = Path(str(entry["root"]))
        if not root.exists():
            raise ValueError(f"{root}: no such folder or table (a source in data.root)")
        weight = entry.get("weight", 1.0)
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not 0 < weight < math.inf:  # nan fails both comparisons
            raise ValueError(f"{root}: weight must be a positive, finite number, got {weight!r}")
        has_table = root.suffix.lower() == ".csv" or (root / "labels.csv").is_file()
        # A plain folder has no splits: the default passes it by, its own is an error.
        source_split = entry.get("split", split if has_table else None)
        if source_split and not has_table:
            raise ValueError(f"{root}: split '{source_split}' asked for, but there is no "
                             f"labels.csv")
        if has_table:
            paths = [row["image"] for row in read_table(root, source_split or None)]
        else:
            paths = list_images(root)
        if not paths:
            raise ValueError(f"{root}: no images found")
        sources.append({"name": str(root), "paths": paths, "weight": float(weight)})
    return sources


def image_paths(root, split=None):
    """The images of one source, as read_sources finds them: a table's image column (the
    rows of `split`, or every row), else every image under the folder root."""
    return read_sources({"root": root, "split": split})[0]["paths"]

# ===== multi-crop augmentation =====
# DINOv2's DataAugmentationDINO re-thought for one-channel radiographs: 2 global crops (224
# px, 32-100% of the image) and 8 local ones (98 px, 5-32%), each resized once from the
# source, flipped, jittered, blurred, and (global 2 only) solarized. Saturation, hue and
# random grayscale are gone: on a gray image they do nothing, at the price of 3 channels.
# Speed (docs/results.md, "Benchmarks": bench.py augment against torchvision's pipeline) comes from
# that one channel and two plain choices. Crop-then-resize is one torch call on the uint8
# box (its antialiased bicubic is Pillow's, which torchvision uses on PIL images, but for
# rounding: test_crop_is_a_bicubic_resize_of_the_box bounds it). Jitter, solarize and the
# normalisation are pointwise: on 8-bit data they are computed for the 256 gray levels, and
# one table lookup applies them to the pixels.

GRAY_LEVELS = np.arange(256, dtype=np.float32) / 255  # the value of each uint8 level
def random_crop_box(height, width, scale, ratio, rng):
    """(top, left, h, w) of a random box, drawn the way torchvision's RandomResizedCrop does.
    Area a fraction `scale` of the image, aspect w/h log-uniform in `ratio`; of 10 tries the
    first that fits wins, else a centre crop of the nearest allowed aspect. It always takes
    22 uniforms (10 tries x 2 + the corner), so the stream never depends on the outcome."""
    uniforms = rng.random(22).tolist()  # plain floats: numpy on 10 numbers is all overhead
    log_low = math.log(ratio[0])
    log_high = math.log(ratio[1])
    for k in range(10):
        area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[k])
        aspect = math.exp(log_low + (log_high - log_low) * uniforms[10 + k])
        w = round(math.sqrt(area * aspect))
        h = round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(uniforms[20] * (height - h + 1)), int(uniforms[21] * (width - w + 1)), h, w
    # The fallback: a centre crop as large as fits, its aspect clamped into `ratio`.
    h = min(height, round(width / ratio[0]))
    w = min(width, round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w

def adjust_brightness(values, factor):
    """torchvision's brightness on values in [0, 1]: scale towards black, clip."""
    return (values * factor).clip(0, 1)

def adjust_contrast(values, factor, counts=None):
    """torchvision's contrast: blend with the mean gray, clip. `counts` weight the values
    (pixel counts, when `values` are the 256 gray levels of an 8-bit crop)."""
    mean = float(values.mean() if counts is None else values @ counts / counts.sum())
    return (factor * values + (1 - factor) * mean).clip(0, 1)

def gaussian_blur(image, sigma):
    """torchvision's GaussianBlur(kernel_size=9, sigma) on a float image, reflect padding."""
    taps = np.exp(-0.5 * (np.arange(-4, 5) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for _ in range(2):  # separable: blur along axis 0, transpose, again (rows are fast)
        n = len(image)  # reflect-pad by 4, half the kernel: 4 3 2 1 | 0 1 ... n-1 | n-2 ...
        index = np.abs(np.arange(-4, n + 4))
        padded = image[np.where(index < n, index, 2 * (n - 1) - index)]  # (n + 8, m)
        blurred = taps[4] * padded[4:n + 4]
        pair = np.empty((n, image.shape[1]), np.float32)
        for k in range(4):  # a symmetric kernel: taps k and 8 - k share one multiply
            np.add(padded[k:k + n], padded[8 - k:n + 8 - k], out=pair)
            blurred += np.multiply(pair, taps[k], out=pair)
        image = blurred.T  # (m, n)
    return image

class MultiCrop:
    """(H, W) uint8 or uint16 image, rng -> {"global": 2 x (1, G, G), "local": n x (1, L, L)}.
    Blur probabilities (global 1, global 2, local): DINOv2's paper means 1.0 / 0.1 / 0.5, its
    code hands 1 - p to RandomApply, so the released weights saw 0.0 / 0.9 / 0.5. We follow
    the paper: one sharp and one soft view of each image is the asymmetry the method was
    designed with; nobody chose the bug's numbers. (0.0, 0.9, 0.5) reproduces the releases."""
    def __init__(self, global_size=224, local_size=98, n_local=8, global_scale=(0.32, 1.0),
                 local_scale=(0.05, 0.32), ratio=(3 / 4, 4 / 3), flip_prob=0.5, jitter_prob=0.8,
                 brightness=0.4, contrast=0.4, blur_probs=(1.0, 0.1, 0.5), blur_sigma=(0.1, 2.0),
                 solarize_prob=0.2, mean=MEAN, std=STD):
        self.global_size = global_size
        self.local_size = local_size
        self.n_local = n_local
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.ratio = ratio
        self.flip_prob = flip_prob
        self.jitter_prob = jitter_prob
        self.brightness = brightness
        self.contrast = contrast
        self.blur_probs = blur_probs
        self.blur_sigma = blur_sigma
        self.solarize_prob = solarize_prob
        self.mean = mean
        self.std = std

    def __call__(self, image, rng):
        # 8-bit stays uint8 through the resize, as torchvision's PIL path does; 16-bit goes
        # to float in [0, 1] first and keeps every level it has (slower, but correct).
        source = image if image.dtype == np.uint8 else to_unit(image)
        views = [(self.global_size, self.global_scale, self.blur_probs[0], 0),
                 (self.global_size, self.global_scale, self.blur_probs[1], self.solarize_prob)]
        views += [(self.local_size, self.local_scale, self.blur_probs[2], 0)] * self.n_local
        crops = [self.crop(source, *view, rng) for view in views]  # in this order, always
        return {"global": crops[:2], "local": crops[2:]}

    def crop(self, source, size, scale, blur_prob, solarize_prob, rng):
        """One augmented view: a normalised (1, size, size) float32 tensor."""
        top, left, h, w = random_crop_box(*source.shape, scale, self.ratio, rng)
        # Always 8 more numbers per view, used or not: the stream never depends on outcomes.
        flip, jitter, bright, contrast, order, blur, sigma, solarize = rng.random(8).tolist()
        box = torch.from_numpy(source[None, None, top:top + h, left:left + w])  # (1, 1, h, w)
        crop = F.interpolate(box, size=(size, size), mode="bicubic", antialias=True)[0, 0]
        # 8-bit: `values` are the 256 gray levels and `lookup` maps the pixels to them, until
        # the blur (not pointwise) forces the lookup. 16-bit: `values` are the pixels.
        lookup = crop.numpy() if crop.dtype == torch.uint8 else None
        values = GRAY_LEVELS if lookup is not None else crop.clamp_(0, 1).numpy()
        if jitter < self.jitter_prob:
            counts = None if lookup is None else crop.ravel().bincount(minlength=256).numpy()
            bright = 1 + self.brightness * (2 * bright - 1)  # uniform in [1 - b, 1 + b], b <= 1
            contrast = 1 + self.contrast * (2 * contrast - 1)
            if order < 0.5:  # torchvision applies its jitters in a random order
                values = adjust_contrast(adjust_brightness(values, bright), contrast, counts)
            else:
                values = adjust_brightness(adjust_contrast(values, contrast, counts), bright)
        if blur < blur_prob:
            if lookup is not None:  # from gray levels to pixels
                values = np.take(values, lookup)
                lookup = None
            values = gaussian_blur(values, np.interp(sigma, (0, 1), self.blur_sigma))  # uniform
        if solarize < solarize_prob:  # invert above 0.5 (128 of 255): that is min(x, 1 - x)
            values = np.minimum(values, 1 - values)
        values = (values - self.mean) / self.std
        pixels = values if lookup is None else np.take(values, lookup)
        if flip < self.flip_prob:  # last: it commutes with every step above
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)[None])

# ===== iBOT block masks =====
class MaskGenerator:
    """BEiT-style block masks on a patch grid (BEiT, section 2.5; DINOv2 dinov2/data/masking.py).
    Rectangles of 4 .. max_fraction x grid patches, aspect log-uniform in [min_aspect,
    1 / min_aspect], are added until the target is met or a placement fails. A block counts
    only if it adds between 1 and the remaining number of patches, so a mask never exceeds
    its target (it may fall short)."""
    def __init__(self, grid, min_patches=4, max_fraction=0.5, min_aspect=0.3):
        if isinstance(grid, int):
            grid = (grid, grid)
        self.height, self.width = grid
        self.n_patches = self.height * self.width
        self.min_patches = min_patches
        self.max_patches = max_fraction * self.n_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def __call__(self, n_patches, rng):
        mask = np.zeros((self.height, self.width), dtype=bool)
        n_masked = 0
        while n_masked < n_patches:
            added = self.add_block(mask, min(n_patches - n_masked, self.max_patches), rng)
            if added == 0:
                break
            n_masked += added
        return mask

    def add_block(self, mask, allowed, rng):
        """Try 10 times to add one block of at most `allowed` new patches; return how many."""
        for _ in range(10):
            # Not rng.uniform, which refuses high < low: `allowed` may be under min_patches,
            # and then the area falls between the two, as random.uniform lets it in DINOv2.
            area = self.min_patches + (allowed - self.min_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if h < self.height and w < self.width:  # strictly inside, as in BEiT and DINOv2
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                added = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < added <= allowed:
                    mask[top:top + h, left:left + w] = True
                    return added
        return 0

# ===== collate =====
def collate(samples, mask_generator, rng, mask_ratio=(0.1, 0.5), mask_prob=0.5, rank=0,
            world_size=1):
    """MultiCrop outputs of this rank's B samples -> a batch, collated as DINOv2 does.

    "global" (2B, 1, G, G) and "local" (nB, 1, L, L) are crop-major: every sample's first
    crop, then every second crop... "masks" (2B, N) bool: int(mask_prob x global crops)
    crops get a block mask, their target ratios stratified over linspace(*mask_ratio); the
    rest get none; the masks are shuffled over the crops. "mask_indices" and "mask_weights"
    (M,): raddino.masked_tokens(masks).

    The DDP twist: DINOv2 draws masks per rank, so a crop's mask depends on how the batch
    was split. Here `rng` must be the same on every rank, the draw is for the global batch
    (2 x B x world_size crops, slot c x B x world_size + j for crop c of global sample j),
    and each rank keeps its own slots. One process with batch 2B then masks every (crop,
    sample) exactly as two ranks with B each do, and on one rank exactly half are masked."""
    n_global = len(samples[0]["global"])
    n_local = len(samples[0]["local"])
    batch = len(samples)
    n_crops = n_global * batch * world_size
    n_masked = int(n_crops * mask_prob)
    bounds = np.linspace(*mask_ratio, n_masked + 1)
    ratios = rng.uniform(bounds[:-1], bounds[1:])  # one target ratio in each stratum
    mask_of_slot = rng.permutation(n_crops)  # the shuffle
    # One seed per mask, so that a rank builds only its own 2B masks, not the global batch's.
    mask_seeds = rng.integers(2 ** 63, size=n_crops)
    masks = []
    for crop in range(n_global):
        for i in range(batch):
            m = mask_of_slot[crop * batch * world_size + rank * batch + i]
            target = int(mask_generator.n_patches * ratios[m]) if m < n_masked else 0
            masks.append(mask_generator(target, np.random.default_rng(mask_seeds[m])))
    global_crops = torch.stack([s["global"][c] for c in range(n_global) for s in samples])
    if n_local:
        local_crops = torch.stack([s["local"][c] for c in range(n_local) for s in samples])
    else:  # no local crops: an empty batch of them, which StudentTeacher accepts
        local_crops = global_crops.new_empty((0, *global_crops.shape[1:]))
    masks = torch.from_numpy(np.stack(masks).reshape(len(masks), -1))  # (2B, h, w) -> (2B, N)
    # The masked patches' positions and iBOT weights, found here on the CPU: on a GPU the
    # step would have to wait for them (raddino.masked_tokens).
    mask_indices, mask_weights = raddino.masked_tokens(masks)
    return {"global": global_crops, "local": local_crops, "masks": masks,
            "mask_indices": mask_indices, "mask_weights": mask_weights}

# ===== the batches of pretraining, and the loader over them =====


def draws_in_a_pass(source):
    """round(weight x the source's size), at least 1."""
    return max(1, round(source["weight"] * len(source["paths"])))


def pass_order(sources, seed, pass_index):
    """The (source, image) pairs drawn in one pass over the data, shuffled: a pure function
    of (seed, pass_index). A pass is an epoch in the usual sense; train.py's "epoch" is
    DINOv2's, the schedules' unit of train.epoch_length steps (its OFFICIAL_EPOCH_LENGTH),
    which need not be a pass. Source s gives count = round(weight x its size) draws a pass
    (at least 1), read in turn off an endless chain of seeded permutations of its images:
    pass p takes links p x count to (p + 1) x count - 1. So no image is drawn twice before
    every image of its source has been drawn once, within a pass and across passes: weight
    2.5 draws each image 2 or 3 times a pass, weight 0.5 each image once in two passes."""
    draws = []
    for s, source in enumerate(sources):
        n = len(source["paths"])
        count = draws_in_a_pass(source)
        start = pass_index * count  # where this pass starts on the chain
        cycles = range(start // n, (start + count - 1) // n + 1)  # the permutations it meets
        chain = [np.random.default_rng([seed, _PERMUTATION, s, c]).permutation(n) for c in cycles]
        offset = start - cycles[0] * n
        draws += [(s, int(i)) for i in np.concatenate(chain)[offset:offset + count]]
    shuffle = np.random.default_rng([seed, _SHUFFLE, pass_index]).permutation(len(draws))
    return [draws[i] for i in shuffle]


class PretrainBatches(torch.utils.data.Dataset):
    """The batches of pretraining, as a map-style dataset: item k is the collated batch of
    step start_step + k on this rank (batch_size images per rank). With accum_steps = n,
    items come n to a step: item k is micro-batch k % n of step start_step + k // n, and the
    n micro-batches of rank r are the parts r * n ... r * n + n - 1 of the global batch, as
    if world_size x n ranks shared it: one process accumulating 2 micro-batches reads
    exactly what 2 ranks read.

    A batch is a pure function of (seed, step, rank, world_size, sources): its pass over the
    data is step // steps_per_pass, the pass's order pass_order(); each sample's augmentation
    is seeded by (seed, pass, its slot in that order), the masks by (seed, step). So resuming
    at a step is exact, the number of loader workers changes nothing, the global batch is the
    same however many ranks share it, and an image drawn twice in a pass (weight > 1) gets
    two different sets of crops, not the same ones twice.

    Items: global, local, masks (see collate), step, and skipped: the files skipped per
    source. A file that fails to load either stops the run (on_bad_file="error": the item
    carries the error, raised by iterate() in the main process with one clear message) or is
    replaced by a seeded draw from the same source ("skip")."""

    def __init__(self, sources, multicrop, mask_generator, batch_size, seed=0, rank=0,
                 world_size=1, start_step=0, on_bad_file="error", mask_ratio=(0.1, 0.5),
                 mask_prob=0.5, accum_steps=1, highres=None):
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', not {on_bad_file!r}")
        self.sources = sources
        self.multicrop = multicrop
        self.mask_generator = mask_generator
        # (first step, multicrop, mask generator) of a high-resolution phase, or None
        self.highres = highres
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.accum_steps = accum_steps
        self.n_parts = world_size * accum_steps  # the global batch's parts of batch_size
        self.start_step = start_step
        self.on_bad_file = on_bad_file
        self.mask_ratio = mask_ratio
        self.mask_prob = mask_prob
        self.cached_pass = None
        self.cached_order = None
        draws_per_pass = sum(draws_in_a_pass(source) for source in sources)
        global_batch = batch_size * self.n_parts
        self.steps_per_pass = draws_per_pass // global_batch  # the tail is dropped
        if self.steps_per_pass == 0:
            raise ValueError(f"{draws_per_pass} images cannot fill one global batch of "
                             f"{batch_size} x {world_size} ranks x {accum_steps} micro-batches")

    def __len__(self):
        return sys.maxsize  # endless: the training loop decides when to stop

    def first_slot(self, step, part):
        """The place in its pass's order of the first sample of `part` at `step`."""
        position = step % self.steps_per_pass
        return (position * self.n_parts + part) * self.batch_size

    def sample_draws(self, step, part):
        """(source, image) pairs of part's samples at `step`, before any bad-file swap."""
        pass_index = step // self.steps_per_pass
        if self.cached_pass != pass_index:  # one shuffle per pass, not per step
            self.cached_order = pass_order(self.sources, self.seed, pass_index)
            self.cached_pass = pass_index
        first = self.first_slot(step, part)
        return self.cached_order[first:first + self.batch_size]

    def phase(self, step):
        """(multicrop, mask generator) at `step`: the high-resolution phase's from its first
        step on, a pure function of the step, so a resume across the switch is exact."""
        if self.highres and step >= self.highres[0]:
            return self.highres[1], self.highres[2]
        return self.multicrop, self.mask_generator

    def load_sample(self, source, index, pass_index, slot, multicrop):
        """(crops, files skipped) for image `index` of `source`, drawn at `slot` of its pass."""
        paths = self.sources[source]["paths"]
        rng = np.random.default_rng([self.seed, _AUGMENT, pass_index, slot])
        for attempt in range(1, 101):
            try:
                return multicrop(load_image(paths[index]), rng), attempt - 1
            except ImageError:
                if self.on_bad_file == "error":
                    raise
                rng = np.random.default_rng([self.seed, _REPLACE, pass_index, slot, attempt])
                index = int(rng.integers(len(paths)))
        raise RuntimeError(f"100 files in a row failed to load from {self.sources[source]['name']}")

    def __getitem__(self, k):
        step = self.start_step + k // self.accum_steps
        part = self.rank * self.accum_steps + k % self.accum_steps
        pass_index = step // self.steps_per_pass
        skipped = [0] * len(self.sources)
        samples = []
        draws = self.sample_draws(step, part)
        multicrop, mask_generator = self.phase(step)
        try:
            for slot, (source, index) in enumerate(draws, start=self.first_slot(step, part)):
                crops, n_skipped = self.load_sample(source, index, pass_index, slot, multicrop)
                samples.append(crops)
                skipped[source] += n_skipped
        except ImageError as error:
            # Raised here, a worker's error reaches the main process wrapped in its
            # traceback; as data, iterate() can raise it as it was.
            return {"step": step, "error": str(error)}
        masks_rng = np.random.default_rng([self.seed, _MASKS, step])
        batch = collate(samples, mask_generator, masks_rng, self.mask_ratio,
                        self.mask_prob, part, self.n_parts)
        return {**batch, "step": step, "skipped": skipped}


def iterate(batches, num_workers=0, pin_memory=False, blocked_signals=()):
    """The batches in step order, built by num_workers processes (each builds whole batches).

    The workers start with `blocked_signals` blocked, as they then stay: train.py's stop
    signals (SIGTERM, SIGUSR1) reach every process of a rank under torchrun and SLURM, and a
    worker dies of SIGTERM (torch's handler in it) and, unless forked, of SIGUSR1, which fails
    the run before it can save; blocked, a signal waits in the worker unseen."""
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # the items already are batches
        sampler=range(sys.maxsize),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # its own: starting the loader leaves torch's RNG alone
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked_signals)
    try:
        in_order = iter(loader)  # the workers start here, inheriting the mask
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked_signals)
    while True:  # the sampler is endless
        batch = next(in_order)
        if "error" in batch:
            # The workers end now, not when the traceback that holds this frame is collected
            # (at exit, that can take seconds).
            del in_order, loader
            raise ImageError(batch["error"])
        yield batch

# ===== evaluation preprocessing =====
def preprocess(image, size=518, mask=False):
    """The microsoft/rad-dino image processor on one channel: (H, W) -> (1, size, size). It
    resizes the shorter side to `size`, the longer to int(size * long / short), with Pillow's
    bicubic on the 8-bit image (on RGB, whose channels are all this one), centre-crops, divides
    by 255, normalises; 16-bit images are resized as floats in [0, 1] (Pillow mode F). With
    mask=True, a label mask takes the same geometry, nearest-neighbour: (size, size) bool."""
    height, width = image.shape
    new_long = int(size * max(height, width) / min(height, width))  # int(), as transformers
    image = ((to_unit(image) > 0.5) * 255).astype(np.uint8) if mask else image
    pil = Image.fromarray(image if image.dtype == np.uint8 else to_unit(image))
    if width <= height:
        new_size = (size, new_long)  # Pillow sizes are (width, height)
    else:
        new_size = (new_long, size)
    pil = pil.resize(new_size, Image.NEAREST if mask else Image.BICUBIC)
    top = (pil.height - size) // 2
    left = (pil.width - size) // 2
    pixels = np.asarray(pil, np.float32)[top:top + size, left:left + size]
    if image.dtype == np.uint8:
        pixels = pixels / 255
    return pixels > 0.5 if mask else torch.from_numpy((pixels - MEAN) / STD)[None]
