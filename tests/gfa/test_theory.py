"""gfa/theory.py against the paper's numbers (Appendix B.1), hand-computed Spearman cases and a
brute-force second implementation, the decay fits, and Eq. 2's share by hand."""
import itertools
import math

import numpy as np
import pytest

from gfa import theory


# ---- theory -----------------------------------------------------------------------------------
def test_plain_fanin_paper():
    assert theory.fanin_plain(8) == [9, 8, 7, 6, 5, 4, 3, 2]
    assert theory.fanin_plain(16)[0] == 17 and theory.fanin_plain(16)[-1] == 2


def test_virtual_fanin_paper():
    assert theory.fanin_general([1, 1, 1, 1, 2, 3, 3, 5], False) == [18, 17, 16, 15, 27, 33, 24, 20]
    # by hand: N_virt = 7, positions 1 | 2 | 3,4 | 5,6,7 -> 8 | 7 | 6+5 | 4+3+2
    assert theory.fanin_general([1, 1, 2, 3], False) == [8, 7, 11, 9]


def test_deep_supervision_triangular():
    tri = lambda m: m * (m + 1) // 2
    ds = theory.fanin_deep_supervision(16)
    assert ds[0] == 153 and ds[-1] == 3
    assert ds == [tri(16 - l + 1) for l in range(16)]
    # Eq. 5: phi_l plus the auxiliary heads after blocks k = l..N-1, each adding (k - l) + 1
    for N in (1, 4, 8):
        assert theory.fanin_deep_supervision(N) == [(N - l + 1) + sum(k - l + 1 for k in range(l, N)) for l in range(N)]


def test_general_reduces_and_theory_for():
    assert theory.fanin_general([1] * 8, False) == theory.fanin_plain(8)
    assert theory.fanin_general([1] * 16, True) == theory.fanin_deep_supervision(16)
    assert theory.theory_for({"n_layer": 8, "repeats": [1, 1, 1, 1, 2, 3, 3, 5]})[0] == "virtual depth"
    assert theory.theory_for({"n_layer": 16, "deep_supervision": True})[1][0] == 153


# ---- Spearman ----------------------------------------------------------------------------------
def _brute(x, y):
    """Independent reference: Pearson of average ranks, exact p by itertools over all n!."""
    def ranks(a):
        return np.array([sum(b < v for b in a) + (sum(b == v for b in a) + 1) / 2 for v in a])
    rx, ry = ranks(x), ranks(y)
    r = lambda a, b: float(np.corrcoef(a, b)[0, 1])
    rho = r(rx, ry)
    perms = list(itertools.permutations(ry))
    return rho, sum(abs(r(rx, p)) >= abs(rho) - 1e-12 for p in perms) / len(perms)


def test_rankdata_ties():
    assert theory.rankdata([5, 6, 7, 8, 7]).tolist() == [1, 2, 3.5, 5, 3.5]
    assert theory.rankdata([2, 2, 2]).tolist() == [2, 2, 2]


def test_spearman_hand_cases():
    # scipy.stats.spearmanr([1,2,3,4,5], [5,6,7,8,7]) = 0.8207826816681233: the Pearson correlation
    # of average ranks, 8 / sqrt(10 * 9.5). (1 - 6 sum d^2 / (n(n^2-1)) = 0.825 ignores the tie.)
    rho, p = theory.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert rho == pytest.approx(8 / math.sqrt(95), abs=1e-12) == pytest.approx(0.8207826816681233)
    assert p == pytest.approx(_brute([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])[1])
    assert p == pytest.approx(16 / 120)   # 16 of the 120 rank orderings reach |rho| >= 0.8208
    rho, p = theory.spearman([1, 2, 3, 4], [10, 20, 30, 40])
    assert rho == 1.0 and p == pytest.approx(2 / 24)   # identity and reversal, two-sided
    rho, p = theory.spearman([1, 2, 3, 4], [4, 3, 2, 1])
    assert rho == -1.0 and p == pytest.approx(2 / 24)
    assert all(math.isnan(v) for v in theory.spearman([1, 2, 3], [7, 7, 7]))


