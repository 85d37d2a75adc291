"""Fine-tune with part of the model frozen under DistributedDataParallel, then unfreeze.

    torchrun --nproc_per_node 2 examples/ddp_finetune.py          # CPU, gloo
    torchrun --nproc_per_node 2 examples/ddp_finetune.py --epochs 6 --unfreeze-at 3

The backbone is first "pretrained" on digits 0-4 (identically on every rank;
it stands in for loading a checkpoint), and gets a fresh 10-class head.
Phase 1 trains only the head (the backbone is frozen *before* wrapping, so DDP
never sees it). At ``--unfreeze-at`` every rank calls
``torchfreeze.distributed.unfreeze``: it unfreezes the backbone's last block,
adds it to the optimizer with a 10x smaller learning rate, and re-wraps the
model so DDP all-reduces the new gradients too. At the end the ranks compare
every parameter bit for bit and the script exits with status 1 if they differ.

Data: scikit-learn's bundled digits (8x8 images, 10 classes), sharded with a
DistributedSampler so every rank sees different samples.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchfreeze as tfz
import torchfreeze.distributed as tfz_dist


def build_model() -> nn.Module:
    backbone = nn.Sequential(
        nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU()),
        nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU()),
        nn.Sequential(nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU()),
    )
    model = nn.Sequential()
    model.add_module("backbone", backbone)
    model.add_module("head", nn.Linear(64, 10))
    return model


def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    cut = int(0.8 * len(x))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def pretrain(model: nn.Module, data: TensorDataset) -> None:
    """Stand-in for a pretrained checkpoint: same seed and data, so every rank
    ends with the same weights without any communication."""
    x, y = data.tensors
    keep = y < 5
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        nn.functional.cross_entropy(model(x[keep]), y[keep]).backward()
        opt.step()
        opt.zero_grad()


def params_in_sync(model: nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--unfreeze-at", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank = dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    torch.manual_seed(0)

    train, test = digits()
    model = build_model()
    pretrain(model, train)
    model.head = nn.Linear(64, 10)  # new task head (same init on every rank: seeded)
    tfz.freeze(model, "backbone")  # before wrapping: DDP only syncs what is trainable now
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(tfz.param_groups(model, lr=args.lr, weight_decay=0.01))

    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=64, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        if epoch == args.unfreeze_at:
            # collective: every rank calls it; the old wrapper must not be used again
            ddp = tfz_dist.unfreeze(ddp, "backbone.2", optimizer=optimizer, lr_mult=0.1)
        sampler.set_epoch(epoch)
        ddp.train()
        total = 0.0
        for x, y in loader:
            loss = loss_fn(ddp(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item()
        ddp.eval()
        with torch.no_grad():
            acc = (ddp(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
        if rank == 0:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"epoch {epoch}: loss {total / len(loader):.3f}  test acc {acc:.3f}  "
                  f"trainable {trainable}  param groups {len(optimizer.param_groups)}")

    in_sync = params_in_sync(model)
    if rank == 0:
        print(f"ranks in sync: {in_sync}")
    del ddp  # its reducer holds the process group: release it before the group goes
    dist.barrier()  # and no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    return 0 if in_sync else 1


if __name__ == "__main__":
    raise SystemExit(main())
