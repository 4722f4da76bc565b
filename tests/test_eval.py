"""eval.py: metrics against slow twins and hand-worked cases, probes on planted signals and on
noise, the segmentation head on a toy mask set, and the command line end to end on phantoms.

CPU only, seconds each: the backbone in the end-to-end test is a random ViT-Ti on 56-px images.
"""
import csv
import json
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
import data  # noqa: E402
import phantoms  # noqa: E402
import weights  # noqa: E402
import backbones  # noqa: E402
import eval as ev  # noqa: E402
import pictures  # noqa: E402
import probes  # noqa: E402
import raddino  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As eval.main does for its probes: tiny ops on several busy threads run 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ===== metrics =====

def auroc_pairs(positive, score):
    """The definition: over every (positive, negative) pair, 1 if the positive scores higher, 1/2
    on a tie."""
    pos, neg = score[positive], score[~positive]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0
                    for p, n in itertools.product(pos, neg)])


def auprc_steps(positive, score):
    """Average precision the long way: lower the threshold one distinct score at a time, and add
    (recall gained) x (precision there)."""
    total, recall_before = 0.0, 0.0
    for threshold in sorted(set(score.tolist()), reverse=True):
        called = score >= threshold
        true_pos = np.sum(called & positive)
        recall = true_pos / positive.sum()
        total += (recall - recall_before) * true_pos / called.sum()
        recall_before = recall
    return total


def test_hand_worked_metrics():
    assert probes.average_ranks(np.array([5, 7, 7, 9])).tolist() == [1, 2.5, 2.5, 4]
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right.
    assert probes.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert probes.auroc([0, 1], [0.3, 0.3]) == 0.5  # a tie is a coin flip
    assert np.isnan(probes.auroc([1, 1], [0.2, 0.3]))  # no negatives: undefined, not 1
    # Ranked 1, 0, 1: precision 1 at recall 1/2, then 2/3 at recall 1.
    assert probes.auprc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # one threshold: the base rate
    assert probes.auprc([1, 0, 1], [0.9, 0.9, 0.9]) == pytest.approx(2 / 3)
    pred = np.zeros((2, 4, 4), bool)
    true = np.zeros((2, 4, 4), bool)
    pred[0, :2], true[0, 1:3] = True, True  # 8 and 8 pixels, 4 shared
    dice, iou = probes.dice_iou(pred, true)
    assert dice.tolist() == [0.5, 1.0] and iou.tolist() == [4 / 12, 1.0]  # image 2: both empty
    y = np.array([1.0, 2.0, 3.0, 4.0])
    r2 = probes.REGRESSION["r2"]
    assert (r2(y, y) == 1 and r2(y, np.full(4, 2.5)) == 0
            and r2(y, y + 1) == pytest.approx(1 - 4 / 5))
    assert probes.pearson(y, 3 * y - 7) == pytest.approx(1) and probes.pearson(y, -y) == pytest.approx(-1)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_auprc_match_their_slow_twins(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    positive = rng.random(n) < rng.uniform(0.2, 0.8)
    positive[:2] = [True, False]
    # Coarse integer scores make many ties, the case a rank formula gets wrong first.
    score = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n) + positive
    assert probes.auroc(positive, score) == pytest.approx(auroc_pairs(positive, score), abs=1e-12)
    assert probes.auprc(positive, score) == pytest.approx(auprc_steps(positive, score), abs=1e-12)
    a, b = rng.normal(size=n), rng.normal(size=n)
    assert probes.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])


def test_macro_metrics_skip_classes_absent_from_the_test_set():
    rng = np.random.default_rng(0)
    # class 2 never occurs
    y, prob = np.array([0, 0, 1, 1, 0, 1]), rng.dirichlet(np.ones(3), size=6)
    expected = np.mean([probes.auroc(y == c, prob[:, c]) for c in (0, 1)])
    assert probes.CLASSIFICATION["auroc"](y, prob) == pytest.approx(expected)
    # binary: class 1
    assert probes.CLASSIFICATION["auroc"](y, prob[:, :2]) == probes.auroc(y == 1, prob[:, 1])


def test_bootstrap_interval_brackets_the_value_and_is_reproducible():
    rng = np.random.default_rng(1)
    y = rng.random(80) < 0.5
    score = y + rng.normal(size=80)
    first = probes.with_ci({"auroc": probes.auroc}, [y, score])["auroc"]
    assert first == probes.with_ci({"auroc": probes.auroc}, [y, score])["auroc"]
    assert (first["ci"][0] < first["value"] < first["ci"][1]
            and first["ci"][1] - first["ci"][0] < 0.4)

# ===== probes =====

def logistic(x, y, split, **kwargs):
    """probes.logistic_probe, its test predictions scored as eval.py scores them."""
    fitted = probes.logistic_probe(x, y, split, **kwargs)
    return {**probes.with_ci(probes.CLASSIFICATION, [y[split == "test"], fitted["test_prob"]]),
            **fitted}


