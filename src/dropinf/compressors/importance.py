"""Importance-sampled dropout: keep r coordinates drawn without replacement with probability
proportional to a per-coordinate weight, the second moment mean_i g_ij^2 on a seeded probe of
training examples (`dropinf.probe.second_moments`).

Sampling is Efraimidis-Spirakis with exponential keys: key_j = E_j / w_j, E_j ~ Exp(1), and the kept
coordinates are the r smallest keys in increasing key order. So r' < r keeps exactly the first r'
coordinates of r (nesting, incremental r). E_j is a counter-based function of (seed, j): Philox4x32-10
(Salmon et al. 2011) with counter (j mod 2^32, j div 2^32, 0, 0) and key (seed mod 2^32, seed div 2^32)
gives 52 bits m_j, u_j = (2 m_j + 1) / 2^53, and E_j = -ln(u_j) by a fixed series of IEEE float64
additions, multiplications and divisions (no library log, whose last bits differ between CPU and
CUDA). So the keys, and hence the kept coordinates, are bitwise identical on every device and for
every chunk size; they are computed in chunks on the weights' device (memory O(chunk + r)).
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
from .dropout import CHUNK_ELEMS, Dropout

#: coordinates whose keys are computed at once, per device type (speed and memory only: the keys do
#: not depend on it): cache-sized on a CPU, large on a GPU (fewer kernel launches)
KEY_CHUNK = {"cpu": 1 << 16}
KEY_CHUNK_DEFAULT = 1 << 22
WEIGHTINGS = ("global", "block")
#: the probe's defaults: `diagonal` and 64 rows measured as good as `exact` and 256 rows by mislabel
#: AUC (docs/importance-dropout.md) at a fraction of the cost
PROBE_ESTIMATOR = "diagonal"
PROBE_ROWS = 64
#: how E_j is made from (seed, j), recorded in every array's provenance
KEY_RULE = ("Philox4x32-10, counter (j mod 2^32, j div 2^32, 0, 0), key (seed mod 2^32, seed div 2^32); "
            "m = (x0 << 20) | (x1 >> 12); E = -ln((2m + 1) / 2^53) by frexp and a 13-term atanh series "
            "in IEEE float64")

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)
#: 1/(2k+1) for the series ln f = 2 s sum_k s^(2k) / (2k+1), s = (f-1)/(f+1), |s| <= 0.1716:
#: the 13th term is below 2^-60 of the first
_ATANH = tuple(1.0 / (2 * k + 1) for k in range(13))


class OptionError(DropinfError, ValueError):
    """An invalid importance_dropout option."""


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for int64 tensors a in [0, 2^32) and a 32-bit constant m,
    with every intermediate below 2^50 (int64 never overflows)."""
    x = a * (m & 0xFFFF)
    y = a * (m >> 16)
    hi = ((x >> 16) + y) >> 16
    lo = (x + ((y & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32(counter, key: tuple[int, int], rounds: int = 10):
    """Philox4x32-`rounds` of the four 32-bit counter words (int64 tensors in [0, 2^32)) under the
    two-word key: the four output words, as int64 tensors in [0, 2^32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for i in range(rounds):
        if i:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _neg_log(u: torch.Tensor) -> torch.Tensor:
    """-ln(u) for float64 u in (0, 1], from IEEE-exact steps only (frexp, +, *, /), each its own
    elementwise op, so CPU and CUDA round identically."""
    f, e = torch.frexp(u)  # u = f 2^e, f in [0.5, 1)
    low = f < _SQRT_HALF
    f = torch.where(low, f * 2.0, f)  # f in [sqrt(1/2), sqrt(2))
    e = (e - low.to(e.dtype)).to(torch.float64)
    s = (f - 1.0) / (f + 1.0)
    z = s * s
    p = torch.full_like(z, _ATANH[-1])
    for c in reversed(_ATANH[:-1]):
        p = p * z
        p = p + c
    return -((e * _LN2) + (s * 2.0) * p)


def exponential_keys(seed: int, lo: int, hi: int, device=None) -> torch.Tensor:
    """E_j ~ Exp(1) (float64, on `device`) for coordinates j in [lo, hi): a function of (seed, j)
    alone, bitwise identical on every device (see KEY_RULE)."""
    j = torch.arange(int(lo), int(hi), dtype=torch.long, device=device)
    zero = torch.zeros_like(j)
    seed = int(seed)
    x0, x1, _, _ = philox4x32((j & _MASK32, j >> 32, zero, zero), (seed & _MASK32, seed >> 32))
    m = (x0 << 20) | (x1 >> 12)  # 52 random bits
    return _neg_log((m * 2 + 1).to(torch.float64) * 2.0 ** -53)


def smallest_keys(weights: torch.Tensor, lo: int, hi: int, k: int, seed: int, zero: bool = False,
                  chunk: int | None = None) -> torch.Tensor:
    """Coordinates in [lo, hi) with the k smallest keys, in increasing key order (int64, CPU): among
    positive weights key E_j / w_j (zero=False), among zero weights key E_j (zero=True). Keys are
    computed on the weights' device, `chunk` coordinates at a time (default: KEY_CHUNK)."""
    device = weights.device
    chunk = int(chunk or KEY_CHUNK.get(device.type, KEY_CHUNK_DEFAULT))
    best_k = torch.empty(0, dtype=torch.float64, device=device)
    best_i = torch.empty(0, dtype=torch.long, device=device)
    if k <= 0 or hi <= lo:
        return best_i.cpu()
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        keys = exponential_keys(seed, a, b, device)
        w = weights[a:b]
        if zero:
            keys = keys.masked_fill(w != 0, torch.inf)
        else:
            keys = (keys / w.to(torch.float64)).masked_fill(w == 0, torch.inf)
        kk, ii = torch.topk(keys, min(k, keys.numel()), largest=False, sorted=False)
        ok = torch.isfinite(kk)
        best_k, best_i = torch.cat([best_k, kk[ok]]), torch.cat([best_i, ii[ok] + a])
        if best_k.numel() > k:
            best_k, sel = torch.topk(best_k, k, largest=False, sorted=False)
            best_i = best_i[sel]
    # increasing key; ties (probability ~0) broken by coordinate, so the order is fully determined
    best_k, best_i = best_k.cpu(), best_i.cpu()
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
    OPTIONS = ("probe", "probe_seed", "probe_estimator", "weighting", "rescale", "chunk_elems")

    def __init__(self, dim, r, seed=0, layout=None, weights=None, probe: int = PROBE_ROWS, probe_seed: int = 0,
                 weighting: str = "global", rescale: bool = False, probe_seconds: float | None = None,
                 chunk_elems: int = CHUNK_ELEMS, probe_estimator: str = PROBE_ESTIMATOR):
        self._check_options(probe=probe, probe_seed=probe_seed, weighting=weighting, rescale=rescale,
                            probe_estimator=probe_estimator)
        if weights is None:
            raise OptionError(
                "importance_dropout needs per-coordinate weights: build its options with "
                "ImportanceDropout.prepare_options(options, model=, loss_fn=, train_loader=) (it runs the "
                "second-moment probe) or pass weights= (a (dim,) tensor, e.g. dropinf.probe.second_moments(...))")
        # kept on their device: the keys are drawn there (identically on every device)
        weights = torch.as_tensor(weights).detach()
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
        self.probe, self.probe_seed, self.probe_estimator = int(probe), int(probe_seed), probe_estimator
        self.weighting, self.rescale = weighting, bool(rescale)
        self.probe_seconds = None if probe_seconds is None else float(probe_seconds)
        self.scale: torch.Tensor | None = None
        super().__init__(dim, r, seed, layout, chunk_elems)

    @classmethod
    def _check_options(cls, probe=PROBE_ROWS, probe_seed=0, weighting="global", rescale=False,
                       probe_estimator=PROBE_ESTIMATOR, **_):
        from ..probe import ESTIMATORS

        if isinstance(probe, bool) or not isinstance(probe, int) or probe < 1:
            raise OptionError(f"importance_dropout: probe must be a positive number of training examples, got {probe!r}")
        if isinstance(probe_seed, bool) or not isinstance(probe_seed, int) or probe_seed < 0:
            raise OptionError(f"importance_dropout: probe_seed must be a non-negative int, got {probe_seed!r}")
        if weighting not in WEIGHTINGS:
            raise OptionError(f"importance_dropout: weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if not isinstance(rescale, bool):
            raise OptionError(f"importance_dropout: rescale must be true or false, got {rescale!r}")
        if probe_estimator not in ESTIMATORS:
            raise OptionError(f"importance_dropout: probe_estimator must be one of {', '.join(ESTIMATORS)}, "
                              f"got {probe_estimator!r}")

    @classmethod
    def prepare_options(cls, options: dict, *, model, loss_fn, train_loader, params=None, device=None) -> dict:
        """The configured options plus `weights` (the second-moment probe on the training loader, kept
        on the device it ran on, where the coordinates are then drawn) and `probe_seconds`."""
        from ..probe import second_moments

        opts = dict(options)
        unknown = sorted(set(opts) - set(cls.OPTIONS))
        if unknown:
            raise OptionError(f"importance_dropout: unknown option(s) {unknown}; known: {list(cls.OPTIONS)}")
        cls._check_options(**opts)
        weights, info = second_moments(model, loss_fn, train_loader, opts.get("probe", PROBE_ROWS),
                                       opts.get("probe_seed", 0), params=params, device=device, return_info=True, on_device=True,
                                       estimator=opts.get("probe_estimator", PROBE_ESTIMATOR))
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
                    kept = indices[:r_pos][inside].to(self.weights.device)
                    q[:r_pos][inside] = share * self.weights[kept].to(torch.float64).cpu() / mass[b]
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
                "probe_estimator": self.probe_estimator,
                "weighting": self.weighting, "rescale": self.rescale, "key_rule": KEY_RULE,
                "weights_summary": self.weights_summary()}
