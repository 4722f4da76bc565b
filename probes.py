"""Frozen-feature probes: arrays in, dicts out. No files, no model, no project imports.

The metrics (AUROC, AUPRC, accuracy, Dice / IoU, Pearson, MAE, R^2) with percentile bootstrap
intervals, and the probes that read frozen features: multinomial logistic regression (DINOv2's
linear evaluation, dinov2/eval/linear.py), DINO's weighted k-NN (Caron et al. 2021, section
4.1; facebookresearch/dino, eval_knn.py), ridge regression, and a linear segmentation head on
patch tokens (DINOv2's "linear" head, dinov2/eval/segmentation). Every metric is written out
here (no sklearn); tests/test_eval.py checks each against a slow twin.

A probe fits on the rows whose `split` is "train", chooses its one hyper-parameter on "val"
and returns its predictions for "test"; scoring them is the caller's (eval.py scores one
split, or the pooled out-of-fold predictions of --folds). Copy this file whole: it needs
numpy and torch only.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    return {"test_prob": best["predict"](x[test]), "l2": best["l2"]}


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
    return {"test_prob": votes.double().numpy()}


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
    return {"test_pred": predict(alpha, test), "alpha": float(alpha)}


def tokens_to_grid(tokens):
    """Patch tokens (B, N, C), any float array -> float32 tensor (B, C, g, g) for a conv."""
    tokens = torch.as_tensor(np.asarray(tokens)).float()
    grid = math.isqrt(tokens.shape[1])
    return tokens.transpose(1, 2).reshape(len(tokens), -1, grid, grid)  # (B, N, C) -> (B, C, g, g)


def train_seg_head(patch, masks, rows=None, mask_rows=None, steps=2000, batch_size=16, lr=3e-2,
                   seed=0, max_tokens=2 ** 15):
    """The linear segmentation probe, frozen patch tokens (m, N, C) -> (B, 1, S, S) logits: one
    1x1 conv (a linear read-out of each token) and bilinear upsampling to the masks' size
    (DINOv2's "linear" segmentation head). Adam on per-pixel BCE against (m, S, S) bool masks,
    batches of 16 drawn from `rows` (default: all m) and the same images' `mask_rows` of masks
    (default: rows), the lr decayed to 0 on a cosine; the loss is taken at mask resolution.
    Two things make it converge and judge every backbone alike (docs/results.md, "The
    segmentation probe", measures each):
    - the tokens are whitened (ZCA) with the train tokens' mean and covariance, not
      BatchNorm'd. Patch tokens are correlated across channels (raw pixels; a random ViT's
      tokens, a random projection of them), which per-channel scaling leaves ill-conditioned:
      2,000 Adam steps stopped short of the optimum. Whitened, they reach it.
    - the mask is the logits above the cut that maximises mean Dice on the train images, not
      logit 0. BCE's p > 1/2 maximises pixel accuracy; a weak read-out of a mask that covers
      a fifth of the image rarely reaches 1/2, and drew a sliver of it.
    The returned head folds both into its conv (predict_masks still cuts at logit 0); the
    whitening is a fixed linear map, so the head stays one linear read-out per token.
    tests/test_eval.py checks that two seeds end at the same head. patch and masks may be
    memory maps: each step reads only its batch's rows, and the statistics at most
    max_tokens tokens, in chunks."""
    rows = np.arange(len(patch)) if rows is None else np.asarray(rows)
    mask_rows = rows if mask_rows is None else np.asarray(mask_rows)
    torch.manual_seed(seed)
    count = patch.shape[1]
    dim = patch.shape[2]
    # Mean and covariance of the train tokens, from evenly spaced rows (no draw: seed-free).
    spaced = np.linspace(0, len(rows) - 1, max(1, max_tokens // count)).astype(int)
    sample = rows[np.unique(spaced)]
    total = np.zeros(dim)
    outer = np.zeros((dim, dim))
    n = 0
    for first in range(0, len(sample), 64):
        x = np.asarray(patch[sample[first:first + 64]], np.float64).reshape(-1, dim)  # (B*N, C)
        total += x.sum(0)
        outer += x.T @ x
        n += len(x)
    mean = total / n
    value, vector = np.linalg.eigh(outer / n - np.outer(mean, mean))
    value = np.maximum(value, 0) + 1e-3 * value.mean() + 1e-12  # floor the flat directions
    white = torch.tensor((vector / np.sqrt(value)) @ vector.T, dtype=torch.float32)  # ZCA
    shift = torch.tensor(mean, dtype=torch.float32)
    conv = nn.Conv2d(dim, 1, kernel_size=1)
    upsample = nn.Upsample(size=masks.shape[-2:], mode="bilinear", align_corners=False)

    def logits(batch):  # (B, N, C) tokens -> (B, S, S) logits
        grid = tokens_to_grid(batch)
        grid = torch.einsum("dc,bchw->bdhw", white, grid - shift[:, None, None])
        return upsample(conv(grid))[:, 0]

    optimizer = torch.optim.Adam(conv.parameters(), lr=lr)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        draw = torch.randint(len(rows), (min(batch_size, len(rows)),)).numpy()
        target = torch.as_tensor(np.asarray(masks[mask_rows[draw]])).float()
        loss = F.binary_cross_entropy_with_logits(logits(patch[rows[draw]]), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The Dice-best cut on the train images: per-image Dice (as dice_iou) at each of the cuts,
    # from per-image histograms of the logits over the cuts' bins.
    cuts = torch.linspace(-4, 4, 161)  # logits; p = 0.018 ... 0.982
    dice = torch.zeros(len(cuts))
    with torch.no_grad():
        for first in range(0, len(rows), 64):
            z = logits(patch[rows[first:first + 64]]).flatten(1)  # (B, S*S)
            true = torch.as_tensor(np.asarray(masks[mask_rows[first:first + 64]])).flatten(1)
            # bin k > j  <=>  z > cuts[j]; one histogram row per image
            bins = torch.bucketize(z, cuts) + (len(cuts) + 1) * torch.arange(len(z))[:, None]
            shape = (len(z), len(cuts) + 1)
            every = torch.bincount(bins.flatten(), minlength=shape[0] * shape[1]).view(shape)
            inside = torch.bincount(bins.flatten(), true.flatten().double(),
                                    shape[0] * shape[1]).view(shape)
            pred = every.flip(1).cumsum(1).flip(1)[:, 1:]  # (B, T): pixels above each cut
            both = inside.flip(1).cumsum(1).flip(1)[:, 1:]
            size = pred + true.sum(1, keepdim=True)
            dice += torch.where(size > 0, 2 * both / size.clamp(min=1), 1.0).sum(0).float()
        # A soft argmax (cuts within ~0.005 of the best mean Dice share the vote): where Dice
        # is flat near its top, a hard argmax jumps between seeds; this moves smoothly.
        cut = (torch.softmax(dice / len(rows) / 0.005, 0) * cuts).sum()
        # Fold whitening and cut into the conv: logit = w . W (x - mean) + b - cut.
        head = nn.Sequential(nn.Conv2d(dim, 1, kernel_size=1), upsample)
        weight = conv.weight[:, :, 0, 0] @ white  # (1, C)
        head[0].weight.copy_(weight[:, :, None, None])
        head[0].bias.copy_(conv.bias - weight @ shift - cut)
    return head.eval()


@torch.no_grad()
def predict_masks(head, patch, rows, batch_size=16):
    """The head's bool masks (B, S, S) of patch[rows], batch by batch."""
    for first in range(0, len(rows), batch_size):
        batch = patch[np.asarray(rows[first:first + batch_size])]
        yield (head(tokens_to_grid(batch))[:, 0] > 0).numpy()  # logit 0 = probability 1/2


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
