"""Dynamic batch loading over named domains (Sheared-LLaMA §2.2, after DoReMi).

Domain weights w (a distribution over k domains) follow how far each domain's validation loss ℓ lags its
reference loss ℓ_ref. Every `update_every` steps:

    Δ = ℓ − ℓ_ref             (clamped at 0 with `clamp=True`, as the paper writes it; the reference code does not)
    w ← softmax(log w + Δ)
    w ← (1 − c) w + c / k     (smoothing, c = 1e-4)

Each sequence of a batch draws its domain from w (`np.random.default_rng([seed, step])`); a domain hands out its
windows in its own shuffled epoch order (`plrd_jax.data.windows.window_order`) from a cursor. The loader state (weights,
cursors, history) is small JSON, so a batch is a pure function of (state, step, seed) and a resumed run continues
exactly. Locally the domains are `LOCAL_DOMAINS`; on a TPU any `tfds:` or file-glob source can be one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from plrd_jax.data.windows import window_order

# Local domain name -> data source (plrd_jax.data.windows.load_dataset).
LOCAL_DOMAINS = {"wikitext": "wikitext2-heal", "books": "books-heal", "speeches": "speeches-heal",
                 "shakespeare": "tinyshakespeare", "pydoc": "pydoc"}


class DomainError(ValueError):
    """Domain names, weights or reference losses that do not fit together."""


@dataclasses.dataclass(frozen=True)
class Domains:
    """Named domains, their initial weights (summing to 1) and reference losses (None: measure on the parent)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    reference_losses: tuple[float, ...] | None = None
    update_every: int = 50  # steps between weight updates (the paper: 50 while pruning, 400 while continuing)
    smoothing: float = 1e-4
    clamp: bool = False  # Δ ← max(Δ, 0), the paper's rule

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.reference_losses is not None:
            object.__setattr__(self, "reference_losses", tuple(float(x) for x in self.reference_losses))
        if not self.names or len(set(self.names)) != len(self.names):
            raise DomainError(f"domain names must be distinct and at least one, got {list(self.names)}")
        if len(self.weights) != len(self.names):
            raise DomainError(f"{len(self.weights)} initial weights for {len(self.names)} domains {list(self.names)}")
        if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-6:
            raise DomainError(f"initial domain weights {list(self.weights)} must be positive and sum to 1")
        if self.reference_losses is not None and len(self.reference_losses) != len(self.names):
            raise DomainError(f"{len(self.reference_losses)} reference losses for {len(self.names)} domains")
        if self.update_every < 1:
            raise DomainError(f"update_every {self.update_every} must be >= 1")
        if not 0 <= self.smoothing < 1:
            raise DomainError(f"smoothing {self.smoothing} must lie in [0, 1)")

    @classmethod
    def build(cls, names: Sequence[str], weights: Sequence[float] | None = None,
              reference_losses: Mapping[str, float] | None = None, **kw) -> "Domains":
        """Domains with uniform weights by default; reference_losses by name (all or none of the domains)."""
        names = tuple(names)
        weights = tuple(weights) if weights is not None else (1.0 / len(names),) * len(names)
        refs = None
        if reference_losses:
            unknown = [n for n in reference_losses if n not in names]
            if unknown:
                raise DomainError(f"reference losses given for {', '.join(unknown)}, which are not among the "
                                  f"domains {', '.join(names)}")
            missing = [n for n in names if n not in reference_losses]
            if missing:
                raise DomainError(f"no reference loss for {', '.join(missing)}: give one for every domain, or "
                                  "none to measure them on the parent")
            refs = tuple(float(reference_losses[n]) for n in names)
        return cls(names, weights, refs, **kw)

    def replace(self, **kw) -> "Domains":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_sources(names: Iterable[str], sources: Mapping[str, str] | None = None) -> dict[str, str]:
    """Domain name -> data source: an explicit `sources` entry, else `LOCAL_DOMAINS`; unknown names raise."""
    sources = dict(sources or {})
    out = {}
    for name in names:
        source = sources.get(name, LOCAL_DOMAINS.get(name))
        if source is None:
            raise DomainError(f"unknown domain {name!r}: the local domains are {', '.join(LOCAL_DOMAINS)}; give "
                              f"any other as {name}=SOURCE (a file glob or tfds:NAME)")
        out[name] = source
    return out


