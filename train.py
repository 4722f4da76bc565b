"""RAD-DINO pretraining: DINOv2's student-teacher self-distillation on chest X-rays.

    python train.py                                  # one process: a GPU if there is one
    python train.py config=configs/rad-dino.yaml data.root=/data/cxr
    torchrun --nproc_per_node=8 train.py config=...  # DDP: NCCL on GPUs, gloo on CPUs

One script, top to bottom: config -> distributed -> data -> model -> optimiser and
schedules -> resume -> learning signal -> preemption -> loop -> export. The method lives in
raddino.py, the images in data.py, the weight formats (checkpoints and the export's model
card too) in weights.py, the reading and checking of config.yaml in configurator.py, the
drawing of loss.png in plot.py, the probe of the learning signal in backbones.py and
probes.py. SIGTERM or SIGUSR1 stops a run after its step, with a checkpoint to resume from.
"""

import atexit
import contextlib
import datetime
import gc
import math
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

import backbones
import configurator
import data
import metrics
import phantoms
import plot
import raddino
import weights

HERE = Path(__file__).resolve().parent

# ===== config =====

# Keys a resume may change: how long, where and how the run is carried out, where its
# data lie, and what watches it. Any other key differing from the checkpoint's stops the
# resume.
RESUMABLE_KEYS = {"resume", "out_dir", "train.steps", "train.save_every", "train.log_every",
                  "train.keep_checkpoints", "device", "compile", "precision", "data.root",
                  "data.workers", "data.on_bad_file", "eval.every", "eval.data", "eval.label",
                  "eval.images", "logger",
                  "train.accum_steps"}  # with the number of ranks to match (see resume)


config = configurator.load_config(HERE / "config.yaml", sys.argv[1:])
logger_module = metrics.import_logger(config["logger"])  # at once: a missing package stops here

# ===== distributed =====
# torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python train.py` is world size 1.
distributed = "RANK" in os.environ
rank = int(os.environ.get("RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
local_rank = int(os.environ.get("LOCAL_RANK", 0))
master = rank == 0
use_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
precision = config["precision"]
if precision == "auto":
    precision = "bf16" if use_cuda else "fp32"
if use_cuda:
    torch.cuda.set_device(device)
    # TF32 for the matmuls that stay in fp32 under bf16 autocast; precision=fp32 means fp32.
    raddino.allow_tf32(precision == "bf16")
if distributed:
    # device_id binds NCCL to this rank's GPU at once. The timeout covers what other ranks
    # wait for at a collective: rank 0 probing the teacher, or writing a checkpoint.
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                            timeout=datetime.timedelta(minutes=30))
torch.manual_seed(config["seed"])  # the same initial weights on every rank
out_dir = Path(config["out_dir"])


def log(*args):
    if master:
        print(*args, flush=True)


def code_version():
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                                capture_output=True, text=True, timeout=5)
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# bf16 autocast runs on the CPU too, so the GPU's dtype path can be tested without a GPU.
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
compile_networks = config["compile"] is True or (config["compile"] == "auto" and use_cuda)

gpu_name = f" ({torch.cuda.get_device_name(device)})" if use_cuda else ""
code = code_version()  # once: a run keeps the version it started with
log(f"RAD-DINO pretraining | code {code} | torch {torch.__version__} "
    f"| python {platform.python_version()}")
log(f"device {device}{gpu_name} | world size {world_size} | precision {precision} "
    f"| compile {compile_networks}")
log("config:\n" + yaml.safe_dump(config, sort_keys=False).rstrip())

# ===== data =====
if config["data.root"] == "data/synthetic":  # the built-in default: phantoms, drawn once
    n = config["data.synthetic_images"]
    table = Path("data/synthetic/labels.csv")
    if master and not table.exists():
        log(f"drawing the built-in SYNTHETIC phantom set ({n} images) in data/synthetic")
        phantoms.make_phantoms("data/synthetic", n=n, size=256, seed=0)
    if distributed:  # every rank reads the set once rank 0 has finished drawing it
        dist.barrier()
    found = len(data.read_table(table))
    if found != n:  # drawn by another version or setting
        raise SystemExit(f"error: data/synthetic holds {found} phantoms, not "
                         f"data.synthetic_images={n}: delete data/synthetic to draw it again, "
                         f"or set data.synthetic_images={found}")
