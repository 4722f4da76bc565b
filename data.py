"""Images in, crops and masks out: everything RAD-DINO pretraining and evaluation read.
In data order: load an image, find images in folders and tables,
multi-crop augmentation, evaluation preprocessing, iBOT block masks, collate, the loader.
Numbers and their sources: REFERENCE.md, "Augmentation" and "Masking"."""
import csv
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

# Intensity statistics of MIMIC-CXR, from the microsoft/rad-dino image processor, for x in
# [0, 1]. The processor repeats them on 3 channels; we keep the one a radiograph has.
MEAN, STD = 0.5307, 0.2583

# Every random number here comes from np.random.default_rng([seed, STREAM, ...]): a batch is
# then a pure function of its coordinates, and no two purposes ever share a stream.
_PERMUTATION, _AUGMENT, _REPLACE, _MASKS = range(4)

# ===== loading an image =====
class ImageError(ValueError):
    """A file that is not a usable image. The message starts with the path."""

def load_image(path):
    """One radiograph as an (H, W) array: uint8, or uint16 for 16-bit files (kept: that is
    how many X-ray sets ship). Colour becomes luma (Pillow's ITU-R 601 weights; an X-ray
    stored as RGB has R = G = B). Alpha is dropped, not composited on black: in an exported
    X-ray it is nearly always opaque, and where not, we keep the recorded densities rather
    than invent a background. 1-bit files load as 0/255."""
    if not Path(path).is_file():  # these two first: Pillow's messages for them say little
        raise ImageError(f"{path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG", "JPEG", "BMP", "TIFF")) as image:
                image.load()  # decode it all now, so truncation is caught here, not later
                mode, gray = image.mode, image.mode.startswith("I") or image.mode in ("L", "F")
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

def to_unit(image):
    """uint8 or uint16 pixels -> float32 in [0, 1], scaled by the dtype's white level."""
    return image.astype(np.float32) / np.iinfo(image.dtype).max

# ===== data sets: folders and tables =====
def list_images(root):
    """Every image file under root, recursively, sorted so that the order is reproducible."""
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
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

def image_paths(root, split=None):
    """Pretraining sources: a table's image column if root has one, else every image under root."""
    root = Path(root)
    has_table = root.suffix.lower() == ".csv" or (root / "labels.csv").is_file()
    if split is not None and not has_table:
        raise ValueError(f"{root}: split '{split}' asked for, but there is no labels.csv")
    paths = [row["image"] for row in read_table(root, split)] if has_table else list_images(root)
    if not paths:
        raise ValueError(f"{root}: no images found")
    return paths

# ===== multi-crop augmentation =====
# DINOv2's DataAugmentationDINO re-thought for one-channel radiographs: 2 global crops (224
# px, 32-100% of the image) and 8 local ones (98 px, 5-32%), each resized once from the
# source, flipped, jittered, blurred, and (global 2 only) solarized. Saturation, hue and
# random grayscale are gone: on a gray image they do nothing, at the price of 3 channels.
# Speed (over 4x torchvision's pipeline: bench.py augment) comes from that one channel and
# two plain choices. Crop-then-resize is one torch call on the uint8 box (its antialiased
# bicubic is Pillow's, which torchvision uses on PIL images, to a gray level on 99% of
# pixels). Jitter, solarize and the normalisation are pointwise: on 8-bit data they are
# computed for the 256 gray levels, and one table lookup applies them to the pixels.

GRAY_LEVELS = np.arange(256, dtype=np.float32) / 255  # the value of each uint8 level
def random_crop_box(height, width, scale, ratio, rng):
    """(top, left, h, w) of a random box, drawn the way torchvision's RandomResizedCrop does.
    Area a fraction `scale` of the image, aspect w/h log-uniform in `ratio`; of 10 tries the
    first that fits wins, else a centre crop of the nearest allowed aspect. It always takes
    22 uniforms (10 tries x 2 + the corner), so the stream never depends on the outcome."""
    uniforms = rng.random(22).tolist()  # plain floats: numpy on 10 numbers is all overhead
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for k in range(10):
        area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[k])
        aspect = math.exp(log_low + (log_high - log_low) * uniforms[10 + k])
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(uniforms[20] * (height - h + 1)), int(uniforms[21] * (width - w + 1)), h, w
    # The fallback: a centre crop as large as fits, its aspect clamped into `ratio`.
    h, w = min(height, round(width / ratio[0])), min(width, round(height * ratio[1]))
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
        blurred, pair = taps[4] * padded[4:n + 4], np.empty((n, image.shape[1]), np.float32)
        for k in range(4):  # a symmetric kernel: taps k and 8 - k share one multiply
            blurred += np.multiply(np.add(padded[k:k + n], padded[8 - k:n + 8 - k], out=pair),
                                   taps[k], out=pair)
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
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})  # all kept

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
            values, lookup = (values if lookup is None else np.take(values, lookup)), None
            values = gaussian_blur(values, np.interp(sigma, (0, 1), self.blur_sigma))  # uniform
        if solarize < solarize_prob:  # invert above 0.5 (128 of 255): that is min(x, 1 - x)
            values = np.minimum(values, 1 - values)
        values = (values - self.mean) / self.std
        pixels = values if lookup is None else np.take(values, lookup)
        if flip < self.flip_prob:  # last: it commutes with every step above
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)[None])

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
    pil = pil.resize((size, new_long) if width <= height else (new_long, size), Image.NEAREST if mask else Image.BICUBIC)
    top, left = (pil.height - size) // 2, (pil.width - size) // 2
    pixels = np.asarray(pil, np.float32)[top:top + size, left:left + size] / (255 if image.dtype == np.uint8 else 1)
    return pixels > 0.5 if mask else torch.from_numpy((pixels - MEAN) / STD)[None]

