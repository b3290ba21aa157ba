"""A script that finds its data by relative paths, as scripts run from their own folder do:
`data/corpus.txt` from the working directory, `data/vocab.txt` beside the script, results
appended to `outputs/metrics.jsonl` and its state in `outputs/state.pt`. Knows nothing of ava."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
with open("data/corpus.txt", encoding="utf-8") as f:
    corpus = f.read().split()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vocab.txt"), encoding="utf-8") as f:
    vocab = {w: i for i, w in enumerate(f.read().split())}
ids = torch.tensor([vocab[w] for w in corpus if w in vocab], dtype=torch.float32)
if len(ids) == 0:
    sys.exit("no known words in data/corpus.txt")

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
weight = torch.zeros(1)
start = 0
if os.path.exists("outputs/state.pt"):
    state = torch.load("outputs/state.pt")
    weight, start = state["weight"], state["step"]
    print(f"rank {rank}: resumed at step {start}", flush=True)
os.makedirs("outputs", exist_ok=True)
for step in range(start, steps):
    grad = (weight - ids.mean()).reshape(1)
    dist.all_reduce(grad)
    weight -= 0.1 * grad / world
    time.sleep(0.1)
    if rank == 0 and step % 5 == 4:
        torch.save({"weight": weight, "step": step + 1}, "outputs/state.pt")
        with open("outputs/metrics.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps({"step": step + 1, "weight": weight.item()}) + "\n")
        print(f"step {step + 1} weight {weight.item():.4f} saved", flush=True)
print(f"rank {rank}: done at step {steps}", flush=True)
dist.destroy_process_group()
