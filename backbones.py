"""Backbones and their frozen features: a spec (weights, `random:X` or the `pixels`
thumbnail) becomes a model, and one pass over a table becomes its pooled features (CLS, mean
patch token, the CLS of the last 4 blocks) and, for the rows that need them, its patch tokens,
cached beside the results so that a second probe costs no second pass. eval.py runs the probes
on them; `--task embed` writes them out for other tools.
"""
import hashlib
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import probes
import raddino
import weights

FEATURE_VERSION = 3  # part of the cache key: bump it when extract_features changes

# ===== backbones: trained, random, and the thumbnail =====


class Pixels(nn.Module):
    """The `pixels:G` control, no weights: the CLS feature is the preprocessed image
    area-downsampled to G x G (G * G numbers), the patch tokens are the raw p x p patches of
    the image at the evaluated size. Every probe reads it as it reads a ViT, so whatever a
    backbone adds over it is what the backbone knows and the pixels do not show plainly."""

    def __init__(self, grid=14, patch_size=14):
        super().__init__()
        self.grid = grid
        self.patch_size = patch_size
        self.blocks = nn.ModuleList([nn.Identity()])  # one "layer": last4 is the CLS itself
        self.args = {"img_size": None, "patch_size": patch_size}

    def forward_features(self, x):
        """(B, 1, S, S) -> {"cls": (B, G*G), "patch": (B, N, p*p)}."""
        cls = F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # area means: (B, G * G)
        # (B, p*p, N) -> (B, N, p*p): each patch's pixels, row by row
        patch = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)
        return {"cls": cls, "patch": patch}

    def get_intermediate_layers(self, x, blocks=None):
        tokens = self.forward_features(x)
        return [(tokens["patch"], tokens["cls"])] * len(blocks or [0])


def weights_path(spec):
    """The file or folder a spec reads: itself, the PATH of random:PATH, None for random:ARCH
    and pixels."""
    if spec.split(":")[0] == "pixels":
        return None
    if not spec.startswith("random:"):
        return Path(spec)
    target = spec.split(":", 1)[1]
    if target in raddino.ARCHS:
        return None
    if not Path(target).exists():
        raise ValueError(f"{spec}: '{target}' is neither an architecture "
                         f"({', '.join(raddino.ARCHS)}) nor a backbone file or folder")
    return Path(target)


def load_model(spec):
    """A frozen one-channel backbone. `pixels` / `pixels:G` is the thumbnail control.
    `random:ARCH` and `random:PATH` are untrained baselines, seed 0, so every run compares
    against the same network (and its cache stays valid): random:PATH has the architecture,
    LayerScale and input grid of the backbone at PATH, the like-for-like control for it.
    Anything else goes to load_backbone, whose in_chans=1 folds 3-channel weights exactly
    (preprocess hands out one channel)."""
    name, _, grid = spec.partition(":")
    if name == "pixels":
        if grid and not grid.isdigit():
            raise ValueError(f"{spec}: the thumbnail is pixels or pixels:G, G a number")
        return Pixels(int(grid or 14)).eval()
    if not spec.startswith("random:"):
        return weights.load_backbone(spec, in_chans=1)
    path = weights_path(spec)
    if path is None:
        args = raddino.build_vit(spec.split(":", 1)[1], in_chans=1, patch_size=14).args
    else:
        args = weights.backbone_state(path)[1]
    args = {**args, "in_chans": 1, "drop_path_rate": 0.0}
    torch.manual_seed(0)
    return raddino.ViT(**args).eval()

# ===== features, one pass, cached =====


