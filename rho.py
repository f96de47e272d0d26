"""
rho.py: Selective Language Modeling (Rho-1, Lin et al. 2024, arXiv 2404.07965) in one file.

    python prepare.py                       # embedded demo corpus -> data/demo
    python rho.py --base                    # (demo) a base model on general web-like text
    python rho.py --ref --init_from base    # reference model on hq, then score every web token
    python rho.py --clm --init_from base    # continual pretraining on web, loss on all tokens
    python rho.py --slm --k 0.6 --init_from base   # the same run, loss on the top 60% tokens by excess loss
    python rho.py --slm --k 0.6 --select random --init_from base   # control: same k, random tokens
    python rho.py --compare                 # one table of every run in --out
    python rho.py --report                  # out/report.html: efficiency, selection audit, token dynamics, cost, k sweep
    python rho.py --bench                   # the fused head and a training step, measured side by side

At scale (see the README's "Run it on real data"): the same commands on GPT-2's weights and many GPUs,
    torchrun --standalone --nproc_per_node 8 rho.py --slm --preset gpt2-owm --data data/owm --out out-owm

Reads top to bottom in the order the data flows: config -> model -> processes -> data -> the SLM loss ->
the fused SLM head -> reference scoring -> training -> evaluation -> comparison -> analysis report ->
benchmark -> main.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from prepare import get_encoding, write_atomic

IGNORE = -1  # target id that is never trained on and never selected


def die(msg):
    sys.exit(f"error: {msg}")


# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 320  # the data's vocabulary, padded up to a multiple of 64 (GPT-2's weights: exactly 50257)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


@dataclass
class RunConfig:
    mode: str = "slm"  # base | ref | clm | slm
    data: str = "data/demo"
    out: str = "out"
    name: str = ""  # default: ref, clm, slm-k0.6, slm-k0.6-random
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    k: float = 0.6
    select: str = "excess"  # excess (the paper) | random (the control) | ref | train | sample (see select_tokens)
    head: str = "fused"  # fused: fused_slm_loss, no B*T x V logits | naive: full logits, slm_loss / clm_loss
    scope: str = "batch"  # batch: top-k over all tokens of the step | sequence: top-k within each sequence
    seed: int = 1337
    micro_batch: int = 0  # sequences per forward on each process; 0: the whole step (batch_size / processes)
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    compile: bool = False  # torch.compile the model's forward
    score_batch: int = 64  # windows per forward when scoring the web corpus
    eval_every: int = 50
    eval_problems: int = 100
    init_from: str = ""
    preset: str = ""  # see PRESETS
    cases: str = "head,step"  # --bench: which measurements
    resume: bool = False
    device: str = "cpu"


GPT2_SMALL = dict(block_size=1024, n_layer=12, n_head=12, n_embd=768)  # vocab_size 50257, tiktoken's gpt2

PRESETS = {  # --preset NAME: defaults for every flag it names (explicit flags win), then per stage
    "gpt2-owm": {  # the paper's setting at small scale: GPT-2 124M from OpenAI's weights, a GSM8K/MetaMath-like
        # hq corpus, OpenWebMath-like web; 2000 steps of 512 x 1024 tokens = 1.05B tokens of continual pretraining
        "init_from": "gpt2", "block_size": 1024, "batch_size": 512, "micro_batch": 32, "warmup": 100, "eval_every": 250,
        "eval_problems": 200, "compile": True, "k": 0.6,
        "ref": {"steps": 600, "lr": 1e-4},  # 315M tokens: 3 epochs of ~100M hq tokens (the paper: 3 epochs)
        "clm": {"steps": 2000, "lr": 1e-4}, "slm": {"steps": 2000, "lr": 1e-4}},
}


# -----------------------------------------------------------------------------
# model: GPT-2 (nanoGPT), causal SDPA attention, tied embeddings


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: keys and values of earlier positions
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


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

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)), ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)

    def forward(self, idx, pad=None, caches=None):
        """Hidden states after ln_f, (B, T, C). The LM head is applied by the loss (see slm_loss).
        pad (B,): left-padding per row, for batched generation; caches: one list per layer."""
        B, T = idx.shape
        past = caches[0][0].shape[2] if caches and caches[0] else 0
        pos = torch.arange(past, past + T, device=idx.device)
        mask = None
        if pad is not None:  # causal, and no attention to a row's padding
            keys = torch.arange(past + T, device=idx.device)
            mask = (keys[None, None, :] <= pos[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])
            mask, pos = mask[:, None], (pos[None, :] - pad[:, None]).clamp(min=0)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, caches[i] if caches is not None else None)
        return self.transformer.ln_f(x)


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's GPT-2 on the Hugging Face hub


def gpt_from_hf(hf, block_size=None):
    """Our GPT with the weights of a transformers GPT2LMHeadModel (nanoGPT's from_pretrained), its context
    cropped to block_size. The vocabulary stays exactly HF's (50257), not padded to a multiple of 64: a padded
    row would put a logit of 0 into every softmax of a model that never learned to push it down."""
    c = hf.config
    same_math = {"model_type": c.model_type == "gpt2", "activation_function": c.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
                 "layer_norm_epsilon": c.layer_norm_epsilon == 1e-5, "tie_word_embeddings": c.tie_word_embeddings,
                 "n_inner": c.n_inner in (None, 4 * c.n_embd), "scale_attn_weights": c.scale_attn_weights,
                 "scale_attn_by_inverse_layer_idx": not c.scale_attn_by_inverse_layer_idx,
                 "add_cross_attention": not c.add_cross_attention}  # reorder_and_upcast_attn: same math, in fp32
    bad = [f"{key}={getattr(c, key)!r}" for key, ok in same_math.items() if not ok]
    if bad:
        die(f"{c.name_or_path or 'model'}: {', '.join(bad)}: rho's GPT is plain GPT-2 (gelu_new, layer_norm_epsilon 1e-5, "
            f"tied embeddings, MLP of 4*n_embd, attention scaled by 1/sqrt(head size) only, no cross-attention)")
    T = block_size or c.n_positions
    if T > c.n_positions:
        die(f"--block_size {T}: {c.name_or_path or 'model'} has {c.n_positions} positions; pass --block_size {c.n_positions} or less")
    model = GPT(GPTConfig(block_size=T, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # HF's Conv1D stores (in, out)
    sd = {key: v.t() if key.endswith(conv1d) else v for key, v in hf.state_dict().items()
          if not key.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers of older transformers
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:T]  # nanoGPT's crop_block_size
    model.load_state_dict(sd)  # strict: every weight mapped; lm_head and wte are one tensor, as in HF
    return model


# -----------------------------------------------------------------------------
# processes: one, or torchrun's many (DDP, one per GPU); every process holds a contiguous share of a step


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0


ONE = Ranks()  # a single process


def init_ranks(cfg):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: join the process group (nccl on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return ONE
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{ranks.local}"
        torch.cuda.set_device(cfg.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return ranks


def gather_rows(t, ranks):
    """Every process's tensor, concatenated along dim 0 in rank order: the whole step's rows."""
    if ranks.world == 1 or t is None:
        return t
    parts = [torch.empty_like(t) for _ in range(ranks.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_ranks(t, ranks):
    if ranks.world > 1:
        dist.all_reduce(t)
    return t


def autocast(cfg):
    """bfloat16 autocast for the model's forward (the default on CUDA); plain float32 otherwise."""
    return torch.autocast(torch.device(cfg.device).type, torch.bfloat16, enabled=cfg.dtype == "bfloat16")


# -----------------------------------------------------------------------------
# data: token memmaps cut into fixed windows of T+1 tokens; window w holds tokens [w*T, w*T + T]


def load_meta(data):
    path = os.path.join(data, "meta.json")
    if not os.path.isfile(path):
        hint = "python prepare.py" if os.path.normpath(data) == os.path.normpath("data/demo") else f"python prepare.py --hq FILE --web FILE --out {data}"
        die(f"{data}: data not prepared (no meta.json): run `{hint}`")
    with open(path, "rb") as f:
        raw = f.read()
    meta = json.loads(raw)
    meta["sha256"] = hashlib.sha256(raw).hexdigest()  # fingerprint of the data: reference scores carry it
    return meta


def memmap(data, name, dtype):
    path = os.path.join(data, name)
    if not os.path.isfile(path):
        die(f"{path}: missing; re-run prepare.py for {data}")
    return np.memmap(path, dtype=dtype, mode="r")


def windows(data, name, meta, T, extras=()):
    return Windows(memmap(data, name, meta["dtype"]), T, extras, os.path.join(data, name))


class Windows:
    """Windows of one token file. Batch order is a function of (seed, step) alone, so CLM, SLM and the
    random control see the same batches in the same order, and a resumed run picks up where it stopped."""

    def __init__(self, tokens, T, extras=(), name="tokens"):
        self.tokens, self.T, self.extras, self.name = tokens, T, extras, name  # extras: aligned arrays (ref losses, labels)
        self.n = (len(tokens) - 1) // T
        if self.n < 1:
            die(f"{name}: {len(tokens)} tokens, fewer than one window of {T + 1}: use a smaller --block_size")

    def get(self, ws, device):
        x = np.stack([self.tokens[w * self.T: w * self.T + self.T + 1] for w in ws]).astype(np.int64)
        ex = [torch.from_numpy(np.stack([a[w * self.T + 1: w * self.T + self.T + 1] for w in ws]).copy()).to(device)
              for a in self.extras]  # aligned with the targets
        x = torch.from_numpy(x).to(device)
        return (x[:, :-1], x[:, 1:], *ex)

    def step_windows(self, step, B, seed, lo=0, hi=None):
        """The B windows of a step, in [lo, hi): every window once per epoch, in an order drawn from (seed, epoch)."""
        hi = self.n if hi is None else hi
        per_epoch = (hi - lo) // B
        if per_epoch < 1:
            die(f"{self.name}: {hi - lo} training windows of {self.T + 1} tokens, fewer than one batch: lower --batch_size")
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(hi - lo) + lo
        return perm[i * B:(i + 1) * B]

    def batch(self, step, B, seed, device, lo=0, hi=None):
        return self.get(self.step_windows(step, B, seed, lo, hi), device)

    def micro_batches(self, step, B, seed, device, lo, hi, ranks, micro):
        """This process's micro-batches of a step: the rank-th contiguous share of the step's windows, cut
        into micro-batches of `micro` sequences; all processes' micro-batches, in order, are the step's batch."""
        ws = self.step_windows(step, B, seed, lo, hi)
        share = B // ranks.world
        ws = ws[ranks.rank * share:(ranks.rank + 1) * share]
        return [self.get(ws[i:i + micro], device) for i in range(0, share, micro)]


def web_split(n_windows):
    """The last 5% of web windows (at most 32) are web validation; continual pretraining trains on the rest."""
    n_val = min(32, max(1, n_windows // 20))
    return n_windows - n_val


def no_ref(n):
    """Zeros in place of the reference losses of n tokens, for runs that read none: a view, no memory."""
    return np.broadcast_to(np.float32(0), (n,))


def ref_scores_path(cfg):
    return os.path.join(cfg.out, "ref", "ref_loss.bin")


def load_ref_scores(cfg, meta, T):
    """Per-token reference losses aligned with web.bin, with the checks that they belong to this data and
    were computed with this run's windows (same context for both models)."""
    path = ref_scores_path(cfg)
    if not os.path.isfile(path) and os.path.isfile(path + ".partial"):
        die(f"{path}: scoring was interrupted ({path}.partial): run `python rho.py --score` to finish it")
    if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
        die(f"{path}: reference scores missing: run `python rho.py --ref` (or `--score` with an existing reference model)")
    with open(path + ".json") as f:
        info = json.load(f)
    n_web = meta["tokens"]["web"]
    if info["n_tokens"] != n_web or os.path.getsize(path) != 4 * n_web:
        die(f"{path}: reference scores hold {os.path.getsize(path) // 4} tokens but {cfg.data}/web.bin has {n_web}: "
            f"re-run `python rho.py --score --data {cfg.data}`")
    if info["encoding"] != meta["encoding"] or info["data_sha256"] != meta["sha256"]:
        die(f"{path}: reference scores were computed for other data ({info['data']}, encoding {info['encoding']}): "
            f"re-run `python rho.py --score --data {cfg.data}`")
    if info["block_size"] != T:
        die(f"{path}: reference scores were computed with windows of {info['block_size']} tokens, this run uses "
            f"{T}: pass --block_size {info['block_size']} so both models see the same context")
    return np.memmap(path, dtype=np.float32, mode="r")


# -----------------------------------------------------------------------------
# the SLM loss (Rho-1, Sec. 2.2):  L_SLM = -1/(N*k) * sum_i I_k(x_i) * log P_theta(x_i | x_<i)


def token_loss(logits, targets):
    """Per-token loss -log P(x_i | x_<i) in fp32, (B, T); 0 where the target is ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none").view(targets.shape)


def excess_loss(train_loss, ref_loss):
    """L_delta(x_i) = L_theta(x_i) - L_RM(x_i), on detached losses: selection takes no gradient."""
    return train_loss.detach() - ref_loss


def n_select(k, n):
    """ceil(k * n) of a count, or of a tensor of counts (per row, with no sync); rounded to 6 decimals first
    so that k*n = 6.000000000000001 gives 6."""
    return torch.ceil(torch.round(k * torch.as_tensor(n, dtype=torch.float64) * 1e6) / 1e6)


def select_topk(score, valid, k, scope="batch"):
    """I_k: marks the top ceil(k * n_valid) valid tokens by score, over the whole step (scope "batch") or
    within each sequence ("sequence"). Ignored targets are never selected; ties: the lower index wins."""
    shape = score.shape
    if scope == "batch":
        score, valid = score.reshape(1, -1), valid.reshape(1, -1)
    key = torch.where(valid, score.clamp(min=-3e38), float("-inf"))  # invalid strictly below every valid score
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # stable: equal scores keep index order
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return ((rank < n_select(k, valid.sum(-1, keepdim=True))) & valid).reshape(shape)


def select_tokens(loss, targets, ref_loss, k, scope="batch", select="excess", gen=None):
    """Which tokens carry the loss (I_k). select:
      excess  highest L_theta - L_RM (the paper, default)
      ref     lowest L_RM (the paper's reference-loss-only variant, Table 3)
      train   highest L_theta (no reference model)
      random  uniform noise from gen (the control: same k, no information)
      sample  RHO-LOSS: whole sequences, ranked by their mean excess loss"""
    valid = targets != IGNORE
    if k >= 1:  # CLM: every valid token, whatever the score
        return valid
    if select == "sample":
        seq = (excess_loss(loss, ref_loss) * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # (B,)
        return select_topk(seq[None], valid.any(-1)[None], k)[0][:, None] & valid
    score = {"excess": lambda: excess_loss(loss, ref_loss), "ref": lambda: -ref_loss, "train": lambda: loss.detach(),
             "random": lambda: torch.rand(loss.shape, generator=gen).to(loss.device)}[select]()
    return select_topk(score, valid, k, scope)


def select_step(loss, targets, ref_loss, k, scope="batch", select="excess", gen=None, ranks=ONE):
    """I_k over the whole optimizer step, however it is split across processes: every process gathers the
    (tiny) token losses of all, runs the same select_tokens on the whole step, and keeps its own rows, so
    1 and N processes select the same tokens. Returns (this process's selected, number selected in the step)."""
    rows = len(targets)
    loss, targets, ref_loss = (gather_rows(t, ranks) for t in (loss, targets, ref_loss))
    sel = select_tokens(loss, targets, ref_loss, k, scope, select, gen)
    return sel[ranks.rank * rows:(ranks.rank + 1) * rows], int(sel.sum())


def slm_loss(logits, targets, ref_loss, k, scope="batch", select="excess", gen=None):
    """The SLM loss on full logits (the plain reference): mean token loss over the selected tokens only.
    Returns (loss, token losses, selected)."""
    loss = token_loss(logits, targets)
    sel = select_tokens(loss, targets, ref_loss, k, scope, select, gen)
    return (loss * sel).sum() / sel.sum(), loss.detach(), sel


def clm_loss(logits, targets):
    """Plain causal LM loss over every valid token: the baseline, and the SLM loss at k = 1."""
    loss = token_loss(logits, targets)
    valid = targets != IGNORE
    return loss.sum() / valid.sum(), loss.detach(), valid


# -----------------------------------------------------------------------------
# the fused head: the loss from hidden states (N, C) and the head weight (V, C), never holding N x V logits
#   CLM (every token carries the loss): one pass over chunks of rows computes each chunk's logits, its loss, and at
#     once the gradients G = (softmax - onehot) / n, dH = G W, dW += G^T H: 6 N d V FLOPs, no recompute
#   SLM: a no-grad pass gives every token's loss and lse (2 N d V); the selection runs on those losses, outside;
#     the backward recomputes the selected rows' logits only: (2 + 6k) N d V FLOPs in all
# Logits are fp32 in a buffer of `rows` rows whose row stride is padded to 64 floats; the per-chunk softmax math runs
# as Triton kernels on CUDA and as the PyTorch functions below elsewhere.


def sub_onehot_(g, y, row_scale):
    """g[i, y_i] -= row_scale_i on the rows whose target is not ignored."""
    valid = y != IGNORE
    g[torch.arange(len(y), device=g.device)[valid], y[valid]] -= row_scale[valid].to(g.dtype)


def chunk_loss_torch(x, y, scale=None, g=None):
    """(lse, loss) of an fp32 (c, V) chunk of logits, in fp32; loss 0 where the target is ignored. Overwrites x.
    With a scale (CLM), also writes the gradient (softmax - onehot) * scale into g (default: x itself)."""
    x_y = x.gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # ignored rows read column 0, then get loss 0
    m = x.amax(1, keepdim=True)
    s = x.sub_(m).exp_().sum(1)  # x now holds exp(logits - max)
    lse = m.squeeze(1) + s.log()
    loss = torch.where(y == IGNORE, 0.0, lse - x_y)
    if scale is not None:
        row_scale = (y != IGNORE) * scale
        x.mul_((row_scale / s)[:, None])  # softmax * scale: one exp for the loss and the gradient
        sub_onehot_(x, y, row_scale)
        if g is not None and g.data_ptr() != x.data_ptr():
            g.copy_(x)
    return lse, loss


def chunk_grad_torch(x, y, lse, scale, g=None):
    """Writes (softmax - onehot) * scale of an fp32 chunk of logits, given its lse, into g (default: x, in place)."""
    row_scale = (y != IGNORE) * scale
    x.sub_(lse[:, None]).exp_().mul_(row_scale[:, None])
    sub_onehot_(x, y, row_scale)
    return x if g is None or g.data_ptr() == x.data_ptr() else g.copy_(x)


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _write_grad(x_row, g_row, y, lse, scale, V, BLOCK_V: tl.constexpr):
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)  # softmax - onehot
            g = tl.where(y == -1, 0.0, g * scale)
            tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=cols < V)  # in g's dtype (bf16 for the GEMMs)

    @triton.jit
    def _chunk_loss_kernel(x_ptr, g_ptr, y_ptr, lse_ptr, loss_ptr, scale_ptr, stride_x, stride_g, V,
                           BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2**31
        x_row = x_ptr + row * stride_x
        m = tl.full([], float("-inf"), tl.float32)  # online log-sum-exp: running max m and sum s of exp(x - m)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every block has at least one real column
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)  # rescale the old sum to the new max
            m = m_new
        lse = m + tl.log(s)
        y = tl.load(y_ptr + row)
        x_y = tl.load(x_row + tl.maximum(y, 0)).to(tl.float32)  # ignored rows read column 0, then drop it
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(y == -1, 0.0, lse - x_y))
        if WRITE_GRAD:  # CLM: the gradient in the same launch, the row still in cache
            _write_grad(x_row, g_ptr + row * stride_g, y, lse, tl.load(scale_ptr), V, BLOCK_V)

    @triton.jit
    def _chunk_grad_kernel(x_ptr, g_ptr, y_ptr, lse_ptr, scale_ptr, stride_x, stride_g, V, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        _write_grad(x_ptr + row * stride_x, g_ptr + row * stride_g, tl.load(y_ptr + row), tl.load(lse_ptr + row),
                    tl.load(scale_ptr), V, BLOCK_V)


def _launch(x, g, block_v):
    assert x.stride(1) == 1 and g.stride(1) == 1, "logits and gradient rows must be contiguous"
    block = block_v or min(4096, triton.next_power_of_2(x.shape[1]))
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def _scale_tensor(scale, device):
    return torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(1)  # on the device: no sync


def chunk_loss_triton(x, y, scale=None, g=None, block_v=None):
    """chunk_loss_torch as one Triton launch; reads x without overwriting it."""
    g = x if g is None else g
    lse = torch.empty(len(x), dtype=torch.float32, device=x.device)
    loss = torch.empty_like(lse)
    _chunk_loss_kernel[(len(x),)](x, g, y, lse, loss, _scale_tensor(0.0 if scale is None else scale, x.device),
                                  x.stride(0), g.stride(0), x.shape[1], WRITE_GRAD=scale is not None, **_launch(x, g, block_v))
    return lse, loss


def chunk_grad_triton(x, y, lse, scale, g=None, block_v=None):
    g = x if g is None else g
    _chunk_grad_kernel[(len(x),)](x, g, y, lse, _scale_tensor(scale, x.device), x.stride(0), g.stride(0), x.shape[1],
                                  **_launch(x, g, block_v))
    return g


def chunk_ops(device):
    """The per-chunk (loss, grad) pair for a device: Triton on CUDA when it is installed, else PyTorch."""
    if device.type == "cuda" and triton is not None:
        return chunk_loss_triton, chunk_grad_triton
    return chunk_loss_torch, chunk_grad_torch


def chunk_rows(V, device):
    """Rows per chunk, from a budget of fp32 logits: 32 MB on a CPU, 512 MB on a GPU (thousands of rows: few, large
    GEMMs and few launches)."""
    budget = 2**27 if device.type == "cuda" else 2**23
    return max(64, budget // V // 64 * 64)


def buffer(rows, V, device, dtype=torch.float32):
    """A (rows, V) view of a (rows, V rounded up to 64) buffer: every row starts at an aligned address."""
    return torch.empty(rows, -(-V // 64) * 64, dtype=dtype, device=device)[:, :V]


def mm_fp32(a, b, out):
    """out = a @ b in fp32: bf16 operands on CUDA accumulate and store in fp32 (no bf16 rounding of the logits)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return out.copy_(a @ b)


def addmm_fp32_(dw, a, b):
    """dw += a @ b, accumulated in dw's fp32 in place."""
    if a.dtype == torch.float32:
        return dw.addmm_(a, b)
    if a.is_cuda:
        try:
            return torch.addmm(dw, a, b, out_dtype=torch.float32, out=dw)  # bf16 operands, fp32 sum: no temporary
        except RuntimeError:  # older torch wants self in the operands' dtype: a (V, C) fp32 temporary per chunk
            return dw.add_(torch.mm(a, b, out_dtype=torch.float32))
    return dw.add_(a @ b)


def head_dtype(h):
    """The head's GEMM dtype: bfloat16 under autocast (the head then runs outside it, with fp32 accumulation), else h's."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


@torch.no_grad()
def head_token_loss(h, w, y, dtype=None):
    """Every token's loss and lse, (N,) each, from h (N, C), without grad: the first pass of the SLM head, and
    scoring and evaluation."""
    dtype = dtype or head_dtype(h)
    h, w = h.to(dtype), w.to(dtype)
    rows, (lse_fn, _) = chunk_rows(w.shape[0], h.device), chunk_ops(h.device)
    x = buffer(min(rows, len(h)), w.shape[0], h.device)
    loss = torch.empty(len(h), dtype=torch.float32, device=h.device)
    lse = torch.empty_like(loss)
    for i in range(0, len(h), rows):
        c = len(h[i:i + rows])
        lse[i:i + c], loss[i:i + c] = lse_fn(mm_fp32(h[i:i + c], w.t(), x[:c]), y[i:i + c])
    return loss, lse


class FullHeadLoss(torch.autograd.Function):
    """CLM's head: the sum of every token's loss over n, whose gradients are computed in the forward, chunk by chunk.
    The backward only scales them. Returns (the loss, every token's loss)."""

    @staticmethod
    def forward(ctx, h, w, y, n, dtype):
        hc, wc = h.to(dtype), w.to(dtype)
        (N, C), V = h.shape, w.shape[0]
        rows, (loss_fn, _) = chunk_rows(V, h.device), chunk_ops(h.device)
        x = buffer(min(rows, N), V, h.device)
        g = x if dtype == torch.float32 else buffer(len(x), V, h.device, dtype)  # bf16 on GPUs: for the GEMMs
        loss, dh = torch.empty(N, dtype=torch.float32, device=h.device), torch.empty_like(hc)
        dw = torch.zeros(V, C, dtype=torch.float32, device=h.device)
        for i in range(0, N, rows):
            c = len(hc[i:i + rows])
            _, loss[i:i + c] = loss_fn(mm_fp32(hc[i:i + c], wc.t(), x[:c]), y[i:i + c], 1.0 / n, g[:c])
            torch.mm(g[:c], wc, out=dh[i:i + c])
            addmm_fp32_(dw, g[:c].t(), hc[i:i + c])
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(loss)
        return loss.sum() / n, loss

    @staticmethod
    def backward(ctx, grad, _):
        dh, dw = ctx.saved_tensors
        return dh * grad, dw * grad, None, None, None


class SelectedHeadLoss(torch.autograd.Function):
    """SLM's head: the sum of the selected tokens' losses (given) over n, the number selected in the whole step.
    Its backward recomputes the logits of the selected rows only."""

    @staticmethod
    def forward(ctx, h, w, y, loss, lse, sel, n, dtype):
        idx = sel.nonzero().squeeze(1)
        ctx.save_for_backward(h, w, y[idx], lse[idx], idx)
        ctx.n, ctx.dtype = n, dtype
        return loss[idx].sum() / n

    @staticmethod
    def backward(ctx, grad):
        h, w, y, lse, idx = ctx.saved_tensors
        hc, wc = h.to(ctx.dtype), w.to(ctx.dtype)
        V, C = w.shape
        rows, (_, grad_fn) = chunk_rows(V, h.device), chunk_ops(h.device)
        x = buffer(max(1, min(rows, len(idx))), V, h.device)
        g = x if ctx.dtype == torch.float32 else buffer(len(x), V, h.device, ctx.dtype)
        dh, dw = torch.zeros_like(hc), torch.zeros(V, C, dtype=torch.float32, device=h.device)
        for i in range(0, len(idx), rows):
            r = idx[i:i + rows]
            hs = hc[r]  # (c, C)
            gc = grad_fn(mm_fp32(hs, wc.t(), x[:len(r)]), y[i:i + rows], lse[i:i + rows], grad / ctx.n, g[:len(r)])
            dh[r] = gc @ wc
            addmm_fp32_(dw, gc.t(), hs)
        return dh, dw, None, None, None, None, None, None


def fused_slm_loss(h, w, targets, ref_loss, k, scope="batch", select="excess", gen=None, ranks=ONE, sel=None, n=None):
    """The SLM loss from hidden states h (B, T, C) and head weight w (V, C), never holding B*T x V logits.
    Same selection and same value as slm_loss(h @ w.T, ...); returns (loss, token losses, selected).
    k = 1 (CLM) takes the one-pass head. Otherwise selects over the step on every process (select_step), unless the
    selection pass already did (sel, n)."""
    B, T, C = h.shape
    dtype, y = head_dtype(h), targets.reshape(-1)
    with torch.autocast(h.device.type, enabled=False):
        if k >= 1:
            valid = targets != IGNORE
            n = n if n is not None else int(sum_ranks(valid.sum(), ranks))
            out, loss = FullHeadLoss.apply(h.reshape(-1, C), w, y, max(n, 1), dtype)
            return out, loss.view(B, T), valid
        loss, lse = head_token_loss(h.detach().reshape(-1, C), w.detach(), y, dtype)
        if sel is None:
            sel, n = select_step(loss.view(B, T), targets, ref_loss, k, scope, select, gen, ranks)
        out = SelectedHeadLoss.apply(h.reshape(-1, C), w, y, loss, lse, sel.reshape(-1), max(n, 1), dtype)
    return out, loss.view(B, T), sel


@torch.no_grad()
def model_token_loss(model, x, y):
    """Every token's loss under model, (B, T), without grad and without B*T x V logits: scoring and eval."""
    h = model(x)
    with torch.autocast(h.device.type, enabled=False):
        loss, _ = head_token_loss(h.flatten(0, 1), model.lm_head.weight, y.flatten(), head_dtype(h))
    return loss.view(y.shape)


# -----------------------------------------------------------------------------
# reference scoring: one forward pass of the frozen reference model over every web token


def weights_sha256(model):
    """Fingerprint of a model's weights: a resumed scoring run must use the same reference model."""
    sha = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        sha.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()


def start_scoring(path, n_tokens, T, n_windows, cfg, meta, weights, ranks):
    """<path>.partial (float32, 1:1 with web.bin), <path>.done (a byte per block of --score_batch windows) and
    <path>.partial.json, created by process 0, or kept when they belong to the same data, windows and
    reference weights: then scoring resumes. Returns (windows per block, done flags)."""
    info = {"n_tokens": n_tokens, "block_size": T, "score_batch": cfg.score_batch, "data_sha256": meta["sha256"],
            "weights_sha256": weights}
    if ranks.rank == 0:
        try:
            with open(path + ".partial.json") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        same = old is not None and all(old[key] == info[key] for key in info if key != "score_batch")
        if same and os.path.isfile(path + ".partial") and os.path.isfile(path + ".done"):
            info = old  # resume, with the block size it started with
        else:
            if old is not None:
                print(f"score: {path}.partial belongs to other data or another reference model: starting over")
            for stale in (path, path + ".json"):  # scores of an earlier reference model must not outlive it
                if os.path.exists(stale):
                    os.remove(stale)
            n_blocks = -(-n_windows // info["score_batch"])
            with open(path + ".partial.tmp", "wb") as f:  # sparse zeros, NaN where no window predicts a token
                f.truncate(4 * n_tokens)
                os.pwrite(f.fileno(), np.full(1, np.nan, np.float32).tobytes(), 0)
                os.pwrite(f.fileno(), np.full(n_tokens - n_windows * T - 1, np.nan, np.float32).tobytes(), 4 * (n_windows * T + 1))
            write_atomic(path + ".done", bytes(n_blocks))
            os.replace(path + ".partial.tmp", path + ".partial")
            write_json(path + ".partial.json", info)
    if ranks.world > 1:
        dist.barrier()
        with open(path + ".partial.json") as f:
            info = json.load(f)
    return info["score_batch"], np.fromfile(path + ".done", np.uint8)


@torch.no_grad()
def score_web(model, meta, cfg, ranks=ONE):
    """Writes <out>/ref/ref_loss.bin: float32 L_RM for every web token (NaN where no window predicts it),
    scored with the same windows that training reads, so both models see the same context.
    At scale: bfloat16 autocast on GPU, --score_batch windows per forward, resumable (a block's losses go
    in place into ref_loss.bin.partial, and the block is marked in .done only once they are on disk, so a
    killed run redoes at most the unmarked blocks), and split across torchrun's processes (round-robin
    blocks). The finished file is renamed into place: ref_loss.bin is always complete."""
    model.eval()
    web = windows(cfg.data, "web.bin", meta, model.config.block_size)
    path, T, n_tokens = ref_scores_path(cfg), web.T, len(web.tokens)
    B, done = start_scoring(path, n_tokens, T, web.n, cfg, meta, weights_sha256(model), ranks)
    todo = [b for b in range(len(done)) if not done[b] and b % ranks.world == ranks.rank]
    t0 = t_sync = time.time()
    marks, n_scored = [], 0
    with open(path + ".partial", "r+b") as out, open(path + ".done", "r+b") as flags:
        def sync():  # losses on disk first, then their marks
            os.fsync(out.fileno())
            for b in marks:
                os.pwrite(flags.fileno(), b"\x01", b)
            os.fsync(flags.fileno())
            marks.clear()
        for i, b in enumerate(todo):
            ws = range(b * B, min(b * B + B, web.n))  # consecutive windows: their targets are consecutive tokens
            x, y = web.get(ws, cfg.device)
            with autocast(cfg):
                loss = model_token_loss(model, x, y).float().cpu().numpy()  # (len(ws), T)
            os.pwrite(out.fileno(), loss.tobytes(), 4 * (ws[0] * T + 1))
            marks.append(b)
            n_scored += loss.size
            if time.time() - t_sync > 30 or i == len(todo) - 1:
                sync()
                t_sync = time.time()
                if ranks.rank == 0 and len(todo) > 1:
                    rate = n_scored / (t_sync - t0)
                    print(f"score: {i + 1}/{len(todo)} blocks, {rate:,.0f} tok/s, eta {(len(todo) - i - 1) * B * T / rate:.0f}s",
                          file=sys.stderr, flush=True)
    elapsed = time.time() - t0
    n_scored = int(sum_ranks(torch.tensor(n_scored, device=cfg.device), ranks))  # NCCL reduces GPU tensors only
    if ranks.world > 1:
        dist.barrier()
    info = {"n_tokens": n_tokens, "encoding": meta["encoding"], "data": cfg.data, "data_sha256": meta["sha256"],
            "block_size": T, "score_s": round(elapsed, 2), "score_tok_s": round(n_scored / max(elapsed, 1e-9)),
            "processes": ranks.world, "dtype": cfg.dtype}
    if ranks.rank == 0:
        if not np.fromfile(path + ".done", np.uint8).all():
            die(f"{path}.partial: some blocks were not scored; run `python rho.py --score` again to finish them")
        os.replace(path + ".partial", path)
        write_json(path + ".json", info)
        os.remove(path + ".done"); os.remove(path + ".partial.json")
        print(f"score: {n_scored:,} web tokens in {elapsed:.1f}s ({info['score_tok_s']:,} tok/s"
              f"{f' over {ranks.world} processes' if ranks.world > 1 else ''}) -> {path}")
    return info


# -----------------------------------------------------------------------------
# training: the reference model (CLM on hq) and continual pretraining (CLM, SLM or random on web)


def run_name(cfg):
    if cfg.name:
        return cfg.name
    if cfg.mode != "slm":
        return cfg.mode
    return f"slm-k{cfg.k:g}" + ("" if cfg.select == "excess" else f"-{cfg.select}") + ("" if cfg.scope == "batch" else f"-{cfg.scope}")


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2).encode())


def save_checkpoint(path, model, opt, gen, step, cfg, meta, state):
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": gen.get_state(), "step": step,
            "config": asdict(cfg), "model_config": asdict(model.config), "encoding": meta["encoding"],
            "n_vocab": meta["vocab_size"], "state": state}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a kill leaves the previous checkpoint intact


def load_checkpoint(path, meta=None, what="checkpoint"):
    if not os.path.isfile(path):
        die(f"{path}: no such {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path}: not a readable rho checkpoint ({type(e).__name__})")
    if meta is not None and (ckpt["n_vocab"] != meta["vocab_size"] or ckpt["encoding"] != meta["encoding"]):
        die(f"{path}: {what} has vocabulary {ckpt['encoding']} ({ckpt['n_vocab']} tokens) but the data has "
            f"{meta['encoding']} ({meta['vocab_size']}): prepare the data with --encoding {ckpt['encoding']} or train a new model")
    return ckpt


def is_gpt2(init_from):
    """--init_from names OpenAI's GPT-2 (gpt2 ... gpt2-xl) or a directory saved with transformers' save_pretrained."""
    return init_from in GPT2_NAMES or (bool(init_from) and os.path.isfile(os.path.join(init_from, "config.json")))


def load_gpt2(name):
    """transformers' GPT2LMHeadModel: a hub name (through the Hugging Face cache) or a local directory."""
    try:
        from transformers import GPT2LMHeadModel  # lazily: only GPT-2 runs need transformers
    except ImportError:
        die(f"--init_from {name}: needs transformers: pip install transformers")
    try:
        hf, info = GPT2LMHeadModel.from_pretrained(name, output_loading_info=True)
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.isdir(name):
            die(f"--init_from {name}: not a loadable GPT-2 directory ({reason})")
        die(f"--init_from {name}: could not load it ({reason}): run once with network to fill the Hugging Face cache "
            f"(HF_HUB_OFFLINE=1 then reads only the cache), or pass a directory saved with save_pretrained")
    if info["missing_keys"]:  # transformers would leave them randomly initialised
        die(f"--init_from {name}: not a GPT-2 checkpoint, no weights for {', '.join(sorted(info['missing_keys'])[:3])}, ...")
    return hf


def build_model(cfg, meta, model_cfg):
    torch.manual_seed(cfg.seed)
    if is_gpt2(cfg.init_from):  # GPT-2's weights and shape; --block_size (if given) crops its context
        if meta["encoding"] != "gpt2":
            die(f"--init_from {cfg.init_from}: GPT-2 weights need data prepared with `python prepare.py ... --encoding gpt2`; "
                f"{cfg.data} has encoding {meta['encoding']}")
        model = gpt_from_hf(load_gpt2(cfg.init_from), model_cfg.block_size)
        if model.config.vocab_size < meta["vocab_size"]:
            die(f"--init_from {cfg.init_from}: {model.config.vocab_size} token embeddings, but the data has {meta['vocab_size']} tokens")
    elif cfg.init_from:  # a base checkpoint (a path, or the name of a run in --out): its architecture and weights
        run_ckpt = os.path.join(cfg.out, cfg.init_from, "ckpt.pt")
        ckpt = load_checkpoint(run_ckpt if not os.path.exists(cfg.init_from) and os.path.isfile(run_ckpt) else cfg.init_from, meta, "base checkpoint")
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = GPT(GPTConfig(**{**asdict(model_cfg), "vocab_size": 64 * math.ceil(meta["vocab_size"] / 64)}))
    return model.to(cfg.device)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_loss(fwd, w, x, y, r, cfg, gen, ranks=ONE, sel=None, n=None):
    """The one place where the runs differ: which tokens carry the loss. CLM and the reference model are
    the k = 1 case. fwd: the model's forward (maybe compiled, maybe DDP); w: the head weight."""
    k = cfg.k if cfg.mode == "slm" else 1.0
    with autocast(cfg):
        h = fwd(x)  # (B, T, C)
        if cfg.head == "fused":
            return fused_slm_loss(h, w, y, r, k, cfg.scope, cfg.select, gen, ranks=ranks, sel=sel, n=n)
    logits = F.linear(h, w)  # (B, T, V)
    return slm_loss(logits, y, r, k, cfg.scope, cfg.select, gen) if k < 1 else clm_loss(logits, y)


@torch.no_grad()
def selection_pass(fwd, micro, cfg, gen, ranks):
    """A step in several micro-batches needs every token's loss before its first backward: one no-grad
    forward over them (none when the rule reads no training loss), then I_k over the whole step."""
    k = cfg.k if cfg.mode == "slm" else 1.0
    y, r = torch.cat([m[1] for m in micro]), torch.cat([m[2] for m in micro])
    loss = torch.zeros(y.shape, device=y.device)
    if k < 1 and cfg.select in ("excess", "train", "sample"):
        with autocast(cfg):
            loss = torch.cat([model_token_loss(fwd, x, yy) for x, yy, *_ in micro])
    sel, n = select_step(loss, y, r, k, cfg.scope, cfg.select, gen, ranks)
    return list(sel.split(len(micro[0][1]))), n


def train_step(model, fwd, ddp, micro, cfg, gen, ranks):
    """Forward and backward of one optimizer step over this process's micro-batches. The gradient is that of
    the mean loss over the tokens selected in the whole step (every process, every micro-batch), whatever
    the split. Returns (the step's loss, this process's selected tokens per micro-batch)."""
    sels, n = [None] * len(micro), None
    if len(micro) > 1:
        sels, n = selection_pass(fwd, micro, cfg, gen, ranks)
    total = []
    for i, (x, y, r, *_) in enumerate(micro):
        sync = ranks.world == 1 or i == len(micro) - 1  # DDP all-reduces the gradients once, after the last
        with contextlib.nullcontext() if sync else ddp.no_sync():
            loss, _, sels[i] = step_loss(ddp, model.lm_head.weight, x, y, r, cfg, gen, ranks, sels[i], n)
            (loss * ranks.world if ranks.world > 1 else loss).backward()  # DDP averages over processes
        total.append(loss.detach())
    return sum_ranks(torch.stack(total).sum(), ranks), sels


def split_step(cfg, ranks):
    """Sequences per forward on each process, checked against the step's batch."""
    if cfg.batch_size % ranks.world:
        die(f"--batch_size {cfg.batch_size}: not divisible by the {ranks.world} processes; use a multiple of {ranks.world}")
    share = cfg.batch_size // ranks.world
    micro = cfg.micro_batch or share
    if share % micro:
        die(f"--micro_batch {micro}: must divide the {share} sequences each process holds per step "
            f"(--batch_size {cfg.batch_size} over {ranks.world} processes)")
    if cfg.head == "naive" and (micro < share or ranks.world > 1):
        die("--head naive is the plain single-process reference: run it without --micro_batch and without torchrun")
    return micro


def train(cfg, model_cfg, ranks=ONE):
    meta, name = load_meta(cfg.data), run_name(cfg)
    master = ranks.rank == 0  # logs, evaluates and saves
    out_dir = os.path.join(cfg.out, name)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    micro_bs = split_step(cfg, ranks)
    model = build_model(cfg, meta, model_cfg)
    T = model.config.block_size
    if cfg.mode == "base" and "base" not in meta["tokens"]:
        die(f"{cfg.data} has no base corpus (only the embedded demo builds base.bin): start from your own base "
            f"model with --init_from CKPT, or from scratch without it")
    if cfg.mode in ("base", "ref"):  # CLM on the general corpus, or on the high-quality one
        train_w = windows(cfg.data, "base.bin" if cfg.mode == "base" else "hq_train.bin", meta, T)
        train_w.extras = (no_ref(len(train_w.tokens)),)
        lo, hi = 0, None
    else:
        needs_ref = cfg.mode == "slm" and cfg.select in ("excess", "ref", "sample")
        extras = [load_ref_scores(cfg, meta, T) if needs_ref else no_ref(meta["tokens"]["web"])]
        if "labels" in meta:  # demo only: ground-truth noise labels, for auditing the selection
            extras.append(memmap(cfg.data, "web_labels.bin", np.uint8))
        train_w = windows(cfg.data, "web.bin", meta, T, extras)
        lo, hi = 0, web_split(train_w.n)
    ev = Evaluator(cfg, meta, T, train_w.extras[0] if cfg.mode in ("clm", "slm") else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # the random control's selection noise: the same on every process
    n_labels = labels_for(cfg, meta)
    state = {"history": [], "losses": [], "tokens_seen": 0, "tokens_trained": 0, "wall_s": 0.0,
             "sel_by_label": [0] * n_labels, "seen_by_label": [0] * n_labels, "tokens": {"hq": [], "web": [], "sel": []}}
    start = 0
    if cfg.resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, meta)
        model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["optimizer"]); gen.set_state(ckpt["rng"])
        start, state = ckpt["step"], ckpt["state"]
        state.setdefault("tokens", {"hq": [], "web": [], "sel": []})  # checkpoints from before token records
        if master:
            print(f"{name}: resumed from {ckpt_path} at step {start}")
    elif cfg.resume and master:
        print(f"{name}: no checkpoint at {ckpt_path} to resume; starting from step 0")
    fwd = torch.compile(model) if cfg.compile else model
    ddp = DDP(fwd, device_ids=[ranks.local] if cfg.device.startswith("cuda") else None) if ranks.world > 1 else fwd
    n_micro = cfg.batch_size // ranks.world // micro_bs
    split = f", {ranks.world} process{'es' * (ranks.world > 1)} x {n_micro} micro-batch{'es' * (n_micro > 1)} of {micro_bs}" \
        if micro_bs < cfg.batch_size else ""
    if master:
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.steps} steps of "
              f"{cfg.batch_size}x{T} tokens{split}, {cfg.mode}" + (f" k={cfg.k} select={cfg.select} scope={cfg.scope}" if cfg.mode == "slm" else ""))
    t_last, interval = time.time(), new_interval(n_labels)
    for step in range(start, cfg.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        micro = train_w.micro_batches(step, cfg.batch_size, cfg.seed, cfg.device, lo, hi, ranks, micro_bs)
        opt.zero_grad(set_to_none=True)
        loss, sels = train_step(model, fwd, ddp, micro, cfg, gen, ranks)
        if not torch.isfinite(loss):
            die(f"{name}: loss became {loss.item()} at step {step}; the last good checkpoint is {ckpt_path} "
                f"(resume with --resume after lowering --lr)")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        state["tokens_seen"] += cfg.batch_size * T
        state["tokens_trained"] += int(sum_ranks(sum(s.sum() for s in sels), ranks))
        state["losses"].append(loss.item())
        interval["n"] += 1; interval["tokens"] += cfg.batch_size * T; interval["loss"] += loss.item()
        if n_labels:  # micro-batches of web runs on the demo: (x, y, reference losses, labels)
            for (_, _, _, labels), sel in zip(micro, sels):
                count_labels(interval, labels, sel, n_labels)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            now = time.time()
            state["wall_s"] += now - t_last
            if n_labels:  # every process counted its own share
                interval["sel"], interval["seen"] = (sum_ranks(torch.tensor(interval[c], device=cfg.device), ranks).tolist()
                                                     for c in ("sel", "seen"))
            if master:
                measures, records = ev.evaluate(model)
                record(state, interval, measures, step + 1, cfg, name, now - t_last, meta.get("labels"))
                for key, v in records.items():
                    state["tokens"][key].append(v)
                save_checkpoint(ckpt_path, model, opt, gen, step + 1, cfg, meta, state)
            t_last, interval = time.time(), new_interval(n_labels)
    info = score_web(model, meta, cfg, ranks) if cfg.mode == "ref" else None  # every process scores its share
    if not master:
        return None
    write_token_losses(os.path.join(out_dir, "tokens.npz"), state, ev)
    return finish(cfg, meta, name, state, out_dir, model, info)


def write_token_losses(path, state, ev):
    """<out>/<name>/tokens.npz: the per-eval token losses of the fixed token set, with the steps and tokens
    seen of each eval, the web val windows (tokens, reference losses, labels) they belong to. Atomic."""
    if not state["tokens"]["web"]:
        return
    x, y, ref, *labels = ev.web_ref.get(ev.web_val(), "cpu")
    arrays = {key: torch.stack(v).numpy() for key, v in state["tokens"].items()}  # (evals, windows, T)
    evals = state["history"][-len(state["tokens"]["web"]):]  # a run resumed from an older checkpoint has fewer
    arrays.update(step=np.array([h["step"] for h in evals]), tokens_seen=np.array([h["tokens_seen"] for h in evals]),
                  web_x=torch.cat([x, y[:, -1:]], 1).int().numpy(), web_ref=ref.numpy())  # web_x: (n_val, T+1) tokens
    if labels:  # demo: ground-truth noise label of every web target
        arrays["web_labels"] = labels[0].numpy()
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def new_interval(n_labels):
    """Counters between two evaluations."""
    return {"sel": [0] * n_labels, "seen": [0] * n_labels, "n": 0, "tokens": 0, "loss": 0.0}


def labels_for(cfg, meta):
    """Number of ground-truth web labels to audit the selection with: demo data, web runs only."""
    return len(meta.get("labels", [])) if cfg.mode in ("clm", "slm") else 0


def count_labels(interval, labels, sel, n_labels):
    labels = labels.flatten().long()
    interval["seen"] = [a + b for a, b in zip(interval["seen"], torch.bincount(labels, minlength=n_labels).tolist())]
    interval["sel"] = [a + b for a, b in zip(interval["sel"], torch.bincount(labels[sel.flatten()], minlength=n_labels).tolist())]


def noise_share(counts, labels):
    """Share of tokens that are noise, overall and per noise kind (label 0 is clean)."""
    total = max(1, sum(counts))
    return {"all": round(1 - counts[0] / total, 4), **{labels[i]: round(c / total, 4) for i, c in enumerate(counts) if i}}


def record(state, interval, measures, step, cfg, name, dt, labels):
    """Appends one eval to the history and prints the log line."""
    entry = {"step": step, "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
             "wall_s": round(state["wall_s"], 2), "train_loss": round(interval["loss"] / interval["n"], 4), **measures}
    if interval["sel"]:  # demo web runs: noise among the selected tokens, next to the corpus
        entry["noise_in_selected"] = noise_share(interval["sel"], labels)
        entry["noise_share_corpus"] = noise_share(interval["seen"], labels)
        state["sel_by_label"] = [a + b for a, b in zip(state["sel_by_label"], interval["sel"])]
        state["seen_by_label"] = [a + b for a, b in zip(state["seen_by_label"], interval["seen"])]
    state["history"].append(entry)
    left = (cfg.steps - step) * dt / max(1, interval["n"])
    tok_s = interval["tokens"] / dt
    line = (f"{name} step {step} | loss {entry['train_loss']:.3f} | sel {state['tokens_trained'] / state['tokens_seen']:.0%} | "
            f"val hq {measures['val_loss_hq']:.3f} web {measures['val_loss_web']:.3f} | acc {measures['accuracy']:.1%}")
    if "noise_in_selected" in entry:
        line += f" | noise-in-sel {entry['noise_in_selected']['all']:.1%} (corpus {entry['noise_share_corpus']['all']:.1%})"
    print(line + f" | {tok_s / 1000:.1f}k tok/s | eta {left:.0f}s", flush=True)


def finish(cfg, meta, name, state, out_dir, model, score_info=None):
    last = state["history"][-1]
    metrics = {"run": name, "mode": cfg.mode, "k": cfg.k if cfg.mode == "slm" else 1.0,
               "select": cfg.select if cfg.mode == "slm" else "all", "scope": cfg.scope, "steps": cfg.steps,
               "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"], "wall_s": round(state["wall_s"], 2),
               "final": {m: last[m] for m in ("val_loss_hq", "val_loss_web", "accuracy")},
               "history": state["history"], "losses": state["losses"], "config": asdict(cfg), "model_config": asdict(model.config),
               "n_params": sum(p.numel() for p in model.parameters()), "data": {"encoding": meta["encoding"], "sha256": meta["sha256"]}}
    if labels_for(cfg, meta):
        metrics["noise_in_selected"] = noise_share(state["sel_by_label"], meta["labels"])
        metrics["noise_share_corpus"] = noise_share(state["seen_by_label"], meta["labels"])
    if score_info:
        metrics.update(score_s=score_info["score_s"], score_tok_s=score_info["score_tok_s"])
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    print(f"{name}: final val hq {last['val_loss_hq']:.4f} web {last['val_loss_web']:.4f} acc {last['accuracy']:.1%} "
          f"-> {out_dir}/metrics.json")
    return metrics


# -----------------------------------------------------------------------------
# evaluation: target-distribution val loss (hq val), web val loss, answer accuracy (greedy, exact match)


class Evaluator:
    def __init__(self, cfg, meta, T, ref=None):
        self.cfg, self.enc = cfg, get_encoding(meta["encoding"])
        self.hq, self.web = windows(cfg.data, "hq_val.bin", meta, T), windows(cfg.data, "web.bin", meta, T)
        labels = [memmap(cfg.data, "web_labels.bin", np.uint8)] if "labels" in meta else []  # demo: noise labels
        self.web_ref = Windows(self.web.tokens, T, (no_ref(len(self.web.tokens)) if ref is None else ref, *labels),
                               self.web.name)  # web val windows with L_RM (and labels) aligned
        with open(os.path.join(cfg.data, "eval.json")) as f:
            self.problems = json.load(f)[:cfg.eval_problems]

    @torch.no_grad()
    def val_loss(self, model, windows, ws):
        total, n = 0.0, 0
        for i in range(0, len(ws), 32):
            x, y = windows.get(ws[i:i + 32], self.cfg.device)
            total, n = total + model_token_loss(model, x, y).sum().item(), n + int((y != IGNORE).sum())
        return total / n

    def web_val(self):
        return list(range(web_split(self.web.n), self.web.n))

    @torch.no_grad()
    def evaluate(self, model):
        """The measures of one eval, and the per-token records of a fixed token set (the first 8 hq val windows,
        the web val windows; float16) with the web val tokens this run's rule would select now."""
        model.eval()
        cfg, k = self.cfg, (self.cfg.k if self.cfg.mode == "slm" else 1.0)
        x, y, r, *_ = self.web_ref.get(self.web_val(), cfg.device)  # at most 32 windows (web_split): one batch
        web = model_token_loss(model, x, y)  # (n_val, T)
        measures = {"val_loss_hq": round(self.val_loss(model, self.hq, list(range(min(self.hq.n, 128)))), 4),
                    "val_loss_web": round(web.sum().item() / int((y != IGNORE).sum()), 4),
                    "accuracy": answer_accuracy(model, self.problems, self.enc)}
        x_hq, y_hq = self.hq.get(range(min(self.hq.n, 8)), cfg.device)
        gen = torch.Generator().manual_seed(cfg.seed)  # its own RNG: the training RNG stays untouched
        sel = select_tokens(web, y, r, k, cfg.scope, cfg.select, gen)
        records = {"hq": model_token_loss(model, x_hq, y_hq).half().cpu(), "web": web.half().cpu(), "sel": sel.cpu()}
        return measures, records


@torch.no_grad()
def generate(model, prompts, max_new):
    """Greedy decoding of a batch of prompts (lists of token ids), left-padded, with a KV cache."""
    T = model.config.block_size
    max_new = min(max_new, T // 2)
    prompts = [p[-(T - max_new):] for p in prompts]  # prompt + generated tokens fit the context
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts])
    idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    caches = [[] for _ in model.transformer.h]
    out = []
    h = model(idx.to(model.lm_head.weight.device), pad.to(model.lm_head.weight.device), caches)
    for _ in range(max_new):
        nxt = model.lm_head(h[:, -1]).argmax(-1)
        out.append(nxt)
        h = model(nxt[:, None], pad.to(nxt.device), caches)
    return torch.stack(out, 1).tolist()


def answer_accuracy(model, problems, enc, max_new=48):
    """Share of problems whose generated '#### N' line equals the reference answer."""
    if not problems:
        return 0.0
    correct = 0
    for i in range(0, len(problems), 64):
        chunk = problems[i:i + 64]
        outs = generate(model, [[enc.eot_token] + enc.encode_ordinary(p["prompt"]) for p in chunk], max_new)
        for p, o in zip(chunk, outs):
            text = enc.decode(o[:o.index(enc.eot_token)] if enc.eot_token in o else o)
            m = re.search(r"####\s*(-?\d[\d,]*)", text)
            correct += bool(m) and m.group(1).replace(",", "") == p["answer"]
    return round(correct / len(problems), 4)


# -----------------------------------------------------------------------------
# comparison: one table of every run in --out


def tokens_to_reach(history, target, key="tokens_seen"):
    """Tokens (linearly interpolated between evals) at which val_loss_hq first reaches target; None if never."""
    prev = None
    for h in history:
        if h["val_loss_hq"] <= target:
            if prev is None:
                return h[key]
            f = (prev["val_loss_hq"] - target) / (prev["val_loss_hq"] - h["val_loss_hq"])
            return prev[key] + f * (h[key] - prev[key])
        prev = h
    return None


def load_runs(cfg):
    """metrics.json of every run in --out, in pipeline order."""
    runs = []
    for name in sorted(os.listdir(cfg.out)) if os.path.isdir(cfg.out) else []:
        path = os.path.join(cfg.out, name, "metrics.json")
        if os.path.isfile(path):
            with open(path) as f:
                runs.append(json.load(f))
    if not runs:
        die(f"{cfg.out}: no runs with metrics.json: run `python rho.py --ref`, `--clm`, `--slm --k 0.6` first")
    runs.sort(key=lambda r: (["base", "ref", "clm", "slm"].index(r["mode"]), r["run"]))  # pipeline order
    return runs


def compare(cfg):
    runs = load_runs(cfg)
    clm = next((r for r in runs if r["run"] == "clm"), None)
    head = f"{'run':<22}{'val hq':>8}{'val web':>9}{'acc':>7}{'seen':>8}{'trained':>9}{'noise-in-sel':>14}{'wall':>7}{'to CLM loss':>13}"
    print(head + "\n" + "-" * len(head))
    for r in runs:
        f = r["final"]
        noise = f"{r['noise_in_selected']['all']:.1%}/{r['noise_share_corpus']['all']:.0%}" if "noise_in_selected" in r else "-"
        reach = "-"
        if clm and r["mode"] in ("clm", "slm"):
            t = tokens_to_reach(r["history"], clm["final"]["val_loss_hq"])
            reach = "never" if t is None else f"{t / 1e6:.2f}M {clm['tokens_seen'] / t:.1f}x"
        print(f"{r['run']:<22}{f['val_loss_hq']:>8.4f}{f['val_loss_web']:>9.4f}{f['accuracy']:>7.1%}{r['tokens_seen'] / 1e6:>7.2f}M"
              f"{r['tokens_trained'] / 1e6:>8.2f}M{noise:>14}{r['wall_s']:>6.0f}s{reach:>13}")
    print("val hq: target-distribution val loss (nats/token); noise-in-sel: noise share of the trained tokens / of the corpus;\n"
          "to CLM loss: tokens seen until val hq first reaches CLM's final value, and CLM's tokens over that.")
    for r in runs:
        if r["mode"] == "slm" and "noise_in_selected" in r:
            sel, corpus = r["noise_in_selected"], r["noise_share_corpus"]
            print(f"{r['run']} noise in selected by kind (corpus): " + ", ".join(f"{kind} {sel[kind]:.1%} ({corpus[kind]:.1%})" for kind in sel if kind != "all"))
    for r in runs:
        if "score_s" in r:
            print(f"{r['run']}: scoring every web token took {r['score_s']:.0f}s ({r['score_tok_s']:,} tok/s), beside {r['wall_s']:.0f}s of training")
    cpt = [r for r in runs if r["mode"] in ("clm", "slm")]
    if len({r["tokens_seen"] for r in cpt}) > 1:
        print("note: the continual-pretraining runs saw different numbers of tokens; compare them at equal tokens seen.")
    if len({r["config"]["init_from"] for r in cpt}) > 1:
        print("note: the continual-pretraining runs started from different checkpoints (--init_from); they are not comparable.")


# -----------------------------------------------------------------------------
# analysis: report: one self-contained HTML page (inline SVG, no network) and the same numbers as JSON


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
    final = l[-1]
    flat = np.where(final <= final.mean(), 0, 3)
    return np.where(dl < -0.2, 1, np.where(dl > 0.2, 2, flat))


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def fmt_num(v):
    return f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e4 else f"{v:g}"


def svg_lines(series, title="", xlabel="", ylabel="", w=540, h=300, hline=None, mark=None):
    """A line plot as inline SVG. series: [(name, xs, ys)], (name, xs, ys, dashed) or (name, xs, ys, dashed,
    colour index); hline: a y drawn as a
    grey rule; mark: (x, y, label) circled. Hand-written: no plotting library, nothing fetched."""
    pts = [(x, y) for s in series for x, y in zip(s[1], s[2]) if y is not None]
    ys = [y for _, y in pts] + ([hline] if hline is not None else [])
    xt, yt = nice_ticks(min(x for x, _ in pts), max(x for x, _ in pts)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = min(xt[0], min(x for x, _ in pts)), max(xt[-1], max(x for x, _ in pts)), min(yt[0], min(ys)), max(yt[-1], max(ys))
    L, R, T, B = 58, 175, 24, 40  # margins; the legend sits on the right
    px = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (w - L - R)
    py = lambda y: h - B - (y - y0) / ((y1 - y0) or 1) * (h - T - B)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
         f'<text x="{L}" y="14" font-weight="bold" font-size="12">{html_escape(title)}</text>']
    for x in xt:
        o.append(f'<line x1="{px(x):.1f}" y1="{T}" x2="{px(x):.1f}" y2="{h - B}" stroke="#eee"/><text x="{px(x):.1f}" y="{h - B + 14}" text-anchor="middle">{fmt_num(x)}</text>')
    for y in yt:
        o.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{w - R}" y2="{py(y):.1f}" stroke="#eee"/><text x="{L - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{fmt_num(round(y, 6))}</text>')
    o.append(f'<rect x="{L}" y="{T}" width="{w - L - R}" height="{h - T - B}" fill="none" stroke="#999"/>')
    o.append(f'<text x="{(L + w - R) / 2}" y="{h - 6}" text-anchor="middle">{html_escape(xlabel)}</text>')
    o.append(f'<text transform="translate(12,{(T + h - B) / 2}) rotate(-90)" text-anchor="middle">{html_escape(ylabel)}</text>')
    if hline is not None:
        o.append(f'<line x1="{L}" y1="{py(hline):.1f}" x2="{w - R}" y2="{py(hline):.1f}" stroke="#888" stroke-dasharray="2,3"/>')
    for i, s in enumerate(series):
        c, dash = COLORS[(s[4] if len(s) > 4 else i) % len(COLORS)], ' stroke-dasharray="6,4"' if len(s) > 3 and s[3] else ""
        xy = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s[1], s[2]) if y is not None)
        o.append(f'<polyline points="{xy}" fill="none" stroke="{c}" stroke-width="1.8"{dash}/>')
        o += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{c}"/>' for x, y in zip(s[1], s[2]) if y is not None]
        ly = T + 8 + 15 * i
        o.append(f'<line x1="{w - R + 8}" y1="{ly}" x2="{w - R + 26}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>'
                 f'<text x="{w - R + 30}" y="{ly + 4}">{html_escape(s[0])}</text>')
    if mark:
        o.append(f'<circle cx="{px(mark[0]):.1f}" cy="{py(mark[1]):.1f}" r="7" fill="none" stroke="black" stroke-width="1.5"/>'
                 f'<text x="{px(mark[0]):.1f}" y="{py(mark[1]) - 10:.1f}" text-anchor="middle">{html_escape(mark[2])}</text>')
    return "\n".join(o + ["</svg>"])


