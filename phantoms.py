"""Synthetic chest radiographs ("phantoms") whose labels are true by construction: the
built-in data of `python train.py` and `python eval.py`, and of the tests. Nothing in the
pretraining path needs this file; it only writes a folder that data.py then reads like any
other (images/, masks/, labels.csv)."""
import csv
from pathlib import Path

import numpy as np
from PIL import Image

# Random numbers come from np.random.default_rng([seed, STREAM, ...]), as in data.py, on
# stream numbers of their own: data.py's are 0 to 4 (a test keeps the two sets apart), so a
# phantom's labels are never also the shuffle of a training run on them. SeedSequence pads
# with zeros, so [seed, S] is [seed, S, 0]: the splits cannot share a number with phantom 0.
_SPLITS = 10  # [seed, 10]: the shuffle that deals out train, val and test
_PHANTOMS = 11  # [seed, 11, i]: phantom i's labels; [seed, 11, i, 1 to 3]: draw_phantom's

# Tests, examples and a first training run need chest X-rays anyone can regenerate, whose
# labels are true by construction. Cartoons, not anatomy: body, shoulders, two dark lungs, a
# bright heart on the image's right (the patient's left, as in a PA view), aortic knob, spine,
# ribs, clavicles, scapulae, vessels, noise.
#
# They exist to measure learning, so no label may be read off a statistic that a random
# network already computes. A random ViT is close to a bag of patches: its CLS token is about
# an average over patches of a fixed function of each patch (LayerScale 1e-5 keeps its blocks
# near identity). Whatever a label changes must therefore not move how many patches are
# bright, dark or edged; it has to live in shapes and proportions, which take context:
#   - every image has its own exposure: its mean and std are drawn, independently of the
#     labels, and a tilted field of brightness lies over it (the heel effect);
#   - every patient has their own size, build, position and breath, also label-free, so a
#     cue has to be a ratio (heart width to chest width), not a width;
#   - sex: shoulder breadth relative to the chest, and faint breast shadows;
#   - age: a larger heart for the chest (cardiothoracic ratio), a bigger aortic knob, ribs
#     closer together for the lung height, fainter bones; each smaller than its spread;
#   - findings: a small faint nodule, a faint haze, or a shallow effusion at one lung base;
#   - lungs: soft tissue, breasts, scapulae, ribs and vessels lie over them, and the
#     exposure moves every grey level, so a patch's brightness alone does not say "lung".
# Lengths are fractions of the image size.
#
# What this does not do: hide the labels from the pixels. Shapes and proportions survive
# downsampling, and a linear probe on a 14 x 14 thumbnail reads sex, age and the finding
# better than a short run's encoder (eval.py's `pixels` column; docs/results.md has the
# numbers). The phantoms test learning against a random network, not against the pixels.

FINDINGS = ("none", "nodule", "opacity", "effusion")


def _ellipse(x, y, cx, cy, rx, ry, edge=0.04):
    """1 inside the ellipse, 0 outside, and a linear rim edge * r wide."""
    inside = np.sqrt(((x - cx) / (rx * edge)) ** 2 + ((y - cy) / (ry * edge)) ** 2)
    return np.clip(np.subtract(1 / edge, inside, out=inside), 0, 1, out=inside)