try:
    sources = data.read_sources(config["data.root"], split=config["data.split"])
except ValueError as error:  # e.g. a missing folder, or a table without data.split
    raise SystemExit(f"error: {error}")
for source in sources:
    synthetic = " (SYNTHETIC phantoms)" if "synthetic" in source["name"] else ""
    log(f"data: {len(source['paths'])} images, weight {source['weight']:g}, "
        f"from {source['name']}{synthetic}")

# The crops.* keys are MultiCrop's parameter names (a test keeps them so).
crops = {key[len("crops."):]: value for key, value in config.items() if key.startswith("crops.")}
multicrop = data.MultiCrop(**crops)
mask_generator = data.MaskGenerator(config["crops.global_size"] // config["model.patch_size"])
# The high-resolution phase: larger crops for the last highres.fraction of the steps, as
# DINOv2 adapts to 518 px at the end of pretraining. The backbone interpolates its position
# embeddings to any grid; the masks are drawn on the new grid.
highres = None
if config["highres.global_size"]:
    late_crops = {**crops, "global_size": config["highres.global_size"],
                  "local_size": config["highres.local_size"] or crops["local_size"]}
    highres_step = config["train.steps"] - round(config["highres.fraction"] * config["train.steps"])
    late_grid = config["highres.global_size"] // config["model.patch_size"]
    highres = (highres_step, data.MultiCrop(**late_crops), data.MaskGenerator(late_grid))
    log(f"high-resolution phase from step {highres_step}: {late_crops['global_size']}-px "
        f"global and {late_crops['local_size']}-px local crops")

# ===== model =====
if config["init.backbone"]:
    # Pretrained weights keep their stored position-embedding grid; other sizes interpolate.
    try:
        backbone = weights.load_backbone(config["init.backbone"], in_chans=1,
                                         drop_path_rate=config["model.drop_path"])
    except (FileNotFoundError, ValueError) as error:  # its message, which names the file
        raise SystemExit(f"error: init.backbone: {error}")
    log(f"backbone initialised from {config['init.backbone']}: {backbone.args}")
else:
    # From scratch, the stored grid is the global crop's, as DINOv2 builds it.
    backbone = raddino.build_vit(
        config["model.arch"],
        img_size=config["crops.global_size"],
        patch_size=config["model.patch_size"],
        in_chans=1,
        num_register_tokens=config["model.registers"],
        layerscale_init=config["model.layerscale_init"],
        drop_path_rate=config["model.drop_path"],
    )
backbone.train()
backbone.grad_checkpointing = config["model.grad_checkpointing"]
model = raddino.StudentTeacher(
    backbone,
    out_dim=config["head.out_dim"],
    hidden_dim=config["head.hidden_dim"],
    bottleneck_dim=config["head.bottleneck_dim"],
    head_layers=config["head.layers"],
    separate_ibot_head=config["ibot.separate_head"],
    ibot_out_dim=config["ibot.out_dim"] or None,
    centering=config["centering"],
    student_temp=config["loss.student_temp"],
    center_momentum=config["loss.center_momentum"],
    dino_weight=config["loss.dino_weight"],
    koleo_weight=config["loss.koleo_weight"],
    ibot_weight=config["loss.ibot_weight"],
).to(device)
if config["init.head"]:
    weights.load_head(model, config["init.head"])
n_params = sum(p.numel() for p in model.student.backbone.parameters())
log(f"student backbone: {n_params / 1e6:.1f}M parameters, {backbone.args['depth']} blocks, "
    f"width {backbone.embed_dim}")
if compile_networks:
    model.compile_networks()
    if distributed and not torch._dynamo.config.optimize_ddp:
        log(f"torch {torch.__version__}: compiled DDP with activation checkpointing runs one "
            f"gradient bucket per graph (raddino.StudentTeacher.compile_networks says why)")
# From here on each rank draws from its own stream, as DINOv2 seeds with seed + rank: drop
# path must not mask the same samples on every GPU. (Crops and masks have their own seeded
# streams in data.py.)
torch.manual_seed(config["seed"] + rank)
train_model = model
if distributed:
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False)

