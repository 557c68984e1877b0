"""Federated averaging over three plan-worker processes; the training data never leaves them.

The workers are of both languages when Node.js is there: two Python plan-workers and one Node.js worker
(worker/node) by default (``--node-workers N``; 0 without Node), serving the same plan bytes under the
same owners' policy.

Each worker starts with its own shard of scikit-learn's bundled digits (8x8 images, no download) as
private data, and a release policy its data owner wrote after reviewing the training plan (printed
below): the step's loss and accuracy may leave as they are, the trained weights only as their update
(new - pushed weights), optionally clipped and noised by the worker (``--clip``, ``--noise``); nothing
else computed from the data can leave, and every release is a line in the worker's audit log. The server
builds one training-step plan for a small CNN, sends it to every worker, and each round: pushes the
global weights, runs local steps on the worker's own batches (one message per step), fetches the updates
and averages them. Held-out accuracy is measured at the server.

Each round's training loss and accuracy are the means over all its local steps, weighted by the examples
in each batch; ``--plot FILE`` draws that history (and held-out accuracy) as a PNG. Progress goes to
stderr (``--no-progress`` or ``PLANWIRE_PROGRESS=0`` turns it off).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import planwire as sy
from planwire.worker.process import NodeWorkerProcess, WorkerProcess, node_missing
from planwire.worker.review import format_review, policy_snippet, review

# the digits CNN is the Flower app's (examples/flower/planwire_digits/model.py): one model for both examples
sys.path.insert(0, str(Path(__file__).resolve().parent / "flower"))
from planwire_digits.model import CNN  # noqa: E402

WORKERS, ROUNDS, LOCAL_EPOCHS, BATCH = 3, 6, 2, 32
NODE_WORKERS = 1  # of the WORKERS, by default, when the Node.js worker can run here
MIN_BATCH = 16  # the owners release nothing computed on fewer rows: smaller trailing batches are not used
TARGET = 0.90  # held-out accuracy the run must beat


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
    starts = [s for s in range(0, len(x), BATCH) if len(x) - s >= MIN_BATCH]
    for b, start in enumerate(starts):
        batches[f"images.{b}"], batches[f"labels.{b}"] = x[start : start + BATCH], y[start : start + BATCH]
    np.savez(path, **batches)
    return len(batches) // 2


def owner_policy(plan_bytes: bytes, clip: float | None, noise: float) -> str:
    """The data owners' policy.toml: the review's snippet, with the hyper-parameters bounded (a client's
    lr=-1 would turn the update into a copy of the batch) and clipping and noise if asked."""
    text = policy_snippet(review(plan_bytes)).replace("min_batch = 16", f"min_batch = {MIN_BATCH}")
    text += 'inputs."hyper.lr" = { min = 0.0, max = 0.1 }\ninputs."hyper.momentum" = { min = 0.0, max = 0.99 }\n'
    text += 'inputs."hyper.weight_decay" = { equal = 0.0 }\n'
    if clip is not None:
        text += f"update = {{ clip_norm = {clip}, noise_multiplier = {noise} }}\n"
    return text


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@dataclass
class History:
    """Per round: training loss and accuracy (example-weighted means over the round's local steps on
    every worker) and the averaged model's held-out accuracy."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    held_out: list[float] = field(default_factory=list)

    def add(self, losses: Sequence[float], accuracies: Sequence[float], sizes: Sequence[int], held_out: float) -> None:
        self.loss.append(float(np.average(losses, weights=sizes)))
        self.accuracy.append(float(np.average(accuracies, weights=sizes)))
        self.held_out.append(held_out)


