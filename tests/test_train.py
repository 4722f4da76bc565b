"""train.py end to end, as a user runs it: config overrides, schedules, parameter groups,
checkpoints, bitwise resume after SIGKILL and SIGTERM, DDP on CPU with torchrun's restarts,
the NaN stop and the experiment logger."""

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import backbones
import configurator
import data
import phantoms
import probes
import raddino
import weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    phantoms.make_phantoms(folder, n=48, size=64, seed=0)
    return folder


def tiny_run(phantom_set, out_dir, *extra):
    """A run small enough for CI: ViT-Ti on 56-px global / 28-px local crops, a small head."""
    return [f"out_dir={out_dir}", f"data.root={phantom_set}", "data.workers=0",
            "model.arch=vit_tiny", "crops.global_size=56", "crops.local_size=28", "crops.n_local=2",
            "train.batch_size=4", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
            "compile=false", "train.log_every=1", *extra]


def train(args, launcher=(sys.executable,), timeout=300, check=True):
    result = subprocess.run([*launcher, str(ROOT / "train.py"), *args], capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT, env=ENV)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics_losses(out_dir):
    """[(step, loss)] of metrics.jsonl's step records, in file order."""
    records = map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def student_state(out_dir):
    newest = sorted(Path(out_dir).glob("checkpoint_*.pt"))[-1]
    return torch.load(newest, weights_only=True)


# ----- config -----

def config_error(argv):
    """configurator's one-line refusal of argv, in process (what train.py prints)."""
    with pytest.raises(SystemExit) as refused:
        configurator.load_config(ROOT / "config.yaml", argv)
    return str(refused.value)


def test_unknown_keys_and_wrong_types_are_clear_errors(tmp_path):
    # Through train.py once: the refusal is one line on stderr, before any work.
    result = train(["train.batchsize=8"], check=False)
    assert (result.returncode != 0 and "train.batchsize" in result.stderr
            and "train.batch_size" in result.stderr)
    assert result.stderr.strip().splitlines() == [
        "error: unknown key 'train.batchsize' in the command line; "
        "did you mean 'train.batch_size'?"]
    # 5e-4 is a float to Python, a string to YAML 1.1: accepted, so only train.steps is wrong.
    error = config_error(["optim.min_lr=5e-4", "train.steps=ten"])
    assert "train.steps" in error and "int" in error and "min_lr" not in error
    error = config_error(["optim.min_lr=tiny"])
    assert "optim.min_lr" in error and "float" in error
    # key=value wins over config=FILE wherever it stands on the line
    (tmp_path / "four.yaml").write_text("crops.n_local: 4\n")
    error = config_error(["crops.n_local=many", f"config={tmp_path / 'four.yaml'}"])
    assert "crops.n_local from the command line must be int" in error
    for bad, message in (("device=gpu", "device must be one of auto, cuda, cpu"),
                         ("compile=gpu", "compile must be one of"),
                         ("centering=sinkhorn", "centering must be one of"),
                         ("train.log_every=0", "train.log_every must be at least 1")):
        assert message in config_error([bad]), bad
    (tmp_path / "other.yaml").write_text("crops.n_local: 4\nloss.koleo_wieght: 0.0\n")
    error = config_error([f"config={tmp_path / 'other.yaml'}"])
    assert "loss.koleo_wieght" in error and "other.yaml" in error


def test_values_a_type_cannot_judge_are_refused_by_key():
    """In process, without a train.py launch: sizes off the patch grid, a fraction outside
    (0, 1], a count under 1."""
    for bad, message in (("crops.global_size=80", "crops.global_size=80 is not a multiple of "
                                                  "model.patch_size=14"),
                         ("highres.global_size=500", "highres.global_size=500 is not"),
                         ("highres.fraction=0", "highres.fraction must be in (0, 1]"),
                         ("train.accum_steps=0", "train.accum_steps must be at least 1")):
        assert message in config_error([bad]), bad


