"""Run by tests/test_losses.py under `torchrun --nproc_per_node=2` (gloo, CPU). Each rank
takes its share of a fixed sequence of teacher outputs, computes the centred and the
Sinkhorn-Knopp targets under the process group, and saves them; the test compares them with
one process that sees the concatenation of both ranks' rows."""

import sys

import torch
import torch.distributed as dist

import raddino

ROWS = [6, 3]  # uneven on purpose: ranks hold different numbers of masked patches


def teacher_outputs(n_steps=3):
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(n, 5, generator=g) for n in ROWS] for _ in range(n_steps)]


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    center, results = raddino.Center(5), []
    for step in teacher_outputs():
        probs = center.softmax(step[rank], 0.1)
        center.update(step[rank])
        results.append({"centred": probs, "center": center.center.clone(),
                        "sinkhorn": raddino.sinkhorn_knopp(step[rank], 0.1)})
    torch.save(results, f"{sys.argv[1]}/rank{rank}.pt")
    # Both ranks done before either tears the group down: on torch 2.4 a rank that leaves
    # while the other is still connected hangs the exit one time in four.
    dist.barrier()
    dist.destroy_process_group()
