"""Sample-quality metrics of the demo: sliced Wasserstein distance, RBF-MMD^2 and, for digits, the
Frechet distance on the features of a small classifier (`DigitsClassifier`) and class coverage.

Both compare two sample sets x [N, d] and y [M, d] (images flattened first) and are computed in
float64. Neither is meaningful alone: the demo reports them next to the *floor*, the same metric
between two reference sets drawn with different seeds.
"""

from __future__ import annotations

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def _quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Empirical quantile function of each column of values [n, P] at `levels` [q]: [q, P]."""
    return torch.quantile(values, levels, dim=0, interpolation="linear")


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projections.

    The 1-D distance is the L1 distance between quantile functions, evaluated at 512 levels (exact
    enough for sets of different sizes). Directions come from `seed`, so two calls compare alike.
    """
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: x and y must have the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    levels = (torch.arange(512, dtype=torch.float64) + 0.5) / 512
    qx = _quantiles(x @ directions.to(x.device), levels.to(x.device))
    qy = _quantiles(y @ directions.to(y.device), levels.to(y.device))
    return (qx - qy).abs().mean().item()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, *, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels exp(-|a - b|^2 / (2 h^2)).

    bandwidths default to (0.5, 1, 2) x the median pairwise distance of the pooled samples. Holds an
    (N + M)^2 kernel matrix: subsample large sets.
    """
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_rbf: x and y must have the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("mmd_rbf: needs at least 2 samples in each set")
    pooled = torch.cat((x, y))
    d2 = torch.cdist(pooled, pooled).pow(2)
    if bandwidths is None:
        median = d2[torch.triu_indices(len(pooled), len(pooled), 1).unbind()].sqrt().median().item()
        bandwidths = tuple(f * max(median, 1e-12) for f in (0.5, 1.0, 2.0))
    kernel = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n = len(x)
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = len(y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (xx + yy - 2 * kxy.mean()).item()


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) between Gaussians fitted to features
    x [N, d] and y [M, d] (FID's formula), in float64. Tr (S_x S_y)^(1/2) is the sum of the square roots
    of the eigenvalues of S_x^(1/2) S_y S_x^(1/2) (symmetric, so eigh applies)."""
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ValueError(f"frechet_distance: need [N, d] and [M, d] with N, M >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    mx, my = x.mean(0), y.mean(0)
    sx, sy = torch.cov(x.T), torch.cov(y.T)
    evals, evecs = torch.linalg.eigh(sx)
    root_x = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root_x @ sy @ root_x).clamp_min(0).sqrt().sum()
    return ((mx - my).pow(2).sum() + sx.trace() + sy.trace() - 2 * cross).item()


class DigitsClassifier(torch.nn.Module):
    """An MLP 64 -> 128 -> 64 -> 10 on flattened 8x8 digits in [-1, 1]; `features` is the 64-wide
    penultimate layer the Frechet distance reads. `fit` trains it deterministically (full-batch Adam,
    weight decay, random 1-pixel shifts as augmentation) in a few seconds on a CPU."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.SiLU(),
                                        torch.nn.Linear(128, 64), torch.nn.SiLU())
        self.head = torch.nn.Linear(64, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.reshape(len(images), 64).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 600, seed: int = 0) -> "DigitsClassifier":
        """Train on images [N, 1, 8, 8] and labels [N]; returns the model in eval mode."""
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1), value=-1.0)
        for _ in range(steps):
            dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
            batch = padded[:, :, dy:dy + 8, dx:dx + 8]
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    @torch.no_grad()
    def classes(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).argmax(1)


def classes_covered(labels: torch.Tensor, *, num_classes: int = 10, min_fraction: float = 0.1) -> int:
    """How many classes hold at least `min_fraction` of their fair share (n / num_classes) of labels
    [n] (the same rule as mixtures' `modes_covered`). It asks whether a class is present, not whether
    it is balanced (SWD and FD see balance): the demo's quick digits teacher itself draws some digits
    at a quarter of their fair share, so a higher threshold flags its own reference as dropping them."""
    counts = torch.bincount(labels, minlength=num_classes)
    return int((counts >= min_fraction * len(labels) / num_classes).sum())