def test_the_logger_is_one_of_three_and_a_missing_package_is_named(tmp_path):
    """The choices are checked with the config; a logger whose package is missing stops the
    run at once, with the pip command (here a tensorboard package that fails to import)."""
    with pytest.raises(SystemExit, match="logger must be one of , tensorboard, wandb"):
        configurator.load_config(ROOT / "config.yaml", ["logger=mlflow"])
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "__init__.py").write_text("raise ImportError('not here')\n")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "logger=tensorboard",
                             f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT,
                            env={**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: logger=tensorboard needs the tensorboard package (not here): "
        "pip install tensorboard")
    assert not (tmp_path / "run").exists()  # before any work


def test_tensorboard_gets_every_number_of_metrics_jsonl(phantom_set, tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    train(tiny_run(phantom_set, out, "logger=tensorboard", "train.steps=2", "eval.every=2",
                   f"eval.data={phantom_set}", "eval.label=age"))
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 2]  # the probe at 0 and 2, steps 1 and 2
    expected = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], pytest.approx(value)))
    assert "loss" in expected and "probe_age_r2" in expected
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for key, values in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(key)] == values, key


def test_a_short_run_end_to_end(phantom_set, tmp_path):
    out = tmp_path / "run"
    # an int where a float is expected is fine
    (tmp_path / "extra.yaml").write_text("optim.base_lr: 1\n")
    result = train(tiny_run(phantom_set, out, f"config={tmp_path / 'extra.yaml'}", "train.steps=3",
                            "train.save_every=2", "train.epoch_length=1", "eval.every=2",
                            f"eval.data={phantom_set}", "eval.label=age"))
    log = result.stdout
    assert ("torch " + torch.__version__ in log and "world size 1" in log
            and "crops.n_local: 2" in log)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probe_records = [r for r in records if "probe_age_r2" in r]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in records)
    # The learning signal: at step 0 (the init), every eval.every steps and at the end
    assert [r["step"] for r in probe_records] == [0, 2, 3]
    assert log.count("probe at step ") == 3
    assert Image.open(out / "loss.png").size[1] == 3 * 300  # losses, probe, collapse check
    assert (sorted(p.name for p in out.glob("checkpoint_*.pt"))
            == ["checkpoint_0000002.pt", "checkpoint_0000003.pt"])
    assert (out / "loss.png").stat().st_size > 0 and (out / "config.yaml").exists()
    state = student_state(out)
    assert state["config"]["optim.base_lr"] == 1.0 and state["step"] == 3
    # From scratch, the stored position grid is the global crop's (DINOv2 builds it so).
    assert state["backbone_args"]["img_size"] == 56
    # The export is the teacher backbone, readable like any Hugging Face folder.
    exported = weights.load_backbone(out / "export", in_chans=1)
    teacher = weights.load_backbone(sorted(out.glob("checkpoint_*.pt"))[-1])
    x = torch.randn(2, 1, 56, 56)
    torch.testing.assert_close(exported(x), teacher(x), atol=2e-5, rtol=1e-5)
    # It is the teacher that was probed, and the thumbnail's score is the control's.
    probe_set = backbones.ProbeSet(phantom_set / "labels.csv", "age", 56, 600)
    assert probe_records[-1]["probe_age_r2"] == pytest.approx(
        probe_set.score(exported.forward_features), abs=1e-4)
    rows = data.read_table(phantom_set)
    images = torch.stack([data.preprocess(data.load_image(row["image"]), 56) for row in rows])
    thumbnails = images.reshape(48, 1, 14, 4, 14, 4).mean((3, 5)).reshape(48, 196).numpy()
    split = np.array([row["split"] for row in rows])
    age = np.array([float(row["age"]) for row in rows])
    prediction = probes.ridge_probe(thumbnails, age, split)["test_pred"]
    assert probe_records[0]["probe_age_r2_pixels"] == pytest.approx(
        probes.r_squared(age[split == "test"], prediction), abs=1e-4)
    assert "python eval.py --backbone" in log
    # Starting over beside these checkpoints would mix two runs; so would resuming a run
    # that is already past train.steps.
    run_config = (out / "config.yaml").read_text()
    result = train(tiny_run(phantom_set, out, "train.steps=3", "resume=false"), check=False)
    assert result.returncode != 0 and "holds checkpoints of an earlier run" in result.stderr
    result = train(tiny_run(phantom_set, out, "train.steps=2"), check=False)
    assert result.returncode != 0 and "past train.steps=2" in result.stderr
    # So would resuming with another recipe; how long and where the run goes may change.
    result = train(tiny_run(phantom_set, out, "train.steps=4", "teacher_temp.end=0.05",
                            "train.log_every=2"), check=False)
    assert result.returncode != 0 and "teacher_temp.end=0.01 -> 0.05" in result.stderr
    assert "train.log_every" not in result.stderr and "train.steps" not in result.stderr
    # A refused run leaves out_dir's config as it was: the one its checkpoints were trained with.
    assert (out / "config.yaml").read_text() == run_config


