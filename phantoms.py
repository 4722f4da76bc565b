"""Synthetic chest radiographs ("phantoms") whose labels are true by construction: the
built-in data of `python train.py` and `python eval.py`, and of the tests. Nothing in the
pretraining path needs this file; it only writes a folder that data.py then reads like any
other (images/, masks/, labels.csv)."""
import csv
from pathlib import Path

import numpy as np
from PIL import Image

_PHANTOM = 4  # the random stream of data.py's numbering that phantoms have always drawn from

# Tests, examples and a first training run need chest X-rays anyone can regenerate, whose
# labels are true by construction. Cartoons, not anatomy: body, two dark lungs, a bright
# heart on the image's right (the patient's left, as in a PA view), spine, ribs, clavicles,
# noise. Sex and age change what RAD-DINO's probes look for: men are wider, women have breast
# shadows; with age bones fade, the heart grows, ribs crowd. Lengths: fractions of the size.

FINDINGS = ("none", "nodule", "opacity", "effusion")
def draw_phantom(size, sex, age, finding, key=(0,)):
    """One phantom: (uint8 (size, size) image, bool lung mask), seeded by the ints in key.
    Anatomy, finding and noise have separate streams: the same key with another finding
    gives the same chest, changed only inside the lungs (the tests check this)."""
    anatomy, lesion, noise = (np.random.default_rng([*key, part]) for part in range(3))
    half = (size + 1) // 2  # the shapes are smooth: drawn at half size, 4x cheaper
    y = (np.arange(half, dtype=np.float32)[:, None] + 0.5) / half  # (half, 1)
    x = y.T  # (1, half): every expression below broadcasts to (half, half)
    def ellipse(cx, cy, rx, ry, edge=0.04):  # 1 inside, 0 outside, a soft rim of edge * r
        inside = np.sqrt(((x - cx) / (rx * edge)) ** 2 + ((y - cy) / (ry * edge)) ** 2)
        return np.clip(np.subtract(1 / edge, inside, out=inside), 0, 1, out=inside)
    older = np.clip((age - 20) / 70, 0, 1)  # 0 at 20 years, 1 at 90
    mid = 0.5 + anatomy.normal(0, 0.015)  # the midline, a little off-centre
    half_width = (0.42 if sex == "M" else 0.38) * (1 + anatomy.normal(0, 0.03))
    tissue = 0.42 * ellipse(mid, 0.62, half_width, 0.62)
    if sex == "F":  # breast soft tissue over both lower lung fields
        tissue += 0.1 * (ellipse(mid - 0.55 * half_width, 0.68, 0.15, 0.1, 0.3)
                         + ellipse(mid + 0.55 * half_width, 0.68, 0.15, 0.1, 0.3))
    heart_scale = (1 + 0.2 * older) * (1 + anatomy.normal(0, 0.05))
    heart = ellipse(mid + 0.07, 0.6, 0.13 * heart_scale, 0.1 * heart_scale)
    # The lungs, (patient's) right then left, which is smaller and partly behind the heart.
    lungs = [ellipse(mid + side * 0.5 * half_width, 0.44, 0.38 * half_width, 0.27 * height)
             * (1 - heart) for side, height in ((-1, 1.0), (1, 0.94))]
    lung_field = np.maximum(*lungs)
    # Ribs: bands periodic in y that bend down towards the sides, spaced closer with age; a
    # parabola of the distance to the nearest rib centre draws them (cos**n: 5x slower).
    from_mid = np.abs(x - mid)
    phase = (y - 0.16 - 0.8 * from_mid ** 2) / (0.075 - 0.012 * older)
    ribs = np.clip(1 - ((phase - np.round(phase)) / 0.2) ** 2, 0, 1) * (phase > -0.3)
    ribs *= ellipse(mid, 0.45, 0.95 * half_width, 0.32) * (from_mid > 0.05)
    spine = np.clip((0.04 - from_mid) / 0.01, 0, 1) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.06))
    clavicles = np.clip((0.018 - np.abs(y - 0.21 + 0.25 * from_mid)) / 0.006, 0, 1)
    clavicles *= (from_mid > 0.03) & (from_mid < 0.32)
    bone = 1 - 0.45 * older  # bone mineral density falls with age
    density = (tissue + 0.16 * heart - 0.3 * lung_field
               + bone * (0.14 * ribs + 0.25 * spine + 0.2 * clavicles))
    # A finding adds density to one lung and nowhere else (lungs[side] is 0 outside it).
    side = lesion.integers(2)
    cx, cy = mid + (2 * side - 1) * 0.5 * half_width, 0.45 + lesion.uniform(-0.12, 0.12)
    if finding == "nodule":  # a small dense disc
        density += 0.3 * ellipse(cx, cy, *[lesion.uniform(0.02, 0.035)] * 2, 0.3) * lungs[side]
    elif finding == "opacity":  # a wide haze, fading from its centre to its rim
        density += 0.25 * ellipse(cx, cy, *[lesion.uniform(0.1, 0.18)] * 2, 1.0) * lungs[side]
    elif finding == "effusion":  # fluid fills the base of the lung up to a level
        level = 0.45 + 0.26 * lesion.uniform(0.3, 0.6)
        density += 0.3 * np.clip((y - level) / 0.02, 0, 1) * lungs[side]
    elif finding != "none":
        raise ValueError(f"finding '{finding}' is not one of {FINDINGS}")
    density += 0.05 * (noise.random((half, half), dtype=np.float32) - 0.5)  # uniform: cheap
    # Up to full size, bilinear: its weights are > 0, so whatever a finding changes stays
    # inside the mask, which grows by the same rule.
    image = np.rint(np.clip(0.06 + density, 0, 1) * 255).astype(np.uint8)
    image, lungs = (Image.fromarray(a).resize((size, size), Image.BILINEAR)
                    for a in (image, (lung_field > 0).astype(np.uint8) * 255))
    return np.asarray(image), np.asarray(lungs) > 0

def make_phantoms(out_dir, n=600, size=256, seed=0):
    """Write n phantoms (images/, masks/, labels.csv, README.txt); return the csv's path.
    The same seed gives byte-identical files. Splits: 60/20/20 over a seeded shuffle."""
    out = Path(out_dir)
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rank = np.argsort(np.random.default_rng([seed, _PHANTOM]).permutation(n)).tolist()
    rows = [["image", "mask", "split", "sex", "age", "finding"]]
    for i in range(n):
        meta = np.random.default_rng([seed, _PHANTOM, i])
        sex, age = ("M", "F")[meta.integers(2)], int(meta.integers(18, 91))
        finding = FINDINGS[meta.choice(4, p=[0.4, 0.2, 0.2, 0.2])]
        image, lungs = draw_phantom(size, sex, age, finding, key=(seed, _PHANTOM, i))
        name = f"{i:05d}.png"
        Image.fromarray(image).save(out / "images" / name, compress_level=1)  # 2x faster
        Image.fromarray(lungs.astype(np.uint8) * 255).save(out / "masks" / name, compress_level=1)
        split = ("train", "val", "test")[(rank[i] >= round(0.6 * n)) + (rank[i] >= round(0.8 * n))]
        rows.append([f"images/{name}", f"masks/{name}", split, sex, age, finding])
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    (out / "README.txt").write_text(f"Synthetic chest radiographs, not patients: data.make_"
        f"phantoms(n={n}, size={size}, seed={seed}). masks/: the lungs exactly as drawn.\n")
    return out / "labels.csv"
