"""Frozen-feature probes of a RAD-DINO / DINOv2 backbone on a table of chest X-rays.

The encoder never trains here. Each backbone sees every image once (data.preprocess: the
rad-dino processor on one channel), the features are cached beside the results, and small
probes are fitted on them: logistic regression and k-NN for labels, ridge for age, a linear
segmentation head for lung masks, and DINOv2's PCA picture. Protocols: REFERENCE.md,
"Evaluation protocols". The table's `split` column rules: fit on train, choose on val, report
on test, with bootstrap 95% intervals, because a test set of 85 images deserves them.

    python eval.py       # synthetic phantoms; random ViT-S against train.py's newest checkpoint
    python eval.py --backbone random:vit_small --data ../shared/data/covid-cxr --label covid

Every metric is written out here (no sklearn); tests/test_eval.py checks each against a slow twin.
"""
import argparse
import hashlib
import json
import math
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

TASKS = ("linear", "knn", "seg", "age", "sex", "pca")
SPLITS = ("train", "val", "test")
FEATURE_VERSION = 1  # part of the cache key: bump it when extract_features changes

# ===== metrics =====

def average_ranks(x):
    """1-based ranks, ties sharing the mean of the ranks they span: [5, 7, 7, 9] -> [1, 2.5, 2.5, 4]."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)  # tie groups, sorted
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 0-based places first..first+c-1: mean rank first+(c+1)/2
    return ranks


def auroc(positive, score):
    """P(a random positive outscores a random negative), a tie counting 1/2: the Mann-Whitney U from
    rank sums, O(n log n) rather than every pair. NaN unless both classes are present."""
    positive, score = np.asarray(positive, bool), np.asarray(score, float)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return np.nan
    # The positives' rank sum, less its least possible value, counts the (positive, negative) pairs in order.
    return float((average_ranks(score)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(positive, score):
    """Average precision: the sum over thresholds of (gain in recall) x precision, a threshold at each distinct
    score, tied samples entering together (as sklearn's average_precision_score). Not the trapezoid under
    the PR curve, which is optimistic where precision jumps."""
    positive, score = np.asarray(positive, bool), np.asarray(score, float)
    if not positive.any() or positive.all():
        return np.nan  # undefined without positives, trivially 1 without negatives: keep both out of means
    order = np.argsort(-score, kind="stable")  # best score first
    last_of_tie = np.r_[score[order][1:] != score[order][:-1], True]  # thresholds fall between distinct scores
    true_pos, false_pos = np.cumsum(positive[order])[last_of_tie], np.cumsum(~positive[order])[last_of_tie]
    recall = true_pos / positive.sum()
    return float(np.sum(np.diff(recall, prepend=0) * true_pos / (true_pos + false_pos)))


def one_vs_rest(metric):
    """A binary metric on class probabilities (n, C): class 1's column when C = 2, else the mean over the
    classes that have positives and negatives here. A class missing from a small test set has no AUROC,
    and counting it as 0.5 would drag every backbone towards chance alike."""
    def macro(y, prob):
        if prob.shape[1] == 2:
            return metric(y == 1, prob[:, 1])
        values = [v for c in range(prob.shape[1]) if np.isfinite(v := metric(y == c, prob[:, c]))]
        return float(np.mean(values)) if values else np.nan
    return macro


CLASSIFICATION = {"auroc": one_vs_rest(auroc), "auprc": one_vs_rest(auprc),
                  "accuracy": lambda y, prob: float(np.mean(prob.argmax(1) == y))}


def dice_iou(pred, true):
    """Per-image Dice 2|P & T| / (|P| + |T|) and IoU |P & T| / |P | T| of bool (B, H, W) masks.
    Two empty masks score 1: nothing to find, nothing found."""
    inter, total = (pred & true).sum((1, 2)), pred.sum((1, 2)) + true.sum((1, 2))  # union = total - inter
    return (np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0),
            np.where(total > inter, inter / np.maximum(total - inter, 1), 1.0))


def pearson(a, b):  # NaN for a constant input, where correlation means nothing
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b))) if (a @ a) * (b @ b) > 0 else np.nan


REGRESSION = {"mae": lambda y, pred: float(np.mean(np.abs(y - pred))), "pearson": pearson,  # R^2 < 0: worse
              "r2": lambda y, pred: float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))}  # than the mean


def with_ci(metrics, arrays, n_resamples=1000, seed=0):
    """{name: {"value", "ci": [2.5%, 97.5%]}} for metrics {name: fn(*arrays)}: a percentile bootstrap
    over the test rows, fixed seed, so a rerun prints the same interval. Resamples where a metric is
    undefined (one class drawn) are left out of that metric's interval."""
    rng, n, draws = np.random.default_rng(seed), len(arrays[0]), {name: [] for name in metrics}
    for _ in range(n_resamples):
        index = rng.integers(0, n, n)  # n rows drawn with replacement, the same draw for every metric
        for name, fn in metrics.items():
            draws[name].append(fn(*(a[index] for a in arrays)))
    finite = {name: np.array(d)[np.isfinite(d)] for name, d in draws.items()}
    return {name: {"value": fn(*arrays), "ci": np.percentile(finite[name], [2.5, 97.5]).tolist()
                   if len(finite[name]) else [np.nan, np.nan]} for name, fn in metrics.items()}

# ===== backbones and their features =====

def load_model(spec):
    """A frozen one-channel ViT. `random:ARCH` is the untrained baseline, seed 0, so every run compares
    against the same network (and its cache stays valid); anything else goes to load_backbone, whose
    in_chans=1 folds 3-channel weights exactly (preprocess hands out one channel)."""
    if spec.startswith("random:"):
        torch.manual_seed(0)
        return raddino.build_vit(spec.split(":", 1)[1], in_chans=1, patch_size=14).eval()
    return weights.load_backbone(spec, in_chans=1)


def cache_key(spec, table, size):
    """Features depend on the weights, the table and the size. Sizes and mtimes stand in for the
    weights' bytes (hashing 350 MB every run costs more than it saves). Images edited behind an
    unchanged labels.csv go unnoticed: delete the features-*.pt files then."""
    parts = [spec, size, FEATURE_VERSION]
    for path in ([] if spec.startswith("random:") else [Path(spec)]) + [Path(table)]:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:  # a HF folder: every file in it
            parts += [str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


@torch.inference_mode()
def extract_features(model, rows, size, patch_rows=(), batch_size=32, name=""):
    """One pass over the table -> {"cls" (n, D), "avgpool" (n, D) mean patch token, "last4" (n, 4D) the CLS
    of the last 4 blocks}, plus "patch" (m, N, D) for the m rows in patch_rows, in float16: half the disk,
    and a linear head does not need the digits. All from one get_intermediate_layers(x, 4), whose last
    entry is exactly forward_features'."""
    keep, out, start = set(patch_rows), {"cls": [], "avgpool": [], "last4": [], "patch": []}, time.time()
    for first in range(0, len(rows), batch_size):
        batch = rows[first:first + batch_size]
        images = torch.stack([data.preprocess(data.load_image(row["image"]), size) for row in batch])  # (B, 1, S, S)
        layers = model.get_intermediate_layers(images, 4)  # 4 x (patch (B, N, D), cls (B, D)), oldest first
        patch, cls = layers[-1]
        out["cls"].append(cls)
        out["avgpool"].append(patch.mean(1))  # (B, N, D) -> (B, D)
        out["last4"].append(torch.cat([c for _, c in layers], dim=1))  # 4 x (B, D) -> (B, 4D), as DINOv2's linear eval
        out["patch"] += [patch[i:i + 1].half() for i in range(len(batch)) if first + i in keep]  # (1, N, D) each
        done = first + len(batch)  # one line, rewritten in place: images/s says how long the rest will take
        print(f"\r  {name}: {done}/{len(rows)} images, {done / (time.time() - start):.1f} images/s",
              end="\n" if done == len(rows) else "", flush=True)
    return {**{k: torch.cat(v) for k, v in out.items() if v}, "patch_rows": torch.tensor(sorted(keep))}


def get_features(spec, rows, table, size, need_patch, out_dir):
    """extract_features, cached in out_dir. A cache without patch tokens is redone if seg wants them."""
    file = Path(out_dir) / f"features-{cache_key(spec, table, size)}.pt"
    if file.exists() and ("patch" in (features := torch.load(file, weights_only=True)) or not need_patch):
        print(f"{spec}: features from the cache {file}")
        return features
    patch_rows = [i for i, row in enumerate(rows) if row.get("mask")] if need_patch else []  # seg reads no others
    features = extract_features(load_model(spec), rows, size, patch_rows, name=spec)
    torch.save(features, file.with_suffix(".tmp"))
    file.with_suffix(".tmp").replace(file)  # atomic: an interrupted run leaves no half-written cache
    return features

# ===== probes =====

def standardize(x, train):
    """Features in units of the train split's std, so that one L2 penalty weighs every direction alike. A
    random ViT's CLS hardly moves between images (std ~1e-5: LayerScale 1e-5 keeps its blocks near
    identity), so tiny stds are scaled up, never floored."""
    x = np.asarray(x, np.float64)
    std = x[train].std(0)
    return (x - x[train].mean(0)) / np.where(std > 0, std, 1)


def fit_logistic(x, y, n_classes, l2, max_iter=200):
    """Multinomial logistic regression, mean cross-entropy + l2/2 ||W||^2 (bias free) -> a function from
    features to class probabilities. Full-batch L-BFGS, not SGD: a few hundred rows are one batch, it converges
    in tens of steps with no learning rate to tune, and the problem is convex: from zeros, one answer, no seed."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return lambda z: torch.softmax(torch.as_tensor(z, dtype=torch.float64) @ weight.detach() + bias.detach(), 1).numpy()


def logistic_probe(features, y, split, l2_grid=(10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5)):
    """Fit on train for each l2 (strongest first); keep the best on val by (AUROC, accuracy), ties going to
    the stronger penalty; report on test. No refit on train + val: val picked the penalty, and the model
    reported is the one that was picked."""
    train, val, test = (split == s for s in SPLITS)
    x, best = standardize(features, train), None
    for l2 in l2_grid:
        predict = fit_logistic(x[train], y[train], int(y.max()) + 1, l2)
        # (AUROC, accuracy) compared in order; no AUROC (one class in val) is -1, so accuracy decides.
        score = [np.nan_to_num(CLASSIFICATION[m](y[val], predict(x[val])), nan=-1) for m in ("auroc", "accuracy")]
        if best is None or score > best[0]:  # strictly better: a tie keeps the stronger penalty
            best = (score, l2, predict)
    return {**with_ci(CLASSIFICATION, [y[test], best[2](x[test])]), "l2": best[1]}


def knn_probe(features, y, split, k=20, temperature=0.07):
    """DINO's weighted k-NN: cosine similarity of L2-normalised features; the k nearest train images vote
    for their class with weight exp(sim / T), the votes normalised into class probabilities. Nothing is
    fitted, so nothing is chosen on val: k and T are DINO's defaults."""
    train, test = (F.normalize(torch.as_tensor(features[split == s]).float(), dim=1) for s in ("train", "test"))
    top, index = (test @ train.T).topk(min(k, len(train)), dim=1)  # (n_test, n_train) -> (n_test, k)
    weights = (top / temperature).softmax(1)  # exp(sim / T), normalised (the softmax cannot overflow)
    votes = torch.zeros(len(test), int(y.max()) + 1).scatter_add_(1, torch.as_tensor(y[split == "train"])[index], weights)
    return with_ci(CLASSIFICATION, [y[split == "test"], votes.double().numpy()])


def ridge_probe(features, target, split, alpha_grid=tuple(10.0 ** np.arange(-2, 6.5, 0.5))):
    """Ridge regression, min ||y - Xw||^2 + alpha ||w||^2, in closed form. One SVD of the train
    features X = U S V^T serves every alpha: w = V diag(s / (s^2 + alpha)) U^T y. alpha is chosen
    by mean squared error on val, ties going to the larger alpha."""
    train, val, test = (split == s for s in SPLITS)
    x, offset = standardize(features, train), target[train].mean()  # the intercept: centred, not penalised
    u, s, vt = np.linalg.svd(x[train], full_matrices=False)  # (n, r), (r,), (r, D)
    u_y = u.T @ (target[train] - offset)
    predict = lambda alpha, rows: x[rows] @ (vt.T @ (s / (s ** 2 + alpha) * u_y)) + offset
    alpha = min(reversed(alpha_grid), key=lambda a: np.mean((predict(a, val) - target[val]) ** 2))
    return {**with_ci(REGRESSION, [target[test], predict(alpha, test)]), "alpha": float(alpha)}


def train_seg_head(patch, masks, steps=300, batch_size=16, lr=1e-2, seed=0):
    """The linear segmentation probe, (B, D, g, g) frozen patch tokens -> (B, 1, S, S) logits: BatchNorm, a
    1x1 conv, bilinear upsampling to the masks' size. Adam on per-pixel BCE against (B, S, S) bool masks, 300
    steps of 16 images: 13 s on covid-cxr (32 doubled that for +0.004 Dice). The large lr is safe for one
    linear layer behind BatchNorm; the loss is taken at mask resolution, where the head will be judged."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm2d(patch.shape[1]), nn.Conv2d(patch.shape[1], 1, kernel_size=1),
                         nn.Upsample(size=masks.shape[-2:], mode="bilinear", align_corners=False))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(len(patch), (min(batch_size, len(patch)),))
        loss = F.binary_cross_entropy_with_logits(head(patch[index])[:, 0], masks[index].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()  # BatchNorm's running statistics from here on


def seg_probe(features, rows, split, size, png):
    """Train the head on the train rows with a mask; per-image Dice and IoU on the test rows with a
    mask; a picture of four of them, truth in green and prediction in red (both: yellow)."""
    patch_rows, grid = features["patch_rows"].tolist(), math.isqrt(features["patch"].shape[1])
    patch = features["patch"].float().transpose(1, 2).reshape(len(patch_rows), -1, grid, grid)  # (m, N, D) -> (m, D, g, g)
    masks = torch.from_numpy(np.stack([data.preprocess(data.load_image(rows[i]["mask"]), size, mask=True) for i in patch_rows]))
    train, test = ([j for j, i in enumerate(patch_rows) if split[i] == s] for s in ("train", "test"))
    if len(train) < 2 or not test:  # BatchNorm cannot train on one image
        raise ValueError(f"seg needs masks on 2+ train rows and 1+ test rows; found {len(train)} and {len(test)}")
    head = train_seg_head(patch[train], masks[train])
    pred = (head(patch[test])[:, 0] > 0).numpy()  # logit 0 = probability 1/2
    dice, iou = dice_iou(pred, masks[test].numpy())
    save_png([0.7 * gray_rgb(data.preprocess(data.load_image(rows[patch_rows[j]]["image"]), size)) + 0.3 * np.stack([p, masks[j].numpy(), 0 * p], -1)
              for j, p in zip(test[:4], pred)], png)  # red = prediction, green = truth
    metrics = {"dice": lambda d, i: float(d.mean()), "iou": lambda d, i: float(i.mean())}  # one resample for both
    return {**with_ci(metrics, [dice, iou]), "n": {"train": len(train), "test": len(test)}, "png": str(png)}


def gray_rgb(image):
    """A preprocessed (1, S, S) image, as the backbone saw it, back in [0, 1] as (S, S, 3)."""
    pixels = image[0].numpy() * data.STD + data.MEAN
    return np.repeat(np.clip(pixels, 0, 1)[..., None], 3, axis=2)


def save_png(panels, path):
    """(H, W, 3) panels in [0, 1], side by side 4 px apart, as one 8-bit PNG."""
    gap = np.ones((panels[0].shape[0], 4, 3))
    strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    Image.fromarray((np.clip(strip, 0, 1) * 255).round().astype(np.uint8)).save(path)


@torch.inference_mode()
def pca_picture(model, rows, size, png):
    """DINOv2's figure: the first three principal components of the patch tokens of a few images,
    fitted on all of them at once so that a colour means the same in each, as RGB beside the image.
    A component's sign is arbitrary: colours may swap between backbones, the parts they draw may not."""
    images = torch.stack([data.preprocess(data.load_image(row["image"]), size) for row in rows])
    patch = model.forward_features(images)["patch"].double()  # (B, N, D)
    flat = patch.flatten(0, 1) - patch.flatten(0, 1).mean(0)  # (B*N, D), centred
    components = flat @ torch.linalg.svd(flat, full_matrices=False)[2][:3].T  # rows of V^T are the axes: (B*N, 3)
    low, high = components.min(0).values, components.max(0).values  # each component stretched to [0, 1]
    rgb = ((components - low) / (high - low).clamp_min(1e-12)).reshape(len(rows), *[math.isqrt(patch.shape[1])] * 2, 3)
    rgb = F.interpolate(rgb.permute(0, 3, 1, 2), size=(size, size), mode="nearest").permute(0, 2, 3, 1)  # (B, S, S, 3)
    save_png([p for image, picture in zip(images, rgb.numpy()) for p in (gray_rgb(image), picture)], png)  # decoded once
    return {"png": str(png)}

# ===== labels, splits, tasks =====

def encode_labels(rows, column, table):
    """A label column -> (class index per row, -1 where empty; the sorted class names). Sorted, so a
    binary column's positive class is the later value: '1' of 0/1, 'M' of F/M."""
    classes = sorted({row[column] for row in rows} - {None})
    if len(classes) < 2:
        raise ValueError(f"{table}: column '{column}' needs 2+ distinct values, has {classes}")
    return np.array([classes.index(row[column]) if row[column] is not None else -1 for row in rows]), classes


def check_split(split, table, names, what):
    for name in names:
        if not (split == name).any():
            raise ValueError(f"{table}: {what} needs rows with split '{name}' in the 'split' column "
                             f"(found: {', '.join(sorted(set(split.tolist()) - {''})) or 'none'})")


def on_labelled_rows(probe, features, target, keep, split, table, column):
    """Run a probe on the rows that have a target (keep); the others are counted, not hidden."""
    check_split(split[keep], table, SPLITS, f"column '{column}'")
    if target.dtype.kind == "i" and len(np.unique(target[keep & (split == "train")])) < 2:
        raise ValueError(f"{table}: column '{column}' has a single class in the train split")
    counts = {s: int((keep & (split == s)).sum()) for s in SPLITS}
    return {**probe(features[keep], target[keep], split[keep]), "n": counts, "dropped": int((~keep).sum())}


def run_tasks(spec, features, rows, split, table, args, labels):
    """Every asked-for probe on one backbone's features -> {"task/label": results}. Age and sex use
    the CLS token (REFERENCE.md); linear uses --features; k-NN the CLS token, as DINO does."""
    cls = features["cls"].numpy()
    chosen = torch.cat([features[k] for k in args.features.split("+")], 1).numpy()  # "cls+avgpool": (n, 2D)
    stem = Path(args.out).parent / "".join(c if c.isalnum() or c in "-." else "_" for c in spec).strip("._")
    results = {}
    for task in args.task:
        for column in args.label if task in ("linear", "knn") else ["sex"] if task == "sex" else []:
            probe, x = (knn_probe, cls) if task == "knn" else (logistic_probe, chosen if task == "linear" else cls)
            y, classes = labels[column]
            results[task if task == "sex" else f"{task}/{column}"] = {
                **on_labelled_rows(probe, x, y, y >= 0, split, table, column), "classes": classes}
        if task == "age":  # ages that are not plain numbers ('', '?', '>90') are dropped and counted
            age = np.array([float(r["age"]) if (r["age"] or "").replace(".", "", 1).isdigit() else np.nan for r in rows])
            results["age"] = on_labelled_rows(ridge_probe, cls, age, np.isfinite(age), split, table, "age")
        elif task == "seg":
            results["seg"] = seg_probe(features, rows, split, args.size, f"{stem}-seg.png")
        elif task == "pca":  # four test images: never seen by any probe, the same four for every backbone
            test_rows = [row for row, s in zip(rows, split) if s == "test"][:4]
            results["pca"] = pca_picture(load_model(spec), test_rows, args.size, f"{stem}-pca.png")
    return results

# ===== the command line =====

def print_table(results):
    """Backbones side by side, one column each; a line per task and metric: value [95% CI]."""
    lines = {}
    for spec, task, name, m in [(s, t, n, m) for s in results for t in results[s] for n, m in results[s][t].items()]:
        if isinstance(m, dict) and "value" in m:  # a metric, not a count or a path
            lines.setdefault((task, name), {})[spec] = f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"
    width = max([24] + [len(spec) + 2 for spec in results])
    for (task, name), cells in [(("task", "metric"), {spec: spec for spec in results}), *lines.items()]:  # header first
        print(f"{task:<16}{name:<10}" + "".join(f"{cells.get(spec, '-'):>{width}}" for spec in results))


def newest_checkpoint(runs="runs"):
    """train.py's most recently written runs/*/checkpoint_*.pt (by mtime, not by name), or None."""
    return max(Path(runs).glob("*/checkpoint_*.pt"), key=lambda p: p.stat().st_mtime, default=None)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", action="append", help="a .pth, .safetensors, HF folder, train.py .pt, or random:ARCH; repeatable")
    parser.add_argument("--data", help="a folder with labels.csv, or the csv (default: phantoms in data/synthetic)")
    parser.add_argument("--task", nargs="+", default=["all"], choices=[*TASKS, "all"])
    parser.add_argument("--label", nargs="+", default=["finding"], help="label columns for linear and knn")
    parser.add_argument("--features", default="cls", choices=["cls", "cls+avgpool", "last4"], help="what the linear probe sees")
    parser.add_argument("--size", type=int, default=224, help="preprocess size (the released RAD-DINO used 518)")
    parser.add_argument("--out", default="runs/eval/results.json", help="results; features and pictures go beside it")
    return parser.parse_args(argv)


def main(argv=None):
    args, synthetic = parse_args(argv), False
    # No arguments: the phantoms, and the random baseline against train.py's newest checkpoint.
    if args.data is None:
        args.data, synthetic = "data/synthetic", True
        if not Path(args.data, "labels.csv").exists():
            phantoms.make_phantoms(args.data, n=600, size=256)  # make_phantoms' default set, ~10 s to draw
    if not args.backbone:
        newest = newest_checkpoint()
        args.backbone = ["random:vit_small"] + ([str(newest)] if newest else [])
        print(f"newest train.py checkpoint: {newest or 'none in runs/*/'}")
    explicit, args.task = "all" not in args.task, list(TASKS) if "all" in args.task else list(dict.fromkeys(args.task))
    # Check the table before computing a single feature: a typo should cost a second, not an hour.
    table = Path(args.data, "labels.csv") if Path(args.data).is_dir() else Path(args.data)
    rows = data.read_table(args.data, require=("split", *(args.label if {"linear", "knn"} & set(args.task) else ())))
    split = np.array([row["split"] or "" for row in rows])
    check_split(split, table, ("train", "test") + (("val",) if {"linear", "sex", "age"} & set(args.task) else ()), "eval")
    for task, column in (("sex", "sex"), ("age", "age"), ("seg", "mask")):
        if task in args.task and not any(row.get(column) for row in rows):
            if explicit:
                raise ValueError(f"{table}: task '{task}' needs a '{column}' column with values")
            args.task.remove(task)  # under "all", a table without the column just skips the task
            print(f"skipping {task}: {table} has no '{column}' values")
    columns = (args.label if {"linear", "knn"} & set(args.task) else []) + (["sex"] if "sex" in args.task else [])
    labels = {column: encode_labels(rows, column, table) for column in columns}
    command = shlex.join(["python", "eval.py", *[a for b in args.backbone for a in ("--backbone", b)], "--data", args.data,
                          "--task", *args.task, "--label", *args.label, "--features", args.features,
                          "--size", str(args.size), "--out", args.out])
    print(f"running: {command}" + ("   (data: synthetic phantoms)" if synthetic else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    features = {spec: get_features(spec, rows, table, args.size, "seg" in args.task, Path(args.out).parent)
                for spec in args.backbone}
    # The probes are thousands of tiny ops, for which OpenMP's thread hand-offs cost more than the
    # work itself: one L-BFGS step measured 0.4 ms on one thread, 67 ms on two busy cores.
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    results = {spec: run_tasks(spec, features[spec], rows, split, table, args, labels) for spec in args.backbone}
    torch.set_num_threads(threads)
    print_table(results)
    report = {"command": command, "data": str(args.data), "synthetic": synthetic, "size": args.size,
              "features": args.features, "backbones": args.backbone, "results": results}
    text = json.dumps(report, indent=1)  # NaN (an undefined metric) -> null, since JSON has no NaN
    Path(args.out).write_text(json.dumps(json.loads(text, parse_constant=lambda _: None), indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # a bad table or path: its message, no traceback
        sys.exit(f"eval.py: {error}")