def plot(history: History, path: Path) -> Path:
    """Loss and accuracy per round as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rounds = range(1, len(history.loss) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    ax_loss.plot(rounds, history.loss, marker="o")
    ax_loss.set(title="training loss (mean over each round's batches)", xlabel="round", ylabel="cross-entropy")
    ax_loss.set_ylim(bottom=0)
    ax_acc.plot(rounds, history.accuracy, marker="o", label="training (local steps)")
    ax_acc.plot(rounds, history.held_out, marker="s", label="held-out (averaged model)")
    ax_acc.axhline(TARGET, color="grey", linestyle=":", linewidth=1, label=f"target {TARGET:.0%}")
    ax_acc.set(title="accuracy", xlabel="round", ylabel="accuracy", ylim=(0, 1.02))
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(list(rounds))
        ax.grid(alpha=0.3)
    fig.suptitle(f"federated averaging over {WORKERS} plan-workers (scikit-learn digits)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="federated rounds (default: %(default)s)")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write the loss/accuracy history as a PNG")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars on stderr (also: PLANWIRE_PROGRESS=0)"
    )
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=TARGET,
        help="fail (exit status 1) unless the final held-out accuracy beats this (default: %(default)s)",
    )
    parser.add_argument("--clip", type=float, help="the owners clip each released update to this L2 norm")
    parser.add_argument(
        "--noise", type=float, default=0.0, help="with --clip: Gaussian noise multiplier of the released updates"
    )
    parser.add_argument(
        "--node-workers",
        type=int,
        default=None,
        help=f"how many of the {WORKERS} workers are Node.js workers, which keep the same release policy "
        f"(default: {NODE_WORKERS} when node and worker/node's packages are installed, else 0)",
    )
    args = parser.parse_args(argv)
    if args.noise and args.clip is None:
        parser.error("--noise needs --clip (the noise is scaled to the clipping norm)")
    if args.node_workers is None:
        args.node_workers = 0 if node_missing() else NODE_WORKERS
    if not 0 <= args.node_workers <= WORKERS:
        parser.error(f"--node-workers must be between 0 and {WORKERS}")
    if args.node_workers and (why := node_missing()):
        parser.error(f"--node-workers {args.node_workers}: the Node.js worker cannot run here: {why}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot {args.plot}: the plot is a PNG; give a file name ending in .png")
    return args


def main(argv: Sequence[str] | None = None) -> History:
    args = parse(argv)
    show = not args.no_progress and os.environ.get("PLANWIRE_PROGRESS", "1").strip().lower() not in ("0", "false")
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
        progress=show,
    )
    print(f"built {step!r}")
    plan_bytes = step.step.variant.data
    print("\nwhat the data owners reviewed (plan-worker review):\n" + format_review(review(plan_bytes)))
    history = History()
    n_node = args.node_workers
    langs = ["Python"] * (WORKERS - n_node) + ["Node.js"] * n_node
    if n_node:
        print(f"mixed federation: {WORKERS - n_node} Python and {n_node} Node.js plan-worker(s), one policy")
    else:
        why = node_missing()
        print(f"federation: {WORKERS} Python plan-workers" + (f" (no Node.js worker: {why})" if why else ""))
    with tempfile.TemporaryDirectory(prefix="planwire-fed-") as tmp:
        n_batches, procs = [], []
        policy = Path(tmp) / "policy.toml"
        policy.write_text(owner_policy(plan_bytes, args.clip, args.noise))
        try:
            for i, (x, y) in enumerate(train):
                n_batches.append(save_shard(Path(tmp) / f"shard{i}.npz", x, y))
                shard = [str(Path(tmp) / f"shard{i}.npz")]
                owner = ["--policy", str(policy), "--audit", str(Path(tmp) / f"audit{i}.jsonl")]
                owner += ["--plans-dir", str(Path(tmp) / f"plans{i}")]
                launch = NodeWorkerProcess if langs[i] == "Node.js" else WorkerProcess
                procs.append(launch(f"hospital_{i}", data=shard, extra=owner))
            workers = [sy.connect(p.url) for p in procs]
            print(
                "workers:",
                ", ".join(
                    f"{w.id} ({lang}, {n} batches, {p.url})"
                    for w, n, p, lang in zip(workers, n_batches, procs, langs, strict=True)
                ),
            )
            pointers = [step.send(w) for w in workers]
            # Pointers to each worker's own batches: the server never sees them, only their sizes.
            data = [
                [(w.search(f"images.{b}")[0], w.search(f"labels.{b}")[0]) for b in range(n)]
                for w, n in zip(workers, n_batches, strict=True)
            ]
            global_state = model.state_dict()
            print(f"round 0: held-out accuracy {accuracy(model, x_test, y_test):.3f}")
            # a bar on a terminal only (disable=None): in logs the per-round lines below are the progress
            bar = tqdm(range(1, args.rounds + 1), desc="federated rounds", unit="round", disable=None if show else True)
            for rnd in bar:
                results = []  # (loss pointer, accuracy pointer, batch size) of every local step this round
                for ptr, batches in zip(pointers, data, strict=True):
                    ptr.load_state_dict(global_state)
                    for _ in range(LOCAL_EPOCHS):
                        for x_ptr, y_ptr in batches:
                            loss, acc = ptr(x_ptr, y_ptr)  # one message, pipelined; weights stay on the worker
                            results.append((loss, acc, x_ptr.shape[0]))
                losses = [loss.get().item() for loss, _, _ in results]  # each rode on its step's reply
                accuracies = [acc.get().item() for _, acc, _ in results]
                # The policy releases the weights only as their update since the push (clipped and noised
                # by the worker if the owners said so): the server averages updates.
                updates = [ptr.state_dict() for ptr in pointers]
                sizes = [len(x) for x, _ in train]
                global_state = {
                    k: global_state[k] + sum(u[k] * n for u, n in zip(updates, sizes, strict=True)) / sum(sizes)
                    for k in updates[0]
                }
                model.load_state_dict(global_state)
                history.add(losses, accuracies, [n for _, _, n in results], accuracy(model, x_test, y_test))
                bar.set_postfix(loss=f"{history.loss[-1]:.3f}", accuracy=f"{history.held_out[-1]:.3f}")
                tqdm.write(
                    f"round {rnd}: mean local loss {history.loss[-1]:.4f}, held-out accuracy "
                    f"{history.held_out[-1]:.3f}, local accuracy {history.accuracy[-1]:.3f} "
                    f"({len(results)} steps, {sum(n for _, _, n in results)} examples)"
                )
            bar.close()
            for w in workers:
                w.close()
            events = [
                [json.loads(line)["event"] for line in (Path(tmp) / f"audit{i}.jsonl").read_text().splitlines()]
                for i in range(len(procs))
            ]
            print(
                f"audit logs: {[e.count('released') for e in events]} releases and "
                f"{[e.count('refused') for e in events]} refusals per worker; nothing else left the workers"
            )
        finally:
            for p in procs:
                p.close()
    final = history.held_out[-1]
    print(f"final held-out accuracy: {final:.3f}")
    if args.plot is not None:
        print(f"loss/accuracy plot: {plot(history, args.plot).resolve()}")
    if final <= args.min_accuracy:
        raise SystemExit(f"federated training reached only {final:.3f} (expected > {args.min_accuracy:.2f})")
    return history


if __name__ == "__main__":
    main()
