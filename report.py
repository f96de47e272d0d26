"""
report.py: the table of every run in an --out folder, printed, and one self-contained HTML page (inline SVG, nothing
fetched) with the same numbers as JSON; from one folder, or from several: the same pipeline run with other seeds.

    python report.py out                       # the table; out/report.html and out/report.json
    python report.py out out-seed1 out-seed2   # over seeds: written into the first folder

Every run is compared with CLM of the same seed (the same base model, the same batches). The unit of replication is
the training run: over seeds, every p-value and interval, for the target loss and the accuracy alike, comes from the
per-seed paired differences (Student's paired t, the exact sign test beside it), Holm-corrected over the table, and a
difference is called one only where the corrected t test rejects. Problem-level tests (McNemar's, on one seed's two
runs) describe that pair of runs, never the method. The curves are the means over the seeds; the token-level
sections read the first folder.
"""
import argparse
import glob
import json
import math
import os
import re
import tempfile
import textwrap

import numpy as np

import rho

# -----------------------------------------------------------------------------
# runs: the metrics.json of every finished run in a folder

RUN_KEYS = ("run", "mode", "k", "select", "scope", "config", "final", "history", "tokens_seen", "tokens_trained",
            "wall_s", "eval_problems", "n_params")  # what the report reads of every run
ORDER = ("base", "ref", "clm", "slm")  # the pipeline's

def read_metrics(path, out):
    """A run's metrics.json, or one line naming it: cut short (a copy or a full disk) or written by another rho."""
    why = (f"the run may be unfinished or written by another rho version: re-run it with --resume, or move "
           f"{os.path.dirname(path)} out of {out}")
    try:
        r = rho.read_json(path)
    except ValueError as e:  # UnicodeDecodeError is one too
        rho.die(f"{path}: not valid JSON ({e}): {why}")
    missing = [k for k in RUN_KEYS if k not in r] if isinstance(r, dict) else [RUN_KEYS[0]]
    if missing:
        rho.die(f"{path}: no key {missing[0]!r}: {why}")
    if r["mode"] not in ORDER:
        rho.die(f"{path}: mode {r['mode']!r} unknown: {why}")
    return r

def load_runs(out):
    """metrics.json of every finished run in the folder out, in pipeline order; runs with a checkpoint but no
    metrics.json are named, one line each."""
    if not os.path.isdir(out):
        rho.die(f"{out}: {'a file, not a folder' if os.path.exists(out) else 'no such folder'}: give rho.py's --out "
                "folder (default out), or one such folder a seed")
    runs = []
    for name in sorted(os.listdir(out)):
        if os.path.isfile(os.path.join(out, name, "metrics.json")):
            runs.append({**read_metrics(os.path.join(out, name, "metrics.json"), out),
                         "lm_eval": read_lm_eval(os.path.join(out, name))})
        elif os.path.isfile(os.path.join(out, name, "ckpt.pt")):
            print(f"{name}: unfinished (no metrics.json; `--resume` continues it)")
    if not runs:
        rho.die(f"{out}: no runs with metrics.json: run `python rho.py --base`, `--ref`, `--clm`, `--slm --k 0.6` "
                "first")
    datas = differ(runs, lambda r: (data_sha(r) or "?")[:12])
    if datas:
        rho.die(f"{out}: its runs were trained on different data ({datas}): only runs of one data can be paired; "
                "give each data's runs their own --out")
    return sorted(runs, key=lambda r: (ORDER.index(r["mode"]), r["run"]))

def data_sha(run):
    return run.get("data", {}).get("sha256")  # one data (the same eval.json): the same problems

# the flags a seed's folder may set on its own: the seed and its data, and those that do not change what is trained
PER_SEED = ("seed", "data", "out", "name", "resume", "overwrite", "device", "compile", "act_ckpt", "micro_batch",
            "score_batch", "preset")

def check_seeds(outs, groups):
    """Refuses folders that are not seeds of one configuration: a folder given twice, two folders of one --seed, or a
    run whose defining flags differ between folders."""
    if len({os.path.realpath(o) for o in outs}) < len(outs):
        rho.die(f"{' '.join(outs)}: a folder given twice: each folder is one seed; give each once")
    seen, first_of = {}, {}
    for o, runs in zip(outs, groups):
        for s in sorted({r["config"]["seed"] for r in runs}):
            if s in seen:
                rho.die(f"{seen[s]} and {o}: both ran --seed {s}: one seed, not two; give one of them")
            seen[s] = o
        for r in runs:
            o0, r0 = first_of.setdefault(r["run"], (o, r))
            flag = next((k for k in sorted(set(r["config"]) | set(r0["config"]))
                         if k not in PER_SEED and r["config"].get(k) != r0["config"].get(k)), None)
            if flag:
                rho.die(f"{o}/{r['run']}: --{flag} {r['config'].get(flag)}, where {o0}/{r['run']} has "
                        f"{r0['config'].get(flag)}: not seeds of one configuration; report them separately")

def by_name(groups):
    """{run name: [its metrics in each folder, None where missing]}, in pipeline order."""
    names = []
    for runs in groups:
        names += [r["run"] for r in runs if r["run"] not in names]
    found = {n: [next((r for r in runs if r["run"] == n), None) for runs in groups] for n in names}
    order = lambda kv: next((ORDER.index(r["mode"]), kv[0]) for r in kv[1] if r)
    return dict(sorted(found.items(), key=order))

def first(rs):
    return next(r for r in rs if r)

# -----------------------------------------------------------------------------
# statistics: pure functions of numbers (numpy and the standard library; checked against tables in test_rho.py)

ALPHA = 0.05  # every table's family-wise error rate

def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's method, as in
    Numerical Recipes' betacf); for x past the mean, 1 - I_(1-x)(b, a), where the fraction converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(300):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 / (1 + num * d or 1e-300)  # Lentz: a zero denominator becomes a tiny one
        c = 1 + num / c or 1e-300
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)

def beta_ppf(q, a, b):
    """The x with I_x(a, b) = q, by bisection (I is increasing in x): 100 halvings reach the float's precision."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if betainc(a, b, mid) < q else (lo, mid)
    return (lo + hi) / 2

def t_sf2(t, df):
    """Two-sided p-value of Student's t: P(|T| >= |t|) = I_(df / (df + t^2))(df / 2, 1 / 2)."""
    return betainc(df / 2, 0.5, df / (df + t * t))

def t_ppf(p, df):
    """Student's t quantile for p > 0.5: the t whose two-sided p-value is 2 (1 - p)."""
    x = beta_ppf(2 * (1 - p), df / 2, 0.5)
    return math.sqrt(df * (1 - x) / x)

def paired_t(d):
    """Paired differences over seeds: their mean, the two-sided p-value of mean = 0 (Student's t, n - 1 degrees of
    freedom) and the interval at any level: {"diff", "p", "ci": level -> (lo, hi)}; None under two seeds."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return None
    mean, se, df = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d)), len(d) - 1
    if se == 0:  # every seed the same difference: no spread to scale it by
        return {"diff": mean, "p": float(mean == 0), "ci": lambda level: (mean, mean)}
    return {"diff": mean, "p": t_sf2(mean / se, df),
            "ci": lambda level: (mean - t_ppf(1 - level / 2, df) * se, mean + t_ppf(1 - level / 2, df) * se)}

def mcnemar(b, c):
    """McNemar's exact test: b pairs only the run got right, c only the base: under no difference each discordant
    pair goes either way with probability 1/2, so p = 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), at most 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)  # exact integers, one division

def sign_test(d):
    """The exact sign test of paired differences over seeds: under no difference each seed's difference is positive
    or negative with probability 1/2 (ties dropped), McNemar's binomial: (positives, negatives, two-sided p)."""
    d = np.asarray(d)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    return pos, neg, mcnemar(pos, neg)

def seeds_for_sign(m, alpha=ALPHA):
    """The fewest seeds whose sign test, all of one sign, can reject under Holm over m tests: 2 / 2^n <= alpha / m."""
    return next(n for n in range(1, 64) if 2 / 2 ** n <= alpha / m)

def paired_diff_interval(d, z=1.96):
    """One pair of runs on the same problems (d: -1, 0, 1 a problem): the mean difference and its 95% interval over
    the problems, mean +- z sd / sqrt(N). It describes these two runs, not the method that trained them."""
    d = np.asarray(d, dtype=np.float64)
    half = z * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return float(d.mean()) - half, float(d.mean()) + half

