"""
The paper's quantities and the statistics the scripts report.

Fan-in (Appendix B.1), layer l = 0..N-1:
    plain stack          phi_l  = (N - l) + 1
    deep supervision     phi'_l = (N - l + 1)(N - l + 2) / 2           (triangular numbers)
    virtual depth        FanIn(L_p) = sum over virtual positions i (1-indexed) with V_i = L_p
                                      of (N_virt - i + 2)
The paper's virtual-depth example is inconsistent: its text says repeats 2,3,3,4 for layers
5-8 (N_virt = 16), but its numbers L1..L8 = 18,17,16,15,27,33,24,20 come out exactly with
repeats [1,1,1,1,2,3,3,5] (N_virt = 17), which config/virtual_depth.py uses (VIRTUAL_NOTE).

Accumulated gradient share (Eq. 2): per layer, the sum over optimizer steps of the L2 norm of
its gradient, normalised over the layers. Spearman's rho with a permutation p-value (no scipy),
linear-vs-quadratic fits of the share, mean and sample std over seeds, and for comparing two configs
over their seeds an exact two-sample permutation test and Welch's interval.
"""
import itertools
import math
import re

import numpy as np

VIRTUAL_NOTE = ("note: the paper's text says repeats 2,3,3,4 for layers 5-8 (16 virtual positions), but its "
                "fan-in numbers 18,17,16,15,27,33,24,20 come out exactly with repeats [1,1,1,1,2,3,3,5] "
                "(17 virtual positions); config/virtual_depth.py uses the latter (docs/paper_notes.md).")


# ---- theory (Appendix B.1) ------------------------------------------------------------------
def fanin_plain(N):
    """phi_l = (N - l) + 1: the identity path plus the N - l downstream blocks (incl. the head)."""
    return [N - l + 1 for l in range(N)]