def cache_key(spec, table, size, seg_blocks=None, device="cpu"):
    """Features depend on the weights, the table, the size and the device (CUDA runs in
    bf16). Sizes and mtimes stand in for the weights' bytes (hashing 350 MB every run costs
    more than it saves). Images edited behind an unchanged labels.csv go unnoticed: delete
    the features-* files then."""
    parts = [spec, size, seg_blocks, FEATURE_VERSION, device]
    paths = [Path(table)]
    if weights_path(spec) is not None:  # random:PATH too: PATH decides its architecture
        paths.insert(0, weights_path(spec))
    for path in paths:
        files = [path]
        if path.is_dir():  # a Hugging Face folder: the two files load_backbone reads
            # (not README.md, whose evaluation part this script rewrites after every run)
            files = [path / "config.json", path / "model.safetensors"]
            files = [file for file in files if file.exists()]  # load_model says what is missing
        for file in files:
            parts += [str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


class PreprocessedImages(torch.utils.data.Dataset):
    """Row i -> its preprocessed image (1, S, S): decoding and resizing are most of the time
    of a small backbone, so a DataLoader spreads them over worker processes."""

    def __init__(self, rows, size):
        self.paths = [row["image"] for row in rows]
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return data.preprocess(data.load_image(self.paths[i]), self.size)


def anonymous_memory():
    """This process's resident memory that is not a file's pages (GiB): what it cannot give
    back. Memory-mapped caches are file pages, counted in the peak RSS but reclaimable."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")  # not Linux


def memory_line(device):
    """'peak RAM 1.20 GiB (0.80 now anonymous)', plus the GPU's peak when used."""
    ram = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    text = f"peak RAM {ram:.2f} GiB ({anonymous_memory():.2f} now anonymous)"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return text


def linear_blocks(model):
    """The blocks whose CLS tokens DINOv2's linear probe concatenates: the last 4
    (dinov2/eval/linear.py, n_last_blocks=4), or all of a shallower model."""
    depth = len(model.blocks)
    return list(range(max(0, depth - 4), depth))


def npy_for_rows(path, shape, dtype):
    """A .npy file open for writing its rows in order: the header, then the caller's bytes.
    Not a writable memory map, whose written pages stay resident (96 KiB a row for a ViT-Ti's
    tokens at 224 px) until the map is closed. Read back with np.load(mmap_mode="r")."""
    file = open(path, "wb")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(file, header)
    return file


@torch.inference_mode()
def extract_features(model, rows, size, patch_rows=(), seg_blocks=None, patch_file=None,
                     batch_size=32, workers=0, device="cpu", name=""):
    """One pass over the table -> {"cls" (n, D), "avgpool" (n, D) mean patch token, "last4"
    (n, 4D) the CLS of the last 4 blocks} in float32, all from one get_intermediate_layers
    call whose last entry is exactly forward_features'.

    Patch tokens, (N, D) per image (D x len(seg_blocks) with seg_blocks: those blocks'
    tokens side by side), go only to `patch_file` for the rows in patch_rows (ascending), in
    that order: a float16 .npy written as the batches come, since at 518 px a
    ViT-B/14 makes 2 MB of them per image. Memory thus grows with n x D (the pooled
    features), never with the patch tokens."""
    device = torch.device(device)
    depth = len(model.blocks)
    cls_blocks = linear_blocks(model)
    seg_blocks = list(seg_blocks or [depth - 1])
    blocks = sorted(set(cls_blocks) | set(seg_blocks))
    # Where each wanted block's output lands in get_intermediate_layers' list
    position = {block: k for k, block in enumerate(blocks)}
    n = len(rows)
    if list(patch_rows) != sorted(set(patch_rows)):
        raise ValueError("patch_rows must be ascending table rows, each once")
    wanted_rows = set(patch_rows)
    features = {}
    patch = None
    loader = torch.utils.data.DataLoader(
        PreprocessedImages(rows, size), batch_size=batch_size, num_workers=workers,
        pin_memory=device.type == "cuda")
    model = model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # bf16 on GPU, as DINOv2's evaluations run (dinov2/eval/utils.py, autocast); fp32 on CPU,
    # where bf16 matmuls are slower, not faster.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.time()
    last_print = start
    first = 0
    for images in loader:  # (B, 1, S, S)
        with autocast:
            layers = model.get_intermediate_layers(images.to(device, non_blocking=True),
                                                   blocks=blocks)
        # len(blocks) x (patch (B, N, D), cls (B, D)), in block order
        count = len(images)
        pooled = {"cls": layers[-1][1],
                  "avgpool": layers[-1][0].float().mean(1),
                  # k x (B, D) -> (B, kD), as DINOv2's linear evaluation concatenates them
                  "last4": torch.cat([layers[position[b]][1] for b in cls_blocks], dim=1)}
        for part, value in pooled.items():
            if part not in features:  # sized by the first batch: the thumbnail has its own D
                features[part] = np.zeros((n, value.shape[1]), np.float32)
            features[part][first:first + count] = value.float().cpu().numpy()
        wanted = [i for i in range(count) if first + i in wanted_rows]
        if wanted:
            # len(seg_blocks) x (B, N, D) -> (B, N, D x len(seg_blocks))
            tokens = torch.cat([layers[position[b]][0] for b in seg_blocks], dim=2)
            if patch is None:
                patch = npy_for_rows(patch_file, (len(patch_rows), *tokens.shape[1:]),
                                     np.float16)
            patch.write(tokens[wanted].half().cpu().numpy().tobytes())  # the next rows, in order
        first += count
        now = time.time()
        if now - last_print > 10 or first == n:  # a line every 10 s: logs stay short
            last_print = now
            speed = first / (now - start)
            eta = (n - first) / speed
            print(f"  {name}: {first}/{n} images, {speed:.1f} images/s, ETA {eta:.0f} s, "
                  f"{memory_line(device)}", flush=True)
    if patch is not None:
        patch.close()
    features = {k: torch.from_numpy(v) for k, v in features.items()}
    features["patch_rows"] = torch.tensor(list(patch_rows), dtype=torch.long)
    features["images_per_second"] = torch.tensor(n / (time.time() - start))
    return features


def get_features(spec, model, rows, table, args, patch_rows, out_dir):
    """extract_features, cached in out_dir: features-KEY.pt (pooled, and the name of its patch
    token file) and features-KEY-ID.npy (patch tokens of patch_rows, memory-mapped). The .pt
    is written last and names its own .npy, so a run killed between the two files leaves the
    old pair whole. A cache whose patch tokens are not of these rows is redone."""
    key = cache_key(spec, table, args.size, args.seg_blocks, args.device)
    file = Path(out_dir) / f"features-{key}.pt"
    if file.exists():
        features = torch.load(file, weights_only=True)
        patch_file = Path(out_dir) / features.pop("patch_file")
        cached_rows = set(features["patch_rows"].tolist())
        # No patch tokens wanted: any cache does; else it must hold at least these rows'.
        if not patch_rows or (set(patch_rows) <= cached_rows and patch_file.exists()):
            print(f"{spec}: features from the cache {file}")
            if patch_file.exists():
                features["patch"] = np.load(patch_file, mmap_mode="r")
            return features
    check_blocks(args.seg_blocks, len(model.blocks))
    patch_file = Path(out_dir) / f"features-{key}-{os.urandom(4).hex()}.npy"
    features = extract_features(model, rows, args.size, patch_rows, args.seg_blocks, patch_file,
                                args.batch_size, args.workers, args.device, name=spec)
    features["patch_file"] = patch_file.name
    weights.atomic_write(file, lambda f: torch.save(features, f))
    for old in Path(out_dir).glob(f"features-{key}-*.npy"):  # the pairs this one replaced
        if old != patch_file:
            old.unlink()
    features.pop("patch_file")
    if patch_rows:
        features["patch"] = np.load(patch_file, mmap_mode="r")
    return features


def check_blocks(blocks, depth):
    if blocks and not all(0 <= b < depth for b in blocks):
        raise ValueError(f"--seg-blocks {' '.join(map(str, blocks))}: the backbone has blocks "
                         f"0..{depth - 1}")


def mask_file(rows, patch_rows, size, out_dir):
    """The masks of patch_rows at `size`, (m, S, S) bool, preprocessed once into a .npy beside
    the results and shared by every backbone. Keyed on each mask file's size and mtime, so an
    edited mask is read again."""
    parts = [size]
    for i in patch_rows:
        stat = Path(rows[i]["mask"]).stat()
        parts += [str(rows[i]["mask"]), stat.st_size, stat.st_mtime_ns]
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]
    file = Path(out_dir) / f"masks-{key}.npy"
    if not file.exists():
        tmp = Path(out_dir) / f"masks-{key}.tmp.npy"
        with npy_for_rows(tmp, (len(patch_rows), size, size), bool) as masks:
            for i in patch_rows:
                mask = data.preprocess(data.load_image(rows[i]["mask"]), size, mask=True)
                masks.write(np.ascontiguousarray(mask).tobytes())
        tmp.replace(file)
    return np.load(file, mmap_mode="r")


