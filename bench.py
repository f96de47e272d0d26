"""
bench.py: what rho costs, measured side by side in one run. Every measurement runs in a fresh process (so a CPU's
peak memory, its max RSS, is its own); ratios are against CLM of the same case and shape.

    python bench.py                          # the head (demo and GPT-2 small) and the demo's training step
    python bench.py --cases train            # GPT-2 small steps as train() runs them (--micro_batch sequences)
    python bench.py --cases scale            # scoring cost against data size: flat per token is linear
    python bench.py --cases prepare          # prepare.py: tokenizing (and decontamination) against size and processes
    python bench.py --gpu                    # on a CUDA GPU, everything in one call: see gpu() below
    python bench.py --gpu --device cpu       # the same plan at toy sizes: checks that the script runs
    python bench.py --estimate tinyllama-owm # estimates for a paper preset: memory per GPU, FLOPs, hours on 8 H100
    python bench.py --score_dtype data/demo out   # how often float16/bfloat16 reference scores change I_k

Head implementations (case head), all forward and backward of the loss from hidden states (N, d) and a head (V, d):
    naive_clm      full logits, F.cross_entropy                 naive_slm   full logits, rho.slm_loss
    fused_clm      rho's CLM head (what --clm runs): gradients in the forward, 6 N d V FLOPs
    fused_slm      rho's SLM head: every token's loss without grad, then a backward over the selected rows:
                   (2 + 6k) N d V FLOPs
    torch_lce      torch's chunked F.linear_cross_entropy (torch >= 2.13), CLM
    torch_lce_slm  the SLM head from two native calls: a no-grad reduction='none' pass, then a pass with grad over
                   the selected rows
    liger_clm, cce_clm, liger_slm, cce_slm   the peers on CUDA, where their wheels are installed: Liger-Kernel's
                   fused linear cross entropy and Apple's cut cross entropy (CLM; SLM as two calls, like torch_lce_slm)
TFLOP/s counts the head's useful work: 6 N d V for CLM, (2 + 6k) N d V for SLM; on a GPU, as a share of the bf16
matmul ceiling measured in the same run.

The figures, each with its command and machine: SCALE.md, "Efficiency". On a CPU the peers' wheels (CUDA-only) are
skipped; ms/CLM and mem/CLM are against naive CLM (head) or the CLM step of the same case.
"""
import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import prepare
import rho

GPT2_SMALL = dict(block_size=1024, n_layer=12, n_head=12, n_embd=768)  # vocab_size 50257, tiktoken's gpt2

# -----------------------------------------------------------------------------
# timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()

def mem_now(device):
    """Bytes in use now: allocated CUDA memory, or this process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def mem_peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

def timed(fn, device, warmup, repeats):
    """(median ms, peak bytes above what was in use before the first call) of fn()."""
    base = mem_now(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times[warmup:])[repeats // 2], mem_peak(device) - base

def matmul_ceiling(device, n=8192, repeats=20):
    """The measured bf16 matmul rate in TFLOP/s (n x n x n, median of repeats): the ceiling that shares refer to."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms, _ = timed(lambda: a @ b, device, 5, repeats)
    return round(2 * n**3 / ms / 1e9, 1)

# -----------------------------------------------------------------------------
# the head: every implementation of the loss from hidden states, forward and backward

def native_lce(h, w, y, **kw):
    """torch's own chunked linear + cross-entropy (F.linear_cross_entropy, torch >= 2.13), gradient in the forward."""
    return F.linear_cross_entropy(h, w, y, ignore_index=rho.IGNORE, options=torch.nn.LinearCrossEntropyOptions(), **kw)

def peer(name):
    """A peer's CLM loss(h, w, y, reduction) on CUDA: Liger-Kernel's or cut cross entropy's; None if not installed."""
    try:
        if name == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as f
            return lambda h, w, y, reduction="mean": f(h, w, y, ignore_index=rho.IGNORE, reduction=reduction)
        from cut_cross_entropy import linear_cross_entropy as f
        return lambda h, w, y, reduction="mean": f(h, w, y, ignore_index=rho.IGNORE, reduction=reduction)
    except ImportError:
        return None

def two_call_slm(loss_fn, h, w, y, r, k):
    """The SLM head from a CLM loss function called twice: a no-grad pass for every token's loss, then a pass with
    gradient over the selected rows only."""
    with torch.no_grad():
        tok = loss_fn(h, w, y, reduction="none").float()
    idx = rho.select_tokens(tok[None], y[None], r[None], k)[0].nonzero().squeeze(1)
    return loss_fn(h[idx], w, y[idx], reduction="sum") / len(idx)

HEAD_IMPLS = ("naive_clm", "naive_slm", "fused_clm", "fused_slm", "torch_lce", "torch_lce_slm",
              "liger_clm", "liger_slm", "cce_clm", "cce_slm")

def unavailable(impl, device):
    """Why an implementation cannot run here, or None."""
    if impl.startswith("torch_lce") and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
    if impl.startswith(("liger", "cce")):
        if device.type != "cuda":
            return "a CUDA-only peer"
        if peer(impl.split("_")[0]) is None:
            return f"{impl.split('_')[0]} is not installed (see bench.py --gpu)"
    return None