def holm(ps, alpha=ALPHA):
    """Holm's step-down correction of a family of p-values, in their order: (adjusted p, rejected, level of the
    interval) each. Sorted, the i-th smallest (from 0) is rejected while every one before it was and p <= alpha / (m
    - i); the level is that of its step, and for those not rejected, the level of the step where Holm stopped, so an
    interval excludes 0 exactly when its test is rejected."""
    m, order = len(ps), sorted(range(len(ps)), key=lambda i: ps[i])
    out, adj, stop = [None] * m, 0.0, None
    for step, i in enumerate(order):
        adj = max(adj, min(1.0, (m - step) * ps[i]))  # adjusted p-values never decrease along the steps
        if stop is None and ps[i] > alpha / (m - step):
            stop = step
        out[i] = (adj, stop is None, alpha / (m - (step if stop is None else stop)))
    return out

def smooth(xs, ys, width=5):
    """A curve with its evaluation noise smoothed: at each evaluation, the least-squares line through the `width`
    evaluations nearest it (the window centred, shifted inside at the ends), read at that evaluation. In the middle
    of evenly spaced evaluations this is the centred moving average; at the ends the line removes the average's lag,
    so the last value is not pulled towards earlier ones."""
    xs, ys, n = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), len(ys)
    w = min(width, n)
    out = []
    for i in range(n):
        lo = min(max(0, i - w // 2), n - w)
        x, y = xs[lo:lo + w], ys[lo:lo + w]
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum() if w > 1 else 0.0
        out.append(float(y.mean() + slope * (xs[i] - x.mean())))
    return out

def crossing(history, target, measure, key="tokens_seen"):
    """key (tokens seen, or wall time) where a run's smoothed curve of a measure first reaches target (a loss at or
    below it, accuracy at or above it), linearly interpolated between evaluations; None if it never does."""
    xs = [h["tokens_seen"] for h in history]
    v, at = smooth(xs, [h[measure] for h in history]), [h[key] for h in history]
    reached = (lambda y: y <= target) if measure.startswith("val_loss") else (lambda y: y >= target)
    for i, y in enumerate(v):
        if reached(y):
            if i == 0 or v[i - 1] == y:
                return at[i]
            return at[i - 1] + (v[i - 1] - target) / (v[i - 1] - y) * (at[i] - at[i - 1])
    return None

def clm_target(clm, measure):
    """CLM's final value of a measure, on its smoothed curve."""
    return smooth([h["tokens_seen"] for h in clm["history"]], [h[measure] for h in clm["history"]])[-1]

def wilson(p, n, z=1.96):
    """The 95% (Wilson) interval of a share p of n trials: one run's accuracy over n distinct problems."""
    if not n:
        return 0.0, 1.0
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))

# -----------------------------------------------------------------------------
# over seeds: statistics, paired comparisons with a base run, corrected per table