# ===== optimiser and schedules =====
groups = raddino.param_groups(model.student, config["optim.layer_decay"],
                              config["optim.patch_embed_lr_mult"])
optimizer = torch.optim.AdamW(groups, betas=tuple(config["optim.betas"]), fused=use_cuda)
total_steps = config["train.steps"]
epoch_length = config["train.epoch_length"]  # steps per "epoch", the unit of the schedules
# train.batch_size is per process and micro-batch; train.accum_steps micro-batches make a step
accum_steps = config["train.accum_steps"]
global_batch = config["train.batch_size"] * world_size * accum_steps
peak_lr = config["optim.base_lr"] * math.sqrt(global_batch / 1024)  # DINOv2's sqrt scaling


def cosine(step, start, end, warmup_steps=0):
    """A linear warm-up from 0 to `start`, then a cosine from `start` to `end` at total_steps."""
    if step < warmup_steps:
        return start * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(progress, 1.0)))


def linear_then_constant(step, start, end, ramp_steps):
    if step >= ramp_steps:
        return end
    return start + (end - start) * step / ramp_steps


def schedule(step):
    """Every scheduled value at one step. Plain functions of the step: resuming needs no state."""
    warmup_steps = config["optim.warmup_epochs"] * epoch_length
    lr = cosine(step, peak_lr, config["optim.min_lr"], warmup_steps)
    frozen_steps = config["optim.freeze_last_layer_epochs"] * epoch_length
    temp_steps = config["teacher_temp.warmup_epochs"] * epoch_length
    # Continued pretraining: fresh heads train on a still backbone first, then the backbone
    # joins under a warm-up of its own, from 0 over optim.warmup_epochs.
    backbone_frozen_steps = config["train.freeze_backbone_epochs"] * epoch_length
    backbone_lr = lr
    if backbone_frozen_steps:
        backbone_lr *= min(1.0, max(0, step - backbone_frozen_steps) / max(1, warmup_steps))
    return {
        "lr": lr,
        "backbone_lr": backbone_lr,
        "last_layer_lr": 0.0 if step < frozen_steps else lr,
        "wd": cosine(step, config["optim.weight_decay"], config["optim.weight_decay_end"]),
        "momentum": cosine(step, config["momentum.start"], config["momentum.end"]),
        "teacher_temp": linear_then_constant(
            step, config["teacher_temp.start"], config["teacher_temp.end"], temp_steps),
    }


# ===== resume =====
start_step = 0
logger_id = None  # the wandb run's, so that a resume goes on with the same run
history = []
earlier_skips = []  # files skipped before a resume, over every rank: [[source name, count]]
earlier_checkpoints = weights.checkpoint_paths(out_dir)
if earlier_checkpoints and not config["resume"]:
    # Starting over beside an earlier run's checkpoints would mix the two: pruning would
    # keep the old ones (higher steps) and a later resume would load the wrong run.
    raise SystemExit(f"error: {out_dir} holds checkpoints of an earlier run (newest "
                     f"{earlier_checkpoints[-1].name}); with resume=false, choose another "
                     f"out_dir or delete them")
