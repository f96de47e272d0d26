"""rho.py: Selective Language Modeling (SLM) from Rho-1, in one file.
Lin et al., "Not All Tokens Are What You Need for Pretraining", NeurIPS 2024 (arXiv 2404.07965).

Not every token of a web corpus is worth training on. A reference model (RM), trained on a small
high-quality corpus, scores every web token once: L_RM(x_i) = -log P_RM(x_i | x_<i). Continual
pretraining then puts the loss only on the step's top k share of tokens by excess loss (Sec. 2.2):

    L_Delta(x_i) = L_theta(x_i) - L_RM(x_i)
    I_k(x_i)     = 1 if x_i ranks in the top k of the step's tokens by L_Delta, else 0
    L_SLM        = -1/(N*k) * sum_i I_k(x_i) * log P_theta(x_i | x_<i)

Every token stays in the context; only the loss is masked. With k = 1 this is the plain causal LM
loss (CLM), the baseline.

The file reads top-down, in the paper's order:
  1. the SLM loss      token_loss, excess_loss, select_tokens, slm_loss (the plain reference)
  2. the fused head    the same loss from hidden states, never holding N x V logits
  3. the model         GPT-2, as nanoGPT writes it
  4. the data          windows of a token file; every run sees the same batches
  5. scoring           L_RM and H_RM of every web token, once (score_web)
  6. evaluation        held-out losses, answer accuracy
  7. training          the step (train_step), the loop (train), main
  ---- the machinery, below one marked boundary, where a student may stop reading: config and
  flags, models from checkpoints and transformers, processes (DDP, FSDP2), run folders and
  checkpoints, the reference scores' file, records.

The demo: python prepare.py; python rho.py --base; python rho.py --ref (then it scores web);
python rho.py --clm; python rho.py --slm --k 0.6; python rho.py --slm --k 0.6 --select random;
python report.py out
"""
import argparse
import gc
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
import traceback
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from prepare import (ANSWER, HASH_MAX, SEED_MAX, file_sha256, final_answer, from_hub, get_encoding,
                     load_meta, prepared_path, read_array, read_json, read_tokens, sha256_differs,
                     tokenizer_id_of, write_atomic, write_json)

# one code path for MKL's and PyTorch's CPU kernels on any AVX2 CPU: the same losses on any of them
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
# torchrun starts each process with RANK, WORLD_SIZE and LOCAL_RANK set; one process: 0, 1, 0
RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL = int(os.environ.get("LOCAL_RANK", 0))
# a target id that is never trained on and never selected
IGNORE = -1

def die(msg):
    sys.exit(f"error: {msg}")

# -----------------------------------------------------------------------------
# 1. The SLM loss (Sec. 2.2)

def token_loss(logits, targets):
    """L_theta(x_i) = -log P_theta(x_i | x_<i), fp32, shaped as targets; 0 where ignored."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="none")
    return loss.view(targets.shape)

def excess_loss(train_loss, ref_loss):
    """L_Delta(x_i) = L_theta(x_i) - L_RM(x_i), detached: the selection takes no gradient."""
    return train_loss.detach() - ref_loss

def n_select(k, n):
    """How many tokens I_k keeps of n: ceil(k * n), at least 1 where n >= 1 (n: a count or counts)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    # rounded to 6 decimals before the ceil: 0.07 * 100 is 7.000000000000001 in floats
    return torch.maximum(torch.ceil(torch.round(k * n * 1e6) / 1e6), (n > 0).double())

