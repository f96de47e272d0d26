"""
report.py: one self-contained HTML page (inline SVG, nothing fetched) and the same numbers as JSON, from the runs of
one --out folder, or of several: the same pipeline run with other seeds.

    python report.py                           # out/report.html and out/report.json
    python report.py out out-s2 out-s3         # over seeds: written into the first folder

Over several folders every table gives the mean over the seeds and their range [min, max], and each run's paired
difference with CLM of the same seed (the same base model, the same batches); a difference is called one only when
every seed shows it (its range excludes 0). The curves are the means over the seeds; the token-level sections read the
first folder.
"""
import argparse
import math
import os
import tempfile

import numpy as np

import rho

# -----------------------------------------------------------------------------
# over seeds: runs by name, statistics, paired differences

def by_name(groups):
    """{run name: [its metrics in each folder, None where missing]}, in pipeline order."""
    names = []
    for runs in groups:
        names += [r["run"] for r in runs if r["run"] not in names]
    found = {n: [next((r for r in runs if r["run"] == n), None) for runs in groups] for n in names}
    order = lambda kv: next((["base", "ref", "clm", "slm"].index(r["mode"]), kv[0]) for r in kv[1] if r)
    return dict(sorted(found.items(), key=order))

def stat(xs):
    xs = [x for x in xs if x is not None]
    return {"mean": float(np.mean(xs)), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None

def fmt(s, pct=False):
    """'mean [min, max]' of a stat, or the value of one seed."""
    if s is None:
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
    return f(s["mean"]) if s["n"] == 1 else f"{f(s['mean'])} [{f(s['min'])}, {f(s['max'])}]"

def paired(runs, base, value):
    """value(run) - value(base) of each seed that has both: (stat, verdict)."""
    d = [value(r) - value(b) for r, b in zip(runs, base) if r and b and value(r) is not None and value(b) is not None]
    if not d:
        return None, "-"
    s = stat(d)
    if s["n"] < 2:
        return s, "one seed: no spread to compare with"
    every = s["max"] < 0 or s["min"] > 0
    return s, (f"a difference: all {s['n']} seeds agree" if every else f"within the spread of {s['n']} seeds")

def fmt_diff(s, pct=False):
    if s is None:
        return "-"
    f = (lambda v: f"{100 * v:+.1f} pts") if pct else (lambda v: f"{v:+.4f}")
    return f(s["mean"]) if s["n"] == 1 else f"{f(s['mean'])} [{f(s['min'])}, {f(s['max'])}]"

def final(key):
    return lambda r: r["final"][key]

def speedup(clm, measure):
    """CLM's tokens over the tokens a run needed to reach CLM's final value of a measure (the paper's 'x faster')."""
    def f(r):
        c = clm[0] if isinstance(clm, list) else clm
        t = rho.tokens_to_reach(r["history"], c["final"][measure], measure=measure) if c else None
        return c["tokens_seen"] / t if t else None
    return f

def speedups(runs, clm, measure):
    """The speedups of the seeds that reached CLM's final value (a stat), and how many seeds never did."""
    xs = [speedup(c, measure)(r) for r, c in zip(runs, clm) if r and c]
    return stat(xs), xs.count(None)

def mean_curve(runs, key):
    """(tokens seen, mean of key over the seeds at each evaluation) of the runs whose evaluations line up."""
    runs = [r for r in runs if r]
    n = min(len(r["history"]) for r in runs)
    return [runs[0]["history"][i]["tokens_seen"] for i in range(n)], \
        [float(np.mean([r["history"][i][key] for r in runs])) for i in range(n)]

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
    """A line plot as inline SVG. series: dicts with name, xs, ys and optionally dashed, color (an index) and err
    (a (lo, hi) per point, drawn as a bar); hline: a y drawn as a grey rule; mark: (x, y, label) circled."""
    pts = [(x, y) for s in series for x, y in zip(s["xs"], s["ys"]) if y is not None]
    ys = [y for _, y in pts] + [v for s in series for e in s.get("err", []) if e for v in e]
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
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else esc(v))
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")

# -----------------------------------------------------------------------------
# the sections: each returns (html, the same numbers as a dict)

