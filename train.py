"""RAD-DINO pretraining: DINOv2's student-teacher self-distillation on chest X-rays.

    python train.py                                     # one process: the GPU if there is one, else the CPU
    python train.py config=configs/rad-dino.yaml data.root=/data/cxr
    torchrun --nproc_per_node=8 train.py config=...     # DDP (NCCL on GPUs, gloo on CPU)

One script, top to bottom: config -> distributed -> data -> model -> optimiser and
schedules -> resume -> loop -> export. The method lives in raddino.py, the images in data.py.
"""

import difflib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image, ImageDraw

import data
import phantoms
import raddino

HERE = Path(__file__).resolve().parent

# ===== config =====


def load_config(argv):
    """config.yaml, then an optional `config=other.yaml` on top, then `key=value` overrides.
    Every key must exist in config.yaml and keep its type; a typo gets the nearest key."""
    config = yaml.safe_load((HERE / "config.yaml").read_text())
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"error: arguments are key=value, got {arg!r}")
        if key == "config":
            overrides.update({k: (v, value) for k, v in (yaml.safe_load(Path(value).read_text()) or {}).items()})
        else:
            overrides[key] = (yaml.safe_load(value) if value else "", "the command line")
    for key, (value, source) in overrides.items():
        if key not in config:
            near = difflib.get_close_matches(key, list(config), n=1)
            raise SystemExit(f"error: unknown key {key!r} in {source}" + (f"; did you mean {near[0]!r}?" if near else ""))
        config[key] = check_type(key, value, config[key], source)
    return config