def draw_phantom(size, sex, age, finding, key=(0,)):
    """One phantom: (uint8 (size, size) image, bool lung mask), seeded by the ints in key.
    Anatomy, finding and noise have separate streams: the same key with another finding
    gives the same chest, changed only inside the lungs (the tests check this). The anatomy
    stream draws the same numbers for every sex and age, so the same key with another sex
    or age is the same person changed only where sex or age shows."""
    if finding not in FINDINGS:
        raise ValueError(f"finding '{finding}' is not one of {FINDINGS}")
    # Parts 1, 2, 3, never 0: numpy's SeedSequence pads its entropy with zeros, so [*key, 0]
    # is the stream of key itself, from which make_phantoms draws the labels: an anatomy
    # drawn from it would carry them (a random ViT then read age off the pose, R^2 ~0.5).
    anatomy = np.random.default_rng([*key, 1])
    lesion = np.random.default_rng([*key, 2])
    noise = np.random.default_rng([*key, 3])
    older = np.clip((age - 20) / 70, 0, 1)  # 0 at 20 years, 1 at 90
    male = 1.0 if sex == "M" else 0.0

    # ===== the patient: size, build and pose, none of which depends on a label =====
    scale = anatomy.uniform(0.86, 1.06)  # how much of the detector the chest fills
    shift_x = anatomy.normal(0, 0.025)
    shift_y = anatomy.normal(0, 0.025)
    tilt = anatomy.normal(0, 0.04)  # radians, ~2 degrees: patients stand a little askew
    build = anatomy.normal(1, 0.06)  # width of the rib cage for its height
    breath = anatomy.normal(1, 0.06)  # depth of inspiration: how tall the lungs are
    fat = anatomy.uniform(0.04, 0.12)  # soft tissue outside the ribs
    # Drawn at half size: the shapes are smooth, so it costs 4x less and upsampling loses
    # nothing; the coordinates are the patient's, so pose moves everything together.
    half = (size + 1) // 2
    pixel = (np.arange(half, dtype=np.float32) + 0.5) / half - 0.5  # image centre at 0
    image_y = pixel[:, None]  # (half, 1)
    image_x = pixel[None, :]  # (1, half); with image_y, everything broadcasts to (half, half)
    x = (np.cos(tilt) * (image_x - shift_x) + np.sin(tilt) * (image_y - shift_y)) / scale + 0.5
    y = (np.cos(tilt) * (image_y - shift_y) - np.sin(tilt) * (image_x - shift_x)) / scale + 0.5
    mid = 0.5
    from_mid = np.abs(x - mid)
    chest = 0.34 * build  # half the width of the rib cage

    # ===== body outline: trunk and shoulders =====
    # Sex shows in proportions only: men's shoulders are ~10% broader for the same chest.
    # The spread of 4% between people makes it a tendency, not a rule.
    shoulders = chest * (1.25 + 0.12 * male + anatomy.normal(0, 0.04))
    trunk = _ellipse(x, y, mid, 0.64, chest + fat, 0.62, 0.08)
    shoulder = _ellipse(x, y, mid, 0.2, shoulders + fat / 2, 0.13, 0.25)
    tissue = np.maximum(trunk, shoulder)
    # Breast shadows over both lower lung fields: soft, faint and of any size, so they
    # add little to the patches' brightness, but they have a curved lower edge in a place.
    breast_size = anatomy.uniform(0.7, 1.3)
    breast_density = anatomy.uniform(0.04, 0.08) * (1 - male)
    for side in (-1, 1):
        breast = _ellipse(x, y, mid + side * 0.62 * chest, 0.66, 0.16 * breast_size,
                          0.11 * breast_size, 0.5)
        tissue = tissue + breast_density * breast
    # Thickness varies smoothly across a body: a slow random field over the soft tissue.
    ripple = anatomy.uniform(0, 2 * np.pi, 2)
    tissue = tissue * (1 + 0.12 * np.sin(5 * x + ripple[0]) * np.sin(4 * y + ripple[1]))

    # ===== heart, aorta and lungs =====
    # Cardiothoracic ratio (heart width / chest width): ~0.42 when young, ~0.5 at 90.
    heart_ratio = 0.42 + 0.08 * older + anatomy.normal(0, 0.025)
    heart_width = heart_ratio * chest
    heart = _ellipse(x, y, mid + 0.35 * heart_width, 0.6, heart_width, 0.75 * heart_width)
    # The aortic knob, at the top left of the heart (the image's right), unfolds with age.
    knob_radius = 0.022 + 0.018 * older + anatomy.normal(0, 0.004)
    knob = _ellipse(x, y, mid + 0.06, 0.33, knob_radius, knob_radius, 0.3)
    mediastinum = np.maximum(heart, knob)
    # The lungs, (patient's) right then left, which is smaller and partly behind the heart.
    lung_height = 0.27 * breath
    lungs = []
    for side, height in ((-1, 1.0), (1, 0.94)):
        lung = _ellipse(x, y, mid + side * 0.5 * chest, 0.44, 0.39 * chest, lung_height * height)
        lungs.append(lung * (1 - mediastinum))
    lung_field = np.maximum(lungs[0], lungs[1])
    # Vessels: faint lines fanning out from each hilum, fading towards the lung's edge.
    hilum_angle = np.arctan2(y - 0.47, from_mid - 0.08)
    vessel_phase = anatomy.uniform(0, 2 * np.pi)
    vessels = np.clip((np.cos(22 * hilum_angle + vessel_phase) - 0.7) / 0.3, 0, 1)
    vessels = vessels * np.clip(1 - np.abs(from_mid - 0.08) / (0.9 * chest), 0, 1)

    # ===== bones =====
    # Ribs: bands periodic in y that bend down towards the sides; the lungs hold ~9 of them,
    # spaced closer (for the same lung height) with age. A parabola of the distance to the
    # nearest rib centre draws them (cos**n: 5x slower).
    rib_step = lung_height * (0.3 - 0.04 * older) * anatomy.normal(1, 0.03)
    phase = (y - 0.16 - 0.8 * (x - mid) ** 2) / rib_step
    ribs = np.clip(1 - ((phase - np.round(phase)) / 0.2) ** 2, 0, 1) * (phase > -0.3)
    ribs = ribs * _ellipse(x, y, mid, 0.45, 0.97 * chest, 0.33) * (from_mid > 0.05)
    spine = np.clip((0.04 - from_mid) / 0.01, 0, 1) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.06))
    clavicles = np.clip((0.018 - np.abs(y - 0.21 + 0.25 * from_mid)) / 0.006, 0, 1)
    clavicles = clavicles * (from_mid > 0.03) * (from_mid < 0.8 * shoulders)
    # Scapulae: their inner edges overlap the upper outer lungs, as in a real PA film.
    scapulae = _ellipse(from_mid, y, 0.95 * chest, 0.33, 0.14, 0.16, 0.3)
    # Bone mineral density falls with age, by less than people differ at any one age.
    bone = (1 - 0.3 * older) * anatomy.normal(1, 0.08)
    density = (0.42 * tissue + 0.16 * mediastinum - 0.2 * lung_field + 0.04 * vessels * lung_field
               + bone * (0.12 * ribs + 0.25 * spine + 0.2 * clavicles + 0.06 * scapulae))

    # ===== exposure =====
    # Gain and offset are set so that the healthy chest's mean and std are numbers drawn
    # here, independently of sex, age and finding: no global statistic can carry a label.
    # The finding and the noise come after, so a finding changes only pixels in its lung.
    heel = 1 + anatomy.uniform(-0.25, 0.25) * image_y + anatomy.uniform(-0.15, 0.15) * image_x
    healthy = density * heel
    target_mean = anatomy.uniform(0.32, 0.48)
    target_std = anatomy.uniform(0.13, 0.19)
    gain = target_std / healthy.std()
    offset = target_mean - gain * healthy.mean()

    # ===== the finding: added density in one lung and nowhere else =====
    side = lesion.integers(2)  # lungs[side] is 0 outside that lung
    lesion_x = mid + (2 * side - 1) * 0.5 * chest
    lesion_y = 0.45 + lesion.uniform(-0.1, 0.1)
    extra = np.zeros_like(density)
    if finding == "nodule":  # a small, faint disc: fainter than a rib
        radius = lesion.uniform(0.018, 0.028)
        extra = 0.09 * _ellipse(x, y, lesion_x, lesion_y, radius, radius, 0.5) * lungs[side]
    elif finding == "opacity":  # a faint haze, fading from its centre to its rim
        radius = lesion.uniform(0.07, 0.12)
        extra = 0.07 * _ellipse(x, y, lesion_x, lesion_y, radius, radius, 1.0) * lungs[side]
    elif finding == "effusion":  # fluid fills the lung's base, higher at the side (a meniscus)
        base = 0.44 + lung_height * (0.94 if side else 1.0)
        level = base - lung_height * lesion.uniform(0.15, 0.3) - 0.4 * (from_mid - 0.5 * chest)
        extra = 0.12 * np.clip((y - level) / 0.02, 0, 1) * lungs[side]
    grain = 0.06 * (noise.random((half, half), dtype=np.float32) - 0.5)  # uniform: cheap
    image = gain * (healthy + extra * heel + grain) + offset
    # Up to full size, bilinear: its weights are > 0, so whatever a finding changes stays
    # inside the mask, which grows by the same rule.
    image = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    mask = Image.fromarray((lung_field > 0).astype(np.uint8) * 255).resize((size, size),
                                                                          Image.BILINEAR)
    return np.asarray(image), np.asarray(mask) > 0