def efficiency(runs):
    """1. Data efficiency: target loss and answer accuracy against tokens seen; tokens until CLM's final values."""
    web = {n: rs for n, rs in runs.items() if next(r for r in rs if r)["mode"] in ("clm", "slm")}
    clm = runs.get("clm")
    if not web:
        return "<p>No continual-pretraining runs (--clm, --slm) in these folders.</p>", {}
    shown = [n for n in web if n in ("clm", "slm-k0.6", "slm-k0.6-random")] or list(web)
    loss, acc = [], []
    for i, n in enumerate(shown):
        xs, ys = mean_curve(web[n], "val_loss_hq")
        loss.append({"name": n, "xs": xs, "ys": ys, "color": i})
        xs, ys = mean_curve(web[n], "accuracy")
        problems = sum(r["eval_problems"] for r in web[n] if r)  # the seeds' problems pooled
        acc.append({"name": n, "xs": xs, "ys": ys, "color": i, "err": [rho.wilson(p, problems) for p in ys]})
    seeds = len(next(iter(web.values())))
    html = svg_lines(loss, "target val loss (hq) vs tokens seen" + (f", mean of {seeds} seeds" if seeds > 1 else ""),
                     "tokens seen", "val loss hq (nats/token)",
                     hline=stat([final("val_loss_hq")(r) for r in clm if r])["mean"] if clm else None)
    html += svg_lines(acc, "answer accuracy vs tokens seen, with 95% intervals", "tokens seen", "accuracy")
    data, rows = {}, []
    for n, rs in web.items():
        d = {"seeds": sum(r is not None for r in rs), "val_loss_hq": stat([final("val_loss_hq")(r) for r in rs if r]),
             "accuracy": stat([final("accuracy")(r) for r in rs if r])}
        if clm:
            for m in ("val_loss_hq", "accuracy"):
                d[f"speedup_{m}"], d[f"never_{m}"] = speedups(rs, clm, m)
                d[f"diff_{m}"], d[f"verdict_{m}"] = paired(rs, clm, final(m))
        data[n] = d
        rows.append([n, d["seeds"], fmt(d["val_loss_hq"]), fmt(d["accuracy"], True),
                     fmt_x(d.get("speedup_val_loss_hq"), d.get("never_val_loss_hq")),
                     fmt_x(d.get("speedup_accuracy"), d.get("never_accuracy")),
                     f"{fmt_diff(d.get('diff_val_loss_hq'))}: {d.get('verdict_val_loss_hq', '-')}",
                     f"{fmt_diff(d.get('diff_accuracy'), True)}: {d.get('verdict_accuracy', '-')}"])
    html += html_table(["run", "seeds", "final val hq", "accuracy", "x faster to CLM's val hq",
                        "x faster to CLM's accuracy", "val hq - CLM's (paired)", "accuracy - CLM's (paired)"], rows)
    html += ("<p>x faster: CLM's tokens seen over this run's tokens seen until it first reaches CLM's final value "
             "(linear between evaluations), over the seeds that reach it; how many never do is said. Intervals on "
             "accuracy: 95% (Wilson) over the seeds' problems pooled.</p>")
    return html, data

def fmt_x(s, never=0):
    if s is None:
        return "never"
    x = f"{s['mean']:.2f}x" if s["n"] == 1 else f"{s['mean']:.2f}x [{s['min']:.2f}, {s['max']:.2f}]"
    return x + (f" (never on {never} of {s['n'] + never} seeds)" if never else "")

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
    a = (tc[:, None] * (l - l.mean(0))).sum(0) / (tc ** 2).sum()  # least-squares slope per token
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
        data[f"categories_{part}"] = {c: round(float(np.mean([s[i] for s in shares])), 4) for i, c in enumerate(CATEGORIES)}
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
        return html + "<p>No SLM run with per-token records (tokens.npz): rerun <code>python rho.py --slm --k 0.6</code> " \
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
            data["docs"].append({"window": w, "step": int(z["step"][i]), "selected": round(float(z["sel"][i, w].mean()), 4)})
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
    totals = {p: {"wall_s": round(sum(stages[s]["wall_s"] for s in ss), 2), "flops": sum(stages[s]["flops"] for s in ss)}
              for p, ss in pipes.items()}
    t = rho.tokens_to_reach(m["history"], clm["final"]["val_loss_hq"]) if m and clm else None
    if t:  # SLM's pipeline up to the point where it reaches CLM's final target loss
        pre = [s for s in pipes[m["run"]] if not s.startswith("continual")]
        wall = rho.tokens_to_reach(m["history"], clm["final"]["val_loss_hq"], "wall_s") or 0
        totals[f"{m['run']} until CLM's final val hq"] = {"wall_s": round(sum(stages[s]["wall_s"] for s in pre) + wall, 2),
                                                          "flops": sum(stages[s]["flops"] for s in pre) + 6 * m["n_params"] * t}
    rows = [[s, f"{v['wall_s']:.0f}", f"{v['flops']:.3g}"] for s, v in stages.items()]
    rows += [[f"total: {p}", f"{v['wall_s']:.0f}", f"{v['flops']:.3g}"] for p, v in totals.items()]
    html = html_table(["stage", "wall s (first seed)", "FLOPs"], rows)
    html += ("<p>FLOPs = 6 &middot; n_params &middot; tokens for training (forward and backward; SLM's trunk backward "
             "is dense, so it counts every token seen, not only the selected ones), 2 &middot; n_params &middot; tokens "
             "for scoring (forward only). Attention FLOPs are left out. Wall times are this machine's.</p>")
    return html, {"stages": stages, "totals": totals, "formula": "train 6*n_params*tokens_seen; score 2*n_params*tokens"}

