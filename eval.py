"""Frozen-feature probes of a RAD-DINO / DINOv2 backbone on a table of chest X-rays.

The encoder never trains here. Each backbone sees every image once (data.preprocess: the
rad-dino processor on one channel), the features are cached beside the results, and the
probes of probes.py are fitted on them: logistic regression and k-NN for labels, ridge for
age, a linear segmentation head for lung masks; pictures.py draws DINOv2's PCA and DINO's
attention maps. The protocols are DINOv2's (Oquab et al. 2023, section 7), DINO's weighted
k-NN (Caron et al. 2021, section 4.1) and RAD-DINO's (Perez-Garcia et al. 2025, Nature
Machine Intelligence). The table's `split` column rules: fit on train, choose on val, report
on test, with bootstrap 95% intervals. `--folds K` replaces it by K folds of patients, for
tables whose test split is too small to say anything.

Every result is read against two controls: `random:X`, the same network at its random
initialisation, and `pixels`, a 14 x 14 thumbnail of the image itself. A backbone that does
not beat the thumbnail has learned nothing a probe could not read off the pixels.

    python eval.py       # phantoms: train.py's newest checkpoint, its random init, pixels
    python eval.py --backbone random:vit_small --data ../shared/data/covid-cxr --label covid
"""
import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

import data
import backbones
import phantoms
import pictures
import probes
import weights

TASKS = ("linear", "knn", "seg", "age", "sex", "pca", "attention")  # what "all" runs
EXPORTS = ("embed",)  # asked for by name only: it writes files, it measures nothing
POOLED = ("cls", "avgpool", "last4")  # the --features parts, all from one pass
SPLITS = ("train", "val", "test")

# ===== labels, splits and folds =====


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


def fold_splits(rows, folds, seed=0):
    """K split columns for --folds K: patients (the `patient` column; a row without one is its
    own patient) are shuffled with a fixed seed and dealt into K folds; in split k, fold k is
    test, fold k + 1 val and the rest train. No patient is ever on two sides, and every row
    is a test row exactly once."""
    patients = [row.get("patient") or f"row {i}" for i, row in enumerate(rows)]
    unique = sorted(set(patients))
    if len(unique) < folds:
        raise ValueError(f"--folds {folds}: only {len(unique)} patients")
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[j]: k % folds for k, j in enumerate(order)}
    fold = np.array([fold_of[p] for p in patients])
    splits = []
    for k in range(folds):
        split = np.full(len(rows), "train", dtype=object)
        split[fold == (k + 1) % folds] = "val"
        split[fold == k] = "test"
        splits.append(split.astype(str))
    return splits


def parse_age(row):
    """A plain number of years, else NaN: '', '?' and '>90' are dropped and counted."""
    text = row["age"] or ""
    if text.replace(".", "", 1).isdigit():
        return float(text)
    return np.nan


def out_of_fold(probe, features, target, keep, splits, table, column):
    """Run a probe on the rows that have a target (keep), once per split column (the table's,
    or --folds'), and gather its test predictions: every prediction comes from a probe that
    never saw that row. The rows without a target are counted, not hidden. k-NN has no
    hyper-parameter to choose, so it alone needs no val rows."""
    needed = ("train", "test") if probe is probes.knn_probe else SPLITS
    test_rows = []
    predictions = []
    chosen = []
    for split in splits:
        check_split(split[keep], table, needed, f"column '{column}'")
        if target.dtype.kind == "i" and len(np.unique(target[keep & (split == "train")])) < 2:
            raise ValueError(f"{table}: column '{column}' has a single class in the train split")
        fitted = probe(features[keep], target[keep], split[keep])
        test_rows.append(np.flatnonzero(keep & (split == "test")))
        predictions.append(fitted.pop("test_prob" if "test_prob" in fitted else "test_pred"))
        chosen.append(fitted)
    results = {"test_rows": np.concatenate(test_rows), "prediction": np.concatenate(predictions)}
    for name in chosen[0]:  # the probe's choice (l2, alpha): one value, or one per fold
        values = [c[name] for c in chosen]
        results[name] = values[0] if len(splits) == 1 else values
    if len(splits) == 1:
        results["n"] = {s: int((keep & (splits[0] == s)).sum()) for s in SPLITS}
    else:
        results["n"] = {"folds": len(splits), "test": len(results["test_rows"])}
    results["dropped"] = int((~keep).sum())
    return results


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

