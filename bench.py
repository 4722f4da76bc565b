"""Benchmarks, one subcommand each:

    python bench.py augment [--n 200] [--size 518] [--workdir DIR]
    python bench.py train [--arch vit_base] [--batch 64] [--global-size 224] [--local-size 98]
                          [--n-local 8]
    python bench.py gpu [--part smoke cuda-tests step memory learn torchrun] [--dry-run]
    python bench.py eval [--rows 1000 4000 16000] [--arch vit_tiny] [--size 56] [--workers 1]

augment: images per second on ONE thread, from a PNG on disk to finished crops (2 x 224 +
8 x 98), for (a) PNG decoding alone, the ceiling; (b) data.load_image + data.MultiCrop;
(c) a torchvision re-creation of DINOv2's DataAugmentationDINO with the same settings, on
PIL RGB images as DINOv2 feeds it (needs torchvision, which nothing else here does).

train: one training step of raddino.StudentTeacher as train.py runs it (AdamW, per-module
clipping, EMA; bf16 autocast, fused AdamW and torch.compile on GPU) on random crops:
images/s, peak memory, and on GPU the model FLOPs utilisation (MFU) against the card's
dense bf16 peak. FLOPs are counted from the architecture (matmuls and attention, forward
x 3 for the student's forward + backward, x 1 for the teacher), not measured.

eval: eval.py's seg and k-NN tasks on synthetic tables of growing length (rows repeat a few
hundred phantoms): feature-extraction images/s, wall time, peak RSS and the patch-token
cache on disk per length. Each length runs in its own process, so its peak RSS is its own.
Time should grow linearly; memory may grow with rows x D (the pooled features), never with
the patch tokens or n_test x n_train. The default (a 2-block ViT-Ti at 56 px) takes ~7 minutes
on a busy 2-core CPU.

To add a subcommand: write a function that takes the parsed arguments, and register it
with its options in main().
"""
import os
import sys

# one thread everywhere, set before numpy and torch load their pools
if sys.argv[1:2] == ["augment"]:
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import bench_gpu  # noqa: E402
import data  # noqa: E402
import phantoms  # noqa: E402
import raddino  # noqa: E402

COVID = Path(__file__).parent / ".." / "shared" / "data" / "covid-cxr"