def html_escape(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def html_table(head, rows):
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else html_escape(v))
    return ("<table><tr>" + "".join(f"<th>{html_escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


def load_tokens(cfg, run):
    path = os.path.join(cfg.out, run, "tokens.npz")
    return dict(np.load(path)) if os.path.isfile(path) else None


def main_slm(runs):
    """The SLM run the detailed sections show: slm-k0.6 if there, else the first excess-loss SLM run."""
    slm = [r for r in runs if r["mode"] == "slm" and r["select"] == "excess"]
    return next((r for r in slm if r["run"] == "slm-k0.6"), slm[0] if slm else None)


def report_efficiency(runs):
    """1. Data efficiency: target loss and accuracy against tokens seen; tokens to reach CLM's final loss."""
    web = [r for r in runs if r["mode"] in ("clm", "slm")]
    clm = next((r for r in web if r["run"] == "clm"), None)
    if not web:
        return "<p>No continual-pretraining runs (--clm, --slm) in this folder.</p>", {}
    xs = lambda r, key: ([h["tokens_seen"] for h in r["history"]], [h[key] for h in r["history"]])
    html = svg_lines([(r["run"], *xs(r, "val_loss_hq")) for r in web], "target val loss (hq) vs tokens seen", "tokens seen",
                     "val loss hq (nats/token)", hline=clm["final"]["val_loss_hq"] if clm else None)
    html += svg_lines([(r["run"], *xs(r, "accuracy")) for r in web], "answer accuracy vs tokens seen", "tokens seen", "accuracy")
    data, rows = {}, []
    for r in web:
        d = {"final_val_loss_hq": r["final"]["val_loss_hq"], "accuracy": r["final"]["accuracy"], "tokens_seen": r["tokens_seen"],
             "tokens_trained": r["tokens_trained"], "wall_s": r["wall_s"]}
        if clm:
            for key in ("tokens_seen", "tokens_trained", "wall_s"):
                t, t_clm = tokens_to_reach(r["history"], clm["final"]["val_loss_hq"], key), clm[key]
                d[f"to_clm_loss_{key}"], d[f"speedup_{key}"] = t, (round(t_clm / t, 3) if t else None)
        data[r["run"]] = d
        sp = lambda key: "never" if clm and d[f"to_clm_loss_{key}"] is None else (f"{d[f'to_clm_loss_{key}']:,.0f} ({d[f'speedup_{key}']:.2f}x)" if clm else "-")
        rows.append([r["run"], d["final_val_loss_hq"], f"{d['accuracy']:.1%}", sp("tokens_seen"), sp("tokens_trained"), sp("wall_s")])
    html += html_table(["run", "final val hq", "accuracy", "tokens seen to CLM's final loss (CLM/this)",
                        "tokens trained to it", "wall s to it"], rows)
    html += "<p>Dotted rule: CLM's final target loss. Linear interpolation between evals (<code>tokens_to_reach</code>).</p>"
    return html, data


def precision_recall(history):
    """Per eval interval: precision = clean share of the selected tokens; recall = selected clean / seen clean,
    from the shares and the tokens_trained / tokens_seen deltas."""
    out, prev = [], {"tokens_seen": 0, "tokens_trained": 0}
    for h in history:
        d_sel, d_seen = h["tokens_trained"] - prev["tokens_trained"], h["tokens_seen"] - prev["tokens_seen"]
        p = 1 - h["noise_in_selected"]["all"]
        clean_seen = (1 - h["noise_share_corpus"]["all"]) * d_seen
        out.append({"tokens_seen": h["tokens_seen"], "precision": round(p, 4), "recall": round(min(1.0, p * d_sel / clean_seen), 4) if clean_seen else None})
        prev = h
    return out


def report_selection(runs):
    """2. Selection audit (demo labels): per noise kind, share among selected vs corpus; clean precision/recall."""
    audited = [r for r in runs if r["mode"] == "slm" and r["history"] and "noise_in_selected" in r["history"][0]]
    if not audited:
        return "<p>No SLM run with ground-truth noise labels (demo data) in this folder.</p>", {}
    data = {r["run"]: {"intervals": precision_recall(r["history"]), "noise_in_selected": r.get("noise_in_selected"),
                       "noise_share_corpus": r.get("noise_share_corpus")} for r in audited}
    series = []
    for i, r in enumerate(audited):  # one colour per run: precision solid, recall dashed
        pr = data[r["run"]]["intervals"]
        series += [(f"{r['run']} prec", [e["tokens_seen"] for e in pr], [e["precision"] for e in pr], False, i),
                   (f"{r['run']} recall", [e["tokens_seen"] for e in pr], [e["recall"] for e in pr], True, i)]
    html = svg_lines(series, "clean tokens: precision (solid) and recall (dashed)", "tokens seen", "share", w=640, h=20 * len(series) + 60)
    m = main_slm(audited) or audited[0]
    kinds = [k for k in m["history"][0]["noise_in_selected"] if k != "all"]
    ratio = lambda h, k: h["noise_in_selected"][k] / h["noise_share_corpus"][k] if h["noise_share_corpus"][k] else None
    html += svg_lines([(k, [h["tokens_seen"] for h in m["history"]], [ratio(h, k) for h in m["history"]]) for k in kinds],
                      f"{m['run']}: share among selected / share in corpus, per noise kind", "tokens seen", "selected / corpus", hline=1.0)
    rows = [[r["run"]] + [f"{r['noise_in_selected'][k]:.1%} ({r['noise_share_corpus'][k]:.1%})" for k in ["all"] + kinds] for r in audited]
    html += html_table(["run"] + ["all noise"] + kinds, rows)
    html += ("<p>Whole run, share of the selected tokens (share of the corpus). Precision: clean share of the selected "
             "tokens. Recall: selected clean tokens over seen clean tokens, per 50-step interval. A ratio of 1 in the "
             "second plot means no filtering of that kind.</p>")
    return html, data


def report_dynamics(cfg, runs):
    """3. Token-loss dynamics: the four categories over CLM's checkpoints; SLM's selected vs unselected loss."""
    clm, m = load_tokens(cfg, "clm"), main_slm(runs)
    if clm is None:
        return "<p>The clm run has no per-token records (tokens.npz): rerun it to get this section (<code>python rho.py --clm --init_from base</code>).</p>", {}
    data, rows, cats = {"checkpoints_tokens_seen": clm["tokens_seen"].tolist()}, [], {}
    for part in ("web", "hq"):
        cat = cats[part] = loss_category(clm[part].reshape(len(clm["step"]), -1).astype(np.float32), clm["tokens_seen"])
        shares = {c: round(float((cat == i).mean()), 4) for i, c in enumerate(CATEGORIES)}
        data[f"categories_{part}"] = shares
        rows.append([f"clm, {part} val tokens ({cat.size:,})"] + [f"{shares[c]:.0%}" for c in CATEGORIES])
    rows.append(["paper (Fig. 2, 1B on OpenWebMath)", "51%", "26%", "12%", "11%"])
    html = html_table(["token set"] + list(CATEGORIES), rows)
    web, cat = clm["web"].reshape(len(clm["step"]), -1).astype(np.float32), cats["web"]
    html += svg_lines([(c, clm["tokens_seen"].tolist(), [float(e[cat == i].mean()) if (cat == i).any() else None for e in web])
                       for i, c in enumerate(CATEGORIES)], "clm: mean loss per category (web val tokens)", "tokens seen", "loss")
    slm = load_tokens(cfg, m["run"]) if m else None
    if slm is None:
        html += "<p>No SLM run with per-token records (tokens.npz): rerun <code>python rho.py --slm --k 0.6 --init_from base</code> to get the selected-vs-unselected plot.</p>"
        return html, data
    sel, loss, t = slm["sel"], slm["web"].astype(np.float32), slm["tokens_seen"].tolist()
    mean = lambda a, s: [float(a[i][s[i]].mean()) for i in range(len(a))]
    series = [(f"{m['run']} selected", t, mean(loss, sel)), (f"{m['run']} unselected", t, mean(loss, ~sel))]
    if clm["web"].shape == slm["web"].shape:  # CLM's loss on the tokens SLM selects / leaves at that eval
        cl = clm["web"].astype(np.float32)
        series += [("clm on SLM-selected", t, mean(cl, sel), True), ("clm on SLM-unselected", t, mean(cl, ~sel), True)]
    data["slm_run"], data["slm_selected_vs_unselected"] = m["run"], {s[0]: s[2] for s in series}
    html += svg_lines(series, "mean loss of web val tokens SLM selects vs leaves, at each eval", "tokens seen", "loss", w=640)
    html += ("<p>Categories: per token, a least-squares line over the checkpoints; its change dL over training: "
             "dL &lt; -0.2 is H-&gt;L, dL &gt; 0.2 is L-&gt;H, otherwise L-&gt;L if the final loss is at most the mean "
             "final loss, else H-&gt;H. Selected: the run's rule (top k by excess loss over the fixed web val set) at that eval.</p>")
    return html, data


def excess_color(e):
    """Background for an excess loss: red where the model is worse than the reference, blue where better."""
    a = min(1.0, abs(e) / 3)
    return f"rgba(214,39,40,{a:.2f})" if e > 0 else f"rgba(31,119,180,{a:.2f})"


def report_highlight(cfg, runs, n_docs=3, n_chars=600):
    """4. Token highlighting: web val text coloured by excess loss, selected tokens underlined, early and late."""
    m = main_slm(runs)
    z = load_tokens(cfg, m["run"]) if m else None
    if z is None:
        return "<p>No SLM run with per-token records (tokens.npz): rerun <code>python rho.py --slm --k 0.6 --init_from base</code> to get this section.</p>", {}
    enc = get_encoding(load_meta(cfg.data)["encoding"])
    html, data = "", {"run": m["run"], "docs": []}
    for w in range(min(n_docs, len(z["web_x"]))):
        html += f"<h3>web val window {w}</h3>"
        for i, name in ((0, "early"), (len(z["step"]) - 1, "late")):
            spans = []
            for j, tok in enumerate(z["web_x"][w, 1:n_chars + 1].tolist()):
                e = float(z["web"][i, w, j]) - float(z["web_ref"][w, j])
                under = "border-bottom:2px solid #000;" if z["sel"][i, w, j] else ""
                spans.append(f'<span style="background:{excess_color(e)};{under}" title="excess {e:.2f}">{html_escape(enc.decode([tok]))}</span>')
            html += f'<p><b>{name} (step {int(z["step"][i])})</b>, selected {z["sel"][i, w].mean():.0%}</p><div class="doc">{"".join(spans)}</div>'
            data["docs"].append({"window": w, "step": int(z["step"][i]), "selected": round(float(z["sel"][i, w].mean()), 4)})
    legend = (f'<p>{m["run"]}: background = excess loss (training loss at that eval minus reference loss), '
              f'<span style="background:{excess_color(3)}">high</span> / <span style="background:{excess_color(-3)}">negative</span>; '
              '<span style="border-bottom:2px solid #000">underlined</span> = selected at that eval. Hover a token for its value.</p>')
    return legend + html, data


def report_cost(cfg, runs):
    """5. Cost per stage: wall time and FLOPs (6 N D to train, 2 N D to score), for SLM and CLM."""
    by = {r["run"]: r for r in runs}
    m, clm = main_slm(runs), by.get("clm")
    flops = lambda r, mult=6: mult * r["n_params"] * r["tokens_seen"]
    stages = {}
    if "base" in by:
        stages["base"] = {"wall_s": by["base"]["wall_s"], "flops": flops(by["base"])}
    if "ref" in by:
        ref = by["ref"]
        stages["reference training"] = {"wall_s": ref["wall_s"], "flops": flops(ref)}
        if "score_s" in ref:
            n_scored = load_meta(cfg.data)["tokens"]["web"]  # one forward pass over every web token
            stages["scoring"] = {"wall_s": ref["score_s"], "flops": 2 * ref["n_params"] * n_scored}
    for r in (clm, m):
        if r:
            stages[f"continual pretraining: {r['run']}"] = {"wall_s": r["wall_s"], "flops": flops(r)}
    pipe = {}
    if clm:
        pipe["clm"] = [s for s in ("base", "continual pretraining: clm") if s in stages]
    if m:
        pipe[m["run"]] = [s for s in ("base", "reference training", "scoring", f"continual pretraining: {m['run']}") if s in stages]
    totals = {p: {"wall_s": round(sum(stages[s]["wall_s"] for s in ss), 2), "flops": sum(stages[s]["flops"] for s in ss)} for p, ss in pipe.items()}
    if m and clm:  # SLM's pipeline up to the point where it reaches CLM's final target loss
        t = tokens_to_reach(m["history"], clm["final"]["val_loss_hq"])
        if t:
            pre = [s for s in pipe[m["run"]] if not s.startswith("continual")]
            totals[f"{m['run']} until CLM's final loss"] = {"wall_s": round(sum(stages[s]["wall_s"] for s in pre) + (tokens_to_reach(m["history"], clm["final"]["val_loss_hq"], "wall_s") or 0), 2),
                                                            "flops": sum(stages[s]["flops"] for s in pre) + 6 * m["n_params"] * t}
    rows = [[s, f"{v['wall_s']:.0f}", f"{v['flops']:.3g}"] for s, v in stages.items()]
    rows += [[f"total: {p}", f"{v['wall_s']:.0f}", f"{v['flops']:.3g}"] for p, v in totals.items()]
    html = html_table(["stage", "wall s", "FLOPs"], rows)
    html += ("<p>FLOPs = 6 &middot; n_params &middot; tokens for training (forward and backward; SLM's trunk backward is "
             "dense, so it counts every token seen, not only the selected ones), 2 &middot; n_params &middot; tokens for "
             "scoring (forward only). Attention FLOPs are left out. Wall times are this machine's.</p>")
    return html, {"stages": stages, "totals": totals, "formula": "train 6*n_params*tokens_seen; score 2*n_params*tokens_scored"}


def report_sweep(runs):
    """6. k sweep: final target loss against k for the excess-loss SLM runs of one scope; k = 1 is CLM."""
    clm = next((r for r in runs if r["run"] == "clm"), None)
    pts = {r["k"]: r for r in runs if r["mode"] == "slm" and r["select"] == "excess" and r["scope"] == "batch"}
    if clm:
        pts[1.0] = clm
    if len(pts) < 2:
        return "<p>Fewer than two runs for a k sweep: run <code>python rho.py --slm --k 0.2 --init_from base</code> (and 0.4, 0.8).</p>", {}
    ks = sorted(pts)
    best = min(ks, key=lambda k: pts[k]["final"]["val_loss_hq"])
    html = svg_lines([("final val hq", ks, [pts[k]["final"]["val_loss_hq"] for k in ks])], "k sweep (scope batch, k = 1 is CLM)",
                     "k (share of tokens selected)", "final val loss hq", mark=(best, pts[best]["final"]["val_loss_hq"], f"best k={best:g}"))
    html += html_table(["k", "run", "final val hq", "accuracy"], [[f"{k:g}" + (" (best)" if k == best else ""), pts[k]["run"],
                                                                   pts[k]["final"]["val_loss_hq"], f"{pts[k]['final']['accuracy']:.1%}"] for k in ks])
    return html, {"best_k": best, "points": {f"{k:g}": {"run": pts[k]["run"], "val_loss_hq": pts[k]["final"]["val_loss_hq"]} for k in ks}}


def report(cfg):
    """Writes <out>/report.html (self-contained) and <out>/report.json from the runs in --out."""
    runs = load_runs(cfg)
    sections = [("efficiency", "1. Data efficiency", report_efficiency(runs)),
                ("selection", "2. Selection audit", report_selection(runs)),
                ("dynamics", "3. Token-loss dynamics", report_dynamics(cfg, runs)),
                ("highlight", "4. Token highlighting", report_highlight(cfg, runs)),
                ("cost", "5. Cost", report_cost(cfg, runs)),
                ("k_sweep", "6. k sweep", report_sweep(runs))]
    style = ("body{font-family:sans-serif;max-width:1150px;margin:20px auto;color:#222}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}"
             ".doc{font-family:monospace;font-size:12px;white-space:pre-wrap;line-height:1.7;border:1px solid #ddd;padding:6px}svg{margin:4px}")
    body = "".join(f'<h2 id="{key}">{title}</h2>\n{html}\n' for key, title, (html, _) in sections)
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>rho report: {html_escape(cfg.out)}</title><style>{style}</style></head>"
            f"<body><h1>rho report: {html_escape(cfg.out)}</h1><p>Runs: {', '.join(r['run'] for r in runs)}. "
            f"Written by <code>python rho.py --report --out {html_escape(cfg.out)}</code>.</p>\n{body}</body></html>")
    path = os.path.join(cfg.out, "report.html")
    write_atomic(path, page.encode())  # utf-8, as the page declares
    write_json(os.path.join(cfg.out, "report.json"), {"runs": [r["run"] for r in runs], **{key: data for key, _, (_, data) in sections}})
    print(f"report: {path} and {os.path.join(cfg.out, 'report.json')}")
    return path


# -----------------------------------------------------------------------------
# benchmark: the head and a whole step, side by side in one run; every measurement in a fresh process


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def mem_now(device):
    """Bytes in use now: allocated CUDA memory, or this process's resident set on CPU."""
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


def native_lce(h, w, y, **kw):
    """torch's own chunked linear + cross-entropy (F.linear_cross_entropy, torch >= 2.13), gradient in the forward."""
    return F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, options=torch.nn.LinearCrossEntropyOptions(), **kw)