# ===== tasks =====


def classify(probe, x, label, splits, table, column):
    """A label column through a classification probe -> (results, (test rows, positive-class
    probability, is positive) for macro averages, or None for more than two classes)."""
    y, classes = label
    fitted = out_of_fold(probe, x, y, y >= 0, splits, table, column)
    test_rows = fitted.pop("test_rows")
    prob = fitted.pop("prediction")
    results = probes.with_ci(probes.CLASSIFICATION, [y[test_rows], prob])
    explain_undefined(results, y[test_rows], classes)
    results.update(fitted)
    results["classes"] = classes
    binary = None
    if len(classes) == 2:
        binary = (test_rows, prob[:, 1], y[test_rows] == 1)
    return results, binary


def seg_probe(features, rows, splits, size, png, masks, steps=2000):
    """Train the head on the train rows with a mask, per split column; per-image Dice and IoU
    on the test rows with a mask, pooled; a picture of four of them. masks: mask_file's
    array, row k for the table row features["patch_rows"][k]."""
    mask_rows = [i for i, row in enumerate(rows) if row.get("mask")]  # table rows
    # The cache may hold more rows than seg reads (embed's --patch-grid): seg's, in order.
    slot = {row: k for k, row in enumerate(features["patch_rows"].tolist())}
    patch_index = np.array([slot[i] for i in mask_rows])  # rows of features["patch"]
    mask_index = np.arange(len(mask_rows))  # rows of masks
    dice = []
    iou = []
    for split in splits:
        train = np.array([k for k, i in enumerate(mask_rows) if split[i] == "train"], int)
        test = np.array([k for k, i in enumerate(mask_rows) if split[i] == "test"], int)
        if len(train) < 2 or not len(test):  # one image is no statistics of tokens
            raise ValueError(f"seg needs masks on 2+ train rows and 1+ test rows; "
                             f"found {len(train)} and {len(test)}")
        head = probes.train_seg_head(features["patch"], masks, patch_index[train],
                                     mask_index[train], steps=steps)
        predicted = np.concatenate(list(probes.predict_masks(head, features["patch"],
                                                             patch_index[test])))
        true = np.asarray(masks[mask_index[test]])
        split_dice, split_iou = probes.dice_iou(predicted, true)
        dice.append(split_dice)
        iou.append(split_iou)
        if split is splits[0]:
            pictures.seg_picture([rows[mask_rows[k]] for k in test[:4]], predicted[:4], true[:4],
                                 size, png)
    # One resample for both metrics: Dice and IoU of the same draw of images.
    metrics = {"dice": lambda d, i: float(d.mean()), "iou": lambda d, i: float(i.mean())}
    results = probes.with_ci(metrics, [np.concatenate(dice), np.concatenate(iou)])
    if len(splits) == 1:
        results["n"] = {"train": len(train), "test": len(test)}
    else:
        results["n"] = {"folds": len(splits), "test": sum(len(d) for d in dice)}
    results["png"] = str(png)
    return results


