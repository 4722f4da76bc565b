"""`python bench.py gpu`: everything only a GPU can show, as parts that fit a short window.

    python bench.py gpu --part smoke cuda-tests learn          # ~8 minutes on one H100
    python bench.py gpu --part smoke step memory torchrun      # ~8 minutes
    python bench.py gpu --dry-run                              # every part, tiny, on the CPU

Each part runs in its own process (a crash or a hang costs that part only) under its own
time limit, and prints its result as soon as it ends, so that a command cut short still
reports what finished. A part reports on stdout in lines that start with "RESULT " and hold
JSON; warnings on stderr never hide them. `smoke` runs first: if the versions, the
collectives or a few compiled DDP steps fail, nothing else is worth the machine's time.
Every run writes to a fresh runs/bench-gpu-<time> folder, so a second run on the same warm
machine starts clean.

The parts:
- smoke: versions, the GPU, /dev/shm, and 4 steps of train.py under torchrun on every GPU
  (a tiny ViT, bf16, compiled, activation checkpointing), which run every collective the
  code uses (DDP's all-reduce, the centre's and Sinkhorn-Knopp's all_reduce, the resume
  state's all_gather_object, the barriers).
- cuda-tests: `pytest -m cuda`, the tests that compare the GPU path with the CPU's.
- step: a ViT-B/14 training step (2 x 224 + 8 x 98, batch 64), compiled and eager: images/s
  and MFU.
- memory: configs/rad-dino.yaml from scratch (`init.backbone=`, so no weights to carry):
  RAD-DINO's 518-px batch of 40 with 65,536 prototypes and checkpointing, 3 steps of
  train.py on phantoms, with the allocator's default and expandable segments, and as 2
  accumulated micro-batches of 20: peak allocated and reserved memory.
- learn: ViT-S/14 pretrained for a few minutes at 224 px on the `train` images of both
  shared real sets, then eval.py against its random init and the pixels thumbnail on
  kermany-pneumonia and on covid-cxr (5 folds of patients): whether the method, at a scale
  a CPU cannot reach, learns more than a thumbnail shows.
- torchrun: 50 steps of ViT-B/14 under torchrun on every GPU, with the loader's workers
  spread over the cores.
"""
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE / ".." / "shared" / "data"
PARTS = ("smoke", "cuda-tests", "step", "memory", "learn", "torchrun")
# Seconds each part may take on the GPU; the two commands of the module docstring add to
# 480 s each. The dry run gets the same limits, which it needs a fraction of.
LIMITS = {"smoke": 90, "cuda-tests": 90, "step": 120, "memory": 150, "learn": 300,
          "torchrun": 120}


def report(name, **values):
    """One result line of a part, flushed at once."""
    print("RESULT " + json.dumps({"name": name, **values}), flush=True)


def read_results(stdout):
    """The RESULT lines of a part's stdout, wherever they stand among its other output."""
    results = []
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
    return results


def part_command(part, out_dir, dry_run):
    command = [sys.executable, str(HERE / "bench.py"), "gpu-part", part, "--out-dir", str(out_dir)]
    if dry_run:
        command.append("--dry-run")
    return command


def run_part(part, out_dir, dry_run, limit):
    """Runs one part in a child process with its own session, so that a timeout kills its
    torchrun workers too -> (ok, results, seconds, the tail of its stderr)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = part_command(part, out_dir, dry_run)
    start = time.time()
    with open(out_dir / "stdout.txt", "w") as stdout, open(out_dir / "stderr.txt", "w") as stderr:
        child = subprocess.Popen(command, cwd=HERE, stdout=stdout, stderr=stderr,
                                 start_new_session=True)
        try:
            ok = child.wait(timeout=limit) == 0
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            ok = False
            print(f"   {part}: killed at its limit of {limit} s", flush=True)
    results = read_results((out_dir / "stdout.txt").read_text(errors="replace"))
    errors = (out_dir / "stderr.txt").read_text(errors="replace").strip().splitlines()
    return ok, results, time.time() - start, errors[-15:]


def gpu(args):
    """The parent: each asked-for part in PARTS order, smoke first; stops if smoke fails."""
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu needs a CUDA GPU; `bench.py gpu --dry-run` runs every "
                         "part, tiny, on the CPU")
    parts = [part for part in PARTS if part in (args.part or PARTS)]
    # A fresh folder for every run, even two in one second: train.py refuses to mix runs.
    out_dir = HERE / "runs" / f"bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"bench.py gpu{' --dry-run' if args.dry_run else ''}: {', '.join(parts)} on {device}; "
          f"torch {torch.__version__}, Python {platform.python_version()}; out {out_dir}",
          flush=True)
    failed = []
    for part in parts:
        ok, results, seconds, errors = run_part(part, out_dir / part, args.dry_run,
                                                LIMITS[part])
        print(f"== {part}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
        for result in results:
            print(f"   {json.dumps(result)}", flush=True)
        if not ok:
            failed.append(part)
            print("   stderr, last lines:\n     " + "\n     ".join(errors), flush=True)
            if part == "smoke":
                print("smoke failed: stopping here", flush=True)
                break
    if failed:
        raise SystemExit(f"bench.py gpu: {', '.join(failed)} failed (logs in {out_dir})")


def last_step_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    return lines[-1] if lines else None


def train_command(n_procs, out_dir, options, dry_run):
    """train.py under torchrun with n_procs processes (NCCL on GPUs, gloo in the dry run), or
    as one plain process for n_procs=None."""
    launcher = [sys.executable]
    if n_procs:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}"]
    command = [*launcher, str(HERE / "train.py"), f"out_dir={out_dir}", "resume=false", *options]
    if dry_run:
        command += ["device=cpu", "compile=false", "precision=fp32"]
    return command


def run_checked(command, cwd=HERE, env=None):
    """A child whose failure fails the part, with its output passed on."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    sys.stderr.write(result.stderr[-4000:])
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-4000:])
        raise SystemExit(f"failed: {' '.join(map(str, command))}")
    return result.stdout


