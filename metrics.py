"""A run's metrics where its user looks for them: `metrics.jsonl` always (the whole history,
one JSON record a line), and with `logger=tensorboard` or `logger=wandb` every number of it
there too. A logger's package is imported only when it is asked for."""

import importlib
import json

# Each logger's module; its pip package has the logger's name.
LOGGER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


def import_logger(name):
    """The module of logger `name` ("" for none: None), imported at once, so that a missing
    package stops the run before any work."""
    if not name:
        return None
    try:
        return importlib.import_module(LOGGER_MODULES[name])
    except ImportError as error:
        raise SystemExit(f"error: logger={name} needs the {name} package ({error}): "
                         f"pip install {name}")


class MetricsLog:
    """metrics.jsonl in out_dir, and the logger beside it.

    The file is written again from `history` (a checkpoint's, on a resume), not appended to:
    the steps logged after that checkpoint and before a kill are then not there twice.
    TensorBoard's purge_step hides them in its own files; wandb goes on with the run whose
    id the checkpoint kept (`run_id`), and drops the steps it is sent again."""

    def __init__(self, out_dir, history, logger, module, config, start_step, run_id=None):
        self.logger = logger
        self.run_id = run_id
        self.file = open(out_dir / "metrics.jsonl", "w")
        for record in history:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if logger == "tensorboard":
            self.writer = module.SummaryWriter(str(out_dir / "tensorboard"),
                                               purge_step=start_step + 1)
        elif logger == "wandb":
            self.writer = module.init(project="rad-dino", name=out_dir.name, dir=out_dir,
                                      config=config, id=run_id, resume="allow")
            self.run_id = self.writer.id

    def write(self, record):
        """One record: a line of metrics.jsonl, flushed (a kill loses nothing), and each of
        its numbers to the logger at the record's step."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {key: value for key, value in record.items()
                   if key != "step" and type(value) in (int, float)}
        if self.logger == "tensorboard":
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
        elif self.logger == "wandb":
            self.writer.log(numbers, step=record["step"])