def k_sweep(runs):
    """6. k sweep: final target loss and accuracy against k, excess-loss SLM runs of scope batch; k = 1 is CLM."""
    pts = {next(r for r in rs if r)["k"]: rs for n, rs in runs.items() if next(r for r in rs if r)["mode"] == "slm"
           and next(r for r in rs if r)["select"] == "excess" and next(r for r in rs if r)["scope"] == "batch"}
    if "clm" in runs:
        pts[1.0] = runs["clm"]
    if len(pts) < 2:
        return "<p>Fewer than two runs for a k sweep: run <code>python rho.py --slm --k 0.2</code> (and 0.4, 0.8).</p>", {}
    ks = sorted(pts)
    s = {k: stat([final("val_loss_hq")(r) for r in pts[k] if r]) for k in ks}
    best = min(ks, key=lambda k: s[k]["mean"])
    html = svg_lines([{"name": "final val hq", "xs": ks, "ys": [s[k]["mean"] for k in ks],
                       "err": [(s[k]["min"], s[k]["max"]) for k in ks]}], "k sweep (scope batch; k = 1 is CLM): mean "
                     "and range over seeds", "k (share of tokens selected)", "final val loss hq",
                     mark=(best, s[best]["mean"], f"best k={best:g}"))
    rows, data = [], {"best_k": best, "points": {}}
    for k in ks:
        d, verdict = paired(pts[k], pts[best], final("val_loss_hq"))
        acc = stat([final("accuracy")(r) for r in pts[k] if r])
        rows.append([f"{k:g}" + (" (best)" if k == best else ""), fmt(s[k]), fmt(acc, True),
                     "-" if k == best else f"{fmt_diff(d)}: {verdict}"])
        data["points"][f"{k:g}"] = {"val_loss_hq": s[k], "accuracy": acc, "minus_best": d}
    html += html_table(["k", "final val hq", "accuracy", "val hq - best k's (paired)"], rows)
    return html, data

def variants(runs, title, pick, base):
    """A table of runs against one base run, paired over seeds: the selection rules at k = 0.6, or the scopes."""
    chosen = {n: rs for n, rs in runs.items() if pick(next(r for r in rs if r))}
    if base not in runs or len(chosen) < 2:
        return f"<p>{title}: fewer than two such runs in these folders.</p>", {}
    rows, data = [], {}
    for n, rs in chosen.items():
        d = {"val_loss_hq": stat([final("val_loss_hq")(r) for r in rs if r]),
             "accuracy": stat([final("accuracy")(r) for r in rs if r])}
        for m, pct in (("val_loss_hq", False), ("accuracy", True)):
            d[f"diff_{m}"], d[f"verdict_{m}"] = paired(rs, runs[base], final(m))
        data[n] = d
        rows.append([n, fmt(d["val_loss_hq"]), fmt(d["accuracy"], True),
                     "-" if n == base else f"{fmt_diff(d['diff_val_loss_hq'])}: {d['verdict_val_loss_hq']}",
                     "-" if n == base else f"{fmt_diff(d['diff_accuracy'], True)}: {d['verdict_accuracy']}"])
    return html_table(["run", "final val hq", "accuracy", f"val hq - {base}'s", f"accuracy - {base}'s"], rows), data

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
    groups = [rho.load_runs(o) for o in outs]
    check_writable(outs[0])
    runs = by_name(groups)
    data_dir = next(r for r in groups[0])["config"]["data"]
    is_k6 = lambda r: r["mode"] == "clm" or (r["mode"] == "slm" and r["k"] == 0.6 and r["scope"] == "batch")
    sections = [("efficiency", "1. Data efficiency", efficiency(runs)),
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
            f"{esc(', '.join(runs))}. Written by <code>python report.py {esc(' '.join(outs))}</code>. Over several "
            f"seeds a difference is called one only when every seed shows it.</p>\n{body}</body></html>")
    path = os.path.join(outs[0], "report.html")
    rho.write_atomic(path, page.encode())  # utf-8, as the page declares
    rho.write_json(os.path.join(outs[0], "report.json"), {"folders": outs, "runs": list(runs),
                                                           **{key: d for key, _, (_, d) in sections}})
    print(f"report: {path} and {os.path.join(outs[0], 'report.json')}")
    return path

def main(argv=None):
    p = argparse.ArgumentParser(description="One self-contained HTML page (report.html) and report.json from the runs "
                                "of rho.py in an --out folder, or in several: the same pipeline with other seeds. "
                                "Written into the first folder.", allow_abbrev=False)
    p.error = lambda msg: rho.die(f"{msg} (python report.py --help)")  # argparse's errors in one line
    p.add_argument("folders", nargs="*", default=["out"], help="--out folders of rho.py, one per seed (default: out)")
    return report(p.parse_args(argv).folders)

if __name__ == "__main__":
    main()