def make_phantoms(out_dir, n=2000, size=256, seed=0):
    """Write n phantoms (images/, masks/, labels.csv, README.txt); return the csv's path.
    The same seed gives byte-identical files. Splits: 60/20/20 over a seeded shuffle."""
    out = Path(out_dir)
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rank = np.argsort(np.random.default_rng([seed, _SPLITS]).permutation(n)).tolist()
    rows = [["image", "mask", "split", "sex", "age", "finding"]]
    for i in range(n):
        meta = np.random.default_rng([seed, _PHANTOMS, i])
        sex = ("M", "F")[meta.integers(2)]
        age = int(meta.integers(18, 91))
        finding = FINDINGS[meta.choice(4, p=[0.4, 0.2, 0.2, 0.2])]
        image, lungs = draw_phantom(size, sex, age, finding, key=(seed, _PHANTOMS, i))
        name = f"{i:05d}.png"
        Image.fromarray(image).save(out / "images" / name, compress_level=1)  # 2x faster
        Image.fromarray(lungs.astype(np.uint8) * 255).save(out / "masks" / name, compress_level=1)
        split = ("train", "val", "test")[(rank[i] >= round(0.6 * n)) + (rank[i] >= round(0.8 * n))]
        rows.append([f"images/{name}", f"masks/{name}", split, sex, age, finding])
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    (out / "README.txt").write_text(f"Synthetic chest radiographs, not patients: phantoms.make_"
        f"phantoms(n={n}, size={size}, seed={seed}). masks/: the lungs exactly as drawn.\n")
    return out / "labels.csv"
