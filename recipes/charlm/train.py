"""A small character-level transformer that learns The Devil's Dictionary, and resumes exactly.

A plain torchrun script (env:// rendezvous from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 train.py
    python3 train.py                     # one process, no launcher

Exact resume: the batch of step s on rank r is drawn from a generator seeded by (seed, s, r), not
from an iterator's hidden position; every rank's torch and Python RNG states, the optimizer
state and the weights are in the checkpoint, and the learning rate is a function of the step.
So a run interrupted and resumed from its last checkpoint ends with bitwise the same weights as
one that never stopped (same world size, same --steps). Rank 0 ends with the line
`final step S sha256 HEX` (HEX: the hash of the weights) so runs can be compared.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import pickle
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

try:  # ava's user-side modules are on PYTHONPATH under ava; the script also runs without them.
    from ava import ckpt
    from ava.env import progress
except ImportError:
    ckpt = None  # type: ignore[assignment]

    def progress(step: int, *, force: bool = False, **metrics: float) -> None:
        pass


CORPUS = Path(__file__).with_name("devils-dictionary.txt")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps in the whole run")
    p.add_argument("--ckpt-every", type=int, default=250, help="checkpoint every N steps (0: never)")
    p.add_argument(
        "--ckpt-dir",
        default=None,
        help="checkpoint directory or fsspec URL (default: $AVA_CHECKPOINT_DIR, else ./checkpoints/charlm)",
    )
    p.add_argument("--keep", type=int, default=None, help="checkpoints to keep (default: $AVA_CHECKPOINT_KEEP, else 3)")
    p.add_argument(
        "--exit-at-step",
        type=int,
        default=None,
        help="exit 1 after step K (and its checkpoint, if any): simulates a crash",
    )
    p.add_argument("--exit-attempt", type=int, default=None, help="only in this attempt of an ava run (AVA_ATTEMPT)")
    p.add_argument("--exit-rank", type=int, default=None, help="only this rank exits (the others are torn down)")
    p.add_argument("--log-every", type=int, default=100, help="print the loss every N steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    p.add_argument("--block", type=int, default=64, help="characters of context")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data", type=Path, default=CORPUS, help="text corpus")
    p.add_argument("--sample", type=int, default=200, help="characters to generate at the end")
    return p.parse_args()


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.block = block
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, dropout) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def batch_for(
    data: torch.Tensor, seed: int, step: int, rank: int, size: int, block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of (step, rank): a pure function of its arguments, so resuming replays it."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + rank) % (2**63))
    starts = torch.randint(len(data) - block - 1, (size,), generator=g)
    x = torch.stack([data[s : s + block] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + block + 1] for s in starts.tolist()])
    return x.to(device), y.to(device)


def lr_at(step: int, args: argparse.Namespace) -> float:
    warmup = min(50, args.steps // 10 + 1)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    done = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        # A clone owns exactly its bytes; .numpy() would need numpy, which torch does not bring.
        h.update(bytes(t.detach().cpu().clone().untyped_storage()))
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gather(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's `obj`, in rank order. dist.all_gather_object would do, but it unpickles
    through numpy, which torch's wheel does not bring; pickles travel as padded uint8 tensors."""
    data = pickle.dumps(obj)
    world = dist.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [pickle.loads(bytes(p.cpu().untyped_storage())[: int(n.item())]) for p, n in zip(parts, sizes)]


@torch.no_grad()
def val_loss(model: nn.Module, val: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    model.eval()
    losses = []
    for i in range(4):  # fixed batches: comparable across the run, no global RNG touched
        x, y = batch_for(val, args.seed + 1, i, 0, args.batch, args.block, device)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model: CharTransformer, chars: list[str], device: torch.device, n: int) -> str:
    model.eval()
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.tensor([[chars.index("\n")]], device=device)
    for _ in range(n):
        logits = model(idx[:, -model.block :])[:, -1] / 0.8
        idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1, generator=g)], dim=1)
    return "".join(chars[i] for i in idx[0].tolist())


def say(line: str) -> None:
    """One write per line: ranks share stdout, and print() writes the newline separately."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ:  # plain `python train.py`: a process group of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt_dir = args.ckpt_dir or os.environ.get("AVA_CHECKPOINT_DIR") or "checkpoints/charlm"
    if ckpt is None and rank == 0:
        say("ava.ckpt is not importable: training without checkpoints")

    text = args.data.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = CharTransformer(len(chars), args.block, args.dim, args.layers, args.heads, args.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    start = 0
    resumed = ckpt.load_latest(dir=ckpt_dir) if ckpt is not None else None
    if resumed is not None:
        state, start = resumed
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    # Each rank its own dropout stream: restored from the checkpoint, else derived from the seed.
    if resumed is not None and rank < len(state["rng"]["torch"]):
        torch.set_rng_state(state["rng"]["torch"][rank])
        random.setstate(state["rng"]["python"][rank])
    else:
        torch.manual_seed(args.seed * 7_919 + start * 31 + rank + 1)
        random.seed(args.seed * 7_919 + start * 31 + rank + 1)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        how = (
            f"resumed from step {start} weights sha256 {weights_sha256(model)}"
            if resumed is not None
            else "starting from scratch"
        )
        say(f"charlm: {params:,} parameters, {len(chars)} characters, {len(text):,} of text, world_size {world}, {how}")

    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    for step in range(start, args.steps):
        x, y = batch_for(train, args.seed, step, rank, args.batch, args.block, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        value = loss.item()
        window_loss, window_steps = window_loss + value, window_steps + 1

        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            ms = (time.perf_counter() - window_start) * 1000 / window_steps
            checked = val_loss(model, val, args, device)
            say(
                f"step {done}/{args.steps} loss {window_loss / window_steps:.3f} "
                f"val {checked:.3f} lr {lr_at(step, args):.2e} {ms:.0f} ms/step"
            )
            progress(done, loss=value, lr=lr_at(step, args), val_loss=checked)
        else:
            progress(done, loss=value, lr=lr_at(step, args))  # ava show / ava plot draw these
        if done % args.log_every == 0:
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

        if ckpt is not None and args.ckpt_every and (done % args.ckpt_every == 0 or done == args.steps):
            rng = {"torch": gather(torch.get_rng_state(), device), "python": gather(random.getstate(), device)}
            state = {
                "model": model.state_dict(),
                "optim": opt.state_dict(),
                "rng": rng,
                "step": done,
                "args": {k: str(v) for k, v in vars(args).items()},
            }
            ckpt.save(state, done, dir=ckpt_dir, keep=args.keep, async_=True)
            progress(done, force=True)
        crash = args.exit_attempt in (None, int(os.environ.get("AVA_ATTEMPT") or 0))
        if args.exit_at_step == done and crash and args.exit_rank in (None, rank):
            if ckpt is not None:
                ckpt.wait()
            say(f"rank {rank} exiting at step {done} on purpose")
            return 1

    if ckpt is not None:
        ckpt.wait()
    if rank == 0 and args.sample:
        say("sample:\n" + sample(model, chars, device, args.sample))
    if rank == 0:
        say(f"final step {args.steps} sha256 {weights_sha256(model)}")
    del ddp, opt  # the DDP model holds the process group, which leave_process_group() frees
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Exit cleanly. Gloo's worker threads drop their last work (and its tensors) after the
    collective returns; one still doing so while Python shuts down is killed taking the GIL, and
    the process aborts ("terminate called without an active exception", SIGABRT). So: every rank
    past its last collective, then the process group freed now, which joins those threads."""
    dist.barrier()
    gc.collect()  # whatever still refers to the group (a DDP model in a cycle) lets go of it
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