def native_lce_slm(h, w, y, r, k):
    """The SLM head built from two native calls: a no-grad pass for every token's loss, then one with gradient over
    the selected rows only."""
    with torch.no_grad():
        tok = native_lce(h, w, y, reduction="none")
    idx = select_tokens(tok[None], y[None], r[None], k)[0].nonzero().squeeze(1)
    return native_lce(h[idx], w, y[idx], reduction="sum") / len(idx)


def bench_head(impl, N, d, V, k, device, dtype, warmup, repeats):
    """Head + loss forward and backward on random hidden states: naive CLM and SLM (full logits), rho's fused heads
    (fused_clm: what --clm runs; fused_slm), and torch's native chunked op (torch_lce, CLM; torch_lce_slm)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, N, d, generator=g).to(device, dtype).requires_grad_()
    w = (0.02 * torch.randn(V, d, generator=g)).to(device, dtype).requires_grad_()
    y, r = torch.randint(0, V, (1, N), generator=g).to(device), torch.rand(1, N, generator=g).to(device)
    loss_fn = {"naive_clm": lambda: F.cross_entropy((h @ w.t()).float().view(N, V), y.view(N)),
               "naive_slm": lambda: slm_loss(h @ w.t(), y, r, k)[0],
               "fused_clm": lambda: fused_slm_loss(h, w, y, r, 1.0)[0],
               "fused_slm": lambda: fused_slm_loss(h, w, y, r, k)[0],
               "torch_lce": lambda: native_lce(h[0], w, y[0]),
               "torch_lce_slm": lambda: native_lce_slm(h[0], w, y[0], r[0], k)}[impl]

    def step():
        h.grad = w.grad = None
        loss_fn().backward()
    return timed(step, device, warmup, repeats)


def bench_step(impl, cfg, k, device, warmup, repeats):
    """One whole training step of a GPT through the fused head: CLM (k = 1, what --clm runs), SLM with stored
    reference losses, or SLM with an online reference forward (a second model scoring the batch each step)."""
    torch.manual_seed(0)
    model, B, T = GPT(cfg).to(device), 16, cfg.block_size
    ref_model = GPT(cfg).to(device).eval() if impl == "slm_online" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, cfg.vocab_size, (B, T), device=device), torch.randint(0, cfg.vocab_size, (B, T), device=device)
    r = torch.rand(B, T, device=device)

    def step():
        ref = r if ref_model is None else model_token_loss(ref_model, x, y)
        loss = fused_slm_loss(model(x), model.lm_head.weight, y, ref, 1.0 if impl == "clm" else k)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed((lambda: model_token_loss(model, x, y)) if impl == "score" else step, device, warmup, repeats)


def bench_train(impl, mcfg, B, k, device, dtype, warmup, repeats):
    """One optimizer step exactly as train() runs it (fused head, --dtype autocast): clm (k = 1),
    slm (stored reference losses, the step in one forward) or slm_split (the same step in two micro-batches,
    so a no-grad selection pass comes first: the cost of gradient accumulation under a step-wide top-k)."""
    torch.manual_seed(0)
    cfg = RunConfig(mode="clm" if impl == "clm" else "slm", k=k, device=str(device), dtype=dtype)
    model, T = GPT(mcfg).to(device), mcfg.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, mcfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2))
    r = torch.rand(B, T, generator=g).to(device)
    micro = [(x, y, r)] if impl != "slm_split" else [(x[i::2], y[i::2], r[i::2]) for i in range(2)]

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(model, model, model, micro, cfg, g, ONE)
        opt.step()
    return timed(step, device, warmup, repeats)


def bench_scale(n_tokens, device, dtype):
    """Scoring n_tokens random web tokens with a demo-sized model through score_web, once: its cost per token."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "ref"))
        np.random.default_rng(0).integers(0, 257, n_tokens, dtype=np.uint16).tofile(os.path.join(d, "web.bin"))
        meta = {"encoding": "bytes", "dtype": "uint16", "sha256": "bench"}
        cfg = RunConfig(data=d, out=d, device=str(device), dtype=dtype)
        torch.manual_seed(0)
        model = GPT(GPTConfig()).to(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            score_web(model, meta, cfg)
        return 1000 * (time.perf_counter() - t0), mem_peak(device), 1000 * (time.process_time() - c0)


BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense, datasheets


def gpu_peak_tflops():
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(mcfg):
    """Model FLOPs of a training step per token: 6 N (N: parameters, position embeddings left out) plus
    attention's 12 L d T (the PaLM / nanoGPT MFU convention); selection changes neither."""
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(mcfg).parameters()) - mcfg.block_size * mcfg.n_embd
    return 6 * n + 12 * mcfg.n_layer * mcfg.n_embd * mcfg.block_size