def head_loss_fn(impl, h, w, y, r, k):
    """The loss of one implementation, as a function of nothing: h (1, N, d), w (V, d), y (1, N), r (1, N, 2)."""
    N, V = h.shape[1], w.shape[0]
    if impl == "naive_clm":
        return lambda: F.cross_entropy((h @ w.t()).float().view(N, V), y.view(N))
    if impl == "naive_slm":
        return lambda: rho.slm_loss(h @ w.t(), y, r, k)[0]
    if impl == "fused_clm":
        return lambda: rho.fused_clm_loss(h, w, y, N)[0]
    if impl == "fused_slm":
        return lambda: rho.fused_slm_loss(h, w, y, r, rho.RunConfig(k=k))[0]
    loss_fn = native_lce if impl.startswith("torch_lce") else peer(impl.split("_")[0])
    if impl.endswith("_slm"):
        return lambda: two_call_slm(loss_fn, h[0], w, y[0], r[0], k)
    return lambda: loss_fn(h[0], w, y[0])

def bench_head(impl, N, d, V, k, device, dtype, warmup, repeats):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, N, d, generator=g).to(device, dtype).requires_grad_()
    w = (0.02 * torch.randn(V, d, generator=g)).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (1, N), generator=g).to(device)
    r = torch.rand(1, N, 2, generator=g).to(device)
    loss_fn = head_loss_fn(impl, h, w, y, r, k)

    def step():
        h.grad = w.grad = None
        loss_fn().backward()
    return timed(step, device, warmup, repeats)

def head_flops(impl, N, d, V, k):
    """The head's useful work: 6 N d V for CLM, (2 + 6k) N d V for SLM."""
    return (6 if impl.endswith("clm") or impl == "torch_lce" else 2 + 6 * k) * N * d * V

# -----------------------------------------------------------------------------
# whole steps: the demo model's, and GPT-2 small's as train() runs it; scoring's cost against data size

def bench_step(impl, mcfg, k, device, warmup, repeats):
    """One training step of a GPT through the fused head: CLM (what --clm runs), SLM with stored reference scores, or
    SLM with an online reference forward (a second model scoring the batch every step); score: scoring's forward."""
    torch.manual_seed(0)
    model, B, T = rho.GPT(mcfg).to(device), 16, mcfg.block_size
    ref_model = rho.GPT(mcfg).to(device).eval() if impl == "slm_online" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (torch.randint(0, mcfg.vocab_size, (B, T), device=device) for _ in range(2))
    r, cfg = torch.rand(B, T, 2, device=device), rho.RunConfig(k=1.0 if impl == "clm" else k)

    def step():
        ref = r if ref_model is None else torch.stack(rho.model_token_loss(ref_model, x, y, entropy=True), -1)
        h, w = model(x), model.lm_head.weight
        loss = rho.fused_clm_loss(h, w, y, y.numel())[0] if impl == "clm" else rho.fused_slm_loss(h, w, y, ref, cfg)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed((lambda: rho.model_token_loss(model, x, y)) if impl == "score" else step, device, warmup, repeats)

def bench_train(impl, mcfg, B, k, device, dtype, warmup, repeats):
    """One optimizer step exactly as train() runs it (fused head, --dtype autocast): clm, slm (the step in one
    forward), slm_split (the same step in two micro-batches, so a no-grad selection pass comes first); the _compiled
    forms with torch.compile's forward (--compile)."""
    torch.manual_seed(0)
    cfg = rho.RunConfig(mode="clm" if impl.startswith("clm") else "slm", k=1.0 if impl.startswith("clm") else k,
                        device=str(device), dtype=dtype)
    model, T = rho.GPT(mcfg).to(device), mcfg.block_size
    fwd = torch.compile(model) if impl.endswith("_compiled") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, mcfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2))
    r = torch.rand(B, T, 2, generator=g).to(device)
    micro = [rho.MicroBatch(x, y, r, None)] if "split" not in impl else \
        [rho.MicroBatch(x[i::2], y[i::2], r[i::2], None) for i in range(2)]

    def step():
        opt.zero_grad(set_to_none=True)
        rho.train_step(model, fwd, micro, cfg, g)
        opt.step()
    return timed(step, device, warmup, repeats)