def stat(xs):
    xs = [x for x in xs if x is not None]
    return {"mean": float(np.mean(xs)), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None

def fmt(s, pct=False):
    """'mean [min, max]' of a stat, or the value of one seed."""
    if s is None:
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
    return f(s["mean"]) if s["n"] == 1 else f"{f(s['mean'])} [{f(s['min'])}, {f(s['max'])}]"

def final(key):
    return lambda r: r["final"][key]

def measured(run, measure):
    return all(h[measure] is not None for h in run["history"])  # accuracy: None without problems

def speedup(run, clm, measure):
    """The paper's 'N x sooner': CLM's tokens for its whole run over the tokens the run needs to first reach CLM's
    final value of a measure (on smoothed curves, interpolated); None if it never does. A run already past it at
    its first evaluation gives only a lower bound (at_first)."""
    t = crossing(run["history"], clm_target(clm, measure), measure)
    if t is None:
        return None
    return {"tokens": t, "x": clm["history"][-1]["tokens_seen"] / t, "at_first": t <= run["history"][0]["tokens_seen"]}

def speedups(runs, clm, measure):
    """Each seed's speedup, None where the run never reaches CLM's final value, over the seeds with both runs."""
    return [speedup(r, c, measure) for r, c in zip(runs, clm)
            if r and c and measured(r, measure) and measured(c, measure)]

def median_interval(xs):
    """The median of the seeds' speedups (the lower middle one of an even count) and its distribution-free interval:
    the order statistics j and n + 1 - j, with the largest j whose coverage 1 - 2 P(Bin(n, 1/2) < j) is at least 95%
    (j = 1, the range, under 6 seeds, at its own coverage). A seed that never reaches the target counts below every
    seed that does: it is in the estimate, not dropped."""
    xs, n = sorted(xs, key=lambda s: -1.0 if s is None else s["x"]), len(xs)
    cover = lambda j: 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n
    j = max([j for j in range(1, n // 2 + 1) if cover(j) >= 1 - ALPHA] or [1])
    return {"median": xs[(n - 1) // 2], "lo": xs[j - 1], "hi": xs[n - j], "coverage": cover(j), "seeds": n,
            "never": sum(s is None for s in xs)}

def fmt_speed(s):
    """A speedup: '5.5x'; '>=7.0x' past the target at the first evaluation; '<1x' never reached (the run is as long
    as CLM's, so reaching it later than CLM's end is below 1x)."""
    return "<1x" if s is None else f"{'>=' if s['at_first'] else ''}{s['x']:.1f}x"

def fmt_speeds(xs):
    """One seed: tokens to CLM's final value and the speedup; over seeds: the median [its interval]."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return "never" if xs[0] is None else f"{xs[0]['tokens'] / 1e6:.2f}M {fmt_speed(xs[0])}"
    m = median_interval(xs)
    return f"{fmt_speed(m['median'])} [{fmt_speed(m['lo'])}, {fmt_speed(m['hi'])}]"

def per_seed(runs, base, key):
    """This run's final value of key minus base's, for each seed that has both runs and both values."""
    return [r["final"][key] - b["final"][key] for r, b in zip(runs, base)
            if r and b and r["final"][key] is not None and b["final"][key] is not None]

def seed_test(d):
    """The test of a method over seeds. The unit of replication is the training run, so the p-value and the interval
    come from the per-seed paired differences d alone: Student's paired t and its interval, with the exact sign test
    beside it. One seed tests nothing about the method."""
    if not d:
        return None
    out = {"diff": float(np.mean(d)), "per_seed": [float(x) for x in d], "seeds": len(d)}
    if len(d) == 1:
        return {**out, "why": "one seed"}
    pos, neg, p_sign = sign_test(d)
    return {**out, **paired_t(d), "sign": [pos, neg], "p_sign": p_sign, "method": "paired t over seeds"}

def this_pair(run, base):
    """One seed's two runs' answers (0/1) to the same problems: McNemar's exact test on the discordant answers and
    the difference's interval over the problems. It describes these two runs, never the method: the runs' own
    training noise is not in it."""
    d = np.asarray(run) - np.asarray(base)
    right, wrong = int((d == 1).sum()), int((d == -1).sum())
    return {"diff": float(d.mean()), "discordant": [right, wrong], "p": mcnemar(right, wrong),
            "ci95": paired_diff_interval(d), "problems": len(d)}

def with_each_seed(t, pairs):
    """A test over seeds with each seed's pair of runs described problem by problem (this_pair) beside it, where
    both runs of every seed kept their answers (0/1) to the same problems; pairs: (run's answers, base's) a seed."""
    if t and all(x is not None and y is not None and len(x) == len(y) for x, y in pairs):
        t["each_seed"] = [this_pair(x, y) for x, y in pairs]
    return t

def acc_test(runs, base):
    """The accuracy over seeds, as seed_test, each seed's pair of runs beside it (final.correct)."""
    pairs = [(r["final"].get("correct") or None, b["final"].get("correct") or None) for r, b in zip(runs, base)
             if r and b and r["final"]["accuracy"] is not None and b["final"]["accuracy"] is not None]
    return with_each_seed(seed_test(per_seed(runs, base, "accuracy")), pairs)

def lm_eval_test(runs, base, task):
    """An lm-eval task's accuracy (read_lm_eval, where the user ran it) paired as rho's own: the t test over seeds,
    each seed's pair of runs beside it."""
    pairs = [(r["lm_eval"][task], b["lm_eval"][task]) for r, b in zip(runs, base)
             if r and b and task in r.get("lm_eval", {}) and task in b.get("lm_eval", {})]
    return with_each_seed(seed_test([float(x.mean() - y.mean()) for x, y in pairs]), pairs)

def against(groups, base):
    """Each group of runs (name: [a run per seed]) paired with base's runs of the same seed, on the final target loss
    and accuracy, each by the paired t over seeds; Holm over every test of the table, the sign tests corrected the
    same way; each interval at 95% and at its Holm level. A difference is called one where Holm rejects its t test
    (then its corrected interval excludes 0)."""
    tasks = sorted({task for rs in groups.values() for r in rs if r for task in r.get("lm_eval", {})})
    tests = {n: {"val_loss_hq": seed_test(per_seed(rs, groups[base], "val_loss_hq")),
                 "accuracy": acc_test(rs, groups[base]),
                 **{f"lm-eval {task}": lm_eval_test(rs, groups[base], task) for task in tasks}}
             for n, rs in groups.items() if n != base}
    family = [t for ts in tests.values() for t in ts.values() if t and "p" in t]
    signs = holm([t["p_sign"] for t in family])
    for t, (adj, rejected, level), sign in zip(family, holm([t["p"] for t in family]), signs):
        ci = t.pop("ci")
        lo, hi = ci(level)
        t.update(p_holm=adj, p_sign_holm=sign[0], level=level, lo=lo, hi=hi, ci95=ci(ALPHA), family=len(family),
                 called=rejected and (lo > 0 or hi < 0))
    return tests

def fmt_test(t, pct=False):
    """'diff [lo, hi] *' (* where the corrected test rejects); one seed: the difference, and for the accuracy the
    interval over the problems of these two runs."""
    if t is None:
        return "-"
    f = (lambda v: f"{100 * v + 0.0:+.1f}") if pct else (lambda v: f"{v + 0.0:+.4f}")  # + 0.0: no "-0.0"
    if "p" in t:
        return f"{f(t['diff'])} [{f(t['lo'])}, {f(t['hi'])}]{' *' if t['called'] else ''}"
    if t.get("each_seed"):
        lo, hi = t["each_seed"][0]["ci95"]
        return f"{f(t['diff'])} [{f(lo)}, {f(hi)}]"
    return f(t["diff"])

def fmt_p(t):
    """The Holm-adjusted p of the test over seeds; one seed: McNemar's p on these two runs' problems; else '-'."""
    p = None
    if t:
        p = t.get("p_holm") if "p" in t else t["each_seed"][0]["p"] if t.get("each_seed") else None
    if p is None:
        return "-"
    return "<1e-300" if p < 1e-300 else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"  # <1e-300: below a float64

def fmt_sign(t):
    """The sign test over seeds: 'positives+negatives- p (Holm)', or '-'."""
    if not t or "p_sign_holm" not in t:
        return "-"
    return f"{t['sign'][0]}+{t['sign'][1]}- {t['p_sign_holm']:.2g}"

def mean_curve(runs, key):
    """(tokens seen, mean of key over the seeds at each evaluation, (min, max) over them) of the runs whose
    evaluations line up."""
    runs = [r for r in runs if r]
    n = min(len(r["history"]) for r in runs)
    ys = [[r["history"][i][key] for r in runs] for i in range(n)]
    return [runs[0]["history"][i]["tokens_seen"] for i in range(n)], [float(np.mean(y)) for y in ys], \
        [(min(y), max(y)) for y in ys]

# -----------------------------------------------------------------------------
# plots and tables: hand-written SVG and HTML, no plotting library

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

def nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]

def fmt_num(v):
    return f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e4 else f"{v:g}"

def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")

def svg_lines(series, title="", xlabel="", ylabel="", w=560, h=300, hline=None, mark=None):
    """A line plot as inline SVG. series: dicts with name, xs, ys and optionally dashed, color (an index), err (a
    (lo, hi) per point, drawn as a bar) and band (a (lo, hi) per point, drawn as a shaded band); hline: a y drawn as
    a grey rule; mark: (x, y, label) circled."""
    pts = [(x, y) for s in series for x, y in zip(s["xs"], s["ys"]) if y is not None]
    ys = [y for _, y in pts] + [v for s in series for e in (s.get("err") or []) + (s.get("band") or []) if e for v in e]
    ys += [hline] if hline is not None else []
    xs = [x for x, _ in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = min(xt[0], min(xs)), max(xt[-1], max(xs)), min(yt[0], min(ys)), max(yt[-1], max(ys))
    L, R, T, B = 58, 185, 24, 40  # margins; the legend sits on the right
    px = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (w - L - R)
    py = lambda y: h - B - (y - y0) / ((y1 - y0) or 1) * (h - T - B)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
         f'<text x="{L}" y="14" font-weight="bold" font-size="12">{esc(title)}</text>']
    for x in xt:
        o.append(f'<line x1="{px(x):.1f}" y1="{T}" x2="{px(x):.1f}" y2="{h - B}" stroke="#eee"/>'
                 f'<text x="{px(x):.1f}" y="{h - B + 14}" text-anchor="middle">{fmt_num(x)}</text>')
    for y in yt:
        o.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{w - R}" y2="{py(y):.1f}" stroke="#eee"/>'
                 f'<text x="{L - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{fmt_num(round(y, 6))}</text>')
    o.append(f'<rect x="{L}" y="{T}" width="{w - L - R}" height="{h - T - B}" fill="none" stroke="#999"/>')
    o.append(f'<text x="{(L + w - R) / 2}" y="{h - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    o.append(f'<text transform="translate(12,{(T + h - B) / 2}) rotate(-90)" text-anchor="middle">{esc(ylabel)}</text>')
    if hline is not None:
        o.append(f'<line x1="{L}" y1="{py(hline):.1f}" x2="{w - R}" y2="{py(hline):.1f}" stroke="#888" '
                 f'stroke-dasharray="2,3"/>')
    for i, s in enumerate(series):
        c, dash = COLORS[s.get("color", i) % len(COLORS)], ' stroke-dasharray="6,4"' if s.get("dashed") else ""
        if s.get("band"):  # up along the highs, back along the lows
            edge = [(x, b[1]) for x, b in zip(s["xs"], s["band"])] + [(x, b[0]) for x, b in zip(s["xs"][::-1],
                                                                                            s["band"][::-1])]
            o.append(f'<polygon points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in edge)}" fill="{c}" '
                     'fill-opacity="0.15" stroke="none"/>')
        xy = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s["xs"], s["ys"]) if y is not None)
        o.append(f'<polyline points="{xy}" fill="none" stroke="{c}" stroke-width="1.8"{dash}/>')
        o += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{c}"/>'
              for x, y in zip(s["xs"], s["ys"]) if y is not None]
        o += [f'<line x1="{px(x):.1f}" y1="{py(e[0]):.1f}" x2="{px(x):.1f}" y2="{py(e[1]):.1f}" stroke="{c}" '
              f'stroke-width="1" opacity="0.6"/>' for x, e in zip(s["xs"], s.get("err", [])) if e]
        ly = T + 8 + 15 * i
        o.append(f'<line x1="{w - R + 8}" y1="{ly}" x2="{w - R + 26}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>'
                 f'<text x="{w - R + 30}" y="{ly + 4}">{esc(s["name"])}</text>')
    if mark:
        o.append(f'<circle cx="{px(mark[0]):.1f}" cy="{py(mark[1]):.1f}" r="7" fill="none" stroke="black" '
                 f'stroke-width="1.5"/><text x="{px(mark[0]):.1f}" y="{py(mark[1]) - 10:.1f}" '
                 f'text-anchor="middle">{esc(mark[2])}</text>')
    return "\n".join(o + ["</svg>"])

def html_table(head, rows):
    """A table; a cell that ends in ' *' (a difference called one) in bold."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else
                                                              f"<b>{esc(v)}</b>" if str(v).endswith(" *") else esc(v))
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")

# -----------------------------------------------------------------------------
# the sections: each returns (html, the same numbers as a dict)

def curves(runs, shown, key, band_of_one=None):
    """The mean curves of the runs shown over the seeds, banded by their range over the seeds; one seed: by
    band_of_one(run, its values), or none."""
    out = []
    for i, n in enumerate(shown):
        xs, ys, band = mean_curve(runs[n], key)
        seeds = [r for r in runs[n] if r]
        if len(seeds) == 1:
            band = band_of_one(seeds[0], ys) if band_of_one else None
        out.append({"name": n, "xs": xs, "ys": ys, "color": i, "band": band})
    return out

def efficiency(runs, tests):
    """1. Data efficiency: target loss and answer accuracy against tokens seen; tokens until CLM's final values; the
    final measures paired with CLM's, corrected together."""
    web = {n: rs for n, rs in runs.items() if first(rs)["mode"] in ("clm", "slm")}
    clm = runs.get("clm")
    if not web:
        return "<p>No continual-pretraining runs (--clm, --slm) in these folders.</p>", {}
    shown = [n for n in web if n in ("clm", "slm-k0.6", "slm-k0.6-random")] or list(web)
    seeds = len(next(iter(web.values())))
    over = f", mean of {seeds} seeds, band: their range (min to max)" if seeds > 1 else ", one seed"
    html = svg_lines(curves(web, shown, "val_loss_hq"), "target val loss (hq) vs tokens seen" + over, "tokens seen",
                     "val loss hq (nats/token)",
                     hline=stat([final("val_loss_hq")(r) for r in clm if r])["mean"] if clm else None)
    wilson_band = lambda r, ys: [wilson(p, r["eval_problems"]) for p in ys]  # one run, distinct problems
    with_acc = [n for n in shown if all(measured(r, "accuracy") for r in web[n] if r)]  # --eval_problems 0: none
    if with_acc:
        html += svg_lines(curves(web, with_acc, "accuracy", wilson_band), "answer accuracy vs tokens seen" + over
                          + (" (band: 95% Wilson interval)" if seeds == 1 else ""), "tokens seen", "accuracy")
    data, rows = {}, []
    for n, rs in web.items():
        d = {"seeds": sum(r is not None for r in rs), "val_loss_hq": stat([final("val_loss_hq")(r) for r in rs if r]),
             "accuracy": stat([final("accuracy")(r) for r in rs if r])}
        for m in ("val_loss_hq", "accuracy") if clm else ():
            xs = speedups(rs, clm, m)
            d[f"speedup_{m}"] = {"per_seed": xs, **(median_interval(xs) if xs else {})}
        t = tests.get(n, {})
        data[n] = {**d, "vs_clm": t}
        rows.append([n, d["seeds"], fmt(d["val_loss_hq"]), fmt(d["accuracy"], True),
                     fmt_speeds(d.get("speedup_val_loss_hq", {}).get("per_seed")),
                     fmt_speeds(d.get("speedup_accuracy", {}).get("per_seed")),
                     fmt_test(t.get("val_loss_hq")), fmt_p(t.get("val_loss_hq")), fmt_sign(t.get("val_loss_hq")),
                     fmt_test(t.get("accuracy"), True), fmt_p(t.get("accuracy")), fmt_sign(t.get("accuracy"))])
    html += html_table(["run", "seeds", "final val hq", "accuracy", "x sooner to CLM's val hq",
                        "x sooner to CLM's accuracy", "val hq - CLM's", "p", "sign", "accuracy - CLM's (points)", "p",
                        "sign"], rows)
    html += f"<p>{esc(explain(tests))} {esc(noise(tests))}</p><p>{esc(SOONER)}</p>"
    html += per_seed_section(tests, "clm")
    return html, data

def explain(tests, base="clm"):
    """What the paired columns are: the unit of replication, the tests, the family Holm corrects, the intervals."""
    ts = [t for ts in tests.values() for t in ts.values() if t and "p" in t]
    if not ts:
        m = sum(t is not None for ts in tests.values() for t in ts.values())
        return (f"One seed: these differences describe this pair of runs, not the method. acc: McNemar's exact test "
                f"on the answers the two runs disagree on, and a 95% interval over the problems, say whether these two "
                f"runs answer differently; another seed's training noise is not in them. val hq: no test. A claim "
                f"about the method needs seeds, the training run being the unit of replication: 2 at least for a t "
                f"interval, and {seeds_for_sign(max(m, 1))} for the sign test to reject under Holm over this table's "
                f"{m} tests (5 of 5 seeds give p 0.0625 alone).")
    m, levels = len(ts), sorted({1 - t["level"] for t in ts})
    lv = f"{100 * levels[0]:.2f}%" + (f" to {100 * levels[-1]:.2f}%" if len(levels) > 1 else "")
    return (f"Paired with {base} of the same seed (the same base model, the same batches). The unit of replication is "
            f"the training run: every p and interval comes from the per-seed differences alone, for val hq and acc "
            f"(points) alike: Student's paired t and its interval (n - 1 degrees of freedom); sign: the seeds above "
            f"and below 0 and the exact sign test's p. Holm over the {m} t tests of this table (the sign tests "
            f"likewise): with p sorted, the i-th (from 1) is rejected while every one before it was and p <= "
            f"{ALPHA:g} / ({m} + 1 - i); each interval is at the level of its own step, and for a test not rejected "
            f"at that of the step where Holm stopped (here {lv}). * (bold on the page): a difference: Holm rejects "
            f"its t test. p: Holm-adjusted. Each seed's McNemar test (on the page) describes that seed's pair of "
            f"runs, not the method.")

def noise(tests):
    """The accuracy's noise in points: over seeds, the spread of the per-seed differences against the problems'
    sampling error within a pair of runs; one seed, a single accuracy's 95% half-width at its number of problems."""
    ts = [t["accuracy"] for t in tests.values() if t.get("accuracy") and t["accuracy"].get("each_seed")]
    if not ts:
        return ""
    n = min(e["problems"] for t in ts for e in t["each_seed"])
    one = (f"acc: {n} problems a seed: one run's accuracy is known to +-{98 / math.sqrt(n):.1f} points at 95% (at most:"
           f" 1.96 sqrt(1/4 / {n})).")
    spread = [float(np.std(t["per_seed"], ddof=1)) for t in ts if t["seeds"] > 1]
    if not spread:
        return one
    within = max((e["ci95"][1] - e["ci95"][0]) / 2 / 1.96 for t in ts for e in t["each_seed"])
    return (f"{one} The per-seed differences spread by up to {100 * max(spread):.1f} points (sd over seeds) against "
            f"{100 * within:.1f} points of sampling error over the problems within one pair of runs: the seeds, not "
            "the problems, set the intervals.")

SOONER = ("x sooner (the paper's 'N x sooner'): CLM's tokens for its whole run over the tokens this run needs to first "
          "reach CLM's final value, on curves smoothed over 5 evaluations (a local line), interpolated; >=: past it at "
          "its first evaluation (a lower bound); <1x: never reached in a run as long as CLM's. CLM's own row: where "
          "CLM first reaches its own final value (1.0x while its curve still falls at the end, more where it is "
          "flat). Over seeds: the median [an interval from the order statistics, distribution-free, at least 95% from "
          "6 seeds on, the range below], the seeds that never reach it counted. The paper's 5-10x is an accuracy "
          "speedup: compare it with the accuracy column only.")

def svg_strip(rows, title, xlabel, w=660):
    """A dot plot of paired differences, a row per comparison: each seed a dot, the mean a tick, its 95% interval a
    thick bar and its Holm-level interval (wider) a thin one, 0 a grey rule. rows: (name, points, test)."""
    vals = [v for _, pts, t in rows for v in pts + ([t["lo"], t["hi"], *t["ci95"]] if "lo" in t else [])]
    xt = nice_ticks(min(vals + [0.0]), max(vals + [0.0]))
    x0, x1, L, R, h = xt[0], xt[-1], 150, 20, 48 + 26 * len(rows)
    px = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (w - L - R)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
         f'<text x="4" y="14" font-weight="bold" font-size="12">{esc(title)}</text>']
    for x in xt:
        o.append(f'<text x="{px(x):.1f}" y="{h - 6}" text-anchor="middle">{fmt_num(round(x, 6))}</text>')
    o.append(f'<line x1="{px(0):.1f}" y1="22" x2="{px(0):.1f}" y2="{h - 18}" stroke="#888" stroke-dasharray="2,3"/>'
             f'<text x="4" y="{h - 6}">{esc(xlabel)}</text>')
    for i, (name, pts, t) in enumerate(rows):
        y, c = 36 + 26 * i, COLORS[i % len(COLORS)]
        o.append(f'<text x="4" y="{y + 4}">{esc(name)}</text>')
        if "lo" in t:
            o.append(f'<line x1="{px(t["lo"]):.1f}" y1="{y}" x2="{px(t["hi"]):.1f}" y2="{y}" stroke="{c}"/>'
                     f'<line x1="{px(t["ci95"][0]):.1f}" y1="{y}" x2="{px(t["ci95"][1]):.1f}" y2="{y}" stroke="{c}" '
                     f'stroke-width="5" opacity="0.4"/>')
        o.append(f'<line x1="{px(t["diff"]):.1f}" y1="{y - 8}" x2="{px(t["diff"]):.1f}" y2="{y + 8}" stroke="{c}" '
                 'stroke-width="2"/>')
        o += [f'<circle cx="{px(v):.1f}" cy="{y}" r="3.5" fill="{c}" fill-opacity="0.6"/>' for v in pts]
    return "\n".join(o + ["</svg>"])

