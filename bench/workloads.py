"""The bench's real training workloads: a ResNet-style CNN and a small causal transformer LM.

Both are built fresh (seeded) by a function so that the plan, the eager baseline and the plain
``torch.onnx.export`` of the forward each get the same weights and none shares a cache entry with another
build of a different seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

RESNET_BATCH = 32
LM_BATCH, LM_SEQ, LM_VOCAB, LM_DIM, LM_HEADS, LM_LAYERS = 16, 32, 256, 64, 4, 2


def resnet(seed: int = 0) -> Any:
    """Stem (conv3x3 16 + BN + ReLU) and three residual stages (16, 32, 64 channels; stride 2 from the
    second, a 1x1 conv + BN shortcut where the shape changes) of one basic block each, global average
    pool and a linear head: a CIFAR ResNet-8 for 32x32x3 inputs, 10 classes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x: Any) -> Any:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def lm(seed: int = 0) -> Any:
    """A 2-layer causal transformer LM: token + position embeddings, pre-norm blocks (4-head causal
    self-attention, GELU MLP of 4x width), a final LayerNorm and a vocabulary head; d=64, sequence 32."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(LM_DIM)
            self.qkv = nn.Linear(LM_DIM, 3 * LM_DIM)
            self.proj = nn.Linear(LM_DIM, LM_DIM)
            self.ln2 = nn.LayerNorm(LM_DIM)
            self.mlp = nn.Sequential(nn.Linear(LM_DIM, 4 * LM_DIM), nn.GELU(), nn.Linear(4 * LM_DIM, LM_DIM))

        def forward(self, x: Any) -> Any:
            n, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.reshape(n, t, LM_HEADS, d // LM_HEADS).transpose(1, 2) for z in (q, k, v))
            att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att.transpose(1, 2).reshape(n, t, d))
            return x + self.mlp(self.ln2(x))

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(LM_VOCAB, LM_DIM)
            self.pos = nn.Parameter(torch.randn(LM_SEQ, LM_DIM) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(LM_LAYERS)))
            self.ln = nn.LayerNorm(LM_DIM)
            self.head = nn.Linear(LM_DIM, LM_VOCAB)

        def forward(self, idx: Any) -> Any:
            x = self.tok(idx) + self.pos[: idx.shape[1]]
            return self.head(self.ln(self.blocks(x)))

    return LM()


def lm_loss(logits: Any, target: Any) -> Any:
    """Next-token cross-entropy over every position."""
    import torch.nn.functional as F  # noqa: N812

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@dataclasses.dataclass
class Workload:
    """A model, how to train it and a batch of data for it."""

    name: str  # short: figure names start with it (the full description is in the family's note)
    make: Callable[[int], Any]
    loss: Callable[[Any, Any], Any]
    optimizer: str  # "sgd" or "adam"
    args_shape: list[tuple[int, ...]]
    dtypes: list[Any]
    batch: Callable[[int], tuple[Any, Any]]  # batch size -> (x, y)
    build_batch: int

    def plan_optimizer(self) -> Any:
        from planwire.exporter import optim

        return optim.SGD(lr=0.05, momentum=0.9) if self.optimizer == "sgd" else optim.Adam(lr=1e-3)

    def torch_optimizer(self, params: Any) -> Any:
        import torch

        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return torch.optim.Adam(params, lr=1e-3)


def workloads() -> list[Workload]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    def images(n: int) -> tuple[Any, Any]:
        return torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))

    def tokens(n: int) -> tuple[Any, Any]:
        seq = torch.randint(0, LM_VOCAB, (n, LM_SEQ + 1))
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    return [
        Workload(
            "ResNet-8 CNN",
            resnet,
            F.cross_entropy,
            "sgd",
            [(-1, 3, 32, 32), (-1,)],
            [torch.float32, torch.int64],
            images,
            RESNET_BATCH,
        ),
        Workload(
            "transformer LM",
            lm,
            lm_loss,
            "adam",
            [(-1, LM_SEQ), (-1, LM_SEQ)],
            [torch.int64, torch.int64],
            tokens,
            LM_BATCH,
        ),
    ]