def bench_scale(n_tokens, device, dtype):
    """Scoring n_tokens random web tokens with a demo-sized model through rho.score_web, once: its cost per token."""
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "ref"))
        web = os.path.join(d, "web.bin")
        np.random.default_rng(0).integers(0, 257, n_tokens, dtype=np.uint16).tofile(web)
        meta = {"encoding": "bytes", "dtype": "uint16", "sha256": "bench", "vocab_size": 257,  # files: as prepare.py
                "tokens": {"web": n_tokens},  # records them
                "files": {"web.bin": {"bytes": os.path.getsize(web), "sha256": rho.file_sha256(web)}}}
        cfg = rho.RunConfig(data=d, out=d, device=str(device), dtype=dtype)
        torch.manual_seed(0)
        model = rho.GPT(rho.GPTConfig()).to(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rho.score_web(model, meta, cfg, "ref")
        return 1000 * (time.perf_counter() - t0), mem_peak(device), 1000 * (time.process_time() - c0)

def train_config(d, V):
    """The model of case train: GPT-2 small (d 768), or a toy GPT of width d for --gpu's CPU mode."""
    return rho.GPTConfig(vocab_size=V, **GPT2_SMALL) if d == 768 else rho.GPTConfig(vocab_size=V, n_embd=d)

def step_flops(impl, mcfg, N, k):
    """A training step's FLOPs by part, forward and backward, as the PaLM / nanoGPT MFU count has them: the trunk's
    6 N P (P: the blocks' and ln_f's parameters), attention's 12 L d T N (the causal half counted in full) and the
    head's 6 N d V for CLM, (2 + 6k) N d V for SLM; slm_split also runs a selection pass, a no-grad forward of all
    three: 2 N P + 4 L d T N + 2 N d V."""
    with torch.device("meta"):
        P = sum(p.numel() for n, p in rho.GPT(mcfg).named_parameters() if not n.startswith(("transformer.wte",
                                                                                              "transformer.wpe")))
    L, d, T, V, clm = mcfg.n_layer, mcfg.n_embd, mcfg.block_size, mcfg.vocab_size, impl.startswith("clm")
    parts = {"trunk": 6 * N * P, "attention": 12 * L * d * T * N, "head": (6 if clm else 2 + 6 * k) * N * d * V}
    parts["selection"] = (2 * N * P + 4 * L * d * T * N + 2 * N * d * V) if "split" in impl else 0
    return parts

def bench_one(case, impl, shape, device, dtype, warmup, repeats):
    device, (N, d, V, k) = torch.device(device), shape
    if case == "head":
        ms, peak = bench_head(impl, N, d, V, k, device, getattr(torch, dtype), warmup, repeats)
    elif case == "train":  # GPT-2 small, as --preset gpt2-owm trains it (or a toy GPT, for --gpu's CPU mode)
        mcfg = train_config(d, V)
        ms, peak = bench_train(impl, mcfg, N // mcfg.block_size, k, device, dtype, warmup, repeats)
    elif case == "scale":
        bench_scale(2**17, device, dtype)  # warm-up: a first scoring run in this process
        ms, peak, cpu_ms = bench_scale(N, device, dtype)
    else:
        mcfg = rho.GPTConfig(vocab_size=V)  # the demo's model
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            ms, peak = bench_step(impl, mcfg, k, device, warmup, repeats)
    row = {"case": case, "impl": impl, "device": str(device), "dtype": dtype, "N": N, "d": d, "V": V, "k": k,
           "ms": round(ms, 2), "peak_mb": round(peak / 2**20, 1)}
    if case == "scale":  # CPU time of every thread: the cost, less sensitive than wall time to a shared machine
        row["cpu_ms"] = round(cpu_ms, 1)
    return row

# -----------------------------------------------------------------------------
# plans, and the table

CASES = ("head", "step", "train", "scale", "prepare")
DEMO_N = 16 * rho.GPTConfig.block_size  # a step of the demo: 16 windows

def plan(cases, k, gpu, micro_batch=0, compiled=False, rounds=1):
    """(case, impl, (N, d, V, k)) of every measurement, in order; CLM first in each group: the ratios' base. The
    training step is measured in rounds, CLM and SLM interleaved: a slow spell of a shared machine hits both."""
    rows = []
    if "head" in cases:  # the demo model's head; GPT-2 small's (the padded vocabulary; on a GPU the real one too)
        shapes = [(DEMO_N, 128, 320), (8192, 768, 50304)] + ([(8192, 768, 50257), (32768, 768, 50257)] if gpu else [])
        rows += [("head", impl, (N, d, V, k)) for N, d, V in shapes for impl in HEAD_IMPLS]
    if "step" in cases:  # the demo model's step, and its scoring
        rows += [("step", impl, (DEMO_N, 128, 320, k)) for impl in ("clm", "slm_stored", "slm_online", "score")]
    if "train" in cases:  # GPT-2 small at T = 1024: --micro_batch, else the preset's on a GPU, 2 sequences on a CPU
        B = micro_batch or (rho.PRESETS["gpt2-owm"]["micro_batch"] if gpu else 2)
        impls = ("clm", "slm", "slm_split") + (("clm_compiled", "slm_compiled", "slm_split_compiled")
                                               if compiled else ())
        rows += [("train", impl, (B * 1024, 768, 50257, k)) for _ in range(rounds) for impl in impls]
    if "scale" in cases:  # scoring 2^18, 2^19, 2^20 tokens, there and back (a drifting machine cancels out)
        rows += [("scale", "score", (2**e, 128, 320, k)) for e in (18, 19, 20, 20, 19, 18)]
    return rows

def measure(rows_plan, device, dtype, ceiling=None, repeats=None):
    """Runs a plan, one fresh process per measurement; prints a JSON line each, returns the rows with their ratios."""
    gpu, rows, ctx = device.startswith("cuda"), [], mp.get_context("spawn")
    for case, impl, shape in rows_plan:
        why = unavailable(impl, torch.device(device)) if case == "head" else None
        if why:
            print(json.dumps({"case": case, "impl": impl, "N": shape[0], "V": shape[2], "skipped": why}), flush=True)
            continue
        big = not gpu and (shape[2] > 1000 or case == "scale")  # GPT-2 on a CPU: seconds a repeat
        warmup, reps = repeats or ((1, 1) if big and case == "train" else (1, 2) if big else (5, 21) if not gpu
                                   else (3, 10))  # GPT-2's step on a CPU: one timed step a process, in rounds
        with ctx.Pool(1) as pool:
            row = pool.apply(bench_one, (case, impl, shape, device, dtype, warmup, reps))
        base = row if impl in ("naive_clm", "clm") else next((b for b in (rows if case == "scale" else rows[::-1])
            if b["case"] == case and (case == "scale" or b["impl"] in ("naive_clm", "clm") and (b["N"], b["d"], b["V"])
                                      == shape[:3])), row)  # CLM of the same shape, of this round; scale: the smallest
        row["ms_ratio"] = round(row["ms"] / base["ms"], 3)
        row["mem_ratio"] = round(row["peak_mb"] / max(base["peak_mb"], 1e-9), 3)
        if impl == "score":  # scoring tokens/s, against the CLM step of the same model
            row["tok_s"] = round(shape[0] / row["ms"] * 1000)
            if case == "step":
                row["tok_s_ratio"] = round(base["ms"] / row["ms"], 2)
        if case == "head":
            row["tflops"] = round(head_flops(impl, *shape) / row["ms"] / 1e9, 3)
        if case == "train":
            row["tok_s"] = round(shape[0] / row["ms"] * 1000)
            flops = sum(step_flops(impl, train_config(*shape[1:3]), shape[0], shape[3]).values())
            row["tflops"] = round(flops / row["ms"] / 1e9, 3)
        if ceiling and row.get("tflops"):
            row["share_of_ceiling"] = round(row["tflops"] / ceiling, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    for r in rows:  # each head against the fastest CLM of its shape (naive, rho's fused, torch's, the peers')
        if r["case"] == "head":
            r["ms_ratio_best_clm"] = round(r["ms"] / min(b["ms"] for b in rows if b["case"] == "head" and
                                                        (b["N"], b["V"]) == (r["N"], r["V"]) and
                                                        (b["impl"].endswith("clm") or b["impl"] == "torch_lce")), 3)
    return rows

def table(rows, ceiling=None):
    print(f"\n{'case':<6}{'impl':<19}{'N':>7}{'d':>5}{'V':>7}{'ms':>10}{'peak MB':>10}{'ms/CLM':>8}{'mem/CLM':>9}"
          f"{'ms/best':>8}{'TFLOP/s':>9}" + (f"{'ceiling':>9}" if ceiling else ""))
    for r in rows:
        print(f"{r['case']:<6}{r['impl']:<19}{r['N']:>7}{r['d']:>5}{r['V']:>7}{r['ms']:>10.1f}{r['peak_mb']:>10.1f}"
              f"{r['ms_ratio']:>8.2f}{r['mem_ratio']:>9.3f}{r.get('ms_ratio_best_clm', ''):>8}"
              f"{r.get('tflops') or '':>9}" + (f"{r.get('share_of_ceiling', ''):>9}" if ceiling else ""))
    print("ms/CLM, mem/CLM: against naive CLM (head) or the CLM step of the same case; ms/best: against the fastest "
          "CLM head of the shape" + (f"; ceiling: share of the measured bf16 matmul rate, {ceiling} TFLOP/s" if ceiling
                                     else ""))

def scale_summary(rows):
    """Scoring time per token at each size against the smallest, the faster of its two measurements, in wall time
    and in CPU time: flat means linear in data."""
    best = {}
    for r in rows:
        if r["case"] == "scale":
            b = best.setdefault(r["N"], {"ms": r["ms"], "cpu_ms": r["cpu_ms"]})
            b["ms"], b["cpu_ms"] = min(b["ms"], r["ms"]), min(b["cpu_ms"], r["cpu_ms"])
    if best:
        n0 = min(best)
        per = lambda n, key: best[n][key] / n / (best[n0][key] / n0)
        print("\nscale: scoring time per token against the smallest size, wall / CPU (the faster of each pair): "
              + ", ".join(f"{n / 2**20:g} Mi tokens {per(n, 'ms'):.2f} / {per(n, 'cpu_ms'):.2f}" for n in sorted(best)))

def train_summary(rows):
    """The training step over its rounds: each impl's median ms and range, its ratio to the CLM of the same round
    (median and range) beside the ratio that the FLOP count gives, and that count by parts."""
    train = [r for r in rows if r["case"] == "train"]
    if not train:
        return {}
    N, d, V, k = (train[0][key] for key in ("N", "d", "V", "k"))
    mcfg, impls = train_config(d, V), list(dict.fromkeys(r["impl"] for r in train))
    ms = {i: [r["ms"] for r in train if r["impl"] == i] for i in impls}
    ratio = {i: [r["ms_ratio"] for r in train if r["impl"] == i] for i in impls}
    flops = {i: step_flops(i, mcfg, N, k) for i in impls}
    base = sum(flops[impls[0]].values())
    print(f"\ntrain: N = {N:,} tokens a step, {len(ms[impls[0]])} rounds (a fresh process per measurement, CLM and "
          f"SLM interleaved);\nFLOPs in GFLOP by part: trunk 6NP (P = {flops[impls[0]]['trunk'] // (6 * N):,}), "
          f"attention 12LdTN, head 6NdV (CLM) or (2+6k)NdV (SLM), the selection pass's no-grad forward")
    print(f"{'impl':<20}{'median ms':>11}{'min-max':>17}{'ms/CLM':>8}{'min-max':>12}{'FLOPs/CLM':>10}{'trunk':>8}"
          f"{'attn':>7}{'head':>7}{'select':>8}{'total':>8}")
    summary = {}
    for i in impls:
        f, total = flops[i], sum(flops[i].values())
        summary[i] = {"ms": statistics.median(ms[i]), "ms_ratio": statistics.median(ratio[i]),
                      "flops_ratio": round(total / base, 3)}
        print(f"{i:<20}{summary[i]['ms']:>11.1f}{f'{min(ms[i]):.0f}-{max(ms[i]):.0f}':>17}"
              f"{summary[i]['ms_ratio']:>8.3f}{f'{min(ratio[i]):.3f}-{max(ratio[i]):.3f}':>12}"
              f"{total / base:>10.3f}" + "".join(f"{f[p] / 1e9:>{w}.0f}" for p, w in
                                               (("trunk", 8), ("attention", 7), ("head", 7), ("selection", 8)))
              + f"{total / 1e9:>8.0f}")
    return summary

def preset_time(rows, device):
    """The --preset gpt2-owm runs' expected time on this device, from the measured GPT-2 small steps (medians)."""
    train = [r for r in rows if r["case"] == "train" and r["d"] == 768]
    tok_s = {i: round(statistics.median(r["tok_s"] for r in train if r["impl"] == i)) for i in {r["impl"] for r in
                                                                                                   train}}
    if not {"clm", "slm", "slm_split"} <= set(tok_s):
        return
    p = rho.PRESETS["gpt2-owm"]
    tokens = {stage: p["steps"][stage] * p["batch_size"] * p["block_size"] for stage in ("ref", "clm", "slm")}
    split = "slm_split" if p["batch_size"] > p["micro_batch"] else "slm"  # one device: gradient accumulation
    hours = {"ref": tokens["ref"] / tok_s["clm"], "clm": tokens["clm"] / tok_s["clm"],
             "slm": tokens["slm"] / tok_s[split]}
    print(f"\npreset gpt2-owm on one {device} device, from these tok/s: " + ", ".join(
        f"{stage} {tokens[stage] / 1e9:.2f}B tokens {h / 3600:.1f} h" for stage, h in hours.items())
        + f" (SLM at the {split} rate: {tok_s[split]:,} tok/s); scoring the web corpus is a forward: about 1/3 of a "
          f"CLM step per token")

# -----------------------------------------------------------------------------
# prepare.py's cost: tokenizing (decontamination included) against data size and processes

PREPARE_MB = 20

def prepare_files(folder, seed, base_mb):
    """Web-like .txt files of 1x, 2x and 4x base_mb MB: the demo's web pages; the larger files repeat the 1x text
    (tiktoken keeps no cache between documents, so a repeated document costs what a new one does)."""
    rng, docs, n = random.Random(seed), [], 0
    while n < base_mb * 1e6:
        docs.append("".join(t for t, _ in prepare.web_document(rng)))
        n += len(docs[-1]) + 2
    text, files = "\n\n".join(docs) + "\n\n", {}
    for m in (1, 2, 4):
        files[m] = os.path.join(folder, f"web_{m}x.txt")
        with open(files[m], "w") as f:
            f.writelines([text] * m)
    return files

def held_out_like_gsm8k(seed, n=1319, n_words=45):
    """A held-out index the size of GSM8K's test questions (1,319 of ~45 words) that matches no bench document, so
    that every document is checked and tokenized, as prepare.py does by default."""
    rng = random.Random(seed)
    texts = [" ".join(prepare.random_string(rng, 8) for _ in range(n_words)) for _ in range(n)]
    return prepare.held_out_index(texts)[0]

def decontamination_cpu(path, index):
    """CPU seconds of the decontamination check alone on a bench file, in tasks of TASK_CHARS, in this process."""
    tasks, chars = [[]], 0
    for _, x in prepare.read_lines(path, "txt", {}):
        tasks[-1].append(x)
        chars += len(x)
        if chars >= prepare.TASK_CHARS:
            tasks.append([])
            chars = 0
    t0 = time.process_time()
    for task in tasks:
        prepare.contaminated(task, index)
    return time.process_time() - t0

def tokenize_one(path, size, procs, pool, encoding, dtype):
    w = prepare.TokenWriter(path + ".bin", dtype, {})
    load, t0, c0 = os.getloadavg()[0], time.time(), time.process_time()
    task_cpu = prepare.tokenize_source(path, w, pool, 2 * procs)[1]["cpu"]
    n, dt = w.close(), time.time() - t0
    cpu = time.process_time() - c0 + (task_cpu if pool else 0)  # this process (reading, writing), plus the workers'
    os.remove(path + ".bin.tmp")
    return {"size": f"{size}x", "mb": round(os.path.getsize(path) / 1e6, 1), "procs": procs, "encoding": encoding,
            "tokens": n, "seconds": round(dt, 3), "tok_per_s": round(n / dt), "s_per_mtok": round(dt * 1e6 / n, 4),
            "cpu_s": round(cpu, 3), "cpu_s_per_mtok": round(cpu * 1e6 / n, 4),
            "load_avg": round(load, 2)}  # the 1-minute load average as it started: other work on the machine

def bench_prepare(procs, encoding, seed=1337):
    """Times tokenizing each file three times (1x 2x 4x, three rounds) with 1 and with `procs` processes (workers
    started before the clock starts), decontamination included; the table keeps the fastest of each size. Linear
    cost: seconds per token stay flat from 1x to 4x. Scaling: seconds drop with processes. Then the decontamination
    check alone on 1x, against the 1-process cost of 1x."""
    rows, index, dtype = [], held_out_like_gsm8k(seed), prepare.token_dtype(prepare.get_encoding(encoding).n_vocab)
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_files(tmp, seed, PREPARE_MB)
        for n in sorted({1, procs}):
            with prepare.start_pool(n, encoding, index) as pool:
                if pool:
                    list(pool.map(abs, range(4 * n)))  # warm-up: every worker has started
                for size in (1, 2, 4) * 3:  # three rounds: a slow spell of a shared machine hits one round, not all
                    rows.append(tokenize_one(files[size], size, n, pool, encoding, dtype))
                    print(json.dumps(rows[-1]), flush=True)
        check = min(decontamination_cpu(files[1], index) for _ in range(3))
    prepare_table(rows)
    cpu = min(r["cpu_s"] for r in rows if r["procs"] == 1 and r["size"] == "1x")
    print(f"decontamination alone on 1x: {check:.3f} CPU s, {check / cpu:.0%} of the {cpu:.3f} CPU s that 1 process "
          f"spends on 1x with it: +{check / max(cpu - check, 1e-9):.0%} over tokenizing without it")
    return rows

def prepare_table(rows):
    """The fastest measurement of each (size, procs); CPU seconds (all processes) are the cost, wall seconds
    the speed."""
    best = {}
    for r in rows:
        key = (r["procs"], r["size"])
        best[key] = min(best.get(key, r), r, key=lambda b: b["seconds"])
    rows = list(best.values())
    wall_1x = {r["procs"]: r["s_per_mtok"] for r in rows if r["size"] == "1x"}
    cpu_1x = {r["procs"]: r["cpu_s_per_mtok"] for r in rows if r["size"] == "1x"}
    seconds_1p = {r["size"]: r["seconds"] for r in rows if r["procs"] == 1}
    print(f"{'size':<5}{'MB':>7}{'procs':>6}{'tokens':>13}{'seconds':>9}{'s/Mtok':>8}{'vs 1x':>7}{'cpu s/Mtok':>11}"
          f"{'vs 1x':>7}{'speedup':>9}")
    for r in rows:
        print(f"{r['size']:<5}{r['mb']:>7.1f}{r['procs']:>6}{r['tokens']:>13,}{r['seconds']:>9.2f}"
              f"{r['s_per_mtok']:>8.3f}{r['s_per_mtok'] / wall_1x[r['procs']]:>7.2f}{r['cpu_s_per_mtok']:>11.3f}"
              f"{r['cpu_s_per_mtok'] / cpu_1x[r['procs']]:>7.2f}{seconds_1p[r['size']] / r['seconds']:>8.2f}x")

# -----------------------------------------------------------------------------
# --gpu: everything a lent GPU should check and time, in one call

def gpu(args):
    """The CUDA tests first (nothing counts until they pass), then the measured bf16 matmul ceiling, the head at GPT-2
    small (d 768, V 50,304 and 50,257; N 8,192 and the preset's micro-batch of 32 x 1,024) for every implementation,
    and GPT-2 small's training step as train() runs it, with and without torch.compile. Writes every row to --json.
    The peers are wheels carried to the GPU machine (no network there): in the repository's root, once,
        echo /.whl/ >> .git/info/exclude
        pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
            -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
    and there: pip install --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python bench.py --gpu.
    With --device cpu: the same plan at toy sizes, to check that it runs."""
    device, on_gpu = torch.device(args.device), args.device.startswith("cuda")
    here = os.path.dirname(os.path.abspath(__file__))  # the tests beside this file, from any folder
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "test_rho.py", "-k",
                            "fused or chunk or triton or gpu"],
                           capture_output=True, text=True, cwd=here)  # on a GPU, the tests that skip on a CPU run too
    print(tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-2000:], flush=True)
    if tests.returncode not in (0, 5):
        print(tests.stdout[-4000:])
        sys.exit(f"bench: the kernel tests ({'CUDA' if on_gpu else 'CPU'}) failed; nothing else counts until they "
                 f"pass")
    ceiling = matmul_ceiling(device) if on_gpu else None
    if on_gpu:
        print(json.dumps({"case": "ceiling", "gpu": torch.cuda.get_device_name(), "bf16_tflops": ceiling}), flush=True)
        todo = [(c, i, s) for c, i, s in plan(("head", "train"), args.k, True, args.micro_batch, compiled=True)
                if c != "head" or s[1] == 768]
    else:  # toy sizes: a GPT-2-like head, a 2-layer model
        todo = [("head", i, (512, 64, 1000, args.k)) for i in HEAD_IMPLS]
        todo += [("train", i, (2 * 1024, 64, 320, args.k)) for i in ("clm", "slm", "slm_split")]
    rows = measure(todo, args.device, "bfloat16" if on_gpu else "float32", ceiling, None if on_gpu else (0, 1))
    table(rows, ceiling)
    train_summary(rows)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
                   "ceiling_bf16_tflops": ceiling, "rows": rows}, f, indent=1)
    print(f"bench: {len(rows)} rows -> {args.json}")
    return rows