def per_seed_section(tests, base):
    """The per-seed differences the tests use, as dots (the spread a reader should see), and each seed's pair of
    runs described problem by problem (McNemar)."""
    html = ""
    tasks = sorted({k for ts in tests.values() for k in ts if k.startswith("lm-eval ")})
    for key, label, scale in (("val_loss_hq", "val hq", 1), ("accuracy", "accuracy (points)", 100),
                              *((k, f"{k} (points)", 100) for k in tasks)):
        rows = [(n, [scale * v for v in ts[key]["per_seed"]], scaled(ts[key], scale)) for n, ts in tests.items()
                if ts.get(key) and ts[key]["seeds"] > 1]
        if rows:
            html += svg_strip(rows, f"{label} - {base}'s, each seed a dot; bars: the t interval at 95% (thick) and at "
                              "its Holm level (thin)", label)
    rows = [[n, key, i + 1, f"{100 * e['diff']:+.1f}", f"{e['discordant'][0]} / {e['discordant'][1]}", f"{e['p']:.2g}"]
            for n, ts in tests.items() for key in ("accuracy", *tasks) if ts.get(key)
            for i, e in enumerate(ts[key].get("each_seed", []))]
    if rows:
        html += html_table(["run", "measure", "seed (folder order)", f"- {base}'s (points)", "only this run / only "
                            f"{base} right", "McNemar p (these two runs)"], rows)
    return html