def update_weights(weights: Sequence[float], losses: Sequence[float], reference_losses: Sequence[float],
                   smoothing: float = 1e-4, clamp: bool = False) -> np.ndarray:
    """w ← (1 − c)·softmax(log w + Δ) + c/k with Δ = ℓ − ℓ_ref (max(Δ, 0) if clamp); float64, sums to 1."""
    w = np.asarray(weights, np.float64)
    delta = np.asarray(losses, np.float64) - np.asarray(reference_losses, np.float64)
    if clamp:
        delta = np.maximum(delta, 0.0)
    logits = np.log(w) + delta
    w = np.exp(logits - logits.max())
    w = (1 - smoothing) * w / w.sum() + smoothing / len(w)
    return w / w.sum()


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """weights: current w; cursors: windows handed out per domain; history: (step, w) at the start and after
    every update."""

    weights: tuple[float, ...]
    cursors: tuple[int, ...]
    history: tuple[tuple[int, tuple[float, ...]], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "cursors": list(self.cursors),
                "history": [[s, list(w)] for s, w in self.history]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoaderState":
        return cls(tuple(d["weights"]), tuple(int(c) for c in d["cursors"]),
                   tuple((int(s), tuple(w)) for s, w in d["history"]))


def init_state(domains: Domains, step: int = 0) -> LoaderState:
    return LoaderState(domains.weights, (0,) * len(domains.names), ((step, domains.weights),))


def update(state: LoaderState, domains: Domains, losses: Sequence[float], step: int,
           reference_losses: Sequence[float] | None = None) -> LoaderState:
    """The state after one weight update from per-domain validation losses (in domain order)."""
    refs = reference_losses if reference_losses is not None else domains.reference_losses
    if refs is None:
        raise DomainError("no reference losses: give them in Domains or measure them on the parent")
    if len(losses) != len(domains.names):
        raise DomainError(f"{len(losses)} losses for {len(domains.names)} domains")
    w = update_weights(state.weights, losses, refs, domains.smoothing, domains.clamp)
    w = tuple(float(x) for x in w)
    return dataclasses.replace(state, weights=w, history=state.history + ((step, w),))


def sample_batch(state: LoaderState, windows: Sequence[np.ndarray], batch_size: int, step: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, LoaderState]:
    """(tokens [B, T], domain index [B], next state): each row's domain drawn from the weights, its window the
    domain's next one in its epoch order (`window_order(N_i, epoch, seed)`)."""
    if len(windows) != len(state.weights):
        raise DomainError(f"{len(windows)} window sets for {len(state.weights)} domains")
    rng = np.random.default_rng([seed, step])
    p = np.asarray(state.weights, np.float64)
    ids = rng.choice(len(p), size=batch_size, p=p / p.sum())
    rows, cursors = [], list(state.cursors)
    for i in ids:
        n = len(windows[i])
        epoch, pos = divmod(cursors[i], n)
        rows.append(windows[i][window_order(n, epoch, seed)[pos]])
        cursors[i] += 1
    return np.stack(rows), ids.astype(np.int32), dataclasses.replace(state, cursors=tuple(cursors))


def split_validation(windows: np.ndarray, count: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(training windows, the last `count` windows held out for the domain's validation loss)."""
    if len(windows) <= count:
        raise DomainError(f"domain {name} has {len(windows)} windows; it needs more than the {count} held out "
                          "for validation")
    return windows[:-count], windows[-count:]


def plot_weights(path: str, state: LoaderState, names: Sequence[str], title: str = "Domain weights") -> None:
    """Domain weights against step (one line per domain) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in state.history]
    weights = np.array([w for _, w in state.history])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, name in enumerate(names):
        ax.step(steps, weights[:, i], where="post", marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

