"""train.py's configuration: config.yaml, the files and key=value overrides on top of it,
each key type-checked and each value that a type cannot judge checked by name. As nanoGPT's
configurator.py, apart so that train.py reads as the run itself.
"""
import difflib
from pathlib import Path

import yaml

# Keys whose value may take more than one type; every other key keeps config.yaml's type.
FLEXIBLE_TYPES = {"compile": (bool, str), "data.root": (str, list)}


def load_config(defaults, argv):
    """The `defaults` file (config.yaml), then an optional `config=other.yaml` on top, then
    `key=value` overrides, checked. Every key must exist in config.yaml and keep its type; a
    typo gets the nearest key."""
    config = yaml.safe_load(Path(defaults).read_text())
    from_files = {}
    from_line = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"error: arguments are key=value, got {arg!r}")
        if key == "config":
            file_values = yaml.safe_load(Path(value).read_text()) or {}
            for file_key, file_value in file_values.items():
                from_files[file_key] = (file_value, value)
        else:
            parsed = yaml.safe_load(value) if value else ""
            from_line[key] = (parsed, "the command line")
    # The files first, then key=value on top, wherever config= stands on the line.
    overrides = {**from_files, **from_line}
    for key, (value, source) in overrides.items():
        if key not in config:
            message = f"error: unknown key {key!r} in {source}"
            near = difflib.get_close_matches(key, list(config), n=1)
            if near:
                message += f"; did you mean {near[0]!r}?"
            raise SystemExit(message)
        config[key] = check_type(key, value, config[key], source)
    check_values(config)
    return config


def check_type(key, value, default, source):
    """An int where the default is a float becomes a float; any other change of type is an error."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, float) and isinstance(value, str):
        # YAML 1.1 reads 5e-4 (no dot) as a string; Python reads it as the float it is.
        try:
            return float(value)
        except ValueError:
            pass
    allowed = FLEXIBLE_TYPES.get(key, (type(default),))
    if type(value) in allowed:
        return value
    raise SystemExit(f"error: {key} from {source} must be {type(default).__name__} "
                     f"like {default!r}, got {value!r}")


def check_values(config):
    """The values a type check cannot judge, refused at once with the key's name."""
    choices = {"device": ("auto", "cuda", "cpu"), "compile": ("auto", True, False),
               "precision": ("auto", "bf16", "fp32"),
               "centering": ("centering", "sinkhorn_knopp"),
               "logger": ("", "tensorboard", "wandb")}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise SystemExit(f"error: {key} must be one of {', '.join(map(str, allowed))}, "
                             f"got {config[key]!r}")
    for key in ("train.steps", "train.batch_size", "train.accum_steps", "train.epoch_length",
                "train.save_every",
                "train.log_every", "train.keep_checkpoints", "eval.images"):
        if config[key] < 1:
            raise SystemExit(f"error: {key} must be at least 1, got {config[key]}")
    patch = config["model.patch_size"]
    for key in ("crops.global_size", "crops.local_size", "highres.global_size",
                "highres.local_size"):
        if config[key] % patch:  # the patch embedding would drop the border
            raise SystemExit(f"error: {key}={config[key]} is not a multiple of "
                             f"model.patch_size={patch}")
    if not 0 < config["highres.fraction"] <= 1:
        raise SystemExit(f"error: highres.fraction must be in (0, 1], got "
                         f"{config['highres.fraction']}")
    if config["eval.every"] < 0:
        raise SystemExit(f"error: eval.every must be 0 (no probe) or more, got "
                         f"{config['eval.every']}")
