"""phantoms.py: the synthetic set is deterministic, its labels are true in the pixels, and
none of them can be read off a global statistic or the patient's size and pose."""
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import data
import probes
import phantoms


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    return phantoms.make_phantoms(tmp_path_factory.mktemp("synthetic"), n=24, size=64, seed=3)


def test_phantoms_are_deterministic(phantom_set, tmp_path):
    again = phantoms.make_phantoms(tmp_path / "again", n=24, size=64, seed=3)
    other = phantoms.make_phantoms(tmp_path / "other", n=24, size=64, seed=4)
    files = sorted(p.relative_to(phantom_set.parent) for p in phantom_set.parent.rglob("*.*"))
    assert len(files) == 24 * 2 + 2
    for f in files:
        assert (phantom_set.parent / f).read_bytes() == (again.parent / f).read_bytes()
    assert (phantom_set.parent / files[2]).read_bytes() != (other.parent / files[2]).read_bytes()
    assert "Synthetic" in (phantom_set.parent / "README.txt").read_text()
    rows = data.read_table(phantom_set)
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert [r["split"] for r in rows].count("train") == round(0.6 * 24)


def test_phantom_labels_match_the_pixels():
    for key in range(6):
        sex = "F" if key % 2 else "M"
        image, lungs = phantoms.draw_phantom(128, sex, 30 + 10 * key, "none", key=(key,))
        assert 0.1 < lungs.mean() < 0.4
        # The lungs are the dark regions of the chest: a ring just outside them is brighter.
        grown = lungs.copy()
        for shift in (-4, 4):
            grown |= np.roll(lungs, shift, 0) | np.roll(lungs, shift, 1)
        assert image[grown & ~lungs].mean() > image[lungs].mean() + 20
        for finding in ("nodule", "opacity", "effusion"):
            sick, same_lungs = phantoms.draw_phantom(128, "M", 50, finding, key=(key,))
            healthy, _ = phantoms.draw_phantom(128, "M", 50, "none", key=(key,))
            changed = sick != healthy
            assert changed.sum() > 10 and not (changed & ~same_lungs).any(), finding
            assert sick[changed].astype(int).sum() > healthy[changed].astype(int).sum()
    with pytest.raises(ValueError, match="finding"):
        phantoms.draw_phantom(32, "M", 50, "fracture")


def test_sex_and_age_change_the_same_chest_in_places():
    """The same key is the same person: another sex or age changes some pixels by a lot (a
    cue a probe at 112 px can see) and leaves most nearly alone (it is not global). The
    exposure is the person's too: the image's mean and std stay put (without the gain and
    offset that set them, a woman's or an older chest is ~0.4-1.5 grey levels darker)."""
    size = 112  # eval.py's probe size in docs/results.md's phantom table
    for key in range(4):
        young_man, _ = phantoms.draw_phantom(size, "M", 25, "none", key=(key,))
        for sex, age in (("F", 25), ("M", 85), ("F", 85)):
            other, _ = phantoms.draw_phantom(size, sex, age, "none", key=(key,))
            change = np.abs(other.astype(int) - young_man.astype(int))
            assert 0.01 < (change > 12).mean() < 0.25, (sex, age)
            assert np.median(change) <= 6, (sex, age)
            assert abs(other.mean() - young_man.mean()) < 0.2, (sex, age)
            assert abs(other.std() - young_man.std()) < 0.25, (sex, age)


def test_no_label_is_a_global_statistic(tmp_path):
    """A 1-D probe on the image's mean or std, or on the lung mask's area or position (the
    patient's size and pose), is at chance for sex, age and every finding."""
    table = phantoms.make_phantoms(tmp_path, n=1000, size=64, seed=5)  # ~4 s
    rows = data.read_table(table)
    images = np.stack([np.asarray(Image.open(r["image"]), np.float64) for r in rows])
    masks = np.stack([np.asarray(Image.open(r["mask"])) > 0 for r in rows])
    columns = np.arange(64)
    statistics = {
        "mean": images.mean((1, 2)),
        "std": images.std((1, 2)),
        "lung area": masks.mean((1, 2)),
        "lung centre": (masks * columns).sum((1, 2)) / masks.sum((1, 2)),
    }
    male = np.array([r["sex"] == "M" for r in rows])
    age = np.array([float(r["age"]) for r in rows])
    finding = np.array([r["finding"] for r in rows])
    for name, value in statistics.items():
        # At chance an AUROC's standard error is sqrt((n1 + n0 + 1) / (12 n1 n0)): ~0.02
        # here (0.023 for a finding's 200 of 1000), so 0.1 is over 4 of them, which none of
        # the 20 AUROCs reaches by chance (at 300 images, 0.1 was 2.4 for a finding: a new
        # draw passed 0.1 on the mean for effusions, at 0.61, where 3,000 images give 0.51).
        assert abs(probes.auroc(male, value) - 0.5) < 0.1, name
        for kind in phantoms.FINDINGS:
            assert abs(probes.auroc(finding == kind, value) - 0.5) < 0.1, (name, kind)
        if name in ("mean", "std"):  # a bigger heart takes lung area: age may show there
            assert np.corrcoef(value, age)[0, 1] ** 2 < 0.03, name


def test_train_and_eval_draw_the_same_default_set():
    # train.py draws data.synthetic_images phantoms; eval.py, run first, draws make_phantoms'
    # default. The two must agree, or train.py refuses the set eval.py drew.
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    default_n = inspect.signature(phantoms.make_phantoms).parameters["n"].default
    assert config["data.synthetic_images"] == default_n


def test_phantom_streams_are_apart_from_data_streams():
    """Phantoms once drew phantom i's labels from stream 4, which is data.py's shuffle: the
    labels of phantom i were the numbers of epoch i's order in a run with the same seed."""
    def streams(module):
        return {value for name, value in vars(module).items()
                if re.fullmatch("_[A-Z]+", name) and type(value) is int}
    assert len(streams(data)) == 5 and len(streams(phantoms)) == 2
    assert not streams(data) & streams(phantoms)