def check_type(key, value, default, source):
    """Coerce ints to floats where the default is a float; refuse anything else that differs."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key in ("compile", "device") or type(value) is type(default):
        return value
    raise SystemExit(f"error: {key} from {source} must be {type(default).__name__} like {default!r}, got {value!r}")


config = load_config(sys.argv[1:])
torch.manual_seed(config["seed"])

# ===== distributed =====
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is world size 1.
distributed = "RANK" in os.environ
rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
local_rank = int(os.environ.get("LOCAL_RANK", 0))
use_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
if use_cuda:
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for fp32 matmuls
if distributed:
    dist.init_process_group("nccl" if use_cuda else "gloo")
master = rank == 0
out_dir = Path(config["out_dir"])


def log(*args):
    if master:
        print(*args, flush=True)


def code_version():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if master:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
log(f"RAD-DINO pretraining | code {code_version()} | torch {torch.__version__} | python {platform.python_version()}")
log(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if use_cuda else ''} | world size {world_size}")
log("config:\n" + yaml.safe_dump(config, sort_keys=False).rstrip())

# ===== data =====
root = Path(config["data.root"])
if config["data.root"] == "data/synthetic" and not (root / "labels.csv").exists():
    if master:  # the built-in default: synthetic phantoms, made once
        log(f"making the built-in SYNTHETIC phantom set ({config['data.synthetic_images']} images) in {root}")
        phantoms.make_phantoms(root, n=config["data.synthetic_images"], size=256, seed=0)
    if distributed:
        dist.barrier()
try:
    paths = data.image_paths(root, split=config["data.split"] or None)
except ValueError as e:  # e.g. a plain folder of images with the default data.split=train
    raise SystemExit(f"error: {e}" + (" (data.split= uses every image)" if config["data.split"] else ""))
global_size, local_size, patch = config["crops.global_size"], config["crops.local_size"], config["model.patch_size"]
multicrop = data.MultiCrop(
    global_size=global_size, local_size=local_size, n_local=config["crops.n_local"],
    global_scale=tuple(config["crops.global_scale"]), local_scale=tuple(config["crops.local_scale"]),
    flip_prob=config["crops.flip_prob"], jitter_prob=config["crops.jitter_prob"], brightness=config["crops.brightness"],
    contrast=config["crops.contrast"], blur_probs=tuple(config["crops.blur_probs"]),
    solarize_prob=config["crops.solarize_prob"])
mask_generator = data.MaskGenerator(global_size // patch)


def make_loader(start_step):
    return data.PretrainLoader(paths, multicrop, mask_generator, config["train.batch_size"], seed=config["seed"],
                               rank=rank, world_size=world_size, start_step=start_step,
                               num_workers=config["data.workers"], on_bad_file=config["data.on_bad_file"],
                               pin_memory=use_cuda, mask_ratio=tuple(config["mask.ratio"]),
                               mask_prob=config["mask.prob"])


log(f"data: {len(paths)} images from {root}" + (" (SYNTHETIC phantoms)" if "synthetic" in str(root) else ""))

# ===== model =====
if config["init.backbone"]:
    # Pretrained weights keep their stored position-embedding grid; other sizes interpolate.
    backbone = raddino.load_backbone(config["init.backbone"], in_chans=1, drop_path_rate=config["model.drop_path"])
    log(f"backbone initialised from {config['init.backbone']}: {backbone.args}")
else:
    backbone = raddino.build_vit(config["model.arch"], img_size=config["model.img_size"], patch_size=patch, in_chans=1,
                                 num_register_tokens=config["model.registers"], layerscale=config["model.layerscale"],
                                 drop_path_rate=config["model.drop_path"])
backbone.train()
backbone.grad_checkpointing = config["model.grad_checkpointing"]
model = raddino.StudentTeacher(
    backbone, out_dim=config["head.out_dim"], hidden_dim=config["head.hidden_dim"],
    bottleneck_dim=config["head.bottleneck_dim"], head_layers=config["head.layers"],
    separate_ibot_head=config["ibot.separate_head"], centering=config["centering"],
    student_temp=config["loss.student_temp"], center_momentum=config["loss.center_momentum"],
    dino_weight=config["loss.dino_weight"], koleo_weight=config["loss.koleo_weight"],
    ibot_weight=config["loss.ibot_weight"]).to(device)
if config["init.head"]:
    model.load_pretrained(config["init.head"])
n_params = sum(p.numel() for p in model.student.backbone.parameters())
log(f"student backbone: {n_params / 1e6:.1f}M parameters, {backbone.args['depth']} blocks, width {backbone.embed_dim}")
if config["compile"] is True or (config["compile"] == "auto" and use_cuda):
    # Compile the networks in place (state-dict names unchanged), before DDP wraps them.
    for module in (*model.student.values(), *model.teacher.values()):
        module.compile()
train_model = torch.nn.parallel.DistributedDataParallel(
    model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False) if distributed else model

# ===== optimiser and schedules =====
depth = backbone.args["depth"]


def param_groups():
    """DINOv2's per-parameter settings, grouped by (lr multiplier, weight decay on/off,
    prototype layer): layer-wise lr decay (block i: decay^(depth - i), embeddings and tokens
    decay^(depth + 1), final norm and heads 1), patch embedding x0.2, and no weight decay
    on biases, norms and LayerScale gammas."""
    groups = {}
    for name, p in model.student.named_parameters():
        if name.startswith("backbone."):
            short = name[len("backbone."):]
            layer = (int(short.split(".")[1]) + 1 if short.startswith("blocks.")
                     else depth + 1 if short.startswith("norm.") else 0)  # 0: patch embed, pos embed, tokens
            lr_mult = config["optim.layer_decay"] ** (depth + 1 - layer)
            lr_mult *= config["optim.patch_embed_lr_mult"] if short.startswith("patch_embed.") else 1.0
        else:
            lr_mult = 1.0
        decay = not (name.endswith(".bias") or "norm" in name or name.endswith(".gamma"))
        key = (lr_mult, decay, ".last_layer." in name)
        groups.setdefault(key, {"params": [], "lr_mult": lr_mult, "decay": decay, "last_layer": key[2], "names": []})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


groups = param_groups()
optimizer = torch.optim.AdamW(groups, betas=tuple(config["optim.betas"]), fused=use_cuda)
total_steps, epoch = config["train.steps"], config["train.epoch_length"]
global_batch = config["train.batch_size"] * world_size
peak_lr = config["optim.base_lr"] * math.sqrt(global_batch / 1024)  # DINOv2's sqrt scaling rule


def cosine(step, start, end, warmup_steps=0, warmup_from=0.0):
    """Linear warm-up from warmup_from to start, then a cosine from start to end at total_steps."""
    if step < warmup_steps:
        return warmup_from + (start - warmup_from) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(progress, 1.0)))


def schedules(step):
    """Every schedule at one step: explicit functions of the step, so resuming needs no state."""
    lr = cosine(step, peak_lr, config["optim.min_lr"], config["optim.warmup_epochs"] * epoch)
    warm_t = config["teacher_temp.warmup_epochs"] * epoch
    return {"lr": lr,
            "last_layer_lr": 0.0 if step < config["optim.freeze_last_layer_epochs"] * epoch else lr,
            "wd": cosine(step, config["optim.weight_decay"], config["optim.weight_decay_end"]),
            "momentum": cosine(step, config["momentum.start"], config["momentum.end"]),
            "teacher_temp": config["teacher_temp.end"] if step >= warm_t else config["teacher_temp.start"] + (
                config["teacher_temp.end"] - config["teacher_temp.start"]) * step / warm_t}


# ===== resume =====
checkpoint_paths = lambda: sorted(out_dir.glob("checkpoint_*.pt"))  # noqa: E731 (zero-padded: sorted = by step)
start_step, history = 0, []
if config["resume"] and checkpoint_paths():
    for path in reversed(checkpoint_paths()):  # the newest readable one; a damaged one is reported, not used
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:
            log(f"WARNING: checkpoint {path} is unreadable ({e}); trying the one before")
    else:
        raise SystemExit(f"error: no readable checkpoint in {out_dir}; move them away or set resume=false")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start_step, history = state["step"], state["history"]
    rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]  # drop path draws from it
    torch.set_rng_state(rng["cpu"])
    if use_cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    log(f"resumed from {path} at step {start_step}")


def save_checkpoint(step):
    """Everything needed to continue bitwise: weights, optimiser, step, every rank's RNG and
    the history; the loader needs only the step. Written atomically, oldest ones pruned."""
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if use_cuda else {})}
    all_rng = [rng] * world_size
    if distributed:
        dist.all_gather_object(all_rng, rng)
    if not master:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": all_rng,
             "history": history, "config": config, "backbone_args": backbone.args, "code": code_version()}
    path = out_dir / f"checkpoint_{step:07d}.pt"
    raddino.atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoint_paths()[:-config["train.keep_checkpoints"]]:
        old.unlink()
    draw_loss_curve(out_dir / "loss.png")
    log(f"saved {path}")


def draw_loss_curve(path, width=640, height=360, pad=40):
    """The total and per-term losses against the step, drawn with Pillow."""
    if len(history) < 2:
        return
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [h["step"] for h in history]
    terms = {"loss": (0, 0, 0), "dino_local": (31, 119, 180), "dino_global": (44, 160, 44), "ibot": (214, 39, 40),
             "koleo": (148, 103, 189)}
    values = [h[t] * (0.1 if t == "koleo" else 1) for h in history for t in terms]
    top, bottom = max(values), min(values)
    x = lambda s: pad + (width - 2 * pad) * (s - steps[0]) / max(1, steps[-1] - steps[0])  # noqa: E731
    y = lambda v: height - pad - (height - 2 * pad) * (v - bottom) / max(top - bottom, 1e-9)  # noqa: E731
    draw.rectangle([pad, pad, width - pad, height - pad], outline=(180, 180, 180))
    for i, (term, colour) in enumerate(terms.items()):
        scale = 0.1 if term == "koleo" else 1.0  # KoLeo is shown with its weight
        draw.line([(x(h["step"]), y(h[term] * scale)) for h in history], fill=colour, width=2)
        draw.text((pad + 5 + 100 * i, 8), term + (" x0.1" if term == "koleo" else ""), fill=colour)
    draw.text((pad, height - pad + 8), f"step {steps[0]}", fill=(0, 0, 0))
    draw.text((width - pad - 70, height - pad + 8), f"step {steps[-1]}", fill=(0, 0, 0))
    draw.text((5, pad - 12), f"{top:.2f}", fill=(0, 0, 0))
    draw.text((5, height - pad - 12), f"{bottom:.2f}", fill=(0, 0, 0))
    image.save(path)


# ===== loop =====
log(f"training steps {start_step} -> {total_steps}: global batch {global_batch} (x{2 + config['crops.n_local']} crops), "
    f"peak lr {peak_lr:.2e}, one epoch = {epoch} steps")
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else torch.autocast("cpu", enabled=False)
clip_modules = [model.student[k] for k in model.student.keys()]  # backbone and heads clipped separately
metrics_file = open(out_dir / "metrics.jsonl", "a") if master else None
window_start, window_images, skipped, warned = time.time(), 0, 0, False
step = start_step
for batch in make_loader(start_step) if start_step < total_steps else []:
    step = batch["step"]
    values = schedules(step)
    for group in optimizer.param_groups:
        group["lr"] = (values["last_layer_lr"] if group["last_layer"] else values["lr"]) * group["lr_mult"]
        group["weight_decay"] = values["wd"] if group["decay"] else 0.0
    global_crops = batch["global"].to(device, non_blocking=True)
    local_crops = batch["local"].to(device, non_blocking=True)
    masks = batch["masks"].to(device, non_blocking=True)
    with autocast:
        out = train_model(global_crops, local_crops, masks, values["teacher_temp"])
    terms = {k: out[k].detach().float() for k in ("dino_local", "dino_global", "koleo", "ibot", "loss")}
    if not torch.isfinite(torch.stack(list(terms.values()))).all():  # one sync; stop before anything is applied
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        raise SystemExit(f"error: non-finite loss at step {step}: {', '.join(f'{k}={float(terms[k])}' for k in bad)}; "
                         f"no checkpoint written after it (newest: {checkpoint_paths()[-1:] or 'none'})")
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    for module in clip_modules:
        torch.nn.utils.clip_grad_norm_(module.parameters(), config["optim.clip_grad"])
    optimizer.step()
    model.update_teacher(values["momentum"])
    window_images += global_batch
    skipped += batch["n_skipped"]

    if (step + 1) % config["train.log_every"] == 0 or step + 1 == total_steps:
        if distributed:  # losses averaged over ranks for the log
            stacked = torch.stack(list(terms.values()))
            dist.all_reduce(stacked)
            terms = dict(zip(terms, stacked / world_size))
        probs = out["teacher_probs"].float()
        log_k = math.log(probs.shape[1])
        entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean()) / log_k  # 1 = uniform collapse
        batch_mean = probs.mean(0)
        batch_entropy = float(-(batch_mean * batch_mean.clamp_min(1e-12).log()).sum())  # ~0 = one prototype for all
        cls = torch.nn.functional.normalize(out["student_cls"].float(), dim=-1)
        cls_spread = float(cls.std(0).mean() * math.sqrt(cls.shape[1]))  # ~1 spread out, ~0 collapsed
        elapsed = time.time() - window_start
        speed = window_images / elapsed
        eta = (total_steps - step - 1) * global_batch / speed
        memory = (torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        record = {"step": step + 1, **{k: float(v) for k, v in terms.items()}, **values,
                  "teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy, "cls_spread": cls_spread,
                  "images_per_s": speed, "peak_mem_gib": memory, "skipped_files": skipped}
        history.append(record)
        log(f"step {step + 1}/{total_steps} | loss {record['loss']:.4f} (dino local {record['dino_local']:.3f} "
            f"global {record['dino_global']:.3f} ibot {record['ibot']:.3f} koleo {record['koleo']:.3f}) | "
            f"lr {values['lr']:.2e} wd {values['wd']:.3f} mom {values['momentum']:.4f} "
            f"T_t {values['teacher_temp']:.3f} | {speed:.1f} img/s | ETA {eta / 60:.1f} min | "
            f"mem {memory:.2f} GiB | H(t) {entropy:.2f} H(mean t) {batch_entropy:.2f} cls spread {cls_spread:.2f}"
            + (f" | skipped files {skipped}" if skipped else ""))
        collapsed = entropy > 0.98 or batch_entropy < 0.1 or cls_spread < 0.02
        if step + 1 > config["teacher_temp.warmup_epochs"] * epoch and collapsed and not warned:  # said once
            warned = True
            log("WARNING: the outputs look collapsed (teacher near-uniform, one prototype for every image, or all "
                "CLS embeddings alike). Check the learning rate, teacher temperature and centring; in runs of a few "
                "hundred steps DINOv2's settings do this (README, 'Short runs').")
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        window_start, window_images = time.time(), 0
    if (step + 1) % config["train.save_every"] == 0 or step + 1 == total_steps:
        save_checkpoint(step + 1)
    if step + 1 >= total_steps:
        break

# ===== export =====
if master:
    export_dir = raddino.save_hf(model.teacher.backbone, out_dir / "export")
    log(f"exported the teacher backbone to {export_dir} (Hugging Face Dinov2Model layout)")
    log(f"evaluate it: python eval.py --backbone {export_dir} --backbone random:{config['model.arch']} "
        f"--data {root}")
if distributed:
    dist.destroy_process_group()