if earlier_checkpoints:
    try:
        path, state = weights.read_newest_checkpoint(out_dir, warn=log)
    except ValueError as error:
        raise SystemExit(f"error: {error}; move them away or choose another out_dir")
    if state["step"] > config["train.steps"]:
        raise SystemExit(f"error: {path} is at step {state['step']}, past train.steps="
                         f"{config['train.steps']}: raise train.steps or choose another out_dir")
    # The global batch is made of ranks x train.accum_steps parts, micro-batch j of rank r
    # being part r x k + j: another number of ranks with accum_steps to match (8 GPUs x 1 ->
    # 4 x 2) reads the same images in the same order. Any other change would change the
    # global batch, the peak lr (sqrt scaling) and the data order. Checkpoints older than the
    # world_size key are taken as they were.
    trained_on = state.get("world_size", world_size)
    trained_accum = state["config"].get("train.accum_steps", 1)
    parts = trained_on * trained_accum
    if parts != world_size * accum_steps:
        batch_size = state["config"]["train.batch_size"]
        fits = f" (here train.accum_steps={parts // world_size})" if parts % world_size == 0 else ""
        raise SystemExit(f"error: {path} was trained on {trained_on} ranks x {trained_accum} "
                         f"micro-batches (global batch {parts * batch_size}); this run has "
                         f"{world_size} x {accum_steps} (global batch {global_batch}): resume "
                         f"with ranks x train.accum_steps = {parts}{fits}, or start over with "
                         f"another out_dir")
    if trained_on != world_size:
        log(f"resuming {trained_on} ranks x {trained_accum} micro-batches as {world_size} x "
            f"{accum_steps}: the same global batch and data; drop path draws from other streams")
    # A resume may change how the run is carried out, never what it computes: another
    # recipe (say, an older config.yaml's) on top of these weights would be neither run.
    changed = [f"{key}={state['config'].get(key)!r} -> {value!r}" for key, value in config.items()
               if key not in RESUMABLE_KEYS and state["config"].get(key) != value]
    if changed:
        raise SystemExit(f"error: {path} was trained with other values: {', '.join(changed)}; "
                         f"resume with its values, or start over with another out_dir")
    model.load_state_dict(state["model"])
    weights.load_optimizer_state(optimizer, state["optimizer"])
    start_step = state["step"]
    history = state["history"]
    earlier_skips = state.get("skipped_files", [])
    logger_id = state.get("logger_id")
    rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]  # drop path draws
    torch.set_rng_state(rng["cpu"])
    if use_cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    log(f"resumed from {path} at step {start_step}")

# Only now that the run is accepted does out_dir get its config: a refused resume leaves the
# config that matches the checkpoints beside it.
if master:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

# Files skipped per source (data.on_bad_file=skip), all of their bookkeeping: each rank
# counts those it met; rank 0 also carries the checkpoint's counts (summed over ranks when it
# was saved) if it counted the same sources; skipped_files() sums over ranks for the log and
# the checkpoints.
names = [source["name"] for source in sources]
skipped = [0] * len(sources)
earlier_names = [name for name, _ in earlier_skips]
if start_step and earlier_names != names:
    log(f"skipped-file counts start again at 0: the checkpoint counted them for "
        f"{earlier_names or 'no sources'}, this run reads {names}")
elif start_step and master:
    skipped = [n for _, n in earlier_skips]


def skipped_files():
    """[[source name, files skipped so far]], summed over every rank."""
    total = torch.tensor(skipped, device=device)
    if distributed:
        dist.all_reduce(total)
    return [[name, n] for name, n in zip(names, total.tolist())]


# loss.png, redrawn at each checkpoint: the total and each term times its weight, as the
# total adds them (the legend names any weight other than 1).
LOSS_PANELS = [{"loss": 1.0,
                "dino_local": config["loss.dino_weight"],
                "dino_global": config["loss.dino_weight"],
                "ibot": config["loss.ibot_weight"],
                "koleo": config["loss.koleo_weight"]},
               {"teacher_entropy": 1.0, "teacher_batch_entropy": 1.0}]  # the collapse check


def save_checkpoint(step):
    """Everything needed to continue bitwise: weights, optimiser, step, every rank's RNG and
    the history (the loader needs only the step). Written atomically; old ones pruned."""
    rng = {"cpu": torch.get_rng_state()}
    if use_cuda:
        rng["cuda"] = torch.cuda.get_rng_state(device)
    all_rng = [rng] * world_size
    if distributed:
        dist.all_gather_object(all_rng, rng)
    skipped_so_far = skipped_files()  # every rank takes part in the sum
    if not master:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": all_rng, "history": history, "config": config, "world_size": world_size,
             "backbone_args": backbone.args, "code": code, "skipped_files": skipped_so_far,
             "logger_id": logger_id}
    path = weights.save_checkpoint(state, out_dir, keep=config["train.keep_checkpoints"])
    plot.draw_curves(history, LOSS_PANELS, out_dir / "loss.png")
    log(f"saved {path}")


# ===== learning signal =====
# DINO's loss says little about what the encoder learns (the teacher moves the target as the
# student moves), so rank 0 probes the teacher every eval.every steps: its CLS tokens of a
# labelled table, read by a probe of probes.py (ridge R^2 for a numeric label, k-NN AUROC
# for classes), beside the same probe on the image's 14 x 14 thumbnail (backbones.Pixels),
# the control that a pretrained encoder has to beat.
probe_set = None
probe_table = config["eval.data"]
if not probe_table and config["data.root"] == "data/synthetic":
    probe_table = "data/synthetic/labels.csv"  # the phantoms' own labels and test split