def write_embeddings(spec, features, rows, args, stem):
    """One safetensors file per backbone: "cls" (n, D), "avgpool" (n, D), "features" (n, F) as
    --features spells it, and with --patch-grid "patch" (n, N, C), the tokens seg reads; row
    k is the table's row k, whose image path is metadata["rows"][k]. The grid is read into
    memory once to be written: n x N x C x 2 bytes."""
    tensors = {"cls": features["cls"], "avgpool": features["avgpool"],
               "features": chosen_features(features, args.features)}
    if args.patch_grid:
        if features["patch_rows"].tolist() != list(range(len(rows))):
            raise ValueError("--patch-grid: the patch-token cache does not cover every row")
        tensors["patch"] = torch.from_numpy(np.array(features["patch"]))
    preprocessing = (f"data.preprocess: shorter side to {args.size} (bicubic), centre crop "
                     f"{args.size}, x / 255, mean {data.MEAN}, std {data.STD}, one channel")
    metadata = {"rows": json.dumps([str(row["image"]) for row in rows]), "backbone": spec,
                "size": args.size, "features": args.features, "preprocessing": preprocessing,
                "seg_blocks": json.dumps(args.seg_blocks)}
    file = f"{stem}.safetensors"
    weights.write_safetensors(file, tensors, metadata)
    return {"file": file, "tensors": {k: list(v.shape) for k, v in tensors.items()}}