# -----------------------------------------------------------------------------
# estimates (not measurements) for the paper's presets: memory per GPU under FSDP2, FLOPs and hours of the whole run

# the architectures behind the presets' hf: names (their config.json), so that no download is needed
ARCH = {"tinyllama-owm": dict(d=2048, L=22, ff=5632, heads=32, kv_heads=4, V=32000),
        "mistral-owm": dict(d=4096, L=32, ff=14336, heads=32, kv_heads=8, V=32000)}
H100_BF16 = 989e12  # H100 SXM dense bf16 peak, FLOP/s
HQ_TOKENS, WEB_TOKENS = 0.5e9, 15e9  # the paper: a 0.5B-token math hq corpus, 3 epochs; 15B OpenWebMath tokens

def llama_params(a):
    """(body, head) parameter counts of a Llama-shaped model with an untied head: attention with grouped KV heads,
    a SwiGLU MLP, RMSNorm gains; the embedding counts to the body."""
    kv = a["d"] // a["heads"] * a["kv_heads"]
    block = a["d"] * (2 * a["d"] + 2 * kv) + 3 * a["d"] * a["ff"] + 2 * a["d"]
    return a["V"] * a["d"] + a["L"] * block + a["d"], a["V"] * a["d"]

def estimate(name, gpus=8, mfu=0.4):
    """Prints the estimate of a preset: GPUs, memory per GPU (parameters, gradients, AdamW, activations with and
    without --act_ckpt), the FLOPs of the reference model's training and scoring and of one CPT run (CLM and SLM),
    and hours on `gpus` H100s at `mfu`. Activations: 34 bytes per token per layer per d of a bf16 block with
    flash attention (Korthikanti et al. 2022), or with checkpointing its 2-byte input plus one block recomputed."""
    a, p = ARCH[name], rho.PRESETS[name]
    body, head = llama_params(a)
    P, T, k = body + head, p["block_size"], p["k"]
    micro = p["micro_batch"]  # sequences per forward on each GPU
    GB = 2 ** 30
    mem = {"params fp32 (sharded)": 4 * P / gpus, "grads fp32 (sharded)": 4 * P / gpus,
           "AdamW fp32 (sharded)": 8 * P / gpus,
           "bf16 gathered: root + 2 blocks": 2 * (2 * a["V"] * a["d"] + 2 * (body - a["V"] * a["d"]) / a["L"]),
           "fused head: logits chunk + dW": 2 ** 29 + 2 ** 28 + 4 * head}
    act_full = 34 * micro * T * a["d"] * a["L"]
    act_ckpt = 2 * micro * T * a["d"] * a["L"] + 34 * micro * T * a["d"]
    attn = 12 * a["L"] * a["d"] * T  # per token, forward and backward: QK^T and AV (6 d T per layer each way)
    forward = 2 * P + attn / 3
    split = micro < p["batch_size"] // gpus  # several micro-batches: SLM's no-grad selection pass first (train_step)
    per_token = {"clm": 6 * P + attn, "slm": 6 * body + (2 + 6 * k) * head + attn + split * forward}
    ckpt = (2 * body + attn / 3) if p.get("act_ckpt") else 0  # the recomputed forward of the blocks
    runs = {"reference training (CLM, 3 x 0.5B hq tokens)": (per_token["clm"] + ckpt) * 3 * HQ_TOKENS,
            "reference scoring (forward, 15B web tokens)": forward * WEB_TOKENS,
            "CPT CLM baseline (15B tokens)": (per_token["clm"] + ckpt) * WEB_TOKENS,
            "CPT SLM (15B tokens)": (per_token["slm"] + ckpt) * WEB_TOKENS}
    print(f"estimate {name} (not measured): {P / 1e9:.2f}B params, context {T}, k {k}, {gpus} H100 80GB at "
          f"{mfu:.0%} MFU of {H100_BF16 / 1e12:.0f} TFLOP/s bf16; FSDP2 over {gpus}, micro-batch {micro} x {T}")
    for what, b in mem.items():
        print(f"  memory/GPU  {what:<34}{b / GB:8.1f} GB")
    print(f"  memory/GPU  {'activations, no --act_ckpt':<34}{act_full / GB:8.1f} GB")
    print(f"  memory/GPU  {'activations, --act_ckpt':<34}{act_ckpt / GB:8.1f} GB")
    fixed = sum(mem.values())
    print(f"  memory/GPU  {'total, no --act_ckpt / --act_ckpt':<34}{(fixed + act_full) / GB:8.1f} / "
          f"{(fixed + act_ckpt) / GB:.1f} GB (the preset: {'--act_ckpt' if p.get('act_ckpt') else 'no --act_ckpt'})")
    least = math.ceil(16 * P / (80 * GB - (fixed - 16 * P / gpus) - act_ckpt))
    print(f"  GPUs        at least {least} for the 16 bytes a parameter of fp32 weights, gradients and AdamW, sharded")
    for what, flops in runs.items():
        print(f"  compute     {what:<48}{flops:10.3g} FLOPs {flops / (gpus * H100_BF16 * mfu) / 3600:8.1f} h")
    total = sum(runs.values())
    print(f"  compute     {'the whole pipeline (ref, scoring, CLM, SLM)':<48}{total:10.3g} FLOPs "
          f"{total / (gpus * H100_BF16 * mfu) / 3600:8.1f} h")
    print(f"  reference scores: {8 * WEB_TOKENS / 1e9:.0f} GB (float32 loss and entropy, 8 bytes a web token); "
          f"{2 * WEB_TOKENS / 1e9:.0f} GB with --score_dtype float16 --scores loss")
    return {"params": P, "memory": mem, "act_full": act_full, "act_ckpt": act_ckpt, "flops": runs}