def knn(x, y, split, **kwargs):
    fitted = probes.knn_probe(x, y, split, **kwargs)
    return probes.with_ci(probes.CLASSIFICATION, [y[split == "test"], fitted["test_prob"]])


def ridge(x, target, split, **kwargs):
    fitted = probes.ridge_probe(x, target, split, **kwargs)
    return {**probes.with_ci(probes.REGRESSION, [target[split == "test"], fitted["test_pred"]]),
            **fitted}


def planted(n=300, dim=32, seed=0):
    """Gaussian features, a split column 60/20/20, and a latent that only feature 3 carries."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    split = np.array(["train"] * (6 * n // 10) + ["val"] * (2 * n // 10) + ["test"] * (2 * n // 10))
    return x, x[:, 3] + 0.3 * rng.normal(size=n), split, rng


def test_logistic_probe_finds_a_planted_signal_and_not_noise():
    x, latent, split, rng = planted()
    found = logistic(x, (latent > 0).astype(int), split)
    assert found["auroc"]["value"] > 0.9 and found["accuracy"]["value"] > 0.8
    chance = logistic(x, (rng.random(len(x)) < 0.5).astype(int), split)
    assert 0.3 < chance["auroc"]["value"] < 0.7
    assert chance["l2"] >= found["l2"]  # noise should want at least as much regularisation
    three = np.digitize(latent, [-0.5, 0.5])  # three classes from the same latent
    multi = logistic(x, three, split)
    assert (multi["accuracy"]["value"] > 0.6
            and multi["auroc"]["value"] > 0.85)  # chance: 1/3 and 0.5


def test_knn_probe_votes_with_the_nearest_train_images():
    x, latent, split, rng = planted()
    y = (latent > 0).astype(int)
    clustered = x + 4 * np.eye(x.shape[1])[y]  # each class pushed along its own axis
    assert knn(clustered, y, split)["accuracy"]["value"] > 0.9
    assert 0.3 < knn(x, (rng.random(len(x)) < 0.5).astype(int),
                              split)["auroc"]["value"] < 0.7


def test_ridge_probe_recovers_a_linear_target_and_shrinks_on_noise():
    x, latent, split, rng = planted()
    age = 50 + 10 * latent
    found = ridge(x, age, split)
    assert (found["r2"]["value"] > 0.8 and found["pearson"]["value"] > 0.9
            and found["mae"]["value"] < 4)
    noise = ridge(x, rng.normal(size=len(x)), split)
    # Pure noise: val should push alpha far above the clean case's, and R^2 should stay near 0.
    assert noise["alpha"] >= 100 * found["alpha"] and noise["r2"]["value"] < 0.1


def test_ridge_matches_the_normal_equations():
    x, latent, split, _ = planted(n=100, dim=8)
    train = split == "train"
    z = probes.standardize(x, train)
    # One alpha in the grid makes the selection trivial; the SVD form must equal (X'X + aI)^-1 X'y.
    target = latent * 3 + 1
    w = np.linalg.solve(z[train].T @ z[train] + 10 * np.eye(8),
                        z[train].T @ (target[train] - target[train].mean()))
    expected = z[split == "test"] @ w + target[train].mean()
    result = ridge(x, target, split, alpha_grid=(10.0,))
    assert result["mae"]["value"] == pytest.approx(
        np.mean(np.abs(expected - target[split == "test"])))


def test_seg_head_learns_a_mask_from_features_that_carry_it():
    rng = np.random.default_rng(0)
    masks = np.zeros((24, 8, 8), bool)
    for mask in masks:  # a random rectangle per image
        top, left = rng.integers(0, 4, 2)
        mask[top:top + rng.integers(2, 5), left:left + rng.integers(2, 5)] = True
    # Patch features (B, D=6, g=8, g=8): channel 0 says "inside", channel 1 "outside", four noise.
    features = rng.normal(0, 0.3, (24, 6, 8, 8))
    features[:, 0] += masks
    features[:, 1] += ~masks
    # (B, D, g, g) -> (B, N, D): the patch tokens as the backbone hands them out
    patch = torch.tensor(features, dtype=torch.float32).flatten(2).transpose(1, 2)
    true = torch.from_numpy(masks).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 4x the grid
    head = probes.train_seg_head(patch[:16], true[:16], steps=150)
    pred = np.concatenate(list(probes.predict_masks(head, patch, list(range(16, 24)))))
    assert probes.dice_iou(pred, true[16:].numpy())[0].mean() > 0.9


def test_seg_head_is_judged_at_its_dice_best_cut_on_correlated_weak_tokens():
    """A raw-pixel-like control: a mask covering a fifth of the image, carried weakly by one
    direction of tokens whose channels are strongly correlated. Cut at p = 1/2 (a logit of 0),
    such a read-out draws a sliver of the mask; at the cut that is best for Dice on the train
    images, with the tokens whitened so that Adam converges, it draws the mask."""
    rng = np.random.default_rng(0)
    masks = np.zeros((48, 8, 8), bool)
    for mask in masks:
        top, left = rng.integers(0, 5, 2)
        mask[top:top + 3, left:left + 4] = True  # 12 of 64 patches
    signal = masks + rng.normal(0, 0.8, masks.shape)  # weak: p rarely reaches 1/2
    shared = rng.normal(0, 1.0, masks.shape)  # a large direction every channel carries alike
    # The signal is a small difference between channels: reading it takes weights in the
    # tens, which 300 Adam steps of at most lr 3e-2 cannot reach unless the tokens are whitened.
    features = (shared[..., None] * np.ones(6) + 0.02 * signal[..., None] * np.tile([1, -1], 3)
                + rng.normal(0, 0.002, (*masks.shape, 6)))
    patch = torch.tensor(features, dtype=torch.float32).flatten(1, 2)  # (B, N = 64, C = 6)
    true = torch.from_numpy(masks).repeat_interleave(4, 1).repeat_interleave(4, 2)
    head = probes.train_seg_head(patch[:32], true[:32], steps=300)
    pred = np.concatenate(list(probes.predict_masks(head, patch, list(range(32, 48)))))
    dice = probes.dice_iou(pred, true[32:].numpy())[0].mean()
    assert pred.mean() > 0.6 * true[32:].float().mean().item()  # not a sliver
    assert dice > 0.55


def test_seg_head_reads_what_the_tokens_hold_however_their_channels_are_mixed():
    """The probe is convex, so a converged head depends on what the tokens hold, not on how
    their channels are mixed. Adam alone stops short on mixed, ill-conditioned channels
    (probabilities 0.09 apart here); on whitened tokens both heads reach the optimum."""
    rng = np.random.default_rng(0)
    masks = rng.random((24, 8, 8)) < 0.3
    features = rng.normal(0, 1.0, (24, 8, 8, 6))
    features[..., 0] += masks
    patch = torch.tensor(features, dtype=torch.float32).flatten(1, 2)  # (B, 64, 6)
    true = torch.from_numpy(masks).repeat_interleave(4, 1).repeat_interleave(4, 2)
    # every channel a mixture of all six; condition number ~180
    mixing = torch.tensor(rng.normal(size=(6, 6)), dtype=torch.float32) + 3
    plain = probes.train_seg_head(patch[:16], true[:16])
    mixed = probes.train_seg_head(patch[:16] @ mixing, true[:16])
    with torch.no_grad():
        p_plain = torch.sigmoid(plain(probes.tokens_to_grid(patch[16:]))[:, 0])
        p_mixed = torch.sigmoid(mixed(probes.tokens_to_grid(patch[16:] @ mixing))[:, 0])
    assert (p_plain - p_mixed).abs().max() < 0.03


def test_the_segmentation_probe_converges_whatever_its_seed():
    # Noisy tokens: no head is perfect, so where the last steps leave it shows in its output.
    # With the lr decayed to 0, two seeds (other batches) end at the same head; at a constant
    # lr they differed by ~0.1 in probability, as much as pretraining moves Dice.
    rng = np.random.default_rng(0)
    masks = rng.random((24, 8, 8)) < 0.5
    features = rng.normal(0, 1.0, (24, 6, 8, 8))
    features[:, 0] += masks
    patch = torch.tensor(features, dtype=torch.float32).flatten(2).transpose(1, 2)
    true = torch.from_numpy(masks).repeat_interleave(4, 1).repeat_interleave(4, 2)
    probabilities = []
    for seed in (0, 1):
        head = probes.train_seg_head(patch[:16], true[:16], steps=200, seed=seed)
        with torch.no_grad():
            probabilities.append(torch.sigmoid(head(probes.tokens_to_grid(patch[16:]))[:, 0]))
    assert (probabilities[0] - probabilities[1]).abs().max() < 0.05


def test_masks_land_on_the_same_pixels_as_the_images():
    image = np.full((90, 70), 40, np.uint8)  # portrait and not square: the resize and crop both act
    image[30:70, 10:45] = 220
    size = 28
    seen = data.preprocess(image, size)[0].numpy() > (130 / 255 - data.MEAN) / data.STD
    mask = data.preprocess((image > 128).astype(np.uint8) * 255, size, mask=True)
    assert mask.shape == (size, size) and mask.dtype == bool
    assert np.mean(seen == mask) > 0.97  # bicubic and nearest may disagree on the edge pixels only

# ===== the command line =====

@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    return phantoms.make_phantoms(tmp_path_factory.mktemp("phantoms"), n=40, size=64, seed=1).parent


def test_cli_end_to_end_and_the_cache(phantom_set, tmp_path, capsys):
    out = tmp_path / "eval" / "results.json"
    argv = ["--backbone", "random:vit_tiny", "--data", str(phantom_set), "--size", "56",
            "--workers", "0", "--out", str(out)]
    report = ev.main(argv + ["--task", "all", "--label", "finding"])
    results = report["results"]["random:vit_tiny"]
    assert set(results) == {"linear/finding", "knn/finding", "seg", "age", "sex", "pca",
                            "attention"}
    assert set(results["linear/finding"]) >= {"auroc", "auprc", "accuracy", "l2", "n", "classes",
                                              "dropped"}
    assert (set(results["linear/finding"]["classes"]) <= set(phantoms.FINDINGS)
            and results["sex"]["classes"] == ["F", "M"])
    assert (results["seg"]["n"] == {"train": 24, "test": 8}
            and 0 <= results["seg"]["dice"]["value"] <= 1)
    assert Path(results["pca"]["png"]).is_file() and Image.open(results["seg"]["png"]).size[1] == 56
    saved = out.read_text()
    assert '"auroc"' in saved and "NaN" not in saved and "random:vit_tiny" in saved
    assert "python eval.py --backbone random:vit_tiny" in capsys.readouterr().out

    cache, = out.parent.glob("features-*.pt")
    stamp = cache.stat().st_mtime_ns
    again = ev.main(argv + ["--task", "linear", "--label", "finding"])
    assert ("features from the cache" in capsys.readouterr().out
            and cache.stat().st_mtime_ns == stamp)
    assert again["results"]["random:vit_tiny"]["linear/finding"] == results["linear/finding"]


def rewrite(table, out_dir, change):
    """A copy of a labels.csv with each row passed through change(row), images still found."""
    rows = []
    for row in csv.DictReader(open(table)):
        row["image"] = str(table.parent / row["image"])
        row["mask"] = str(table.parent / row["mask"])
        rows.append(change(row))
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out_dir


def test_missing_columns_and_splits_are_named(phantom_set, tmp_path):
    argv = ["--backbone", "random:vit_tiny", "--size", "56", "--workers", "0", "--out",
            str(tmp_path / "r.json")]
    with pytest.raises(ValueError, match=r"labels\.csv: no 'smoker' column"):
        ev.main(argv + ["--data", str(phantom_set), "--label", "smoker"])
    no_val = rewrite(phantom_set / "labels.csv", tmp_path,
                     lambda row: {**row, "split": row["split"].replace("val", "train")})
    with pytest.raises(ValueError, match=r"labels\.csv: .*split 'val'"):
        ev.main(argv + ["--data", str(no_val), "--task", "linear"])
    assert not list(tmp_path.glob("features-*.pt"))  # both failed before any feature was computed
    # k-NN chooses nothing on val: the same table is enough for it.
    knn = ev.main(argv + ["--data", str(no_val), "--task", "knn"])["results"]["random:vit_tiny"]
    assert knn["knn/finding"]["n"]["val"] == 0 and knn["knn/finding"]["n"]["test"] > 0
    with pytest.raises(ValueError, match="task 'seg' needs a 'mask' column"):
        ev.main(argv + ["--data", str(rewrite(phantom_set / "labels.csv", tmp_path,
                                              lambda row: {**row, "mask": ""})),
                        "--task", "seg"])


def test_rows_without_a_label_are_dropped_and_counted(phantom_set, tmp_path):
    unknown = rewrite(phantom_set / "labels.csv", tmp_path,
                      lambda row: {**row, "sex": "" if row["image"][-5] in "05" else row["sex"]})
    report = ev.main(["--backbone", "random:vit_tiny", "--data", str(unknown), "--size", "56",
                      "--workers", "0", "--task", "sex", "age",
                      "--out", str(tmp_path / "r.json")])
    sex, age = (report["results"]["random:vit_tiny"]["sex"],
                report["results"]["random:vit_tiny"]["age"])
    # images 00000, 00005, ... 00035 lost their sex
    assert sex["dropped"] == 8 and sum(sex["n"].values()) == 32
    assert age["dropped"] == 0 and sum(age["n"].values()) == 40


def test_newest_checkpoint_goes_by_modification_time(tmp_path):
    assert ev.newest_checkpoint(tmp_path) is None
    for name, when in (("a/checkpoint_000900.pt", 300), ("b/checkpoint_000100.pt", 500),
                       ("c/other.pt", 900)):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (when, when))
    assert ev.newest_checkpoint(tmp_path) == tmp_path / "b" / "checkpoint_000100.pt"


def write_train_checkpoint(path, img_size=56):
    """A file in train.py's checkpoint format: the teacher's backbone and its ViT arguments."""
    torch.manual_seed(1)
    backbone = raddino.build_vit("vit_tiny", img_size=img_size, in_chans=1, depth=2)
    state = {f"teacher.backbone.{k}": v for k, v in backbone.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"backbone_args": backbone.args, "model": state}, path)
    return path


def test_random_path_is_the_same_architecture_with_seed_0_weights(tmp_path):
    checkpoint = write_train_checkpoint(tmp_path / "run" / "checkpoint_000010.pt")
    trained = backbones.load_model(str(checkpoint))
    random = backbones.load_model(f"random:{checkpoint}")
    assert random.args == trained.args and len(random.blocks) == 2
    assert not torch.equal(random.pos_embed, trained.pos_embed)
    assert torch.equal(random.pos_embed, backbones.load_model(f"random:{checkpoint}").pos_embed)
    with pytest.raises(ValueError, match="random:nowhere: 'nowhere' is neither an architecture"):
        backbones.load_model("random:nowhere")


def test_random_export_is_the_random_checkpoint(tmp_path):
    """train.py writes a checkpoint and its Hugging Face export; random: of either is one
    network, LayerScale included (config.json's layerscale_value: 1.0 blocks mix, the
    default 1e-5 would give every image the same CLS)."""
    torch.manual_seed(1)
    backbone = raddino.build_vit("vit_tiny", img_size=56, in_chans=1, depth=2,
                                 layerscale_init=1.0)
    checkpoint = tmp_path / "run" / "checkpoint_000010.pt"
    checkpoint.parent.mkdir()
    state = {f"teacher.backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"backbone_args": backbone.args, "model": state}, checkpoint)
    weights.save_hf(backbone, tmp_path / "run" / "export")
    from_checkpoint = backbones.load_model(f"random:{checkpoint}")
    from_export = backbones.load_model(f"random:{tmp_path / 'run' / 'export'}")
    assert from_export.blocks[0].ls1.gamma.eq(1.0).all()
    x = torch.randn(3, 1, 56, 56)
    torch.testing.assert_close(from_export(x), from_checkpoint(x))


def test_the_cache_key_follows_the_weights_and_device_not_the_model_card(tmp_path):
    """eval.py rewrites an export's README.md after every run: that must not void the cache
    of its features. New weights and another device (CUDA runs in bf16) must."""
    export = tmp_path / "export"
    weights.save_hf(raddino.build_vit("vit_tiny", img_size=56, in_chans=1, depth=1), export)
    (export / "README.md").write_text("# a model card\n")  # train.py's export has one
    table = tmp_path / "labels.csv"
    table.write_text("image,split\n")
    for spec in (str(export), f"random:{export}"):
        key = backbones.cache_key(spec, table, 56)
        results = {spec: {"knn/finding": {"auroc": {"value": 0.5, "ci": [0.4, 0.6]}}}}
        weights.update_model_card(export, ev.results_table(results), list(results),
                                  "python eval.py")
        assert backbones.cache_key(spec, table, 56) == key
        assert backbones.cache_key(spec, table, 56, device="cuda") != key
    key = backbones.cache_key(str(export), table, 56)
    weights.save_hf(raddino.build_vit("vit_tiny", img_size=56, in_chans=1, depth=2), export)
    assert backbones.cache_key(str(export), table, 56) != key


def test_no_backbone_compares_the_newest_checkpoint_with_both_controls(phantom_set, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = write_train_checkpoint(Path("runs") / "demo" / "checkpoint_000010.pt")
    report = ev.main(["--data", str(phantom_set), "--task", "knn", "--out", "e/r.json",
                      "--workers", "0"])
    assert report["backbones"] == [str(checkpoint), f"random:{checkpoint}", "pixels"]
    assert report["size"] == 56  # the checkpoint's img_size, not 224
    assert report["backbone_img_size"] == {str(checkpoint): 56, f"random:{checkpoint}": 56,
                                           "pixels": None}
    assert "56 px (the img_size of runs/demo/checkpoint_000010.pt)" in capsys.readouterr().out

# ===== streamed and chunked against all in memory =====


def knn_all_at_once(features, y, split, k=20, temperature=0.07):
    """DINO's k-NN the obvious way: the whole (n_test, n_train) similarity, one test row at a
    time."""
    train = features[split == "train"]
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = features[split == "test"]
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    similarity = test @ train.T
    votes = np.zeros((len(test), int(y.max()) + 1))
    for row in range(len(test)):
        nearest = np.argsort(-similarity[row])[:k]
        weights = np.exp(similarity[row, nearest] / temperature)
        for j, w in zip(nearest, weights / weights.sum()):
            votes[row, y[split == "train"][j]] += w
    return probes.with_ci(probes.CLASSIFICATION, [y[split == "test"], votes])


def assert_same_metrics(a, b, tolerance):
    for name in ("auroc", "auprc", "accuracy"):
        assert a[name]["value"] == pytest.approx(b[name]["value"], abs=tolerance), name
        assert a[name]["ci"] == pytest.approx(b[name]["ci"], abs=tolerance), name


def test_chunked_knn_and_float32_logistic_match_the_all_in_memory_versions():
    x, latent, split, _ = planted()
    y = np.digitize(latent, [-0.5, 0.5])
    assert_same_metrics(knn(x, y, split, chunk_rows=7), knn_all_at_once(x, y, split), 1e-6)
    binary = (latent > 0).astype(int)
    single = logistic(x, binary, split)
    double = logistic(x, binary, split, dtype=torch.float64)
    assert single["l2"] == double["l2"]
    assert_same_metrics(single, double, 1e-3)


def test_seg_head_trained_from_files_on_disk_is_the_one_trained_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    patch = rng.normal(size=(10, 16, 8)).astype(np.float16)  # (m, N, C)
    masks = rng.random((10, 8, 8)) < 0.4
    np.save(tmp_path / "patch.npy", patch)
    np.save(tmp_path / "masks.npy", masks)
    on_disk = probes.train_seg_head(np.load(tmp_path / "patch.npy", mmap_mode="r"),
                                    np.load(tmp_path / "masks.npy", mmap_mode="r"),
                                    rows=range(2, 10), steps=20)
    in_memory = probes.train_seg_head(torch.tensor(patch[2:]).float(), torch.tensor(masks[2:]),
                                  steps=20)
    for a, b in zip(on_disk.state_dict().values(), in_memory.state_dict().values()):
        assert torch.equal(a, b)


def test_streamed_features_match_one_forward_pass(phantom_set, tmp_path):
    rows = data.read_table(phantom_set)[:10]
    model = backbones.load_model("random:vit_tiny")
    for block in model.blocks:  # LayerScale 1e-5 would hide the blocks: let them act
        block.ls1.gamma.data.fill_(0.5)
        block.ls2.gamma.data.fill_(0.5)
    features = backbones.extract_features(model, rows, 56, patch_rows=[1, 4, 9], seg_blocks=[3, 11],
                                   patch_file=tmp_path / "patch.npy", batch_size=3)
    with torch.no_grad():
        images = pictures.load_batch(rows, 56)
        tokens = model.forward_features(images)
        layers = model.get_intermediate_layers(images, blocks=[3, 11])
    torch.testing.assert_close(features["cls"], tokens["cls"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features["avgpool"], tokens["patch"].mean(1), atol=1e-4, rtol=1e-4)
    expected = torch.cat([layers[0][0], layers[1][0]], dim=2)[[1, 4, 9]]  # (3, N, 2D)
    patch = torch.from_numpy(np.load(tmp_path / "patch.npy")).float()
    torch.testing.assert_close(patch, expected, atol=1e-2, rtol=1e-2)  # float16 on disk
    assert features["last4"].shape == (10, 4 * 192)

# ===== what users asked for =====


def test_last_cls_attention_is_the_softmax_that_attention_reference_applies():
    torch.manual_seed(0)
    model = raddino.build_vit("vit_tiny", img_size=56, in_chans=1, depth=2, num_register_tokens=2)
    captured = {}
    model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.update(x=o))
    images = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        model.forward_features(images)
        x = captured["x"]
        qkv = model.blocks[-1].attn.qkv(x).reshape(2, x.shape[1], 3, 3, 64)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        # Values = the identity: attention_reference then hands back its own weights.
        identity = torch.eye(x.shape[1]).expand(2, 3, -1, -1)
        weights = raddino.attention_reference(q, k, identity)[:, :, 0, 3:]  # CLS query, patches
        attention = model.last_cls_attention(images)
    assert attention.shape == (2, 3, 16)
    torch.testing.assert_close(attention, weights)


def test_embed_writes_every_row_with_its_id_and_reads_back(phantom_set, tmp_path):
    out = tmp_path / "r.json"
    report = ev.main(["--backbone", "random:vit_tiny", "--data", str(phantom_set), "--size", "56",
                      "--workers", "0", "--task", "embed", "--features", "last4+avgpool",
                      "--patch-grid", "--out", str(out)])
    entry = report["results"]["random:vit_tiny"]["embed"]
    tensors, metadata = weights.read_safetensors(entry["file"], return_metadata=True)
    rows = data.read_table(phantom_set)
    assert json.loads(metadata["rows"]) == [str(row["image"]) for row in rows]
    assert metadata["backbone"] == "random:vit_tiny" and metadata["size"] == "56"
    assert tensors["cls"].shape == (40, 192) and tensors["features"].shape == (40, 5 * 192)
    assert tensors["patch"].shape == (40, 16, 192)
    model = backbones.load_model("random:vit_tiny")
    with torch.no_grad():
        tokens = model.forward_features(pictures.load_batch(rows[5:7], 56))
    torch.testing.assert_close(tensors["cls"][5:7], tokens["cls"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tensors["patch"][5:7].float(), tokens["patch"], atol=1e-2, rtol=1e-2)
    # DINOv2's linear input: the CLS of the last 4 blocks, then the mean patch token
    torch.testing.assert_close(tensors["features"][:, -192:], tensors["avgpool"])
    with pytest.raises(SystemExit):
        ev.parse_args(["--features", "last4+meanpool"])


def test_several_labels_give_per_label_results_and_macro_averages(phantom_set, tmp_path):
    def binary(row):
        return {**row, "nodule": str(int(row["finding"] == "nodule")),
                "clear": str(int(row["finding"] == "none"))}
    table = rewrite(phantom_set / "labels.csv", tmp_path, binary)
    argv = ["--backbone", "random:vit_tiny", "--data", str(table), "--size", "56", "--workers",
            "0", "--task", "knn", "--out", str(tmp_path / "r.json")]
    results = ev.main(argv + ["--label", "nodule", "clear"])["results"]["random:vit_tiny"]
    macro = results["knn/macro"]
    expected = np.mean([results["knn/nodule"]["auroc"]["value"],
                        results["knn/clear"]["auroc"]["value"]])
    assert macro["auroc"]["value"] == pytest.approx(expected)  # every test row has both labels
    assert macro["labels"] == ["nodule", "clear"] and len(macro["auprc"]["ci"]) == 2
    with pytest.raises(ValueError, match="no 'smoker' column"):
        ev.main(argv + ["--label", "nodule", "smoker"])


def test_a_single_class_test_split_says_why_the_metric_is_undefined(phantom_set, tmp_path,
                                                                    capsys):
    def one_class_in_test(row):
        return {**row, "flag": "1" if row["split"] == "test" else str(int(row["sex"] == "M"))}
    table = rewrite(phantom_set / "labels.csv", tmp_path, one_class_in_test)
    out = tmp_path / "r.json"
    ev.main(["--backbone", "random:vit_tiny", "--data", str(table), "--size", "56", "--workers",
             "0", "--task", "linear", "--label", "flag", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "undefined: test split has only class 1" in printed and "nan [nan" not in printed
    saved = json.loads(out.read_text())["results"]["random:vit_tiny"]["linear/flag"]
    assert saved["auroc"]["value"] is None
    assert saved["auroc"]["undefined"] == "undefined: test split has only class 1"
    assert "undefined" not in saved["accuracy"]  # accuracy is still defined


def test_table_columns_are_as_wide_as_their_contents(capsys):
    metric = {"value": 0.5, "ci": [0.25, 0.75]}
    ev.print_table({"a": {"linear/pneumonia_and_more": {"auroc": metric}}})
    header, line = capsys.readouterr().out.splitlines()
    assert line == "linear/pneumonia_and_more  auroc   0.500 [0.250, 0.750]"  # "metric" sets 6
    assert header.split() == ["task", "metric", "a"]


def test_the_model_card_gets_an_evaluation_section_once(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# model\n\nintro\n\n## Evaluation\n\nold\n\n## License\n\nMIT\n")
    metric = {"value": 0.5, "ci": [0.25, 0.75]}
    for value in (0.5, 0.6):
        results = {str(tmp_path): {"knn/x": {"auroc": {**metric, "value": value}}}}
        weights.update_model_card(tmp_path, ev.results_table(results), list(results),
                                  "python eval.py --backbone X")
    text = card.read_text()
    assert text.count("## Evaluation") == 1 and "old" not in text and "## License\n\nMIT" in text
    assert "| knn/x | auroc | 0.600 [0.250, 0.750] |" in text and "0.500 [" not in text
    assert "`python eval.py --backbone X`" in text
    # Another data set gets its own part; the first stays.
    results = {str(tmp_path): {"seg": {"dice": {**metric, "value": 0.7}}}}
    weights.update_model_card(tmp_path, ev.results_table(results), list(results),
                              "python eval.py --data other", data_name="other")
    text = card.read_text()
    assert "### data\n" in text and "### other\n" in text and text.count("## Evaluation") == 1
    assert "| knn/x | auroc | 0.600" in text and "| seg | dice | 0.700" in text
    assert text.rstrip().endswith("MIT")

# ===== the thumbnail control, folds, and caches that cannot go stale =====


def test_the_thumbnail_is_an_area_downsample_and_the_raw_patches():
    model = backbones.load_model("pixels:7")
    x = torch.randn(2, 1, 56, 56)
    tokens = model.forward_features(x)
    # 56 px in 7 x 7 cells of 8 x 8 pixels, each cell's mean
    area = x.numpy().reshape(2, 7, 8, 7, 8).mean((2, 4)).reshape(2, 49)
    np.testing.assert_allclose(tokens["cls"].numpy(), area, atol=1e-6)
    # 4 x 4 patches of 14 x 14 pixels, row by row, each patch's pixels row by row
    patches = x.numpy().reshape(2, 4, 14, 4, 14).transpose(0, 1, 3, 2, 4).reshape(2, 16, 196)
    np.testing.assert_array_equal(tokens["patch"].numpy(), patches)
    assert backbones.load_model("pixels").grid == 14
    with pytest.raises(ValueError, match="pixels:G"):
        backbones.load_model("pixels:big")


def test_folds_put_every_row_in_test_once_and_no_patient_on_two_sides():
    rows = [{"patient": f"p{i // 3}"} for i in range(30)] + [{"patient": None}] * 4
    splits = ev.fold_splits(rows, 5)
    tested = np.sum([split == "test" for split in splits], axis=0)
    assert tested.tolist() == [1] * 34
    patients = np.array([row["patient"] or f"row {i}" for i, row in enumerate(rows)])
    for split in splits:
        sides = [set(patients[split == side]) for side in ("train", "val", "test")]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert all(sides)
    assert all((a == b).all() for a, b in zip(splits, ev.fold_splits(rows, 5)))  # a fixed seed


def test_folds_score_the_pooled_out_of_fold_predictions(phantom_set, tmp_path):
    report = ev.main(["--backbone", "pixels", "--data", str(phantom_set), "--size", "56",
                      "--workers", "0", "--task", "knn", "age", "--folds", "4",
                      "--out", str(tmp_path / "r.json")])
    results = report["results"]["pixels"]
    assert results["knn/finding"]["n"] == {"folds": 4, "test": 40}  # every row, once
    assert results["age"]["n"] == {"folds": 4, "test": 40} and len(results["age"]["alpha"]) == 4
    for folds in ("1", "2"):  # no train fold beside the val and test folds
        with pytest.raises(SystemExit):
            ev.parse_args(["--folds", folds])


def test_a_run_killed_between_the_feature_files_leaves_a_consistent_cache(phantom_set, tmp_path,
                                                                          monkeypatch):
    """seg caches the patch tokens of the rows with a mask; embed --patch-grid redoes the
    cache for every row. Killed between its two files, the next seg must read the tokens of
    its own rows, not another run's."""
    half_masked = rewrite(phantom_set / "labels.csv", tmp_path,
                          lambda row: {**row, "mask": "" if row["image"][-5] in "13579"
                                       else row["mask"]})
    argv = ["--backbone", "random:vit_tiny", "--data", str(half_masked), "--size", "56",
            "--workers", "0", "--seg-steps", "50", "--out", str(tmp_path / "r.json")]
    first = ev.main(argv + ["--task", "seg"])["results"]["random:vit_tiny"]["seg"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv + ["--task", "embed", "--patch-grid"])
    monkeypatch.undo()
    again = ev.main(argv + ["--task", "seg"])["results"]["random:vit_tiny"]["seg"]
    assert again["dice"] == first["dice"]