def bench_one(case, impl, shape, device, dtype, warmup, repeats):
    device, (N, d, V, k) = torch.device(device), shape
    if case == "head":
        ms, peak = bench_head(impl, N, d, V, k, device, getattr(torch, dtype), warmup, repeats)
    elif case == "train":  # GPT-2 small, as --preset gpt2-owm trains it
        ms, peak = bench_train(impl, GPTConfig(vocab_size=V, **GPT2_SMALL), N // GPT2_SMALL["block_size"], k, device, dtype, warmup, repeats)
    elif case == "scale":
        bench_scale(2**17, device, dtype)  # warm-up: a first scoring run in this process
        ms, peak, cpu_ms = bench_scale(N, device, dtype)
    else:
        cfg = GPTConfig(vocab_size=V, n_embd=d, n_head=max(1, d // 64), n_layer=4 if d <= 256 else 12)
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            ms, peak = bench_step(impl, cfg, k, device, warmup, repeats)
    row = {"case": case, "impl": impl, "device": str(device), "dtype": dtype, "N": N, "d": d, "V": V, "k": k,
           "ms": round(ms, 2), "peak_mb": round(peak / 2**20, 1)}
    if case == "scale":  # CPU time of every thread: the cost, less sensitive than wall time to a shared machine
        row["cpu_ms"] = round(cpu_ms, 1)
    return row


BENCH_CASES = ("head", "step", "train", "scale")


def bench_plan(cases, k, gpu, micro_batch=0):
    plan = []
    if "head" in cases:  # the demo model's head; GPT-2 small's
        impls = ("naive_clm", "naive_slm", "fused_clm", "fused_slm", "torch_lce", "torch_lce_slm")
        plan += [("head", impl, (N, d, V, k)) for N, d, V in [(4096, 128, 320), (8192, 768, 50304)] for impl in impls]
    if "step" in cases:  # the demo model's step, and its scoring
        plan += [("step", impl, (16 * 256, 128, 320, k)) for impl in ("clm", "slm_stored", "slm_online", "score")]
    if "train" in cases:  # GPT-2 small at T = 1024: --micro_batch, else the preset's on a GPU, 2 sequences on a CPU
        B = micro_batch or (PRESETS["gpt2-owm"]["micro_batch"] if gpu else 2)
        plan += [("train", impl, (B * 1024, 768, 50257, k)) for impl in ("clm", "slm", "slm_split")]
    if "scale" in cases:  # scoring 2^18, 2^19, 2^20 tokens, there and back (a drifting machine cancels out)
        plan += [("scale", "score", (2**e, 128, 320, k)) for e in (18, 19, 20, 20, 19, 18)]
    return plan


def bench(cfg):
    """python rho.py --bench [--cases head,step,train,scale]: one JSON line per measurement, then a table;
    ratios against CLM of the same case and shape (scale: against the smallest size). Each measurement
    runs in a fresh process, so CPU peak memory (max RSS) is its own."""
    import multiprocessing as mp
    device = torch.device(cfg.device)
    gpu = device.type == "cuda"
    cases = cfg.cases.split(",")
    if not set(cases) <= set(BENCH_CASES):
        die(f"--cases {cfg.cases}: choose from {','.join(BENCH_CASES)}")
    rows, ctx = [], mp.get_context("spawn")
    for case, impl, shape in bench_plan(cases, cfg.k, gpu, cfg.micro_batch):
        if impl.startswith("torch_lce") and not hasattr(F, "linear_cross_entropy"):
            print(json.dumps({"case": case, "impl": impl, "N": shape[0], "V": shape[2],
                              "skipped": f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"}), flush=True)
            continue
        with ctx.Pool(1) as pool:
            big = not gpu and (shape[2] > 1000 or case == "scale")  # GPT-2 on CPU: seconds a repeat
            row = pool.apply(bench_one, (case, impl, shape, cfg.device, cfg.dtype, 1 if big else 5, 2 if big else 21))
        base = next((b for b in rows if b["case"] == case and (case == "scale" or b["impl"] in ("naive_clm", "clm")
                     and (b["N"], b["d"], b["V"]) == shape[:3])), row)  # CLM of the same shape; scale: the smallest
        if impl == "score":  # scoring tokens/s, against training tokens/s (the CLM step of the same model)
            row["tok_s"] = round(shape[0] / row["ms"] * 1000)
            if case == "step":
                row["tok_s_ratio"] = round(base["ms"] / row["ms"], 2)
            else:
                row["ms_per_mtok"] = round(row["ms"] / shape[0] * 1e6, 1)
        row["ms_ratio"], row["mem_ratio"] = round(row["ms"] / base["ms"], 3), round(row["peak_mb"] / max(base["peak_mb"], 1e-9), 3)
        if case == "head":  # the head's useful work: 6 N d V FLOPs for CLM, (2 + 6k) N d V for SLM
            row["tflops"] = round((6 if "clm" in impl or impl == "torch_lce" else 2 + 6 * cfg.k) * shape[0] * shape[1] * shape[2] / row["ms"] / 1e9, 3)
        if case == "train":
            row["tok_s"] = round(shape[0] / row["ms"] * 1000)
            row["tflops"] = round(flops_per_token(GPTConfig(vocab_size=shape[2], **GPT2_SMALL)) * row["tok_s"] / 1e12, 3)
        if gpu and "tflops" in row:
            row["tflops_peak_bf16"] = gpu_peak_tflops()
            row["mfu"] = round(row["tflops"] / row["tflops_peak_bf16"], 3) if row["tflops_peak_bf16"] else None
        print(json.dumps(row), flush=True)
        rows.append(row)
    for r in rows:  # the head against the fastest CLM of its shape (naive, rho's fused, torch's native op)
        if r["case"] == "head":
            best = min(b["ms"] for b in rows if b["case"] == "head" and b["N"] == r["N"] and b["V"] == r["V"]
                       and b["impl"] in ("naive_clm", "fused_clm", "torch_lce"))
            r["ms_ratio_best_clm"] = round(r["ms"] / best, 3)
    print(f"\n{'case':<6}{'impl':<16}{'N':>8}{'d':>5}{'V':>7}{'ms':>10}{'peak MB':>10}{'ms/CLM':>8}{'mem/CLM':>9}{'ms/best':>8}{'TFLOP/s':>9}")
    for r in rows:
        print(f"{r['case']:<6}{r['impl']:<16}{r['N']:>8}{r['d']:>5}{r['V']:>7}{r['ms']:>10.1f}{r['peak_mb']:>10.1f}"
              f"{r['ms_ratio']:>8.2f}{r['mem_ratio']:>9.3f}{r.get('ms_ratio_best_clm', ''):>8}{r.get('tflops', ''):>9}")
    print("ms/CLM, mem/CLM: against naive CLM (head) or the CLM step of the same case; ms/best: against the fastest CLM head")
    scale_summary(rows)
    preset_time(rows, cfg)
    return rows


def scale_summary(rows):
    """Scoring time per token at each size against the smallest, the faster of its two measurements, in wall
    time and in CPU time: flat means linear in data."""
    best = {}
    for r in rows:
        if r["case"] == "scale":
            b = best.setdefault(r["N"], {"ms": r["ms"], "cpu_ms": r["cpu_ms"]})
            b["ms"], b["cpu_ms"] = min(b["ms"], r["ms"]), min(b["cpu_ms"], r["cpu_ms"])
    if best:
        n0 = min(best)
        per = lambda n, key: best[n][key] / n / (best[n0][key] / n0)
        print("\nscale: scoring time per token against the smallest size, wall / CPU (the faster of each pair): " + ", ".join(
            f"{n / 2**20:g} Mi tokens {per(n, 'ms'):.2f} / {per(n, 'cpu_ms'):.2f}" for n in sorted(best)))


def preset_time(rows, cfg):
    """The --preset gpt2-owm runs' expected time on this device, from the measured GPT-2 small steps."""
    tok_s = {r["impl"]: r["tok_s"] for r in rows if r["case"] == "train"}
    if not tok_s:
        return
    p = PRESETS["gpt2-owm"]
    tokens = {stage: p[stage]["steps"] * p["batch_size"] * p["block_size"] for stage in ("ref", "clm", "slm")}
    split = "slm_split" if p["batch_size"] > p["micro_batch"] else "slm"  # one device: gradient accumulation
    hours = {"ref": tokens["ref"] / tok_s["clm"], "clm": tokens["clm"] / tok_s["clm"], "slm": tokens["slm"] / tok_s[split]}
    print(f"\npreset gpt2-owm on one {cfg.device} device, from these tok/s: " + ", ".join(
        f"{stage} {tokens[stage] / 1e9:.2f}B tokens {h / 3600:.1f} h" for stage, h in hours.items())
        + f" (SLM at the {split} rate: {tok_s[split]:,} tok/s); scoring the web corpus is a forward: about 1/3 of a CLM step per token")


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Selective Language Modeling (Rho-1): reference model, scoring, SLM/CLM.")
    job = p.add_mutually_exclusive_group(required=True)
    job.add_argument("--base", action="store_true", help="train a base model on the general corpus (base.bin)")
    job.add_argument("--ref", action="store_true", help="train the reference model on hq, then score every web token")
    job.add_argument("--score", action="store_true", help="re-score the web tokens with the existing reference model")
    job.add_argument("--clm", action="store_true", help="continual pretraining on web, loss on all tokens (baseline)")
    job.add_argument("--slm", action="store_true", help="continual pretraining on web with the SLM loss")
    job.add_argument("--compare", action="store_true", help="print one table of every run in --out")
    job.add_argument("--report", action="store_true", help="write <out>/report.html and report.json from the runs in --out")
    job.add_argument("--bench", action="store_true", help="benchmark the head and a training step: naive vs fused, CLM vs SLM (--cases)")
    d = RunConfig()
    p.add_argument("--data", default=d.data, help="prepared data folder (default data/demo)")
    p.add_argument("--out", default=d.out, help="runs folder (default out)")
    p.add_argument("--name", default="", help="run name (default ref, clm, slm-k0.6, slm-k0.6-random)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warmup, then cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"steps of linear warmup (default {d.warmup})")
    p.add_argument("--weight_decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--k", type=float, default=d.k, help="share of tokens selected by SLM, in (0, 1]")
    p.add_argument("--select", default=d.select, choices=["excess", "random", "ref", "train", "sample"],
                   help="excess loss (the paper), random (the control), ref (lowest reference loss), train (highest "
                        "training loss), sample (RHO-LOSS: whole sequences by mean excess loss)")
    p.add_argument("--head", default=d.head, choices=["fused", "naive"], help="fused head (default) or the plain full-logits loss it is tested against")
    p.add_argument("--scope", default=d.scope, choices=["batch", "sequence"], help="top-k over all tokens of the step (default) or within each sequence")
    p.add_argument("--preset", default="", choices=["", *sorted(PRESETS)], help="defaults for the paper's setting at small scale (see PRESETS); explicit flags win")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the model init, batch order and random selection")
    p.add_argument("--micro_batch", type=int, default=0, help="sequences per forward on each process (gradient accumulation); "
                   "default: batch_size / processes. The top-k still spans the whole step")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    p.add_argument("--score_batch", type=int, default=d.score_batch, help="windows per forward when scoring the web corpus")
    p.add_argument("--cases", default="head,step", help=f"--bench: which of {','.join(BENCH_CASES)} (train: GPT-2 small steps of --micro_batch sequences; scale: scoring cost vs size)")
    p.add_argument("--eval_every", type=int, default=d.eval_every, help="steps between evaluations and checkpoints")
    p.add_argument("--eval_problems", type=int, default=d.eval_problems, help="eval problems for answer accuracy")
    p.add_argument("--init_from", default="", help="start from a checkpoint: a ckpt.pt path, a run name in --out (e.g. base), "
                   "or GPT-2 through transformers: gpt2 | gpt2-medium | gpt2-large | gpt2-xl or a directory saved with save_pretrained "
                   "(a smaller --block_size crops its 1024 positions)")
    p.add_argument("--resume", action="store_true", help="continue <out>/<name>/ckpt.pt where it stopped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    for f in fields(GPTConfig):
        if f.name != "vocab_size":
            p.add_argument(f"--{f.name}", type=int, default=None, help=f"model {f.name} (default {f.default}; with --init_from, the checkpoint's)")
    a = p.parse_args(argv)
    mode = next(m for m in ("base", "ref", "score", "clm", "slm", "compare", "report", "bench") if getattr(a, m))
    if a.preset:
        given = {t.split("=")[0][2:] for t in (sys.argv[1:] if argv is None else argv) if t.startswith("--")}
        preset = {**PRESETS[a.preset], **PRESETS[a.preset].get(mode, {})}
        for key, v in preset.items():
            if not isinstance(v, dict) and key not in given:
                setattr(a, key, v)
    if not 0 < a.k <= 1:
        p.error(f"--k {a.k}: k is the share of tokens selected and must be in (0, 1], e.g. --k 0.6")
    if a.steps < 1 or a.batch_size < 1 or a.eval_every < 1 or a.score_batch < 1 or a.micro_batch < 0:
        p.error("--steps, --batch_size, --eval_every and --score_batch must be positive (--micro_batch: positive, or 0 for the whole step)")
    if a.dtype == "auto":
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    cfg = RunConfig(**{f.name: getattr(a, f.name) for f in fields(RunConfig) if hasattr(a, f.name)}, mode=mode)
    shape = {f.name: getattr(a, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"}  # None: not given
    if a.init_from:  # the checkpoint's shape (None stays None); only GPT-2's context can be cropped, by --block_size
        ignored = [f"--{key}" for key, v in shape.items() if v is not None and (key != "block_size" or not is_gpt2(a.init_from))]
        if ignored:
            print(f"warning: {' '.join(ignored)} ignored: the model's shape comes from --init_from {a.init_from}", file=sys.stderr)
    else:
        shape = {key: v for key, v in shape.items() if v is not None}  # the rest: GPTConfig's defaults
    return cfg, GPTConfig(**shape)


def main(argv=None):
    cfg, model_cfg = parse_args(argv)
    if cfg.mode == "compare":
        return compare(cfg)
    if cfg.mode == "report":
        return report(cfg)
    if cfg.mode == "bench":
        return bench(cfg)
    ranks = init_ranks(cfg)  # one process, or one of torchrun's
    try:
        if cfg.mode == "score":
            meta = load_meta(cfg.data)
            ckpt = load_checkpoint(os.path.join(cfg.out, "ref", "ckpt.pt"), meta, "reference model")
            model = GPT(GPTConfig(**ckpt["model_config"])).to(cfg.device)
            model.load_state_dict(ckpt["model"])
            return score_web(model, meta, cfg, ranks)
        return train(cfg, model_cfg, ranks)
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
