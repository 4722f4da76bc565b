"""Frozen-feature probes of a RAD-DINO / DINOv2 backbone on a table of chest X-rays.

The encoder never trains here. Each backbone sees every image once (data.preprocess: the
rad-dino processor on one channel), the features are cached beside the results, and small
probes are fitted on them: logistic regression and k-NN for labels, ridge for age, a linear
segmentation head for lung masks, and DINOv2's PCA picture. The protocols are DINOv2's
(Oquab et al. 2023, section 7; facebookresearch/dinov2, dinov2/eval/linear.py and knn.py),
DINO's weighted k-NN (Caron et al. 2021, section 4.1 and facebookresearch/dino,
eval_knn.py) and RAD-DINO's (Perez-Garcia et al. 2025, Nature Machine Intelligence). The
table's `split` column rules: fit on train, choose on val, report on test, with bootstrap
95% intervals, because a test set of 85 images deserves them.

    python eval.py       # synthetic phantoms; train.py's newest checkpoint vs its random init
    python eval.py --backbone random:vit_small --data ../shared/data/covid-cxr --label covid

Every metric is written out here (no sklearn); tests/test_eval.py checks each against a
slow twin.
"""
import argparse
import hashlib
import json
import math
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import phantoms
import raddino
import weights

TASKS = ("linear", "knn", "seg", "age", "sex", "pca", "attention")  # what "all" runs
EXPORTS = ("embed",)  # asked for by name only: it writes files, it measures nothing
POOLED = ("cls", "avgpool", "last4")  # the --features parts, all from one pass
SPLITS = ("train", "val", "test")
FEATURE_VERSION = 2  # part of the cache key: bump it when extract_features changes

# ===== metrics =====