def test_an_edited_mask_is_read_again(phantom_set, tmp_path):
    edited = tmp_path / "mask.png"
    rows = data.read_table(phantom_set)
    Image.open(rows[0]["mask"]).save(edited)
    table = rewrite(phantom_set / "labels.csv", tmp_path,
                    lambda row: {**row, "mask": str(edited) if row["image"].endswith(
                        Path(rows[0]["image"]).name) else row["mask"]})
    argv = ["--backbone", "pixels", "--data", str(table), "--size", "56", "--workers", "0",
            "--task", "seg", "--seg-steps", "50", "--out", str(tmp_path / "r.json")]
    ev.main(argv)
    Image.fromarray(255 - np.asarray(Image.open(edited))).save(edited)  # the table is untouched
    ev.main(argv)
    first, second = sorted(tmp_path.glob("masks-*.npy"), key=lambda p: p.stat().st_mtime_ns)
    assert not np.array_equal(np.load(first)[0], np.load(second)[0])


def test_writing_the_patch_tokens_keeps_none_of_them_in_memory(tmp_path):
    """At 518 px a ViT-B/14's patch tokens are 2 MB an image: written through a memory map
    they stayed resident (file-backed RSS grew by every row written); appended to a file,
    memory holds one batch. The thumbnail at 448 px writes 0.4 MB a row in seconds."""
    def file_backed_kib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc")
    png = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((240, 256)) * 255).astype(np.uint8)).save(png)
    rows = [{"image": png}] * 64
    seen = []

    class Watched(backbones.Pixels):
        def get_intermediate_layers(self, x, blocks=None):
            seen.append(file_backed_kib())
            return super().get_intermediate_layers(x, blocks)

    backbones.extract_features(Watched(), rows[:16], 448, patch_rows=list(range(16)),
                               patch_file=tmp_path / "warm.npy", batch_size=16)
    seen.clear()
    before = file_backed_kib()
    backbones.extract_features(Watched(), rows, 448, patch_rows=list(range(64)),
                               patch_file=tmp_path / "patch.npy", batch_size=16)
    written = (tmp_path / "patch.npy").stat().st_size / 1024
    assert max(seen + [file_backed_kib()]) - before < 0.25 * written


