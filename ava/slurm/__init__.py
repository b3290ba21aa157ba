"""The `slurm` back-end: the same recipe on a Slurm cluster, reached through its login node.

Slurm allocates, fences (its task/cgroup and GRES) and accounts; ava adds what it lacks on top:
one batch script per attempt whose `srun` starts one ava agent per allocated node (torchrun with
the rendezvous on the allocation's first node), rank-prefixed logs and the first failing rank
from the agents' status files on the shared filesystem, and failover from checkpoints with a
lost node in `--exclude`.

    inventory.py   the [slurm] table of ava.toml
    batch.py       recipe -> the batch script and the agents' spec template (pure, golden-tested)
    (agent/slurmnode.py, the agent's slurm-node command: one per allocated node, under srun)
    (agent/slurmwatch.py, the agent's slurm-watch command: on the login node, the job's state,
     the agents' status, new log bytes)
    backend.py     submit (sbatch), poll, cancel (scancel, verified), sinfo
    supervise.py   the loop: submit, watch, decide, fail over; the run's record
"""