def scaled(t, s):
    """A test's estimate and intervals times s (points from shares), for the dot plot."""
    out = {"diff": s * t["diff"]}
    if "lo" in t:
        out.update(lo=s * t["lo"], hi=s * t["hi"], ci95=(s * t["ci95"][0], s * t["ci95"][1]))
    return out

def precision_recall(history):
    """Per eval interval: precision = clean share of the selected tokens; recall = selected clean / seen clean,
    from the shares and the tokens_trained / tokens_seen deltas."""
    out, prev = [], {"tokens_seen": 0, "tokens_trained": 0}
    for h in history:
        d_sel, d_seen = h["tokens_trained"] - prev["tokens_trained"], h["tokens_seen"] - prev["tokens_seen"]
        p = 1 - h["noise_in_selected"]["all"]
        clean_seen = (1 - h["noise_share_corpus"]["all"]) * d_seen
        out.append({"tokens_seen": h["tokens_seen"], "precision": round(p, 4),
                    "recall": round(min(1.0, p * d_sel / clean_seen), 4) if clean_seen else None})
        prev = h
    return out

def selection(runs):
    """2. Selection audit (the demo's labels): each noise kind's share among the selected tokens against its share in
    the corpus; precision and recall of the clean tokens."""
    audited = {n: rs for n, rs in runs.items() if next(r for r in rs if r)["mode"] == "slm"
               and "noise_in_selected" in next(r for r in rs if r)}
    if not audited:
        return "<p>No SLM run with ground-truth noise labels (demo data) in these folders.</p>", {}
    first = {n: next(r for r in rs if r) for n, rs in audited.items()}
    data = {n: {"intervals": precision_recall(r["history"]), "noise_in_selected": stat([x["noise_in_selected"]["all"]
                for x in audited[n] if x])} for n, r in first.items()}
    series = []
    for i, n in enumerate(list(audited)[:6]):  # one colour per run: precision solid, recall dashed
        pr = data[n]["intervals"]
        series += [{"name": f"{n} prec", "xs": [e["tokens_seen"] for e in pr], "ys": [e["precision"] for e in pr],
                    "color": i},
                   {"name": f"{n} recall", "xs": [e["tokens_seen"] for e in pr], "ys": [e["recall"] for e in pr],
                    "color": i, "dashed": True}]
    html = svg_lines(series, "clean tokens: precision (solid) and recall (dashed), first seed", "tokens seen", "share",
                     w=660, h=20 * len(series) + 60)
    kinds = [k for k in next(iter(first.values()))["noise_in_selected"] if k != "all"]
    rows = [[n, fmt(data[n]["noise_in_selected"], True)] + [f"{r['noise_in_selected'][k]:.1%} "
            f"({r['noise_share_corpus'][k]:.1%})" for k in kinds] for n, r in first.items()]
    html += html_table(["run", "noise among selected, over seeds"] + [f"{k}, first seed" for k in kinds], rows)
    html += ("<p>Share of the selected tokens (share of the corpus). Precision: the clean share of the selected "
             "tokens. Recall: selected clean tokens over seen clean tokens, per interval between evaluations.</p>")
    return html, data

CATEGORIES = ("L->L", "H->L", "L->H", "H->H")  # the paper's token-loss categories (Sec. 2.1), as they start -> end

def loss_category(losses, t):
    """The paper's rule, per token: fit l = a*t + b over the checkpoints (least squares), dL = fit(t_end) -
    fit(t_start); dL < -0.2 -> H->L, dL > 0.2 -> L->H, else L->L if the final loss <= the mean final loss over
    all tokens, else H->H. losses: (checkpoints, tokens); returns an index into CATEGORIES per token."""
    t = np.asarray(t, dtype=np.float64)
    l = np.asarray(losses, dtype=np.float64)  # (n_ckpt, n_tok)
    tc = t - t.mean()
    a = (tc[:, None] * (l - l.mean(0))).sum(0) / max((tc ** 2).sum(), 1e-12)  # least-squares slope (0: one point)
    dl = np.round(a * (t[-1] - t[0]), 6)  # rounded so that a change of exactly 0.2 is not a float away from it
    final_loss = l[-1]
    flat = np.where(final_loss <= final_loss.mean(), 0, 3)
    return np.where(dl < -0.2, 1, np.where(dl > 0.2, 2, flat))

def load_tokens(out, run):
    path = os.path.join(out, run, "tokens.npz")
    return dict(np.load(path)) if os.path.isfile(path) else None

def main_slm(runs):
    """The SLM run the token-level sections show: slm-k0.6 if there, else the first excess-loss SLM run."""
    slm = [n for n, rs in runs.items() if next(r for r in rs if r)["mode"] == "slm" and
           next(r for r in rs if r)["select"] == "excess"]
    return "slm-k0.6" if "slm-k0.6" in slm else (slm[0] if slm else None)

