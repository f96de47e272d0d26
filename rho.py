"""rho.py: Selective Language Modeling (SLM) from Rho-1, in one file.
Lin et al., "Not All Tokens Are What You Need for Pretraining", NeurIPS 2024 (arXiv 2404.07965).

A reference model (RM), trained on a small high-quality corpus, scores every token of a web corpus
once: L_RM(x_i) = -log P_RM(x_i | x_<i). Continual pretraining on web then puts the loss only on
the step's top k share of tokens by excess loss (Sec. 2.2); every token stays in the context:

    L_Delta(x_i) = L_theta(x_i) - L_RM(x_i)
    I_k(x_i)     = 1 if x_i ranks in the top k of the step's tokens by L_Delta, else 0
    L_SLM        = -1/(N*k) * sum_i I_k(x_i) * log P_theta(x_i | x_<i)

With k = 1 it is the causal LM loss on every token (CLM), the baseline. The file reads top-down:
1. the SLM loss (slm_loss, the plain reference), 2. the fused head (the same loss without N x V
logits; Triton on CUDA), 3. the model (GPT-2, as nanoGPT), 4. the data, 5. reference scoring,
6. evaluation, 7. training (train_step, train) and main. THE MACHINERY follows one marked boundary
(config and flags, models, processes, run folders and checkpoints, scores files, records).
The demo: prepare.py; rho.py --base, --ref, --clm, --slm --k 0.6, --slm --k 0.6 --select random.
"""
import argparse, gc, glob, hashlib, json, math, os, re, shlex, shutil, signal, socket, sys, time
import traceback, warnings, zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from prepare import (ANSWER, HASH_MAX, SEED_MAX, file_sha256, final_answer, from_hub, get_encoding, load_meta,
                     prepared_path, read_array, read_json, read_tokens, sha256_differs, tokenizer_id_of,
                     write_atomic, write_json)

