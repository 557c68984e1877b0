"""Federated averaging over three plan-worker processes; the training data never leaves them.

Each worker starts with its own shard of scikit-learn's bundled digits (8x8 images, no download) as
private data. The server builds one training-step plan for a small CNN, sends it to every worker, and
each round: pushes the global weights, runs local steps on the worker's own batches (one message per
step), fetches the trained weights and averages them. Held-out accuracy is measured at the server.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import planwire as sy
from planwire.worker.process import WorkerProcess

WORKERS, ROUNDS, LOCAL_EPOCHS, BATCH = 3, 6, 2, 32


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def shards(seed: int = 0):
    """Train shards for the workers (batched, one .npz each) and the server's held-out test set."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # N, 1, 8, 8 in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=0.25, random_state=seed, stratify=digits.target
    )
    parts = np.array_split(np.random.default_rng(seed).permutation(len(x_train)), WORKERS)
    return [(x_train[p], y_train[p]) for p in parts], (torch.from_numpy(x_test), torch.from_numpy(y_test))


def save_shard(path: Path, x: np.ndarray, y: np.ndarray) -> int:
    """One .npz per worker; keys are tags: images.<b> and labels.<b> for each batch b."""
    batches = {}
    for b, start in enumerate(range(0, len(x), BATCH)):
        batches[f"images.{b}"], batches[f"labels.{b}"] = x[start : start + BATCH], y[start : start + BATCH]
    np.savez(path, **batches)
    return len(batches) // 2


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> float:
    torch.manual_seed(0)
    train, (x_test, y_test) = shards()
    model = CNN()
    step = sy.training_plan(
        model,
        F.cross_entropy,
        sy.optim.SGD(lr=0.05, momentum=0.9),
        args_shape=[(-1, 1, 8, 8), (-1,)],
        args_dtypes=[torch.float32, torch.int64],
        metrics=("accuracy",),
    )
    print(f"built {step!r}")
    with tempfile.TemporaryDirectory(prefix="planwire-fed-") as tmp:
        n_batches, procs = [], []
        try:
            for i, (x, y) in enumerate(train):
                n_batches.append(save_shard(Path(tmp) / f"shard{i}.npz", x, y))
                procs.append(WorkerProcess(f"hospital_{i}", data=[str(Path(tmp) / f"shard{i}.npz")]))
            workers = [sy.connect(p.url) for p in procs]
            print(
                "workers:",
                ", ".join(f"{w.id} ({n} batches, {p.url})" for w, n, p in zip(workers, n_batches, procs, strict=True)),
            )
            pointers = [step.send(w) for w in workers]
            # Pointers to each worker's own batches: the server never sees them.
            data = [
                [(w.search(f"images.{b}")[0], w.search(f"labels.{b}")[0]) for b in range(n)]
                for w, n in zip(workers, n_batches, strict=True)
            ]
            global_state = model.state_dict()
            print(f"round 0: held-out accuracy {accuracy(model, x_test, y_test):.3f}")
            bar = tqdm(range(1, ROUNDS + 1), desc="federated rounds", unit="round")
            for rnd in bar:
                losses = []
                for ptr, batches in zip(pointers, data, strict=True):
                    ptr.load_state_dict(global_state)
                    for _ in range(LOCAL_EPOCHS):
                        for x_ptr, y_ptr in batches:
                            loss, _acc = ptr(x_ptr, y_ptr)  # one message; weights stay on the worker
                    losses.append(loss.get().item())
                states = [ptr.state_dict() for ptr in pointers]
                sizes = [len(x) for x, _ in train]
                global_state = {
                    k: sum(s[k] * n for s, n in zip(states, sizes, strict=True)) / sum(sizes) for k in states[0]
                }
                model.load_state_dict(global_state)
                acc = accuracy(model, x_test, y_test)
                bar.set_postfix(loss=f"{np.mean(losses):.3f}", accuracy=f"{acc:.3f}")
                tqdm.write(f"round {rnd}: mean local loss {np.mean(losses):.4f}, held-out accuracy {acc:.3f}")
            for w in workers:
                w.close()
        finally:
            for p in procs:
                p.close()
    print(f"final held-out accuracy: {acc:.3f}")
    if acc <= 0.90:
        raise SystemExit(f"federated training reached only {acc:.3f} (expected > 0.90)")
    return acc


if __name__ == "__main__":
    main()