if master and config["eval.every"] and probe_table:
    try:
        probe_set = backbones.ProbeSet(probe_table, config["eval.label"],
                                       config["crops.global_size"], config["eval.images"])
    except ValueError as error:
        raise SystemExit(f"error: eval.data / eval.label: {error}")
    probe_key = f"probe_{probe_set.name}"
    pixels = probe_set.score(backbones.Pixels().forward_features)
    log(f"probe every {config['eval.every']} steps: {probe_set.description}; the 14 x 14 "
        f"thumbnail scores {pixels:.3f}")
    LOSS_PANELS.insert(1, {probe_key: 1.0, f"{probe_key}_pixels": 1.0})


def probe_teacher(step):
    """The teacher's probe score at `step`, the thumbnail's beside it, and the seconds it took
    (the probe's share of the run): a log line and a record of their own."""
    start = time.time()
    with torch.no_grad(), autocast:
        value = probe_set.score(model.teacher.backbone.forward_features, device)
    record = {"step": step, probe_key: value, f"{probe_key}_pixels": pixels,
              "probe_seconds": time.time() - start}
    history.append(record)
    metrics_log.write(record)
    log(f"probe at step {step}: {probe_set.name} {value:.3f} (thumbnail {pixels:.3f}; "
        f"{record['probe_seconds']:.1f} s)")


# ===== preemption =====
# SIGTERM (a scheduler or torchrun stopping the job) and SIGUSR1 (SLURM's --signal, sent ahead
# of a job's time limit) end the run after the step in progress, with a checkpoint at that
# step, from which the same command resumes bitwise. The handler only raises a flag: the loop
# reads it between steps.
received_signal = 0


def on_signal(signum, frame):
    global received_signal
    received_signal = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
for stop_signal_number in STOP_SIGNALS:
    signal.signal(stop_signal_number, on_signal)
# The ranks must stop after the same step (a checkpoint gathers every rank's RNG state), yet a
# signal may reach one rank a step before another. They agree every step over a gloo group of
# their own on the CPU, which costs no GPU sync (a flag on the GPU would stall the host).
if distributed:
    cpu_group = dist.new_group(backend="gloo")


def stop_signal():
    """The signal that ends the run after this step if any rank has received one; else 0."""
    if not distributed:
        return received_signal
    flag = torch.tensor([received_signal])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group)
    return int(flag)


# ===== loop =====
TERMS = ("dino_local", "dino_global", "koleo", "ibot", "loss")
log(f"training steps {start_step} -> {total_steps}: global batch {global_batch} "
    f"(x{2 + config['crops.n_local']} crops), peak lr {peak_lr:.2e}, "
    f"one epoch = {epoch_length} steps")
metrics_log = None  # rank 0's metrics.jsonl, and the logger
if master:
    metrics_log = metrics.MetricsLog(out_dir, history, config["logger"], logger_module, config,
                                     start_step, run_id=logger_id)
    logger_id = metrics_log.run_id


if probe_set and start_step == 0:
    probe_teacher(0)  # the network before any training: random init or init.backbone's
warned = False
window_start = time.time()
window_losses = torch.zeros(len(TERMS), device=device)  # summed over the steps since the last log
window_steps = 0