def dynamics(outs, runs):
    """3. Token-loss dynamics: the four categories over CLM's checkpoints; SLM's selected and unselected tokens."""
    clms = [z for z in (load_tokens(o, "clm") for o in outs) if z is not None]
    if not clms:
        return ("<p>The clm run has no per-token records (tokens.npz): rerun it (<code>python rho.py --clm</code>) to "
                "get this section.</p>"), {}
    data, rows, clm = {"checkpoints_tokens_seen": clms[0]["tokens_seen"].tolist()}, [], clms[0]
    for part in ("web", "hq"):
        shares = [[float((loss_category(z[part].reshape(len(z["step"]), -1).astype(np.float32), z["tokens_seen"])
                          == i).mean()) for i in range(4)] for z in clms]
        data[f"categories_{part}"] = {c: round(float(np.mean([s[i] for s in shares])), 4)
                                      for i, c in enumerate(CATEGORIES)}
        rows.append([f"clm, {part} val tokens, {len(clms)} seed(s)"] + [fmt(stat([s[i] for s in shares]), True)
                                                                         for i in range(4)])
    rows.append(["paper (Fig. 2, 1B on OpenWebMath)", "51%", "26%", "12%", "11%"])
    html = html_table(["token set"] + list(CATEGORIES), rows)
    web = clm["web"].reshape(len(clm["step"]), -1).astype(np.float32)
    cat = loss_category(web, clm["tokens_seen"])
    html += svg_lines([{"name": c, "xs": clm["tokens_seen"].tolist(),
                        "ys": [float(e[cat == i].mean()) if (cat == i).any() else None for e in web]}
                       for i, c in enumerate(CATEGORIES)], "clm: mean loss per category (web val tokens, first seed)",
                      "tokens seen", "loss")
    m = main_slm(runs)
    slm = load_tokens(outs[0], m) if m else None
    if slm is None:
        return html + "<p>No SLM run with per-token records (tokens.npz): rerun <code>python rho.py --slm --k 0.6" \
                      "</code> " \
                      "to get the selected-vs-unselected plot.</p>", data
    sel, loss, t = slm["sel"], slm["web"].astype(np.float32), slm["tokens_seen"].tolist()
    mean = lambda a, s: [float(a[i][s[i]].mean()) for i in range(len(a))]
    series = [{"name": f"{m} selected", "xs": t, "ys": mean(loss, sel)},
              {"name": f"{m} unselected", "xs": t, "ys": mean(loss, ~sel)}]
    if clm["web"].shape == slm["web"].shape:  # CLM's loss on the tokens that SLM selects / leaves at that eval
        cl = clm["web"].astype(np.float32)
        series += [{"name": "clm on SLM-selected", "xs": t, "ys": mean(cl, sel), "dashed": True},
                   {"name": "clm on SLM-unselected", "xs": t, "ys": mean(cl, ~sel), "dashed": True}]
    data["slm_run"], data["slm_selected_vs_unselected"] = m, {s["name"]: s["ys"] for s in series}
    html += svg_lines(series, "mean loss of the web val tokens SLM selects vs leaves, first seed", "tokens seen",
                      "loss", w=660)
    html += ("<p>Categories: per token, a least-squares line over the checkpoints and its change dL over training: "
             "dL &lt; -0.2 is H-&gt;L, dL &gt; 0.2 is L-&gt;H, otherwise L-&gt;L if the final loss is at most the "
             "mean final loss, else H-&gt;H. Selected: the run's rule (top k by excess loss over the fixed web val "
             "set) at that evaluation.</p>")
    return html, data

def excess_color(e):
    """Background for an excess loss: red where the model is worse than the reference, blue where better."""
    a = min(1.0, abs(e) / 3)
    return f"rgba(214,39,40,{a:.2f})" if e > 0 else f"rgba(31,119,180,{a:.2f})"

def highlight(outs, runs, data_dir, n_docs=3, n_chars=600):
    """4. Token highlighting: web val text coloured by excess loss, selected tokens underlined, early and late."""
    m = main_slm(runs)
    z = load_tokens(outs[0], m) if m else None
    if z is None:
        return ("<p>No SLM run with per-token records (tokens.npz): rerun <code>python rho.py --slm --k 0.6</code> to "
                "get this section.</p>"), {}
    enc = rho.get_encoding(rho.load_meta(data_dir)["encoding"])
    html, data = "", {"run": m, "docs": []}
    for w in range(min(n_docs, len(z["web_x"]))):
        html += f"<h3>web val window {w}</h3>"
        for i, name in ((0, "early"), (len(z["step"]) - 1, "late")):
            spans = []
            for j, tok in enumerate(z["web_x"][w, 1:n_chars + 1].tolist()):
                e = float(z["web"][i, w, j]) - float(z["web_ref"][w, j])
                under = "border-bottom:2px solid #000;" if z["sel"][i, w, j] else ""
                spans.append(f'<span style="background:{excess_color(e)};{under}" title="excess {e:.2f}">'
                             f'{esc(enc.decode([tok]))}</span>')
            html += (f'<p><b>{name} (step {int(z["step"][i])})</b>, selected {z["sel"][i, w].mean():.0%}</p>'
                     f'<div class="doc">{"".join(spans)}</div>')
            data["docs"].append({"window": w, "step": int(z["step"][i]),
                                 "selected": round(float(z["sel"][i, w].mean()), 4)})
    legend = (f'<p>{m}: background = excess loss (the training loss at that evaluation minus the reference loss), '
              f'<span style="background:{excess_color(3)}">high</span> / <span style="background:{excess_color(-3)}">'
              'negative</span>; <span style="border-bottom:2px solid #000">underlined</span> = selected at that '
              'evaluation. Hover over a token for its value.</p>')
    return legend + html, data

def cost(runs, data_dir):
    """5. Cost per stage: wall time (first seed) and FLOPs (6 N D to train, 2 N D to score), for SLM and CLM."""
    first = {n: next(r for r in rs if r) for n, rs in runs.items()}
    m, clm = main_slm(runs), first.get("clm")
    m = first.get(m) if m else None
    flops = lambda r: 6 * r["n_params"] * r["tokens_seen"]
    stages = {}
    for name, label in (("base", "base"), ("ref", "reference training")):
        if name in first:
            stages[label] = {"wall_s": first[name]["wall_s"], "flops": flops(first[name])}
    if "ref" in first and "score_s" in first["ref"]:  # one forward pass over every web token
        n_scored = rho.load_meta(data_dir)["tokens"]["web"]
        stages["scoring"] = {"wall_s": first["ref"]["score_s"], "flops": 2 * first["ref"]["n_params"] * n_scored}
    for r in (clm, m):
        if r:
            stages[f"continual pretraining: {r['run']}"] = {"wall_s": r["wall_s"], "flops": flops(r)}
    pipes = {}
    if clm:
        pipes["clm"] = [s for s in ("base", "continual pretraining: clm") if s in stages]
    if m:
        pipes[m["run"]] = [s for s in ("base", "reference training", "scoring", f"continual pretraining: {m['run']}")
                           if s in stages]
    totals = {p: {"wall_s": round(sum(stages[s]["wall_s"] for s in ss), 2),
                  "flops": sum(stages[s]["flops"] for s in ss)} for p, ss in pipes.items()}
    goal = clm_target(clm, "val_loss_hq") if m and clm else None  # CLM's final val hq, smoothed
    t = crossing(m["history"], goal, "val_loss_hq") if goal is not None else None
    if t:  # SLM's pipeline up to the point where it reaches CLM's final target loss
        pre = [s for s in pipes[m["run"]] if not s.startswith("continual")]
        wall = crossing(m["history"], goal, "val_loss_hq", "wall_s")
        totals[f"{m['run']} until CLM's final val hq"] = {
            "wall_s": round(sum(stages[s]["wall_s"] for s in pre) + wall, 2),
            "flops": sum(stages[s]["flops"] for s in pre) + 6 * m["n_params"] * t}
    rows = [[s, f"{v['wall_s']:.0f}", f"{v['flops']:.3g}"] for s, v in stages.items()]
    rows += [[f"total: {p}", f"{v['wall_s']:.0f}", f"{v['flops']:.3g}"] for p, v in totals.items()]
    html = html_table(["stage", "wall s (first seed)", "FLOPs"], rows)
    html += ("<p>FLOPs = 6 &middot; n_params &middot; tokens for training (forward and backward; SLM's trunk backward "
             "is dense, so it counts every token seen, not only the selected ones), 2 &middot; n_params &middot; "
             "tokens for scoring (forward only). Attention FLOPs are left out. Wall times are this machine's.</p>")
    return html, {"stages": stages, "totals": totals,
                  "formula": "train 6*n_params*tokens_seen; score 2*n_params*tokens"}

