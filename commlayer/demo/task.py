"""The demo's learning task: a synthetic classification problem and an MLP (no download).

Data are a Gaussian mixture: ``clusters`` clusters per class with random centres, so the task is
learnable but not linearly separable. Every rank regenerates the same data from the seed
and takes its own shard of the training set; the evaluation set is shared and held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TaskConfig:
    """Sizes of the task.

    Attributes:
        in_dim: input features.
        hidden: hidden width of the student MLP (two hidden layers); parameters ~ in*h + h*h.
        classes: number of classes.
        train: training examples (all ranks together).
        eval: held-out evaluation examples.
        batch: per-rank batch size.
        lr: SGD learning rate (momentum 0.9).
        seed: data and initialisation seed (identical on every rank).
        clusters: mixture components per class.
        separation: scale of the cluster centres relative to the unit noise (larger: easier).
    """

    in_dim: int = 256
    hidden: int = 1024
    classes: int = 10
    train: int = 32768
    eval: int = 4096
    batch: int = 64
    lr: float = 0.05
    seed: int = 0
    clusters: int = 4
    separation: float = 0.4

    def __post_init__(self) -> None:
        for name in ("in_dim", "hidden", "classes", "train", "eval", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskConfig.{name}: expected >= 1, got {getattr(self, name)}")


def make_model(cfg: TaskConfig) -> nn.Module:
    """The student MLP, initialised from ``cfg.seed`` (same weights on every rank)."""
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(cfg.seed + 1)
        return nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
                             nn.Linear(cfg.hidden, cfg.classes))


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def make_data(cfg: TaskConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_eval, y_eval), generated from a seeded private generator."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.train + cfg.eval
    centres = torch.randn(cfg.classes * cfg.clusters, cfg.in_dim, generator=gen) * cfg.separation
    c = torch.randint(0, cfg.classes * cfg.clusters, (n,), generator=gen)
    x = centres[c] + torch.randn(n, cfg.in_dim, generator=gen)
    y = c % cfg.classes
    return x[: cfg.train], y[: cfg.train], x[cfg.train:], y[cfg.train:]


class Shard:
    """A rank's shard of the training set, served as seeded random mini-batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rank: int, world: int, batch: int, seed: int) -> None:
        self.x = x[rank::world]
        self.y = y[rank::world]
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next mini-batch (sampled with replacement)."""
        idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=self.gen)
        return self.x[idx], self.y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in percent) on (x, y)."""
    model.eval()
    out = model(x)
    loss = float(nn.functional.cross_entropy(out, y))
    acc = float((out.argmax(1) == y).float().mean()) * 100.0
    model.train()
    return loss, acc