def log_step(step, diagnostics, scheduled):
    """Every train.log_every steps: one log line, one metrics.jsonl record, the collapse check.
    Losses are the mean over the steps since the last line (one batch alone is noisy);
    the collapse diagnostics are the last batch's."""
    global warned, window_start, window_losses, window_steps
    terms = window_losses / window_steps
    if distributed:  # averaged over ranks, for the log
        dist.all_reduce(terms)
        terms /= world_size
    terms = dict(zip(TERMS, terms.tolist()))
    skipped_so_far = skipped_files()
    collapse = raddino.collapse_diagnostics(
        diagnostics["teacher_probs"], diagnostics["student_cls"])
    speed = window_steps * global_batch / (time.time() - window_start)  # images per second
    eta_minutes = (total_steps - step) * global_batch / speed / 60
    reserved = None
    if use_cuda:
        memory = torch.cuda.max_memory_allocated(device) / 2**30
        # What the caching allocator holds: with a masked-token count that changes every
        # step, fragmentation shows here, not in the allocated peak (docs/training.md).
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    record = {"step": step, **terms, **scheduled, **collapse, "images_per_s": speed,
              "peak_mem_gib": memory, "skipped_files": sum(n for _, n in skipped_so_far)}
    if reserved is not None:
        record["peak_reserved_gib"] = reserved
    history.append(record)
    line = (f"step {step}/{total_steps} | loss {terms['loss']:.4f} "
            f"(dino local {terms['dino_local']:.3f} global {terms['dino_global']:.3f} "
            f"ibot {terms['ibot']:.3f} koleo {terms['koleo']:.3f}) "
            f"| lr {scheduled['lr']:.2e} wd {scheduled['wd']:.3f} "
            f"mom {scheduled['momentum']:.4f} T_t {scheduled['teacher_temp']:.3f} "
            f"| {speed:.1f} img/s | ETA {eta_minutes:.1f} min | mem {memory:.2f} GiB "
            f"{f'(reserved {reserved:.2f}) ' if reserved is not None else ''}"
            f"| H(t) {collapse['teacher_entropy']:.2f} "
            f"H(mean t) {collapse['teacher_batch_entropy']:.2f} "
            f"cls spread {collapse['cls_spread']:.2f}")
    per_source = ", ".join(f"{n} in {name}" for name, n in skipped_so_far if n)
    if per_source:
        line += f" | skipped files: {per_source}"
    log(line)
    # Judged once the teacher's temperature has stopped moving (at once when it is constant)
    temp_settled = (config["teacher_temp.start"] == config["teacher_temp.end"]
                    or step > config["teacher_temp.warmup_epochs"] * epoch_length)
    if temp_settled and raddino.looks_collapsed(collapse) and not warned:
        warned = True  # said once
        log("WARNING: the outputs look collapsed (teacher near-uniform, one prototype for every "
            "image, or all CLS embeddings alike). Check the learning rate, teacher temperature "
            "and centring (docs/short-runs.md).")
    if master:
        metrics_log.write(record)
    window_start = time.time()
    window_losses = torch.zeros_like(window_losses)
    window_steps = 0


def stop_if_not_finite(step):
    """Stops the run if a loss since the last check was NaN or inf, before anything is logged,
    probed or saved: a non-finite step is never written to a checkpoint. Checked only then,
    not every step: reading a value back makes the host wait for the GPU."""
    terms = window_losses.clone()
    if distributed:  # NaN on one rank has reached every rank's weights through DDP
        dist.all_reduce(terms)
    if torch.isfinite(terms).all():
        return
    first = step - window_steps + 1
    when = f"at step {step}" if first == step else f"in steps {first}-{step}"
    bad = ", ".join(f"{k}={v}" for k, v in zip(TERMS, terms.tolist()) if not math.isfinite(v))
    saved = weights.checkpoint_paths(out_dir)
    newest = saved[-1] if saved else "none"
    raise SystemExit(f"error: non-finite loss {when}: {bad}; no checkpoint written after it "
                     f"(newest: {newest})")


batches = data.PretrainBatches(
    sources, multicrop, mask_generator, config["train.batch_size"], seed=config["seed"],
    rank=rank, world_size=world_size, start_step=start_step,
    on_bad_file=config["data.on_bad_file"], mask_ratio=tuple(config["mask.ratio"]),
    mask_prob=config["mask.prob"], accum_steps=accum_steps, highres=highres)
loader = data.iterate(batches, num_workers=config["data.workers"], pin_memory=use_cuda,
                      blocked_signals=STOP_SIGNALS)
# Deaf to SIGTERM, its workers cannot be ended by the one multiprocessing sends at exit: the
# loader ends them, before that, whichever way the run ends.
atexit.register(loader.close)
clip_grad = config["optim.clip_grad"]


def next_micro_batch():
    """The loader's next batch, its tensors copied to the device without waiting (pinned)."""
    try:
        batch = next(loader)
    except data.ImageError as error:
        raise SystemExit(f"error: {error}. Set data.on_bad_file=skip to skip unreadable files "
                         f"(they are counted in the log).")
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