def k_sweep(runs):
    """6. k sweep: final target loss and accuracy against k, excess-loss SLM runs of scope batch; k = 1 is CLM."""
    pts = {next(r for r in rs if r)["k"]: rs for n, rs in runs.items() if next(r for r in rs if r)["mode"] == "slm"
           and next(r for r in rs if r)["select"] == "excess" and next(r for r in rs if r)["scope"] == "batch"}
    if "clm" in runs:
        pts[1.0] = runs["clm"]
    if len(pts) < 2:
        return ("<p>Fewer than two runs for a k sweep: run <code>python rho.py --slm --k 0.2</code> (and 0.4, "
                "0.8).</p>"), {}
    ks = sorted(pts)
    s = {k: stat([final("val_loss_hq")(r) for r in pts[k] if r]) for k in ks}
    best = min(ks, key=lambda k: s[k]["mean"])
    html = svg_lines([{"name": "final val hq", "xs": ks, "ys": [s[k]["mean"] for k in ks],
                       "err": [(s[k]["min"], s[k]["max"]) for k in ks]}], "k sweep (scope batch; k = 1 is CLM): mean "
                     "and range over seeds", "k (share of tokens selected)", "final val loss hq",
                     mark=(best, s[best]["mean"], f"best k={best:g}"))
    tests = against({f"{k:g}": pts[k] for k in ks}, f"{best:g}")
    rows, data = [], {"best_k": best, "points": {}}
    for k in ks:
        acc, t = stat([final("accuracy")(r) for r in pts[k] if r]), tests.get(f"{k:g}", {})
        rows.append([f"{k:g}" + (" (best)" if k == best else ""), fmt(s[k]), fmt(acc, True),
                     fmt_test(t.get("val_loss_hq")), fmt_p(t.get("val_loss_hq")), fmt_test(t.get("accuracy"), True),
                     fmt_p(t.get("accuracy"))])
        data["points"][f"{k:g}"] = {"val_loss_hq": s[k], "accuracy": acc, "vs_best": t}
    html += html_table(["k", "final val hq", "accuracy", "val hq - best k's", "p", "accuracy - best k's (points)",
                        "p"], rows)
    return html + f"<p>{esc(explain(tests, f'k = {best:g}'))} The best k is chosen on these same runs.</p>", data

def variants(runs, title, pick, base):
    """A table of runs against one base run, paired over seeds: the selection rules at k = 0.6, or the scopes."""
    chosen = {n: rs for n, rs in runs.items() if pick(first(rs)) or n == base}
    if base not in runs or len(chosen) < 2:
        return f"<p>{title}: fewer than two such runs in these folders.</p>", {}
    rows, data, tests = [], {}, against(chosen, base)
    for n, rs in chosen.items():
        t = tests.get(n, {})
        data[n] = {"val_loss_hq": stat([final("val_loss_hq")(r) for r in rs if r]),
                   "accuracy": stat([final("accuracy")(r) for r in rs if r]), f"vs_{base}": t}
        rows.append([n, fmt(data[n]["val_loss_hq"]), fmt(data[n]["accuracy"], True), fmt_test(t.get("val_loss_hq")),
                     fmt_p(t.get("val_loss_hq")), fmt_test(t.get("accuracy"), True), fmt_p(t.get("accuracy"))])
    return html_table(["run", "final val hq", "accuracy", f"val hq - {base}'s", "p", f"accuracy - {base}'s (points)",
                       "p"], rows) + f"<p>{esc(explain(tests, base))}</p>", data

# -----------------------------------------------------------------------------
# the table printed: one row a run, then each run paired with CLM of the same seed

def fmt_reach(rs, clm, measure):
    """Tokens until CLM's final value and the speedup (one seed), or the median speedup over the seeds."""
    if not clm or first(rs)["mode"] not in ("clm", "slm"):
        return "-"
    return fmt_speeds(speedups(rs, clm, measure))

def notes(runs, out, where=""):
    """The lines after the table of one folder: scoring time, and runs that are not comparable."""
    for r in runs:  # the page breaks the noise down by kind
        if "score_s" in r:
            print(f"{where}{r['run']}: scoring every web token took {r['score_s']:.0f}s ({r['score_tok_s']:,} tok/s), "
                  f"beside {r['wall_s']:.0f}s of training")
    cpt = [r for r in runs if r["mode"] in ("clm", "slm")]
    if len({r["tokens_seen"] for r in cpt}) > 1:
        print(f"{where}note: the continual-pretraining runs saw different numbers of tokens: compare at equal tokens "
              "seen.")
    by_weights = all(r.get("init_sha256") for r in cpt)  # runs of an older rho name their start (--init_from) only
    starts = differ(cpt, (lambda r: r["init_sha256"][:12]) if by_weights else (lambda r: r["config"]["init_from"]))
    if starts:
        print(f"{where}note: the continual-pretraining runs started from different "
              f"{'weights' if by_weights else 'checkpoints (--init_from)'} ({starts}): not comparable.")
    for r in cpt:  # the ref row is the model whose scores an SLM run read, or the report says it is not
        ref = scored_by(os.path.join(out, r["config"]["ref_run"], "ref_scores.bin.json"))
        if ref and r.get("ref_weights_sha256") and ref != r["ref_weights_sha256"]:
            print(f"{where}note: {r['run']} selected by the scores of another reference model "
                  f"({r['ref_weights_sha256'][:12]}) than {r['config']['ref_run']}'s ({ref[:12]}) in {out}: the "
                  f"{r['config']['ref_run']} row is not its reference model.")
    refs = differ([r for r in cpt if r.get("ref_weights_sha256")], lambda r: r["ref_weights_sha256"][:12])
    if refs:
        print(f"{where}note: the SLM runs read the scores of different reference models ({refs}): their selections "
              "are not comparable.")

def scored_by(path):
    """The weights' sha256 of the reference model that wrote a scores file, or None where it cannot be read."""
    try:
        return rho.read_json(path).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None

def differ(runs, key):
    """'names: value; names: value' of runs grouped by key(run) where they take more than one value, else None."""
    groups = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r["run"])
    return "; ".join(f"{', '.join(names)}: {v}" for v, names in groups.items()) if len(groups) > 1 else None

def table(outs, groups, runs, tests):
    """Prints one row a run (over several folders: the mean over the seeds), each run paired with CLM, and notes."""
    several, clm, w = len(outs) > 1, runs.get("clm"), max(18, max(map(len, runs)) + 2)
    x = 22 if several else 14  # the width of the "to CLM" columns
    head = (f"{'run':<{w}}" + (f"{'seeds':>5}" if several else "") + f"{'val hq':>8}{'val web':>9}{'acc':>8}"
            f"{'seen':>8}{'trained':>9}{'noise-in-sel':>14}{'wall':>6}{'to CLM loss':>{x}}{'to CLM acc':>{x}}")
    print(head + "\n" + "-" * len(head))
    for n, rs in runs.items():
        mean = lambda f: float(np.mean([f(r) for r in rs if r]))  # over the seeds that have the run
        acc = stat([final("accuracy")(r) for r in rs if r])
        sel = "-" if "noise_in_selected" not in first(rs) else \
            f"{mean(lambda r: r['noise_in_selected']['all']):.1%}/{mean(lambda r: r['noise_share_corpus']['all']):.0%}"
        print(f"{n:<{w}}" + (f"{sum(r is not None for r in rs):>5}" if several else "")
              + f"{mean(final('val_loss_hq')):>8.4f}{mean(final('val_loss_web')):>9.4f}"
              f"{rho.percent(acc and acc['mean']):>8}"
              f"{mean(lambda r: r['tokens_seen']) / 1e6:>7.2f}M{mean(lambda r: r['tokens_trained']) / 1e6:>8.2f}M"
              f"{sel:>14}{mean(lambda r: r['wall_s']):>5.0f}s{fmt_reach(rs, clm, 'val_loss_hq'):>{x}}"
              f"{fmt_reach(rs, clm, 'accuracy'):>{x}}")
    over = f" (the mean over {len(outs)} seeds)" if several else ""
    reach = ("the median over the seeds [its interval]" if several else "tokens seen until the run first reaches it, "
             "and the speedup")
    print(textwrap.fill(f"val hq: target-distribution val loss (nats/token); acc: the final answers right, of all the "
                        f"held-out problems{over}; noise-in-sel: noise share of the trained tokens / of the corpus; "
                        f"to CLM loss, to CLM acc: CLM's tokens for its whole run over the tokens a run needs to first "
                        f"reach CLM's final val hq, or accuracy, {reach} (the page says more)", 116))
    if tests:
        print_paired(tests, w, several)
    for o, g in zip(outs, groups):
        notes(g, o, f"{o}: " if several else "")