def test_a_phantom_set_of_another_size_is_not_trained_on_silently(tmp_path):
    # data/synthetic drawn by an earlier version (or another data.synthetic_images) would
    # otherwise be used as it is: the run says so and stops before drawing or training.
    phantoms.make_phantoms(tmp_path / "data" / "synthetic", n=4, size=32)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "data.synthetic_images=6",
                             f"out_dir={tmp_path / 'run'}", "compile=false"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env=ENV)
    assert result.returncode != 0
    assert "data/synthetic holds 4 phantoms, not data.synthetic_images=6" in result.stderr
    assert not (tmp_path / "run" / "checkpoint_0000001.pt").exists()


def test_a_uniform_teacher_is_warned_of_once_its_temperature_is_settled(phantom_set, tmp_path):
    """A teacher at temperature 100 is uniform. With a constant temperature the warning comes
    at once; during a warm-up it waits, since a warming teacher is meant to be soft."""
    warning = "WARNING: the outputs look collapsed"
    hot = ["train.steps=2", "train.epoch_length=1", "train.save_every=100"]
    result = train(tiny_run(phantom_set, tmp_path / "constant", *hot, "teacher_temp.start=100.0",
                            "teacher_temp.end=100.0"))
    assert result.stdout.count(warning) == 1
    result = train(tiny_run(phantom_set, tmp_path / "warming", *hot, "teacher_temp.start=100.0",
                            "teacher_temp.end=101.0", "teacher_temp.warmup_epochs=30"))
    assert warning not in result.stdout