def rank_of(score, valid, scope):
    """Each token's place (0: the highest score) among the valid tokens of its group: the whole
    step (scope batch) or its row (scope sequence). A stable sort, not topk: ties go to the lower
    index, and each row may keep its own count."""
    shape = score.shape
    if scope == "batch":
        score, valid = score.reshape(1, -1), valid.reshape(1, -1)
    # invalid and NaN tokens sort last, below any valid score (a valid -inf is clamped above them)
    key = torch.where(valid & ~score.isnan(), score.clamp(min=-3e38), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    return order.argsort(-1).reshape(shape)

def select_topk(score, valid, k, scope="batch"):
    """I_k: the top ceil(k * n_valid) valid tokens by score; a NaN score is never selected."""
    valid = valid & ~score.isnan()
    n_valid = valid.sum() if scope == "batch" else valid.sum(-1, keepdim=True)
    return (rank_of(score, valid, scope) < n_select(k, n_valid)) & valid

REF_LOSS, REF_ENTROPY = 0, 1  # the reference scores' columns: L_RM(x_i), H_RM(x_i)

def token_score(select, loss, ref, valid, scope, gen):
    """What I_k ranks by, highest first (--select):
    excess       L_theta - L_RM, the paper's
    random       uniform noise: the control (the same k, random tokens)
    ref          the lowest L_RM (Table 3)
    entropy      the lowest H_RM (App. H)
    ref_entropy  the worse of a token's places by L_RM and by H_RM (App. H's intersection)
    train        the highest L_theta (no reference model)
    (sample, RHO-LOSS's whole sequences, is in select_tokens)"""
    if select == "excess":
        return excess_loss(loss, ref[..., REF_LOSS])
    if select == "random":
        return torch.rand(loss.shape, generator=gen).to(loss.device)
    if select == "ref_entropy":
        by_loss = rank_of(-ref[..., REF_LOSS], valid, scope)
        by_entropy = rank_of(-ref[..., REF_ENTROPY], valid, scope)
        worse = torch.maximum(by_loss, by_entropy)
        return (-worse.float()).masked_fill(ref.isnan().any(-1), float("nan"))
    if select == "ref":
        return -ref[..., REF_LOSS]
    if select == "entropy":
        return -ref[..., REF_ENTROPY]
    return loss.detach()

def select_tokens(loss, targets, ref, k, scope="batch", select="excess", gen=None):
    """I_k(x_i): which tokens carry the loss. k = 1: every valid token (CLM)."""
    valid = targets != IGNORE
    if k >= 1:
        return valid
    if select == "sample":
        # RHO-LOSS: whole sequences of the step, ranked by their mean excess loss
        excess = excess_loss(loss, ref[..., REF_LOSS]) * valid
        seq = excess.sum(-1) / valid.sum(-1).clamp(min=1)
        return select_topk(seq[None], valid.any(-1)[None], k)[0][:, None] & valid
    return select_topk(token_score(select, loss, ref, valid, scope, gen), valid, k, scope)

def slm_loss(logits, targets, ref, k, scope="batch", select="excess", gen=None):
    """L_SLM from full logits (B, T, V): the plain reference that the fused head must equal
    (test_fused_head_matches_the_reference). Returns (L_SLM, every token's loss, I_k)."""
    loss = token_loss(logits, targets)
    sel = select_tokens(loss, targets, ref, k, scope, select, gen)
    # -1/(N*k) sum_i: the mean over the selected tokens only
    return (loss * sel).sum() / sel.sum(), loss.detach(), sel

def select_step(loss, targets, ref, cfg, gen=None):
    """I_k over the whole step, however it is split over processes and micro-batches: each process
    gathers every token's loss (one all-gather), selects, and keeps its own rows.
    Returns (this process's I_k, how many tokens the step selected)."""
    sel = select_tokens(gather_rows(loss), gather_rows(targets), gather_rows(ref), cfg.k,
                        cfg.scope, cfg.select, gen)
    return sel[RANK * len(targets):(RANK + 1) * len(targets)], int(sel.sum())

# -----------------------------------------------------------------------------
# 2. The fused head: the loss from hidden states h (N, C) and the head weight w (V, C), never
# holding the N x V logits at once. It equals slm_loss in value and gradients: the tests
# test_fused_head_equals_plain_slm_loss, test_chunk_kernels_equal_float64_reference (Triton,
# PyTorch and float64 on every chunk mode) and test_fused_head_gradcheck_... hold them equal.
#   CLM (k = 1): one pass over chunks of rows computes a chunk's logits, its loss and at once the
#     gradients G = (softmax - onehot) / n, dH = G W, dW += G^T H: 6 N C V FLOPs, no recompute.
#   SLM: a no-grad pass gives every token's loss and log-sum-exp (2 N C V FLOPs); I_k is chosen
#     from those losses (select_step); the backward recomputes the selected rows' logits only:
#     (2 + 6k) N C V FLOPs in all (the paper's cost section).
# A chunk of fp32 logits has three modes, each a function of TORCH_OPS or TRITON_OPS: loss (loss,
# lse, entropy), loss_grad (CLM) and grad (SLM's backward). A gradient goes into dlogits, the
# GEMMs' buffer; for an fp32 head that is the logits' own memory, so it is computed in place.

def sub_onehot_(dlogits, y, row_scale):
    """dlogits[i, y_i] -= row_scale_i where y_i is not ignored."""
    valid = y != IGNORE
    rows = torch.arange(len(y), device=dlogits.device)[valid]
    dlogits[rows, y[valid]] -= row_scale[valid].to(dlogits.dtype)

def chunk_loss_torch(logits, y, entropy=False):
    """(loss, lse, entropy or None) per row, fp32; loss 0 where y is ignored. Without entropy,
    logits end as exp(logits - max), in place."""
    # ignored rows read column 0, then get loss 0
    logit_y = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    m = logits.amax(1, keepdim=True)
    z = logits.sub_(m)
    # exp(logits - max), in place unless the entropy still needs z
    e = z.exp() if entropy else z.exp_()
    s = e.sum(1)
    lse = m.squeeze(1) + s.log()
    ent = None
    if entropy:
        # H = sum_j p_j (lse - x_j): every term >= 0
        ent = (e * (s.log()[:, None] - z)).sum(1) / s
    return torch.where(y == IGNORE, 0.0, lse - logit_y), lse, ent

def chunk_loss_grad_torch(logits, y, scale, dlogits):
    """CLM: each row's loss, and (softmax - onehot) * scale into dlogits."""
    loss, _, _ = chunk_loss_torch(logits, y)
    row_scale = (y != IGNORE) * scale
    # logits now hold exp(logits - max): softmax * scale
    torch.mul(logits, (row_scale / logits.sum(1))[:, None], out=logits)
    sub_onehot_(logits, y, row_scale)
    # free where dlogits is logits: copy_ onto its own memory returns at once
    dlogits.copy_(logits)
    return loss

def chunk_grad_torch(logits, y, lse, scale, dlogits):
    """SLM's backward: (softmax - onehot) * scale into dlogits, given the forward's lse."""
    row_scale = (y != IGNORE) * scale
    logits.sub_(lse[:, None]).exp_().mul_(row_scale[:, None])
    sub_onehot_(logits, y, row_scale)
    dlogits.copy_(logits)

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _chunk_kernel(logits_ptr, dlogits_ptr, y_ptr, loss_ptr, lse_ptr, ent_ptr, scale_ptr,
                      stride_logits, stride_dlogits, V, BLOCK_V: tl.constexpr, LOSS: tl.constexpr,
                      GRAD: tl.constexpr, ENTROPY: tl.constexpr):
        """One row of a chunk: LOSS (loss, lse), ENTROPY, GRAD ((softmax - onehot) * scale)."""
        # int64: rows * stride can pass 2**31
        row = tl.program_id(0).to(tl.int64)
        row_ptr, y = logits_ptr + row * stride_logits, tl.load(y_ptr + row)
        if LOSS:
            # online log-sum-exp: the running sum rescaled to each new max
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.full([], 0.0, tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            # ignored rows read column 0, then get loss 0
            z_y = tl.load(row_ptr + tl.maximum(y, 0)).to(tl.float32)
            tl.store(loss_ptr + row, tl.where(y == -1, 0.0, lse - z_y))
            tl.store(lse_ptr + row, lse)
        else:
            lse = tl.load(lse_ptr + row)
        if ENTROPY:
            # scoring: a second pass, H = sum_j p_j (lse - x_j), every term >= 0
            ent = tl.full([], 0.0, tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                ent += tl.sum(tl.where(cols < V, tl.exp(z - lse) * (lse - z), 0.0), axis=0)
            tl.store(ent_ptr + row, ent)
        if GRAD:
            # CLM: in the same launch as the loss, while the row is in cache
            scale = tl.load(scale_ptr)
            drow_ptr = dlogits_ptr + row * stride_dlogits
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                d = tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)
                d = tl.where(y == -1, 0.0, d * scale).to(drow_ptr.dtype.element_ty)
                tl.store(drow_ptr + cols, d, mask=cols < V)

def launch_chunk_kernel(logits, y, dlogits, lse, scale, block_v, loss, grad, entropy):
    """One launch of _chunk_kernel, a program per row, logits read only: (loss, lse, entropy or
    None), fp32. block_v: the tests' small blocks."""
    assert logits.stride(1) == 1 and dlogits.stride(1) == 1, "rows must be contiguous"
    block = block_v or min(4096, triton.next_power_of_2(logits.shape[1]))
    out = torch.empty(3, len(logits), dtype=torch.float32, device=logits.device)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=logits.device).reshape(1)
    lse_t = out[1] if lse is None else lse
    _chunk_kernel[(len(logits),)](logits, dlogits, y, out[0], lse_t, out[2], scale_t,
                                  logits.stride(0), dlogits.stride(0), logits.shape[1],
                                  BLOCK_V=block, LOSS=loss, GRAD=grad, ENTROPY=entropy,
                                  num_warps=8 if block >= 2048 else 4)
    return out[0], out[1], out[2] if entropy else None

def chunk_loss_triton(logits, y, entropy=False, block_v=None):
    return launch_chunk_kernel(logits, y, logits, None, 0.0, block_v,
                               loss=True, grad=False, entropy=entropy)

def chunk_loss_grad_triton(logits, y, scale, dlogits, block_v=None):
    return launch_chunk_kernel(logits, y, dlogits, None, scale, block_v,
                               loss=True, grad=True, entropy=False)[0]

def chunk_grad_triton(logits, y, lse, scale, dlogits, block_v=None):
    launch_chunk_kernel(logits, y, dlogits, lse, scale, block_v, loss=False, grad=True, entropy=False)

class ChunkOps(NamedTuple):
    """One backend's math on a chunk of logits, a function per mode."""
    loss: Callable       # (logits, y, entropy) -> (loss, lse, entropy or None)
    loss_grad: Callable  # (logits, y, scale, dlogits) -> loss; the gradient into dlogits
    grad: Callable       # (logits, y, lse, scale, dlogits); the gradient into dlogits

TORCH_OPS = ChunkOps(chunk_loss_torch, chunk_loss_grad_torch, chunk_grad_torch)
TRITON_OPS = ChunkOps(chunk_loss_triton, chunk_loss_grad_triton, chunk_grad_triton)

def chunk_ops(device):
    return TRITON_OPS if device.type == "cuda" and triton is not None else TORCH_OPS

def chunk_rows(V, device):
    """Rows per chunk, a multiple of 64: 32 MB of fp32 logits on a CPU, 512 MB on a GPU."""
    return max(64, (2**27 if device.type == "cuda" else 2**23) // (-(-V // 64) * 64) // 64 * 64)

def chunk_buffers(n_rows, V, device, dtype):
    """(rows per chunk, the fp32 logits buffer, the gradient buffer in the GEMMs' dtype); each
    row padded to 64 columns, so rows stay aligned."""
    rows, width = chunk_rows(V, device), -(-V // 64) * 64
    logits = torch.empty(max(1, min(rows, n_rows)), width, device=device)[:, :V]
    if dtype == torch.float32:
        return rows, logits, logits
    return rows, logits, torch.empty(len(logits), width, dtype=dtype, device=device)[:, :V]

def mm_fp32(a, b, out):
    """out = a @ b in fp32: bf16 operands' products summed and stored in fp32, never rounded."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    # a CPU has no out_dtype GEMM: the same math on the operands made fp32
    return torch.mm(a.float(), b.float(), out=out)

def addmm_fp32_(dw, a, b):
    """dw += a @ b, summed in dw's fp32."""
    if a.dtype == torch.float32:
        return dw.addmm_(a, b)
    if a.is_cuda:
        return torch.addmm(dw, a, b, out_dtype=torch.float32, out=dw)
    return dw.addmm_(a.float(), b.float())

def head_dtype(h):
    """The head's GEMM dtype: autocast's (bf16; the head runs outside autocast, summing in fp32),
    else h's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype

class HeadOut(NamedTuple):
    """Per token, fp32, shaped as the targets."""
    loss: torch.Tensor            # -log P(x_i | x_<i); 0 where the target is ignored
    lse: torch.Tensor             # the logits' log-sum-exp: SLM's backward reads it
    entropy: torch.Tensor | None  # the softmax's entropy, for scoring (H_RM); else None

@torch.no_grad()
def head_losses(h, w, y, entropy=False):
    """Every token's HeadOut from h (B, T, C) and w (V, C), chunk by chunk, no gradient."""
    # autocast's dtype, read before the head leaves autocast
    dtype = head_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        hc, wc, yf = h.flatten(0, 1).to(dtype), w.to(dtype), y.flatten()
        rows, logits, _ = chunk_buffers(len(hc), len(wc), h.device, dtype)
        loss_fn = chunk_ops(h.device).loss
        out = torch.empty(3, len(hc), dtype=torch.float32, device=h.device)
        for i in range(0, len(hc), rows):
            c = len(hc[i:i + rows])
            chunk = mm_fp32(hc[i:i + c], wc.t(), logits[:c])
            out[0, i:i + c], out[1, i:i + c], ent = loss_fn(chunk, yf[i:i + c], entropy)
            if entropy:
                out[2, i:i + c] = ent
    return HeadOut(out[0].view(y.shape), out[1].view(y.shape),
                   out[2].view(y.shape) if entropy else None)

@torch.no_grad()
def head_loss_grad(h, w, y, dtype, scale):
    """CLM: every row's loss (N,) and the gradients of scale * sum(loss): (loss, dh, dw)."""
    hc, wc = h.to(dtype), w.to(dtype)
    (N, C), V = h.shape, w.shape[0]
    rows, logits, dlogits = chunk_buffers(N, V, h.device, dtype)
    loss_grad_fn = chunk_ops(h.device).loss_grad
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(hc)
    dw = torch.zeros(V, C, dtype=torch.float32, device=h.device)
    for i in range(0, N, rows):
        c = len(hc[i:i + rows])
        chunk = mm_fp32(hc[i:i + c], wc.t(), logits[:c])
        loss[i:i + c] = loss_grad_fn(chunk, y[i:i + c], scale, dlogits[:c])
        torch.mm(dlogits[:c], wc, out=dh[i:i + c])          # dH = G W
        addmm_fp32_(dw, dlogits[:c].t(), hc[i:i + c])       # dW += G^T H
    return loss, dh, dw

def first_derivative_only():
    """Both heads' backward: grad is enabled only under create_graph, where a second derivative
    through these constant gradients would be silently zero."""
    if torch.is_grad_enabled():
        raise RuntimeError("rho's fused head has no second derivative: call backward without "
                           "create_graph")

class FullHeadLoss(torch.autograd.Function):
    """CLM: (sum of every token's loss / n, every token's loss); the gradients come from the
    forward's one pass."""
    @staticmethod
    def forward(ctx, h, w, y, n, dtype):
        loss, dh, dw = head_loss_grad(h, w, y, dtype, 1.0 / n)
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(loss)
        return loss.sum() / n, loss

    @staticmethod
    def backward(ctx, grad, _token_loss_grad):
        first_derivative_only()
        dh, dw = ctx.saved_tensors
        return dh * grad, dw * grad, None, None, None

class SelectedHeadLoss(torch.autograd.Function):
    """SLM: the sum of the selected tokens' given losses / n; the backward recomputes the logits
    of the selected rows only."""
    @staticmethod
    def forward(ctx, h, w, y, loss, lse, sel, n, dtype):
        idx = sel.nonzero().squeeze(1)
        ctx.save_for_backward(h, w, y[idx], lse[idx], idx)
        ctx.n, ctx.dtype = n, dtype
        return loss[idx].sum() / n

    @staticmethod
    def backward(ctx, grad):
        first_derivative_only()
        h, w, y, lse, idx = ctx.saved_tensors
        hc, wc = h.to(ctx.dtype), w.to(ctx.dtype)
        rows, logits, dlogits = chunk_buffers(len(idx), w.shape[0], h.device, ctx.dtype)
        grad_fn = chunk_ops(h.device).grad
        dh = torch.zeros_like(hc)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=h.device)
        for i in range(0, len(idx), rows):
            r = idx[i:i + rows]
            hs, dchunk = hc[r], dlogits[:len(r)]
            chunk = mm_fp32(hs, wc.t(), logits[:len(r)])
            grad_fn(chunk, y[i:i + rows], lse[i:i + rows], grad / ctx.n, dchunk)
            dh[r] = dchunk @ wc
            addmm_fp32_(dw, dchunk.t(), hs)
        return dh, dw, None, None, None, None, None, None

def fused_clm_loss(h, w, targets, n):
    """CLM from h (B, T, C): (the sum of the losses / n, every token's loss (B, T)); n: the step's
    valid targets."""
    (B, T, C), dtype = h.shape, head_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        out, loss = FullHeadLoss.apply(h.reshape(-1, C), w, targets.reshape(-1), max(n, 1), dtype)
    return out, loss.view(B, T)

def selected_loss(h, w, targets, per_token, sel, n):
    """SLM's loss, given I_k (sel), n and per_token = head_losses(h, w, targets)."""
    dtype = head_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return SelectedHeadLoss.apply(h.flatten(0, 1), w, targets.flatten(),
                                      per_token.loss.flatten(), per_token.lse.flatten(),
                                      sel.flatten(), max(n, 1), dtype)

def fused_slm_loss(h, w, targets, ref, cfg, gen=None):
    """slm_loss(h @ w.T, targets, ref, cfg.k, ...) with I_k over the whole step, from h (B, T, C)
    and w (V, C), never holding B*T x V logits: (L_SLM, every token's loss, I_k)."""
    per_token = head_losses(h, w, targets)
    sel, n = select_step(per_token.loss, targets, ref, cfg, gen)
    return selected_loss(h, w, targets, per_token, sel, n), per_token.loss, sel

@torch.no_grad()
def model_token_loss(model, x, y, entropy=False):
    """Every token's loss (B, T), no gradient; with entropy: (loss, entropy)."""
    out = head_losses(model(x), model.lm_head.weight, y, entropy)
    return (out.loss, out.entropy) if entropy else out.loss

# -----------------------------------------------------------------------------
# 3. The model: GPT-2 as nanoGPT writes it (causal SDPA attention, tied embeddings). It returns
# hidden states; the loss applies the head (the fused head). HF, below the boundary, wraps a
# transformers causal LM the same way.

@dataclass
class GPTConfig:
    block_size: int = 64
    # the data's vocabulary, padded up to a multiple of 64 (GPT-2's own weights: exactly 50257)
    vocab_size: int = 320
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def qkv(self, x):
        """q, k, v, each (B, n_head, T, head size)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def forward(self, x):
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(x.shape))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def decode(self, x, mask, cache):
        """forward for generation: cache holds the keys and values of earlier positions."""
        q, k, v = self.attn.qkv(self.ln_1(x))
        if cache:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn.c_proj(y.transpose(1, 2).contiguous().view(x.shape))
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)

    def forward(self, idx):
        """Hidden states (B, T, C): the loss applies the head."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def decode(self, idx, pad, caches):
        """Generation's forward over the new tokens idx, rows left-padded by pad tokens, with a
        cache per block. A module method, so that FSDP gathers the weights for it."""
        T = idx.shape[1]
        past = caches[0][0].shape[2] if caches[0] else 0
        # every position so far: causal, the padding masked
        keys = torch.arange(past + T, device=idx.device)
        causal = keys[None, None] <= keys[-T:, None]
        mask = (causal & (keys[None, None] >= pad[:, None, None]))[:, None]
        pos = (keys[None, -T:] - pad[:, None]).clamp(min=0)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block, cache in zip(self.transformer.h, caches):
            x = block.decode(x, mask, cache)
        return self.transformer.ln_f(x)

# -----------------------------------------------------------------------------
# 4. The data: prepare.py's token files, cut into windows of T + 1 tokens. The batch order is a
# function of (seed, step) alone, so CLM, SLM and the control of one seed see the same batches.

class Batch(NamedTuple):
    x: torch.Tensor              # (B, T) inputs
    y: torch.Tensor              # (B, T) targets: x shifted by one
    ref: torch.Tensor            # (B, T, 2) the targets' L_RM and H_RM, fp32 (zeros if unread)
    labels: torch.Tensor | None  # (B, T) the demo's noise labels of the targets, for audits only

class Windows:
    """A token file's windows: window w holds tokens [w*T, w*T + T]. ref and labels: per token,
    the reference scores and the demo's noise labels, or None."""
    def __init__(self, tokens, T, ref=None, labels=None, name="tokens"):
        self.tokens, self.T, self.ref, self.labels, self.name = tokens, T, ref, labels, name
        self.order = None
        self.n_windows = (len(tokens) - 1) // T
        if self.n_windows < 1:
            die(f"{name}: {len(tokens)} tokens, fewer than one window of {T + 1}: use a smaller "
                "--block_size")

    def of_targets(self, a, ws, dtype, device):
        """Per-token values of a, aligned with the targets of windows ws."""
        rows = np.stack([a[w * self.T + 1:(w + 1) * self.T + 1] for w in ws])
        return torch.from_numpy(rows.astype(dtype)).to(device)

    def get(self, ws, device):
        """The Batch of windows ws."""
        rows = np.stack([self.tokens[w * self.T:(w + 1) * self.T + 1] for w in ws])
        if self.ref is None:
            ref = torch.zeros(len(ws), self.T, 2, device=device)
        else:
            ref = self.of_targets(self.ref, ws, np.float32, device)
        if ref.shape[-1] == 1:
            # scored with --scores loss: L_RM alone, H_RM NaN
            ref = F.pad(ref, (0, 1), value=math.nan)
        labels = None
        if self.labels is not None:
            labels = self.of_targets(self.labels, ws, self.labels.dtype, device)
        x = torch.from_numpy(rows.astype(np.int64)).to(device)
        return Batch(x[:, :-1], x[:, 1:], ref, labels)

    def step_windows(self, step, B, seed, n_train):
        """The step's B windows of the first n_train: each once an epoch, in an order drawn from
        (seed, epoch)."""
        if n_train // B < 1:
            die(f"{self.name}: {n_train} training windows of {self.T + 1} tokens, fewer than one "
                "batch: lower --batch_size")
        epoch, i = divmod(step, n_train // B)
        # one permutation an epoch, not one a step
        if self.order is None or self.order[0] != (seed, epoch, n_train):
            perm = np.random.default_rng([seed, epoch]).permutation(n_train)
            self.order = (seed, epoch, n_train), perm
        return self.order[1][i * B:(i + 1) * B]

    def step_batches(self, step, B, seed, device, n_train, per_forward):
        """This process's share of the step (the RANK-th), as Batches of per_forward windows."""
        share = B // WORLD
        ws = self.step_windows(step, B, seed, n_train)[RANK * share:(RANK + 1) * share]
        return [self.get(ws[i:i + per_forward], device) for i in range(0, share, per_forward)]

def token_windows(data, name, meta, T, ref=None, labels=None):
    return Windows(read_tokens(data, name, meta), T, ref, labels, os.path.join(data, name))

def web_split(n_windows, T):
    """Windows before it train; the rest is web val: 5%, at least 1, at most 32 or 8,192 tokens."""
    return n_windows - min(max(32, 8192 // T), max(1, n_windows // 20))

def web_windows(cfg, meta, T, ref=None):
    """web's windows with the reference scores (ref) and, on the demo, the noise labels."""
    labels = read_array(cfg.data, "web_labels.bin", meta, np.uint8) if "labels" in meta else None
    return token_windows(cfg.data, "web.bin", meta, T, ref, labels)

def training_windows(cfg, meta, T):
    """(The run's windows: base, hq or web with the reference scores; how many of them train; the
    reference model's sha256 or None)."""
    if cfg.mode in ("base", "ref"):
        if cfg.mode == "base" and "base" not in meta["tokens"]:
            die(f"{cfg.data} has no base corpus (only the embedded demo builds base.bin): start "
                "from your own base model with --init_from CKPT, or from scratch without it")
        data = token_windows(cfg.data, "base.bin" if cfg.mode == "base" else "hq_train.bin",
                             meta, T)
        n_train, ref_sha = data.n_windows, None
    else:
        ref, ref_sha = None, None
        if cfg.mode == "slm" and cfg.select not in ("random", "train"):
            ref, ref_sha = load_ref_scores(cfg, meta, T)
        data = web_windows(cfg, meta, T, ref)
        n_train = web_split(data.n_windows, T)
    # fewer than one batch: refused now, before the run's folder is taken
    data.step_windows(0, cfg.batch_size, cfg.seed, n_train)
    return data, n_train, ref_sha

# -----------------------------------------------------------------------------
# 5. Reference scoring (Sec. 2.2): one forward pass of the frozen reference model over every web
# token gives L_RM(x_i) and the entropy H_RM(x_i), once. Resumable: blocks of windows are marked
# done once on disk (start_scoring, below the boundary, makes and resumes the files).

def weights_sha256(model):
    """A model's fingerprint: a resumed scoring run must use the same reference model."""
    sha = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        sha.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()

@torch.no_grad()
def score_web(model, meta, cfg, run):
    """Writes <out>/<run>/ref_scores.bin: L_RM (and H_RM) of every web token, and its .json."""
    model.eval()
    web = token_windows(cfg.data, "web.bin", meta, model.config.block_size)
    path, T = os.path.join(cfg.out, run, "ref_scores.bin"), web.T
    info, block_done = start_scoring(path, len(web.tokens), T, web.n_windows, cfg, meta,
                                     weights_sha256(model))
    if info is None:
        return read_json(path + ".json")
    B = info["score_batch"]
    todo = [b for b in range(len(block_done)) if not block_done[b] and b % WORLD == RANK]
    dtype, n_cols = score_layout(info)
    t0 = t_sync = time.time()
    marks, n_scored = [], 0
    with open(path + ".partial", "r+b") as scores_file, open(path + ".done", "r+b") as marks_file:
        for i, b in enumerate(todo):
            # consecutive windows: their targets are consecutive tokens
            ws = range(b * B, min(b * B + B, web.n_windows))
            batch = web.get(ws, cfg.device)
            with autocast(cfg):
                scores = model_token_loss(model, batch.x, batch.y, entropy=n_cols == 2)
            scores = torch.stack(scores, -1) if n_cols == 2 else scores[..., None]
            os.pwrite(scores_file.fileno(), scores.float().cpu().numpy().astype(dtype).tobytes(),
                      n_cols * dtype.itemsize * (ws[0] * T + 1))
            marks.append(b)
            n_scored += len(ws) * T
            # every 30 s and at the end: the scores on disk first, then their marks
            if time.time() - t_sync > 30 or i == len(todo) - 1:
                os.fsync(scores_file.fileno())
                for m in marks:
                    os.pwrite(marks_file.fileno(), b"\x01", m)
                os.fsync(marks_file.fileno())
                marks, t_sync = [], time.time()
                if RANK == 0 and len(todo) > 1:
                    rate = n_scored / (t_sync - t0)
                    print(f"score: {i + 1}/{len(todo)} blocks, {rate:,.0f} tok/s, eta "
                          f"{(len(todo) - i - 1) * B * T / rate:.0f}s", file=sys.stderr, flush=True)
    elapsed = time.time() - t0
    # waits for every process (NCCL sums GPU tensors only)
    n_scored = int(sum_ranks(torch.tensor(n_scored, device=cfg.device)))
    info.update(encoding=meta["encoding"], data=cfg.data, score_s=round(elapsed, 2),
                score_tok_s=round(n_scored / max(elapsed, 1e-9)), processes=WORLD, dtype=cfg.dtype)
    if RANK == 0:
        finish_scoring(path, info, cfg, run)
        print(f"score: {n_scored:,} web tokens in {elapsed:.1f}s ({info['score_tok_s']:,} tok/s"
              f"{f' over {WORLD} processes' if WORLD > 1 else ''}) -> {path}")
    return info

# -----------------------------------------------------------------------------
# 6. Evaluation: the loss on held-out hq (the target distribution) and on web's val windows, and
# answer accuracy on held-out problems (greedy generation, the final answer matched exactly)

class EvalSets(NamedTuple):
    hq: Windows        # hq_val.bin
    web: Windows       # web.bin, with the reference scores where the run read them
    web_val: list      # web's val windows (web_split)
    problems: list     # eval.json: prompt, answer, solution
    max_new: int       # new tokens an answer gets (None without problems)
    enc: object        # the data's tokenizer

def eval_sets(cfg, meta, web):
    T = web.T
    problems = read_problems(cfg, meta, T)
    enc = get_encoding(meta["encoding"])
    longest = max((len(enc.encode_ordinary(p["solution"])) for p in problems), default=0)
    # an answer gets twice the longest reference solution and 16 (a model may write more than the
    # reference; a settled answer stops its row), within the half of the context it is left
    max_new = min(T // 2, 2 * longest + 16) if problems else None
    if longest + 1 > T // 2 and RANK == 0:
        print(f"note: {os.path.join(cfg.data, 'eval.json')}: reference answers of up to {longest} "
              f"tokens, but a context of {T} leaves answers {T // 2}: longer ones are cut short (a "
              "larger --block_size fits them)", file=sys.stderr)
    hq = token_windows(cfg.data, "hq_val.bin", meta, T)
    web_val = list(range(web_split(web.n_windows, T), web.n_windows))
    return EvalSets(hq, web, web_val, problems, max_new, enc)

@torch.no_grad()
def generate(model, prompts, max_new, stop=None):
    """Greedy continuations of the prompts, left-padded into one batch, until stop(a row's new
    tokens) holds for every row. A prompt keeps at most the context's first half, its answer the
    rest, whatever max_new: the same prompts always."""
    T, device = model.config.block_size, model.lm_head.weight.device
    max_new, prompts = min(max_new, T // 2), [p[-(T - T // 2):] for p in prompts]
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)
    caches, new, ended = [[] for _ in range(model.config.n_layer)], [], [False] * len(prompts)
    h = model.decode(idx, pad, caches)
    for _ in range(max_new):
        new.append(model.lm_head(h[:, -1]).argmax(-1))
        # the batch keeps its shape to the end, so stopping early changes no token
        if stop is not None:
            rows = torch.stack(new, 1).tolist()
            ended = [e or stop(row) for e, row in zip(ended, rows)]
            if all(ended):
                break
        h = model.decode(new[-1][:, None], pad, caches)
    return torch.stack(new, 1).tolist()

def answer_settled(text):
    """Whether text's final answer is settled: a line has ended after it."""
    m = ANSWER.search(text)
    return m is not None and "\n" in text[m.end():]

def answers(model, problems, enc, max_new):
    """1 or 0 per problem: whether the final answer of its greedy continuation is its answer."""
    def text(ids):
        # up to the end-of-text token; padded ids (beyond the vocabulary) dropped
        ids = ids[:ids.index(enc.eot_token)] if enc.eot_token in ids else ids
        return enc.decode([t for t in ids if t < enc.n_vocab])
    # what follows either cannot change the answer
    settled = lambda ids: enc.eot_token in ids or answer_settled(text(ids))
    prompts = [[enc.eot_token] + enc.encode_ordinary(p["prompt"]) for p in problems]
    outs = []
    for i in range(0, len(prompts), 64):
        outs += generate(model, prompts[i:i + 64], max_new, settled)
    return [int(final_answer(text(o)) == p["answer"]) for p, o in zip(problems, outs)]

def accuracy(correct):
    """The share answered right; None: not measured (--eval_problems 0)."""
    return round(sum(correct) / len(correct), 4) if correct else None

def percent(accuracy):
    return "-" if accuracy is None else f"{accuracy:.1%}"

@torch.no_grad()
def evaluate(model, ev, cfg, final=False):
    """(measures, per-token records for tokens.npz). The final evaluation answers every problem."""
    model.eval()
    # web_split keeps web's val windows to one batch
    web = ev.web.get(ev.web_val, cfg.device)
    web_loss = model_token_loss(model, web.x, web.y)
    n_web = int((web.y != IGNORE).sum())
    # hq val: its first 128 windows, or 32k tokens
    hq_val = list(range(min(ev.hq.n_windows, max(128, 32768 // ev.hq.T))))
    hq_sum, n_hq = 0.0, 0
    for i in range(0, len(hq_val), 32):
        hq = ev.hq.get(hq_val[i:i + 32], cfg.device)
        hq_sum += model_token_loss(model, hq.x, hq.y).sum().item()
        n_hq += int((hq.y != IGNORE).sum())
    problems = ev.problems if final else ev.problems[:cfg.eval_problems]
    correct = answers(model, problems, ev.enc, ev.max_new)
    measures = {"val_loss_hq": round(hq_sum / n_hq, 4),
                "val_loss_web": round(web_loss.sum().item() / n_web, 4),
                "accuracy": accuracy(correct[:cfg.eval_problems])}
    if final and correct:
        measures["correct"] = correct
    # the records: 8 hq windows' token losses, web val's, and what the run's I_k selects there
    hq = ev.hq.get(range(min(ev.hq.n_windows, 8)), cfg.device)
    # its own RNG: the training RNG stays untouched
    gen = torch.Generator().manual_seed(cfg.seed)
    sel = select_tokens(web_loss, web.y, web.ref, cfg.k, cfg.scope, cfg.select, gen)
    records = {"hq": model_token_loss(model, hq.x, hq.y).half().cpu(), "web": web_loss.half().cpu(),
               "sel": sel.cpu()}
    return measures, records

# -----------------------------------------------------------------------------
# 7. Training: the base model (the demo's), the reference model (CLM on hq), continual pretraining
# (CLM or SLM on web). One loop for all: with k = 1 every token carries the loss.

def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

def adamw(model, cfg):
    """Weight decay on matrices and embeddings, not on biases and LayerNorm gains (nanoGPT)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

def micro_batch_selection(model, fwd, batches, cfg, gen):
    """SLM over micro-batches: I_k needs every token's loss of the step before the first backward,
    so a no-grad forward computes them. Returns (I_k of each batch, how many the step selected)."""
    y, ref = torch.cat([b.y for b in batches]), torch.cat([b.ref for b in batches])
    # a rule that reads no training loss needs no forward
    if cfg.select in ("excess", "train", "sample"):
        with torch.no_grad(), autocast(cfg):
            loss = torch.cat([head_losses(fwd(b.x), model.lm_head.weight, b.y).loss
                              for b in batches])
    else:
        loss = torch.zeros(y.shape, device=y.device)
    sel, n_sel = select_step(loss, y, ref, cfg, gen)
    return list(sel.split(len(batches[0].y))), n_sel

def train_step(model, fwd, batches, cfg, gen):
    """The gradients of the step's loss, the mean over its selected tokens (CLM: all of them),
    however it is split: batches are this process's micro-batches. model is the module; fwd its
    forward as trained (compiled, DDP). Returns (the step's loss, I_k of each batch)."""
    if cfg.k == 1:
        # every valid token carries the loss (--slm --k 1 too)
        sels = [b.y != IGNORE for b in batches]
        n_sel = int(sum_ranks(sum(s.sum() for s in sels)))
    elif len(batches) > 1:
        sels, n_sel = micro_batch_selection(model, fwd, batches, cfg, gen)
    losses = []
    for i, b in enumerate(batches):
        # gradients are reduced across processes after the last micro-batch only
        set_gradient_sync(model, fwd, cfg, sync=WORLD == 1 or i == len(batches) - 1)
        with autocast(cfg):
            # the head weight is read after the forward: FSDP gathers it there
            h, w = fwd(b.x), model.lm_head.weight
            if cfg.k == 1:
                loss, token_losses = fused_clm_loss(h, w, b.y, n_sel)
            elif len(batches) == 1:
                # the whole step in one forward: I_k from its own token losses
                loss, token_losses, sel = fused_slm_loss(h, w, b.y, b.ref, cfg, gen)
                sels = [sel]
            else:
                per_token = head_losses(h, w, b.y)
                loss = selected_loss(h, w, b.y, per_token, sels[i], n_sel)
                token_losses = per_token.loss
        # DDP and FSDP average the gradients over processes, but n_sel counts every process's
        # tokens: summed instead
        (loss * WORLD).backward()
        # a NaN in any token's loss stops the run, even where SLM selected none of them
        losses.append(torch.where(token_losses.isfinite().all(), loss.detach(), float("nan")))
    return sum_ranks(torch.stack(losses).sum()), sels

def train(cfg, shape):
    """One run: --base, --ref (then it scores web), --clm or --slm. Returns its metrics."""
    meta, name = load_meta(cfg.data), run_name(cfg)
    out_dir = os.path.join(cfg.out, name)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    old_files = earlier_run(out_dir, cfg)
    per_forward = sequences_per_forward(cfg)
    model = build_model(cfg, meta, shape)
    T = model.config.block_size
    data, n_train, ref_sha = training_windows(cfg, meta, T)
    ev = eval_sets(cfg, meta, data if cfg.mode in ("clm", "slm") else web_windows(cfg, meta, T))
    # the random control's selection noise: the same on every process
    gen = torch.Generator().manual_seed(cfg.seed)
    # the demo's audit: web tokens seen and selected, per noise label
    n_labels = len(meta["labels"]) if "labels" in meta and cfg.mode in ("clm", "slm") else 0
    progress = Progress(weights_sha256(model), ref_sha, by_label=[[0] * n_labels, [0] * n_labels])
    model = checkpoint_and_shard(model, cfg)
    opt = adamw(model, cfg)
    start = 0
    if cfg.resume and os.path.isfile(ckpt_path):
        start, progress = resume(ckpt_path, model, opt, gen, cfg, meta, ref_sha)
    if RANK == 0:
        take_run_folder(out_dir, old_files, cfg)
        print_run(cfg, name, model, T, per_forward, start)
    fwd = forward_as_trained(model, cfg)
    t_last, last_eval, loss_sum = time.time(), start, 0.0
    counts = torch.zeros(2, n_labels, dtype=torch.long, device=cfg.device)
    for step in range(start, cfg.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batches = data.step_batches(step, cfg.batch_size, cfg.seed, cfg.device, n_train,
                                    per_forward)
        opt.zero_grad(set_to_none=True)
        loss, sels = train_step(model, fwd, batches, cfg, gen)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        stop_if_not_finite(loss, norm, step, name, cfg, progress, ckpt_path)
        opt.step()
        progress.tokens_seen += cfg.batch_size * T
        progress.tokens_trained += int(sum_ranks(sum(s.sum() for s in sels)))
        progress.losses.append(loss.item())
        loss_sum += progress.losses[-1]
        if n_labels:
            count_labels(counts, batches, sels)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            t_eval = time.time()
            progress.wall_s += t_eval - t_last
            if n_labels:
                # every process counted its own share
                sum_ranks(counts)
            # under FSDP every process takes part in the evaluation's forwards and the save
            if RANK == 0 or cfg.fsdp:
                with autocast(cfg):
                    measures, records = evaluate(model, ev, cfg, step + 1 == cfg.steps)
                states = save_states(model, opt, cfg, ckpt_path, step + 1)
            if RANK == 0:
                measures["eval_s"] = round(time.time() - t_eval, 2)
                n_steps, dt = step + 1 - last_eval, t_eval - t_last
                line = log_evaluation(progress, step + 1, loss_sum / n_steps, measures, records,
                                      counts.tolist(), meta.get("labels"))
                save_checkpoint(ckpt_path, model, states, gen, step + 1, cfg, meta, progress)
                print(f"{name} {line} | {n_steps * cfg.batch_size * T / dt / 1000:.1f}k tok/s | "
                      f"eta {(cfg.steps - step - 1) * dt / n_steps:.0f}s", flush=True)
            t_last, last_eval, loss_sum = time.time(), step + 1, 0.0
            counts.zero_()
    extra = {"eval_problems": len(ev.problems[:cfg.eval_problems]), "answer_tokens": ev.max_new}
    if cfg.mode == "ref":
        # every process scores its share; under FSDP each with the whole model, from ckpt.pt
        if cfg.fsdp:
            dist.barrier()
            model = model_from_checkpoint(load_checkpoint(ckpt_path), None, ckpt_path)
            model = model.to(cfg.device)
        info = score_web(model, meta, cfg, name)
        extra.update(score_s=info["score_s"], score_tok_s=info["score_tok_s"])
    if RANK == 0:
        write_token_losses(os.path.join(out_dir, "tokens.npz"), progress, ev)
        return write_metrics(cfg, meta, name, progress, out_dir, model, extra)

def main(argv=None):
    cfg, shape = parse_args(argv)
    # the folders this command may make: a failed one removes those it made that are still empty
    made = [d for d in (os.path.join(cfg.out, run_name(cfg)), cfg.out) if not os.path.exists(d)]
    # one of torchrun's processes (--fsdp on one too: a resume on fewer)
    if WORLD > 1 or cfg.fsdp:
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    # SIGTERM stops a run as Ctrl-C does (stopped)
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if WORLD > 1:
            same_flags_on_every_process(cfg, shape)
        return train(cfg, shape) if cfg.mode != "score" else score_again(cfg)
    except OSError as e:
        # a full disk or a lost folder mid-run: finished blocks and checkpoints are kept
        again = "the same command again" if cfg.mode == "score" else "again with --resume"
        die(f"{e.filename or cfg.out}: {e.strerror or e}: free space or fix the folder, then run "
            f"{again}")
    except KeyboardInterrupt as e:
        stopped(cfg, e)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        if RANK == 0:
            unlock(os.path.join(cfg.out, run_name(cfg)))
            for d in made:
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)
        # free DDP's reference cycles first: a gloo group left at interpreter exit can abort
        if dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()

# =============================================================================
# The machinery: everything below serves the method above. A student may stop reading here.
# config and flags; models from checkpoints and transformers; processes (DDP, FSDP2); run
# folders, checkpoints and resume; the reference scores' file; records.
# =============================================================================

# -----------------------------------------------------------------------------
# config: every flag, its default and help, in one place (parse_args assembles a run's config)

def option(default, text):
    """A RunConfig field: its default and its --help."""
    return field(default=default, metadata={"help": text})

@dataclass
class RunConfig:
    """A run's config; every field but mode is a flag. --base, --ref and --clm read k = 1 and
    select "all": every token carries the loss. --score reads only what MODE_FLAGS names."""
    mode: str = "slm"
    data: str = option("data/demo", "prepared data folder")
    out: str = option("out", "runs folder")
    name: str = option("", "run name (default: base, ref, clm, slm-k0.6, ...)")
    ref_run: str = option("ref", "--slm: the reference run whose scores it reads")
    steps: int = option(1200, "optimizer steps (the demo: --ref 2000, --clm and --slm 4500)")
    batch_size: int = option(16, "sequences per step")
    lr: float = option(3e-3, "peak learning rate (warmup, then cosine to 10%%)")
    warmup: int = option(20, "steps of linear warmup (default 20, or a preset's, but at most a "
                         "tenth of --steps)")
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices and embeddings")
    grad_clip: float = option(1.0, "gradient norm clip")
    k: float = option(0.6, "--slm: the share of tokens selected, in (0, 1]")
    select: str = option("excess", "--slm: what I_k ranks by (token_score): excess is the "
                         "paper's, random the control")
    scope: str = option("batch", "top-k over every token of the step (batch) or within each "
                        "sequence")
    seed: int = option(1337, "seed of the model init, batch order and random selection")
    micro_batch: int = option(0, "sequences per forward on each process (the top-k still spans "
                              "the step); 0: all")
    dtype: str = option("auto", "autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    compile: bool = option(False, "torch.compile the model's forward")
    fsdp: bool = option(False, "under torchrun, shard weights, gradients and AdamW's state "
                        "(FSDP2), not DDP")
    act_ckpt: bool = option(False, "recompute each block's activations in the backward (less "
                            "memory, more compute)")
    score_batch: int = option(64, "windows per forward when scoring")
    score_dtype: str = option("float32", "--ref, --score: the scores' dtype, float32 or float16")
    scores: str = option("loss,entropy", "--ref, --score: what is stored of each web token: L_RM "
                         "and H_RM, or loss (L_RM alone, half the file: --select entropy and "
                         "ref_entropy read H_RM)")
    eval_every: int = option(100, "steps between evaluations and checkpoints")
    eval_problems: int = option(200, "held-out problems for answer accuracy")
    init_from: str = option("", "a run in --out (the demo's default: base), a ckpt.pt, scratch, "
                            "or a transformers causal LM: hf:NAME (hf:gpt2, ...) or a "
                            "save_pretrained directory")
    preset: str = option("demo", "defaults for every flag it names (PRESETS); flags given "
                         "explicitly win; '' for none")
    resume: bool = option(False, "continue <out>/<name>/ckpt.pt where it stopped")
    overwrite: bool = option(False, "replace an earlier run of this name (a finished run is "
                             "otherwise refused)")
    device: str = option("cpu", "cpu, cuda or cuda:N")

# --preset NAME: defaults for every flag it names (explicit flags win); {mode: value}: one per mode
PRESETS = {
    # the demo: the reference model past its accuracy transition; continual pretraining 2.25x its
    # tokens (the paper: 10x)
    "demo": {"eval_every": 200, "steps": {"ref": 2000, "clm": 4500, "slm": 4500}},
    # the paper's setting at small scale: GPT-2 124M; the reference model 315M tokens (3 epochs of
    # ~100M hq), continual pretraining 1.05B
    "gpt2-owm": {"init_from": "hf:gpt2", "block_size": 1024, "batch_size": 512, "micro_batch": 32,
                 "warmup": 100, "eval_every": 250, "eval_problems": 200, "compile": True, "k": 0.6,
                 "steps": {"ref": 600, "clm": 2000, "slm": 2000},
                 "lr": {"ref": 1e-4, "clm": 1e-4, "slm": 1e-4}},
    # the paper's own runs (Sec. 3): 15B web tokens in steps of ~1M, the reference model 3 epochs
    # of 0.5B hq tokens
    "tinyllama-owm": {"init_from": "hf:TinyLlama/TinyLlama_v1.1", "block_size": 2048,
                      "batch_size": 512, "k": 0.6, "micro_batch": 8, "warmup": 200,
                      "eval_every": 500, "fsdp": True,
                      "steps": {"ref": 1431, "clm": 14305, "slm": 14305},
                      "lr": {"ref": 5e-5, "clm": 8e-5, "slm": 8e-5}},
    "mistral-owm": {"init_from": "hf:mistralai/Mistral-7B-v0.1", "block_size": 4096,
                    "batch_size": 256, "k": 0.7, "micro_batch": 2, "warmup": 200,
                    "eval_every": 500, "fsdp": True,
                    "steps": {"ref": 1431, "clm": 14305, "slm": 14305},
                    "lr": {"ref": 1e-5, "clm": 2e-5, "slm": 2e-5}}}

MODES = {"base": "train a base model on the general corpus (base.bin; the demo has one)",
         "ref": "train the reference model on hq, then score every web token with it",
         "score": "score the web tokens again with an existing reference model (--name, "
                  "default ref)",
         "clm": "continual pretraining on web, loss on every token (the baseline)",
         "slm": "continual pretraining on web with the SLM loss (--k, --select, --scope)"}
CHOICES = {"select": ("excess", "random", "ref", "entropy", "ref_entropy", "train", "sample"),
           "preset": ("", *PRESETS), "scope": ("batch", "sequence"),
           "dtype": ("auto", "float32", "bfloat16"), "score_dtype": ("float32", "float16"),
           "scores": ("loss,entropy", "loss")}

# the flags each mode reads beyond --data, --out and --device; any other flag given is refused
SHAPE = ("block_size", "n_layer", "n_head", "n_embd")
SLM_FLAGS = {"k", "select", "scope", "ref_run"}
SCORE_FLAGS = {"score_batch", "score_dtype", "scores"}
PLACE_FLAGS = {"data", "out", "device"}
RUN_FLAGS = {f.name for f in fields(RunConfig)} - SLM_FLAGS - SCORE_FLAGS - PLACE_FLAGS - {"mode"}
RUN_FLAGS |= set(SHAPE)
MODE_FLAGS = {"base": RUN_FLAGS, "ref": RUN_FLAGS | SCORE_FLAGS, "clm": RUN_FLAGS,
              "slm": RUN_FLAGS | SLM_FLAGS, "score": {"name", "dtype", "overwrite"} | SCORE_FLAGS}

def parse_args(argv=None):
    """(RunConfig, GPTConfig of the shape flags given, None where not): defaults, then the
    preset's, then the flags given, then what the mode implies."""
    p = argparse.ArgumentParser(description="Selective Language Modeling (Rho-1): the reference "
                                "model, scoring, SLM and CLM continual pretraining.",
                                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.error = lambda msg: die(f"{msg} (python rho.py --help lists the flags; abbreviations of "
                              "them are not accepted)")
    job = p.add_mutually_exclusive_group(required=True)
    for mode, text in MODES.items():
        job.add_argument(f"--{mode}", action="store_true", help=text)
    d = RunConfig(device="cuda" if torch.cuda.is_available() else "cpu")
    for f in fields(RunConfig)[1:]:
        v = getattr(d, f.name)
        if isinstance(v, bool):
            # --compile and --no-compile: a preset's True can be turned off
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                           help=f.metadata["help"])
        else:
            # shown as {a|b}: a choice may hold a comma (--scores loss,entropy)
            choices = CHOICES.get(f.name)
            shown = choices and "{" + "|".join(c or "''" for c in choices) + "}"
            p.add_argument(f"--{f.name}", type=type(v), choices=choices, metavar=shown,
                           help=f.metadata["help"] + (f" (default {v})" if v else ""))
    for key in SHAPE:
        p.add_argument(f"--{key}", type=int, help=f"model {key} (default {getattr(GPTConfig, key)};"
                       " a run that starts from a checkpoint or GPT-2 takes its shape, its context "
                       "cropped to --block_size)")
    # only the flags given (no parser defaults): they win over a preset's
    given = vars(p.parse_args(argv))
    mode = next(m for m in MODES if given.pop(m, False))
    preset = {}
    for key, v in PRESETS.get(given.get("preset", d.preset), {}).items():
        if not isinstance(v, dict):
            preset[key] = v
        elif mode in v:
            preset[key] = v[mode]
    a = argparse.Namespace(**{**asdict(d), **dict.fromkeys(SHAPE), **preset, **given})
    # a default (or a preset's) warmup is at most a tenth of the run
    if "warmup" not in given:
        a.warmup = min(a.warmup, a.steps // 10)
    check_flags(a, mode, set(given))
    # what the mode implies: every token carries the loss but in --slm
    if mode != "slm":
        a.k, a.select = 1.0, "all"
    if a.dtype == "auto":
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    # each of torchrun's processes drives its own GPU
    if (WORLD > 1 or a.fsdp) and a.device.startswith("cuda"):
        a.device = f"cuda:{LOCAL}"
    # on the demo, runs start from the base run, as the paper's models start from one base
    if not a.init_from and mode not in ("base", "score") and has_base_corpus(a.data):
        a.init_from = "base"
    cfg = RunConfig(**{f.name: getattr(a, f.name) for f in fields(RunConfig)[1:]}, mode=mode)
    return cfg, GPTConfig(**{key: getattr(a, key) for key in SHAPE})

def has_base_corpus(data):
    """Whether prepared data holds base.bin (the demo's); False if it is not readable yet."""
    try:
        return "base" in read_json(os.path.join(data, "meta.json"))["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return False

def check_flags(a, mode, given):
    """Bad values, and flags the mode ignores: one line each, before anything runs."""
    ignored = sorted(given - MODE_FLAGS[mode] - PLACE_FLAGS)
    if ignored:
        them = "them" if len(ignored) > 1 else "it"
        whose = ""
        if set(ignored) <= SLM_FLAGS:
            whose = " (--slm's flags)"
        elif set(ignored) <= SCORE_FLAGS:
            whose = " (--ref's and --score's flags)"
        die(f"{' '.join('--' + f for f in ignored)}: --{mode} does not read {them}{whose}; "
            f"drop {them}")
    # '' would name the current folder (and break every command that quotes it)
    if not a.data.strip():
        die(f"--data {a.data!r}: empty: name a prepared data folder (default data/demo)")
    if not a.ref_run.strip():
        die(f"--ref_run {a.ref_run!r}: empty: name a reference run in --out (default ref)")
    if not 0 < a.k <= 1:
        die(f"--k {a.k}: k is the share of tokens selected and must be in (0, 1], e.g. --k 0.6")
    shape = [(key, 1) for key in SHAPE if getattr(a, key) is not None]
    for key, at_least in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("score_batch", 1),
                          ("lr", 1e-30), ("grad_clip", 1e-30), ("micro_batch", 0), ("warmup", 0),
                          ("weight_decay", 0), ("eval_problems", 0), ("seed", 0), *shape):
        v = getattr(a, key)
        # NaN fails every comparison
        if not v >= at_least or v == math.inf:
            die(f"--{key} {v}: must be {'0 or more' if at_least == 0 else 'positive'}"
                + (" and finite" if isinstance(v, float) else ""))
    if a.seed > SEED_MAX:
        die(f"--seed {a.seed}: must be at most {SEED_MAX}")
    if not a.out:
        die("--out '': give the runs' folder (default out; '.' for the current folder)")
    # a run is a folder right in --out: a name, not a path ('' is --name's default)
    for key in ("name", "ref_run"):
        v = getattr(a, key)
        if v in (".", "..") or "/" in v or os.sep in v or len(v) > 100:
            die(f"--{key} {v[:40]!r}{'...' * (len(v) > 40)}: a run's name in --out: at most 100 "
                "characters, no path separators, not '.' or '..'")
    if a.warmup >= a.steps and mode != "score":
        die(f"--warmup {a.warmup}: must be fewer than --steps {a.steps}, or the LR never reaches "
            "--lr")
    if a.fsdp and "RANK" not in os.environ:
        die("--fsdp: shards the model across torchrun's processes: run under torchrun "
            "--nproc_per_node N")
    if a.resume and a.overwrite:
        die("--resume --overwrite: continue the earlier run or replace it, not both; drop one")
    if a.select == "sample" and a.scope != "batch":
        die("--select sample ranks whole sequences of the step: it has no --scope sequence; drop "
            "--scope")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        die(f"--device {a.device}: rho runs on cpu, cuda or cuda:N")
    if a.device != "cpu" and not torch.cuda.is_available():
        die(f"--device {a.device}: this torch sees no CUDA GPU ({torch.__version__}); use --device "
            "cpu")

def run_name(cfg):
    """base, ref, clm, slm-k0.6[-select][-scope]: the default of --name."""
    if cfg.name:
        return cfg.name
    if cfg.mode != "slm":
        return "ref" if cfg.mode == "score" else cfg.mode
    rule = "" if cfg.select == "excess" else f"-{cfg.select}"
    rule += "" if cfg.scope == "batch" else f"-{cfg.scope}"
    return f"slm-k{cfg.k:g}{rule}"

def command(mode, cfg, **flags):
    """A rho.py command line that runs as is: --mode, --name, cfg's --data, --out and --device,
    then flags; a flag at its default (None, False) is left out."""
    default = {**asdict(RunConfig()), "dtype": "bfloat16" if cfg.device.startswith("cuda")
               else "float32"}
    given = {"name": flags.pop("name", None), "data": cfg.data, "out": cfg.out,
             "device": cfg.device, **flags}
    words = [f"--{key}" + ("" if v is True else f" {shlex.quote(str(v))}")
             for key, v in given.items() if v is not None and v is not False
             and v != default.get(key)]
    return f"`python rho.py {' '.join([f'--{mode}', *words])}`"

def saved_flags(ckpt, mode):
    """The flags of a checkpoint's run that --mode reads; its shape where it was its own."""
    flags = {key: v for key, v in ckpt["config"].items()
             if key in MODE_FLAGS[mode] - {"resume", "overwrite"}}
    own = flags.get("init_from") in ("", "scratch")
    shape = {key: v for key, v in ckpt["model_config"].items()
             if key == "block_size" or own and key in SHAPE}
    return {**flags, **shape}

# -----------------------------------------------------------------------------
# models: from scratch, from a run's checkpoint, or a transformers causal LM (HF)

class HF(nn.Module):
    """A transformers causal LM as our GPT: forward gives hidden states, lm_head the head."""
    def __init__(self, hf, block_size, source):
        super().__init__()
        c, self.hf = hf.config, hf
        # the default context: the model's, at most the paper's 2048
        T = block_size or min(c.max_position_embeddings, 2048)
        if T > c.max_position_embeddings:
            die(f"--block_size {T}: {source} has {c.max_position_embeddings} positions; pass "
                f"--block_size {c.max_position_embeddings} or less")
        self.config = GPTConfig(T, self.lm_head.weight.shape[0], c.num_hidden_layers,
                                c.num_attention_heads, c.hidden_size)
        # the head must be h @ W.T: no soft-capping or scale in the config (Gemma 2, Cohere,
        # Granite, Falcon-H1), even where random weights give small logits; then probed (a head
        # bias, a scale under another name)
        scaled = [f"{key} {getattr(c, key)}" for key, plain in
                  (("final_logit_softcapping", None), ("logit_scale", 1), ("logits_scaling", 1),
                   ("lm_head_multiplier", 1)) if getattr(c, key, None) not in (None, plain)]
        with torch.no_grad():
            idx = torch.arange(8)[None] % self.config.vocab_size
            plain = torch.allclose(hf(idx).logits, self(idx) @ self.lm_head.weight.t(),
                                   rtol=1e-4, atol=1e-4)
        if scaled or not plain:
            why = ", ".join(scaled) if scaled else "logit soft-capping, scaling or a head bias"
            die(f"--init_from {source}: its logits are not a plain linear map of its final hidden "
                f"states ({why}): rho's fused head computes h @ W.T; use another model")

    @property
    def lm_head(self):
        """The model's own head, tied or not (a property: no second copy in the state_dict)."""
        return self.hf.get_output_embeddings()

    def forward(self, idx):
        return self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state

    def decode(self, idx, pad, caches):
        """As GPT.decode, with transformers' own Cache object in caches[0]."""
        from transformers import DynamicCache
        past = caches[0][0] if caches[0] else DynamicCache(config=self.hf.config)
        T = idx.shape[1]
        keys = torch.arange(past.get_seq_length() + T, device=idx.device)
        out = self.hf.base_model(input_ids=idx, attention_mask=(keys[None] >= pad[:, None]).long(),
                                 position_ids=(keys[None, -T:] - pad[:, None]).clamp(min=0),
                                 past_key_values=past, use_cache=True)
        caches[0][:] = [out.past_key_values]
        return out.last_hidden_state

def load_hf(source, block_size=None, config=None):
    """HF from hf:NAME or a directory; with config (a JSON string), its random weights."""
    try:
        import transformers
    except ImportError:
        die(f"--init_from {source}: needs transformers: pip install transformers")
    name, auto = source.removeprefix("hf:"), transformers.AutoModelForCausalLM
    try:
        if config:
            c = transformers.AutoConfig.for_model(**json.loads(config))
        else:
            c = from_hub(transformers.AutoConfig.from_pretrained, name)
        # no dropout: GPT-2's resid_pdrop, Llama's attention_dropout, ...
        for key, v in c.to_dict().items():
            if "drop" in key and isinstance(v, float):
                setattr(c, key, 0.0)
        if config:
            hf, info = auto.from_config(c), {"missing_keys": ()}
        else:
            hf, info = from_hub(auto.from_pretrained, name, config=c, dtype=torch.float32,
                                output_loading_info=True)
    except (OSError, ValueError) as e:
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        if os.path.isdir(name):
            die(f"--init_from {source}: not a loadable transformers model ({why})")
        die(f"--init_from {source}: could not load it ({why}): run once with network to fill the "
            "Hugging Face cache (HF_HUB_OFFLINE=1 then reads only the cache), or pass a directory "
            "saved with save_pretrained")
    # transformers would leave them randomly initialised, and only warn
    if info["missing_keys"]:
        die(f"--init_from {source}: no weights for {', '.join(sorted(info['missing_keys'])[:3])}: "
            "not a causal LM checkpoint (a base model without its head?)")
    return HF(hf.float(), block_size, source)

def check_tokenizer(cfg, meta):
    """The data's ids must be the model's own tokenizer's (its fingerprint, in meta.json)."""
    want = meta.get("tokenizer", {}).get("sha256")
    # None: the model has no tokenizer
    if want and tokenizer_id_of(cfg.init_from) not in (None, want):
        die(f"--init_from {cfg.init_from}: {cfg.data} was prepared with another tokenizer "
            f"({meta['tokenizer']['name']}): prepare it with `python prepare.py ... --encoding "
            f"{cfg.init_from}`")

def build_model(cfg, meta, shape):
    """From scratch, of the shape flags given, or from a model (whose shape wins)."""
    torch.manual_seed(cfg.seed)
    given = {key: v for key, v in asdict(shape).items() if v is not None and key != "vocab_size"}
    if cfg.init_from in ("", "scratch"):
        shape = GPTConfig(**given, vocab_size=64 * math.ceil(meta["vocab_size"] / 64))
        if shape.n_embd % shape.n_head:
            die(f"--n_embd {shape.n_embd}: must be a multiple of --n_head {shape.n_head} (each "
                "head gets n_embd / n_head)")
        return GPT(shape).to(cfg.device)
    hf = cfg.init_from.startswith("hf:") or os.path.isfile(os.path.join(cfg.init_from,
                                                                        "config.json"))
    path = None if hf else init_path(cfg)
    ignored = [f"--{key}" for key in given if key != "block_size"]
    if ignored and RANK == 0:
        print(f"warning: {' '.join(ignored)} ignored: the model's shape comes from "
              f"{cfg.init_from}", file=sys.stderr)
    if not hf:
        ckpt = load_checkpoint(path, meta, "base checkpoint")
        return model_from_checkpoint(ckpt, given.get("block_size"), path).to(cfg.device)
    model = load_hf(cfg.init_from, given.get("block_size"))
    # byte ids fit only a model export.py wrote from a run on bytes data (its config says so)
    foreign = meta["encoding"] == "bytes" != getattr(model.hf.config, "rho_encoding", None)
    if meta["vocab_size"] > model.config.vocab_size or foreign:
        die(f"--init_from {cfg.init_from}: its vocabulary ({model.config.vocab_size} tokens) is not "
            f"that of {cfg.data} ({meta['encoding']}, {meta['vocab_size']}): prepare the data with "
            f"`python prepare.py ... --encoding {cfg.init_from}` (its own tokenizer; GPT-2: "
            "--encoding gpt2)")
    check_tokenizer(cfg, meta)
    return model.to(cfg.device)

def init_path(cfg):
    """--init_from's checkpoint: a ckpt.pt, a run's folder, or the name of a run in --out."""
    tried = (cfg.init_from, os.path.join(cfg.init_from, "ckpt.pt"),
             os.path.join(cfg.out, cfg.init_from, "ckpt.pt"))
    found = [path for path in tried if os.path.isfile(path)]
    if found:
        if found[0] == tried[2] and cfg.init_from == "base" and RANK == 0:
            print(f"{run_name(cfg)}: starting from the base run ({found[0]}); --init_from scratch "
                  "starts from random weights")
        return found[0]
    if cfg.init_from == "base":
        die(f"{tried[2]}: no base model: --{cfg.mode} on {cfg.data} starts from the base run; run "
            f"{command('base', cfg)} first, or pass --init_from scratch")
    if os.path.isdir(cfg.init_from):
        what = "a folder without ckpt.pt or config.json"
        if not os.listdir(cfg.init_from):
            what = "an empty folder"
        elif os.path.isfile(os.path.join(cfg.init_from, "meta.json")):
            what = "prepared data (meta.json)"
        die(f"--init_from {cfg.init_from}: {what}, not a model: pass a run's folder or its ckpt.pt, "
            f"the name of a run in --out ({cfg.out}), scratch, hf:NAME, or a folder saved by "
            "transformers' save_pretrained")
    return cfg.init_from

def model_from_checkpoint(ckpt, block_size, path):
    """A checkpoint's model, ours or transformers', its context cropped to block_size (nanoGPT)."""
    if "hf_config" in ckpt:
        model = load_hf(path, block_size or ckpt["model_config"]["block_size"], ckpt["hf_config"])
        model.load_state_dict(full_state_dict(ckpt, path, lambda: model))
        return model
    shape = GPTConfig(**ckpt["model_config"])
    sd = full_state_dict(ckpt, path, lambda: GPT(shape))
    T = block_size or shape.block_size
    if T > shape.block_size:
        die(f"--block_size {T}: {path} has {shape.block_size} positions; pass --block_size "
            f"{shape.block_size} or less")
    model = GPT(GPTConfig(**{**asdict(shape), "block_size": T}))
    model.load_state_dict({**sd, "transformer.wpe.weight": sd["transformer.wpe.weight"][:T]})
    return model

def full_state_dict(ckpt, path, new_model):
    """A checkpoint's state_dict; an FSDP run's read whole from its shards into new_model()'s."""
    if not isinstance(ckpt["model"], str):
        return ckpt["model"]
    import torch.distributed.checkpoint as dcp
    sd = new_model().state_dict()
    # its warning "assuming ... a single process" is what we ask for
    with warnings.catch_warnings(action="ignore", category=UserWarning):
        dcp.load({"model": sd}, checkpoint_id=os.path.join(os.path.dirname(path), ckpt["model"]),
                 no_dist=True)
    return sd

# -----------------------------------------------------------------------------
# processes: one, or one per GPU under torchrun (DDP, FSDP2); each holds a contiguous share of
# every step

def sequences_per_forward(cfg):
    """Sequences per forward on each process (--micro_batch, 0: all), checked against the step."""
    if cfg.batch_size % WORLD:
        die(f"--batch_size {cfg.batch_size}: not divisible by the {WORLD} processes; use a "
            f"multiple of {WORLD}")
    share = cfg.batch_size // WORLD
    if share % (cfg.micro_batch or share):
        die(f"--micro_batch {cfg.micro_batch}: must divide the {share} sequences each process "
            f"holds per step (--batch_size {cfg.batch_size} over {WORLD} processes)")
    return cfg.micro_batch or share

def checkpoint_and_shard(model, cfg):
    """--act_ckpt: recompute each block in the backward; --fsdp: shard each block, then the rest."""
    if not (cfg.act_ckpt or cfg.fsdp):
        return model
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    cuda = cfg.device.startswith("cuda")
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if cuda else MixedPrecisionPolicy()
    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    for block in blocks:
        if cfg.act_ckpt:
            checkpoint(block)
        if cfg.fsdp:
            fully_shard(block, mp_policy=mp)
            # generation's forward (GPT.decode) gathers the weights as forward does
            if isinstance(block, Block):
                register_fsdp_forward_method(block, "decode")
    if cfg.fsdp:
        # the root's parameters stay gathered after the forward: the fused head reads its weight
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        register_fsdp_forward_method(model, "decode")
    return model

def forward_as_trained(model, cfg):
    """The forward that training calls: compiled (--compile), in DDP over processes but FSDP's.
    model keeps the weights."""
    fwd = torch.compile(model) if cfg.compile else model
    if WORLD > 1 and not cfg.fsdp:
        fwd = DDP(fwd, device_ids=[LOCAL] if cfg.device.startswith("cuda") else None)
    return fwd

def set_gradient_sync(model, fwd, cfg, sync):
    """Whether this backward reduces the gradients across processes."""
    if cfg.fsdp:
        model.set_requires_gradient_sync(sync)
    elif WORLD > 1:
        # all that DDP's no_sync() context sets (nanoGPT does the same)
        fwd.require_backward_grad_sync = sync

def autocast(cfg):
    """bfloat16 for the model's forward (the default on CUDA), or none."""
    return torch.autocast(torch.device(cfg.device).type, torch.bfloat16,
                          enabled=cfg.dtype == "bfloat16")

def gather_rows(t):
    """Every process's rows of t, in rank order: the whole step's."""
    if WORLD == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)

def sum_ranks(t):
    if WORLD > 1:
        dist.all_reduce(t)
    return t

def same_flags_on_every_process(cfg, shape):
    """torchrun's processes must run one run: checked once, at the start."""
    # each process has its own device
    mine = {**asdict(cfg), **asdict(shape), "device": None}
    theirs = [None] * WORLD
    dist.all_gather_object(theirs, mine)
    for key in mine:
        if any(other[key] != mine[key] for other in theirs):
            if RANK != 0:
                sys.exit(1)
            values = ", ".join(f"rank {r}: {other[key]}" for r, other in enumerate(theirs))
            die(f"--{key}: the processes were started with other values ({values}): start every "
                "process with the same flags")

def save_states(model, opt, cfg, ckpt_path, step):
    """What ckpt.pt holds of the model and the optimizer: their state_dicts; under FSDP the name
    of a torch.distributed.checkpoint folder beside it, where each process writes its shards,
    never whole on one (every process calls it)."""
    if not cfg.fsdp:
        return model.state_dict(), opt.state_dict()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    shards = f"{ckpt_path[:-len('.pt')]}-{step}.dcp"
    dcp.save({"model": get_model_state_dict(model),
              "optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=shards)
    return os.path.basename(shards), None

def load_states(model, opt, ckpt, cfg, path):
    """save_states back, on any number of processes (shards are resharded as they are read)."""
    shards = isinstance(ckpt["model"], str)
    if not shards and not cfg.fsdp:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd
    states = ckpt
    if shards:
        states = {"model": sd.get_model_state_dict(model),
                  "optimizer": sd.get_optimizer_state_dict(model, opt)}
        dcp.load(states, checkpoint_id=os.path.join(os.path.dirname(path), ckpt["model"]))
    whole = sd.StateDictOptions(full_state_dict=not shards)
    sd.set_model_state_dict(model, states["model"], options=whole)
    sd.set_optimizer_state_dict(model, opt, states["optimizer"], options=whole)

# -----------------------------------------------------------------------------
# run folders, checkpoints and resume: a run killed at any moment resumes; nothing is lost

RUN_FILES = ("ckpt.pt", "metrics.json", "tokens.npz", "ref_scores.bin", "ref_scores.bin.json",
             "ref_scores.bin.partial", "ref_scores.bin.partial.json", "ref_scores.bin.done")
# "PID HOST" of the command writing a run's folder; main removes it as that command exits
LOCK = "run.lock"

def earlier_run(out_dir, cfg):
    """An earlier run's files in out_dir: refused unless --resume or --overwrite."""
    old = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    old += [os.path.basename(d) for d in sorted(glob.glob(os.path.join(out_dir, "ckpt-*.dcp")))]
    if old and not (cfg.resume or cfg.overwrite):
        # a torn ckpt.pt (torch.save writes a zip) cannot be resumed
        torn = "ckpt.pt" in old and not zipfile.is_zipfile(os.path.join(out_dir, "ckpt.pt"))
        how = "--resume continues it, "
        if torn:
            how = "its ckpt.pt is not a whole torch file (cut short?), so it cannot resume: "
        die(f"{out_dir}: holds a{' finished' if 'metrics.json' in old else 'n unfinished'} run "
            f"({', '.join(old)}): {how}--overwrite replaces it, --name NAME starts this one beside "
            "it")
    return old

def lock_run(out_dir):
    """Refuses a second command on the same run while the first runs; a dead one's lock is taken."""
    path = os.path.join(out_dir, LOCK)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        held = Path(path).read_text().split()
        # a process on this machine, that is not this one
        here = len(held) == 2 and held[0].isdigit() and held[1] == socket.gethostname()
        if not here or int(held[0]) != os.getpid() and running(int(held[0])):
            who = f"process {held[0]} on {held[1]}" if len(held) == 2 else "another command"
            die(f"{out_dir}: in use by {who} ({LOCK}): wait for it to end or stop it; if no command "
                f"is running there, delete {path}")
        print(f"{out_dir}: took over {LOCK} of process {held[0]}, which is no longer running "
              "(killed?)")
        os.remove(path)
        return lock_run(out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}")

def running(pid):
    """Signal 0 only asks whether the process exists (PermissionError: it does, another user's)."""
    try:
        return os.kill(pid, 0) is None
    except PermissionError:
        return True
    except ProcessLookupError:
        return False

def unlock(out_dir):
    """Removes the run's lock, if this process holds it."""
    path = os.path.join(out_dir, LOCK)
    if os.path.isfile(path) and Path(path).read_text().split()[:1] == [str(os.getpid())]:
        os.remove(path)

def take_run_folder(out_dir, old_files, cfg):
    """The run's folder, once every check passed: made, locked, tested; --overwrite empties it."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock_run(out_dir)
        if earlier_run(out_dir, cfg) != old_files:
            die(f"{out_dir}: changed while this command started: run it again")
        write_atomic(os.path.join(out_dir, ".write-test"), b"")
        os.remove(os.path.join(out_dir, ".write-test"))
    except OSError as e:
        die(f"{out_dir}: cannot write the run there ({e.strerror}): pass another --out")
    for f in old_files if cfg.overwrite else ():
        (shutil.rmtree if f.endswith(".dcp") else os.remove)(os.path.join(out_dir, f))

@dataclass
class Progress:
    """What a run has done so far: every checkpoint holds it, and a resumed run goes on from it."""
    init_sha256: str               # the weights the run started from, by content
    ref_sha256: str | None         # the reference model whose scores it read
    history: list = field(default_factory=list)  # one entry per evaluation
    losses: list = field(default_factory=list)   # every step's loss
    tokens_seen: int = 0
    tokens_trained: int = 0
    wall_s: float = 0.0
    # the demo's audit: [seen, selected] web tokens per noise label
    by_label: list = field(default_factory=lambda: [[], []])
    # every evaluation's per-token records (evaluate), for tokens.npz
    tokens: dict = field(default_factory=lambda: {"hq": [], "web": [], "sel": []})

def save_checkpoint(path, model, states, gen, step, cfg, meta, progress):
    """ckpt.pt, atomically: a kill leaves the previous checkpoint intact."""
    hf = {"hf_config": model.hf.config.to_json_string()} if isinstance(model, HF) else {}
    try:
        torch.save({"model": states[0], "optimizer": states[1], "rng": gen.get_state(),
                    "step": step, "config": asdict(cfg), "model_config": asdict(model.config),
                    "encoding": meta["encoding"], "n_vocab": meta["vocab_size"],
                    "data_sha256": meta["sha256"], "progress": vars(progress), **hf},
                   path + ".tmp")
        os.replace(path + ".tmp", path)
    # a full disk: torch.save raises either
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        history = progress.history
        intact = "no earlier checkpoint"
        if len(history) > 1:
            intact = f"the checkpoint of step {history[-2]['step']} is intact"
        die(f"{path}: could not write the checkpoint ({str(e).strip().splitlines()[-1]}); "
            f"{intact}: free disk space, then run again with --resume")
    # an FSDP run: its earlier shards go once ckpt.pt names the new ones
    if isinstance(states[0], str):
        keep = os.path.join(os.path.dirname(path), states[0])
        for old in set(glob.glob(path[:-len(".pt")] + "-*.dcp")) - {keep}:
            shutil.rmtree(old)

def load_checkpoint(path, meta=None, what="checkpoint"):
    if not os.path.isfile(path):
        die(f"{path}: no such {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path}: not a readable rho checkpoint ({type(e).__name__}: cut short, or not written "
            "by torch.save)")
    keys = set(ckpt if isinstance(ckpt, dict) else ())
    missing = {"model", "model_config", "config", "encoding", "n_vocab"} - keys
    if missing:
        die(f"{path}: a torch file, but not a checkpoint written by rho.py (no "
            f"{', '.join(sorted(missing))}): pass a run's ckpt.pt, the name of a run in --out, or "
            "scratch")
    if meta is not None and (ckpt["n_vocab"] != meta["vocab_size"]
                             or ckpt["encoding"] != meta["encoding"]):
        die(f"{path}: {what} has vocabulary {ckpt['encoding']} ({ckpt['n_vocab']} tokens) but the "
            f"data has {meta['encoding']} ({meta['vocab_size']}): prepare the data with --encoding "
            f"{ckpt['encoding']} or train a new model")
    shards = ckpt["model"]
    if isinstance(shards, str) and not os.path.isdir(os.path.join(os.path.dirname(path), shards)):
        die(f"{path}: its weights are the FSDP shards {shards} beside it, which are missing: "
            "restore that folder next to ckpt.pt (copy a run's folder whole)")
    return ckpt

def resume(ckpt_path, model, opt, gen, cfg, meta, ref_sha):
    """--resume: ckpt.pt's weights, optimizer, RNG and Progress, checked against this run's flags
    and data. Returns (the step to go on from, Progress)."""
    ckpt = load_checkpoint(ckpt_path, meta)
    saved = {**ckpt["config"], **ckpt["model_config"]}
    now = {**asdict(cfg), **asdict(model.config)}
    if saved["mode"] != cfg.mode:
        die(f"--resume: this is a --{cfg.mode} run, but {ckpt_path} holds a --{saved['mode']} run; "
            "give this one another --name")
    # free: how a run computes or where it lives, not what (the data: by its sha256)
    free = ("resume", "device", "compile", "act_ckpt", "micro_batch", "score_batch", "preset",
            "out", "name", "data")
    for key, v in now.items():
        if key not in free and saved.get(key) != v:
            die(f"--resume: --{key} is {v!r} here but {saved.get(key)!r} in {ckpt_path}: pass "
                f"--{key} {saved.get(key)} to continue that run, or give this one another --name")
    if ckpt["data_sha256"] != meta["sha256"]:
        die(f"--resume: {cfg.data} is not the data that {ckpt_path} was trained on (prepared "
            "again?): restore that data, or give this run another --name")
    if ckpt["progress"]["ref_sha256"] != ref_sha:
        die(f"--resume: {cfg.out}/{cfg.ref_run}/ref_scores.bin now holds the scores of another "
            f"reference model than the one {ckpt_path} trained with (was --ref run again?): "
            "restore those scores, or start this run again with --overwrite")
    load_states(model, opt, ckpt, cfg, ckpt_path)
    gen.set_state(ckpt["rng"])
    return ckpt["step"], Progress(**ckpt["progress"])

def print_run(cfg, name, model, T, per_forward, start):
    if cfg.resume:
        ckpt_path = os.path.join(cfg.out, name, "ckpt.pt")
        print(f"{name}: " + (f"resumed from {ckpt_path} at step {start}" if start
                             else "no checkpoint: from step 0"))
    n_params = sum(p.numel() for p in model.parameters())
    n_micro = cfg.batch_size // WORLD // per_forward
    split = ""
    if per_forward < cfg.batch_size:
        split = (f", {WORLD} process{'es' * (WORLD > 1)} x {n_micro} "
                 f"micro-batch{'es' * (n_micro > 1)} of {per_forward}")
    rule = f" k={cfg.k} select={cfg.select} scope={cfg.scope}" if cfg.mode == "slm" else ""
    print(f"{name}: {n_params / 1e6:.2f}M params, {cfg.steps} steps of {cfg.batch_size}x{T} "
          f"tokens{split}, {cfg.mode}{rule}")

def stop_if_not_finite(loss, norm, step, name, cfg, progress, ckpt_path):
    """Before the optimizer step: no NaN reaches a checkpoint. What diverged is not known: the
    flags that size a step are named, none blamed."""
    for what, v in (("loss", loss), ("gradient norm", norm)):
        if torch.isfinite(v):
            continue
        saved = ""
        if progress.history:
            last = progress.history[-1]
            saved = (f"; {ckpt_path} holds the last weights saved (step {last['step']}, val loss "
                     f"hq {last['val_loss_hq']:.4g})")
        die(f"{name}: the {what} became {v.item()} at step {step}, stopped before its "
            f"update{saved}. A step's size comes from --lr {cfg.lr:g}, --weight_decay "
            f"{cfg.weight_decay:g}, --grad_clip {cfg.grad_clip:g} (and the data): change what "
            "caused it, then start again with --overwrite (or another --name)")

def stopped(cfg, e):
    """Ctrl-C or SIGTERM: one line saying where the run stopped and how it goes on."""
    # main's callees, by name
    frames = {f.f_code.co_name: f for f, _ in traceback.walk_tb(e.__traceback__)}
    name = run_name(cfg)
    ckpt = os.path.join(cfg.out, name, "ckpt.pt")
    if cfg.mode == "score" or "score_web" in frames:
        # the blocks marked done are kept
        again = "the same command" if cfg.mode == "score" else "the same command with --resume"
        msg = f"{name}: stopped while scoring: run {again} to finish it"
    else:
        step = frames["train"].f_locals.get("step") if "train" in frames else None
        try:
            ckpt_step = torch.load(ckpt, "cpu", weights_only=True, mmap=True)["step"]
            saved = f"{ckpt} holds step {ckpt_step}"
        # none yet, or not this run's
        except Exception:
            saved = "no checkpoint yet"
        at = f"at step {step} of {cfg.steps}" if step is not None else "before training"
        msg = f"{name}: stopped {at}; {saved}: run the same command with --resume to continue"
    if RANK != 0:
        sys.exit(1)
    die(msg)

# -----------------------------------------------------------------------------
# the reference scores' file: <out>/<ref run>/ref_scores.bin (n_web, 1 or 2) and its .json

def score_layout(info):
    """The scores' dtype and columns: L_RM, then H_RM unless scored with --scores loss."""
    return np.dtype(info["score_dtype"]), len(info["scores"].split(","))

def load_ref_scores(cfg, meta, T):
    """(--ref_run's scores, checked against the data and T; the reference model's sha256)."""
    run, n_web = os.path.join(cfg.out, cfg.ref_run), meta["tokens"]["web"]
    path, ckpt_path = os.path.join(run, "ref_scores.bin"), os.path.join(run, "ckpt.pt")
    # scoring this data again with --ref_run's model
    redo = lambda **flags: "re-run " + command("score", cfg, name=cfg.ref_run, **flags)
    if not os.path.isfile(path) and os.path.isfile(path + ".partial"):
        # no metrics.json: killed in --ref's scoring
        if os.path.isfile(os.path.join(run, "metrics.json")):
            how = f"{redo()} to finish it"
        else:
            flags = saved_flags(load_checkpoint(ckpt_path), "ref")
            how = f"finish the reference run: {command('ref', cfg, resume=True, **flags)}"
        die(f"{path}: scoring was interrupted: {how}")
    if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
        what = path + ".json" if os.path.isfile(path) else path
        train = command("ref", cfg, name=cfg.ref_run if cfg.ref_run != "ref" else None)
        how = redo() if os.path.isfile(ckpt_path) else f"run {train} (or --score with a reference "\
            "model)"
        die(f"{what}: reference scores missing: {how}")
    info = scoring_json(path + ".json")
    if not isinstance(info, dict) or "weights_sha256" not in info:
        die(f"{path}.json: not valid JSON, or without the reference model's fingerprint: "
            f"{redo(overwrite=True)}")
    dtype, n_cols = score_layout(info)
    per_token = os.path.getsize(path) / n_web
    # scored again as they were
    layout = dict(score_dtype=info["score_dtype"], scores=info["scores"])
    # the data's sha256 covers the encoding too
    if info["data_sha256"] != meta["sha256"]:
        die(f"{path}: reference scores do not match {cfg.data}: computed for {info['data']} (its "
            f"meta.json differs): {redo(**layout, overwrite=True)}")
    # the layout another file would have, or a file cut short
    if per_token != n_cols * dtype.itemsize:
        other = [f"{d} {s}" for d in CHOICES["score_dtype"] for s in CHOICES["scores"]
                 if np.dtype(d).itemsize * len(s.split(",")) == per_token]
        if other:
            says = f"{dtype} {info['scores']} ({n_cols * dtype.itemsize} bytes)"
            why = (f"its .json: {per_token:g} bytes a token, as {' or '.join(other)} scores are, "
                   f"but the .json says {says}")
        else:
            n_whole = os.path.getsize(path) // (n_cols * dtype.itemsize)
            why = f"{cfg.data} (cut short: {n_whole:,} of {n_web:,} tokens)"
        die(f"{path}: reference scores do not match {why}: {redo(**layout)}")
    if sha256_differs(path, info.get("sha256")):
        die(f"{path}: its content is not what scoring wrote (sha256 differs): {redo(**layout)}")
    if n_cols == 1 and cfg.select in ("entropy", "ref_entropy"):
        die(f"{path}: holds L_RM alone (scored with --scores loss); --select {cfg.select} reads "
            f"H_RM too: {redo(score_dtype=layout['score_dtype'])}")
    if info["block_size"] != T:
        die(f"{path}: reference scores were computed with windows of {info['block_size']} tokens, "
            f"this run uses {T}: pass --block_size {info['block_size']} so both models see the "
            f"same context (a model of fewer positions: train the reference model with "
            f"--block_size {T} and score again)")
    scores = np.memmap(path, dtype=dtype, mode="r", shape=(n_web, n_cols))
    return scores, info["weights_sha256"]

def scoring_json(path):
    """A scores file's json; None if missing or cut short (then it is scored again)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None

def same_scoring(a, b):
    """Whether two scorings are of the same data, windows and reference model."""
    return all(a.get(key) == b[key]
               for key in ("n_tokens", "block_size", "data_sha256", "weights_sha256"))

def start_scoring(path, n_tokens, T, n_windows, cfg, meta, weights):
    """Makes (a resume keeps) <path>.partial, .done (a byte per block of windows) and
    .partial.json. Returns (its json, the blocks' done bytes), or (None, None) if already scored."""
    info = {"n_tokens": n_tokens, "block_size": T, "score_batch": cfg.score_batch,
            "data_sha256": meta["sha256"], "weights_sha256": weights,
            "score_dtype": cfg.score_dtype, "scores": cfg.scores}
    dtype, n_cols = score_layout(info)
    if RANK == 0:
        partial = scoring_json(path + ".partial.json") or {}
        scored = scoring_json(path + ".json") if os.path.isfile(path) else None
        if scored and same_scoring(scored, info) and \
                os.path.getsize(path) == n_cols * dtype.itemsize * n_tokens and \
                not sha256_differs(path, scored.get("sha256")):
            print(f"score: {path} already holds this model's scores of {cfg.data}: kept")
        elif scored and not same_scoring(scored, info) and not cfg.overwrite:
            run = os.path.dirname(path)
            whose = "this" if scored.get("weights_sha256") == weights else "another"
            die(f"{path}: holds the scores of {scored['data']} by {whose} reference model; "
                f"scoring {cfg.data} would replace them: pass --overwrite, or copy the run (cp -r "
                f"{run} {run}-2) and score that: "
                f"{command('score', cfg, name=os.path.basename(run) + '-2')}")
        elif same_scoring(partial, info) and os.path.isfile(path + ".partial") and \
                os.path.isfile(path + ".done"):
            # resume, with the block size it started with
            info = partial
        else:
            # asked for by --overwrite, or this run's, cut short
            for stale in (path, path + ".json"):
                if os.path.exists(stale):
                    os.remove(stale)
            new_partial(path, info, n_tokens, T, n_windows)
    if WORLD > 1:
        dist.barrier()
    if not os.path.isfile(path + ".partial.json"):
        return None, None
    return read_json(path + ".partial.json"), np.fromfile(path + ".done", np.uint8)

def new_partial(path, info, n_tokens, T, n_windows):
    """A sparse file of zeros, NaN where no window predicts a token (token 0 and the tokens after
    the last window); its done bytes; its json."""
    dtype, n_cols = score_layout(info)
    with open(path + ".partial.tmp", "wb") as f:
        f.truncate(n_cols * dtype.itemsize * n_tokens)
        tail = n_windows * T + 1
        for at, count in ((0, 1), (tail, n_tokens - tail)):
            os.pwrite(f.fileno(), np.full(n_cols * count, np.nan, dtype).tobytes(),
                      n_cols * dtype.itemsize * at)
    write_atomic(path + ".done", bytes(-(-n_windows // info["score_batch"])))
    os.replace(path + ".partial.tmp", path + ".partial")
    write_json(path + ".partial.json", info)

def finish_scoring(path, info, cfg, run):
    """Every block done: ref_scores.bin and its .json (with the file's sha256) take its place."""
    if not np.fromfile(path + ".done", np.uint8).all():
        die(f"{path}.partial: some blocks were not scored; run {command('score', cfg, name=run)} "
            "again")
    os.replace(path + ".partial", path)
    # load_ref_scores checks it
    info["sha256"] = file_sha256(path) if os.path.getsize(path) <= HASH_MAX else None
    write_json(path + ".json", info)
    for f in (path + ".done", path + ".partial.json"):
        os.remove(f)

def score_again(cfg):
    """--score: web scored again with an existing reference model."""
    meta, name = load_meta(cfg.data), run_name(cfg)
    # an FSDP run's shards are read from beside ckpt.pt
    path = os.path.join(cfg.out, name, "ckpt.pt")
    ckpt = load_checkpoint(path, meta, "reference model")
    if RANK == 0:
        lock_run(os.path.join(cfg.out, name))
    info = score_web(model_from_checkpoint(ckpt, None, path).to(cfg.device), meta, cfg, name)
    if RANK == 0 and not os.path.isfile(os.path.join(cfg.out, name, "metrics.json")):
        print(f"note: {cfg.out}/{name}/metrics.json is missing (killed while scoring?): "
              f"{command('ref', cfg, resume=True, **saved_flags(ckpt, 'ref'))} writes it and "
              "keeps these scores")
    return info

# -----------------------------------------------------------------------------
# records: the held-out problems read, every evaluation logged, tokens.npz, metrics.json

def read_problems(cfg, meta, T):
    """eval.json's held-out problems (as prepare.py wrote them); [] with --eval_problems 0."""
    if not cfg.eval_problems:
        return []
    path = os.path.join(cfg.data, "eval.json")
    if not os.path.isfile(path):
        die(f"{path}: missing (prepare.py writes it beside the token files): run prepare.py for "
            f"{cfg.data} again, or pass --eval_problems 0 to train without measuring accuracy")
    problems = read_json(prepared_path(cfg.data, "eval.json", meta))
    # generation answers in the second half of the context
    if T < 2:
        die(f"--block_size {T}: answer accuracy needs a context of 2 tokens or more: pass a larger "
            "--block_size, or --eval_problems 0")
    # said, not refused: the default asks for 200
    if len(problems) < cfg.eval_problems and RANK == 0:
        print(f"note: --eval_problems {cfg.eval_problems}: {path} holds {len(problems)} problems; "
              f"each evaluation answers all {len(problems)}", file=sys.stderr)
    if not problems:
        die(f"{path}: no eval problems (prepare.py found no \"#### N\" or \"The answer is: N\" "
            "answer in --val): prepare the data with such a --val, or pass --eval_problems 0 to "
            "train without measuring accuracy")
    return problems

def count_labels(counts, batches, sels):
    """The demo's audit: adds the step's web tokens seen and selected, per noise label."""
    n_labels = counts.shape[1]
    for b, sel in zip(batches, sels):
        labels = b.labels.flatten().long()
        counts += torch.stack([torch.bincount(labels, minlength=n_labels),
                               torch.bincount(labels[sel.flatten()], minlength=n_labels)])

def noise_shares(counts, labels):
    """The noise share (label 0: clean), overall and per kind, of [seen, selected] counts."""
    def shares(c):
        total = max(1, sum(c))
        return {"all": round(1 - c[0] / total, 4),
                **{labels[i]: round(n / total, 4) for i, n in enumerate(c) if i}}
    seen, selected = counts
    return {"noise_in_selected": shares(selected), "noise_share_corpus": shares(seen)}

def log_evaluation(progress, step, train_loss, measures, records, counts, labels):
    """Appends an evaluation to the history, its records to tokens; returns its log line."""
    e = {"step": step, "tokens_seen": progress.tokens_seen,
         "tokens_trained": progress.tokens_trained, "wall_s": round(progress.wall_s, 2),
         "train_loss": round(train_loss, 4), **measures}
    line = (f"step {step} | loss {e['train_loss']:.3f} | sel "
            f"{e['tokens_trained'] / e['tokens_seen']:.0%} | val hq {e['val_loss_hq']:.3f} web "
            f"{e['val_loss_web']:.3f} | acc {percent(e['accuracy'])}")
    if counts[0]:
        e.update(noise_shares(counts, labels))
        progress.by_label = [[a + b for a, b in zip(*pair)]
                             for pair in zip(progress.by_label, counts)]
        line += (f" | noise-in-sel {e['noise_in_selected']['all']:.1%} (corpus "
                 f"{e['noise_share_corpus']['all']:.1%})")
    progress.history.append(e)
    for key, v in records.items():
        progress.tokens[key].append(v)
    return line

def write_token_losses(path, progress, ev):
    """<out>/<name>/tokens.npz: every evaluation's token records and the web val windows."""
    if not progress.tokens["web"]:
        return
    web = ev.web.get(ev.web_val, "cpu")
    # (evaluations, windows, T)
    arrays = {key: torch.stack(v).numpy() for key, v in progress.tokens.items()}
    evals = progress.history[-len(progress.tokens["web"]):]
    arrays.update(step=np.array([h["step"] for h in evals]),
                  tokens_seen=np.array([h["tokens_seen"] for h in evals]),
                  web_x=torch.cat([web.x, web.y[:, -1:]], 1).int().numpy(),
                  web_ref=web.ref[..., REF_LOSS].numpy(),
                  web_ref_entropy=web.ref[..., REF_ENTROPY].numpy())
    if web.labels is not None:
        arrays["web_labels"] = web.labels.numpy()
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)

def write_metrics(cfg, meta, name, progress, out_dir, model, extra):
    """<out>/<name>/metrics.json: the config, the final and every evaluation, every step's loss,
    what the run started from, and the environment its bits rest on."""
    final = progress.history[-1]
    history = [{m: v for m, v in h.items() if m != "correct"} for h in progress.history]
    # the final evaluation's answers to all the problems, or None (--eval_problems 0)
    correct = final.get("correct")
    metrics = {
        "run": name, "mode": cfg.mode, "k": cfg.k, "select": cfg.select, "scope": cfg.scope,
        "steps": cfg.steps, "tokens_seen": progress.tokens_seen,
        "tokens_trained": progress.tokens_trained, "wall_s": round(progress.wall_s, 2),
        "eval_s": round(sum(h["eval_s"] for h in progress.history), 2),
        "final": {"val_loss_hq": final["val_loss_hq"], "val_loss_web": final["val_loss_web"],
                  "accuracy": accuracy(correct) if correct else final["accuracy"],
                  "correct": correct},
        "history": history, "losses": progress.losses, "config": asdict(cfg),
        "model_config": asdict(model.config),
        "n_params": sum(p.numel() for p in model.parameters()),
        "data": {"encoding": meta["encoding"], "sha256": meta["sha256"]},
        "init_sha256": progress.init_sha256}
    if progress.ref_sha256:
        metrics["ref_weights_sha256"] = progress.ref_sha256
    metrics.update(extra)
    metrics["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "processes": WORLD, "cpu": torch.backends.cpu.get_cpu_capability(),
                      "device": cfg.device}
    if progress.by_label[0]:
        metrics.update(noise_shares(progress.by_label, meta["labels"]))
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    problems = f" ({len(correct)} problems)" if correct else ""
    print(f"{name}: final val hq {final['val_loss_hq']:.4f} web {final['val_loss_web']:.4f} acc "
          f"{percent(metrics['final']['accuracy'])}{problems} -> {out_dir}/metrics.json")
    return metrics

if __name__ == "__main__":
    main()