def fanin_deep_supervision(N):
    """phi'_l = (N - l + 1)(N - l + 2) / 2: the final head plus an auxiliary head after every block."""
    return [(N - l + 1) * (N - l + 2) // 2 for l in range(N)]


def fanin_general(repeats, deep_supervision):
    """Virtual depth: FanIn(L_p) = sum over the virtual positions i (1-indexed) of block p of
    (N_virt - i + 2); with deep supervision an extra (e - i + 1) from the auxiliary head after
    every physical block (at virtual position e >= i). Reduces to the two formulas above when
    there is no repetition (the tests check it and the paper's virtual-depth numbers)."""
    n_virt = sum(repeats)
    ends = list(itertools.accumulate(repeats))            # virtual position after each block
    out, i = [], 0
    for r in repeats:
        total = 0
        for k in range(r):
            pos = i + k + 1
            total += n_virt - pos + 2
            if deep_supervision:
                total += sum(e - pos + 1 for e in ends if e >= pos)
        out.append(total)
        i += r
    return out


def theory_for(mc):
    """(kind, per-layer fan-in, per-layer repeats) for a model-config dict (GPTConfig fields)."""
    N = mc["n_layer"]
    repeats = list(mc.get("repeats") or [1] * N)
    deep = bool(mc.get("deep_supervision", False))
    virtual = any(r != 1 for r in repeats)
    kind = ("virtual depth + deep supervision" if virtual and deep else "virtual depth" if virtual
            else "deep supervision (quadratic)" if deep else "plain (linear)")
    return kind, fanin_general(repeats, deep), repeats


# ---- Spearman correlation without scipy ----------------------------------------------------
def rankdata(a):
    """Ranks 1..n, ties get their average rank."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    s = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


_PERMS = {}


def _all_permutations(n):
    """All n! permutations of range(n) as an int8 array (n <= 10: at most 36 MB), cached."""
    if n not in _PERMS:
        p = np.zeros((1, 0), dtype=np.int8)
        for k in range(n):   # insert value k at every position of every permutation of range(k)
            new = np.empty((len(p) * (k + 1), k + 1), dtype=np.int8)
            for pos in range(k + 1):
                new[pos::k + 1, :pos] = p[:, :pos]
                new[pos::k + 1, pos] = k
                new[pos::k + 1, pos + 1:] = p[:, pos:]
            p = new
        _PERMS[n] = p
    return _PERMS[n]


def _centred_ranks(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of equal length, got {x.shape} and {y.shape}")
    rx, ry = rankdata(x), rankdata(y)
    return rx - rx.mean(), ry - ry.mean()


def spearman_rho(x, y):
    """Spearman's rho alone (no p-value: cheap enough to compute at every step of a run); nan when
    x or y is constant or n < 3."""
    rx, ry = _centred_ranks(x, y)
    denom = math.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float("nan") if len(rx) < 3 or denom == 0 else float((rx * ry).sum() / denom)


def spearman(x, y, exact_max_n=10, n_perm=200_000, seed=0):
    """Spearman's rho (Pearson correlation of average-tie ranks, as scipy.stats.spearmanr) and a
    two-sided permutation p-value P(|rho_perm| >= |rho|) under the null of exchangeable pairs.

    n <= exact_max_n: exact, enumerating all n! permutations (ties handled exactly).
    larger n: Monte Carlo over n_perm random permutations with a fixed seed (deterministic),
    p = (hits + 1) / (n_perm + 1) so it is never 0 (resolution ~5e-6 with the default).
    Returns (nan, nan) when x or y is constant or n < 3."""
    rx, ry = _centred_ranks(x, y)
    n, rho = len(rx), spearman_rho(x, y)
    if not np.isfinite(rho):
        return rho, float("nan")
    denom = math.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    tol = 1e-9 * (rx ** 2).sum() ** 0.5 * (ry ** 2).sum() ** 0.5
    target = abs(rho) * denom - tol
    if n <= exact_max_n:
        perms = _all_permutations(n)
        acc = np.zeros(len(perms))
        for j in range(n):
            acc += rx[j] * ry[perms[:, j]]
        return rho, float((np.abs(acc) >= target).mean())
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < n_perm:
        m = min(50_000, n_perm - done)
        perms = np.argsort(rng.random((m, n)), axis=1)
        hits += int((np.abs(ry[perms] @ rx) >= target).sum())
        done += m
    return rho, (hits + 1) / (n_perm + 1)


def p_text(p):
    """'p = 0.014', 'p = 5.0e-05', or 'p < 1e-5' below the Monte-Carlo test's resolution (its floor,
    1 / (n_perm + 1) ~ 5e-6 at 200,000 permutations, is a bound, not a value)."""
    if not np.isfinite(p):
        return "p = nan"
    if p < 1e-5:
        return "p < 1e-5"
    return f"p = {p:.2g}" if p >= 1e-3 else f"p = {p:.1e}"


# ---- fits of the share's shape -----------------------------------------------------------
def fit_decay(share, N, theory=None):
    """Which decay explains the share better: linear phi_l or quadratic phi'_l?
    For each: R^2 of the least-squares affine fit share ~ a + b * phi/sum(phi) (shape only),
    and the RMSE between the share and phi/sum(phi) (no free parameters). With theory (e.g. virtual
    depth's fan-in) the same numbers for it too, under 'theory'; the verdict stays linear vs quadratic."""
    share = np.asarray(share, dtype=np.float64)
    share = share / share.sum()
    out = {}
    cands = [("linear", fanin_plain(N)), ("quadratic", fanin_deep_supervision(N))]
    if theory is not None and list(theory) not in (cands[0][1], cands[1][1]):
        cands.append(("theory", list(theory)))
    for name, phi in cands:
        p = np.asarray(phi, dtype=np.float64)
        p = p / p.sum()
        A = np.stack([np.ones(N), p], axis=1)
        coef, *_ = np.linalg.lstsq(A, share, rcond=None)
        resid = share - A @ coef
        ss_tot = ((share - share.mean()) ** 2).sum()
        r2 = 1 - (resid ** 2).sum() / ss_tot if ss_tot > 0 else float("nan")
        out[name] = {"r2": float(r2), "slope": float(coef[1]), "rmse": float(np.sqrt(((share - p) ** 2).mean()))}
    decaying = [k for k in ("linear", "quadratic") if out[k]["slope"] > 0 and np.isfinite(out[k]["r2"])]
    best = max(decaying, key=lambda k: out[k]["r2"]) if decaying else None
    out["verdict"] = ("neither (the share does not decay with depth)" if best is None
                      else best if out[best]["r2"] >= 0.5
                      else f"neither fits well (best {best}, R^2 {out[best]['r2']:.2f} < 0.5)")
    return out


def layer_of(name):
    """The layer a gradient-dump group belongs to: 'layer.3' for 'layer.3' and for its sub-blocks
    'layer.3.attn' / 'layer.3.mlp'; None for the other groups (embed, head, a ResNet's stem)."""
    m = re.fullmatch(r"(layer\.\d+)(\.\w+)?", name)
    return m.group(1) if m else None


def accumulated_share(norms, names):
    """Eq. 2: per-layer sum over steps of ||grad||, normalised over the layers ('layer.*' groups)."""
    cols = [i for i, n in enumerate(names) if n.startswith("layer.")]
    acc = np.asarray(norms, dtype=np.float64).reshape(-1, len(names))[:, cols].sum(axis=0)
    return acc / acc.sum() if acc.sum() > 0 else acc


SETTLED_RHO = 0.9   # share_drift: the ranking has settled once rho with the final share stays at or above this


def share_drift(norms, names, steps, theory=None, points=64):
    """How early in training the share's layer ranking (CFP's) settles: Spearman rho between the
    Eq. 2 share accumulated over the rows up to step t and the share over all rows, at up to
    2 x points steps t (evenly and geometrically spaced, so the first steps are seen too).
    Returns {'steps': [P], 'rho': [P], 'settled': the first of those steps from which rho stays
    >= SETTLED_RHO, or None}, and with theory (the per-layer fan-in) 'rho_theory': [P], the
    accumulated share's rho with it."""
    cols = [i for i, n in enumerate(names) if n.startswith("layer.")]
    acc = np.cumsum(np.asarray(norms, dtype=np.float64)[:, cols], axis=0)
    T = len(acc)
    idx = np.unique(np.concatenate([np.linspace(0, T - 1, points), np.geomspace(1, T, points) - 1]).round().astype(int))
    rho = [spearman_rho(acc[i], acc[-1]) for i in idx]
    ok = np.nan_to_num(np.asarray(rho), nan=-1.0) >= SETTLED_RHO
    settled = next((int(np.asarray(steps)[idx[i]]) for i in range(len(idx)) if ok[i:].all()), None)
    out = {"steps": [int(np.asarray(steps)[i]) for i in idx], "rho": rho, "settled": settled}
    if theory is not None:
        out["rho_theory"] = [spearman_rho(acc[i], theory) for i in idx]
    return out


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for a single value), e.g. over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)