def test_spearman_matches_bruteforce_with_ties():
    rng = np.random.default_rng(1)
    for n in (5, 6, 7):
        x, y = rng.integers(0, 4, n), rng.integers(0, 5, n)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert theory.spearman(x, y) == pytest.approx(_brute(x, y))


def test_spearman_monte_carlo_deterministic_and_close_to_exact():
    x = np.arange(10)
    y = np.array([1, 0, 3, 2, 6, 4, 5, 9, 7, 8]) * 1.0 + np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5])
    rho, p_exact = theory.spearman(x, y)                       # n = 10: all 10! permutations
    a = theory.spearman(x, y, exact_max_n=0, n_perm=100_000)   # forced Monte Carlo
    assert a == theory.spearman(x, y, exact_max_n=0, n_perm=100_000)   # fixed seed: deterministic
    assert a[0] == rho and abs(a[1] - p_exact) < 4 * math.sqrt(p_exact / 100_000) + 1e-5
    rho16, p16 = theory.spearman(np.arange(16), np.arange(16) ** 2)
    assert rho16 == 1.0 and p16 == pytest.approx(1 / 200_001)   # no random permutation reaches it


def test_fit_decay_verdict():
    assert theory.fit_decay(theory.fanin_plain(16), 16)["verdict"] == "linear"
    assert theory.fit_decay(theory.fanin_deep_supervision(16), 16)["verdict"] == "quadratic"
    assert theory.fit_decay(theory.fanin_plain(8)[::-1], 8)["verdict"].startswith("neither")




def test_accumulated_share_by_hand():
    names = ["embed", "layer.0", "layer.1", "head"]
    norms = [[9.0, 1.0, 3.0, 9.0], [9.0, 2.0, 2.0, 9.0]]   # layers sum to 3 and 5; embed/head not counted
    assert theory.accumulated_share(norms, names).tolist() == [3 / 8, 5 / 8]
    assert theory.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2))) and theory.mean_std([4.0]) == (4.0, 0.0)


def test_share_drift_finds_where_the_ranking_settles():
    """Planted: 10 steps with norms 4:3:2:1 over 4 layers, then 90 with 1:2:3:4. After j of the later
    steps the accumulated norms are (40 + j, 30 + 2j, 20 + 3j, 10 + 4j): the final (rising) order from
    j = 11 on (row 20), all equal at j = 10 (no ranking), the falling order before."""
    names = ["embed", "layer.0", "layer.1", "layer.2", "layer.3", "head"]
    rows = np.array([[1, 4, 3, 2, 1, 1]] * 10 + [[1, 1, 2, 3, 4, 1]] * 90, dtype=np.float64)
    steps = np.arange(100) + 500
    d = theory.share_drift(rows, names, steps, theory=[5, 4, 3, 2], points=100)
    assert d["steps"] == list(steps) and d["settled"] == 520
    rho, rho_t = np.array(d["rho"]), np.array(d["rho_theory"])
    assert (rho[:19] == -1).all() and np.isnan(rho[19]) and (rho[20:] == 1).all()
    assert (rho_t[:19] == 1).all() and (rho_t[20:] == -1).all()
    assert theory.spearman_rho([1, 2, 3], [3, 1, 2]) == pytest.approx(theory.spearman([1, 2, 3], [3, 1, 2])[0])