def test_the_learning_signal_reads_classes_by_knn_and_numbers_by_ridge(phantom_set):
    """train.py's probe set: a class column is scored by k-NN AUROC, a number by ridge R^2,
    each the probe of probes.py on the CLS features of the table's first rows."""
    rows = data.read_table(phantom_set)
    thumbnails = pictures.load_batch(rows, 56).reshape(40, 1, 14, 4, 14, 4).mean((3, 5))
    thumbnails = thumbnails.reshape(40, 196).numpy()
    split = np.array([row["split"] for row in rows])
    test = split == "test"
    finding = backbones.ProbeSet(phantom_set / "labels.csv", "finding", 56, 600)
    classes = sorted({row["finding"] for row in rows})
    y = np.array([classes.index(row["finding"]) for row in rows])
    prob = probes.knn_probe(thumbnails, y, split)["test_prob"]
    assert finding.name == "finding_auroc"
    assert finding.score(backbones.Pixels().forward_features) == pytest.approx(
        probes.CLASSIFICATION["auroc"](y[test], prob), abs=1e-6)
    age = backbones.ProbeSet(phantom_set / "labels.csv", "age", 56, 600)
    target = np.array([float(row["age"]) for row in rows])
    prediction = probes.ridge_probe(thumbnails, target, split)["test_pred"]
    assert age.name == "age_r2"
    assert age.score(backbones.Pixels().forward_features) == pytest.approx(
        probes.r_squared(target[test], prediction), abs=1e-4)
