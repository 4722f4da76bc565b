"""bench.py gpu, the plan for a GPU window of a few minutes: its results must survive
warnings, timeouts and a second run, and every part must run, tiny, on the CPU first."""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
import bench_gpu  # noqa: E402


def test_results_are_read_wherever_they_stand_in_the_output():
    stdout = "\n".join([
        'RESULT {"name": "versions", "torch": "2.11.0"}',
        "step 4/4 | loss 9.0",
        "FutureWarning: broadcast_buffers ...",  # a child's warnings may reach stdout too
        'RESULT {"name": "train", "last_step": "step 4/4"}',
        "Grad strides do not match bucket view strides",
        "W1206 a CUDA_HOME notice",
        "",
    ])
    results = bench_gpu.read_results(stdout)
    assert [r["name"] for r in results] == ["versions", "train"]
    assert results[1]["last_step"] == "step 4/4"


def test_a_part_past_its_limit_is_killed_and_what_it_printed_is_kept(tmp_path, monkeypatch):
    script = tmp_path / "slow.py"
    script.write_text("import time, sys\n"
                      "print('RESULT {\"name\": \"early\"}', flush=True)\n"
                      "print('a warning', file=sys.stderr, flush=True)\n"
                      "time.sleep(60)\n")

    def command(*args):
        return [sys.executable, str(script)]

    monkeypatch.setattr(bench_gpu, "part_command", command)
    ok, results, seconds, errors = bench_gpu.run_part("smoke", tmp_path / "out", True, limit=3)
    assert not ok and seconds < 30
    assert results == [{"name": "early"}] and errors == ["a warning"]


def test_every_part_runs_dry_on_the_cpu():
    """The one chance to run on a GPU must not be lost to a typo: the same parts, tiny, on
    the CPU, each in a fresh out_dir (train.py refuses to start over in an old one)."""
    result = subprocess.run([sys.executable, "bench.py", "gpu", "--dry-run"],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for part in bench_gpu.PARTS:
        assert f"== {part}: ok" in result.stdout
    assert '"name": "eval.py on phantoms, 3 folds"' in result.stdout