def tiny_phantoms(out_dir, n=48):
    import phantoms
    return phantoms.make_phantoms(out_dir / "phantoms", n=n, size=64, seed=0).parent


def smoke(out_dir, dry_run):
    n_gpus = torch.cuda.device_count()
    shm = shutil.disk_usage("/dev/shm").free / 2**30 if Path("/dev/shm").exists() else 0.0
    report("versions", torch=torch.__version__, python=platform.python_version(),
           cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(n_gpus)],
           dev_shm_free_gib=round(shm, 1), cores=os.cpu_count())
    options = ["model.arch=vit_tiny", "crops.global_size=56", "crops.local_size=28",
               f"data.root={tiny_phantoms(out_dir)}", "train.batch_size=4", "train.steps=4",
               "train.log_every=1", "train.save_every=4", "data.workers=1",
               "model.grad_checkpointing=true"]
    if not dry_run:
        options += ["compile=true", "precision=bf16"]
    stdout = run_checked(train_command(max(n_gpus, 2 if dry_run else 1), out_dir / "run",
                                       options, dry_run))
    report("train.py, 4 steps under torchrun", last_step=last_step_line(stdout))


def cuda_tests(out_dir, dry_run):
    stdout = run_checked([sys.executable, "-m", "pytest", "-q", "-m", "cuda",
                          "-p", "no:cacheprovider", "tests/test_gpu_path.py",
                          "tests/test_train.py"])  # where the cuda tests are
    report("pytest -m cuda", summary=stdout.strip().splitlines()[-1])


def step(out_dir, dry_run):
    import bench
    sizes = {}
    if dry_run:
        sizes = dict(arch="vit_tiny", batch=2, global_size=56, local_size=28, n_local=2,
                     out_dim=64, hidden_dim=32, bottleneck_dim=16, steps=1, warmup=1,
                     device="cpu")
    speeds = {}
    for compiled in (True, False):
        result = bench.measure_train_step(compile=compiled and not dry_run, **sizes)
        speeds[compiled] = result["images_per_s"]
        report(f"training step, {'compiled' if compiled else 'eager'}", **result)
    report("compiled / eager", ratio=speeds[True] / speeds[False], target=1.3)


def memory(out_dir, dry_run):
    """configs/rad-dino.yaml from scratch (init.backbone=, no weights needed) on phantoms:
    ViT-B/14, 40 x (2 x 518 + 8 x 98) per GPU, 65,536 prototypes, checkpointing, eager. Peak
    allocated and reserved memory, with the caching allocator's default segments and with
    expandable ones (PYTORCH_CUDA_ALLOC_CONF, which the masked-token count that changes
    every step makes worth having)."""
    options = [f"config={HERE / 'configs' / 'rad-dino.yaml'}", "init.backbone=",
               f"data.root={tiny_phantoms(out_dir, n=160)}", "train.steps=3",
               "train.log_every=1", "train.save_every=1000", "compile=false", "eval.every=0"]
    if dry_run:
        options += ["model.arch=vit_tiny", "crops.global_size=56", "crops.local_size=28",
                    "train.batch_size=2", "head.out_dim=256", "head.hidden_dim=32",
                    "head.bottleneck_dim=16", "data.workers=0"]
    accumulated = ["train.batch_size=20", "train.accum_steps=2"]
    if dry_run:
        accumulated = ["train.batch_size=1", "train.accum_steps=2"]
    runs = [("default", "default", []),
            ("expandable", "expandable_segments:True", []),
            ("2 micro-batches of 20, expandable", "expandable_segments:True", accumulated)]
    if dry_run:  # the allocator means nothing on a CPU; the last run has every option
        runs = runs[-1:]
    for name, allocator, extra in runs:
        run = out_dir / name.split(",")[0].replace(" ", "-")
        env = {**os.environ}
        if allocator != "default":
            env["PYTORCH_CUDA_ALLOC_CONF"] = allocator
        run_checked(train_command(None, run, [*options, *extra], dry_run), env=env)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        report(f"configs/rad-dino.yaml from scratch, {name}",
               peak_allocated_gib=last["peak_mem_gib"],
               peak_reserved_gib=last.get("peak_reserved_gib"),
               images_per_s=last["images_per_s"])


