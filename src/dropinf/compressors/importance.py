"""Importance-sampled dropout: keep r coordinates drawn without replacement with probability
proportional to a per-coordinate weight, the second moment mean_i g_ij^2 on a seeded probe of
training examples (`dropinf.probe.second_moments`).

Sampling is Efraimidis-Spirakis with exponential keys: key_j = E_j / w_j, E_j ~ Exp(1) drawn from
the seed, and the kept coordinates are the r smallest keys in increasing key order. So r' < r keeps
exactly the first r' coordinates of r (nesting, incremental r). E is drawn in fixed chunks of
coordinates, each from its own seeded generator, so memory stays O(chunk + r) for any dim.
Coordinates of weight 0 come after every positive one (in the order of their E_j), so they are kept
only when r exceeds the number of positive weights.

weighting="block": r is apportioned across the layout's blocks (parameter tensors) in proportion
to their widths, as uniform dropout does in expectation (the k-th pick of block b is placed at
(k + 1/2) / width_b and blocks are merged in that order: nested in r), and sampled by weight inside
each block; blocks without any positive weight get no share (without a layout there is one block).
weighting="global" (the default): by weight across all coordinates.

rescale=True divides kept column j by sqrt(r q_j), q_j its per-draw selection probability
(global: w_j / sum w; block: the block's share times w_j / its mass; weight 0: 1/dim), so that the
kept squares estimate the full squared norm; `nest` then rescales by sqrt(r / r').

Once the coordinates are fixed, extraction is dropout's gather path (plus one multiply with rescale).
"""
from __future__ import annotations

import math
import warnings

import torch

from ..errors import DropinfError, ShapeError
from .dropout import Dropout

#: coordinates per exponential-key chunk (each chunk seeded separately: any block alone is cheap)
KEY_CHUNK = 1 << 18
WEIGHTINGS = ("global", "block")


class OptionError(DropinfError, ValueError):
    """An invalid importance_dropout option."""


def _chunk_seed(seed: int, chunk: int) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + chunk * 0xBF58476D1CE4E5B9 + 0x1D) % (1 << 63)


def exponential_keys(seed: int, lo: int, hi: int, chunk: int) -> torch.Tensor:
    """E_j ~ Exp(1) (float64) for coordinates j in [lo, hi) inside chunk `chunk`: the whole chunk is
    always drawn, so E_j is a function of (seed, j) alone."""
    a = chunk * KEY_CHUNK
    g = torch.Generator().manual_seed(_chunk_seed(seed, chunk))
    return torch.empty(KEY_CHUNK, dtype=torch.float64).exponential_(generator=g)[lo - a:hi - a]


