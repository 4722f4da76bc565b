"""Benchmarks, one subcommand each:

    python bench.py augment [--n 200] [--size 518] [--workdir DIR]

augment: images per second on ONE thread, from a PNG on disk to finished crops (2 x 224 +
8 x 98), for (a) PNG decoding alone, the ceiling; (b) data.load_image + data.MultiCrop;
(c) a torchvision re-creation of DINOv2's DataAugmentationDINO with the same settings, on
PIL RGB images as DINOv2 feeds it (needs torchvision, which nothing else here does).

To add a subcommand: write a function that takes the parsed arguments, and register it
with its options in main().
"""
import os

# One thread everywhere, set before numpy and torch load their thread pools.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402

COVID = Path(__file__).parent / ".." / "shared" / "data" / "covid-cxr"


def write_bench_images(folder, n, size):
    """n 8-bit PNGs with shorter side `size`: covid-cxr images resized up (they are stored
    at 256; RAD-DINO's are stored at 518), else synthetic phantoms."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((COVID / "images").glob("*.png"))[:n]
    if len(sources) < n:
        return data.image_paths(data.make_phantoms(folder / "phantoms", n=n, size=size))
    paths = []
    for k, source in enumerate(sources):
        image = Image.fromarray(data.load_image(source))
        scale = size / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BICUBIC)
        paths.append(folder / f"{k:05d}.png")
        image.save(paths[-1])
    return paths


def torchvision_dino_augmentation(multicrop):
    """DINOv2's DataAugmentationDINO (dinov2/data/augmentations.py), rebuilt with the same
    numbers as `multicrop`, with the blur probabilities meant as probabilities to blur.
    None if torchvision is missing."""
    try:
        from torchvision import transforms as T
    except ImportError:
        return None
    bicubic = T.InterpolationMode.BICUBIC

    def geometry(size, scale):
        return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=bicubic),
                          T.RandomHorizontalFlip(p=multicrop.flip_prob)])

    def photometry(blur_prob, solarize_prob=0.0):
        colour = T.ColorJitter(brightness=multicrop.brightness, contrast=multicrop.contrast,
                               saturation=0.2, hue=0.1)
        return T.Compose([
            T.RandomApply([colour], p=multicrop.jitter_prob), T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(9, sigma=multicrop.blur_sigma)], p=blur_prob),
            T.RandomSolarize(threshold=128, p=solarize_prob),
            T.ToTensor(), T.Normalize([multicrop.mean] * 3, [multicrop.std] * 3)])

    global_geometry = geometry(multicrop.global_size, multicrop.global_scale)
    local_geometry = geometry(multicrop.local_size, multicrop.local_scale)
    first, second = photometry(multicrop.blur_probs[0]), photometry(
        multicrop.blur_probs[1], multicrop.solarize_prob)
    local = photometry(multicrop.blur_probs[2])

    def augment(image):
        return {"global": [first(global_geometry(image)), second(global_geometry(image))],
                "local": [local(local_geometry(image)) for _ in range(multicrop.n_local)]}
    return augment


def images_per_second(methods, paths, repeats):
    """{name: img/s} for each method: the best of `repeats` passes over all paths, timed in
    CPU seconds of this process, so that other work on a shared machine does not count. The
    methods take turns, so that a busy spell cannot favour one of them either."""
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, work in methods.items():
            start = time.process_time()
            for path in paths:
                work(path)
            best[name] = min(best[name], time.process_time() - start)
    return {name: len(paths) / seconds for name, seconds in best.items()}


def augment(args):
    torch.set_num_threads(1)
    torch.manual_seed(0)  # torchvision draws from torch's global generator
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-augment-"))
    paths = write_bench_images(workdir, args.n, args.size)
    multicrop, rng = data.MultiCrop(), np.random.default_rng(0)

    def decode(path):
        with Image.open(path) as image:
            image.load()

    methods = {"decode only (PNG, the ceiling)": decode,
               "ours: load_image + MultiCrop": lambda p: multicrop(data.load_image(p), rng)}
    torchvision = torchvision_dino_augmentation(multicrop)
    if torchvision is None:
        print("torchvision is not installed: skipping the comparison "
              "(pip install torchvision, in a separate environment if you like)")
    else:
        methods["torchvision DataAugmentationDINO (RGB)"] = lambda p: torchvision(
            Image.open(p).convert("RGB"))
    for work in methods.values():  # warm-up: first calls pay for lazy initialisation
        for path in paths[:5]:
            work(path)
    print(f"{len(paths)} PNGs of shorter side {args.size} in {workdir}; 1 thread; "
          f"crops {multicrop.global_size} x 2 + {multicrop.local_size} x {multicrop.n_local}")
    speeds = images_per_second(methods, paths, args.repeats)
    for name, speed in speeds.items():
        print(f"  {name:42s} {speed:7.1f} img/s  {1000 / speed:6.2f} ms/img")
    if torchvision is not None:
        ratio = speeds["ours: load_image + MultiCrop"] / speeds[
            "torchvision DataAugmentationDINO (RGB)"]
        print(f"  ours / torchvision: {ratio:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("augment", help="augmentation throughput, one thread")
    command.add_argument("--n", type=int, default=200, help="number of images")
    command.add_argument("--size", type=int, default=518, help="shorter side of the PNGs")
    command.add_argument("--workdir", help="where to write them (default: a new temp folder)")
    command.add_argument("--repeats", type=int, default=3, help="passes; the best counts")
    command.set_defaults(run=augment)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