def run_tasks(spec, model, features, rows, splits, table, args, labels, masks):
    """Every asked-for probe on one backbone's features -> {"task/label": results}. Age and
    sex read the CLS token, as RAD-DINO's probes do; linear reads --features; k-NN the CLS
    token, as DINO does. Several binary --label columns add "task/macro"."""
    cls = features["cls"].numpy()
    chosen = backbones.chosen_features(features, args.features).numpy()
    safe_name = "".join(c if c.isalnum() or c in "-." else "_" for c in spec).strip("._")
    stem = Path(args.out).parent / safe_name
    # Four test images: never seen by any probe, the same four for every backbone.
    picture_rows = [row for row, s in zip(rows, splits[0]) if s == "test"][:4]
    results = {}
    for task in args.task:
        if task in ("linear", "knn"):
            probe = probes.logistic_probe if task == "linear" else probes.knn_probe
            x = chosen if task == "linear" else cls
            per_label = {}
            for column in args.label:
                result, binary = classify(probe, x, labels[column], splits, table, column)
                results[f"{task}/{column}"] = result
                if binary:
                    per_label[column] = binary
            if len(args.label) > 1 and len(per_label) == len(args.label):
                results[f"{task}/macro"] = probes.macro_over_labels(per_label)
        elif task == "sex":  # a label of the logistic probe, on the CLS token
            results["sex"] = classify(probes.logistic_probe, cls, labels["sex"], splits, table,
                                      "sex")[0]
        elif task == "age":
            age = np.array([parse_age(row) for row in rows])
            fitted = out_of_fold(probes.ridge_probe, cls, age, np.isfinite(age), splits, table,
                                 "age")
            result = probes.with_ci(probes.REGRESSION, [age[fitted.pop("test_rows")],
                                                        fitted.pop("prediction")])
            results["age"] = {**result, **fitted}
        elif task == "seg":
            results["seg"] = seg_probe(features, rows, splits, args.size, f"{stem}-seg.png",
                                       masks, args.seg_steps)
        elif task == "pca":
            model = model.to(args.device)
            results[task] = pictures.pca_picture(model, picture_rows, args.size,
                                                 f"{stem}-pca.png")
        elif task == "attention":
            if isinstance(model, backbones.Pixels):
                results[task] = {"skipped": "the thumbnail has no attention"}
                continue
            model = model.to(args.device)
            results[task] = pictures.attention_picture(model, picture_rows, args.size,
                                                       f"{stem}-attention.png")
        elif task == "embed":
            results["embed"] = backbones.write_embeddings(spec, features, rows, args,
                                                          f"{stem}-embed")
    return results


# ===== the command line =====


def format_metric(metric):
    if metric.get("undefined"):
        return metric["undefined"]
    value = metric["value"]
    low = metric["ci"][0]
    high = metric["ci"][1]
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def results_table(results):
    """{(task, metric): {backbone: "value [low, high]"}}, in the order the tasks ran: what the
    printed table and the model card both show."""
    table = {}
    for spec, tasks in results.items():
        for task, entries in tasks.items():
            for name, metric in entries.items():
                if isinstance(metric, dict) and "value" in metric:  # a metric, not a count
                    table.setdefault((task, name), {})[spec] = format_metric(metric)
    return table


def print_table(results):
    """Backbones side by side, one column each; a line per task and metric: value [95% CI]."""
    header = {spec: spec for spec in results}
    table = [(("task", "metric"), header), *results_table(results).items()]
    # Every column as wide as its longest entry, two spaces apart: a long task name
    # ("linear/pneumonia") or reason never runs into its neighbour.
    task_width = max(len(task) for (task, _), _ in table)
    name_width = max(len(name) for (_, name), _ in table)
    widths = {spec: max(len(cells.get(spec, "-")) for _, cells in table) for spec in results}
    for (task, name), cells in table:
        values = "".join(f"  {cells.get(spec, '-'):>{widths[spec]}}" for spec in results)
        print(f"{task:<{task_width}}  {name:<{name_width}}{values}")