def permutation_test(a, b):
    """Two-sided exact permutation test of mean(a) - mean(b), for two configs' values over seeds (no
    scipy): over every split of the pooled values into groups of len(a) and len(b), the fraction whose
    |mean difference| is at least the observed one. (difference, p). With 3 and 3 seeds there are 20
    splits, so p >= 0.1: seeds can show a difference, or fail to, but not prove a small one."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 1 or len(b) < 1:
        raise ValueError("permutation_test needs at least one value in each group")
    pooled, n = np.concatenate([a, b]), len(a)
    diff = a.mean() - b.mean()
    tol = 1e-12 * max(1.0, np.abs(pooled).max())
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(idx)] = True
        hits += abs(pooled[mask].mean() - pooled[~mask].mean()) >= abs(diff) - tol
        total += 1
    return float(diff), hits / total


def _t_cdf(t, df, intervals=2000):
    """Student's t CDF at t >= 0: 1/2 plus the density's integral over [0, t] by Simpson's rule."""
    x = np.linspace(0.0, t, 2 * intervals + 1)
    f = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x * x / df) ** (-(df + 1) / 2)
    return 0.5 + (x[1] - x[0]) / 3 * (f[0] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum() + f[-1])


def t_quantile(q, df):
    """Student's t quantile for 0.5 < q < 1 and any real df > 0 (Welch's are fractional), by bisection on
    the CDF (no scipy)."""
    if not (0.5 < q < 1 and df > 0):
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df > 0, got q={q}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def welch_interval(a, b, level=0.95):
    """Welch's interval for mean(a) - mean(b) (unequal variances, Welch-Satterthwaite df): what a
    difference over few seeds can still be, where the permutation test's floor (p >= 0.1 at 3 + 3 seeds)
    cannot say. (difference, low, high, df)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("welch_interval needs at least two values in each group")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        raise ValueError("welch_interval: neither group varies, so the interval is undefined")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff, half = a.mean() - b.mean(), t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)
    return float(diff), float(diff - half), float(diff + half), float(df)


def seeds_for_power(sd, diff, alpha=0.05, power=0.8, max_n=10_000):
    """Seeds a side for a two-sided two-sample t-test at level alpha to detect a true difference `diff`
    between two configs whose seeds spread by `sd`, with the given power: the smallest n with
    (t_{1-alpha/2} + t_{power}) x sd x sqrt(2 / n) <= diff at df = 2n - 2 (the usual approximation to
    the noncentral t; it gives the textbook 17 / 26 / 64 a side at effect sizes 1 / 0.8 / 0.5)."""
    if sd <= 0 or diff <= 0:
        raise ValueError("seeds_for_power needs sd > 0 and diff > 0")
    z = t_quantile(1 - alpha / 2, 1e6) + t_quantile(power, 1e6)   # the normal approximation: a lower bound on n
    for n in range(max(2, int(2 * (z * sd / diff) ** 2)), max_n + 1):
        df = 2 * n - 2
        if (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * sd * math.sqrt(2 / n) <= diff:
            return n
    return None


def seed_difference(a, b, level=0.95):
    """mean(a) - mean(b) over seeds, as the study reports it: {diff, p (exact permutation), low, high, df
    (Welch's interval; None where neither group varies)}, or None below two seeds a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    diff, p = permutation_test(a, b)
    try:
        _, low, high, df = welch_interval(a, b, level)
    except ValueError:   # neither group varies: the interval is undefined, the permutation p is not
        low = high = df = None
    return {"diff": diff, "p": p, "low": low, "high": high, "df": df}