step = start_step
while step < total_steps:
    micro_batches = [next_micro_batch() for _ in range(accum_steps)]
    scheduled = schedule(step)
    for group in optimizer.param_groups:
        lr = scheduled["lr"]
        if group["last_layer"]:
            lr = scheduled["last_layer_lr"]
        elif group["backbone"]:
            lr = scheduled["backbone_lr"]
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = scheduled["wd"] * group["wd_mult"]

    # The teacher's targets for every micro-batch first, so that centring and Sinkhorn-Knopp
    # see the whole accumulated batch, as they see every rank's rows. (Not through DDP: the
    # teacher has no gradients to synchronise.)
    with torch.no_grad(), autocast:
        targets = model.teacher_targets(
            [(batch["global"], batch["mask_indices"]) for batch in micro_batches],
            scheduled["teacher_temp"])
    optimizer.zero_grad(set_to_none=True)
    step_losses = torch.zeros(len(TERMS), device=device)
    for j, batch in enumerate(micro_batches):
        # Each micro-batch counts 1 / accum_steps, as each rank's gradient counts
        # 1 / world_size in DDP's mean; DDP all-reduces after the last one only.
        last = j == accum_steps - 1
        with contextlib.nullcontext() if last or not distributed else train_model.no_sync():
            with autocast:
                losses, diagnostics = train_model(
                    batch["global"], batch["local"], batch["masks"], scheduled["teacher_temp"],
                    (batch["mask_indices"], batch["mask_weights"]), targets[j])
            (losses["loss"] / accum_steps).backward()
        step_losses += torch.stack([losses[k].detach().float() for k in TERMS]) / accum_steps
        skipped = [total + new for total, new in zip(skipped, batch["skipped"])]
    del targets, losses  # the targets of every micro-batch, each (M, K)
    if clip_grad > 0:  # 0 means no clipping, as in DINOv2
        for network in model.student.values():  # backbone and heads separately
            torch.nn.utils.clip_grad_norm_(network.parameters(), clip_grad)
    optimizer.step()
    model.update_teacher(scheduled["momentum"])

    step += 1
    window_losses += step_losses
    window_steps += 1
    stop = stop_signal()  # SIGTERM or SIGUSR1 on any rank: a checkpoint here, then stop
    logging = step % config["train.log_every"] == 0 or step == total_steps
    probing = probe_set is not None and (step % config["eval.every"] == 0 or step == total_steps)
    saving = step % config["train.save_every"] == 0 or step == total_steps or stop
    if logging or probing or saving:
        stop_if_not_finite(step)
    if logging:
        log_step(step, diagnostics, scheduled)
    if probing:
        probe_teacher(step)
    if saving:
        save_checkpoint(step)
    if stop:
        break

# ===== export =====
if step < total_steps:  # stopped by a signal
    log(f"stopped by {signal.Signals(stop).name} after step {step} of {total_steps}, with a "
        f"checkpoint there: run the same command again (resume=true) to go on from it")
elif master:
    export_dir = out_dir / "export"
    launcher = ["python"]
    if distributed:
        launcher = ["torchrun", f"--nproc_per_node={world_size}"]
    command = shlex.join([*launcher, "train.py", *sys.argv[1:]])
    card = weights.model_card(model.teacher.backbone, config, sources, command, code, step,
                              world_size)
    weights.save_hf(model.teacher.backbone, export_dir, card=card)
    (export_dir / "training_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log(f"exported the teacher backbone to {export_dir} (transformers' Dinov2Model, with its "
        f"image processor and model card)")
    log(f"evaluate it against both controls: python eval.py --backbone {export_dir} "
        f"--backbone random:{export_dir} --backbone pixels")
if distributed:
    # Every rank waits for rank 0's export: a rank that tears its gloo group down while
    # rank 0 is still connected can abort ("terminate called without an active exception").
    dist.barrier()
    # DDP's reducer holds gloo work that references tensors: released here, while the
    # interpreter is whole, not during its shutdown, where freeing them can abort the same way.
    del train_model
    gc.collect()
    dist.destroy_process_group()