def learn(out_dir, dry_run):
    """Pretrain, then eval.py against both controls on both real sets."""
    kermany = SHARED / "kermany-pneumonia"
    covid = SHARED / "covid-cxr"
    workers = max(1, (os.cpu_count() or 2) - 2)
    options = ["model.arch=vit_small", "crops.global_size=224", "crops.local_size=98",
               f"data.root=[{covid},{kermany}]", "train.batch_size=64", "train.steps=1500",
               "train.epoch_length=15", "train.log_every=100", "train.save_every=1500",
               f"data.workers={workers}"]
    evals = [("kermany-pneumonia", kermany, ["--task", "linear", "knn", "--label", "pneumonia",
                                             "finding"]),
             ("covid-cxr, 5 folds", covid, ["--task", "linear", "knn", "seg", "sex", "age",
                                            "--label", "covid", "--folds", "5"])]
    size = 224
    if dry_run:  # the same commands on tiny phantoms
        phantom_set = tiny_phantoms(out_dir)
        options = ["model.arch=vit_tiny", "crops.global_size=56", "crops.local_size=28",
                   f"data.root={phantom_set}", "train.batch_size=4", "train.steps=2",
                   "train.save_every=2", "data.workers=0"]
        # 10 steps of the seg head: the dry run checks the plumbing, not the probe.
        evals = [("phantoms", phantom_set, ["--task", "linear", "knn", "--label", "finding"]),
                 ("phantoms, 3 folds", phantom_set, ["--task", "linear", "knn", "seg", "sex",
                                                     "age", "--folds", "3", "--seg-steps", "10"])]
        size = 56
    start = time.time()
    stdout = run_checked(train_command(None, out_dir / "run", options, dry_run))
    report("pretraining", minutes=(time.time() - start) / 60, last_step=last_step_line(stdout))
    export = out_dir / "run" / "export"
    for name, table, task in evals:
        out = out_dir / name.replace(", ", "-").replace(" ", "-") / "results.json"
        run_checked([sys.executable, str(HERE / "eval.py"), "--backbone", str(export),
                     "--backbone", f"random:{export}", "--backbone", "pixels", "--data",
                     str(table), "--size", str(size), "--out", str(out), *task,
                     "--workers", str(workers if not dry_run else 0)])
        results = json.loads(out.read_text())["results"]
        columns = {str(export): "pretrained", f"random:{export}": "random", "pixels": "pixels"}
        table_lines = {}
        for spec, tasks in results.items():
            for task_name, entries in tasks.items():
                for metric in ("auroc", "dice", "r2"):
                    if isinstance(entries.get(metric), dict):
                        cell = entries[metric]
                        line = table_lines.setdefault(f"{task_name} {metric}", {})
                        line[columns[spec]] = [round(v, 3) for v in [cell["value"], *cell["ci"]]]
        report(f"eval.py on {name}", results=table_lines)


def torchrun(out_dir, dry_run):
    n_gpus = torch.cuda.device_count()
    workers = max(1, (os.cpu_count() or 2) // max(n_gpus, 1) - 1)
    options = ["model.arch=vit_base", "crops.global_size=224", "crops.local_size=98",
               "train.batch_size=32", "train.steps=50", "train.log_every=10",
               "train.save_every=50", f"data.workers={workers}", "head.out_dim=65536",
               "head.hidden_dim=2048", "head.bottleneck_dim=256",
               f"data.root={tiny_phantoms(out_dir, n=512)}"]
    if dry_run:
        options = ["model.arch=vit_tiny", "crops.global_size=56", "crops.local_size=28",
                   "train.batch_size=2", "train.steps=2", "train.log_every=1",
                   "train.save_every=2", "data.workers=0",
                   f"data.root={tiny_phantoms(out_dir)}"]
    stdout = run_checked(train_command(max(n_gpus, 2 if dry_run else 1), out_dir / "run",
                                       options, dry_run))
    report(f"train.py under torchrun x{max(n_gpus, 1)}", last_step=last_step_line(stdout))


def gpu_part(args):
    """The child: one part, its results on stdout."""
    run = {"smoke": smoke, "cuda-tests": cuda_tests, "step": step, "memory": memory,
           "learn": learn, "torchrun": torchrun}[args.name]
    run(Path(args.out_dir), args.dry_run)