def print_paired(tests, w, several):
    """Each run paired with CLM of the same seed: over seeds, the t and sign tests; one seed, this pair of runs."""
    if several:
        print(f"\n{'paired with clm':<{w}}{'val hq - clm':>28}{'p':>8}{'sign':>14}  {'acc - clm (points)':>28}{'p':>8}"
              f"{'sign':>14}")
        for n, t in tests.items():
            loss, acc = t["val_loss_hq"], t["accuracy"]
            print(f"{n:<{w}}{fmt_test(loss):>28}{fmt_p(loss):>8}{fmt_sign(loss):>14}  {fmt_test(acc, True):>28}"
                  f"{fmt_p(acc):>8}{fmt_sign(acc):>14}")
            for task in [k for k in t if k.startswith("lm-eval ")]:  # lm-eval's accuracies, where it was run
                print(f"{'  ' + task + ' - clm (points)':<{w + 52}}{fmt_test(t[task], True):>28}{fmt_p(t[task]):>8}"
                      f"{fmt_sign(t[task]):>14}")
    else:
        print(f"\n{'one seed: these runs':<{w}}{'val hq - clm':>14}   {'acc - clm (points)':>24}{'McNemar p':>11}")
        for n, t in tests.items():
            print(f"{n:<{w}}{fmt_test(t['val_loss_hq']):>14}   {fmt_test(t['accuracy'], True):>24}"
                  f"{fmt_p(t['accuracy']):>11}")
            for task in [k for k in t if k.startswith("lm-eval ")]:
                print(f"{'  ' + task + ' - clm (points)':<{w + 17}}{fmt_test(t[task], True):>24}{fmt_p(t[task]):>11}")
    print(textwrap.fill(explain(tests), 116))
    print(textwrap.fill(noise(tests), 116) or "acc: no per-problem records (final.correct) in these runs.")

def check_writable(folder):
    """Refuses, before the work, a folder the report cannot be written into. It writes a file to find out: os.access
    answers True to root even where a read-only mount or a full disk will refuse the write."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".report-check-"):
            pass
    except OSError as e:
        rho.die(f"{folder}: cannot write the report there ({e.strerror}): make it writable, or copy the folders "
                "somewhere writable and run report.py there")

def report(outs):
    """Writes <first folder>/report.html (self-contained) and report.json from the runs in the folders."""
    groups = [load_runs(o) for o in outs]
    check_seeds(outs, groups)
    check_writable(outs[0])
    runs = by_name(groups)
    web = {n: rs for n, rs in runs.items() if first(rs)["mode"] in ("clm", "slm")}
    tests = against(web, "clm") if "clm" in web else {}
    table(outs, groups, runs, tests)
    data_dir = next(r for r in groups[0])["config"]["data"]
    is_k6 = lambda r: r["mode"] == "clm" or (r["mode"] == "slm" and r["k"] == 0.6 and r["scope"] == "batch")
    sections = [("efficiency", "1. Data efficiency", efficiency(runs, tests)),
                ("selection", "2. Selection audit", selection(runs)),
                ("dynamics", "3. Token-loss dynamics", dynamics(outs, runs)),
                ("highlight", "4. Token highlighting", highlight(outs, runs, data_dir)),
                ("cost", "5. Cost", cost(runs, data_dir)),
                ("k_sweep", "6. k sweep", k_sweep(runs)),
                ("rules", "7. Selection rules at k = 0.6", variants(runs, "Selection rules", is_k6, "slm-k0.6")),
                ("scope", "8. Top-k scope", variants(runs, "Scopes", lambda r: r["mode"] == "slm" and r["k"] == 0.6
                                                     and r["select"] == "excess", "slm-k0.6"))]
    style = ("body{font-family:sans-serif;max-width:1150px;margin:20px auto;color:#222}table{border-collapse:collapse;"
             "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}td:first-child,"
             "th:first-child{text-align:left}.doc{font-family:monospace;font-size:12px;white-space:pre-wrap;"
             "line-height:1.7;border:1px solid #ddd;padding:6px}svg{margin:4px}")
    body = "".join(f'<h2 id="{key}">{title}</h2>\n{html}\n' for key, title, (html, _) in sections)
    seeds = ", ".join(f"{o} (seed {g[0]['config']['seed']})" for o, g in zip(outs, groups))
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>rho report: {esc(outs[0])}</title>"
            f"<style>{style}</style></head><body><h1>rho report</h1><p>Folders: {esc(seeds)}. Runs: "
            f"{esc(', '.join(runs))}. Written by <code>python report.py {esc(' '.join(outs))}</code>. Every difference "
            "is paired with the run it is compared with (CLM, unless a table says otherwise) of the same seed, and "
            "called one (*, bold) only when its test, corrected "
            "(Holm) over the tests of its table, rejects at 5% and its interval at the level of its Holm step "
            f"excludes 0; each table says how.</p>\n{body}</body></html>")
    path = os.path.join(outs[0], "report.html")
    rho.write_atomic(path, page.encode())  # utf-8, as the page declares
    rho.write_json(os.path.join(outs[0], "report.json"), {"folders": outs, "runs": list(runs),
                                                           **{key: d for key, _, (_, d) in sections}})
    print(f"report: {path} and {os.path.join(outs[0], 'report.json')}")
    return path

def main(argv=None):
    p = argparse.ArgumentParser(description="The table of the runs of rho.py in an --out folder, or in several (the "
                                "same pipeline with other seeds), and one self-contained HTML page (report.html) and "
                                "report.json, written into the first folder.", allow_abbrev=False)
    p.error = lambda msg: rho.die(f"{msg} (python report.py --help)")  # argparse's errors in one line
    p.add_argument("folders", nargs="*", default=["out"], help="--out folders of rho.py, one per seed (default: out)")
    return report(p.parse_args(argv).folders)

def read_lm_eval(run_dir):
    """lm-evaluation-harness's answers for a run, read where export.py's command has lm-eval write them (`lm_eval ...
    --output_path <run_dir>/lm_eval --log_samples`: <run_dir>/lm_eval/<model>/samples_<task>_<date>.jsonl, the newest
    of each task): {task: 0/1 per problem (numpy), in lm-eval's doc_id order, for rho_heldout that of the data folder's
    eval.json}. A task scored by several filters (gsm8k_cot: strict-match, flexible-extract) gives "task,filter" keys;
    the metric is exact_match where the task has it, else its first. {} where lm-eval wrote no samples there."""
    newest = {}  # task: (date, path); lm-eval's dates (2026-12-07T09-43-18.925137) sort as text
    for path in glob.glob(os.path.join(run_dir, "lm_eval", "**", "samples_*.jsonl"), recursive=True):
        m = re.fullmatch(r"samples_(.+)_(\d{4}-\d\d-\d\dT[\d.-]+)\.jsonl", os.path.basename(path))
        if m and (m[1] not in newest or m[2] > newest[m[1]][0]):
            newest[m[1]] = (m[2], path)
    answers = {}
    for task, (_, path) in sorted(newest.items()):
        try:
            by_filter = {}
            with open(path, encoding="utf-8") as f:
                for line in f:
                    s = json.loads(line)
                    by_filter.setdefault(s["filter"], []).append(s)
            for name, samples in by_filter.items():
                metric = "exact_match" if "exact_match" in samples[0]["metrics"] else samples[0]["metrics"][0]
                samples.sort(key=lambda s: s["doc_id"])
                correct = np.array([float(s[metric]) for s in samples])
                if [s["doc_id"] for s in samples] != list(range(len(samples))) or not np.isin(correct, (0, 1)).all():
                    rho.die(f"{path}: not one 0/1 {metric} per problem 0..{len(samples) - 1} (filter {name}): run "
                            f"lm-eval again into {os.path.join(run_dir, 'lm_eval')}")
                answers[task if len(by_filter) == 1 else f"{task},{name}"] = correct.astype(np.int64)
        except (ValueError, KeyError, IndexError, TypeError) as e:  # a cut file, or not lm-eval's
            rho.die(f"{path}: not lm-eval's samples file ({type(e).__name__}: {e}): run lm-eval again")
    return answers

if __name__ == "__main__":
    main()