def score_dtype_change(data="data/demo", out="out", steps=200, k=0.6, batch_size=16, seed=1337):
    """How often a smaller dtype of the stored reference scores changes I_k (--select excess, scope batch): for the
    first `steps` batches of continual pretraining, the tokens selected with float32 scores against those selected
    with the scores rounded to float16 and bfloat16, under the model SLM starts from (<out>/base, else the reference
    model itself). Returns {dtype: (steps whose selection changed, selected tokens that changed)}."""
    meta = rho.load_meta(data)
    start = os.path.join(out, "base" if os.path.isfile(os.path.join(out, "base", "ckpt.pt")) else "ref", "ckpt.pt")
    model = rho.model_from_checkpoint(rho.load_checkpoint(start, meta), None, start).eval()
    cfg = rho.RunConfig(data=data, out=out, k=k)
    ref, _ = rho.load_ref_scores(cfg, meta, model.config.block_size)
    web = rho.web_windows(cfg, meta, model.config.block_size, ref)
    hi = rho.web_split(web.n_windows, web.T)
    changed = {"float16": [0, 0], "bfloat16": [0, 0]}
    n_sel = 0
    for step in range(steps):
        x, y, r, _ = web.get(web.step_windows(step, batch_size, seed, hi), "cpu")
        loss = rho.model_token_loss(model, x, y)
        want = rho.select_tokens(loss, y, r, k)
        n_sel += int(want.sum())
        for dt, c in changed.items():
            got = rho.select_tokens(loss, y, r.to(getattr(torch, dt)).float(), k)
            c[0] += not torch.equal(got, want)
            c[1] += int((got & ~want).sum())
    print(f"score dtype: over {steps} steps of {batch_size} x {web.T} tokens from {start}, k {k}, "
          f"{n_sel:,} tokens selected in float32:")
    for dt, (s, t) in changed.items():
        print(f"  {dt}: the selection changed in {s} of {steps} steps; {t:,} selected tokens ({t / n_sel:.3%}) "
              f"swapped; 4 bytes a web token against float32's 8 (2 with --scores loss, L_RM alone)")
    return changed