def test_permutation_test_by_hand():
    # a = [1, 2], b = [3, 4]: of the 6 splits only {1,2}|{3,4} and {3,4}|{1,2} reach |diff| 2 -> p = 2/6
    assert theory.permutation_test([1, 2], [3, 4]) == (-2.0, pytest.approx(2 / 6))
    d, p = theory.permutation_test([5.0, 5.1, 4.9], [5.0, 5.2, 4.8])   # no difference: every split counts
    assert d == pytest.approx(0.0) and p == 1.0
    assert theory.permutation_test([10, 11, 12], [1, 2, 3])[1] == pytest.approx(2 / 20)   # the 3+3 floor
    with pytest.raises(ValueError):
        theory.permutation_test([], [1.0])


@pytest.mark.parametrize("q, df, table", [(0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 4, 2.776445),
                                          (0.975, 10, 2.228139), (0.95, 30, 1.697261), (0.995, 5, 4.032143)])
def test_t_quantile_matches_the_printed_table(q, df, table):
    assert theory.t_quantile(q, df) == pytest.approx(table, abs=2e-6)


def test_t_quantile_between_integer_df_and_towards_the_normal():
    assert theory.t_quantile(0.975, 4) < theory.t_quantile(0.975, 3.6) < theory.t_quantile(0.975, 3)
    assert theory.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError):
        theory.t_quantile(0.3, 4)


def test_welch_interval_by_hand():
    # equal variances (1) and sizes (3): df = (2/3)^2 / (2 (1/3)^2 / 2) = 4, se = sqrt(2/3), t_.975,4 = 2.776445
    diff, low, high, df = theory.welch_interval([1, 2, 3], [4, 5, 6])
    half = 2.776445 * math.sqrt(2 / 3)
    assert (diff, df) == (-3.0, pytest.approx(4.0)) and (low, high) == (pytest.approx(-3 - half, abs=1e-5),
                                                                      pytest.approx(-3 + half, abs=1e-5))
    # one group without spread: the other's alone, df = n - 1 = 2, se = 1 / sqrt(3) (t_.975,2 = 4.302653)
    _, low, high, df = theory.welch_interval([1, 2, 3], [0, 0, 0])
    assert df == pytest.approx(2.0) and high - 2 == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    for a, b in (([1.0], [1.0, 2.0]), ([1.0, 1.0], [2.0, 2.0])):
        with pytest.raises(ValueError):
            theory.welch_interval(a, b)


def test_seed_difference_joins_the_two_tests():
    d = theory.seed_difference([1, 2, 3], [4, 5, 6])
    _, low, high, df = theory.welch_interval([1, 2, 3], [4, 5, 6])
    assert (d["diff"], d["low"], d["high"], d["df"]) == (-3.0, low, high, df)
    assert d["p"] == pytest.approx(2 / 20)   # the 3 + 3 floor: only the two extreme splits are as far apart
    flat = theory.seed_difference([2, 2], [1, 1])   # neither varies: a p, no interval
    assert flat["diff"] == 1.0 and flat["p"] == pytest.approx(2 / 6) and flat["low"] is None
    assert theory.seed_difference([1.0], [2.0, 3.0]) is None


def test_seeds_for_power_gives_the_textbook_sample_sizes():
    # two-sided 5 %, 80 % power: Cohen's table (and the noncentral t) give 17, 26 and 64 a side at d = 1, 0.8, 0.5
    assert [theory.seeds_for_power(1.0, d) for d in (1.0, 0.8, 0.5)] == [17, 26, 64]
    assert theory.seeds_for_power(2.0, 1.0) == theory.seeds_for_power(1.0, 0.5)   # only the ratio matters
    with pytest.raises(ValueError):
        theory.seeds_for_power(0.0, 1.0)


def test_p_text_reports_the_monte_carlo_floor_as_a_bound():
    floor = 1 / (200_000 + 1)   # spearman's p with no permutation as extreme: a bound, not a value
    assert theory.p_text(floor) == "p < 1e-5"
    assert theory.p_text(2 / math.factorial(8)) == "p = 5.0e-05"   # an exact p (8 layers) is printed as it is
    assert theory.p_text(0.0139) == "p = 0.014" and theory.p_text(float("nan")) == "p = nan"
