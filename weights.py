"""Weights in and out: the file formats a RAD-DINO user holds.

    read_safetensors / write_safetensors   the format, parsed and written by hand
    dinov2_to_hf / hf_to_dinov2            DINOv2 hub names <-> transformers' Dinov2Model names
    fold_channels                          3-channel patch kernels <-> 1 channel, exactly
    load_backbone                          a ready ViT from a hub .pth, a Hugging Face folder
                                           (microsoft/rad-dino), a bare .safetensors, a train.py
                                           checkpoint or an official DINOv2 training checkpoint
    load_head                              a DINOv2-style DINO head into student and teacher
    save_hf                                a folder that transformers' AutoModel,
                                           AutoImageProcessor and pipeline() load as they are
    model_card                             the README.md of a train.py export
    save_checkpoint, read_newest_checkpoint  train.py's checkpoints, written atomically

Nothing here runs code from a file: .pth files are read with torch.load(weights_only=True)
and safetensors files are checked byte by byte before a tensor is made.
"""

import json
import math
import os
import re
from pathlib import Path

import torch

import data
import raddino

# ===== safetensors =====
# The format: an 8-byte little-endian header length N, N bytes of JSON
# {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the
# raw little-endian bytes; offsets count from the end of the header and tile the data.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def read_safetensors(path, return_metadata=False):
    """A .safetensors file -> {name: tensor}, trusting nothing in it: every malformation is
    a ValueError that names the file and the fault."""
    data = Path(path).read_bytes()

    def check(ok, why):
        if not ok:
            raise ValueError(f"{path}: not a valid safetensors file: {why}")

    check(len(data) >= 8, f"truncated: {len(data)} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    check(n <= MAX_HEADER_BYTES, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    check(8 + n <= len(data), f"header length {n} runs past the end of the {len(data)}-byte file")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        check(False, f"the header is not JSON ({error})")
    check(isinstance(header, dict), "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = len(data) - 8 - n
    spans = []
    for name, entry in header.items():
        entry = entry if isinstance(entry, dict) else {}
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        check(dtype in SAFETENSORS_DTYPES, f"tensor {name!r} has unknown dtype {dtype!r}")
        well_formed = (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                       and all(type(v) is int and v >= 0 for v in shape + offsets))
        check(well_formed, f"tensor {name!r}: bad shape or offsets")
        begin, end = offsets
        check(begin <= end <= data_size,
              f"tensor {name!r}: offsets [{begin}, {end}] outside the {data_size}-byte data")
        needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        check(needed == end - begin,
              f"tensor {name!r}: shape {shape} of {dtype} needs {needed} bytes, "
              f"offsets give {end - begin}")
        spans.append((begin, end, name))
    # The byte ranges must tile the data: no overlap, no gap, nothing left over.
    position = 0
    for begin, end, name in sorted(spans):
        fault = "overlap" if begin < position else "gap"
        check(begin == position,
              f"tensor {name!r} starts at {begin}, expected {position} ({fault})")
        position = end
    check(position == data_size, f"tensors cover {position} of {data_size} data bytes")
    tensors = {}
    for begin, end, name in spans:
        dtype = SAFETENSORS_DTYPES[header[name]["dtype"]]
        shape = header[name]["shape"]
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:  # a copy out of the file's buffer: aligned, and the buffer can go
            raw = bytearray(data[8 + n + begin:8 + n + end])
            tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape)
    if return_metadata:
        return tensors, metadata
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """{name: tensor} -> a .safetensors file, written atomically."""
    header = {}
    blobs = []
    offset = 0
    for name, tensor in tensors.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        blob = flat.view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
    atomic_write(path, lambda f: f.writelines([len(raw).to_bytes(8, "little"), raw, *blobs]))


def atomic_write(path, write):
    """write(file) into a temporary file, fsync, rename over `path`: a crash at any moment
    leaves either the old file or the new one, never half of one."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


# ===== DINOv2 names <-> Hugging Face names =====
# Outside the blocks every tensor is a rename. Inside, q, k and v are the three thirds of
# DINOv2's fused qkv (rows ordered q | k | v); everything else is a rename.

HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
HF_BLOCK = {
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
    "ls2.gamma": "layer_scale2.lambda1",
}
QKV = ("query", "key", "value")


def split_block_key(key, prefix):
    """'blocks.3.attn.proj.weight' -> ('3', 'attn.proj', '.weight'); gammas have no suffix."""
    index, rest = key[len(prefix):].split(".", 1)
    part, _, kind = rest.rpartition(".")
    if kind in ("weight", "bias"):
        return index, part, "." + kind
    return index, rest, ""


def dinov2_to_hf(state):
    out = {}
    for key, value in state.items():
        if key in HF_TOP:
            out[HF_TOP[key]] = value
            continue
        index, part, kind = split_block_key(key, "blocks.")
        prefix = f"encoder.layer.{index}."
        if part == "attn.qkv":
            for name, third in zip(QKV, value.chunk(3)):
                out[f"{prefix}attention.attention.{name}{kind}"] = third
        else:
            out[f"{prefix}{HF_BLOCK[part]}{kind}"] = value
    return out


def hf_to_dinov2(state):
    top = {hf: ours for ours, hf in HF_TOP.items()}
    block = {hf: ours for ours, hf in HF_BLOCK.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key.startswith("encoder.layer."):
            index, part, kind = split_block_key(key, "encoder.layer.")
            if part == "attention.attention.query":
                thirds = [state[key.replace("query", name)] for name in QKV]
                out[f"blocks.{index}.attn.qkv{kind}"] = torch.cat(thirds)
            elif not part.startswith("attention.attention."):  # key and value: taken with query
                out[f"blocks.{index}.{block.get(part, part)}{kind}"] = value
        else:
            out[key] = value  # unknown: left for the strict load to report
    return out


def fold_channels(weight, in_chans):
    """A patch kernel (D, C, p, p) -> in_chans channels.

    3 -> 1 sums over the channels: exact for an X-ray copied to 3 channels, since RAD-DINO
    normalises each with the same mean and std. 1 -> 3 divides evenly back."""
    channels = weight.shape[1]
    if channels == in_chans:
        return weight
    if channels == 3 and in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if channels == 1 and in_chans == 3:
        return weight.expand(-1, 3, -1, -1) / 3
    raise ValueError(f"cannot convert a {channels}-channel patch embedding to {in_chans} channels")


# ===== Loading =====


# Where DINOv2's hub downloads its backbones from, by name (dinov2/hub/backbones.py).
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{0}_pretrain.pth"


def read_weights(path):
    """A state dict from .safetensors or a torch file, loaded with weights_only: no code runs.
    A missing DINOv2 hub file (dinov2_vitb14_pretrain.pth, ...) says where to download it."""
    path = Path(path)
    if not path.is_file():
        message = f"{path}: no such file"
        name = path.name.removesuffix("_pretrain.pth")
        if name.startswith("dinov2_") and name != path.name:
            message += f"; download it from {DINOV2_URL.format(name)}"
        raise FileNotFoundError(message)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = f"{path}: cannot be read as torch weights with weights_only=True ({error})"
        raise ValueError(message) from error


def strip_prefix(state, prefix):
    """The tensors under `prefix`, renamed without it; the state unchanged if there are none."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner or state


def load_strict(module, state, source):
    """load_state_dict(strict=True) whose error names the file and every missing, unexpected
    and mis-shaped tensor (DINOv2's strict=False drops them without a word)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{source}: weights do not fit {type(module).__name__}: "
            f"missing {len(missing)} {missing[:10]}, "
            f"unexpected {len(unexpected)} {unexpected[:10]}, "
            f"mis-shaped {len(misshaped)} {misshaped[:10]}")
    module.load_state_dict(state, strict=True)


def infer_args(state, config=None):
    """ViT(...) arguments read off the tensors, refined by config.json if there is one."""
    width = state["cls_token"].shape[-1]
    patch_kernel = state["patch_embed.proj.weight"]
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:  # SwiGLU stores 2/3 of the nominal hidden width, twice (see raddino.SwiGLU)
        hidden = state["blocks.0.mlp.w12.weight"].shape[0] * 3 // 4
    else:
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    args = dict(
        img_size=grid * patch_kernel.shape[-1],
        patch_size=patch_kernel.shape[-1],
        in_chans=patch_kernel.shape[1],
        embed_dim=width,
        depth=max(blocks) + 1,
        num_heads=width // 64,  # DINOv2's heads are 64 wide
        mlp_ratio=hidden / width,
        ffn="swiglu" if swiglu else "mlp",
        num_register_tokens=registers,
    )
    if config:
        if config.get("layer_norm_eps", 1e-6) != 1e-6 or not config.get("qkv_bias", True):
            raise ValueError(
                f"config.json: only layer_norm_eps 1e-6 with qkv_bias is supported, got {config}")
        args["num_heads"] = config.get("num_attention_heads", args["num_heads"])
        args["mlp_ratio"] = config.get("mlp_ratio", args["mlp_ratio"])
        # Not in the tensors, and it matters to a random network of this shape (random:PATH):
        # LayerScale 1.0 blocks mix, 1e-5 blocks start as the identity.
        if "layerscale_value" in config:
            args["layerscale_init"] = config["layerscale_value"]
    return args


def backbone_state(path):
    """(state dict in DINOv2 names, ViT arguments, the file read) from any supported source."""
    path = Path(path)
    config = None
    if path.is_dir():
        for name in ("config.json", "model.safetensors"):
            if not (path / name).exists():
                raise FileNotFoundError(
                    f"{path}: a Hugging Face folder needs {name}, which is missing")
        config = json.loads((path / "config.json").read_text())
        path = path / "model.safetensors"
    state = read_weights(path)
    args = None
    if isinstance(state, dict) and "backbone_args" in state and "model" in state:  # train.py's
        args = dict(state["backbone_args"])
        args["drop_path_rate"] = 0.0
        state = strip_prefix(state["model"], "teacher.backbone.")
    elif isinstance(state, dict) and isinstance(state.get("teacher"), dict):  # official DINOv2
        state = strip_prefix(state["teacher"], "backbone.")
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: holds no backbone weights")
    # Official training checkpoints with block_chunks > 0 name blocks blocks.{chunk}.{i}.*.
    state = {re.sub(r"^blocks\.\d+\.(\d+\.)", r"blocks.\1", k): v for k, v in state.items()}
    if "embeddings.cls_token" in state:
        state = hf_to_dinov2(state)
    try:
        args = args or infer_args(state, config)
    except KeyError as error:
        raise ValueError(f"{path}: not a DINOv2 backbone, tensor {error} is missing") from error
    return state, args, path


def load_backbone(path, **overrides):
    """A ready ViT in eval mode from a DINOv2 hub .pth (with registers or not), a Hugging Face
    folder (config.json + model.safetensors, e.g. microsoft/rad-dino), a bare .safetensors in
    either naming, a train.py checkpoint (its teacher) or an official DINOv2 training
    checkpoint. Overrides: any ViT argument, e.g. in_chans=1 (folds the patch embedding),
    drop_path_rate, interpolate_offset."""
    state, args, source = backbone_state(path)
    args = {**args, **overrides}
    kernel = state["patch_embed.proj.weight"]
    state["patch_embed.proj.weight"] = fold_channels(kernel, args["in_chans"])
    model = raddino.ViT(**args)
    load_strict(model, {k: v.float() for k, v in state.items()}, source)
    return model.eval()


def load_head(model, path):
    """Start both DINO heads of a raddino.StudentTeacher from a DINOv2-style head file
    (mlp.*, last_layer.weight_g/v), optionally prefixed dino_head., student.dino_head. or
    teacher.dino_head."""
    state = read_weights(path)
    for prefix in ("student.dino_head.", "teacher.dino_head.", "dino_head."):
        state = strip_prefix(state, prefix)
    for head in (model.student.dino_head, model.teacher.dino_head):
        load_strict(head, state, path)


# ===== Saving for transformers =====


def hf_config(args, channels):
    """config.json for transformers' Dinov2Model (Dinov2WithRegistersModel with registers)."""
    registers = args["num_register_tokens"]
    mlp_ratio = args["mlp_ratio"]
    if float(mlp_ratio).is_integer():
        mlp_ratio = int(mlp_ratio)  # transformers wants an int where it can have one
    config = dict(
        architectures=["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        model_type="dinov2_with_registers" if registers else "dinov2",
        hidden_size=args["embed_dim"],
        num_hidden_layers=args["depth"],
        num_attention_heads=args["num_heads"],
        mlp_ratio=mlp_ratio,
        patch_size=args["patch_size"],
        image_size=args["img_size"],
        num_channels=channels,
        layer_norm_eps=1e-6,
        layerscale_value=args["layerscale_init"],
        use_swiglu_ffn=args["ffn"] == "swiglu",
        qkv_bias=True,
        hidden_act="gelu",
        drop_path_rate=0.0,
        use_mask_token=True,
        torch_dtype="float32",
    )
    if registers:
        config["num_register_tokens"] = registers
    return config


def preprocessor_config(image_size, mean=data.MEAN, std=data.STD):
    """preprocessor_config.json of microsoft/rad-dino's BitImageProcessor, at image_size: to
    RGB, shorter side to image_size (bicubic), centre crop, x / 255, one mean and std on
    every channel. data.preprocess is the same on one channel, to the last bit with Pillow.

    transformers 5 reads image_processor_type as a family and picks the backend itself:
    BitImageProcessorPil (Pillow, as rad-dino was made) without torchvision, BitImageProcessor
    (torchvision, another bicubic) with it; no field in this file can choose, so a user who has
    torchvision and wants Pillow's pixels passes backend="pil" to AutoImageProcessor."""
    return dict(
        image_processor_type="BitImageProcessor",
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # PIL's BICUBIC
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[mean] * 3,
        image_std=[std] * 3,
    )


def save_hf(model, out_dir, channels=3, image_size=None, card=None):
    """A folder that transformers loads with no extra step: config.json + model.safetensors
    (AutoModel: Dinov2Model, no missing or unexpected keys), preprocessor_config.json
    (AutoImageProcessor, pipeline("image-feature-extraction")) at image_size (default: the
    model's own), and README.md (the model card) when `card` text is given. 3 channels by
    default, as microsoft/rad-dino ships; a 1-channel folder (channels=1) loads in AutoModel
    and in load_backbone but gets no preprocessor_config.json, since transformers' image
    processors hand out RGB."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = model.args
    image_size = image_size or args["img_size"]
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state["patch_embed.proj.weight"] = fold_channels(state["patch_embed.proj.weight"], channels)
    write_safetensors(out_dir / "model.safetensors", dinov2_to_hf(state), metadata={"format": "pt"})
    files = {"config.json": hf_config(args, channels)}
    if channels == 3:
        files["preprocessor_config.json"] = preprocessor_config(image_size)
    for name, content in files.items():
        atomic_write_text(out_dir / name, json.dumps(content, indent=2) + "\n")
    if card:
        atomic_write_text(out_dir / "README.md", card)
    return out_dir


def model_card(backbone, config, sources, command, code, step, world_size):
    """README.md of a train.py export, the hub's convention for saying what a model is: the
    network (`backbone`, the exported ViT), how it was trained (the resolved `config`, `step`
    steps on `world_size` processes, by code version `code`, from `sources` as
    data.read_sources gives them) and the `command` that reproduces it."""
    a = backbone.args
    n_params = sum(p.numel() for p in backbone.parameters())
    global_batch = world_size * config["train.batch_size"]
    data_lines = "\n".join(f"  - `{s['name']}`: {len(s['paths'])} images, weight {s['weight']:g}"
                           for s in sources)
    return f"""---
library_name: transformers
tags: [rad-dino, dinov2, chest-x-ray, self-supervised]
---
# RAD-DINO-style encoder ({config['model.arch']}, trained by train.py)

A Vision Transformer pretrained with DINOv2's self-supervised objective (DINO + iBOT +
KoLeo) on chest X-rays alone, no text and no labels, by this repository's `train.py`
(code version `{code}`). The exported network is the EMA teacher's backbone.

- Architecture: ViT, patch {a['patch_size']}, width {a['embed_dim']}, {a['depth']} blocks, \
{a['num_heads']} heads, {a['num_register_tokens']} register tokens, \
{n_params / 1e6:.1f}M parameters; trained on one channel, exported with 3 equal channels.
- Input: `preprocessor_config.json`, rad-dino's processor at {a['img_size']} px: shorter \
side to {a['img_size']}, bicubic, centre crop, x/255, mean {data.MEAN}, std {data.STD}.
- Training: {step} steps of {global_batch} images ({world_size} x \
{config['train.batch_size']} per process), {2 + config['crops.n_local']} crops per image \
({config['crops.global_size']} px global, {config['crops.local_size']} px local).
- Data:
{data_lines}

Reproduce:

```bash
{command}
```

```python
from transformers import pipeline
extract = pipeline(task="image-feature-extraction", model="path/to/this/folder", pool=False)
```

The resolved configuration is in `training_config.yaml` beside this file.

Research use only: not a medical device, not validated for any clinical purpose.
"""


# ===== train.py's checkpoints =====
# One torch file per save: {"model", "optimizer", "step", "rng", "history", "config",
# "backbone_args", "code", "skipped_files"}; load_backbone reads its teacher's backbone.


def checkpoint_paths(folder):
    """The checkpoints in folder, oldest first (zero-padded steps: by name is by step)."""
    return sorted(Path(folder).glob("checkpoint_*.pt"))


def save_checkpoint(state, folder, keep):
    """state -> folder/checkpoint_{step}.pt, written atomically; then all but the newest
    `keep` checkpoints in folder are deleted. Returns the path."""
    path = Path(folder) / f"checkpoint_{state['step']:07d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoint_paths(folder)[:-keep]:
        old.unlink()
    return path


def load_optimizer_state(optimizer, saved):
    """optimizer.load_state_dict, keeping this run's implementation flags: the saved groups
    carry them too, so a checkpoint written on a CPU (fused=False) would otherwise turn a
    GPU run's fused AdamW off for good."""
    flags = [{key: group[key] for key in ("fused", "foreach", "capturable") if key in group}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)


def read_newest_checkpoint(folder, warn=print):
    """(path, state) of the newest checkpoint in folder that loads. A newer one that does not
    (atomic writes rule out a crash mid-save, not a disk fault or a copy cut short) is passed
    over with a warning; none at all that loads is a ValueError."""
    for path in reversed(checkpoint_paths(folder)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            warn(f"WARNING: checkpoint {path} is unreadable ({error}); trying the one before")
    raise ValueError(f"no readable checkpoint in {folder}")


def update_model_card(folder, table, backbones, command, data_name="data"):
    """The "## Evaluation" section of an export's model card (README.md) gets a "### <data>"
    part: eval.py's results table {(task, metric): {backbone: cell}} with the command that made
    it. A part for the same data is replaced; parts for other data sets stay."""
    card = Path(folder) / "README.md"
    lines = [f"### {data_name}", "", f"`{command}`", "",
             "| probe | metric | " + " | ".join(backbones) + " |",
             "|---|---|" + "---|" * len(backbones)]
    for (task, name), cells in table.items():
        values = " | ".join(cells.get(spec, "-") for spec in backbones)
        lines.append(f"| {task} | {name} | {values} |")
    part = "\n".join(lines) + "\n"
    text = card.read_text()
    start = text.find("\n## Evaluation\n")
    if start < 0:
        before = text.rstrip("\n") + "\n"
        parts = []
        rest = ""
    else:
        following = text.find("\n## ", start + 1)  # the next section, if any, stays
        rest = "" if following < 0 else "\n" + text[following + 1:]
        before = text[:start + 1]
        section = text[start + 1:] if following < 0 else text[start + 1:following + 1]
        # The parts a run wrote before, one per data set; anything else there goes.
        parts = ["### " + p.rstrip("\n") + "\n" for p in section.split("\n### ")[1:]]
        parts = [p for p in parts if not p.startswith(f"### {data_name}\n")]
    section = "\n".join(["## Evaluation\n", *parts, part])
    atomic_write_text(card, before + "\n" + section + rest)
    return card