def check_flags(args):
    """A device this machine lacks, and a --k that selects nothing, as one line each."""
    if not 0 < args.k <= 1:
        sys.exit(f"error: --k {args.k}: the share of tokens SLM selects must be in (0, 1], e.g. 0.6")
    if args.gpu and not torch.cuda.is_available() and args.device is None:
        sys.exit("error: --gpu: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine, "
                 "or add --device cpu to check its plan at toy sizes")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        sys.exit(f"error: --device {args.device}: {str(e).splitlines()[0]}; use cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: no CUDA device here (torch.cuda.is_available() is False): use "
                 "--device cpu")

def main(argv=None):
    p = argparse.ArgumentParser(description="rho's costs, side by side: the head, a step, scoring, tokenizing.",
                                allow_abbrev=False)
    p.add_argument("--cases", default="head,step", help=f"which of {','.join(CASES)} (default head,step)")
    p.add_argument("--gpu", action="store_true", help="the CUDA tests, the matmul ceiling, every head at GPT-2 small "
                   "and GPT-2 small's step with and without compile, in one call (see gpu())")
    p.add_argument("--device", help="cuda or cpu (default: cuda where there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--k", type=float, default=0.6)
    p.add_argument("--micro_batch", type=int, default=0, help="train: sequences of 1024 tokens per step")
    p.add_argument("--compile", action="store_true", help="train: also the torch.compile'd forms")
    p.add_argument("--rounds", type=int, default=5, help="train: measurements of each step, CLM and SLM interleaved")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="prepare: tokenizing processes")
    p.add_argument("--encoding", default="bytes", help="prepare: tiktoken encoding")
    p.add_argument("--json", default="bench.json", help="--gpu: where the rows go")
    p.add_argument("--estimate", choices=list(ARCH), help="memory, FLOPs and hours of a paper preset (estimates)")
    p.add_argument("--score_dtype", nargs=2, metavar=("DATA", "OUT"), help="how often float16 or bfloat16 reference "
                   "scores change the selection, on prepared data and its runs (after --base and --ref)")
    args = p.parse_args(argv)
    check_flags(args)
    if args.estimate:
        return estimate(args.estimate)
    if args.score_dtype:
        return score_dtype_change(*args.score_dtype)
    if args.gpu:
        return gpu(args)
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        sys.exit(f"error: --cases {args.cases}: choose from {','.join(CASES)}")
    dtype = ("bfloat16" if args.device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    rows = []
    if set(cases) - {"prepare"}:
        on_gpu = args.device.startswith("cuda")
        ceiling = matmul_ceiling(torch.device(args.device)) if on_gpu else None
        rows = measure(plan(cases, args.k, on_gpu, args.micro_batch, args.compile, args.rounds), args.device, dtype,
                       ceiling)
        table(rows, ceiling)
        train_summary(rows)
        scale_summary(rows)
        preset_time(rows, args.device)
    if "prepare" in cases:
        rows += bench_prepare(args.procs, args.encoding)
    return rows

if __name__ == "__main__":
    main()