def newest_checkpoint(runs="runs"):
    """train.py's most recently written runs/*/checkpoint_*.pt (by mtime, not by name), or
    None."""
    checkpoints = Path(runs).glob("*/checkpoint_*.pt")
    return max(checkpoints, key=lambda p: p.stat().st_mtime, default=None)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", action="append",
                        help="a .pth, .safetensors, HF folder, train.py .pt, random:ARCH, "
                             "random:PATH (PATH's architecture, random weights) or pixels[:G] "
                             "(a G x G thumbnail, default 14); repeatable (default: the newest "
                             "train.py checkpoint, random:it and pixels)")
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
    parser.add_argument("--folds", type=int, default=0,
                        help="K >= 3: cross-validate over K folds of patients (the 'patient' "
                             "column) instead of the split column; metrics on the pooled "
                             "out-of-fold predictions")
    parser.add_argument("--seg-steps", type=int, default=2000,
                        help="Adam steps of the segmentation head (fewer: a quick look, not a "
                             "converged probe)")
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
    if args.folds in (1, 2) or args.folds < 0:
        # Each split needs a train, a val and a test fold.
        parser.error(f"--folds {args.folds}: 0 (the split column) or 3 and more")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "eval.py", *argv])
    args = parse_args(argv)
    synthetic = False
    # No arguments: the phantoms, and train.py's newest checkpoint against both controls.
    if args.data is None:
        args.data = "data/synthetic"
        synthetic = True
        if not Path(args.data, "labels.csv").exists():
            # make_phantoms' default: config.yaml's data.synthetic_images; ~10 s
            phantoms.make_phantoms(args.data)
    if not args.backbone:
        newest = newest_checkpoint()
        args.backbone = ["random:vit_small", "pixels"]
        if newest:
            args.backbone = [str(newest), f"random:{newest}", "pixels"]
        print(f"newest train.py checkpoint: {newest or 'none in runs/*/'}")
    models = {spec: backbones.load_model(spec) for spec in args.backbone}  # each loaded once
    sizes = {spec: model.args["img_size"] for spec, model in models.items()}
    if args.size is None:
        # train.py builds its model at the global crop size: the size its features know.
        trained = [spec for spec in args.backbone
                   if not spec.startswith("random:") and sizes[spec] is not None]
        args.size = sizes[trained[0]] if trained else 224
        source = f"the img_size of {trained[0]}" if trained else "no trained backbone: default"
        print(f"size: {args.size} px ({source})")
    for spec, img_size in sizes.items():
        print(f"  {spec}: stored grid {img_size or '-'} px, evaluated at {args.size} px")
    explicit = "all" not in args.task
    if explicit:
        args.task = list(dict.fromkeys(args.task))
    else:  # all, and any export named beside it
        args.task = list(TASKS) + [task for task in EXPORTS if task in args.task]
    # Check the table before computing a single feature: a typo should cost a second, not an
    # hour.
    table = Path(args.data)
    if table.is_dir():
        table = table / "labels.csv"
    required = [] if args.folds else ["split"]
    if {"linear", "knn"} & set(args.task):
        required += args.label
    rows = data.read_table(args.data, require=required)
    if args.folds:
        splits = fold_splits(rows, args.folds)
        print(f"{args.folds} folds of patients: the table's split column is not used")
    else:
        splits = [np.array([row["split"] or "" for row in rows])]
        needed_splits = ["train", "test"]
        if {"linear", "sex", "age"} & set(args.task):
            needed_splits.append("val")
        check_split(splits[0], table, needed_splits, "eval")
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
        masks = backbones.mask_file(rows, mask_rows, args.size, out_dir)
    if "embed" in args.task and args.patch_grid:
        patch_rows = list(range(len(rows)))
    features = {}
    for spec, model in models.items():
        features[spec] = backbones.get_features(spec, model, rows, table, args, patch_rows,
                                                out_dir)
    # The probes are thousands of tiny ops, for which OpenMP's thread hand-offs cost more than
    # the work itself: one L-BFGS step measured 0.4 ms on one thread, 67 ms on two busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    for spec, model in models.items():
        results[spec] = run_tasks(spec, model, features[spec], rows, splits, table, args, labels,
                                  masks)
    torch.set_num_threads(threads)
    print_table(results)
    resolved = {"data": str(args.data), "backbones": args.backbone, "size": args.size,
                "tasks": args.task, "labels": args.label, "features": args.features,
                "folds": args.folds, "seg_blocks": args.seg_blocks, "seg_steps": args.seg_steps,
                "device": args.device}
    report = {"command": command, "resolved": resolved, "synthetic": synthetic,
              "size": args.size, "backbone_img_size": sizes, "backbones": args.backbone,
              "images_per_second": {spec: float(features[spec]["images_per_second"])
                                    for spec in args.backbone},
              "anonymous_gib_at_end": backbones.anonymous_memory(),
              "results": results}
    # NaN (an undefined metric) -> null, since JSON has no NaN
    text = json.dumps(report, indent=1)
    text = json.dumps(json.loads(text, parse_constant=lambda _: None), indent=1)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")
    for spec in args.backbone:
        if Path(spec).is_dir() and (Path(spec) / "README.md").is_file():
            card = weights.update_model_card(spec, results_table(results), list(results),
                                             command, data_name=str(args.data))
            print(f"updated the model card {card}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # a bad table or path: its message only
        sys.exit(f"eval.py: {error}")