# ===== iBOT block masks =====
class MaskGenerator:
    """BEiT-style block masks on a patch grid, exactly as REFERENCE.md "Masking" states.
    Rectangles of 4 .. max_fraction x grid patches, aspect log-uniform in [min_aspect,
    1 / min_aspect], are added until the target is met or a placement fails. A block counts
    only if it adds between 1 and the remaining number of patches, so a mask never exceeds
    its target (it may fall short)."""
    def __init__(self, grid, min_patches=4, max_fraction=0.5, min_aspect=0.3):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        self.n_patches = self.height * self.width
        self.min_patches, self.max_patches = min_patches, max_fraction * self.n_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def __call__(self, n_patches, rng):
        mask, n_masked = np.zeros((self.height, self.width), dtype=bool), 0
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
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
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
    rest get none; the masks are shuffled over the crops.

    The DDP twist: DINOv2 draws masks per rank, so a crop's mask depends on how the batch
    was split. Here `rng` must be the same on every rank, the draw is for the global batch
    (2 x B x world_size crops, slot c x B x world_size + j for crop c of global sample j),
    and each rank keeps its own slots. One process with batch 2B then masks every (crop,
    sample) exactly as two ranks with B each do, and on one rank exactly half are masked."""
    n_global, n_local, batch = len(samples[0]["global"]), len(samples[0]["local"]), len(samples)
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
    return {
        "global": torch.stack([s["global"][c] for c in range(n_global) for s in samples]),
        "local": torch.stack([s["local"][c] for c in range(n_local) for s in samples]),
        "masks": torch.from_numpy(np.stack(masks).reshape(len(masks), -1)),  # (2B, h, w) -> (2B, N)
    }

# ===== the pretraining loader =====
class PretrainLoader(torch.utils.data.Dataset):
    """Endless batches for pretraining; batch_size is per rank.

    Two things in one: a map-style dataset whose item k is the whole collated batch of step
    start_step + k on this rank, and (iter()) a DataLoader over it in step order, whose
    workers each build whole batches. A batch is a pure function of (seed, step, rank,
    world_size, paths): the epoch is step // steps_per_epoch, its order a seeded permutation;
    each sample's augmentation is seeded by (seed, epoch, dataset index), the masks by
    (seed, step). So resuming at a step is exact, the number of workers changes nothing,
    and the global batch is the same however many ranks share it. Every iter() starts over
    at start_step. Batches: global, local, masks (see collate), step, n_skipped."""
    def __init__(self, paths, multicrop, mask_generator, batch_size, seed=0, rank=0, world_size=1, start_step=0,
                 num_workers=0, on_bad_file="error", pin_memory=False, mask_ratio=(0.1, 0.5), mask_prob=0.5):
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', not {on_bad_file!r}")
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})  # all kept
        self.paths, self.loader = list(paths), None
        self.steps_per_epoch = len(self.paths) // (batch_size * world_size)  # tail dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.paths)} images cannot fill one global batch of {batch_size} x {world_size} ranks")

    def sample_indices(self, step):
        """Dataset indices of this rank's samples at `step`, before any bad-file swap."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, _PERMUTATION, epoch]).permutation(len(self.paths))
        first = (position * self.world_size + self.rank) * self.batch_size  # the global slot
        return order[first:first + self.batch_size].tolist()

    def load_sample(self, index, epoch):
        """(crops, files skipped) for paths[index]. With on_bad_file="skip", a file that
        fails to load is replaced by one drawn from (seed, epoch, index, attempt)."""
        rng = np.random.default_rng([self.seed, _AUGMENT, epoch, index])
        for attempt in range(1, 101):
            try:
                return self.multicrop(load_image(self.paths[index]), rng), attempt - 1
            except ImageError:
                if self.on_bad_file == "error":
                    raise
                rng = np.random.default_rng([self.seed, _REPLACE, epoch, index, attempt])
                index = int(rng.integers(len(self.paths)))
        raise RuntimeError(f"100 files in a row failed to load; is {self.paths[0]} there?")

    def __getitem__(self, k):
        step = self.start_step + k
        epoch = step // self.steps_per_epoch
        loaded = [self.load_sample(index, epoch) for index in self.sample_indices(step)]
        batch = collate([crops for crops, _ in loaded], self.mask_generator,
                        np.random.default_rng([self.seed, _MASKS, step]), self.mask_ratio,
                        self.mask_prob, self.rank, self.world_size)
        return {**batch, "step": step, "n_skipped": sum(skipped for _, skipped in loaded)}

    def __iter__(self):
        if self.loader is None:  # batch_size=None: items already are batches; k = 0, 1, ...
            self.loader = torch.utils.data.DataLoader(  # its own generator: starting it leaves torch's RNG alone
                self, batch_size=None, sampler=range(sys.maxsize), num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
                prefetch_factor=2 if self.num_workers else None, generator=torch.Generator())
        return iter(self.loader)

    def __getstate__(self):  # workers get the dataset, not the loader that runs them
        return {**self.__dict__, "loader": None}