# one code path for MKL's and PyTorch's CPU kernels on any AVX2 CPU: the same losses on each
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
# torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; one process: 0, 1, 0
RANK, WORLD, LOCAL = (int(os.environ.get(k, v)) for k, v in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
IGNORE = -1  # a target id that is never trained on and never selected

def die(msg):
    sys.exit(f"error: {msg}")

# -----------------------------------------------------------------------------
# 1. The SLM loss (Sec. 2.2)

def token_loss(logits, targets):
    """L_theta(x_i) = -log P_theta(x_i | x_<i) in fp32, shaped as targets; 0 where ignored."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return loss.view(targets.shape)

def excess_loss(train_loss, ref_loss):
    """L_Delta(x_i) = L_theta(x_i) - L_RM(x_i), detached: the selection takes no gradient."""
    return train_loss.detach() - ref_loss

def n_select(k, n):
    """ceil(k * n), at least 1 where n >= 1: how many of n valid tokens I_k keeps."""
    n = torch.as_tensor(n, dtype=torch.float64)
    # rounded to 6 decimals first: 0.07 * 100 is 7.000000000000001 in floats
    return torch.maximum(torch.ceil(torch.round(k * n * 1e6) / 1e6), (n > 0).double())

def rank_of(score, valid, scope):
    """Each token's place (0: the highest score) among the valid tokens of the step (scope batch)
    or of its row (scope sequence). A stable sort, not topk: ties go to the lower index."""
    dims = score.shape
    if scope == "batch":
        score, valid = score.reshape(1, -1), valid.reshape(1, -1)
    # invalid and NaN tokens last, below every valid score (a valid -inf is clamped above them)
    key = torch.where(valid & ~score.isnan(), score.clamp(min=-3e38), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    return order.argsort(-1).reshape(dims)  # the inverse permutation: each token's place in order

def select_topk(score, valid, k, scope="batch"):
    """I_k: the top ceil(k * n_valid) valid tokens by score; never a NaN score."""
    valid = valid & ~score.isnan()
    n_valid = valid.sum() if scope == "batch" else valid.sum(-1, keepdim=True)
    return (rank_of(score, valid, scope) < n_select(k, n_valid)) & valid

REF_LOSS, REF_ENTROPY = 0, 1  # the reference scores' columns: L_RM(x_i), H_RM(x_i)

def token_score(select, loss, ref, valid, scope, gen):
    """What I_k ranks by, highest first (--select): excess, L_theta - L_RM (the paper's); random,
    the control (the same k, random tokens); ref, the lowest L_RM (Table 3); entropy, the lowest
    H_RM (App. H); ref_entropy, the worse of a token's places by L_RM and by H_RM (App. H's
    intersection); train, the highest L_theta. (sample, RHO-LOSS's sequences: in select_tokens.)"""
    if select == "excess":
        return excess_loss(loss, ref[..., REF_LOSS])
    if select == "random":
        return torch.rand(loss.shape, generator=gen).to(loss.device)
    if select == "ref_entropy":
        worse = torch.maximum(rank_of(-ref[..., REF_LOSS], valid, scope),
                              rank_of(-ref[..., REF_ENTROPY], valid, scope))
        return (-worse.float()).masked_fill(ref.isnan().any(-1), float("nan"))
    if select in ("ref", "entropy"):
        return -ref[..., REF_LOSS if select == "ref" else REF_ENTROPY]
    assert select == "train", select
    return loss.detach()

def select_tokens(loss, targets, ref, k, scope="batch", select="excess", gen=None):
    """I_k(x_i): which tokens carry the loss. k = 1: every valid token (CLM)."""
    valid = targets != IGNORE
    if k >= 1:
        return valid
    if select == "sample":
        # RHO-LOSS's rule: the step's whole sequences by mean excess loss, top-k (not sampled)
        seq = (excess_loss(loss, ref[..., REF_LOSS]) * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        return select_topk(seq[None], valid.any(-1)[None], k)[0][:, None] & valid
    return select_topk(token_score(select, loss, ref, valid, scope, gen), valid, k, scope)

def slm_loss(logits, targets, ref, k, scope="batch", select="excess", gen=None):
    """L_SLM from full logits (B, T, V), the plain reference of the fused head: (L, losses, I_k)."""
    loss = token_loss(logits, targets)
    sel = select_tokens(loss, targets, ref, k, scope, select, gen)
    # -1/(N*k) sum_i: the mean over the selected tokens only
    return (loss * sel).sum() / sel.sum(), loss.detach(), sel

def select_step(loss, targets, ref, cfg, gen=None):  # (this process's I_k, the whole step's count)
    # however the step is split over processes: one all-gather of token losses; each keeps its rows
    sel = select_tokens(gather_rows(loss), gather_rows(targets), gather_rows(ref), cfg.k, cfg.scope, cfg.select, gen)
    return sel[RANK * len(targets):(RANK + 1) * len(targets)], int(sel.sum())

# -----------------------------------------------------------------------------
# 2. The fused head: the loss from hidden states h (N, C) and the head weight w (V, C), chunk by
# chunk of rows, never holding N x V logits; equal to slm_loss in value and gradients
# (test_rho.py: test_fused_head_equals_plain_slm_loss, test_chunk_kernels_equal_float64_reference).
# CLM: one pass computes a chunk's logits, loss and gradients G = (softmax - onehot) / n,
# dH = G W, dW += G^T H (6 N C V FLOPs). SLM: a no-grad pass gives each token's loss and
# log-sum-exp (2 N C V); I_k is chosen; the backward recomputes the selected rows: (2 + 6k) N C V.

def sub_onehot_(dlogits, y, row_scale):  # dlogits[i, y_i] -= row_scale_i where y_i is not ignored
    valid = y != IGNORE
    dlogits[torch.arange(len(y), device=y.device)[valid], y[valid]] -= row_scale[valid].to(dlogits.dtype)

def chunk_loss_torch(logits, y, entropy=False):
    """(loss, lse, entropy or None) per row, fp32; loss 0 where y is ignored. Without entropy the
    logits end as exp(logits - max)."""
    logit_y = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # ignored rows: any column
    m = logits.amax(1, keepdim=True)
    z = logits.sub_(m)
    e = z.exp() if entropy else z.exp_()  # in place, unless the entropy still needs z
    s = e.sum(1)
    lse = m.squeeze(1) + s.log()
    ent = (e * (s.log()[:, None] - z)).sum(1) / s if entropy else None  # H = sum_j p_j (lse - x_j)
    return torch.where(y == IGNORE, 0.0, lse - logit_y), lse, ent

def chunk_loss_grad_torch(logits, y, scale, dlogits):  # CLM: loss, (softmax - onehot) * scale
    loss, _, _ = chunk_loss_torch(logits, y)
    row_scale = (y != IGNORE) * scale
    torch.mul(logits, (row_scale / logits.sum(1))[:, None], out=logits)  # softmax * scale
    sub_onehot_(logits, y, row_scale)
    dlogits.copy_(logits)  # free where dlogits is logits: a copy onto itself returns at once
    return loss

def chunk_grad_torch(logits, y, lse, scale, dlogits):  # SLM's backward, given the forward's lse
    row_scale = (y != IGNORE) * scale
    logits.sub_(lse[:, None]).exp_().mul_(row_scale[:, None])
    sub_onehot_(logits, y, row_scale)
    dlogits.copy_(logits)

try:
    import triton, triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _chunk_kernel(logits_ptr, dlogits_ptr, y_ptr, loss_ptr, lse_ptr, ent_ptr, scale_ptr, stride_logits,
                      stride_dlogits, V, BLOCK_V: tl.constexpr, LOSS: tl.constexpr, GRAD: tl.constexpr,
                      ENTROPY: tl.constexpr):
        """One row of a chunk: LOSS (loss, lse), ENTROPY, GRAD ((softmax - onehot) * scale)."""
        row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2**31
        row_ptr, y = logits_ptr + row * stride_logits, tl.load(y_ptr + row)
        if LOSS:  # an online log-sum-exp: the running sum rescaled to each new max
            m, s = tl.full([], float("-inf"), tl.float32), tl.full([], 0.0, tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                m, s = m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            lse = m + tl.log(s)
            z_y = tl.load(row_ptr + tl.maximum(y, 0)).to(tl.float32)  # ignored rows: column 0
            tl.store(loss_ptr + row, tl.where(y == -1, 0.0, lse - z_y))
            tl.store(lse_ptr + row, lse)
        else:
            lse = tl.load(lse_ptr + row)
        if ENTROPY:  # scoring: a second pass, H = sum_j p_j (lse - x_j), every term >= 0
            ent = tl.full([], 0.0, tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                ent += tl.sum(tl.where(cols < V, tl.exp(z - lse) * (lse - z), 0.0), axis=0)
            tl.store(ent_ptr + row, ent)
        if GRAD:  # CLM: in the same launch as the loss, while the row is in cache
            scale, drow_ptr = tl.load(scale_ptr), dlogits_ptr + row * stride_dlogits
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                d = tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)
                d = tl.where(y == -1, 0.0, d * scale).to(drow_ptr.dtype.element_ty)
                tl.store(drow_ptr + cols, d, mask=cols < V)

def launch_chunk_kernel(logits, y, dlogits, lse, scale, block_v, loss, grad, entropy):
    """One launch, a program per row, logits read only: (loss, lse, entropy or None), fp32."""
    assert logits.stride(1) == 1 and dlogits.stride(1) == 1, "rows must be contiguous"
    block = block_v or min(4096, triton.next_power_of_2(logits.shape[1]))  # tests: small blocks
    out = torch.empty(3, len(logits), dtype=torch.float32, device=logits.device)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=logits.device).reshape(1)
    _chunk_kernel[(len(logits),)](logits, dlogits, y, out[0], out[1] if lse is None else lse,
                                  out[2], scale_t, logits.stride(0), dlogits.stride(0),
                                  logits.shape[1], BLOCK_V=block, LOSS=loss, GRAD=grad,
                                  ENTROPY=entropy, num_warps=8 if block >= 2048 else 4)
    return out[0], out[1], out[2] if entropy else None

def chunk_loss_triton(logits, y, entropy=False, block_v=None):
    return launch_chunk_kernel(logits, y, logits, None, 0.0, block_v, loss=True, grad=False, entropy=entropy)

def chunk_loss_grad_triton(logits, y, scale, dlogits, block_v=None):
    return launch_chunk_kernel(logits, y, dlogits, None, scale, block_v, loss=True, grad=True, entropy=False)[0]

def chunk_grad_triton(logits, y, lse, scale, dlogits, block_v=None):
    launch_chunk_kernel(logits, y, dlogits, lse, scale, block_v, loss=False, grad=True, entropy=False)

class ChunkOps(NamedTuple):  # a backend's math on a chunk of fp32 logits; gradients into dlogits
    loss: Callable       # (logits, y, entropy) -> (loss, lse, entropy or None)
    loss_grad: Callable  # (logits, y, scale, dlogits) -> loss; the gradient into dlogits
    grad: Callable       # (logits, y, lse, scale, dlogits); the gradient into dlogits

TORCH_OPS = ChunkOps(chunk_loss_torch, chunk_loss_grad_torch, chunk_grad_torch)
TRITON_OPS = ChunkOps(chunk_loss_triton, chunk_loss_grad_triton, chunk_grad_triton)

def chunk_ops(device):
    return TRITON_OPS if device.type == "cuda" and triton is not None else TORCH_OPS

def chunk_rows(V, device):  # rows per chunk (a multiple of 64): 32 MB of fp32 logits, 512 MB on GPUs
    return max(64, (2**27 if device.type == "cuda" else 2**23) // (-(-V // 64) * 64) // 64 * 64)

def chunk_buffers(n_rows, V, device, dtype):  # (rows, fp32 logits, dlogits in the GEMMs' dtype)
    # an fp32 head's dlogits is the logits' own memory, written in place; width padded to 64 columns
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
    return torch.mm(a.float(), b.float(), out=out)  # a CPU has no out_dtype GEMM: the same math

def addmm_fp32_(dw, a, b):  # dw += a @ b, summed in dw's fp32
    if a.dtype == torch.float32:
        return dw.addmm_(a, b)
    if a.is_cuda:
        return torch.addmm(dw, a, b, out_dtype=torch.float32, out=dw)
    return dw.addmm_(a.float(), b.float())

def head_dtype(h):  # the head's GEMM dtype: autocast's (the head runs outside it), else h's
    return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype

class HeadOut(NamedTuple):  # per token, fp32, shaped as the targets
    loss: torch.Tensor            # -log P(x_i | x_<i); 0 where the target is ignored
    lse: torch.Tensor             # the logits' log-sum-exp: SLM's backward reads it
    entropy: torch.Tensor | None  # the softmax's entropy, for scoring (H_RM); else None

@torch.no_grad()
def head_losses(h, w, y, entropy=False):  # every token's HeadOut from h (B, T, C), w (V, C)
    dtype = head_dtype(h)  # read before the head leaves autocast
    with torch.autocast(h.device.type, enabled=False):
        hc, wc, yf = h.flatten(0, 1).to(dtype), w.to(dtype), y.flatten()
        rows, logits, _ = chunk_buffers(len(hc), len(wc), h.device, dtype)
        out = torch.empty(3, len(hc), dtype=torch.float32, device=h.device)
        for i in range(0, len(hc), rows):
            c = len(hc[i:i + rows])
            chunk = mm_fp32(hc[i:i + c], wc.t(), logits[:c])
            out[0, i:i + c], out[1, i:i + c], ent = chunk_ops(h.device).loss(chunk, yf[i:i + c], entropy)
            if entropy:
                out[2, i:i + c] = ent
    out = out.view(3, *y.shape)
    return HeadOut(out[0], out[1], out[2] if entropy else None)

@torch.no_grad()
def head_loss_grad(h, w, y, dtype, scale):
    """CLM: every row's loss (N,) and the gradients of scale * sum(loss): (loss, dh, dw)."""
    hc, wc, V = h.to(dtype), w.to(dtype), w.shape[0]
    rows, logits, dlogits = chunk_buffers(len(h), V, h.device, dtype)
    loss = torch.empty(len(h), dtype=torch.float32, device=h.device)
    dh, dw = torch.empty_like(hc), torch.zeros(w.shape, dtype=torch.float32, device=h.device)
    for i in range(0, len(h), rows):
        c = len(hc[i:i + rows])
        chunk = mm_fp32(hc[i:i + c], wc.t(), logits[:c])
        loss[i:i + c] = chunk_ops(h.device).loss_grad(chunk, y[i:i + c], scale, dlogits[:c])
        torch.mm(dlogits[:c], wc, out=dh[i:i + c])  # dH = G W
        addmm_fp32_(dw, dlogits[:c].t(), hc[i:i + c])  # dW += G^T H
    return loss, dh, dw

def first_derivative_only():  # under create_graph a second derivative would be silently wrong
    if torch.is_grad_enabled():
        raise RuntimeError("rho's fused head has no second derivative: call backward without create_graph")

class FullHeadLoss(torch.autograd.Function):
    """CLM: (the losses' sum / n, every token's loss); the gradients come from the forward."""
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
    """SLM: the selected tokens' losses summed / n; the backward recomputes their logits only."""
    @staticmethod
    def forward(ctx, h, w, y, loss, lse, sel, n, dtype):
        idx = sel.nonzero().squeeze(1)
        ctx.save_for_backward(h, w, y[idx], lse[idx], idx)
        ctx.n, ctx.dtype = n, dtype
        return loss[idx].sum() / n

    @staticmethod
    def backward(ctx, grad):
        first_derivative_only()
        h, w, y_sel, lse_sel, idx = ctx.saved_tensors  # y and lse of the selected rows only
        hc, wc = h.to(ctx.dtype), w.to(ctx.dtype)
        rows, logits, dlogits = chunk_buffers(len(idx), w.shape[0], h.device, ctx.dtype)
        dh, dw = torch.zeros_like(hc), torch.zeros(w.shape, dtype=torch.float32, device=h.device)
        for i in range(0, len(idx), rows):
            r = idx[i:i + rows]
            hs, dchunk = hc[r], dlogits[:len(r)]
            chunk = mm_fp32(hs, wc.t(), logits[:len(r)])
            chunk_ops(h.device).grad(chunk, y_sel[i:i + rows], lse_sel[i:i + rows], grad / ctx.n, dchunk)
            dh[r] = dchunk @ wc
            addmm_fp32_(dw, dchunk.t(), hs)
        return dh, dw, None, None, None, None, None, None

def fused_clm_loss(h, w, targets, n):
    """CLM from h (B, T, C), n the step's valid targets: (sum / n, every token's loss (B, T))."""
    (B, T, C), dtype = h.shape, head_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        out, loss = FullHeadLoss.apply(h.reshape(-1, C), w, targets.reshape(-1), max(n, 1), dtype)
    return out, loss.view(B, T)

def selected_loss(h, w, targets, per_token, sel, n):  # given I_k, n, head_losses(h, w, targets)
    dtype = head_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return SelectedHeadLoss.apply(h.flatten(0, 1), w, targets.flatten(), per_token.loss.flatten(),
                                      per_token.lse.flatten(), sel.flatten(), max(n, 1), dtype)

def fused_slm_loss(h, w, targets, ref, cfg, gen=None):  # slm_loss(h @ w.T, ...), I_k over the step
    per_token = head_losses(h, w, targets)
    sel, n = select_step(per_token.loss, targets, ref, cfg, gen)
    return selected_loss(h, w, targets, per_token, sel, n), per_token.loss, sel

@torch.no_grad()
def model_token_loss(model, x, y, entropy=False):  # every token's loss; with entropy: (loss, H)
    out = head_losses(model(x), model.lm_head.weight, y, entropy)
    return (out.loss, out.entropy) if entropy else out.loss

# -----------------------------------------------------------------------------
# 3. The model: GPT-2 as nanoGPT writes it. forward gives hidden states: the loss applies the head

@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 320  # the data's, padded up to a multiple of 64 (GPT-2's weights: 50257)
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def qkv(self, x):  # each (B, n_head, T, head size)
        B, T, C = x.shape
        return (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                for t in self.c_attn(x).split(C, dim=2))

    def forward(self, x):
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(x.shape))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_2, self.mlp = nn.LayerNorm(config.n_embd), MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def decode(self, x, mask, cache):  # forward for generation: cache holds earlier keys, values
        q, k, v = self.attn.qkv(self.ln_1(x))
        if cache:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn.c_proj(y.transpose(1, 2).contiguous().view(x.shape))
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)), ln_f=nn.LayerNorm(config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)

    def forward(self, idx):  # (B, T) ids -> (B, T, C) hidden states
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def decode(self, idx, pad, caches):  # generation's forward: new tokens idx, left-padded by pad
        T, past = idx.shape[1], caches[0][0].shape[2] if caches[0] else 0
        keys = torch.arange(past + T, device=idx.device)  # every position so far
        mask = ((keys[None, None] <= keys[-T:, None]) & (keys[None, None] >= pad[:, None, None]))[:, None]
        x = self.transformer.wte(idx) + self.transformer.wpe((keys[None, -T:] - pad[:, None]).clamp(min=0))
        for block, cache in zip(self.transformer.h, caches):
            x = block.decode(x, mask, cache)
        return self.transformer.ln_f(x)

# -----------------------------------------------------------------------------
# 4. The data: prepare.py's token files in windows of T + 1 tokens (window w: tokens w*T to w*T+T).
# The batch order depends on (seed, step) alone: CLM, SLM and the control of a seed see the same.

class MicroBatch(NamedTuple):  # the windows of one forward; I_k may span several (select_step)
    x: torch.Tensor              # (B, T) inputs
    y: torch.Tensor              # (B, T) targets: x shifted by one
    ref: torch.Tensor            # (B, T, 2) the targets' L_RM and H_RM, fp32 (zeros: a run without)
    labels: torch.Tensor | None  # (B, T) the demo's noise labels (clean, ad, ...): for audits only

class Windows:  # a token file's windows; ref, labels: per token, the scores and the noise labels
    def __init__(self, tokens, T, ref=None, labels=None, name="tokens"):
        self.tokens, self.T, self.ref, self.labels, self.name = tokens, T, ref, labels, name
        self.order, self.n_windows = None, (len(tokens) - 1) // T
        if self.n_windows < 1:
            die(f"{name}: {len(tokens)} tokens, fewer than one window of {T + 1}: use a smaller --block_size")

    def at_targets(self, a, ws, dtype, device):  # a's per-token values at the targets of windows ws
        rows = np.stack([a[w * self.T + 1:(w + 1) * self.T + 1] for w in ws])
        return torch.from_numpy(rows.astype(dtype)).to(device)

    def get(self, ws, device):  # the MicroBatch of windows ws
        x = torch.from_numpy(np.stack([self.tokens[w * self.T:(w + 1) * self.T + 1] for w in ws]).astype(np.int64))
        ref = torch.zeros(len(ws), self.T, 2, device=device) if self.ref is None else \
            self.at_targets(self.ref, ws, np.float32, device)
        if ref.shape[-1] == 1:  # scored with --scores loss: no H_RM
            ref = F.pad(ref, (0, 1), value=math.nan)
        labels = None if self.labels is None else self.at_targets(self.labels, ws, self.labels.dtype, device)
        x = x.to(device)
        return MicroBatch(x[:, :-1], x[:, 1:], ref, labels)

    def step_windows(self, step, B, seed, n_train):  # epochs of n_train // B steps, by (seed, epoch)
        if n_train // B < 1:
            die(f"{self.name}: {n_train} training windows of {self.T + 1} tokens, fewer than one batch: lower "
                "--batch_size")
        epoch, i = divmod(step, n_train // B)
        if self.order is None or self.order[0] != (seed, epoch, n_train):  # one per epoch
            self.order = (seed, epoch, n_train), np.random.default_rng([seed, epoch]).permutation(n_train)
        return self.order[1][i * B:(i + 1) * B]

    def step_batches(self, step, B, seed, device, n_train, per_forward):  # this process's share
        share = B // WORLD
        ws = self.step_windows(step, B, seed, n_train)[RANK * share:(RANK + 1) * share]
        return [self.get(ws[i:i + per_forward], device) for i in range(0, share, per_forward)]

def token_windows(data, name, meta, T, ref=None, labels=None):
    return Windows(read_tokens(data, name, meta), T, ref, labels, os.path.join(data, name))

def web_split(n_windows, T):  # the first web val window: max(32 windows, 8k tokens), at most 5%
    return n_windows - min(max(32, 8192 // T), max(1, n_windows // 20))

def web_windows(cfg, meta, T, ref=None):  # with the scores ref, and the demo's noise labels
    labels = read_array(cfg.data, "web_labels.bin", meta, np.uint8) if "labels" in meta else None
    return token_windows(cfg.data, "web.bin", meta, T, ref, labels)

# -----------------------------------------------------------------------------
# 5. Reference scoring (Sec. 2.2): one forward pass of the frozen reference model over every web
# token gives L_RM(x_i) and its entropy H_RM(x_i), once. Blocks of windows are marked done once on
# disk, so a killed scoring resumes (start_scoring, mark_done and finish_scoring keep the files).

@torch.no_grad()
def score_web(model, meta, cfg, run):
    """<out>/<run>/ref_scores.bin: L_RM (and H_RM) of every web token, and its .json."""
    model.eval()
    web = token_windows(cfg.data, "web.bin", meta, model.config.block_size)
    path, T = os.path.join(cfg.out, run, "ref_scores.bin"), web.T
    info, done = start_scoring(path, len(web.tokens), T, web.n_windows, cfg, meta, weights_sha256(model))
    if info is None:  # already scored
        return read_json(path + ".json")
    B, (dtype, n_cols) = info["score_batch"], score_layout(info)
    todo = [b for b in range(len(done)) if not done[b] and b % WORLD == RANK]  # blocks of windows
    t0 = t_sync = time.time()
    marks, n_scored = [], 0
    with open(path + ".partial", "r+b") as scores_file, open(path + ".done", "r+b") as done_file:
        for i, b in enumerate(todo):
            ws = range(b * B, min(b * B + B, web.n_windows))  # their targets: consecutive tokens
            batch = web.get(ws, cfg.device)
            with autocast(cfg):
                scores = model_token_loss(model, batch.x, batch.y, entropy=n_cols == 2)
            scores = torch.stack(scores, -1) if n_cols == 2 else scores[..., None]
            at = n_cols * dtype.itemsize * (ws[0] * T + 1)  # row t: token t's (token 0 has none)
            os.pwrite(scores_file.fileno(), scores.float().cpu().numpy().astype(dtype).tobytes(), at)
            marks.append(b)
            n_scored += len(ws) * T
            if time.time() - t_sync > 30 or i == len(todo) - 1:  # every 30 s and at the end
                t_sync = mark_done(scores_file, done_file, marks, i + 1, len(todo), n_scored, t0, B * T)
    return finish_scoring(path, info, meta, cfg, run, time.time() - t0, n_scored)

# -----------------------------------------------------------------------------
# 6. Evaluation: held-out hq (the target) and web val losses; answer accuracy on held-out problems

class EvalSets(NamedTuple):  # what evaluate reads (eval_sets, below the boundary, checks them)
    hq: Windows      # hq_val.bin
    web: Windows     # web.bin, with the reference scores where the run reads them
    web_val: list    # web's val windows (web_split)
    problems: list   # eval.json's prompt, answer and reference solution
    max_new: int     # new tokens an answer gets (None without problems)
    enc: object      # the data's tokenizer

@torch.no_grad()
def generate(model, prompts, max_new, stop=None):  # greedy, left-padded, until stop(new tokens)
    # a prompt keeps its last T - T // 2 tokens, whatever max_new: the same prompts always
    T, device = model.config.block_size, model.lm_head.weight.device
    max_new, prompts = min(max_new, T // 2), [p[-(T - T // 2):] for p in prompts]
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)
    caches, new, ended = [[] for _ in range(model.config.n_layer)], [], [False] * len(prompts)
    h = model.decode(idx, pad, caches)
    for _ in range(max_new):
        new.append(model.lm_head(h[:, -1]).argmax(-1))
        if stop is not None:  # the batch keeps its shape to the end: stopping changes no token
            ended = [e or stop(row) for e, row in zip(ended, torch.stack(new, 1).tolist())]
            if all(ended):
                break
        h = model.decode(new[-1][:, None], pad, caches)
    return torch.stack(new, 1).tolist()

def answer_settled(text):  # whether text's final answer is settled: a line has ended after it
    m = ANSWER.search(text)
    return m is not None and "\n" in text[m.end():]

def answers(model, problems, enc, max_new):  # 1 or 0 per problem: its final answer is right
    def text(ids):  # up to the end-of-text token; padded ids (beyond the vocabulary) dropped
        ids = ids[:ids.index(enc.eot_token)] if enc.eot_token in ids else ids
        return enc.decode([t for t in ids if t < enc.n_vocab])
    settled = lambda ids: enc.eot_token in ids or answer_settled(text(ids))  # nothing can change
    prompts = [[enc.eot_token] + enc.encode_ordinary(p["prompt"]) for p in problems]
    outs = [o for i in range(0, len(prompts), 64) for o in generate(model, prompts[i:i + 64], max_new, settled)]
    return [int(final_answer(text(o)) == p["answer"]) for p, o in zip(problems, outs)]

@torch.no_grad()
def evaluate(model, ev, cfg, final=False):
    """(measures, per-token records for tokens.npz); the final evaluation answers every problem."""
    model.eval()
    web = ev.web.get(ev.web_val, cfg.device)  # web_split keeps its val windows to one batch
    web_loss, n_web = model_token_loss(model, web.x, web.y), int((web.y != IGNORE).sum())
    hq_val = list(range(min(ev.hq.n_windows, max(128, 32768 // ev.hq.T))))  # max(128, 32k tokens)
    hq_sum, n_hq = 0.0, 0
    for i in range(0, len(hq_val), 32):
        hq = ev.hq.get(hq_val[i:i + 32], cfg.device)
        hq_sum, n_hq = hq_sum + model_token_loss(model, hq.x, hq.y).sum().item(), n_hq + int((hq.y != IGNORE).sum())
    correct = answers(model, ev.problems if final else ev.problems[:cfg.eval_problems], ev.enc, ev.max_new)
    measures = {"val_loss_hq": round(hq_sum / n_hq, 4), "val_loss_web": round(web_loss.sum().item() / n_web, 4),
                "accuracy": accuracy(correct[:cfg.eval_problems])}  # the same problems each time
    if final and correct:  # metrics.json's final accuracy: of every problem
        measures["correct"] = correct
    # the records: 8 hq windows' token losses, web val's, and which of them I_k selects
    hq = ev.hq.get(range(min(ev.hq.n_windows, 8)), cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)  # its own: the training RNG stays untouched
    sel = select_tokens(web_loss, web.y, web.ref, cfg.k, cfg.scope, cfg.select, gen)
    return measures, {"hq": model_token_loss(model, hq.x, hq.y).half().cpu(), "web": web_loss.half().cpu(),
                      "sel": sel.cpu()}

# -----------------------------------------------------------------------------
# 7. Training: base (the demo's), reference (CLM on hq), continual pretraining (CLM or SLM on web)

def lr_at(step, cfg):  # linear warmup, then cosine decay to 10% of the peak
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

def adamw(model, cfg):  # weight decay on matrices and embeddings, not biases and gains (nanoGPT)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

def micro_batch_selection(model, fwd, micro_batches, cfg, gen):  # I_k needs the step's losses first
    y, ref = torch.cat([b.y for b in micro_batches]), torch.cat([b.ref for b in micro_batches])
    loss = torch.zeros(y.shape, device=y.device)  # zeros: a rule that reads no training loss
    if cfg.select in ("excess", "train", "sample"):  # no grad; the head weight after fwd (FSDP)
        with torch.no_grad(), autocast(cfg):
            loss = torch.cat([head_losses(fwd(b.x), model.lm_head.weight, b.y).loss for b in micro_batches])
    sel, n_sel = select_step(loss, y, ref, cfg, gen)
    return list(sel.split(len(micro_batches[0].y))), n_sel

def train_step(model, fwd, micro_batches, cfg, gen):
    """The gradients of the mean loss over the step's selected tokens, however the step is split
    (this process's micro-batches; fwd: the forward as trained): (the loss, I_k of each)."""
    if cfg.k == 1:  # CLM: every valid token carries the loss (--slm --k 1 too)
        sels = [b.y != IGNORE for b in micro_batches]
        n_sel = int(sum_ranks(sum(s.sum() for s in sels)))
    elif len(micro_batches) > 1:
        sels, n_sel = micro_batch_selection(model, fwd, micro_batches, cfg, gen)
    losses = []
    for i, b in enumerate(micro_batches):
        set_gradient_sync(model, fwd, cfg, WORLD == 1 or i == len(micro_batches) - 1)  # at the last
        with autocast(cfg):
            h, w = fwd(b.x), model.lm_head.weight  # w after the forward: FSDP gathers it there
            if cfg.k == 1:
                loss, token_losses = fused_clm_loss(h, w, b.y, n_sel)
            elif len(micro_batches) == 1:  # the whole step in one forward: I_k from its own losses
                loss, token_losses, sel = fused_slm_loss(h, w, b.y, b.ref, cfg, gen)
                sels = [sel]
            else:  # I_k chosen above: this forward, with grad, recomputes the head's losses
                per_token = head_losses(h, w, b.y)
                loss = selected_loss(h, w, b.y, per_token, sels[i], n_sel)
                token_losses = per_token.loss
        # DDP and FSDP average gradients over processes; n_sel already counts every process's
        (loss * WORLD).backward()
        # a NaN in any token's loss stops the run, even where SLM selected none of them
        losses.append(torch.where(token_losses.isfinite().all(), loss.detach(), float("nan")))
    return sum_ranks(torch.stack(losses).sum()), sels

def train(cfg, shape):
    """One run: --base, --ref (then it scores web), --clm or --slm; shape: the shape flags given."""
    meta = load_meta(cfg.data)
    per_forward = sequences_per_forward(cfg)
    name = run_name(cfg)
    ckpt_path = os.path.join(cfg.out, name, "ckpt.pt")
    old_files = earlier_run(os.path.dirname(ckpt_path), cfg)
    model = build_model(cfg, meta, shape)
    T = model.config.block_size
    corpus, n_train, ref_sha = training_windows(cfg, meta, T)
    ev = eval_sets(cfg, meta, corpus if cfg.mode in ("clm", "slm") else web_windows(cfg, meta, T))
    gen = torch.Generator().manual_seed(cfg.seed)  # the random control's: the same everywhere
    progress = new_progress(model, ref_sha, meta, cfg)
    model = recompute_and_shard(model, cfg)
    opt, start = adamw(model, cfg), 0
    if cfg.resume and os.path.isfile(ckpt_path):
        start, progress = resume(ckpt_path, model, opt, gen, cfg, meta, ref_sha)
    if RANK == 0:
        take_run_folder(os.path.dirname(ckpt_path), old_files, cfg)
        print_run(cfg, name, model, T, per_forward, start)
    fwd, interval = forward_as_trained(model, cfg), Interval(start, progress, cfg.device)
    for step in range(start, cfg.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        micro_batches = corpus.step_batches(step, cfg.batch_size, cfg.seed, cfg.device, n_train, per_forward)
        opt.zero_grad(set_to_none=True)
        loss, sels = train_step(model, fwd, micro_batches, cfg, gen)  # the selected tokens' mean
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        stop_if_not_finite(loss, norm, step, name, cfg, progress, ckpt_path)
        opt.step()
        count_step(progress, interval, loss, micro_batches, sels, cfg, T)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate_and_save(model, opt, gen, ev, cfg, meta, name, step + 1, progress, interval)
    return finish_run(model, ev, cfg, meta, name, progress)

def main(argv=None):
    cfg, shape = parse_args(argv)
    # the folders this command may make: a failed one removes those it made that are still empty
    made = [d for d in (os.path.join(cfg.out, run_name(cfg)), cfg.out) if not os.path.exists(d)]
    # one of torchrun's processes (--fsdp on one too: a resume on fewer)
    if WORLD > 1 or cfg.fsdp:
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops as Ctrl-C does
    try:
        if WORLD > 1:
            same_flags_on_every_process(cfg, shape)
        return score_again(cfg) if cfg.mode == "score" else train(cfg, shape)
    except OSError as e:
        # a full disk or a lost folder mid-run: it resumes
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
        # DDP's reference cycles first: a gloo group left can abort
        if dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()

# =================================================================================================
# THE MACHINERY. Everything below serves the method above; a student may stop reading here.
# Config and flags; models from checkpoints and transformers; processes (DDP, FSDP2); run folders,
# checkpoints and resume; the reference scores' file; records.
# =================================================================================================

# -----------------------------------------------------------------------------
# a run's setup and records: what train calls around the step

def training_windows(cfg, meta, T):
    """(base's, hq's or web's windows, with the scores SLM reads; how many train; the reference
    model's sha256 or None)."""
    ref, ref_sha = None, None
    if cfg.mode in ("base", "ref"):
        if cfg.mode == "base" and "base" not in meta["tokens"]:
            die(f"{cfg.data} has no base corpus (only the embedded demo builds base.bin): start "
                "from your own base model with --init_from CKPT, or from scratch without it")
        corpus = token_windows(cfg.data, "base.bin" if cfg.mode == "base" else "hq_train.bin", meta, T)
        n_train = corpus.n_windows
    else:
        if cfg.mode == "slm" and cfg.select not in ("random", "train"):
            ref, ref_sha = load_ref_scores(cfg, meta, T)
        corpus = web_windows(cfg, meta, T, ref)
        n_train = web_split(corpus.n_windows, T)
    corpus.step_windows(0, cfg.batch_size, cfg.seed, n_train)  # fewer than one batch: refused now
    return corpus, n_train, ref_sha

def eval_sets(cfg, meta, web):
    T, enc = web.T, get_encoding(meta["encoding"])
    problems = read_problems(cfg, meta, T)
    longest = max((len(enc.encode_ordinary(p["solution"])) for p in problems), default=0)
    # twice the longest reference solution and 16, in the half of the context left to answers
    max_new = min(T // 2, 2 * longest + 16) if problems else None
    if longest + 1 > T // 2 and RANK == 0:
        print(f"note: {os.path.join(cfg.data, 'eval.json')}: reference answers of up to {longest} "
              f"tokens, but a context of {T} leaves answers {T // 2}: longer ones are cut short (a "
              "larger --block_size fits them)", file=sys.stderr)
    web_val = list(range(web_split(web.n_windows, T), web.n_windows))
    return EvalSets(token_windows(cfg.data, "hq_val.bin", meta, T), web, web_val, problems,
                    max_new, enc)

def new_progress(model, ref_sha, meta, cfg):  # a run's Progress at step 0
    n_labels = len(meta["labels"]) if "labels" in meta and cfg.mode in ("clm", "slm") else 0
    return Progress(weights_sha256(model), ref_sha, by_label=[[0] * n_labels, [0] * n_labels])

class Interval:  # since the last evaluation: its step, the clock, the losses' sum, label counts
    def __init__(self, step, progress, device):
        self.counts = torch.zeros(2, len(progress.by_label[0]), dtype=torch.long, device=device)
        self.reset(step)

    def reset(self, step):
        self.step, self.t0, self.loss_sum = step, time.time(), 0.0
        self.counts.zero_()

def count_step(progress, interval, loss, micro_batches, sels, cfg, T):  # a step's tokens and loss
    progress.tokens_seen += cfg.batch_size * T
    progress.tokens_trained += int(sum_ranks(sum(s.sum() for s in sels)))
    progress.losses.append(loss.item())
    interval.loss_sum += progress.losses[-1]
    n_labels = interval.counts.shape[1]
    # the demo's audit, per noise label
    for b, sel in zip(micro_batches, sels) if n_labels else ():
        labels = b.labels.flatten().long()
        interval.counts += torch.stack([torch.bincount(labels, minlength=n_labels),
                                        torch.bincount(labels[sel.flatten()], minlength=n_labels)])

def evaluate_and_save(model, opt, gen, ev, cfg, meta, name, step, progress, interval):
    """An evaluation, its log line and a checkpoint; under FSDP every process takes part."""
    t_eval = time.time()
    progress.wall_s += t_eval - interval.t0
    # every process counted its own share
    if interval.counts.shape[1]:
        sum_ranks(interval.counts)
    ckpt_path = os.path.join(cfg.out, name, "ckpt.pt")
    if RANK == 0 or cfg.fsdp:
        # at the precision of training and scoring
        with autocast(cfg):
            measures, records = evaluate(model, ev, cfg, step == cfg.steps)
        states = save_states(model, opt, cfg, ckpt_path, step)
    if RANK == 0:
        measures["eval_s"] = round(time.time() - t_eval, 2)  # apart from wall_s
        n_steps, dt = step - interval.step, t_eval - interval.t0
        line = log_evaluation(progress, step, interval.loss_sum / n_steps, measures, records,
                              interval.counts.tolist(), meta.get("labels"))
        save_checkpoint(ckpt_path, model, states, gen, step, cfg, meta, progress)
        n_tokens = n_steps * cfg.batch_size * model.config.block_size
        print(f"{name} {line} | {n_tokens / dt / 1000:.1f}k tok/s | eta {(cfg.steps - step) * dt / n_steps:.0f}s",
              flush=True)
    interval.reset(step)

def finish_run(model, ev, cfg, meta, name, progress):  # --ref scores web; tokens.npz, metrics.json
    extra = {"eval_problems": len(ev.problems[:cfg.eval_problems]), "answer_tokens": ev.max_new}
    path = os.path.join(cfg.out, name, "ckpt.pt")
    # every process scores its share; under FSDP with the whole model
    if cfg.mode == "ref":
        if cfg.fsdp:
            dist.barrier()  # once rank 0 has written the last ckpt.pt
            model = model_from_checkpoint(load_checkpoint(path), None, path).to(cfg.device)
        info = score_web(model, meta, cfg, name)
        extra.update(score_s=info["score_s"], score_tok_s=info["score_tok_s"])
    if RANK == 0:
        write_token_losses(os.path.join(cfg.out, name, "tokens.npz"), progress, ev)
        return write_metrics(cfg, meta, name, progress, os.path.join(cfg.out, name), model, extra)

# -----------------------------------------------------------------------------
# config: every flag with its default and help, in one place; parse_args assembles a run's config

def option(default, text):  # a RunConfig field: its default and its --help
    return field(default=default, metadata={"help": text})

@dataclass
class RunConfig:
    """Every field but mode is a flag. --base, --ref and --clm have k = 1 and select "all" (every
    token carries the loss); --score reads only the flags MODE_FLAGS names."""
    mode: str = "slm"
    data: str = option("data/demo", "prepared data folder")
    out: str = option("out", "runs folder")
    name: str = option("", "run name (default: base, ref, clm, slm-k0.6, ...)")
    ref_run: str = option("ref", "--slm: the reference run whose scores it reads")
    steps: int = option(1200, "optimizer steps (the demo: --ref 2000, --clm and --slm 4500)")
    batch_size: int = option(16, "sequences per step")
    lr: float = option(3e-3, "peak learning rate (warmup, then cosine to 10%%)")
    warmup: int = option(20, "steps of linear warmup (default 20 or a preset's, at most a tenth "
                         "of --steps)")
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices and embeddings")
    grad_clip: float = option(1.0, "gradient norm clip")
    k: float = option(0.6, "--slm: the share of tokens selected, in (0, 1]")
    select: str = option("excess", "--slm: what I_k ranks by (token_score): excess is the "
                         "paper's, random the control")
    scope: str = option("batch", "top-k over the step's tokens (batch) or within each sequence")
    seed: int = option(1337, "seed of the model init, batch order and random selection")
    micro_batch: int = option(0, "sequences per forward on each process (the top-k still spans "
                              "the step); 0: all")
    dtype: str = option("auto", "autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    compile: bool = option(False, "torch.compile the model's forward")
    fsdp: bool = option(False, "under torchrun, shard weights, gradients and AdamW's state "
                        "(FSDP2), not DDP")
    act_ckpt: bool = option(False, "recompute each block's activations in the backward")
    score_batch: int = option(64, "windows per forward when scoring")
    score_dtype: str = option("float32", "--ref, --score: the scores' dtype")
    scores: str = option("loss,entropy", "--ref, --score: what is stored of each web token: L_RM "
                         "and H_RM, or loss (L_RM alone: half the file, no --select entropy)")
    eval_every: int = option(100, "steps between evaluations and checkpoints")
    eval_problems: int = option(200, "held-out problems for answer accuracy")
    init_from: str = option("", "a run in --out (the demo's default: base), a ckpt.pt, scratch, "
                            "or a transformers causal LM: hf:NAME or a save_pretrained directory")
    preset: str = option("demo", "defaults for every flag it names (PRESETS); flags given win; '' "
                         "for none")
    resume: bool = option(False, "continue <out>/<name>/ckpt.pt where it stopped")
    overwrite: bool = option(False, "replace an earlier run of this name")
    device: str = option("cpu", "cpu, cuda or cuda:N")

PRESETS = {  # --preset NAME: defaults for the flags it names; {mode: value}: one per mode
    # the demo: the reference model past its accuracy transition; continual pretraining 2.25x its
    # tokens (the paper: 10x)
    "demo": {"eval_every": 200, "steps": {"ref": 2000, "clm": 4500, "slm": 4500}},
    # the paper's setting at small scale: GPT-2 124M; the reference model 315M tokens (3 epochs of
    # ~100M hq), continual pretraining 1.05B
    "gpt2-owm": {"init_from": "hf:gpt2", "block_size": 1024, "batch_size": 512, "micro_batch": 32,
                 "warmup": 100, "eval_every": 250, "eval_problems": 200, "compile": True, "k": 0.6,
                 "steps": {"ref": 600, "clm": 2000, "slm": 2000}, "lr": {"ref": 1e-4, "clm": 1e-4, "slm": 1e-4}},
    # the paper's own runs (Sec. 3): 15B web tokens in steps of ~1M; the reference model 3 epochs
    # of 0.5B hq tokens
    "tinyllama-owm": {"init_from": "hf:TinyLlama/TinyLlama_v1.1", "block_size": 2048, "batch_size": 512,
                      "k": 0.6, "micro_batch": 8, "warmup": 200, "eval_every": 500, "fsdp": True,
                      "steps": {"ref": 1431, "clm": 14305, "slm": 14305},
                      "lr": {"ref": 5e-5, "clm": 8e-5, "slm": 8e-5}},
    "mistral-owm": {"init_from": "hf:mistralai/Mistral-7B-v0.1", "block_size": 4096, "batch_size": 256,
                    "k": 0.7, "micro_batch": 2, "warmup": 200, "eval_every": 500, "fsdp": True,
                    "steps": {"ref": 1431, "clm": 14305, "slm": 14305},
                    "lr": {"ref": 1e-5, "clm": 2e-5, "slm": 2e-5}}}

MODES = {"base": "train a base model on the general corpus (base.bin; the demo has one)",
         "ref": "train the reference model on hq, then score every web token with it",
         "score": "score web again with an existing reference model (--name, default ref)",
         "clm": "continual pretraining on web, loss on every token (the baseline)",
         "slm": "continual pretraining on web with the SLM loss (--k, --select, --scope)"}
CHOICES = {"select": ("excess", "random", "ref", "entropy", "ref_entropy", "train", "sample"),
           "preset": ("", *PRESETS), "scope": ("batch", "sequence"),
           "dtype": ("auto", "float32", "bfloat16"), "score_dtype": ("float32", "float16"),
           "scores": ("loss,entropy", "loss")}
# the flags each mode reads beyond --data, --out and --device; any other flag given is refused
SHAPE = ("block_size", "n_layer", "n_head", "n_embd")
SLM_FLAGS = {"k", "select", "scope", "ref_run"}
SCORE_FLAGS, PLACE_FLAGS = {"score_batch", "score_dtype", "scores"}, {"data", "out", "device"}
RUN_FLAGS = {f.name for f in fields(RunConfig)} - SLM_FLAGS - SCORE_FLAGS - PLACE_FLAGS - {"mode"}
RUN_FLAGS |= set(SHAPE)
MODE_FLAGS = {"base": RUN_FLAGS, "ref": RUN_FLAGS | SCORE_FLAGS, "clm": RUN_FLAGS,
              "slm": RUN_FLAGS | SLM_FLAGS, "score": {"name", "dtype", "overwrite"} | SCORE_FLAGS}

def parse_args(argv=None):
    """(RunConfig, GPTConfig of the shape flags, None where not given): the defaults, then the
    preset's, then the flags given, then what the mode and the data imply."""
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
        v, text = getattr(d, f.name), f.metadata["help"]
        # --compile and --no-compile: a preset's True can be turned off
        if isinstance(v, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=text)
        else:  # choices shown as {a|b}: a choice may hold a comma (--scores loss,entropy)
            choices = CHOICES.get(f.name)
            shown = choices and "{" + "|".join(c or "''" for c in choices) + "}"
            p.add_argument(f"--{f.name}", type=type(v), choices=choices, metavar=shown,
                           help=text + (f" (default {v})" if v else ""))
    for key in SHAPE:
        p.add_argument(f"--{key}", type=int, help=f"model {key} (default {getattr(GPTConfig, key)}; "
                       "a model started from takes its own, its context cropped to --block_size)")
    given = vars(p.parse_args(argv))  # only the flags given: they win over a preset's
    mode = next(m for m in MODES if given.pop(m, False))
    preset = {key: v[mode] if isinstance(v, dict) else v for key, v in
              PRESETS.get(given.get("preset", d.preset), {}).items() if not isinstance(v, dict) or mode in v}
    a = argparse.Namespace(**{**asdict(d), **dict.fromkeys(SHAPE), **preset, **given})
    # a default (or a preset's) warmup is at most a tenth of the run
    if "warmup" not in given:
        a.warmup = min(a.warmup, a.steps // 10)
    check_flags(a, mode, set(given))
    # --base, --ref and --clm: every token carries the loss
    if mode != "slm":
        a.k, a.select = 1.0, "all"
    if a.dtype == "auto":
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    # each of torchrun's processes drives its own GPU
    if (WORLD > 1 or a.fsdp) and a.device.startswith("cuda"):
        a.device = f"cuda:{LOCAL}"
    # on the demo, runs start from the base run, as the paper's models start from one base model
    if not a.init_from and mode not in ("base", "score") and has_base_corpus(a.data):
        a.init_from = "base"
    cfg = RunConfig(**{f.name: getattr(a, f.name) for f in fields(RunConfig)[1:]}, mode=mode)
    return cfg, GPTConfig(**{key: getattr(a, key) for key in SHAPE})

def has_base_corpus(data):  # whether prepared data holds base.bin (the demo's)
    try:
        return "base" in read_json(os.path.join(data, "meta.json"))["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        # not prepared: load_meta says so
        return False

def check_flags(a, mode, given):
    """Bad values, and flags the mode does not read: one line each, before anything runs."""
    ignored = sorted(given - MODE_FLAGS[mode] - PLACE_FLAGS)
    if ignored:
        them = "them" if len(ignored) > 1 else "it"
        whose = " (--slm's flags)" if set(ignored) <= SLM_FLAGS else \
            " (--ref's and --score's flags)" if set(ignored) <= SCORE_FLAGS else ""
        die(f"{' '.join('--' + f for f in ignored)}: --{mode} does not read {them}{whose}; drop {them}")
    # '' would name the current folder
    if not a.data.strip():
        die(f"--data {a.data!r}: empty: name a prepared data folder (default data/demo)")
    if not a.ref_run.strip():
        die(f"--ref_run {a.ref_run!r}: empty: name a reference run in --out (default ref)")
    if not 0 < a.k <= 1:
        die(f"--k {a.k}: k is the share of tokens selected and must be in (0, 1], e.g. --k 0.6")
    for key, at_least in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("score_batch", 1),
                          ("lr", 1e-30), ("grad_clip", 1e-30), ("micro_batch", 0), ("warmup", 0),
                          ("weight_decay", 0), ("eval_problems", 0), ("seed", 0),
                          *[(key, 1) for key in SHAPE if getattr(a, key) is not None]):
        v = getattr(a, key)
        # NaN fails every comparison
        if not v >= at_least or v == math.inf:
            die(f"--{key} {v}: must be {'0 or more' if at_least == 0 else 'positive'}"
                + (" and finite" if isinstance(v, float) else ""))
    if a.seed > SEED_MAX:
        die(f"--seed {a.seed}: must be at most {SEED_MAX}")
    if not a.out:
        die("--out '': give the runs' folder (default out; '.' for the current folder)")
    # a run is a folder right in --out ('' is --name's default)
    for key in ("name", "ref_run"):
        v = getattr(a, key)
        if v in (".", "..") or "/" in v or os.sep in v or len(v) > 100:
            die(f"--{key} {v[:40]!r}{'...' * (len(v) > 40)}: a run's name in --out: at most 100 "
                "characters, no path separators, not '.' or '..'")
    if a.warmup >= a.steps and mode != "score":
        die(f"--warmup {a.warmup}: must be fewer than --steps {a.steps}, or the LR never reaches --lr")
    if a.fsdp and "RANK" not in os.environ:
        die("--fsdp: shards the model across torchrun's processes: run under torchrun --nproc_per_node N")
    if a.resume and a.overwrite:
        die("--resume --overwrite: continue the earlier run or replace it, not both; drop one")
    if a.select == "sample" and a.scope != "batch":
        die("--select sample ranks whole sequences of the step: it has no --scope sequence; drop --scope")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        die(f"--device {a.device}: rho runs on cpu, cuda or cuda:N")
    if a.device != "cpu" and not torch.cuda.is_available():
        die(f"--device {a.device}: this torch sees no CUDA GPU ({torch.__version__}); use --device cpu")

def run_name(cfg):  # --name's default: base, ref, clm, slm-k0.6[-select][-scope]
    if cfg.name or cfg.mode != "slm":
        return cfg.name or ("ref" if cfg.mode == "score" else cfg.mode)
    rule = "" if cfg.select == "excess" else f"-{cfg.select}"
    rule += "" if cfg.scope == "batch" else f"-{cfg.scope}"
    return f"slm-k{cfg.k:g}{rule}"

def command(mode, cfg, **flags):
    """A rho.py command line that runs as is: --mode, --name, cfg's --data, --out and --device,
    then flags; a flag at its default (None, False) is left out."""
    default = asdict(RunConfig())
    default["dtype"] = "bfloat16" if cfg.device.startswith("cuda") else "float32"
    given = {"name": flags.pop("name", None), "data": cfg.data, "out": cfg.out, "device": cfg.device, **flags}
    words = [f"--{key}" + ("" if v is True else f" {shlex.quote(str(v))}")
             for key, v in given.items() if v is not None and v is not False and v != default.get(key)]
    return f"`python rho.py {' '.join([f'--{mode}', *words])}`"

def saved_flags(ckpt, mode):  # the flags of a checkpoint's run that --mode reads; its own shape
    reads = MODE_FLAGS[mode] - {"resume", "overwrite"}
    flags = {key: v for key, v in ckpt["config"].items() if key in reads}
    own = flags.get("init_from") in ("", "scratch")
    return {**flags, **{key: v for key, v in ckpt["model_config"].items()
                        if key == "block_size" or own and key in SHAPE}}

# -----------------------------------------------------------------------------
# models: from scratch, from a run's checkpoint, or a transformers causal LM (HF)

class HF(nn.Module):
    """A transformers causal LM as our GPT: hidden states from forward, the head's weight."""
    def __init__(self, hf, block_size, source):
        super().__init__()
        c, self.hf = hf.config, hf
        T = block_size or min(c.max_position_embeddings, 2048)  # at most the paper's 1B context
        if T > c.max_position_embeddings:
            die(f"--block_size {T}: {source} has {c.max_position_embeddings} positions; pass "
                f"--block_size {c.max_position_embeddings} or less")
        self.config = GPTConfig(T, self.lm_head.weight.shape[0], c.num_hidden_layers,
                                c.num_attention_heads, c.hidden_size)
        # the head must be h @ W.T: no soft-capping or scale in the config (Gemma 2, Cohere,
        # Granite, Falcon-H1), even where random weights give small logits; then probed (a bias)
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
    def lm_head(self):  # the model's own head, tied or not (no second copy in the state_dict)
        return self.hf.get_output_embeddings()

    def forward(self, idx):
        return self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state

    def decode(self, idx, pad, caches):  # as GPT.decode, with transformers' Cache in caches[0]
        from transformers import DynamicCache
        past, T = caches[0][0] if caches[0] else DynamicCache(config=self.hf.config), idx.shape[1]
        keys = torch.arange(past.get_seq_length() + T, device=idx.device)
        out = self.hf.base_model(input_ids=idx, attention_mask=(keys[None] >= pad[:, None]).long(),
                                 position_ids=(keys[None, -T:] - pad[:, None]).clamp(min=0),
                                 past_key_values=past, use_cache=True)
        caches[0][:] = [out.past_key_values]
        return out.last_hidden_state

def load_hf(source, block_size=None, config=None):  # hf:NAME or a folder; config: random weights
    try:
        import transformers
    except ImportError:
        die(f"--init_from {source}: needs transformers: pip install transformers")
    name, auto = source.removeprefix("hf:"), transformers.AutoModelForCausalLM
    try:
        c = transformers.AutoConfig.for_model(**json.loads(config)) if config else \
            from_hub(transformers.AutoConfig.from_pretrained, name)
        # no dropout: GPT-2's resid_pdrop, Llama's ...
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
    # transformers would leave them random, and only warn
    if info["missing_keys"]:
        die(f"--init_from {source}: no weights for {', '.join(sorted(info['missing_keys'])[:3])}: "
            "not a causal LM checkpoint (a base model without its head?)")
    return HF(hf.float(), block_size, source)

def check_tokenizer(cfg, meta):  # the data's ids must be the model's own tokenizer's
    want = meta.get("tokenizer", {}).get("sha256")  # its fingerprint, recorded by prepare.py
    # tokenizer_id_of gives None for a model without a tokenizer
    if want and tokenizer_id_of(cfg.init_from) not in (None, want):
        die(f"--init_from {cfg.init_from}: {cfg.data} was prepared with another tokenizer "
            f"({meta['tokenizer']['name']}): prepare it with `python prepare.py ... --encoding "
            f"{cfg.init_from}`")

def weights_sha256(model):  # a model's fingerprint: a resumed scoring needs the same one
    sha = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        sha.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()

def build_model(cfg, meta, shape):  # from scratch, of the shape flags given, or from a model
    torch.manual_seed(cfg.seed)
    given = {key: v for key, v in asdict(shape).items() if v is not None and key != "vocab_size"}
    if cfg.init_from in ("", "scratch"):
        shape = GPTConfig(**given, vocab_size=64 * math.ceil(meta["vocab_size"] / 64))
        if shape.n_embd % shape.n_head:
            die(f"--n_embd {shape.n_embd}: must be a multiple of --n_head {shape.n_head} (each "
                "head gets n_embd / n_head)")
        return GPT(shape).to(cfg.device)
    saved_by_hf = os.path.isfile(os.path.join(cfg.init_from, "config.json"))
    hf = cfg.init_from.startswith("hf:") or saved_by_hf
    path = None if hf else init_path(cfg)
    ignored = [f"--{key}" for key in given if key != "block_size"]
    if ignored and RANK == 0:
        print(f"warning: {' '.join(ignored)} ignored: the model's shape comes from {cfg.init_from}",
              file=sys.stderr)
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

def init_path(cfg):  # --init_from's checkpoint: a ckpt.pt, a run's folder, a run in --out
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
        what = "an empty folder" if not os.listdir(cfg.init_from) else "prepared data (meta.json)" \
            if os.path.isfile(os.path.join(cfg.init_from, "meta.json")) else "a folder without ckpt.pt or config.json"
        die(f"--init_from {cfg.init_from}: {what}, not a model: pass a run's folder or its ckpt.pt, "
            f"the name of a run in --out ({cfg.out}), scratch, hf:NAME, or a folder saved by "
            "transformers' save_pretrained")
    return cfg.init_from

def model_from_checkpoint(ckpt, block_size, path):  # ours or transformers', its context cropped
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

def full_state_dict(ckpt, path, new_model):  # an FSDP run's read whole from its shards
    if not isinstance(ckpt["model"], str):
        return ckpt["model"]
    import torch.distributed.checkpoint as dcp
    sd = new_model().state_dict()
    # dcp warns that it assumes a single process: what is asked here
    with warnings.catch_warnings(action="ignore", category=UserWarning):
        dcp.load({"model": sd}, checkpoint_id=os.path.join(os.path.dirname(path), ckpt["model"]),
                 no_dist=True)
    return sd

# -----------------------------------------------------------------------------
# processes: one, or one per GPU under torchrun (DDP, FSDP2), each with a contiguous share of a step

def sequences_per_forward(cfg):  # --micro_batch (0: all), checked against the step
    if cfg.batch_size % WORLD:
        die(f"--batch_size {cfg.batch_size}: not divisible by the {WORLD} processes; use a "
            f"multiple of {WORLD}")
    share = cfg.batch_size // WORLD
    if share % (cfg.micro_batch or share):
        die(f"--micro_batch {cfg.micro_batch}: must divide the {share} sequences each process "
            f"holds per step (--batch_size {cfg.batch_size} over {WORLD} processes)")
    return cfg.micro_batch or share

def recompute_and_shard(model, cfg):  # --act_ckpt: recompute each block's activations; --fsdp: shard
    if not (cfg.act_ckpt or cfg.fsdp):
        return model
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    cuda = cfg.device.startswith("cuda")
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if cuda else MixedPrecisionPolicy()
    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    for block in blocks:
        if cfg.act_ckpt:
            checkpoint(block)
        if cfg.fsdp:
            fully_shard(block, mp_policy=mp)
            # generation's forward gathers the weights too
            if isinstance(block, Block):
                register_fsdp_forward_method(block, "decode")
    if cfg.fsdp:
        # the root's weights stay gathered after the forward: the fused head reads the head weight
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        register_fsdp_forward_method(model, "decode")
    return model

def forward_as_trained(model, cfg):  # what training calls: compiled, in DDP; model: the weights
    fwd = torch.compile(model) if cfg.compile else model
    if WORLD > 1 and not cfg.fsdp:
        fwd = DDP(fwd, device_ids=[LOCAL] if cfg.device.startswith("cuda") else None)
    return fwd

def set_gradient_sync(model, fwd, cfg, sync):  # whether the backward reduces gradients
    if cfg.fsdp:
        model.set_requires_gradient_sync(sync)
    elif WORLD > 1:
        fwd.require_backward_grad_sync = sync  # all that DDP's no_sync() sets (as nanoGPT does)

def autocast(cfg):  # bfloat16 for the model's forward (the default on CUDA), or none
    return torch.autocast(torch.device(cfg.device).type, torch.bfloat16,
                          enabled=cfg.dtype == "bfloat16")

def gather_rows(t):  # every process's rows of t, in rank order: the whole step's
    if WORLD == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)

def sum_ranks(t):
    if WORLD > 1:
        dist.all_reduce(t)
    return t

def same_flags_on_every_process(cfg, shape):  # torchrun's processes must run one run
    mine = {**asdict(cfg), **asdict(shape), "device": None}  # each has its own device
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
    """ckpt.pt's model and optimizer: their state_dicts; under FSDP the name of a DCP folder beside
    it, where each process writes its shards, never whole on one (every process calls it)."""
    if not cfg.fsdp:
        return model.state_dict(), opt.state_dict()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    shards = f"{ckpt_path[:-len('.pt')]}-{step}.dcp"
    dcp.save({"model": get_model_state_dict(model),
              "optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=shards)
    return os.path.basename(shards), None

def load_states(model, opt, ckpt, cfg, path):  # on any number of processes, resharded as read
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
LOCK = "run.lock"  # "PID HOST" of the command writing a run's folder, removed as it exits

def earlier_run(out_dir, cfg):  # an earlier run's files: refused unless --resume or --overwrite
    old = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    old += [os.path.basename(d) for d in sorted(glob.glob(os.path.join(out_dir, "ckpt-*.dcp")))]
    if old and not (cfg.resume or cfg.overwrite):
        # a torn ckpt.pt (torch.save writes a zip) cannot be resumed
        torn = "ckpt.pt" in old and not zipfile.is_zipfile(os.path.join(out_dir, "ckpt.pt"))
        how = "its ckpt.pt is not a whole torch file (cut short?), so it cannot resume: " if torn \
            else "--resume continues it, "
        die(f"{out_dir}: holds a{' finished' if 'metrics.json' in old else 'n unfinished'} run "
            f"({', '.join(old)}): {how}--overwrite replaces it, --name NAME starts this one beside it")
    return old

def lock_run(out_dir):  # a second command on a run is refused while the first runs
    path = os.path.join(out_dir, LOCK)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        held = Path(path).read_text().split()  # [pid, host]
        here = len(held) == 2 and held[0].isdigit() and held[1] == socket.gethostname()
        if not here or int(held[0]) != os.getpid() and running(int(held[0])):
            who = f"process {held[0]} on {held[1]}" if len(held) == 2 else "another command"
            die(f"{out_dir}: in use by {who} ({LOCK}): wait for it to end or stop it; if no command is "
                f"running there, delete {path}")
        print(f"{out_dir}: took over {LOCK} of process {held[0]}, which is no longer running (killed?)")
        os.remove(path)
        return lock_run(out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}")

def running(pid):  # signal 0 only asks whether it exists (PermissionError: another user's)
    try:
        return os.kill(pid, 0) is None
    except PermissionError:
        return True
    except ProcessLookupError:
        return False

def unlock(out_dir):  # the run's lock, if this process holds it
    path = os.path.join(out_dir, LOCK)
    if os.path.isfile(path) and Path(path).read_text().split()[:1] == [str(os.getpid())]:
        os.remove(path)

def take_run_folder(out_dir, old_files, cfg):  # made, locked, tested; --overwrite empties it
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
    token_records: dict = field(default_factory=lambda: {"hq": [], "web": [], "sel": []})

def save_checkpoint(path, model, states, gen, step, cfg, meta, progress):  # atomically
    hf = {"hf_config": model.hf.config.to_json_string()} if isinstance(model, HF) else {}
    try:
        torch.save({"model": states[0], "optimizer": states[1], "rng": gen.get_state(),
                    "step": step, "config": asdict(cfg), "model_config": asdict(model.config),
                    "encoding": meta["encoding"], "n_vocab": meta["vocab_size"],
                    "data_sha256": meta["sha256"], "progress": vars(progress), **hf},
                   path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        # a full disk: torch.save raises either
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        hist = progress.history
        intact = f"the checkpoint of step {hist[-2]['step']} is intact" if len(hist) > 1 else \
            "no earlier checkpoint"
        die(f"{path}: could not write the checkpoint ({str(e).strip().splitlines()[-1]}); {intact}: "
            "free disk space, then run again with --resume")
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
        die(f"{path}: a torch file, but not a checkpoint written by rho.py (no {', '.join(sorted(missing))}): "
            "pass a run's ckpt.pt, the name of a run in --out, or scratch")
    if meta is not None and (ckpt["n_vocab"], ckpt["encoding"]) != (meta["vocab_size"], meta["encoding"]):
        die(f"{path}: {what} has vocabulary {ckpt['encoding']} ({ckpt['n_vocab']} tokens) but the "
            f"data has {meta['encoding']} ({meta['vocab_size']}): prepare the data with --encoding "
            f"{ckpt['encoding']} or train a new model")
    shards = ckpt["model"]
    if isinstance(shards, str) and not os.path.isdir(os.path.join(os.path.dirname(path), shards)):
        die(f"{path}: its weights are the FSDP shards {shards} beside it, which are missing: "
            "restore that folder next to ckpt.pt (copy a run's folder whole)")
    return ckpt

def resume(ckpt_path, model, opt, gen, cfg, meta, ref_sha):
    """--resume: ckpt.pt's weights, optimizer, RNG and Progress, once its flags and data are this
    run's. Returns (the step to go on from, Progress)."""
    ckpt = load_checkpoint(ckpt_path, meta)
    saved, now = {**ckpt["config"], **ckpt["model_config"]}, {**asdict(cfg), **asdict(model.config)}
    if saved["mode"] != cfg.mode:
        die(f"--resume: this is a --{cfg.mode} run, but {ckpt_path} holds a --{saved['mode']} run; give this "
            "one another --name")
    # free: how a run computes or where it lives, not what (the data: by its sha256)
    free = ("resume", "device", "compile", "act_ckpt", "micro_batch", "score_batch", "preset", "out",
            "name", "data")
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
        print(f"{name}: " + (f"resumed from {ckpt_path} at step {start}" if start else
                             "no checkpoint: from step 0"))
    n_params = sum(p.numel() for p in model.parameters())
    n_micro = cfg.batch_size // WORLD // per_forward
    split = f", {WORLD} process{'es' * (WORLD > 1)} x {n_micro} micro-batch{'es' * (n_micro > 1)} " \
        f"of {per_forward}"
    rule = f" k={cfg.k} select={cfg.select} scope={cfg.scope}" if cfg.mode == "slm" else ""
    print(f"{name}: {n_params / 1e6:.2f}M params, {cfg.steps} steps of {cfg.batch_size}x{T} tokens"
          f"{split if per_forward < cfg.batch_size else ''}, {cfg.mode}{rule}")

def stop_if_not_finite(loss, norm, step, name, cfg, progress, ckpt_path):
    """Before the optimizer step: no NaN reaches a checkpoint. The flags that size a step are
    named, none blamed: what diverged is not known."""
    for what, v in (("loss", loss), ("gradient norm", norm)):
        if not torch.isfinite(v):
            last = progress.history[-1] if progress.history else None
            saved = f"; {ckpt_path} holds the last weights saved (step {last['step']}, val loss hq " \
                f"{last['val_loss_hq']:.4g})" if last else ""
            die(f"{name}: the {what} became {v.item()} at step {step}, stopped before its update{saved}. "
                f"A step's size comes from --lr {cfg.lr:g}, --weight_decay {cfg.weight_decay:g}, --grad_clip "
                f"{cfg.grad_clip:g} (and the data): change what caused it, then start again with --overwrite "
                "(or another --name)")

def stopped(cfg, e):  # Ctrl-C or SIGTERM: one line saying where the run stopped, how it goes on
    frames = {f.f_code.co_name: f for f, _ in traceback.walk_tb(e.__traceback__)}  # by name
    name = run_name(cfg)
    ckpt = os.path.join(cfg.out, name, "ckpt.pt")
    # the blocks marked done are kept
    if cfg.mode == "score" or "score_web" in frames:
        again = "the same command" if cfg.mode == "score" else "the same command with --resume"
        msg = f"{name}: stopped while scoring: run {again} to finish it"
    else:
        step = frames["train"].f_locals.get("step") if "train" in frames else None
        try:
            saved = f"{ckpt} holds step {torch.load(ckpt, 'cpu', weights_only=True, mmap=True)['step']}"
        except Exception:
            # none yet, or not this run's
            saved = "no checkpoint yet"
        at = f"at step {step} of {cfg.steps}" if step is not None else "before training"
        msg = f"{name}: stopped {at}; {saved}: run the same command with --resume to continue"
    if RANK != 0:
        sys.exit(1)
    die(msg)

# -----------------------------------------------------------------------------
# the reference scores' file: <out>/<ref run>/ref_scores.bin (n_web, 1 or 2) and its .json

def score_layout(info):  # the scores' dtype and columns: L_RM, then H_RM (not with --scores loss)
    return np.dtype(info["score_dtype"]), len(info["scores"].split(","))

def load_ref_scores(cfg, meta, T):
    """(--ref_run's scores, checked against the data and T; the reference model's sha256)."""
    run, n_web = os.path.join(cfg.out, cfg.ref_run), meta["tokens"]["web"]
    path, ckpt_path = os.path.join(run, "ref_scores.bin"), os.path.join(run, "ckpt.pt")
    redo = lambda **flags: "re-run " + command("score", cfg, name=cfg.ref_run, **flags)  # this data
    if not os.path.isfile(path) and os.path.isfile(path + ".partial"):
        if os.path.isfile(os.path.join(run, "metrics.json")):
            die(f"{path}: scoring was interrupted: {redo()} to finish it")
        flags = saved_flags(load_checkpoint(ckpt_path), "ref")  # killed in --ref's scoring
        die(f"{path}: scoring was interrupted: finish the reference run: "
            f"{command('ref', cfg, resume=True, **flags)}")
    if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
        train = command("ref", cfg, name=cfg.ref_run if cfg.ref_run != "ref" else None)
        die(f"{path + '.json' if os.path.isfile(path) else path}: reference scores missing: "
            + (redo() if os.path.isfile(ckpt_path) else f"run {train} (or --score with a reference model)"))
    info = scoring_json(path + ".json")
    needed = {"weights_sha256", "data_sha256", "data", "block_size", "score_dtype", "scores"}
    if not isinstance(info, dict) or not needed <= set(info):
        die(f"{path}.json: not valid JSON, or without the reference model's fingerprint: "
            f"{redo(overwrite=True)}")
    (dtype, n_cols), per_token = score_layout(info), os.path.getsize(path) / n_web
    layout = dict(score_dtype=info["score_dtype"], scores=info["scores"])  # scored again as they were
    # the data's sha256 covers the encoding too
    if info["data_sha256"] != meta["sha256"]:
        die(f"{path}: reference scores do not match {cfg.data}: computed for {info['data']} (its "
            f"meta.json differs): {redo(**layout, overwrite=True)}")
    # the layout another file would have, or cut short
    if per_token != n_cols * dtype.itemsize:
        other = [f"{d} {s}" for d in CHOICES["score_dtype"] for s in CHOICES["scores"]
                 if np.dtype(d).itemsize * len(s.split(",")) == per_token]
        why = f"its .json: {per_token:g} bytes a token, as {' or '.join(other)} scores are, but the .json " \
            f"says {dtype} {info['scores']} ({n_cols * dtype.itemsize} bytes)" if other else f"{cfg.data} " \
            f"(cut short: {os.path.getsize(path) // (n_cols * dtype.itemsize):,} of {n_web:,} tokens)"
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
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_web, n_cols)), info["weights_sha256"]

def scoring_json(path):  # a scores file's json; None if missing or cut short (then scored again)
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None

def same_scoring(a, b):  # of the same data, windows and reference model
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
        if scored and same_scoring(scored, info) and os.path.getsize(path) == n_cols * dtype.itemsize * \
                n_tokens and not sha256_differs(path, scored.get("sha256")):
            print(f"score: {path} already holds this model's scores of {cfg.data}: kept")
        elif scored and not same_scoring(scored, info) and not cfg.overwrite:
            run = os.path.dirname(path)
            whose = "this" if scored.get("weights_sha256") == weights else "another"
            die(f"{path}: holds the scores of {scored['data']} by {whose} reference model; scoring {cfg.data} "
                f"would replace them: pass --overwrite, or copy the run (cp -r {run} {run}-2) and score that: "
                f"{command('score', cfg, name=os.path.basename(run) + '-2')}")
        elif same_scoring(partial, info) and os.path.isfile(path + ".partial") and \
                os.path.isfile(path + ".done"):
            info = partial  # resume, with the block size it started with
        else:  # asked for by --overwrite, or this run's, cut short
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

def mark_done(scores_file, done_file, marks, n_done, n_todo, n_scored, t0, per_block):
    """The scores on disk first, then their blocks' marks; a progress line. Returns the time."""
    os.fsync(scores_file.fileno())
    for m in marks:
        os.pwrite(done_file.fileno(), b"\x01", m)
    os.fsync(done_file.fileno())
    marks.clear()
    t_sync = time.time()
    if RANK == 0 and n_todo > 1:
        rate = n_scored / (t_sync - t0)
        print(f"score: {n_done}/{n_todo} blocks, {rate:,.0f} tok/s, eta "
              f"{(n_todo - n_done) * per_block / rate:.0f}s", file=sys.stderr, flush=True)
    return t_sync

def finish_scoring(path, info, meta, cfg, run, elapsed, n_scored):  # every block done: the files
    n_scored = int(sum_ranks(torch.tensor(n_scored, device=cfg.device)))  # NCCL: GPU tensors only
    info.update(encoding=meta["encoding"], data=cfg.data, score_s=round(elapsed, 2),
                score_tok_s=round(n_scored / max(elapsed, 1e-9)), processes=WORLD, dtype=cfg.dtype)
    if RANK != 0:
        return info
    if not np.fromfile(path + ".done", np.uint8).all():
        die(f"{path}.partial: some blocks were not scored; run {command('score', cfg, name=run)} again")
    os.replace(path + ".partial", path)
    info["sha256"] = file_sha256(path) if os.path.getsize(path) <= HASH_MAX else None  # checked
    write_json(path + ".json", info)
    for f in (path + ".done", path + ".partial.json"):
        os.remove(f)
    print(f"score: {n_scored:,} web tokens in {elapsed:.1f}s ({info['score_tok_s']:,} tok/s"
          f"{f' over {WORLD} processes' if WORLD > 1 else ''}) -> {path}")
    return info

def score_again(cfg):  # --score: web scored again with an existing reference model
    meta = load_meta(cfg.data)
    name = run_name(cfg)
    path = os.path.join(cfg.out, name, "ckpt.pt")  # an FSDP run's shards are read from beside it
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

def read_problems(cfg, meta, T):  # eval.json's held-out problems; [] with --eval_problems 0
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
    # said, not refused: the default asks 200
    if len(problems) < cfg.eval_problems and RANK == 0:
        print(f"note: --eval_problems {cfg.eval_problems}: {path} holds {len(problems)} problems; "
              f"each evaluation answers all {len(problems)}", file=sys.stderr)
    if not problems:
        die(f"{path}: no eval problems (prepare.py found no \"#### N\" or \"The answer is: N\" "
            "answer in --val): prepare the data with such a --val, or pass --eval_problems 0 to "
            "train without measuring accuracy")
    return problems

def noise_shares(counts, labels):  # noise share (label 0: clean), all and per kind, of [seen, sel]
    def shares(c):
        total = max(1, sum(c))
        return {"all": round(1 - c[0] / total, 4),
                **{labels[i]: round(n / total, 4) for i, n in enumerate(c) if i}}
    seen, selected = counts
    return {"noise_in_selected": shares(selected), "noise_share_corpus": shares(seen)}

def accuracy(correct):  # None: not measured (--eval_problems 0)
    return round(sum(correct) / len(correct), 4) if correct else None

def percent(accuracy):
    return "-" if accuracy is None else f"{accuracy:.1%}"

def log_evaluation(progress, step, train_loss, measures, records, counts, labels):  # its log line
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
        progress.token_records[key].append(v)
    return line

def write_token_losses(path, progress, ev):  # tokens.npz: each evaluation's records, web val
    if not progress.token_records["web"]:
        return
    web = ev.web.get(ev.web_val, "cpu")
    arrays = {key: torch.stack(v).numpy() for key, v in progress.token_records.items()}  # (evals, windows, T)
    evals = progress.history[-len(progress.token_records["web"]):]
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
    correct = final.get("correct")  # the final evaluation's answers to all problems, or None
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