def test_schedules_and_parameter_groups(phantom_set, tmp_path):
    out = tmp_path / "run"
    train(tiny_run(phantom_set, out, "train.steps=6", "train.epoch_length=1",
                   "optim.warmup_epochs=2", "teacher_temp.warmup_epochs=3",
                   "optim.freeze_last_layer_epochs=100", "train.save_every=6",
                   "teacher_temp.start=0.04", "teacher_temp.end=0.07", "momentum.start=0.992",
                   "train.freeze_backbone_epochs=3"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = 0.004 * math.sqrt(4 / 1024)
    lrs = [r["lr"] for r in records]
    assert (lrs[0] == 0.0 and lrs[1] == pytest.approx(peak / 2)
            and lrs[2] == pytest.approx(peak))  # warm-up, then peak
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 1e-6  # cosine towards min_lr
    # The backbone still for 3 steps, then its own 2-step warm-up from 0.
    assert [r["backbone_lr"] for r in records] == pytest.approx(
        [0, 0, 0, 0, lrs[4] / 2, lrs[5]])
    assert (records[0]["wd"] == pytest.approx(0.04)
            and records[0]["momentum"] == pytest.approx(0.992))
    assert [r["teacher_temp"] for r in records[:4]] == pytest.approx([0.04, 0.05, 0.06, 0.07])
    assert records[-1]["teacher_temp"] == 0.07
    # At step 5 of 6 the cosines are one sixth of a half-period from their ends.
    assert records[-1]["wd"] == pytest.approx(
        0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 5 / 6)))
    assert records[-1]["momentum"] == pytest.approx(
        1.0 + 0.5 * (0.992 - 1.0) * (1 + math.cos(math.pi * 5 / 6)))

    groups = student_state(out)["optimizer"]["param_groups"]
    by_name = {name: g for g in groups for name in g["names"]}
    depth = 12
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.9 ** depth)
    assert by_name["backbone.blocks.11.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.9)
    assert (by_name["backbone.norm.weight"]["lr_mult"] == 1.0
            and by_name["dino_head.mlp.0.weight"]["lr_mult"] == 1.0)
    for token in ("pos_embed", "cls_token", "mask_token"):
        assert by_name[f"backbone.{token}"]["lr_mult"] == pytest.approx(0.9 ** (depth + 1))
        assert by_name[f"backbone.{token}"]["wd_mult"] == 1.0
    # x0.2 as in DINOv2, x3 for the one-channel kernel (see raddino.param_groups).
    patch_kernel = by_name["backbone.patch_embed.proj.weight"]
    assert patch_kernel["lr_mult"] == pytest.approx(3 * 0.2 * 0.9 ** (depth + 1))
    assert patch_kernel["wd_mult"] == pytest.approx(1 / 3)
    assert by_name["backbone.patch_embed.proj.bias"]["lr_mult"] == pytest.approx(
        0.2 * 0.9 ** (depth + 1))
    no_decay = ["backbone.blocks.3.attn.qkv.bias", "backbone.blocks.3.norm1.weight",
                "backbone.blocks.3.ls1.gamma", "backbone.norm.bias", "dino_head.mlp.0.bias"]
    assert not any(by_name[n]["wd_mult"] for n in no_decay)
    assert by_name["dino_head.last_layer.weight_v"]["wd_mult"] == 1.0
    assert by_name["backbone.blocks.3.mlp.fc2.weight"]["wd_mult"] == 1.0
    assert by_name["backbone.blocks.3.mlp.fc2.weight"]["weight_decay"] == pytest.approx(
        records[-1]["wd"])
    # + the head's tensors
    assert len(by_name) == sum(1 for _ in raddino.build_vit("vit_tiny").parameters()) + 8
    # The backbone's groups are its own: no head tensor shares one.
    assert all(g["backbone"] == all(n.startswith("backbone.") for n in g["names"])
               and g["backbone"] == any(n.startswith("backbone.") for n in g["names"])
               for g in groups)
    # Prototypes frozen (lr 0) while everything else moves.
    assert (by_name["dino_head.last_layer.weight_g"]["lr"] == 0.0
            and by_name["dino_head.mlp.0.weight"]["lr"] > 0)
    # The loop multiplies each group's multipliers into the step's scheduled values.
    for name in ("backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight",
                 *no_decay):
        assert by_name[name]["lr"] == pytest.approx(
            records[-1]["lr"] * by_name[name]["lr_mult"]), name
        assert by_name[name]["weight_decay"] == pytest.approx(
            records[-1]["wd"] * by_name[name]["wd_mult"]), name
    assert not any(by_name[n]["weight_decay"] for n in no_decay)


def test_one_step_clips_each_network_and_moves_the_teacher_by_the_ema(phantom_set, tmp_path):
    """One step from known weights, by hand. AdamW's first step moves each weight by
    lr * g / (|g| + eps); clipped to a norm of 1e-11, every |g| is far below eps = 1e-8 (AdamW's
    default), so each network's step has norm lr * lr_mult * 1e-11 / eps, within 1%: the
    backbone's and the head's each, if they are clipped separately (DINOv2), and less if
    clipped together; without clipping, ~lr per weight. Then the teacher, at momentum 0.5,
    lands halfway between its start and the student. Multipliers are 1 (layer_decay 1,
    patch_embed_lr_mult 1, prototypes not frozen) except the one-channel kernel's x3."""
    torch.manual_seed(1)
    backbone = raddino.build_vit("vit_tiny", img_size=56, in_chans=1, layerscale_init=0.1)
    head = raddino.DINOHead(192, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    torch.save({"dino_head." + k: v for k, v in head.state_dict().items()}, tmp_path / "head.pth")
    out = tmp_path / "run"
    clip, eps = 1e-11, 1e-8
    train(tiny_run(phantom_set, out, "train.steps=1", f"init.backbone={tmp_path / 'backbone.pth'}",
                   f"init.head={tmp_path / 'head.pth'}", "optim.base_lr=16000.0",
                   "optim.warmup_epochs=0", "optim.clip_grad=1.0e-11", "optim.layer_decay=1.0",
                   "optim.patch_embed_lr_mult=1.0", "optim.freeze_last_layer_epochs=0",
                   "optim.weight_decay=0.0", "optim.weight_decay_end=0.0", "momentum.start=0.5",
                   "momentum.end=0.5", "model.drop_path=0.0"))
    lr = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    assert lr == pytest.approx(16000 * math.sqrt(4 / 1024))  # 1000
    model = student_state(out)["model"]
    start = {"backbone": backbone.state_dict(), "dino_head": head.state_dict()}
    for network, initial in start.items():
        squares = 0.0
        for name, value in initial.items():
            moved = model[f"student.{network}.{name}"] - value
            if name == "patch_embed.proj.weight":
                moved = moved / 3
            squares += float(moved.double().square().sum())
            teacher = model[f"teacher.{network}.{name}"]
            torch.testing.assert_close(teacher,
                                       0.5 * value + 0.5 * model[f"student.{network}.{name}"])
        assert math.sqrt(squares) == pytest.approx(lr * clip / eps, rel=1e-2), network


def wait_for(condition, process, timeout=240):
    """Polls until condition() holds; False if the process ended or time ran out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_run_killed_then_stopped_by_sigterm_resumes_bitwise(phantom_set, tmp_path):
    """SIGKILL after the checkpoint at step 4, a resume, then SIGTERM to every process of the
    run (loader worker included, as torchrun and SLURM send it): it saves the step it is at
    and exits with 0, and the same command ends the run as if it had never stopped."""
    args = ["train.steps=8", "train.save_every=4", "model.drop_path=0.1"]
    train(tiny_run(phantom_set, tmp_path / "straight", *args))
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                                *tiny_run(phantom_set, run, *args, "train.log_every=100")],
                               cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(lambda: (run / "checkpoint_0000004.pt").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "checkpoint_0000008.pt").exists(), (
        "the run finished before it could be killed")
    # as a kill mid-save leaves it, and the steps logged after the checkpoint
    (run / "checkpoint_0000006.pt.tmp999").write_bytes(b"half a checkpoint")
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 5, "loss": 99.0}\n{"step": 6, "loss": 99.0}\n')

    command = [sys.executable, str(ROOT / "train.py"),
               *tiny_run(phantom_set, run, *args, "data.workers=1")]
    log_path = tmp_path / "log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: "step 5/8" in log_path.read_text(), process), "no step 5"
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert process.returncode == 0, log[-3000:]
    assert "resumed from" in log and "checkpoint_0000004.pt at step 4" in log
    step = student_state(run)["step"]
    assert 5 <= step < 8, "the run ended before it could be stopped"
    assert (f"stopped by SIGTERM after step {step} of 8, with a checkpoint there"
            in log.splitlines()[-1])
    assert not (run / "export").exists()

    result = train(command[2:])
    assert f"resumed from {run / f'checkpoint_{step:07d}.pt'}" in result.stdout
    a, b = student_state(tmp_path / "straight"), student_state(run)
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # Each step is in metrics.jsonl once, as the uninterrupted run logged it (log_every was
    # 100 before the kill).
    assert metrics_losses(run) == metrics_losses(tmp_path / "straight")[4:]


def test_two_processes_equal_one_with_the_same_global_batch(phantom_set, tmp_path, device="cpu"):
    """Also with bad files skipped: each rank meets its own, and the log counts them all."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((phantom_set / "images").glob("*.png"))[:24]:
        (folder / path.name).write_bytes(path.read_bytes())
    for i in range(12):
        (folder / f"broken-{i}.png").write_bytes(b"not an image")
    args = ["train.save_every=2", "model.drop_path=0.0", "loss.koleo_weight=0.0",
            f"device={device}", "precision=fp32", f"data.root={folder}", "data.split=",
            "data.on_bad_file=skip"]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    train(tiny_run(phantom_set, tmp_path / "one", *args, "train.batch_size=8", "train.steps=2"))
    result = train(tiny_run(phantom_set, tmp_path / "two", *args, "train.batch_size=4",
                            "train.steps=2"), launcher=launcher)
    assert "world size 2" in result.stdout
    # One process accumulating 2 micro-batches of 4 is 2 ranks of 4: the same images and
    # masks, targets over all 8, gradients averaged, the lr of a global batch of 8.
    result = train(tiny_run(phantom_set, tmp_path / "accumulated", *args, "train.batch_size=4",
                            "train.accum_steps=2", "train.steps=2"))
    assert "global batch 8" in result.stdout
    one, two = student_state(tmp_path / "one"), student_state(tmp_path / "two")
    accumulated = student_state(tmp_path / "accumulated")
    for key in one["model"]:
        torch.testing.assert_close(one["model"][key], two["model"][key], atol=1e-5, rtol=1e-5,
                                   msg=key)
        torch.testing.assert_close(accumulated["model"][key], two["model"][key], atol=1e-5,
                                   rtol=1e-5, msg=key)
    assert accumulated["history"][-1]["skipped_files"] == two["history"][-1]["skipped_files"]
    # Resumed to step 4, two ranks count as many skipped files as one process that ran
    # through: the counts go on from the checkpoint's, summed over ranks, not from 0.
    train(tiny_run(phantom_set, tmp_path / "two", *args, "train.batch_size=4", "train.steps=4"),
          launcher=launcher)
    train(tiny_run(phantom_set, tmp_path / "straight", *args, "train.batch_size=8",
                   "train.steps=4"))
    skipped = {run: [record["skipped_files"] for record in map(
        json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
        for run in ("straight", "two")}
    assert 0 < skipped["straight"][1] < skipped["straight"][3]
    assert skipped["straight"] == skipped["two"]
    # Each rank draws drop path from its own stream (seed + rank), as DINOv2 does.
    assert not torch.equal(two["rng"][0]["cpu"], two["rng"][1]["cpu"])
    # One process cannot go on with two ranks' run: the global batch, the lr and the data
    # order would change. The refusal names both sizes and the accum_steps that would fit;
    # with it, the run goes on.
    result = train(tiny_run(phantom_set, tmp_path / "two", *args, "train.batch_size=4",
                            "train.steps=5"), check=False)
    assert result.returncode != 0
    assert ("checkpoint_0000004.pt was trained on 2 ranks x 1 micro-batches (global batch 8); "
            "this run has 1 x 1 (global batch 4): resume with ranks x train.accum_steps = 2 "
            "(here train.accum_steps=2)") in result.stderr
    result = train(tiny_run(phantom_set, tmp_path / "two", *args, "train.batch_size=4",
                            "train.steps=5", "train.accum_steps=2"))
    assert "resuming 2 ranks x 1 micro-batches as 1 x 2" in result.stdout
    assert "global batch 8" in result.stdout and student_state(tmp_path / "two")["step"] == 5


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_two_nccl_ranks_equal_one_process(phantom_set, tmp_path):
    test_two_processes_equal_one_with_the_same_global_batch(phantom_set, tmp_path, device="cuda")


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_two_ranks_compiled_in_bf16_on_the_cpu(phantom_set, tmp_path):
    """The GPU's code path, on the CPU: torchrun, bf16 autocast, torch.compile (inductor).
    Also: clip_grad=0 means no clipping (with the teacher frozen at momentum 1 and no weight
    decay, only gradients can move the student), and ibot.out_dim sizes a separate head."""
    out = tmp_path / "run"
    result = train(tiny_run(phantom_set, out, "train.steps=2", "compile=true", "precision=bf16",
                            "optim.clip_grad=0", "optim.weight_decay=0", "optim.weight_decay_end=0",
                            "optim.warmup_epochs=0", "momentum.start=1.0", "momentum.end=1.0",
                            "ibot.separate_head=true", "ibot.out_dim=40"), launcher=TORCHRUN)
    assert "world size 2 | precision bf16 | compile True" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)
    model = student_state(out)["model"]
    assert model["student.ibot_head.last_layer.weight_v"].shape[0] == 40
    assert model["student.dino_head.last_layer.weight_v"].shape[0] == 64
    moved = [k for k in model if k.startswith("student.backbone.")
             and not torch.equal(model[k], model[k.replace("student.", "teacher.", 1)])]
    assert len(moved) > 100


def logged_steps(out_dir):
    """The steps of metrics.jsonl's records, in file order."""
    records = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(record)["step"] for record in records]


def rank_processes(torchrun):
    """{rank: pid} of a torchrun process's workers, read from /proc."""
    found = {}
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
    for pid in children:
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # it has just ended
            continue
        for variable in environment:
            if variable.startswith(b"RANK="):
                found[int(variable[len("RANK="):])] = int(pid)
    return found


def test_torchrun_restarts_a_killed_rank_from_the_checkpoint_and_ranks_stop_together(
        phantom_set, tmp_path):
    """Under torchrun --max-restarts=1 a rank killed mid-run brings the group back from the
    newest checkpoint. Then SIGUSR1 to one rank alone: both stop after the same step, rank 0
    saves it, and torchrun ends with 0."""
    out = tmp_path / "run"
    command = [*TORCHRUN, "--max-restarts=1", str(ROOT / "train.py"),
               *tiny_run(phantom_set, out, "train.steps=8", "train.save_every=2")]
    # torch >= 2.5 keeps one store for every restart, and a restarted gloo group can then
    # read the old addresses (pytorch/pytorch#135712): a store per restart instead.
    environment = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    log_path = tmp_path / "log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: (out / "checkpoint_0000002.pt").exists(), process)
        os.kill(rank_processes(process)[1], signal.SIGKILL)
        # the restarted group's step 4, not the first one's
        assert wait_for(lambda: "step 4/8" in log_path.read_text().partition("resumed")[2],
                        process)
        os.kill(rank_processes(process)[1], signal.SIGUSR1)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:  # stuck: its ranks too, each a session of its own
            for pid in rank_processes(process).values():
                os.kill(pid, signal.SIGKILL)
            process.kill()
    log = log_path.read_text()
    assert process.returncode == 0, log[-3000:]
    assert "resumed from" in log and "checkpoint_0000002.pt at step 2" in log
    step = student_state(out)["step"]
    assert 4 <= step < 8, "the run ended before it could be stopped"
    assert f"stopped by SIGUSR1 after step {step} of 8" in log
    assert logged_steps(out) == list(range(1, step + 1))  # each step once
    assert not (out / "export").exists()


def test_a_non_finite_loss_stops_the_run_without_a_checkpoint(phantom_set, tmp_path):
    # A teacher temperature that reaches 0 at schedule(3) makes the teacher's targets NaN in
    # the 4th step, which the log calls step 4 (steps done). The check runs where something
    # is written (here every step, train.log_every=1), before the step-4 checkpoint.
    out = tmp_path / "run"
    result = train(tiny_run(phantom_set, out, "train.steps=6", "train.save_every=2",
                            "train.epoch_length=1", "teacher_temp.end=0.0",
                            "teacher_temp.warmup_epochs=3"), check=False)
    assert result.returncode != 0
    assert "non-finite loss at step 4" in result.stderr and "dino_global=nan" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint_*.pt")) == ["checkpoint_0000002.pt"]
    assert not (out / "export").exists()


def test_the_high_resolution_phase_trains_and_resumes_across_its_switch(phantom_set, tmp_path):
    """56-px global crops, then 70 px (a 5 x 5 grid: position embeddings interpolated, masks
    drawn on the new grid) for the last quarter of 4 steps; resumed from step 2, across the
    switch at step 3, the run ends bitwise where the straight run ended."""
    out = tmp_path / "run"
    args = tiny_run(phantom_set, out, "train.steps=4", "train.save_every=2",
                    "highres.global_size=70", "highres.local_size=42", "highres.fraction=0.25",
                    "model.drop_path=0.1")
    result = train(args)
    assert "high-resolution phase from step 3: 70-px global and 42-px local crops" in result.stdout
    straight = student_state(out)
    (out / "checkpoint_0000004.pt").unlink()
    result = train(args)
    assert "resumed from" in result.stdout and "checkpoint_0000002.pt" in result.stdout
    resumed = student_state(out)
    assert resumed["step"] == straight["step"] == 4
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key


def test_init_backbone_starts_student_and_teacher_from_weights(phantom_set, tmp_path):
    """A DINOv2-style 3-channel file with a 112-px (8 x 8) grid: folded to one channel, its grid
    kept."""
    torch.manual_seed(1)
    source = raddino.build_vit("vit_tiny", img_size=112)
    torch.save(source.state_dict(), tmp_path / "hub.pth")
    out = tmp_path / "run"
    train(tiny_run(phantom_set, out, "train.steps=1", f"init.backbone={tmp_path / 'hub.pth'}",
                   "optim.base_lr=0.0", "optim.weight_decay=0.0", "optim.weight_decay_end=0.0",
                   "model.drop_path=0.0", "momentum.start=1.0", "momentum.end=1.0"))
    state = student_state(out)
    assert state["backbone_args"]["img_size"] == 112 and state["backbone_args"]["in_chans"] == 1
    folded = weights.fold_channels(source.state_dict()["patch_embed.proj.weight"], 1)
    # lr 0 and momentum 1: one step changes no weight
    for prefix in ("student.backbone.", "teacher.backbone."):
        assert torch.equal(state["model"][prefix + "patch_embed.proj.weight"], folded)
        assert torch.equal(state["model"][prefix + "blocks.5.mlp.fc1.weight"],
                           source.blocks[5].mlp.fc1.weight)


def test_a_bad_image_stops_the_run_with_one_line(phantom_set, tmp_path):
    """Under data.on_bad_file=error, a file that is not an image ends the run with one line
    naming it and the fix, also when a loader worker process met it."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((phantom_set / "images").glob("*.png"))[:7]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = train(tiny_run(phantom_set, tmp_path / "run", f"data.root={folder}", "data.split=",
                            "data.workers=1", "train.batch_size=8", "train.steps=1"), check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "zz-broken.png" in last_line and "data.on_bad_file=skip" in last_line


def test_the_long_configs_undo_every_short_run_value():
    """config.yaml's departures for short runs (marked SHORT RUN there; teacher_temp.end goes
    with teacher_temp.start) are undone by configs/dinov2.yaml, and configs/rad-dino.yaml,
    which also sits on top of config.yaml, sets each to the same DINOv2 value."""
    short_run = {"model.layerscale_init", "teacher_temp.start", "teacher_temp.end",
                 "momentum.start"}
    lines = (ROOT / "config.yaml").read_text().splitlines()
    marked = {line.split(":")[0] for line in lines if "SHORT RUN" in line and line[0] != "#"}
    assert marked <= short_run, "a new SHORT RUN key: add it here and to both configs"
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    dinov2 = yaml.safe_load((ROOT / "configs" / "dinov2.yaml").read_text())
    rad_dino = yaml.safe_load((ROOT / "configs" / "rad-dino.yaml").read_text())
    for key in sorted(short_run):
        assert key in dinov2 and dinov2[key] != base[key], key
        assert rad_dino.get(key) == dinov2[key], key


def test_every_crops_key_is_a_multicrop_parameter():
    """train.py hands the crops.* keys to data.MultiCrop by name."""
    parameters = inspect.signature(data.MultiCrop).parameters
    for path in (ROOT / "config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))):
        for key in yaml.safe_load(path.read_text()):
            if key.startswith("crops."):
                assert key[len("crops."):] in parameters, (path.name, key)


def test_the_rad_dino_config_needs_the_dinov2_weights(phantom_set, tmp_path):
    start = time.time()
    result = train([f"config={ROOT / 'configs' / 'rad-dino.yaml'}", f"data.root={phantom_set}",
                    f"out_dir={tmp_path / 'run'}"], check=False)
    assert result.returncode != 0
    assert "dinov2_vitb14_pretrain.pth" in result.stderr
    assert ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
            in result.stderr)
    assert time.time() - start < 60  # at once: before any model is built