def smallest_keys(weights: torch.Tensor, lo: int, hi: int, k: int, seed: int, zero: bool = False) -> torch.Tensor:
    """Coordinates in [lo, hi) with the k smallest keys, in increasing key order: among positive
    weights key E_j / w_j (zero=False), among zero weights key E_j (zero=True)."""
    best_k = torch.empty(0, dtype=torch.float64)
    best_i = torch.empty(0, dtype=torch.long)
    if k <= 0 or hi <= lo:
        return best_i
    for c in range(lo // KEY_CHUNK, (hi - 1) // KEY_CHUNK + 1):
        a, b = max(lo, c * KEY_CHUNK), min(hi, (c + 1) * KEY_CHUNK)
        keys = exponential_keys(seed, a, b, c)
        w = weights[a:b]
        if zero:
            keys.masked_fill_(w != 0, torch.inf)
        else:
            keys.div_(w).masked_fill_(w == 0, torch.inf)  # float64 keys (w promoted)
        take = min(k, keys.numel())
        kk, ii = torch.topk(keys, take, largest=False, sorted=False)
        ok = torch.isfinite(kk)
        best_k, best_i = torch.cat([best_k, kk[ok]]), torch.cat([best_i, ii[ok] + a])
        if best_k.numel() > k:
            best_k, sel = torch.topk(best_k, k, largest=False, sorted=False)
            best_i = best_i[sel]
    # increasing key; ties (probability 0) broken by coordinate, so the order is fully determined
    by_index = torch.argsort(best_i)
    best_k, best_i = best_k[by_index], best_i[by_index]
    return best_i[torch.sort(best_k, stable=True).indices]


def apportion(widths: list[int], caps: list[int], r: int) -> torch.Tensor:
    """Block id of each of the first r picks: the k-th pick of block b sits at (k + 1/2) / width_b,
    picks merged by position (ties: lower block first), at most caps[b] picks from block b."""
    times, ids = [], []
    for b, (w, cap) in enumerate(zip(widths, caps)):
        m = min(cap, r)
        if m > 0:
            times.append((torch.arange(m, dtype=torch.float64) + 0.5) / w)
            ids.append(torch.full((m,), b, dtype=torch.long))
    if not times:
        return torch.empty(0, dtype=torch.long)
    t, bid = torch.cat(times), torch.cat(ids)  # bid ascending: the stable sort breaks ties by block
    return bid[torch.sort(t, stable=True).indices[:r]]


class ImportanceDropout(Dropout):
    name = "importance_dropout"
    nests_in_r = True
    #: configurable options (workflow: extract.compressor_options.importance_dropout)
    OPTIONS = ("probe", "probe_seed", "weighting", "rescale", "chunk_elems")

    def __init__(self, dim, r, seed=0, layout=None, weights=None, probe: int = 256, probe_seed: int = 0,
                 weighting: str = "global", rescale: bool = False, probe_seconds: float | None = None,
                 chunk_elems: int = 1 << 26):
        self._check_options(probe=probe, probe_seed=probe_seed, weighting=weighting, rescale=rescale)
        if weights is None:
            raise OptionError(
                "importance_dropout needs per-coordinate weights: build its options with "
                "ImportanceDropout.prepare_options(options, model=, loss_fn=, train_loader=) (it runs the "
                "second-moment probe) or pass weights= (a (dim,) tensor, e.g. dropinf.probe.second_moments(...))")
        weights = torch.as_tensor(weights).detach().cpu()
        if weights.dim() != 1 or weights.numel() != int(dim):
            raise ShapeError(f"importance_dropout: weights must have shape ({int(dim)},), got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            weights = weights.to(torch.float64)
        bad = ~torch.isfinite(weights) | (weights < 0)
        if bad.any():
            j = int(torch.nonzero(bad)[0])
            raise OptionError(f"importance_dropout: weights must be finite and >= 0; coordinate {j} has "
                              f"{weights[j].item()}")
        self.weights = weights
        self.probe, self.probe_seed = int(probe), int(probe_seed)
        self.weighting, self.rescale = weighting, bool(rescale)
        self.probe_seconds = None if probe_seconds is None else float(probe_seconds)
        self.scale: torch.Tensor | None = None
        super().__init__(dim, r, seed, layout, chunk_elems)

    @classmethod
    def _check_options(cls, probe=256, probe_seed=0, weighting="global", rescale=False, **_):
        if isinstance(probe, bool) or not isinstance(probe, int) or probe < 1:
            raise OptionError(f"importance_dropout: probe must be a positive number of training examples, got {probe!r}")
        if isinstance(probe_seed, bool) or not isinstance(probe_seed, int) or probe_seed < 0:
            raise OptionError(f"importance_dropout: probe_seed must be a non-negative int, got {probe_seed!r}")
        if weighting not in WEIGHTINGS:
            raise OptionError(f"importance_dropout: weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if not isinstance(rescale, bool):
            raise OptionError(f"importance_dropout: rescale must be true or false, got {rescale!r}")

    @classmethod
    def prepare_options(cls, options: dict, *, model, loss_fn, train_loader, params=None, device=None) -> dict:
        """The configured options plus `weights` (the second-moment probe on the training loader)
        and `probe_seconds`."""
        from ..probe import second_moments

        opts = dict(options)
        unknown = sorted(set(opts) - set(cls.OPTIONS))
        if unknown:
            raise OptionError(f"importance_dropout: unknown option(s) {unknown}; known: {list(cls.OPTIONS)}")
        cls._check_options(**opts)
        weights, info = second_moments(model, loss_fn, train_loader, opts.get("probe", 256), opts.get("probe_seed", 0),
                                       params=params, device=device, return_info=True)
        opts.update(weights=weights, probe_seconds=info["seconds"])
        return opts

    # ---- sampling ------------------------------------------------------------------------------
    def _blocks(self) -> list[tuple[int, int]]:
        if self.weighting == "global" or self.layout is None:
            return [(0, self.dim)]
        return self.layout.blocks

    def _stats(self, blocks) -> tuple[list[float], list[int]]:
        """Mass (float64 sum of weights) and number of positive weights of each block."""
        mass, count = [], []
        for lo, hi in blocks:
            m, c = 0.0, 0
            for a in range(lo, hi, 1 << 24):
                w = self.weights[a:min(hi, a + (1 << 24))].to(torch.float64)
                m += float(w.sum())
                c += int((w > 0).sum())
            mass.append(m)
            count.append(c)
        return mass, count

    def _draw(self) -> torch.Tensor:
        blocks = self._blocks()
        mass, count = self._stats(blocks)
        n_pos = sum(count)
        if n_pos == 0:
            warnings.warn("importance_dropout: every weight is 0 (no gradient signal on the probe); "
                          "coordinates are drawn uniformly", stacklevel=4)
        r_pos = min(self.r, n_pos)
        widths = [hi - lo for lo, hi in blocks]
        seq = apportion(widths, count, r_pos) if len(blocks) > 1 else torch.zeros(r_pos, dtype=torch.long)
        picked = torch.empty(r_pos, dtype=torch.long)
        for b, (lo, hi) in enumerate(blocks):
            where = seq == b
            k = int(where.sum())
            if k:
                picked[where] = smallest_keys(self.weights, lo, hi, k, self.seed)
        zeros = smallest_keys(self.weights, 0, self.dim, self.r - r_pos, self.seed, zero=True)
        indices = torch.cat([picked, zeros])
        if self.rescale:
            active = sum(w for w, c in zip(widths, count) if c > 0)
            q = torch.full((indices.numel(),), 1.0 / self.dim, dtype=torch.float64)
            for b, (lo, hi) in enumerate(blocks):
                if mass[b] > 0:
                    inside = (indices[:r_pos] >= lo) & (indices[:r_pos] < hi)
                    share = widths[b] / active
                    q[:r_pos][inside] = share * self.weights[indices[:r_pos][inside]].to(torch.float64) / mass[b]
            self.scale = 1.0 / torch.sqrt(self.r * q)
        return indices

    def _weights(self):
        return self.scale

    def nest(self, Y: torch.Tensor, r: int) -> torch.Tensor:
        return Y[:, :r] * math.sqrt(self.r / r) if self.rescale else Y[:, :r]

    # ---- provenance ----------------------------------------------------------------------------
    def weights_summary(self) -> dict:
        """Sum, max, number of positive weights, effective number of coordinates (sum w)^2 / sum w^2,
        and each parameter tensor's share of the mass."""
        if getattr(self, "_summary", None) is None:
            self._summary = self._summarize()
        return dict(self._summary)

    def _summarize(self) -> dict:
        slots = self.layout.slots if self.layout is not None else None
        blocks = [(s.offset, s.stop) for s in slots] if slots else [(0, self.dim)]
        mass, count = self._stats(blocks)
        total, sq, wmax = sum(mass), 0.0, 0.0
        for a in range(0, self.dim, 1 << 24):
            w = self.weights[a:a + (1 << 24)].to(torch.float64)
            sq, wmax = sq + float(w.square().sum()), max(wmax, float(w.max()))
        names = [s.name for s in slots] if slots else ["all"]
        return {"sum": total, "max": wmax, "positive": int(sum(count)),
                "effective_coordinates": total * total / sq if sq > 0 else 0.0,
                "block_mass": {n: (m / total if total > 0 else 0.0) for n, m in zip(names, mass)}}

    def attrs(self):
        return {**super().attrs(), "sampling": "second moment, Efraimidis-Spirakis exponential keys",
                "probe": self.probe, "probe_seed": self.probe_seed, "probe_seconds": self.probe_seconds,
                "weighting": self.weighting, "rescale": self.rescale, "key_chunk": KEY_CHUNK,
                "key_seed": "(seed*0x9E3779B97F4A7C15 + chunk*0xBF58476D1CE4E5B9 + 0x1D) mod 2^63 (CPU generator)",
                "weights_summary": self.weights_summary()}