def average_ranks(x):
    """1-based ranks, ties sharing the mean of the ranks they span: [5, 7, 7, 9] -> [1, 2.5,
    2.5, 4]."""
    order = np.argsort(x, kind="stable")
    # The tie groups of the sorted values: where each starts, and how long it is.
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    # A group at 0-based places first .. first + c - 1 has the mean 1-based rank
    # first + (c + 1) / 2.
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def auroc(positive, score):
    """P(a random positive outscores a random negative), a tie counting 1/2: the Mann-Whitney
    U from rank sums, O(n log n) rather than every pair. NaN unless both classes are present."""
    positive = np.asarray(positive, bool)
    score = np.asarray(score, float)
    n_pos = positive.sum()
    n_neg = (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return np.nan
    # The positives' rank sum, less its least possible value, counts the (positive, negative)
    # pairs in the right order.
    pairs_in_order = average_ranks(score)[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(pairs_in_order / (n_pos * n_neg))


def auprc(positive, score):
    """Average precision: the sum over thresholds of (gain in recall) x precision, a threshold
    at each distinct score, tied samples entering together (as sklearn's
    average_precision_score). Not the trapezoid under the PR curve, which is optimistic where
    precision jumps."""
    positive = np.asarray(positive, bool)
    score = np.asarray(score, float)
    if not positive.any() or positive.all():
        # Undefined without positives, trivially 1 without negatives: keep both out of means.
        return np.nan
    order = np.argsort(-score, kind="stable")  # best score first
    # Thresholds fall between distinct scores: keep the last sample of each tie.
    last_of_tie = np.r_[score[order][1:] != score[order][:-1], True]
    true_pos = np.cumsum(positive[order])[last_of_tie]
    false_pos = np.cumsum(~positive[order])[last_of_tie]
    recall = true_pos / positive.sum()
    precision = true_pos / (true_pos + false_pos)
    return float(np.sum(np.diff(recall, prepend=0) * precision))


def one_vs_rest(metric):
    """A binary metric on class probabilities (n, C): class 1's column when C = 2, else the
    mean over the classes that have positives and negatives here. A class missing from a
    small test set has no AUROC, and counting it as 0.5 would drag every backbone towards
    chance alike."""
    def macro(y, prob):
        if prob.shape[1] == 2:
            return metric(y == 1, prob[:, 1])
        values = [metric(y == c, prob[:, c]) for c in range(prob.shape[1])]
        values = [v for v in values if np.isfinite(v)]
        if not values:
            return np.nan
        return float(np.mean(values))
    return macro


def accuracy(y, prob):
    return float(np.mean(prob.argmax(1) == y))


CLASSIFICATION = {"auroc": one_vs_rest(auroc), "auprc": one_vs_rest(auprc), "accuracy": accuracy}


def dice_iou(pred, true):
    """Per-image Dice 2|P & T| / (|P| + |T|) and IoU |P & T| / |P | T| of bool (B, H, W)
    masks. Two empty masks score 1: nothing to find, nothing found."""
    inter = (pred & true).sum((1, 2))
    total = pred.sum((1, 2)) + true.sum((1, 2))
    union = total - inter
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return dice, iou


def pearson(a, b):
    """Pearson's r; NaN for a constant input, where correlation means nothing."""
    a = a - a.mean()
    b = b - b.mean()
    norms = (a @ a) * (b @ b)
    if norms <= 0:
        return np.nan
    return float(a @ b / math.sqrt(norms))


def mean_absolute_error(y, pred):
    return float(np.mean(np.abs(y - pred)))


def r_squared(y, pred):
    """1 - SSE / SST. Below 0: worse than predicting the mean."""
    return float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


REGRESSION = {"mae": mean_absolute_error, "pearson": pearson, "r2": r_squared}


def with_ci(metrics, arrays, n_resamples=1000, seed=0):
    """{name: {"value", "ci": [2.5%, 97.5%]}} for metrics {name: fn(*arrays)}: a percentile
    bootstrap over the test rows, fixed seed, so a rerun prints the same interval. Resamples
    where a metric is undefined (one class drawn) are left out of that metric's interval."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    draws = {name: [] for name in metrics}
    for _ in range(n_resamples):
        index = rng.integers(0, n, n)  # n rows drawn with replacement, the same for every metric
        resampled = [a[index] for a in arrays]
        for name, fn in metrics.items():
            draws[name].append(fn(*resampled))
    results = {}
    for name, fn in metrics.items():
        finite = np.array(draws[name])[np.isfinite(draws[name])]
        interval = [np.nan, np.nan]
        if len(finite):
            interval = np.percentile(finite, [2.5, 97.5]).tolist()
        results[name] = {"value": fn(*arrays), "ci": interval}
    return results

# ===== backbones and their features =====


def weights_path(spec):
    """The file or folder a spec reads: itself, the PATH of random:PATH, None for random:ARCH."""
    if not spec.startswith("random:"):
        return Path(spec)
    target = spec.split(":", 1)[1]
    if target in raddino.ARCHS:
        return None
    if not Path(target).exists():
        raise ValueError(f"{spec}: '{target}' is neither an architecture "
                         f"({', '.join(raddino.ARCHS)}) nor a backbone file or folder")
    return Path(target)


def backbone_args(spec):
    """The ViT arguments of a spec, read off its weights (random:ARCH: build_vit's)."""
    path = weights_path(spec)
    if path is None:
        return raddino.build_vit(spec.split(":", 1)[1], in_chans=1, patch_size=14).args
    return weights.backbone_state(path)[1]


def load_model(spec):
    """A frozen one-channel ViT. `random:ARCH` and `random:PATH` are untrained baselines, seed
    0, so every run compares against the same network (and its cache stays valid):
    random:PATH has the architecture and input grid of the backbone at PATH, the like-for-like
    control for it. Anything else goes to load_backbone, whose in_chans=1 folds 3-channel
    weights exactly (preprocess hands out one channel)."""
    if not spec.startswith("random:"):
        return weights.load_backbone(spec, in_chans=1)
    args = dict(backbone_args(spec))
    args["in_chans"] = 1
    args["drop_path_rate"] = 0.0
    torch.manual_seed(0)
    return raddino.ViT(**args).eval()


def cache_key(spec, table, size, seg_blocks=None, device="cpu"):
    """Features depend on the weights, the table, the size and the device (CUDA runs in
    bf16). Sizes and mtimes stand in for the weights' bytes (hashing 350 MB every run costs
    more than it saves). Images edited behind an unchanged labels.csv go unnoticed: delete
    the features-*.pt files then."""
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


def load_batch(rows, size):
    """Rows -> preprocessed images (B, 1, S, S), in this process (for the few pictures)."""
    return torch.stack([data.preprocess(data.load_image(row["image"]), size) for row in rows])


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


class NpyRows:
    """Rows of a .npy file, read on demand: rows[[3, 1, 4]] -> a (3, ...) array. Each row is
    one os.pread into a fresh buffer, so memory holds the rows asked for and nothing more (a
    memory map would keep every page it touched resident, and at 518 px a ViT-B/14's patch
    tokens are 2 MB an image). The file is a plain .npy: np.load(path, mmap_mode="r") reads
    it too."""

    def __init__(self, path):
        self.file = open(path, "rb")
        version = np.lib.format.read_magic(self.file)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(self.file)
        else:
            header = np.lib.format.read_array_header_2_0(self.file)
        self.shape = header[0]
        self.dtype = header[2]
        self.offset = self.file.tell()  # the data follow the header
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        index = np.atleast_1d(np.asarray(index))
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        for k, i in enumerate(index.tolist()):
            raw = os.pread(self.file.fileno(), self.row_bytes, self.offset + i * self.row_bytes)
            out[k] = np.frombuffer(raw, self.dtype).reshape(self.shape[1:])
        return out


def npy_for_appending(path, shape, dtype):
    """An open file with a .npy header for `shape`; the caller writes the rows in order."""
    file = open(path, "wb")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(file, header)
    return file


def peak_memory(device):
    """'RAM 1.2 GiB' (this process's peak resident set), plus the GPU's peak when used."""
    ram = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    text = f"peak RAM {ram:.2f} GiB"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return text


def linear_blocks(model):
    """The blocks whose CLS tokens DINOv2's linear probe concatenates: the last 4
    (dinov2/eval/linear.py, n_last_blocks=4), or all of a shallower model."""
    depth = len(model.blocks)
    return list(range(max(0, depth - 4), depth))


@torch.inference_mode()
def extract_features(model, rows, size, patch_rows=(), seg_blocks=None, patch_file=None,
                     batch_size=32, workers=0, device="cpu", name=""):
    """One pass over the table -> {"cls" (n, D), "avgpool" (n, D) mean patch token, "last4"
    (n, 4D) the CLS of the last 4 blocks} in float32, all from one get_intermediate_layers
    call whose last entry is exactly forward_features'.

    Patch tokens, (N, D) per image (D x len(seg_blocks) with seg_blocks: those blocks'
    tokens side by side), go only to `patch_file` for the rows in patch_rows (ascending), in
    that order: a float16 .npy written as the batches come, since at 518 px a ViT-B/14 makes
    2 MB of them per image. Memory thus grows with n x D (the pooled features), never with
    the patch tokens."""
    device = torch.device(device)
    depth = len(model.blocks)
    cls_blocks = linear_blocks(model)
    seg_blocks = list(seg_blocks or [depth - 1])
    blocks = sorted(set(cls_blocks) | set(seg_blocks))
    # Where each wanted block's output lands in get_intermediate_layers' list
    position = {block: k for k, block in enumerate(blocks)}
    n = len(rows)
    dim = model.embed_dim
    features = {"cls": np.zeros((n, dim), np.float32),
                "avgpool": np.zeros((n, dim), np.float32),
                "last4": np.zeros((n, len(cls_blocks) * dim), np.float32)}
    wanted_rows = set(patch_rows)
    patch = None
    if patch_rows:
        if list(patch_rows) != sorted(wanted_rows):
            raise ValueError("patch_rows must be ascending table rows, each once")
        n_patches = (size // model.patch_size) ** 2
        shape = (len(patch_rows), n_patches, dim * len(seg_blocks))
        patch = npy_for_appending(patch_file, shape, np.float16)
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
        last_patch = layers[-1][0].float()
        count = len(images)
        features["cls"][first:first + count] = layers[-1][1].float().cpu().numpy()
        features["avgpool"][first:first + count] = last_patch.mean(1).cpu().numpy()
        # k x (B, D) -> (B, kD), as DINOv2's linear evaluation concatenates them
        last4 = torch.cat([layers[position[b]][1] for b in cls_blocks], dim=1)
        features["last4"][first:first + count] = last4.float().cpu().numpy()
        wanted = [i for i in range(count) if first + i in wanted_rows]
        if wanted:
            # len(seg_blocks) x (B, N, D) -> (B, N, D x len(seg_blocks))
            tokens = torch.cat([layers[position[b]][0] for b in seg_blocks], dim=2)
            patch.write(tokens[wanted].half().cpu().numpy().tobytes())  # the next rows, in order
        first += count
        now = time.time()
        if now - last_print > 10 or first == n:  # a line every 10 s: logs stay short
            last_print = now
            speed = first / (now - start)
            eta = (n - first) / speed
            print(f"  {name}: {first}/{n} images, {speed:.1f} images/s, ETA {eta:.0f} s, "
                  f"{peak_memory(device)}", flush=True)
    if patch is not None:
        patch.close()
    features = {k: torch.from_numpy(v) for k, v in features.items()}
    features["patch_rows"] = torch.tensor(list(patch_rows), dtype=torch.long)
    features["images_per_second"] = torch.tensor(n / (time.time() - start))
    return features


def get_features(spec, rows, table, args, patch_rows, out_dir):
    """extract_features, cached in out_dir: features-KEY.pt (pooled) and features-KEY.npy
    (patch tokens of patch_rows, read back by the batch). A cache whose patch tokens are not
    of these rows is redone."""
    key = cache_key(spec, table, args.size, args.seg_blocks, args.device)
    file = Path(out_dir) / f"features-{key}.pt"
    patch_file = file.with_suffix(".npy")
    if file.exists():
        features = torch.load(file, weights_only=True)
        cached_rows = set(features["patch_rows"].tolist())
        # No patch tokens wanted: any cache does; else it must hold at least these rows'.
        if not patch_rows or (set(patch_rows) <= cached_rows and patch_file.exists()):
            print(f"{spec}: features from the cache {file}")
            if patch_file.exists():
                features["patch"] = NpyRows(patch_file)
            return features
    model = load_model(spec)
    check_blocks(args.seg_blocks, len(model.blocks))
    # Written under temporary names and renamed when complete: an interrupted run leaves no
    # half cache.
    patch_tmp = Path(out_dir) / f"features-{key}.tmp.npy"
    features = extract_features(model, rows, args.size, patch_rows, args.seg_blocks, patch_tmp,
                                args.batch_size, args.workers, args.device, name=spec)
    if patch_rows:
        patch_tmp.replace(patch_file)
    torch.save(features, file.with_suffix(".tmp"))
    file.with_suffix(".tmp").replace(file)
    if patch_rows:
        features["patch"] = NpyRows(patch_file)
    return features


def check_blocks(blocks, depth):
    if blocks and not all(0 <= b < depth for b in blocks):
        raise ValueError(f"--seg-blocks {' '.join(map(str, blocks))}: the backbone has blocks "
                         f"0..{depth - 1}")

# ===== probes =====


def standardize(x, train):
    """Features in units of the train split's std, so that one L2 penalty weighs every
    direction alike. A random ViT's CLS hardly moves between images (std ~1e-5: LayerScale
    1e-5 keeps its blocks near identity), so tiny stds are scaled up, never floored. The
    statistics are taken in float64, the result is float32: half the memory of the table's
    features, and standardised values lose nothing a probe could use."""
    x = np.asarray(x)
    mean = x[train].mean(0, dtype=np.float64)
    std = x[train].std(0, dtype=np.float64)
    scaled = (x - mean) / np.where(std > 0, std, 1)
    return scaled.astype(np.float32)


def fit_logistic(x, y, n_classes, l2, max_iter=200, dtype=torch.float32):
    """Multinomial logistic regression, mean cross-entropy + l2/2 ||W||^2 (bias free) -> a
    function from features to class probabilities. Full-batch L-BFGS, not SGD: a few hundred
    rows are one batch, it converges in tens of steps with no learning rate to tune, and the
    problem is convex: from zeros, one answer, no seed. float32 by default: at benchmark size
    the features are the memory, and the optimum moves by less than the metrics' rounding
    (tests/test_eval.py checks it against float64)."""
    x = torch.as_tensor(x, dtype=dtype)
    y = torch.as_tensor(y)
    weight = torch.zeros(x.shape[1], n_classes, dtype=dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                  tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = weight.detach()
    bias = bias.detach()

    def predict(z):
        logits = torch.as_tensor(z, dtype=dtype) @ weight + bias
        return torch.softmax(logits.double(), 1).numpy()

    return predict


def logistic_probe(features, y, split, l2_grid=(10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5),
                   dtype=torch.float32):
    """Fit on train for each l2 (strongest first); keep the best on val by (AUROC, accuracy),
    ties going to the stronger penalty; report on test. No refit on train + val: val picked
    the penalty, and the model reported is the one that was picked."""
    train = split == "train"
    val = split == "val"
    test = split == "test"
    x = standardize(features, train)
    best = None
    for l2 in l2_grid:
        predict = fit_logistic(x[train], y[train], int(y.max()) + 1, l2, dtype=dtype)
        prob = predict(x[val])
        # (AUROC, accuracy) compared in order; no AUROC (one class in val) is -1, so accuracy
        # decides.
        score = [np.nan_to_num(CLASSIFICATION["auroc"](y[val], prob), nan=-1),
                 CLASSIFICATION["accuracy"](y[val], prob)]
        if best is None or score > best["score"]:  # strictly better: a tie keeps the stronger l2
            best = {"score": score, "l2": l2, "predict": predict}
    test_prob = best["predict"](x[test])
    results = with_ci(CLASSIFICATION, [y[test], test_prob])
    results["l2"] = best["l2"]
    results["test_prob"] = test_prob  # for macro averages over labels; not written out
    return results


def knn_probe(features, y, split, k=20, temperature=0.07, chunk_rows=1024):
    """DINO's weighted k-NN: cosine similarity of L2-normalised features; the k nearest train
    images vote for their class with weight exp(sim / T), the votes normalised into class
    probabilities. Nothing is fitted, so nothing is chosen on val: k = 20 and T = 0.07 are
    DINO's defaults (facebookresearch/dino, eval_knn.py). The test rows go chunk_rows at a
    time, as DINO's own loop does: memory chunk_rows x n_train, never n_test x n_train."""
    train = F.normalize(torch.as_tensor(features[split == "train"]).float(), dim=1)
    test = F.normalize(torch.as_tensor(features[split == "test"]).float(), dim=1)
    train_labels = torch.as_tensor(y[split == "train"])
    votes = torch.zeros(len(test), int(y.max()) + 1)
    for first in range(0, len(test), chunk_rows):
        similarity = test[first:first + chunk_rows] @ train.T  # (chunk, n_train)
        top = similarity.topk(min(k, len(train)), dim=1)  # (chunk, k)
        # exp(sim / T), normalised (as a softmax it cannot overflow)
        vote_weights = (top.values / temperature).softmax(1)
        votes[first:first + chunk_rows].scatter_add_(1, train_labels[top.indices], vote_weights)
    test_prob = votes.double().numpy()
    results = with_ci(CLASSIFICATION, [y[split == "test"], test_prob])
    results["test_prob"] = test_prob  # for macro averages over labels; not written out
    return results


def ridge_probe(features, target, split, alpha_grid=tuple(10.0 ** np.arange(-2, 6.5, 0.5))):
    """Ridge regression, min ||y - Xw||^2 + alpha ||w||^2, in closed form. One SVD of the
    train features X = U S V^T serves every alpha: w = V diag(s / (s^2 + alpha)) U^T y.
    alpha is chosen by mean squared error on val, ties going to the larger alpha."""
    train = split == "train"
    val = split == "val"
    test = split == "test"
    x = standardize(features, train)
    offset = target[train].mean()  # the intercept: centred, not penalised
    u, s, vt = np.linalg.svd(x[train], full_matrices=False)  # (n, r), (r,), (r, D)
    u_y = u.T @ (target[train] - offset)

    def predict(alpha, rows):
        w = vt.T @ (s / (s ** 2 + alpha) * u_y)
        return x[rows] @ w + offset

    def val_error(alpha):
        return np.mean((predict(alpha, val) - target[val]) ** 2)

    alpha = min(reversed(alpha_grid), key=val_error)  # min keeps the first: the largest alpha
    results = with_ci(REGRESSION, [target[test], predict(alpha, test)])
    results["alpha"] = float(alpha)
    return results


def tokens_to_grid(tokens):
    """Patch tokens (B, N, C), any float array -> float32 tensor (B, C, g, g) for a conv."""
    tokens = torch.as_tensor(np.asarray(tokens)).float()
    grid = math.isqrt(tokens.shape[1])
    return tokens.transpose(1, 2).reshape(len(tokens), -1, grid, grid)  # (B, N, C) -> (B, C, g, g)


def train_seg_head(patch, masks, steps=2000, batch_size=16, lr=3e-2, seed=0):
    """The linear segmentation probe, frozen patch tokens (m, N, C) -> (B, 1, S, S) logits:
    BatchNorm, a 1x1 conv, bilinear upsampling to the masks' size (DINOv2's "linear"
    segmentation head, dinov2/eval/segmentation). Adam on per-pixel BCE against (m, S, S)
    bool masks, 2,000 steps of 16 images, the lr decayed to 0 on a cosine. The probe has to
    converge, or its Dice is the luck of where its last step left it. Measured on the
    phantoms (README, "Short runs"): at these values the seed moves Dice by +-0.003 and
    4,000 steps add < 0.003; at a constant lr, 300 steps moved it by +-0.03, as much as
    pretraining does. The large lr is safe for one linear layer behind BatchNorm. The loss
    is taken at mask resolution, where the head will be judged. patch and masks may be
    memory-mapped: each step reads only its batch."""
    torch.manual_seed(seed)
    dim = patch.shape[2]
    head = nn.Sequential(
        nn.BatchNorm2d(dim),
        nn.Conv2d(dim, 1, kernel_size=1),
        nn.Upsample(size=masks.shape[-2:], mode="bilinear", align_corners=False))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(len(patch), (min(batch_size, len(patch)),)).numpy()
        logits = head(tokens_to_grid(patch[index]))[:, 0]
        target = torch.as_tensor(np.asarray(masks[index])).float()
        loss = F.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()  # BatchNorm's running statistics from here on


@torch.no_grad()
def predict_masks(head, patch, rows, batch_size=16):
    """The head's bool masks (B, S, S) of patch[rows], batch by batch."""
    for first in range(0, len(rows), batch_size):
        batch = patch[np.asarray(rows[first:first + batch_size])]
        yield (head(tokens_to_grid(batch))[:, 0] > 0).numpy()  # logit 0 = probability 1/2


def mask_file(rows, patch_rows, size, table, out_dir):
    """The masks of patch_rows at `size`, (m, S, S) bool, preprocessed once into a .npy beside
    the results, shared by every backbone and read back by the batch (NpyRows)."""
    parts = [str(Path(table).resolve()), Path(table).stat().st_mtime_ns, size, patch_rows]
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]
    file = Path(out_dir) / f"masks-{key}.npy"
    if not file.exists():
        tmp = Path(out_dir) / f"masks-{key}.tmp.npy"
        with npy_for_appending(tmp, (len(patch_rows), size, size), bool) as masks:
            for i in patch_rows:
                mask = data.preprocess(data.load_image(rows[i]["mask"]), size, mask=True)
                masks.write(np.ascontiguousarray(mask).tobytes())
        tmp.replace(file)
    return NpyRows(file)


def seg_probe(features, rows, split, size, png, masks):
    """Train the head on the train rows with a mask; per-image Dice and IoU on the test rows
    with a mask; a picture of four of them, truth in green and prediction in red (both:
    yellow). masks: mask_file's array, row k for features["patch"][k]."""
    mask_rows = [i for i, row in enumerate(rows) if row.get("mask")]  # masks' row k
    # The cache may hold more rows than seg reads (embed's --patch-grid): seg's, in order.
    slot = {row: k for k, row in enumerate(features["patch_rows"].tolist())}
    patch = RowSubset(features["patch"], [slot[i] for i in mask_rows])  # (m, N, C) float16
    train = [k for k, i in enumerate(mask_rows) if split[i] == "train"]
    test = [k for k, i in enumerate(mask_rows) if split[i] == "test"]
    if len(train) < 2 or not test:  # BatchNorm cannot train on one image
        raise ValueError(f"seg needs masks on 2+ train rows and 1+ test rows; "
                         f"found {len(train)} and {len(test)}")
    # The head sees train rows only: a view of them that reads the file batch by batch.
    head = train_seg_head(RowSubset(patch, train), RowSubset(masks, train))
    dice = []
    iou = []
    panels = []
    done = 0
    for pred in predict_masks(head, patch, test):
        true = np.asarray(masks[np.asarray(test[done:done + len(pred)])])
        batch_dice, batch_iou = dice_iou(pred, true)
        dice.append(batch_dice)
        iou.append(batch_iou)
        for j in range(min(len(pred), 4 - len(panels))):
            image = gray_rgb(load_batch([rows[mask_rows[test[done + j]]]], size)[0])
            overlay = np.stack([pred[j], true[j], 0 * pred[j]], -1)  # red, green
            panels.append(0.7 * image + 0.3 * overlay)
        done += len(pred)
    save_png(panels, png)
    # One resample for both metrics: Dice and IoU of the same draw of images.
    metrics = {"dice": lambda d, i: float(d.mean()), "iou": lambda d, i: float(i.mean())}
    results = with_ci(metrics, [np.concatenate(dice), np.concatenate(iou)])
    results["n"] = {"train": len(train), "test": len(test)}
    results["png"] = str(png)
    return results


class RowSubset:
    """rows of an array, indexed lazily: subset[index] reads array[rows[index]] and no more."""

    def __init__(self, array, rows):
        self.array = array
        self.rows = np.asarray(rows)
        self.shape = (len(self.rows), *array.shape[1:])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.array[self.rows[index]]


def gray_rgb(image):
    """A preprocessed (1, S, S) image, as the backbone saw it, back in [0, 1] as (S, S, 3)."""
    pixels = image[0].numpy() * data.STD + data.MEAN
    return np.repeat(np.clip(pixels, 0, 1)[..., None], 3, axis=2)


def save_png(panels, path):
    """(H, W, 3) panels in [0, 1], side by side 4 px apart, as one 8-bit PNG."""
    gap = np.ones((panels[0].shape[0], 4, 3))
    spaced = []
    for panel in panels:
        spaced += [panel, gap]
    strip = np.concatenate(spaced[:-1], axis=1)
    Image.fromarray((np.clip(strip, 0, 1) * 255).round().astype(np.uint8)).save(path)


@torch.inference_mode()
def pca_picture(model, rows, size, png):
    """DINOv2's figure (Oquab et al. 2023, figure 1): the first three principal components of
    the patch tokens of a few images, fitted on all of them at once so that a colour means
    the same in each, as RGB beside the image. A component's sign is arbitrary: colours may
    swap between backbones, the parts they draw may not."""
    images = load_batch(rows, size)
    device = next(model.parameters()).device
    patch = model.forward_features(images.to(device))["patch"].double().cpu()  # (B, N, D)
    grid = math.isqrt(patch.shape[1])
    flat = patch.flatten(0, 1)  # (B*N, D)
    flat = flat - flat.mean(0)
    axes = torch.linalg.svd(flat, full_matrices=False)[2][:3]  # rows of V^T: (3, D)
    components = flat @ axes.T  # (B*N, 3)
    low = components.min(0).values
    high = components.max(0).values
    rgb = (components - low) / (high - low).clamp_min(1e-12)  # each component in [0, 1]
    rgb = rgb.reshape(len(rows), grid, grid, 3).permute(0, 3, 1, 2)  # (B, 3, g, g)
    rgb = F.interpolate(rgb, size=(size, size), mode="nearest").permute(0, 2, 3, 1)  # (B, S, S, 3)
    panels = []
    for image, picture in zip(images, rgb.numpy()):  # the images decoded once, for both
        panels += [gray_rgb(image), picture]
    save_png(panels, png)
    return {"png": str(png)}

# ===== labels, splits, tasks =====


def encode_labels(rows, column, table):
    """A label column -> (class index per row, -1 where empty; the sorted class names).
    Sorted, so a binary column's positive class is the later value: '1' of 0/1, 'M' of F/M."""
    classes = sorted({row[column] for row in rows} - {None})
    if len(classes) < 2:
        raise ValueError(f"{table}: column '{column}' needs 2+ distinct values, has {classes}")
    index = [-1 if row[column] is None else classes.index(row[column]) for row in rows]
    return np.array(index), classes


def check_split(split, table, names, what):
    for name in names:
        if not (split == name).any():
            found = ", ".join(sorted(set(split.tolist()) - {""})) or "none"
            raise ValueError(f"{table}: {what} needs rows with split '{name}' in the 'split' "
                             f"column (found: {found})")


def on_labelled_rows(probe, features, target, keep, split, table, column):
    """Run a probe on the rows that have a target (keep); the others are counted, not hidden.
    k-NN has no hyper-parameter to choose, so it alone needs no val rows."""
    needed = ("train", "test") if probe is knn_probe else SPLITS
    check_split(split[keep], table, needed, f"column '{column}'")
    train_targets = target[keep & (split == "train")]
    if target.dtype.kind == "i" and len(np.unique(train_targets)) < 2:
        raise ValueError(f"{table}: column '{column}' has a single class in the train split")
    results = probe(features[keep], target[keep], split[keep])
    results["test_rows"] = np.flatnonzero(keep & (split == "test"))  # table rows, in order
    results["n"] = {s: int((keep & (split == s)).sum()) for s in SPLITS}
    results["dropped"] = int((~keep).sum())
    return results


def parse_age(row):
    """A plain number of years, else NaN: '', '?' and '>90' are dropped and counted."""
    text = row["age"] or ""
    if text.replace(".", "", 1).isdigit():
        return float(text)
    return np.nan


def explain_undefined(result, y_test, classes):
    """An AUROC or AUPRC of a test split holding one class is undefined, not 'nan': say so,
    and why, in the table and in results.json."""
    present = sorted(set(y_test.tolist()))
    if len(present) > 1:
        return
    if present:
        reason = f"undefined: test split has only class {classes[present[0]]}"
    else:
        reason = "undefined: test split has no labelled rows"
    for metric in result.values():
        if isinstance(metric, dict) and "value" in metric and not np.isfinite(metric["value"]):
            metric["undefined"] = reason


def macro_over_labels(per_label):
    """Mean AUROC and AUPRC over binary label columns, {"auroc", "auprc"} each with a bootstrap
    interval, on the test rows that have every label (so that one draw of rows serves every
    label). per_label: {column: (test rows, positive-class probability, is positive)}."""
    common = None
    for test_rows, _, _ in per_label.values():
        common = set(test_rows.tolist()) if common is None else common & set(test_rows.tolist())
    common = sorted(common)
    truth = []
    score = []
    for test_rows, prob, positive in per_label.values():
        where = {row: k for k, row in enumerate(test_rows.tolist())}
        picked = [where[row] for row in common]
        truth.append(positive[picked])
        score.append(prob[picked])
    truth = np.stack(truth, 1)  # (n, L)
    score = np.stack(score, 1)

    def macro(metric):
        def average(t, s):
            values = [metric(t[:, j], s[:, j]) for j in range(t.shape[1])]
            values = [v for v in values if np.isfinite(v)]  # a label with one class is skipped
            return float(np.mean(values)) if values else np.nan
        return average

    results = with_ci({"auroc": macro(auroc), "auprc": macro(auprc)}, [truth, score])
    results["labels"] = list(per_label)
    results["n_test"] = len(common)
    return results


def run_tasks(spec, features, rows, split, table, args, labels, masks):
    """Every asked-for probe on one backbone's features -> {"task/label": results}. Age and
    sex read the CLS token, as RAD-DINO's probes do; linear reads --features; k-NN the CLS
    token, as DINO does. Several binary --label columns add "task/macro"."""
    cls = features["cls"].numpy()
    chosen = chosen_features(features, args.features).numpy()
    safe_name = "".join(c if c.isalnum() or c in "-." else "_" for c in spec).strip("._")
    stem = Path(args.out).parent / safe_name
    results = {}
    for task in args.task:
        if task in ("linear", "knn"):
            probe = logistic_probe if task == "linear" else knn_probe
            x = chosen if task == "linear" else cls
            per_label = {}
            for column in args.label:
                y, classes = labels[column]
                result = on_labelled_rows(probe, x, y, y >= 0, split, table, column)
                test_rows = result.pop("test_rows")
                test_prob = result.pop("test_prob")
                explain_undefined(result, y[test_rows], classes)
                result["classes"] = classes
                results[f"{task}/{column}"] = result
                if len(classes) == 2:
                    per_label[column] = (test_rows, test_prob[:, 1], y[test_rows] == 1)
            if len(args.label) > 1 and len(per_label) == len(args.label):
                results[f"{task}/macro"] = macro_over_labels(per_label)
        elif task == "sex":
            y, classes = labels["sex"]
            result = on_labelled_rows(logistic_probe, cls, y, y >= 0, split, table, "sex")
            test_rows = result.pop("test_rows")
            result.pop("test_prob")
            explain_undefined(result, y[test_rows], classes)
            result["classes"] = classes
            results["sex"] = result
        elif task == "age":
            age = np.array([parse_age(row) for row in rows])
            keep = np.isfinite(age)
            result = on_labelled_rows(ridge_probe, cls, age, keep, split, table, "age")
            result.pop("test_rows")
            results["age"] = result
        elif task == "seg":
            png = f"{stem}-seg.png"
            results["seg"] = seg_probe(features, rows, split, args.size, png, masks)
        elif task in ("pca", "attention"):
            # Four test images: never seen by any probe, the same four for every backbone.
            test_rows = [row for row, s in zip(rows, split) if s == "test"][:4]
            model = load_model(spec).to(args.device)
            picture = pca_picture if task == "pca" else attention_picture
            results[task] = picture(model, test_rows, args.size, f"{stem}-{task}.png")
        elif task == "embed":
            results["embed"] = write_embeddings(spec, features, rows, args, f"{stem}-embed")
    return results


def chosen_features(features, spelling):
    """--features, e.g. "last4+avgpool": the named pooled features side by side, (n, sum of D).
    last4+avgpool is DINOv2's linear-probe input (dinov2/eval/linear.py,
    create_linear_input: the CLS of the last 4 blocks and the mean patch token)."""
    return torch.cat([features[part] for part in spelling.split("+")], 1)


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
        tensors["patch"] = torch.from_numpy(features["patch"][np.arange(len(rows))])
    preprocessing = (f"data.preprocess: shorter side to {args.size} (bicubic), centre crop "
                     f"{args.size}, x / 255, mean {data.MEAN}, std {data.STD}, one channel")
    metadata = {"rows": json.dumps([str(row["image"]) for row in rows]), "backbone": spec,
                "size": args.size, "features": args.features, "preprocessing": preprocessing,
                "seg_blocks": json.dumps(args.seg_blocks)}
    file = f"{stem}.safetensors"
    weights.write_safetensors(file, tensors, metadata)
    return {"file": file, "tensors": {k: list(v.shape) for k, v in tensors.items()}}


@torch.inference_mode()
def attention_picture(model, rows, size, png):
    """DINO's attention maps (Caron et al. 2021, figure 1): for each image, the image and then
    one panel per head of the last block, the CLS query's attention over the patches, each
    stretched to [0, 1] and shown in gray at the image's size."""
    images = load_batch(rows, size)
    device = next(model.parameters()).device
    attention = model.last_cls_attention(images.to(device)).float().cpu()  # (B, H, N)
    grid = math.isqrt(attention.shape[2])
    maps = attention.reshape(len(rows), -1, grid, grid)  # (B, H, g, g)
    low = maps.amin((2, 3), keepdim=True)
    high = maps.amax((2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    maps = F.interpolate(maps, size=(size, size), mode="nearest")  # (B, H, S, S)
    panels = []
    for image, heads in zip(images, maps.numpy()):
        panels.append(gray_rgb(image))
        panels += [np.repeat(head[..., None], 3, axis=2) for head in heads]
    save_png(panels, png)
    return {"png": str(png), "heads": int(maps.shape[1])}

# ===== the command line =====


def format_metric(metric):
    if metric.get("undefined"):
        return metric["undefined"]
    value = metric["value"]
    low = metric["ci"][0]
    high = metric["ci"][1]
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def print_table(results):
    """Backbones side by side, one column each; a line per task and metric: value [95% CI]."""
    lines = {}
    for spec, tasks in results.items():
        for task, entries in tasks.items():
            for name, metric in entries.items():
                if isinstance(metric, dict) and "value" in metric:  # a metric, not a count
                    lines.setdefault((task, name), {})[spec] = format_metric(metric)
    header = {spec: spec for spec in results}
    table = [(("task", "metric"), header), *lines.items()]
    # Every column as wide as its longest entry, two spaces apart: a long task name
    # ("linear/pneumonia") or reason never runs into its neighbour.
    task_width = max(len(task) for (task, _), _ in table)
    name_width = max(len(name) for (_, name), _ in table)
    widths = {spec: max(len(cells.get(spec, "-")) for _, cells in table) for spec in results}
    for (task, name), cells in table:
        values = "".join(f"  {cells.get(spec, '-'):>{widths[spec]}}" for spec in results)
        print(f"{task:<{task_width}}  {name:<{name_width}}{values}")


def update_model_card(folder, results, command, data_name="data"):
    """train.py's export folder has a model card (README.md): its "## Evaluation" section
    gets a "### <data>" part with these results and the command. A part for the same data
    is replaced; parts for other data sets stay."""
    card = Path(folder) / "README.md"
    lines = [f"### {data_name}", "", f"`{command}`", "", "| probe | metric | " +
             " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    rows = {}
    for spec, tasks in results.items():
        for task, entries in tasks.items():
            for name, metric in entries.items():
                if isinstance(metric, dict) and "value" in metric:
                    rows.setdefault((task, name), {})[spec] = format_metric(metric)
    for (task, name), cells in rows.items():
        values = " | ".join(cells.get(spec, "-") for spec in results)
        lines.append(f"| {task} | {name} | {values} |")
    part = "\n".join(lines) + "\n"
    text = card.read_text()
    start = text.find("\n## Evaluation\n")
    if start < 0:
        before = text.rstrip("\n") + "\n"
        parts = []
        rest = ""
    else:
        following = text.find("\n## ", start + 1)  # the next section, if any, stays
        rest = "" if following < 0 else "\n" + text[following + 1:]
        before = text[:start + 1]
        section = text[start + 1:] if following < 0 else text[start + 1:following + 1]
        # The parts a run wrote before, one per data set; anything else there goes.
        parts = ["### " + p.rstrip("\n") + "\n" for p in section.split("\n### ")[1:]]
        parts = [p for p in parts if not p.startswith(f"### {data_name}\n")]
    section = "\n".join(["## Evaluation\n", *parts, part])
    weights.atomic_write_text(card, before + "\n" + section + rest)
    return card


def newest_checkpoint(runs="runs"):
    """train.py's most recently written runs/*/checkpoint_*.pt (by mtime, not by name), or
    None."""
    checkpoints = Path(runs).glob("*/checkpoint_*.pt")
    return max(checkpoints, key=lambda p: p.stat().st_mtime, default=None)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", action="append",
                        help="a .pth, .safetensors, HF folder, train.py .pt, random:ARCH or "
                             "random:PATH (PATH's architecture, random weights); repeatable "
                             "(default: the newest train.py checkpoint and random:it)")
    parser.add_argument("--data", help="a folder with labels.csv, or the csv "
                                       "(default: phantoms in data/synthetic)")
    parser.add_argument("--task", nargs="+", default=["all"], choices=[*TASKS, *EXPORTS, "all"],
                        help="all: every probe and picture; embed (by name only) writes the "
                             "features of every row to a safetensors file")
    parser.add_argument("--label", nargs="+", default=["finding"],
                        help="label columns for linear and knn")
    parser.add_argument("--features", default="cls",
                        help="what linear and embed read: parts of cls, avgpool, last4 joined "
                             "by +; last4+avgpool is DINOv2's linear probe")
    parser.add_argument("--patch-grid", action="store_true",
                        help="embed: also write every row's patch tokens (n x N x D)")
    parser.add_argument("--size", type=int,
                        help="preprocess size (default: the first trained backbone's img_size, "
                             "else 224; the released RAD-DINO used 518)")
    parser.add_argument("--out", default="runs/eval/results.json",
                        help="results; features and pictures go beside it")
    parser.add_argument("--seg-blocks", type=int, nargs="+",
                        help="0-based blocks whose patch tokens the seg probe reads, side by "
                             "side (default: the last)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: CUDA when present (bf16 autocast), else CPU")
    parser.add_argument("--workers", type=int, default=min(8, (os.cpu_count() or 1) - 1),
                        help="processes decoding and preprocessing images (default: cores - 1, "
                             "at most 8)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    args = parser.parse_args(argv)
    unknown = [part for part in args.features.split("+") if part not in POOLED]
    if unknown:
        parser.error(f"--features {args.features}: unknown part '{unknown[0]}' "
                     f"(parts: {', '.join(POOLED)}, joined by +)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None):
    args = parse_args(argv)
    synthetic = False
    # No arguments: the phantoms, and the random baseline against train.py's newest checkpoint.
    if args.data is None:
        args.data = "data/synthetic"
        synthetic = True
        if not Path(args.data, "labels.csv").exists():
            # make_phantoms' default: 2,000 images, config.yaml's data.synthetic_images; ~10 s
            phantoms.make_phantoms(args.data)
    if not args.backbone:
        # Like for like: the checkpoint against a random network of its architecture and size.
        newest = newest_checkpoint()
        args.backbone = ["random:vit_small"]
        if newest:
            args.backbone = [str(newest), f"random:{newest}"]
        print(f"newest train.py checkpoint: {newest or 'none in runs/*/'}")
    sizes = {spec: backbone_args(spec)["img_size"] for spec in args.backbone}
    if args.size is None:
        # train.py builds its model at the global crop size: the size its features know.
        trained = [spec for spec in args.backbone if not spec.startswith("random:")]
        args.size = sizes[trained[0]] if trained else 224
        source = f"the img_size of {trained[0]}" if trained else "no trained backbone: default"
        print(f"size: {args.size} px ({source})")
    for spec, img_size in sizes.items():
        print(f"  {spec}: stored grid {img_size} px, evaluated at {args.size} px")
    explicit = "all" not in args.task
    if explicit:
        args.task = list(dict.fromkeys(args.task))
    else:  # all, and any export named beside it
        args.task = list(TASKS) + [task for task in EXPORTS if task in args.task]
    wants_labels = bool({"linear", "knn"} & set(args.task))
    # Check the table before computing a single feature: a typo should cost a second, not an
    # hour.
    table = Path(args.data)
    if table.is_dir():
        table = table / "labels.csv"
    required = ["split"]
    if wants_labels:
        required += args.label
    rows = data.read_table(args.data, require=required)
    split = np.array([row["split"] or "" for row in rows])
    needed_splits = ["train", "test"]
    if {"linear", "sex", "age"} & set(args.task):
        needed_splits.append("val")
    check_split(split, table, needed_splits, "eval")
    for task, column in (("sex", "sex"), ("age", "age"), ("seg", "mask")):
        if task in args.task and not any(row.get(column) for row in rows):
            if explicit:
                raise ValueError(f"{table}: task '{task}' needs a '{column}' column with values")
            args.task.remove(task)  # under "all", a table without the column skips the task
            print(f"skipping {task}: {table} has no '{column}' values")
    columns = []
    if {"linear", "knn"} & set(args.task):
        columns += args.label
    if "sex" in args.task:
        columns.append("sex")
    labels = {column: encode_labels(rows, column, table) for column in columns}
    words = ["python", "eval.py"]
    for spec in args.backbone:
        words += ["--backbone", spec]
    words += ["--data", args.data, "--task", *args.task, "--label", *args.label]
    words += ["--features", args.features, "--size", str(args.size), "--out", args.out]
    if args.seg_blocks:
        words += ["--seg-blocks", *map(str, args.seg_blocks)]
    if args.patch_grid:
        words.append("--patch-grid")
    command = shlex.join(words)
    note = "   (data: synthetic phantoms)" if synthetic else ""
    print(f"running: {command}{note}")
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    # Patch tokens are cached for the rows that need them: seg's (those with a mask), or every
    # row for embed's --patch-grid.
    patch_rows = []
    masks = None
    if "seg" in args.task:
        mask_rows = [i for i, row in enumerate(rows) if row.get("mask")]
        patch_rows = mask_rows
        masks = mask_file(rows, mask_rows, args.size, table, out_dir)
    if "embed" in args.task and args.patch_grid:
        patch_rows = list(range(len(rows)))
    features = {}
    for spec in args.backbone:
        features[spec] = get_features(spec, rows, table, args, patch_rows, out_dir)
    # The probes are thousands of tiny ops, for which OpenMP's thread hand-offs cost more than
    # the work itself: one L-BFGS step measured 0.4 ms on one thread, 67 ms on two busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    for spec in args.backbone:
        results[spec] = run_tasks(spec, features[spec], rows, split, table, args, labels, masks)
    torch.set_num_threads(threads)
    print_table(results)
    report = {"command": command, "data": str(args.data), "synthetic": synthetic,
              "size": args.size, "backbone_img_size": sizes, "features": args.features,
              "backbones": args.backbone, "device": args.device,
              "images_per_second": {spec: float(features[spec]["images_per_second"])
                                    for spec in args.backbone},
              "results": results}
    # NaN (an undefined metric) -> null, since JSON has no NaN
    text = json.dumps(report, indent=1)
    text = json.dumps(json.loads(text, parse_constant=lambda _: None), indent=1)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")
    for spec in args.backbone:
        if Path(spec).is_dir() and (Path(spec) / "README.md").is_file():
            card = update_model_card(spec, results, command, data_name=str(args.data))
            print(f"updated the model card {card}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # a bad table or path: its message only
        sys.exit(f"eval.py: {error}")
