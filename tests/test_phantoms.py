"""phantoms.py: the synthetic set is deterministic and its labels are true in the pixels."""
import numpy as np
import pytest

import data
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
        image, lungs = phantoms.draw_phantom(128, "F" if key % 2 else "M", 30 + 10 * key, "none",
                                         key=(key,))
        assert 0.1 < lungs.mean() < 0.4
        # The lungs are the dark regions of the chest: a ring just outside them is brighter.
        grown = lungs.copy()
        for shift in (-4, 4):
            grown |= np.roll(lungs, shift, 0) | np.roll(lungs, shift, 1)
        assert image[grown & ~lungs].mean() > image[lungs].mean() + 40
        for finding in ("nodule", "opacity", "effusion"):
            sick, same_lungs = phantoms.draw_phantom(128, "M", 50, finding, key=(key,))
            healthy, _ = phantoms.draw_phantom(128, "M", 50, "none", key=(key,))
            changed = sick != healthy
            assert changed.sum() > 10 and not (changed & ~same_lungs).any(), finding
            assert sick[changed].astype(int).sum() > healthy[changed].astype(int).sum()
    with pytest.raises(ValueError, match="finding"):
        phantoms.draw_phantom(32, "M", 50, "fracture")