def write_bench_images(folder, n, size):
    """n 8-bit PNGs with shorter side `size`: covid-cxr images resized up (they are stored
    at 256; RAD-DINO's are stored at 518), else synthetic phantoms."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((COVID / "images").glob("*.png"))[:n]
    if len(sources) < n:
        return data.image_paths(phantoms.make_phantoms(folder / "phantoms", n=n, size=size))
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


def vit_flops(args, tokens):
    """Forward FLOPs of the backbone for one image of `tokens` tokens (2 per multiply-add)."""
    D, depth, hidden = args["embed_dim"], args["depth"], args["embed_dim"] * args["mlp_ratio"]
    # Multiply-adds per token: qkv + proj, the MLP (SwiGLU: 2/3 of the width, rounded up to 8, three
    # matrices), QK^T and AV; the outer 2 turns them into FLOPs.
    mlp = (3 * D * ((int(hidden * 2 / 3) + 7) // 8 * 8) if args["ffn"] == "swiglu"
           else 2 * D * hidden)
    per_token = depth * 2 * (4 * D * D + mlp + 2 * tokens * D)
    return tokens * per_token + (tokens - 1) * 2 * args["in_chans"] * args["patch_size"] ** 2 * D


def head_flops(in_dim, hidden, bottleneck, out_dim):
    return 2 * (in_dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "4090": 165.0}


def measure_train_step(arch="vit_base", batch=64, global_size=224, local_size=98, n_local=8,
                       out_dim=65536, hidden_dim=2048, bottleneck_dim=256, compile=None,
                       grad_checkpointing=False, steps=20, warmup=5, device="auto",
                       peak_tflops=None, accum_steps=1):
    """One DINOv2 training step as train.py runs it, on random crops: a dict with ms/step,
    images/s, achieved TFLOP/s and, on a GPU, peak memory and MFU. With accum_steps = k the
    step is k micro-batches of batch / k, accumulated as train.py does."""
    cuda = torch.cuda.is_available() and device != "cpu"
    torch_device = torch.device("cuda" if cuda else "cpu")
    if compile is None:
        compile = cuda
    torch.manual_seed(0)
    raddino.allow_tf32(True)
    # From scratch, train.py builds the position grid at the global crop size.
    backbone = raddino.build_vit(arch, img_size=global_size, in_chans=1, drop_path_rate=0.1)
    backbone.grad_checkpointing = grad_checkpointing
    model = raddino.StudentTeacher(backbone, out_dim=out_dim, hidden_dim=hidden_dim,
                                   bottleneck_dim=bottleneck_dim).to(torch_device)
    if compile:
        model.compile_networks()
    groups = raddino.param_groups(model.student)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=cuda)
    grid = global_size // 14
    global_crops = torch.randn(2 * batch, 1, global_size, global_size, device=torch_device)
    local_crops = torch.randn(n_local * batch, 1, local_size, local_size, device=torch_device)
    generator = data.MaskGenerator(grid)
    rng = np.random.default_rng(0)
    ratios = np.linspace(0.1, 0.5, batch + 1)[:-1]  # half the global crops masked, stratified
    masks = [generator(int(grid * grid * r), rng) for r in ratios]
    masks += [np.zeros((grid, grid), bool)] * batch
    masks = torch.from_numpy(np.stack(masks).reshape(2 * batch, -1))
    # found on the CPU, as data.collate does: no host sync in the step
    masked = [t.to(torch_device) for t in raddino.masked_tokens(masks)]
    masks = masks.to(torch_device)
    autocast = torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=cuda)

    if batch % accum_steps:
        raise SystemExit(f"--batch {batch} is not a multiple of --accum-steps {accum_steps}")
    # The same crops and masks for each micro-batch: their cost is what is measured.
    micro = batch // accum_steps
    micro_global = torch.cat([global_crops[:micro], global_crops[batch:batch + micro]])
    micro_masks = torch.cat([masks[:micro], masks[batch:batch + micro]])
    micro_masked = [t.to(torch_device) for t in raddino.masked_tokens(micro_masks.cpu())]
    micro_local = local_crops[:n_local * micro]

    def step():
        if accum_steps == 1:
            with autocast:
                losses, _ = model(global_crops, local_crops, masks, 0.07, masked)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
        else:
            with torch.no_grad(), autocast:
                targets = model.teacher_targets([(micro_global, micro_masked[0])] * accum_steps,
                                                0.07)
            optimizer.zero_grad(set_to_none=True)
            for target in targets:
                with autocast:
                    losses, _ = model(micro_global, micro_local, micro_masks, 0.07,
                                      micro_masked, target)
                (losses["loss"] / accum_steps).backward()
        for network in model.student.values():
            torch.nn.utils.clip_grad_norm_(network.parameters(), 3.0)
        optimizer.step()
        model.update_teacher(0.996)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):  # compilation and allocator warm-up
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps

    a = backbone.args
    n_global_tokens = grid * grid + 1
    n_local_tokens = (local_size // 14) ** 2 + 1
    n_masked = int(masks.sum())
    head = head_flops(a["embed_dim"], hidden_dim, bottleneck_dim, out_dim)
    student = 2 * batch * vit_flops(a, n_global_tokens)
    student += n_local * batch * vit_flops(a, n_local_tokens)
    student += (2 * batch + n_local * batch + n_masked) * head
    teacher = 2 * batch * vit_flops(a, n_global_tokens) + (2 * batch + n_masked) * head
    flops = 3 * student + teacher  # backward ~ 2 x forward
    name = torch.cuda.get_device_name(torch_device) if cuda else "CPU"
    result = {
        "setting": f"{arch} {global_size} x 2 + {local_size} x {n_local}, batch {batch}, "
                   f"{'bf16' if cuda else 'fp32'}{', compiled' if compile else ''}"
                   f"{', checkpointing' if grad_checkpointing else ''}"
                   f"{f', {accum_steps} micro-batches' if accum_steps > 1 else ''}",
        "device": name,
        "ms_per_step": seconds * 1000,
        "images_per_s": batch / seconds,
        "tflops": flops / seconds / 1e12,
    }
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(torch_device) / 2**30
        peak = peak_tflops
        if peak is None:
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            result["mfu"] = flops / seconds / 1e12 / peak
    return result


def print_train_result(result):
    print(f"{result['setting']} on {result['device']}")
    print(f"  {result['ms_per_step']:.1f} ms/step  {result['images_per_s']:.1f} images/s  "
          f"{result['tflops']:.2f} TFLOP/s achieved")
    if "peak_memory_gib" in result:
        print(f"  peak memory {result['peak_memory_gib']:.1f} GiB")
    if "mfu" in result:
        print(f"  MFU {result['mfu']:.1%} of the card's dense bf16 peak")


def train_step(args):
    """Images per second (and MFU and peak memory on GPU) of one DINOv2 training step on
    random crops; with --accum-steps k, the same batch also as k micro-batches, for the
    memory accumulation saves and the speed it costs."""
    for accum_steps in sorted({1, args.accum_steps}):
        result = measure_train_step(
            arch=args.arch, batch=args.batch, global_size=args.global_size,
            local_size=args.local_size, n_local=args.n_local, out_dim=args.out_dim,
            hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim,
            compile=args.compile, grad_checkpointing=args.grad_checkpointing, steps=args.steps,
            warmup=args.warmup, device=args.device, peak_tflops=args.peak_tflops,
            accum_steps=accum_steps)
        print_train_result(result)


def write_long_table(phantom_table, n_rows, path):
    """A labels.csv of n_rows rows cycling through the phantoms, split 60/20/20 by row
    number, so every length has the same mix."""
    phantom_rows = list(csv.DictReader(open(phantom_table)))
    folder = Path(phantom_table).parent
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "split", "finding"])
        for k in range(n_rows):
            row = phantom_rows[k % len(phantom_rows)]
            split = "train" if k % 10 < 6 else "val" if k % 10 < 8 else "test"
            writer.writerow([folder / row["image"], folder / row["mask"], split, row["finding"]])
    return path


def eval_at_size(args):
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-eval-"))
    phantom_table = phantoms.make_phantoms(workdir / "phantoms", n=args.images, size=64)
    # A shallow random backbone in train.py's checkpoint format, evaluated as random:PATH: the
    # bench measures eval.py's plumbing, which a deep model would only hide behind matmuls.
    backbone = raddino.build_vit(args.arch, img_size=args.size, in_chans=1, depth=args.depth)
    state = {f"teacher.backbone.{k}": v for k, v in backbone.state_dict().items()}
    checkpoint = workdir / f"{args.arch}-depth{args.depth}.pt"
    torch.save({"backbone_args": backbone.args, "model": state}, checkpoint)
    spec = f"random:{checkpoint}"
    print(f"{args.arch} with {args.depth} blocks at {args.size} px, {args.workers} loader "
          f"worker(s), tasks seg and knn, {args.images} phantoms repeated; "
          f"{os.cpu_count()} CPU cores")
    print(f"{'rows':>7} {'extract img/s':>14} {'wall s':>8} {'peak RSS MiB':>13} "
          f"{'patch cache MiB':>16} {'seg Dice':>9} {'knn AUROC':>10}")
    for n_rows in args.rows:
        out_dir = workdir / f"rows-{n_rows}"
        out_dir.mkdir(exist_ok=True)
        table = write_long_table(phantom_table, n_rows, out_dir / "labels.csv")
        command = [sys.executable, str(Path(__file__).parent / "eval.py"),
                   "--backbone", spec, "--data", str(table),
                   "--task", "seg", "knn", "--label", "finding", "--size", str(args.size),
                   "--workers", str(args.workers), "--device", "cpu",
                   "--out", str(out_dir / "results.json")]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        # wait4 gives this child's own resource use: its peak RSS, not the largest so far.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            sys.exit(f"bench.py eval: {' '.join(command)} failed")
        report = json.loads((out_dir / "results.json").read_text())
        speed = report["images_per_second"][spec]
        results = report["results"][spec]
        cache = sum(f.stat().st_size for f in out_dir.glob("features-*.npy")) / 2**20
        print(f"{n_rows:>7} {speed:>14.1f} {wall:>8.1f} {usage.ru_maxrss / 1024:>13.0f} "
              f"{cache:>16.1f} {results['seg']['dice']['value']:>9.3f} "
              f"{results['knn/finding']['auroc']['value']:>10.3f}", flush=True)


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
    command = commands.add_parser("train", help="training-step throughput and MFU")
    command.add_argument("--arch", default="vit_base", choices=sorted(raddino.ARCHS))
    command.add_argument("--batch", type=int, default=64, help="images per step")
    command.add_argument("--global-size", type=int, default=224)
    command.add_argument("--local-size", type=int, default=98)
    command.add_argument("--n-local", type=int, default=8)
    command.add_argument("--out-dim", type=int, default=65536)
    command.add_argument("--hidden-dim", type=int, default=2048)
    command.add_argument("--bottleneck-dim", type=int, default=256)
    command.add_argument("--grad-checkpointing", action="store_true")
    command.add_argument("--accum-steps", type=int, default=1,
                         help="micro-batches of batch / k a step, as train.accum_steps")
    command.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                         help="default: on GPU only")
    command.add_argument("--steps", type=int, default=20)
    command.add_argument("--warmup", type=int, default=5)
    command.add_argument("--device", default="auto", choices=["auto", "cpu"])
    command.add_argument("--peak-tflops", type=float,
                         help="the card's dense bf16 peak, if not known here")
    command.set_defaults(run=train_step)
    command = commands.add_parser("gpu", help="what only a GPU shows, in parts that fit a short "
                                  "window (bench_gpu.py)")
    command.add_argument("--part", nargs="+", choices=bench_gpu.PARTS,
                         help="the parts to run, smoke first (default: all)")
    command.add_argument("--dry-run", action="store_true",
                         help="every part at tiny sizes on the CPU: a typo costs seconds here, "
                              "not the GPU window")
    command.set_defaults(run=bench_gpu.gpu)
    command = commands.add_parser("gpu-part", help="one part of bench.py gpu, in its own process")
    command.add_argument("name", choices=bench_gpu.PARTS)
    command.add_argument("--out-dir", required=True)
    command.add_argument("--dry-run", action="store_true")
    command.set_defaults(run=bench_gpu.gpu_part)
    command = commands.add_parser("eval", help="eval.py time and memory against table length")
    command.add_argument("--rows", type=int, nargs="+", default=[1000, 4000, 16000])
    command.add_argument("--arch", default="vit_tiny", choices=sorted(raddino.ARCHS))
    command.add_argument("--depth", type=int, default=2, help="blocks of the random backbone")
    command.add_argument("--size", type=int, default=56, help="eval.py --size")
    command.add_argument("--images", type=int, default=200, help="distinct phantoms")
    command.add_argument("--workers", type=int, default=1, help="eval.py --workers")
    command.add_argument("--workdir", help="where tables and caches go (default: a temp folder)")
    command.set_defaults(run=eval_at_size)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