def chosen_features(features, spelling):
    """--features, e.g. "last4+avgpool": the named pooled features side by side, (n, sum of D).
    last4+avgpool is DINOv2's linear-probe input (dinov2/eval/linear.py,
    create_linear_input: the CLS of the last 4 blocks and the mean patch token)."""
    return torch.cat([features[part] for part in spelling.split("+")], 1)


class ProbeSet:
    """A labelled table held in memory for train.py's learning signal: up to `max_images`
    preprocessed images of its train, val and test rows (in table order) and one label
    column. score(features) fits a probe of probes.py on the train rows' CLS features and
    scores it on the test rows: ridge R^2 for a numeric column, k-NN AUROC for classes."""

    def __init__(self, table, column, size, max_images):
        rows = data.read_table(table, require=["split", column])
        rows = [row for row in rows
                if row[column] is not None and row["split"] in ("train", "val", "test")]
        rows = rows[:max_images]
        values = [row[column] for row in rows]
        self.numeric = all(value.replace(".", "", 1).isdigit() for value in values)
        if self.numeric:
            self.target = np.array([float(value) for value in values])
            self.metric = "r2"
        else:
            classes = sorted(set(values))
            self.target = np.array([classes.index(value) for value in values])
            self.metric = "auroc"
        self.split = np.array([row["split"] for row in rows])
        needed = ("train", "val", "test") if self.numeric else ("train", "test")
        missing = [name for name in needed if not (self.split == name).any()]
        if missing or (not self.numeric and len(set(values)) < 2):
            raise ValueError(f"{table}: the first {max_images} rows with a '{column}' need "
                             f"rows in the {', '.join(needed)} splits and, for classes, two "
                             f"of them (missing: {', '.join(missing) or 'a second class'})")
        self.name = f"{column}_{self.metric}"
        self.description = (f"{column} of {table}, {len(rows)} images "
                            f"({(self.split == 'train').sum()} train, "
                            f"{(self.split == 'test').sum()} test), "
                            f"{'ridge R^2' if self.numeric else 'k-NN AUROC'} of the CLS token")
        self.images = torch.stack([data.preprocess(data.load_image(row["image"]), size)
                                   for row in rows])  # (n, 1, S, S)

    @torch.no_grad()
    def score(self, forward_features, device="cpu", batch_size=64):
        """forward_features: images (B, 1, S, S) -> {"cls": (B, D), ...}, a ViT's or Pixels'."""
        cls = []
        for first in range(0, len(self.images), batch_size):
            batch = self.images[first:first + batch_size].to(device)
            cls.append(forward_features(batch)["cls"].float().cpu())
        cls = torch.cat(cls).numpy()
        test = self.split == "test"
        if self.numeric:
            prediction = probes.ridge_probe(cls, self.target, self.split)["test_pred"]
            return probes.r_squared(self.target[test], prediction)
        prob = probes.knn_probe(cls, self.target, self.split)["test_prob"]
        return probes.CLASSIFICATION["auroc"](self.target[test], prob)
