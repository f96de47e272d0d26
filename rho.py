"""rho.py: Selective Language Modeling (Rho-1: Lin et al. 2024, arXiv 2404.07965) in one file. The demo, in order:
python prepare.py; python rho.py --base; python rho.py --ref (then it scores every web token); python rho.py --clm;
python rho.py --slm --k 0.6; python rho.py --slm --k 0.6 --select random (the control); python report.py out
At scale: torchrun --standalone --nproc_per_node 8 rho.py --slm --preset gpt2-owm --data data/owm --out out-owm"""
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

from prepare import (ANSWER, SEED_MAX, file_sha256, final_answer, from_hub, get_encoding,
                     tokenizer_id_of, write_atomic)

# one code path for MKL's and PyTorch's CPU kernels on any AVX2 CPU (README, Reproducible); read at the first kernel
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
IGNORE = -1  # target id that is never trained on and never selected

def die(msg):
    sys.exit(f"error: {msg}")

# -----------------------------------------------------------------------------
# config

@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 320  # the data's vocabulary, padded up to a multiple of 64 (GPT-2's weights: exactly 50257)
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128

def flag(default, text):  # a RunConfig field: its default and its --help
    return field(default=default, metadata={"help": text})

@dataclass
class RunConfig:  # every field but mode is a flag, with its --help
    mode: str = "slm"
    data: str = flag("data/demo", "prepared data folder")
    out: str = flag("out", "runs folder")
    name: str = flag("", "run name (default: base, ref, clm, slm-k0.6, ...)")
    ref_run: str = flag("ref", "--slm: the reference run whose scores it reads")
    steps: int = flag(1200, "optimizer steps (the default preset, demo: --ref 2000, --clm and --slm 4500)")
    batch_size: int = flag(16, "sequences per step")
    lr: float = flag(3e-3, "peak learning rate (warmup, then cosine to 10%%)")
    warmup: int = flag(20, "steps of linear warmup (default 20, or a preset's, but at most a tenth of --steps)")
    weight_decay: float = flag(0.1, "AdamW weight decay of the matrices and embeddings")
    grad_clip: float = flag(1.0, "gradient norm clip")
    k: float = flag(0.6, "--slm: the share of tokens selected, in (0, 1]")
    select: str = flag("excess", "--slm: what I_k ranks by (token_score): excess is the paper's, random the control")
    scope: str = flag("batch", "top-k over every token of the step (batch) or within each sequence")
    seed: int = flag(1337, "seed of the model init, batch order and random selection")
    micro_batch: int = flag(0, "sequences per forward on each process (the top-k still spans the step); 0: all")
    dtype: str = flag("auto", "autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    compile: bool = flag(False, "torch.compile the model's forward")
    fsdp: bool = flag(False, "under torchrun, shard weights, gradients and AdamW's state (FSDP2), not DDP")
    act_ckpt: bool = flag(False, "recompute each block's activations in the backward (less memory, more compute)")
    score_batch: int = flag(64, "windows per forward when scoring")
    score_dtype: str = flag("float32", "--ref, --score: the scores' dtype, float32 or float16 (bench.py --score_dtype)")
    scores: str = flag("loss,entropy", "--ref, --score: what is stored of each web token: L_RM and H_RM, or loss (L_RM "
                       "alone, half the file: --select entropy and ref_entropy read H_RM)")
    eval_every: int = flag(100, "steps between evaluations and checkpoints")
    eval_problems: int = flag(200, "held-out problems for answer accuracy")
    init_from: str = flag("", "a run in --out (the demo's default: base), a ckpt.pt, scratch, or a transformers causal "
                          "LM: hf:NAME (hf:gpt2, ...) or a save_pretrained directory")
    preset: str = flag("demo", "defaults for every flag it names (PRESETS); flags given explicitly win; '' for none")
    resume: bool = flag(False, "continue <out>/<name>/ckpt.pt where it stopped")
    overwrite: bool = flag(False, "replace an earlier run of this name (a finished run is otherwise refused)")
    device: str = flag("cpu", "cpu, cuda or cuda:N")

PRESETS = {  # --preset NAME: defaults for every flag it names (explicit flags win); {mode: value}: one per mode
    # the demo: the reference model past its accuracy transition; continual pretraining 2.25x its tokens (paper: 10x)
    "demo": {"eval_every": 200, "steps": {"ref": 2000, "clm": 4500, "slm": 4500}},
    # the paper's setting at small scale: GPT-2 124M; the reference model 315M tokens (3 epochs of ~100M hq), CPT 1.05B
    "gpt2-owm": {"init_from": "hf:gpt2", "block_size": 1024, "batch_size": 512, "micro_batch": 32, "warmup": 100,
                 "eval_every": 250, "eval_problems": 200, "compile": True, "k": 0.6,
                 "steps": {"ref": 600, "clm": 2000, "slm": 2000}, "lr": {"ref": 1e-4, "clm": 1e-4, "slm": 1e-4}},
    # the paper's own runs (Sec. 3): 15B web tokens in steps of ~1M, the reference model 3 epochs of 0.5B hq tokens
    "tinyllama-owm": {"init_from": "hf:TinyLlama/TinyLlama_v1.1", "block_size": 2048, "batch_size": 512, "k": 0.6,
                      "micro_batch": 8, "warmup": 200, "eval_every": 500, "fsdp": True,
                      "steps": {"ref": 1431, "clm": 14305, "slm": 14305},
                      "lr": {"ref": 5e-5, "clm": 8e-5, "slm": 8e-5}},
    "mistral-owm": {"init_from": "hf:mistralai/Mistral-7B-v0.1", "block_size": 4096, "batch_size": 256, "k": 0.7,
                    "micro_batch": 2, "warmup": 200, "eval_every": 500, "fsdp": True,
                    "steps": {"ref": 1431, "clm": 14305, "slm": 14305}, "lr": {"ref": 1e-5, "clm": 2e-5, "slm": 2e-5}}}

# -----------------------------------------------------------------------------
# model: GPT-2 (nanoGPT), causal SDPA attention, tied embeddings; or a transformers causal LM (HF)

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn, self.c_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd), nn.Linear(cfg.n_embd, cfg.n_embd)

    def qkv(self, x):
        B, T, C = x.shape
        return (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))

    def forward(self, x):
        q, k, v = self.qkv(x)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(x.shape))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.Linear(4 * cfg.n_embd, cfg.n_embd)

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

    def decode(self, x, mask, cache):  # forward, in GPT.decode: the keys and values of earlier positions in cache
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

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)  # (B, T, C) hidden states: the loss applies the head (the fused head)

    def decode(self, idx, pad, caches):  # generation's forward (generate); a module method, as FSDP needs (wrap)
        T, past = idx.shape[1], caches[0][0].shape[2] if caches[0] else 0  # idx: new tokens; rows left-padded by pad
        keys = torch.arange(past + T, device=idx.device)  # every position so far; causal, the padding masked:
        mask = ((keys[None, None] <= keys[-T:, None]) & (keys[None, None] >= pad[:, None, None]))[:, None]
        x = self.transformer.wte(idx) + self.transformer.wpe((keys[None, -T:] - pad[:, None]).clamp(min=0))
        for block, cache in zip(self.transformer.h, caches):
            x = block.decode(x, mask, cache)
        return self.transformer.ln_f(x)

class HF(nn.Module):  # a transformers causal LM as our GPT: hidden states, head weight to the fused head
    def __init__(self, hf, block_size, source):
        super().__init__()
        c, self.hf = hf.config, hf
        T = block_size or min(c.max_position_embeddings, 2048)  # default: the model's context, at most the paper's
        if T > c.max_position_embeddings:
            die(f"--block_size {T}: {source} has {c.max_position_embeddings} positions; pass --block_size "
                f"{c.max_position_embeddings} or less")
        self.config = GPTConfig(T, self.lm_head.weight.shape[0], c.num_hidden_layers, c.num_attention_heads,
                                c.hidden_size)
        # the head must be h @ W.T: no soft-capping or scale in the config (Gemma 2, Cohere, Granite, Falcon-H1), even
        # where random weights give small logits; then probed (a head bias, a scale under another name)
        scaled = [f"{key} {getattr(c, key)}" for key, plain in (("final_logit_softcapping", None), ("logit_scale", 1),
                  ("logits_scaling", 1), ("lm_head_multiplier", 1)) if getattr(c, key, None) not in (None, plain)]
        with torch.no_grad():
            idx = torch.arange(8)[None] % self.config.vocab_size
            if scaled or not torch.allclose(hf(idx).logits, self(idx) @ self.lm_head.weight.t(), rtol=1e-4, atol=1e-4):
                die(f"--init_from {source}: its logits are not a plain linear map of its final hidden states ("
                    + (", ".join(scaled) if scaled else "logit soft-capping, scaling or a head bias")
                    + "): rho's fused head computes h @ W.T; use another model")

    @property
    def lm_head(self):  # the model's own head, tied or not (a property: not a second copy in the state_dict)
        return self.hf.get_output_embeddings()

    def forward(self, idx):
        return self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state  # (B, T, C), as GPT.forward

    def decode(self, idx, pad, caches):  # as GPT.decode, with transformers' own Cache object in caches[0]
        from transformers import DynamicCache  # passed from the first call: the cache API transformers supports
        past, T = caches[0][0] if caches[0] else DynamicCache(config=self.hf.config), idx.shape[1]
        keys = torch.arange(past.get_seq_length() + T, device=idx.device)
        out = self.hf.base_model(input_ids=idx, attention_mask=(keys[None] >= pad[:, None]).long(), use_cache=True,
                                 position_ids=(keys[None, -T:] - pad[:, None]).clamp(min=0), past_key_values=past)
        caches[0][:] = [out.past_key_values]
        return out.last_hidden_state

def load_hf(source, block_size=None, config=None):  # from hf:NAME or a directory; with config (JSON), random weights
    try:
        import transformers  # lazily: only these runs need transformers
    except ImportError:
        die(f"--init_from {source}: needs transformers: pip install transformers")
    name, auto = source.removeprefix("hf:"), transformers.AutoModelForCausalLM
    try:
        c = transformers.AutoConfig.for_model(**json.loads(config)) if config else \
            from_hub(transformers.AutoConfig.from_pretrained, name)
        for key, v in c.to_dict().items():
            if "drop" in key and isinstance(v, float):  # no dropout: GPT-2's resid_pdrop, Llama's attention_dropout
                setattr(c, key, 0.0)
        hf, info = (auto.from_config(c), {"missing_keys": ()}) if config else \
            from_hub(auto.from_pretrained, name, config=c, dtype=torch.float32,
                     output_loading_info=True)
    except (OSError, ValueError) as e:
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        die(f"--init_from {source}: " + (f"not a loadable transformers model ({why})" if os.path.isdir(name) else
            f"could not load it ({why}): run once with network to fill the Hugging Face cache (HF_HUB_OFFLINE=1 then "
            "reads only the cache), or pass a directory saved with save_pretrained"))
    if info["missing_keys"]:  # transformers would leave them randomly initialised, and only warn
        die(f"--init_from {source}: no weights for {', '.join(sorted(info['missing_keys'])[:3])}: not a causal LM "
            "checkpoint (a base model without its head?)")
    return HF(hf.float(), block_size, source)

def check_tokenizer(cfg, meta):  # the data's ids must be the model's own tokenizer's
    want = meta.get("tokenizer", {}).get("sha256")  # its fingerprint, recorded by prepare.py
    if want and tokenizer_id_of(cfg.init_from) not in (None, want):  # None: the model has none
        die(f"--init_from {cfg.init_from}: {cfg.data} was prepared with another tokenizer "
            f"({meta['tokenizer']['name']}): prepare it with `python prepare.py ... --encoding "
            f"{cfg.init_from}`")

# -----------------------------------------------------------------------------
# processes: one, or one per GPU under torchrun (DDP, FSDP2); each process holds a contiguous share of every step

# torchrun starts each process with RANK, WORLD_SIZE and LOCAL_RANK set: read once, here, as nanoGPT does
RANK, WORLD, LOCAL = (int(os.environ.get(key, v)) for key, v in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))

def wrap(model, cfg):  # --act_ckpt: recompute each block in the backward; --fsdp: shard each block, then the rest
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    cuda = cfg.device.startswith("cuda")
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if cuda else MixedPrecisionPolicy()
    for block in next(m for m in model.modules() if isinstance(m, nn.ModuleList)) if cfg.act_ckpt or cfg.fsdp else ():
        if cfg.act_ckpt:
            checkpoint(block)
        if cfg.fsdp:
            fully_shard(block, mp_policy=mp)
            if isinstance(block, Block):  # generation's forward (GPT.decode) gathers weights as forward does
                register_fsdp_forward_method(block, "decode")
    if cfg.fsdp:  # the root's parameters stay gathered after the forward: the fused head, after it, reads its weight
        register_fsdp_forward_method(fully_shard(model, mp_policy=mp, reshard_after_forward=False), "decode")
    return model

def save_states(model, opt, cfg, ckpt_path, step):  # what ckpt.pt holds of the model and the optimizer: their
    if not cfg.fsdp:  # state_dicts; under FSDP the name of a torch.distributed.checkpoint folder beside it, where
        return model.state_dict(), opt.state_dict()  # each process wrote its shards, never whole on one (all call it)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    shards = f"{ckpt_path[:-len('.pt')]}-{step}.dcp"
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
             checkpoint_id=shards)
    return os.path.basename(shards), None

def load_states(model, opt, ckpt, cfg, path):  # save_states back, on any number of processes (resharded as read)
    shards, states = isinstance(ckpt["model"], str), ckpt  # shards: an FSDP run's, read in this run's layout
    if not shards and not cfg.fsdp:
        return model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd
    if shards:
        states = {"model": sd.get_model_state_dict(model), "optimizer": sd.get_optimizer_state_dict(model, opt)}
        dcp.load(states, checkpoint_id=os.path.join(os.path.dirname(path), ckpt["model"]))
    whole = sd.StateDictOptions(full_state_dict=not shards)
    sd.set_model_state_dict(model, states["model"], options=whole)
    sd.set_optimizer_state_dict(model, opt, states["optimizer"], options=whole)

def gather_rows(t):  # every process's rows of t in rank order: the whole step's rows
    if WORLD == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)

def sum_ranks(t):
    if WORLD > 1:
        dist.all_reduce(t)
    return t

def autocast(cfg):  # bfloat16 for the model's forward (the default on CUDA), or none
    return torch.autocast(torch.device(cfg.device).type, torch.bfloat16, enabled=cfg.dtype == "bfloat16")

# -----------------------------------------------------------------------------
# data: token memmaps cut into windows of T+1 tokens; window w holds tokens [w*T, w*T + T]

META_KEYS = ("encoding", "vocab_size", "dtype", "tokens")  # what rho reads; "files" is checked where a file is read

def load_meta(data):
    path = os.path.join(data, "meta.json")
    if not os.path.isfile(path):
        demo = os.path.normpath(data) == os.path.normpath("data/demo")
        die(f"{data}: data not prepared (no meta.json): run `python prepare.py"
            + ("`" if demo else f" --hq FILE --web FILE --out {data}`"))
    raw = Path(path).read_bytes()
    try:
        meta = json.loads(raw)
    except ValueError as e:  # a cut or hand-edited file (UnicodeDecodeError is a ValueError too)
        die(f"{path}: not valid JSON ({e}): run prepare.py again")
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else [META_KEYS[0]]
    if missing:
        die(f"{path}: no key {missing[0]!r}: not written by this prepare.py: run prepare.py again")
    return {**meta, "sha256": hashlib.sha256(raw).hexdigest()}  # the data's fingerprint: it covers every file's sha256

def read_json(path):
    return json.loads(Path(path).read_text())

def scoring_json(path):  # a scores file's json; None if missing or cut short (then scored again)
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None

def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2).encode())

HASH_MAX = 1 << 28  # token files up to 256 MiB are hashed at every start (0.2 s each here); larger ones by size alone

def sha256_differs(path, want):  # against a recorded sha256 (None: not recorded); files over HASH_MAX unchecked
    return want is not None and os.path.getsize(path) <= HASH_MAX and file_sha256(path) != want

def checked(data, name, meta):  # a prepared file's path, checked against meta.json: its size and sha256
    path = os.path.join(data, name)
    if not os.path.isfile(path):
        die(f"{path}: missing; re-run prepare.py for {data}")
    if "files" not in meta:
        die(f"{os.path.join(data, 'meta.json')}: prepared by an older prepare.py: run prepare.py again")
    rec, size = meta["files"].get(name), os.path.getsize(path)
    if rec is None:
        die(f"{path}: not recorded in {os.path.join(data, 'meta.json')}: run prepare.py again")
    if size != rec["bytes"]:
        die(f"{path}: {size:,} bytes, but prepare.py wrote {rec['bytes']:,} (cut short or replaced): run prepare.py "
            "again")
    if sha256_differs(path, rec["sha256"]):
        die(f"{path}: its content is not what prepare.py wrote (sha256 differs): run prepare.py again")
    return path

def memmap(data, name, meta, dtype, n_tokens=None):  # with n_tokens: meta.json's dtype must read that many
    path = checked(data, name, meta)
    if n_tokens is not None and os.path.getsize(path) != n_tokens * np.dtype(dtype).itemsize:
        die(f"{path}: {os.path.getsize(path):,} bytes are not {n_tokens:,} tokens of {dtype}, as meta.json says "
            "(edited?): run prepare.py again")
    return np.memmap(path, dtype=dtype, mode="r")

REF_LOSS, REF_ENTROPY = 0, 1  # the two columns of reference scores (..., 2): L_RM(x_i) and H_RM(x_i)

def score_layout(info):  # the scores' dtype and columns: L_RM, then H_RM unless scored with --scores loss
    return np.dtype(info.get("score_dtype", "float32")), len(info.get("scores", "loss,entropy").split(","))

class Batch(NamedTuple):
    x: torch.Tensor  # (B, T) inputs
    y: torch.Tensor  # (B, T) targets: x shifted by one
    ref: torch.Tensor  # (B, T, 2) the targets' reference scores, fp32 (zeros where a run reads none)
    labels: torch.Tensor | None  # (B, T) the demo's noise labels of the targets, for audits (the loss reads none)

class Windows:  # a token file's windows; batch order is a function of (seed, step) alone: the same for every run
    def __init__(self, tokens, T, ref=None, labels=None, name="tokens"):
        self.tokens, self.T, self.ref, self.labels, self.name, self.order = tokens, T, ref, labels, name, None
        self.n = (len(tokens) - 1) // T
        if self.n < 1:
            die(f"{name}: {len(tokens)} tokens, fewer than one window of {T + 1}: use a smaller --block_size")

    def get(self, ws, device):
        x = torch.from_numpy(np.stack([self.tokens[w * self.T:(w + 1) * self.T + 1] for w in ws]).astype(np.int64))
        targets = lambda a, dtype: torch.from_numpy(np.stack([a[w * self.T + 1:(w + 1) * self.T + 1] for w in ws])
                                                    .astype(dtype)).to(device)  # aligned with the targets
        ref = torch.zeros(len(ws), self.T, 2, device=device) if self.ref is None else targets(self.ref, np.float32)
        ref = F.pad(ref, (0, 1), value=math.nan) if ref.shape[-1] == 1 else ref  # --scores loss: no H_RM
        labels = None if self.labels is None else targets(self.labels, self.labels.dtype)
        x = x.to(device)
        return Batch(x[:, :-1], x[:, 1:], ref, labels)

    def step_windows(self, step, B, seed, hi):  # each once per epoch, in an order drawn from (seed, epoch)
        if hi // B < 1:
            die(f"{self.name}: {hi} training windows of {self.T + 1} tokens, fewer than one batch: lower --batch_size")
        epoch, i = divmod(step, hi // B)
        if self.order is None or self.order[0] != (seed, epoch, hi):  # one permutation an epoch, not one a step
            self.order = (seed, epoch, hi), np.random.default_rng([seed, epoch]).permutation(hi)
        return self.order[1][i * B:(i + 1) * B]

    def micro_batches(self, step, B, seed, device, hi, micro):  # this process's share (the RANK-th), in micro-batches
        share = B // WORLD
        ws = self.step_windows(step, B, seed, hi)[RANK * share:(RANK + 1) * share]
        return [self.get(ws[i:i + micro], device) for i in range(0, share, micro)]

def windows(data, name, meta, T, ref=None, labels=None):  # the ids must fit the vocabulary (hashed files: all read)
    tokens = memmap(data, name, meta, meta["dtype"], meta["tokens"][name.removesuffix(".bin")])
    if tokens.nbytes <= HASH_MAX and tokens.max(initial=0) >= meta["vocab_size"]:
        die(f"{os.path.join(data, name)}: holds token id {tokens.max()}, beyond the vocabulary of {meta['vocab_size']}"
            f" in meta.json (edited?): run prepare.py again")
    return Windows(tokens, T, ref, labels, os.path.join(data, name))

def web_split(n_windows, T):  # windows before it train; the rest (5%, at most 32 or 8,192 tokens) is web val
    return n_windows - min(max(32, 8192 // T), max(1, n_windows // 20))

def web_windows(cfg, meta, T, ref=None):  # with the reference scores (ref), and on the demo the noise labels
    labels = memmap(cfg.data, "web_labels.bin", meta, np.uint8) if "labels" in meta else None
    return windows(cfg.data, "web.bin", meta, T, ref, labels)

def load_ref_scores(cfg, meta, T):  # (--ref_run's scores, checked against the data and T; the reference model's sha256)
    run, n_web = os.path.join(cfg.out, cfg.ref_run), meta["tokens"]["web"]
    path, ckpt_path = os.path.join(run, "ref_scores.bin"), os.path.join(run, "ckpt.pt")
    redo = lambda **flags: "re-run " + command("score", cfg, name=cfg.ref_run, **flags)  # this data, --ref_run's model
    if not os.path.isfile(path) and os.path.isfile(path + ".partial"):
        trained = os.path.isfile(os.path.join(run, "metrics.json"))  # else killed in --ref's scoring
        die(f"{path}: scoring was interrupted: " + (f"{redo()} to finish it" if trained else "finish the reference "
            f"run: {command('ref', cfg, resume=True, **saved_flags(load_checkpoint(ckpt_path), 'ref'))}"))
    if not os.path.isfile(path) or not os.path.isfile(path + ".json"):  # scoring again needs the reference model
        train = command("ref", cfg, name=cfg.ref_run if cfg.ref_run != "ref" else None)
        die(f"{path + '.json' if os.path.isfile(path) else path}: reference scores missing: " + (redo() if
            os.path.isfile(ckpt_path) else f"run {train} (or --score with a reference model)"))
    info = scoring_json(path + ".json")
    if not isinstance(info, dict) or "weights_sha256" not in info:
        die(f"{path}.json: not valid JSON, or without the reference model's fingerprint: {redo(overwrite=True)}")
    (dtype, C), per_token = score_layout(info), os.path.getsize(path) / n_web
    layout = dict(score_dtype=info.get("score_dtype"), scores=info.get("scores"))  # scored again as they were
    if info["data_sha256"] != meta["sha256"]:  # the sha256 covers the encoding too
        die(f"{path}: reference scores do not match {cfg.data}: computed for {info['data']} (its meta.json differs): "
            f"{redo(**layout, overwrite=True)}")
    if per_token != C * dtype.itemsize:  # the layout another file would have, or a file cut short
        other = [f"{d} {s}" for d in CHOICES["score_dtype"] for s in CHOICES["scores"]
                 if np.dtype(d).itemsize * len(s.split(",")) == per_token]
        says = f"{dtype} {info.get('scores', 'loss,entropy')} ({C * dtype.itemsize} bytes)"
        die(f"{path}: reference scores do not match " + (f"its .json: {per_token:g} bytes a token, as "
            f"{' or '.join(other)} scores are, but the .json says {says}" if other else f"{cfg.data} (cut short: "
            f"{os.path.getsize(path) // (C * dtype.itemsize):,} of {n_web:,} tokens)") + f": {redo(**layout)}")
    if sha256_differs(path, info.get("sha256")):  # recorded as scoring finished
        die(f"{path}: its content is not what scoring wrote (sha256 differs): {redo(**layout)}")
    if C == 1 and cfg.select in ("entropy", "ref_entropy"):
        die(f"{path}: holds L_RM alone (scored with --scores loss); --select {cfg.select} reads H_RM too: "
            f"{redo(score_dtype=layout['score_dtype'])}")
    if info["block_size"] != T:
        die(f"{path}: reference scores were computed with windows of {info['block_size']} tokens, this run uses "
            f"{T}: pass --block_size {info['block_size']} so both models see the same context (a model of fewer "
            f"positions: train the reference model with --block_size {T} and score again)")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_web, C)), info["weights_sha256"]

# -----------------------------------------------------------------------------
# the SLM loss (Rho-1, Sec. 2.2):  L_SLM = -1/(N*k) * sum_i I_k(x_i) * log P_theta(x_i | x_<i)

def token_loss(logits, targets):  # -log P(x_i | x_<i) in fp32, (B, T); 0 where the target is ignored
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="none").view(targets.shape)

def excess_loss(train_loss, ref_loss):  # L_delta(x_i) = L_theta(x_i) - L_RM(x_i), detached: selection takes no gradient
    return train_loss.detach() - ref_loss

def n_select(k, n):  # ceil(k * n), at least 1 where n >= 1; n a count or a tensor of counts (per row, no sync)
    n = torch.as_tensor(n, dtype=torch.float64)
    # rounded to 6 decimals before the ceil: 0.07 * 100 is 7.000000000000001 in floats, and its ceil 8
    return torch.maximum(torch.ceil(torch.round(k * n * 1e6) / 1e6), (n > 0).double())

def rank_of(score, valid, scope):
    """Each token's place (0: the highest score) among the valid tokens of its group: the step (scope batch) or row.
    Not topk: rows need their own counts, and topk orders ties arbitrarily; a stable sort puts the lower index first."""
    shape = score.shape
    if scope == "batch":
        score, valid = score.reshape(1, -1), valid.reshape(1, -1)
    # invalid and NaN tokens last: -inf, below every valid score (a valid -inf is clamped to -3e38, so it stays above)
    key = torch.where(valid & ~score.isnan(), score.clamp(min=-3e38), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # the tokens, best first
    return order.argsort(-1).reshape(shape)  # its inverse: each token's place

def select_topk(score, valid, k, scope="batch"):  # I_k: the top ceil(k * n_valid) valid tokens by score; never NaN
    valid = valid & ~score.isnan()
    n = valid.sum() if scope == "batch" else valid.sum(-1, keepdim=True)
    return (rank_of(score, valid, scope) < n_select(k, n)) & valid

def token_score(select, loss, ref, valid, scope, gen):
    """What I_k ranks by, highest first: excess L_theta - L_RM (the paper); random (the control); ref, lowest L_RM
    (Table 3); entropy, lowest H_RM (App. H); ref_entropy, the worse of a token's places by L_RM and by H_RM (App. H's
    intersection); train, highest L_theta; sample (RHO-LOSS: whole sequences, in select_tokens)."""
    if select == "excess":
        return excess_loss(loss, ref[..., REF_LOSS])
    if select == "random":
        return torch.rand(loss.shape, generator=gen).to(loss.device)
    if select == "ref_entropy":
        worse = torch.maximum(rank_of(-ref[..., REF_LOSS], valid, scope), rank_of(-ref[..., REF_ENTROPY], valid, scope))
        return (-worse.float()).masked_fill(ref.isnan().any(-1), float("nan"))
    if select in ("ref", "entropy"):
        return -ref[..., REF_LOSS if select == "ref" else REF_ENTROPY]
    return loss.detach()  # train

def select_tokens(loss, targets, ref, k, scope="batch", select="excess", gen=None):
    """I_k(x_i): which tokens carry the loss. k = 1: every valid token (CLM)."""
    valid = targets != IGNORE
    if k >= 1:
        return valid
    if select == "sample":  # whole sequences of the step, ranked by their mean excess loss
        seq = (excess_loss(loss, ref[..., REF_LOSS]) * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # (B,)
        return select_topk(seq[None], valid.any(-1)[None], k)[0][:, None] & valid
    return select_topk(token_score(select, loss, ref, valid, scope, gen), valid, k, scope)

def slm_loss(logits, targets, ref, k, scope="batch", select="excess", gen=None):
    """L_SLM on full logits (B, T, V), the plain reference for the fused head: (loss, every token's loss, I_k)."""
    loss = token_loss(logits, targets)  # -log P_theta(x_i | x_<i)
    sel = select_tokens(loss, targets, ref, k, scope, select, gen)  # I_k(x_i)
    return (loss * sel).sum() / sel.sum(), loss.detach(), sel  # -1/(N*k) sum_i: over the selected tokens only

def select_step(loss, targets, ref, cfg, gen=None):  # I_k over the whole step, for any split: (this process's rows, n)
    # the one all-gather of token losses: each process selects on the whole step's (20 bytes a token), keeps its rows
    sel = select_tokens(gather_rows(loss), gather_rows(targets), gather_rows(ref), cfg.k, cfg.scope, cfg.select, gen)
    return sel[RANK * len(targets):(RANK + 1) * len(targets)], int(sel.sum())

# -----------------------------------------------------------------------------
# the fused head: the loss from hidden states h (N, C) and the head weight w (V, C), never holding N x V logits
#   CLM (every token carries the loss): one pass over chunks of rows computes a chunk's logits, its loss and at once
#     the gradients G = (softmax - onehot) / n, dH = G W, dW += G^T H: 6 N d V FLOPs, no recompute
#   SLM: a no-grad pass gives every token's loss and lse (2 N d V FLOPs), I_k is chosen from those losses outside
#     (select_step), and the backward recomputes the logits of the selected rows only: (2 + 6k) N d V FLOPs in all
# A chunk of fp32 logits has three modes (Triton on CUDA, else PyTorch): loss (loss, lse, entropy), loss_grad (CLM),
# grad (SLM's backward); a gradient goes into g, the GEMMs' buffer: for an fp32 head the logits', so in place.

def sub_onehot_(g, y, row_scale):  # g[i, y_i] -= row_scale_i where y_i is not ignored
    valid = y != IGNORE
    g[torch.arange(len(y), device=g.device)[valid], y[valid]] -= row_scale[valid].to(g.dtype)

def chunk_loss_torch(x, y, entropy=False):
    """(loss, lse, entropy or None) per row, fp32, loss 0 where y is ignored; without entropy x ends exp(x - max)."""
    x_y = x.gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # ignored rows read column 0, then get loss 0
    m = x.amax(1, keepdim=True)
    z = x.sub_(m)  # logits - max, in place
    e = z.exp() if entropy else z.exp_()  # exp(logits - max): in place, unless the entropy still needs z
    s = e.sum(1)
    lse = m.squeeze(1) + s.log()
    ent = (e * (s.log()[:, None] - z)).sum(1) / s if entropy else None  # H = sum_j p_j (lse - x_j): terms >= 0
    return torch.where(y == IGNORE, 0.0, lse - x_y), lse, ent

def chunk_loss_grad_torch(x, y, scale, g):  # CLM: each row's loss, and from its exp (softmax - onehot) * scale into g
    loss, _, _ = chunk_loss_torch(x, y)  # x: exp(x - max)
    row_scale = (y != IGNORE) * scale
    torch.mul(x, (row_scale / x.sum(1))[:, None], out=x)  # softmax * scale
    sub_onehot_(x, y, row_scale)
    g.copy_(x)  # free where g is x: copy_ returns at once for a tensor onto its own memory
    return loss

def chunk_grad_torch(x, y, lse, scale, g):  # SLM's backward: (softmax - onehot) * scale into g, given lse
    row_scale = (y != IGNORE) * scale
    x.sub_(lse[:, None]).exp_().mul_(row_scale[:, None])
    sub_onehot_(x, y, row_scale)
    g.copy_(x)

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
if triton is not None:
    @triton.jit
    def _chunk_kernel(x_ptr, g_ptr, y_ptr, loss_ptr, lse_ptr, ent_ptr, scale_ptr, stride_x, stride_g, V,
                      BLOCK_V: tl.constexpr, LOSS: tl.constexpr, GRAD: tl.constexpr, ENTROPY: tl.constexpr):
        """One row of a chunk: LOSS (loss, lse), ENTROPY, GRAD ((softmax - onehot) * scale into g, in g's dtype)."""
        row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2**31
        x_row, y = x_ptr + row * stride_x, tl.load(y_ptr + row)
        if LOSS:
            m, s = tl.full([], float("-inf"), tl.float32), tl.full([], 0.0, tl.float32)  # online log-sum-exp
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every block has at least one real column
                m, s = m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)  # the old sum rescaled
            lse = m + tl.log(s)
            x_y = tl.load(x_row + tl.maximum(y, 0)).to(tl.float32)  # ignored rows read column 0, then drop it
            tl.store(loss_ptr + row, tl.where(y == -1, 0.0, lse - x_y))
            tl.store(lse_ptr + row, lse)
        else:  # the SLM backward: lse from the forward
            lse = tl.load(lse_ptr + row)
        if ENTROPY:  # scoring: a second pass, H = sum_j p_j (lse - x_j), every term >= 0
            h = tl.full([], 0.0, tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
                h += tl.sum(tl.where(cols < V, tl.exp(x - lse) * (lse - x), 0.0), axis=0)
            tl.store(ent_ptr + row, h)
        if GRAD:  # CLM: in the same launch as the loss, while the row is in cache
            scale, g_row = tl.load(scale_ptr), g_ptr + row * stride_g
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)  # softmax - onehot
                tl.store(g_row + cols, tl.where(y == -1, 0.0, g * scale).to(g_row.dtype.element_ty), mask=cols < V)

def launch_chunk_kernel(x, y, g, lse, scale, block_v, loss, grad, entropy):
    """One launch of _chunk_kernel, a program per row, x read only: fp32 (loss, lse, entropy or None), as the flags
    LOSS, GRAD and ENTROPY ask (block_v: the tests' small blocks)."""
    assert x.stride(1) == 1 and g.stride(1) == 1, "logits and gradient rows must be contiguous"
    block = block_v or min(4096, triton.next_power_of_2(x.shape[1]))
    out = torch.empty(3, len(x), dtype=torch.float32, device=x.device)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1)
    _chunk_kernel[(len(x),)](x, g, y, out[0], out[1] if lse is None else lse, out[2], scale_t, x.stride(0),
                             g.stride(0), x.shape[1], BLOCK_V=block, LOSS=loss, GRAD=grad, ENTROPY=entropy,
                             num_warps=8 if block >= 2048 else 4)
    return out[0], out[1], out[2] if entropy else None

class ChunkOps(NamedTuple):  # one backend's per-chunk math, a function per mode
    loss: Callable  # (x, y, entropy) -> (loss, lse, entropy or None)
    loss_grad: Callable  # (x, y, scale, g) -> loss; the gradient into g
    grad: Callable  # (x, y, lse, scale, g); the gradient into g

TORCH_OPS = ChunkOps(chunk_loss_torch, chunk_loss_grad_torch, chunk_grad_torch)
TRITON_OPS = ChunkOps(  # each mode one launch_chunk_kernel: (g, lse, scale, block_v, LOSS, GRAD, ENTROPY)
    lambda x, y, entropy=False, block_v=None: launch_chunk_kernel(x, y, x, None, 0.0, block_v, True, False, entropy),
    lambda x, y, scale, g, block_v=None: launch_chunk_kernel(x, y, g, None, scale, block_v, True, True, False)[0],
    lambda x, y, lse, scale, g, block_v=None: launch_chunk_kernel(x, y, g, lse, scale, block_v, False, True, False))

def chunk_ops(device):
    return TRITON_OPS if device.type == "cuda" and triton is not None else TORCH_OPS

def chunk_rows(V, device):  # rows per chunk, a multiple of 64: 32 MB of fp32 logits on a CPU, 512 MB on a GPU
    return max(64, (2**27 if device.type == "cuda" else 2**23) // (-(-V // 64) * 64) // 64 * 64)

def buffers(n_rows, V, device, dtype):  # (rows per chunk, fp32 logits, the gradient in the GEMMs' dtype): aligned rows
    rows, pad = chunk_rows(V, device), -(-V // 64) * 64
    x = torch.empty(max(1, min(rows, n_rows)), pad, device=device)[:, :V]
    return rows, x, x if dtype == torch.float32 else torch.empty(len(x), pad, dtype=dtype, device=device)[:, :V]

def mm_fp32(a, b, out):  # out = a @ b in fp32: bf16 operands' products summed and stored in fp32, never rounded
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    # CUDA's out_dtype GEMM reads bf16 and sums in fp32; a CPU has none: the same math on the operands made fp32
    return torch.mm(a, b, out_dtype=torch.float32, out=out) if a.is_cuda else torch.mm(a.float(), b.float(), out=out)

def addmm_fp32_(dw, a, b):  # dw += a @ b, accumulated in dw's fp32
    if a.dtype == torch.float32:
        return dw.addmm_(a, b)
    if a.is_cuda:
        try:
            return torch.addmm(dw, a, b, out_dtype=torch.float32, out=dw)  # bf16 operands, fp32 sum, no temporary
        except (RuntimeError, TypeError):  # an older torch: a (V, C) fp32 temporary per chunk
            return dw.add_(torch.mm(a, b, out_dtype=torch.float32))
    return dw.addmm_(a.float(), b.float())

def head_dtype(h):  # autocast's (bf16: the head runs outside autocast, accumulating in fp32), else h's
    return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype

class HeadOut(NamedTuple):  # per token, fp32, shaped as the targets
    loss: torch.Tensor  # -log P(x_i | x_<i); 0 where the target is ignored
    lse: torch.Tensor  # log-sum-exp of the logits: SLM's backward reads it
    entropy: torch.Tensor | None  # the softmax's entropy, for scoring (H_RM); else None

@torch.no_grad()
def head_losses(h, w, y, entropy=False):  # every token's HeadOut, over chunks of rows of h (B, T, C), w (V, C), no grad
    dtype = head_dtype(h)  # autocast's: read before the head leaves autocast
    with torch.autocast(h.device.type, enabled=False):
        hc, wc, yf = h.flatten(0, 1).to(dtype), w.to(dtype), y.flatten()
        (rows, x, _), loss_fn = buffers(len(hc), len(wc), h.device, dtype), chunk_ops(h.device).loss
        out = torch.empty(3, len(hc), dtype=torch.float32, device=h.device)  # loss, lse, entropy
        for i in range(0, len(hc), rows):
            c = len(hc[i:i + rows])
            out[0, i:i + c], out[1, i:i + c], ent = loss_fn(mm_fp32(hc[i:i + c], wc.t(), x[:c]), yf[i:i + c], entropy)
            if entropy:
                out[2, i:i + c] = ent
    return HeadOut(out[0].view(y.shape), out[1].view(y.shape), out[2].view(y.shape) if entropy else None)

@torch.no_grad()
def head_loss_grad(h, w, y, dtype, scale):  # CLM: every row's loss and the gradients of scale * sum(loss), (N,), dh, dw
    hc, wc, (N, C), V = h.to(dtype), w.to(dtype), h.shape, w.shape[0]
    (rows, x, g), loss_grad_fn = buffers(N, V, h.device, dtype), chunk_ops(h.device).loss_grad
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    dh, dw = torch.empty_like(hc), torch.zeros(V, C, dtype=torch.float32, device=h.device)
    for i in range(0, N, rows):
        c = len(hc[i:i + rows])
        loss[i:i + c] = loss_grad_fn(mm_fp32(hc[i:i + c], wc.t(), x[:c]), y[i:i + c], scale, g[:c])
        torch.mm(g[:c], wc, out=dh[i:i + c])  # dH = G W
        addmm_fp32_(dw, g[:c].t(), hc[i:i + c])  # dW += G^T H
    return loss, dh, dw

def first_derivative_only():  # both heads' backward: grad is enabled only under create_graph, where a second
    if torch.is_grad_enabled():  # derivative through these constant gradients would be zero, silently
        raise RuntimeError("rho's fused head has no second derivative: call backward without create_graph")

class FullHeadLoss(torch.autograd.Function):  # CLM: (sum / n, every token's loss); gradients from the forward
    @staticmethod
    def forward(ctx, h, w, y, n, dtype):
        loss, dh, dw = head_loss_grad(h, w, y, dtype, 1.0 / n)
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(loss)
        return loss.sum() / n, loss

    @staticmethod
    def backward(ctx, grad, _token_loss_grad):  # every token's loss is non-differentiable: no gradient comes
        first_derivative_only()
        dh, dw = ctx.saved_tensors
        return dh * grad, dw * grad, None, None, None  # a (V, C) fp32 temporary, for a moment

class SelectedHeadLoss(torch.autograd.Function):  # SLM: the given losses of I_k over n; backward recomputes its logits
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
        (rows, x, g), grad_fn = buffers(len(idx), w.shape[0], h.device, ctx.dtype), chunk_ops(h.device).grad
        dh, dw = torch.zeros_like(hc), torch.zeros(w.shape, dtype=torch.float32, device=h.device)
        for i in range(0, len(idx), rows):
            r = idx[i:i + rows]
            hs, gc = hc[r], g[:len(r)]  # (c, C), (c, V)
            grad_fn(mm_fp32(hs, wc.t(), x[:len(r)]), y[i:i + rows], lse[i:i + rows], grad / ctx.n, gc)
            dh[r] = gc @ wc
            addmm_fp32_(dw, gc.t(), hs)
        return dh, dw, None, None, None, None, None, None

def fused_clm_loss(h, w, targets, n):  # (the losses' sum over n, the step's valid targets; every token's loss (B, T))
    (B, T, C), dtype = h.shape, head_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        out, loss = FullHeadLoss.apply(h.reshape(-1, C), w, targets.reshape(-1), max(n, 1), dtype)
    return out, loss.view(B, T)

def selected_loss(h, w, targets, every, sel, n):  # SLM's, given I_k, n, and every = head_losses(h, w, targets)
    dtype = head_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return SelectedHeadLoss.apply(h.flatten(0, 1), w, targets.flatten(), every.loss.flatten(), every.lse.flatten(),
                                      sel.flatten(), max(n, 1), dtype)

def fused_slm_loss(h, w, targets, ref, cfg, gen=None):
    """slm_loss(h @ w.T, targets, ref, cfg.k, ...) from h (B, T, C) and w (V, C), I_k over the step, no B*T x V."""
    every = head_losses(h, w, targets)  # one pass, no grad
    sel, n = select_step(every.loss, targets, ref, cfg, gen)
    return selected_loss(h, w, targets, every, sel, n), every.loss, sel

@torch.no_grad()
def model_token_loss(model, x, y, entropy=False):  # every token's loss (B, T), no grad; with entropy (loss, entropy)
    out = head_losses(model(x), model.lm_head.weight, y, entropy)
    return (out.loss, out.entropy) if entropy else out.loss

# -----------------------------------------------------------------------------
# reference scoring: one forward pass of the frozen reference model over every web token

def weights_sha256(model):  # a resumed scoring run must use the same reference model
    sha = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        sha.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()

def same_scores(old, info):
    return all(old.get(key) == info[key] for key in ("n_tokens", "block_size", "data_sha256", "weights_sha256"))

def start_scoring(path, n_tokens, T, n_windows, cfg, meta, weights):
    """Creates (a resume keeps) <path>.partial, .done (a byte per block), .partial.json: (its json, the done flags)."""
    info = {"n_tokens": n_tokens, "block_size": T, "score_batch": cfg.score_batch, "data_sha256": meta["sha256"],
            "weights_sha256": weights, "score_dtype": cfg.score_dtype, "scores": cfg.scores}
    dtype, C = score_layout(info)
    if RANK == 0:
        old = scoring_json(path + ".partial.json") or {}
        done = scoring_json(path + ".json") if os.path.isfile(path) else None
        if done and same_scores(done, info) and os.path.getsize(path) == C * dtype.itemsize * n_tokens and \
                not sha256_differs(path, done.get("sha256")):
            print(f"score: {path} already holds this model's scores of {cfg.data}: kept")
        elif done and not same_scores(done, info) and not cfg.overwrite:
            run = os.path.dirname(path)
            die(f"{path}: holds the scores of {done['data']} by "
                f"{'this' if done.get('weights_sha256') == weights else 'another'} reference model; scoring "
                f"{cfg.data} would replace them: pass --overwrite, or copy the run (cp -r {run} {run}-2) and score "
                f"that: {command('score', cfg, name=os.path.basename(run) + '-2')}")
        elif same_scores(old, info) and os.path.isfile(path + ".partial") and os.path.isfile(path + ".done"):
            info = old  # resume, with the block size it started with
        else:
            for stale in (path, path + ".json"):  # asked for by --overwrite, or of this run, cut short
                if os.path.exists(stale):
                    os.remove(stale)
            with open(path + ".partial.tmp", "wb") as f:  # sparse zeros; NaN where no window predicts a token
                f.truncate(C * dtype.itemsize * n_tokens)
                tail = n_windows * T + 1  # token 0 and the tokens after the last window
                for at, n in ((0, 1), (tail, n_tokens - tail)):
                    os.pwrite(f.fileno(), np.full(C * n, np.nan, dtype).tobytes(), C * dtype.itemsize * at)
            write_atomic(path + ".done", bytes(-(-n_windows // info["score_batch"])))
            os.replace(path + ".partial.tmp", path + ".partial")
            write_json(path + ".partial.json", info)
    if WORLD > 1:
        dist.barrier()
    if not os.path.isfile(path + ".partial.json"):  # already scored
        return None, None
    return read_json(path + ".partial.json"), np.fromfile(path + ".done", np.uint8)

@torch.no_grad()
def score_web(model, meta, cfg, run):
    """<out>/<run>/ref_scores.bin: L_RM, H_RM of every web token, in blocks marked done once on disk: resumable."""
    model.eval()
    web = windows(cfg.data, "web.bin", meta, model.config.block_size)
    path, T, n_tokens = os.path.join(cfg.out, run, "ref_scores.bin"), web.T, len(web.tokens)
    info, done = start_scoring(path, n_tokens, T, web.n, cfg, meta, weights_sha256(model))
    if info is None:
        return read_json(path + ".json")
    B, todo = info["score_batch"], [b for b in range(len(done)) if not done[b] and b % WORLD == RANK]
    dtype, C = score_layout(info)  # a resume keeps the layout it started with
    t0 = t_sync = time.time()
    marks, n_scored = [], 0
    with open(path + ".partial", "r+b") as out, open(path + ".done", "r+b") as flags:
        for i, b in enumerate(todo):
            ws = range(b * B, min(b * B + B, web.n))  # consecutive windows: their targets are consecutive tokens
            batch = web.get(ws, cfg.device)
            with autocast(cfg):
                scores = model_token_loss(model, batch.x, batch.y, entropy=C == 2)
            scores = torch.stack(scores, -1) if C == 2 else scores[..., None]  # (len(ws), T, C)
            os.pwrite(out.fileno(), scores.float().cpu().numpy().astype(dtype).tobytes(),
                      C * dtype.itemsize * (ws[0] * T + 1))
            marks.append(b)
            n_scored += len(ws) * T
            if time.time() - t_sync > 30 or i == len(todo) - 1:  # the scores on disk first, then their marks
                os.fsync(out.fileno())
                for m in marks:
                    os.pwrite(flags.fileno(), b"\x01", m)
                os.fsync(flags.fileno())
                marks, t_sync = [], time.time()
                if RANK == 0 and len(todo) > 1:
                    rate = n_scored / (t_sync - t0)
                    print(f"score: {i + 1}/{len(todo)} blocks, {rate:,.0f} tok/s, eta "
                          f"{(len(todo) - i - 1) * B * T / rate:.0f}s", file=sys.stderr, flush=True)
    elapsed = time.time() - t0
    n_scored = int(sum_ranks(torch.tensor(n_scored, device=cfg.device)))  # waits for all; NCCL: GPU tensors only
    info.update(encoding=meta["encoding"], data=cfg.data, score_s=round(elapsed, 2),
                score_tok_s=round(n_scored / max(elapsed, 1e-9)), processes=WORLD, dtype=cfg.dtype)
    if RANK == 0:
        if not np.fromfile(path + ".done", np.uint8).all():
            die(f"{path}.partial: some blocks were not scored; run {command('score', cfg, name=run)} again")
        os.replace(path + ".partial", path)
        info["sha256"] = file_sha256(path) if os.path.getsize(path) <= HASH_MAX else None  # load_ref_scores checks it
        write_json(path + ".json", info)
        for f in (path + ".done", path + ".partial.json"):
            os.remove(f)
        print(f"score: {n_scored:,} web tokens in {elapsed:.1f}s ({info['score_tok_s']:,} tok/s"
              f"{f' over {WORLD} processes' if WORLD > 1 else ''}) -> {path}")
    return info

# -----------------------------------------------------------------------------
# evaluation: the target-distribution val loss (hq val), the web val loss, answer accuracy (greedy, exact match)

MAX_NEW = 48  # new tokens an answer gets where eval.json has no reference solutions (an older prepare.py)

def eval_sets(cfg, meta, web):  # hq val windows, web's val windows, the held-out problems
    path = os.path.join(cfg.data, "eval.json")
    if cfg.eval_problems and not os.path.isfile(path):
        die(f"{path}: missing (prepare.py writes it beside the token files): run prepare.py for {cfg.data} again, or "
            "pass --eval_problems 0 to train without measuring accuracy")
    problems = read_json(checked(cfg.data, "eval.json", meta)) if cfg.eval_problems else []  # as prepare.py wrote it
    if cfg.eval_problems and web.T < 2:  # generation answers in the second half of the context
        die(f"--block_size {web.T}: answer accuracy needs a context of 2 tokens or more: pass a larger --block_size, "
            "or --eval_problems 0")
    if len(problems) < cfg.eval_problems and RANK == 0:  # said, not refused: the default asks for 200
        print(f"note: --eval_problems {cfg.eval_problems}: {path} holds {len(problems)} problems; each evaluation "
              f"answers all {len(problems)}", file=sys.stderr)
    if cfg.eval_problems and not problems:
        die(f"{path}: no eval problems (prepare.py found no \"#### N\" or \"The answer is: N\" answer in --val): "
            f"prepare the data with such a --val, or pass --eval_problems 0 to train without measuring accuracy")
    enc, T = get_encoding(meta["encoding"]), web.T
    solutions = [len(enc.encode_ordinary(p["solution"])) for p in problems if "solution" in p]
    longest = max(solutions) if solutions and len(solutions) == len(problems) else None  # else an older prepare.py
    # new tokens an answer gets: twice the longest reference solution and 16 (a model may write more than the
    # reference, a settled row stops), in the half of the context that generate leaves answers
    max_new = min(T // 2, MAX_NEW if longest is None else 2 * longest + 16)
    if longest is not None and longest + 1 > T // 2 and RANK == 0:  # + 1: the line end that settles an answer
        print(f"note: {path}: reference answers of up to {longest} tokens, but a context of {T} leaves answers "
              f"{T // 2}: longer ones are cut short (a larger --block_size fits them)", file=sys.stderr)
    return {"hq": windows(cfg.data, "hq_val.bin", meta, T), "web": web, "problems": problems, "max_new": max_new,
            "web_val": list(range(web_split(web.n, T), web.n)), "enc": enc}

@torch.no_grad()
def generate(model, prompts, max_new, done=None):  # greedy, left-padded, until done(a row's new tokens) for every row
    T, device = model.config.block_size, model.lm_head.weight.device
    # a prompt keeps at most the context's first half, its answer the rest, whatever max_new: the same prompts always
    max_new, prompts = min(max_new, T // 2), [p[-(T - T // 2):] for p in prompts]
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)
    caches, out, ended = [[] for _ in range(model.config.n_layer)], [], [False] * len(prompts)
    h = model.decode(idx, pad, caches)
    for _ in range(max_new):
        out.append(model.lm_head(h[:, -1]).argmax(-1))
        if done is not None:  # the batch keeps its shape to the end, so stopping early changes no token
            ended = [e or done(row) for e, row in zip(ended, torch.stack(out, 1).tolist())]
            if all(ended):
                break
        h = model.decode(out[-1][:, None], pad, caches)
    return torch.stack(out, 1).tolist()

def answered(text):  # whether text's final answer is settled: a line has ended after it
    m = ANSWER.search(text)
    return m is not None and "\n" in text[m.end():]

def answers(model, problems, enc, max_new=MAX_NEW):  # 1 or 0 per problem: final_answer(generated text) == its answer
    def text(o):  # up to the end-of-text token; padded ids (beyond the vocabulary) dropped
        o = o[:o.index(enc.eot_token)] if enc.eot_token in o else o
        return enc.decode([t for t in o if t < enc.n_vocab])
    done = lambda o: enc.eot_token in o or answered(text(o))  # what follows either cannot change the answer
    prompts = [[enc.eot_token] + enc.encode_ordinary(p["prompt"]) for p in problems]
    outs = [o for i in range(0, len(prompts), 64) for o in generate(model, prompts[i:i + 64], max_new, done)]
    return [int(final_answer(text(o)) == p["answer"]) for p, o in zip(problems, outs)]

def accuracy(correct):
    return round(sum(correct) / len(correct), 4) if correct else None  # None: not measured (--eval_problems 0)

def percent(accuracy):
    return "-" if accuracy is None else f"{accuracy:.1%}"  # None: not measured (--eval_problems 0)

@torch.no_grad()
def evaluate(model, ev, cfg, final=False):  # (measures, per-token records); the final one answers every problem
    model.eval()
    b = ev["web"].get(ev["web_val"], cfg.device)  # web_split keeps them to one batch
    web, n_web = model_token_loss(model, b.x, b.y), int((b.y != IGNORE).sum())  # (n_val, T), its valid targets
    hq_val, total, n = list(range(min(ev["hq"].n, max(128, 32768 // ev["hq"].T)))), 0.0, 0  # 128 windows or 32k tokens
    for i in range(0, len(hq_val), 32):
        hq = ev["hq"].get(hq_val[i:i + 32], cfg.device)
        total, n = total + model_token_loss(model, hq.x, hq.y).sum().item(), n + int((hq.y != IGNORE).sum())
    correct = answers(model, ev["problems"] if final else ev["problems"][:cfg.eval_problems], ev["enc"], ev["max_new"])
    measures = {"val_loss_hq": round(total / n, 4), "val_loss_web": round(web.sum().item() / n_web, 4),
                "accuracy": accuracy(correct[:cfg.eval_problems])}
    measures.update({"correct": correct} if final and correct else {})  # every answer of the final evaluation
    hq = ev["hq"].get(range(min(ev["hq"].n, 8)), cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)  # its own RNG: the training RNG stays untouched
    sel = select_tokens(web, b.y, b.ref, cfg.k, cfg.scope, cfg.select, gen)
    return measures, {"hq": model_token_loss(model, hq.x, hq.y).half().cpu(), "web": web.half().cpu(), "sel": sel.cpu()}

# -----------------------------------------------------------------------------
# training: the base model (demo), the reference model (CLM on hq), continual pretraining (CLM or SLM on web)

def run_name(cfg):  # base, ref, clm, slm-k0.6[-select][-scope]
    rule = ("" if cfg.select == "excess" else f"-{cfg.select}") + ("" if cfg.scope == "batch" else f"-{cfg.scope}")
    return cfg.name or ("ref" if cfg.mode == "score" else f"slm-k{cfg.k:g}{rule}" if cfg.mode == "slm" else cfg.mode)

def save_checkpoint(path, model, states, gen, step, cfg, meta, state):
    try:
        torch.save({"model": states[0], "optimizer": states[1], "rng": gen.get_state(), "step": step,
                    "config": asdict(cfg), "model_config": asdict(model.config), "encoding": meta["encoding"],
                    "n_vocab": meta["vocab_size"], "data_sha256": meta["sha256"], "state": state,
                    **({"hf_config": model.hf.config.to_json_string()} if isinstance(model, HF) else {})},
                   path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a kill leaves the previous checkpoint intact
    except (OSError, RuntimeError) as e:  # a full disk: torch.save raises either
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")  # not left filling the disk
        last = f"the checkpoint of step {state['history'][-2]['step']} is intact" if len(state["history"]) > 1 else \
            "no earlier checkpoint"
        die(f"{path}: could not write the checkpoint ({str(e).strip().splitlines()[-1]}); {last}: free disk space, "
            "then run again with --resume")
    if isinstance(states[0], str):  # an FSDP run: its earlier shards go once ckpt.pt names the new ones
        for old in set(glob.glob(path[:-len(".pt")] + "-*.dcp")) - {os.path.join(os.path.dirname(path), states[0])}:
            shutil.rmtree(old)

def load_checkpoint(path, meta=None, what="checkpoint"):
    if not os.path.isfile(path):
        die(f"{path}: no such {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path}: not a readable rho checkpoint ({type(e).__name__}: cut short, or not written by torch.save)")
    missing = {"model", "model_config", "config", "encoding", "n_vocab"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        die(f"{path}: a torch file, but not a checkpoint written by rho.py (no {', '.join(sorted(missing))}): pass a "
            "run's ckpt.pt, the name of a run in --out, or scratch")
    if meta is not None and (ckpt["n_vocab"] != meta["vocab_size"] or ckpt["encoding"] != meta["encoding"]):
        die(f"{path}: {what} has vocabulary {ckpt['encoding']} ({ckpt['n_vocab']} tokens) but the data has "
            f"{meta['encoding']} ({meta['vocab_size']}): prepare the data with --encoding {ckpt['encoding']} or "
            f"train a new model")
    if isinstance(ckpt["model"], str) and not os.path.isdir(os.path.join(os.path.dirname(path), ckpt["model"])):
        die(f"{path}: its weights are the FSDP shards {ckpt['model']} beside it, which are missing: restore that "
            "folder next to ckpt.pt (copy a run's folder whole)")
    return ckpt

def whole_weights(ckpt, path, model):  # a checkpoint's state_dict; an FSDP run's read from its shards into model's
    if not isinstance(ckpt["model"], str):
        return ckpt["model"]
    import torch.distributed.checkpoint as dcp
    sd = model().state_dict()
    with warnings.catch_warnings(action="ignore", category=UserWarning):  # its "assuming ... a single process"
        dcp.load({"model": sd}, checkpoint_id=os.path.join(os.path.dirname(path), ckpt["model"]), no_dist=True)
    return sd

def model_of(ckpt, block_size, path):  # a checkpoint's model, ours or transformers', its context cropped (nanoGPT)
    if "hf_config" in ckpt:
        model = load_hf(path, block_size or ckpt["model_config"]["block_size"], ckpt["hf_config"])
        model.load_state_dict(whole_weights(ckpt, path, lambda: model))
        return model
    shape = GPTConfig(**ckpt["model_config"])
    sd = whole_weights(ckpt, path, lambda: GPT(shape))
    T = block_size or shape.block_size
    if T > shape.block_size:
        die(f"--block_size {T}: {path} has {shape.block_size} positions; pass --block_size {shape.block_size} or less")
    model = GPT(GPTConfig(**{**asdict(shape), "block_size": T}))
    model.load_state_dict({**sd, "transformer.wpe.weight": sd["transformer.wpe.weight"][:T]})  # every weight
    return model

def build_model(cfg, meta, shape):  # from scratch of the shape flags given, or from a model whose shape wins
    if not cfg.init_from and cfg.mode != "base" and "base" in meta.get("tokens", ()):  # the demo's default
        base = os.path.join(cfg.out, "base", "ckpt.pt")
        if not os.path.isfile(base):
            die(f"{base}: no base model: --{cfg.mode} on {cfg.data} starts from the base run; run "
                f"{command('base', cfg)} first, or pass --init_from scratch")
        if RANK == 0:
            print(f"{run_name(cfg)}: starting from the base run ({base}); --init_from scratch starts from random "
                  "weights")
        cfg.init_from = "base"  # as the paper's reference and training models start from one pretrained base
    torch.manual_seed(cfg.seed)
    given = {key: v for key, v in asdict(shape).items() if v is not None and key != "vocab_size"}
    if cfg.init_from in ("", "scratch"):
        shape = GPTConfig(**given, vocab_size=64 * math.ceil(meta["vocab_size"] / 64))
        if shape.n_embd % shape.n_head:
            die(f"--n_embd {shape.n_embd}: must be a multiple of --n_head {shape.n_head} (each head gets n_embd / "
                "n_head)")
        return GPT(shape).to(cfg.device)
    hf = cfg.init_from.startswith("hf:") or os.path.isfile(os.path.join(cfg.init_from, "config.json"))  # transformers
    path = None if hf else init_path(cfg)
    ignored = [f"--{key}" for key in given if key != "block_size"]
    if ignored and RANK == 0:
        print(f"warning: {' '.join(ignored)} ignored: the model's shape comes from {cfg.init_from}", file=sys.stderr)
    if hf:
        model = load_hf(cfg.init_from, given.get("block_size"))
        # byte ids fit only a model export.py wrote from a run on bytes data (its config says so)
        foreign = meta["encoding"] == "bytes" != getattr(model.hf.config, "rho_encoding", None)
        if meta["vocab_size"] > model.config.vocab_size or foreign:
            die(f"--init_from {cfg.init_from}: its vocabulary ({model.config.vocab_size} tokens) is not that of "
                f"{cfg.data} ({meta['encoding']}, {meta['vocab_size']}): prepare the data with `python prepare.py ... "
                f"--encoding {cfg.init_from}` (its own tokenizer; GPT-2: --encoding gpt2)")
        check_tokenizer(cfg, meta)
        return model.to(cfg.device)
    return model_of(load_checkpoint(path, meta, "base checkpoint"), given.get("block_size"), path).to(cfg.device)

def init_path(cfg):  # --init_from's checkpoint: a ckpt.pt, a run's folder, or the name of a run in --out
    tried = (cfg.init_from, os.path.join(cfg.init_from, "ckpt.pt"), os.path.join(cfg.out, cfg.init_from, "ckpt.pt"))
    found = [path for path in tried if os.path.isfile(path)]
    if not found and os.path.isdir(cfg.init_from):
        what = "an empty folder" if not os.listdir(cfg.init_from) else "prepared data (meta.json)" if os.path.isfile(
            os.path.join(cfg.init_from, "meta.json")) else "a folder without ckpt.pt or config.json"
        die(f"--init_from {cfg.init_from}: {what}, not a model: pass a run's folder or its ckpt.pt, the name of a "
            f"run in --out ({cfg.out}), scratch, hf:NAME, or a folder saved by transformers' save_pretrained")
    return found[0] if found else cfg.init_from

def check_resume(ckpt, cfg, model, meta, path):  # every flag that defines the run, and the data, as they were
    saved, now = {**ckpt["config"], **ckpt["model_config"]}, {**asdict(cfg), **asdict(model.config)}
    free = ("resume", "device", "compile", "act_ckpt", "micro_batch", "score_batch", "preset", "out", "name", "data")
    if saved["mode"] != cfg.mode:
        die(f"--resume: this is a --{cfg.mode} run, but {path} holds a --{saved['mode']} run; give this one another "
            f"--name")
    for key, v in now.items():  # free: how a run computes or where it lives, not what (the data: by its sha256)
        if key not in free and saved.get(key) != v:
            die(f"--resume: --{key} is {v!r} here but {saved.get(key)!r} in {path}: pass --{key} {saved.get(key)} "
                f"to continue that run, or give this one another --name")
    if ckpt["data_sha256"] != meta["sha256"]:
        die(f"--resume: {cfg.data} is not the data that {path} was trained on (prepared again?): restore that data, "
            f"or give this run another --name")

def lr_at(step, cfg):  # linear warmup, then cosine decay to 10% of the peak
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

def training_windows(cfg, meta, T):  # (base's, hq's or web's windows with the scores read; how many train; ref sha)
    if cfg.mode in ("base", "ref"):
        if cfg.mode == "base" and "base" not in meta["tokens"]:
            die(f"{cfg.data} has no base corpus (only the embedded demo builds base.bin): start from your own base "
                f"model with --init_from CKPT, or from scratch without it")
        w = windows(cfg.data, "base.bin" if cfg.mode == "base" else "hq_train.bin", meta, T)
        hi, ref_sha = w.n, None
    else:
        needs_ref = cfg.mode == "slm" and cfg.select not in ("random", "train")
        ref, ref_sha = load_ref_scores(cfg, meta, T) if needs_ref else (None, None)
        w = web_windows(cfg, meta, T, ref)
        hi = web_split(w.n, T)
    w.step_windows(0, cfg.batch_size, cfg.seed, hi)  # fewer than one batch: refused now, before claim empties a folder
    return w, hi, ref_sha

def train_step(model, fwd, micro, cfg, gen):  # model: the module; fwd: its forward as trained (compiled, DDP)
    """The gradient of the mean loss over the step's selected tokens, whatever the split: (the loss, I_k each)."""
    clm = cfg.k == 1  # every valid token carries the loss (--slm --k 1 too)
    if clm:
        sels = [b.y != IGNORE for b in micro]
        n = int(sum_ranks(sum(s.sum() for s in sels)))
    elif len(micro) > 1:  # SLM in micro-batches: I_k needs every token's loss before the first backward
        y, ref = torch.cat([b.y for b in micro]), torch.cat([b.ref for b in micro])
        with torch.no_grad(), autocast(cfg):  # (a rule that reads no training loss needs no forward)
            loss = torch.cat([head_losses(fwd(b.x), model.lm_head.weight, b.y).loss for b in micro]) if cfg.select in \
                ("excess", "train", "sample") else torch.zeros(y.shape, device=y.device)
        sel, n = select_step(loss, y, ref, cfg, gen)
        sels = list(sel.split(len(micro[0].y)))
    total = []
    for i, b in enumerate(micro):
        sync = WORLD == 1 or i == len(micro) - 1  # gradients are reduced across processes after the last micro-batch
        if cfg.fsdp:
            model.set_requires_gradient_sync(sync)
        elif WORLD > 1:
            fwd.require_backward_grad_sync = sync  # all that DDP's no_sync() context sets (nanoGPT does the same)
        with autocast(cfg):
            h, w = fwd(b.x), model.lm_head.weight  # the head weight after the forward: FSDP gathers it there
            if clm:
                loss, every = fused_clm_loss(h, w, b.y, n)
            elif len(micro) == 1:  # the whole step in one forward: I_k from its own token losses
                loss, every, sel = fused_slm_loss(h, w, b.y, b.ref, cfg, gen)
                sels = [sel]
            else:
                out = head_losses(h, w, b.y)
                loss, every = selected_loss(h, w, b.y, out, sels[i], n), out.loss
        # DDP and FSDP average the gradients over processes, but n counts every process's tokens: sum them instead
        (loss * WORLD).backward()
        # a NaN in any token's loss stops the run, also where SLM selected none of them (it never selects NaN)
        total.append(torch.where(every.isfinite().all(), loss.detach(), float("nan")))
    return sum_ranks(torch.stack(total).sum()), sels

def noise_shares(counts, labels):  # noise share (label 0: clean), overall and per kind, of [seen, selected]
    seen, sel = ({"all": round(1 - c[0] / max(1, sum(c)), 4),
                  **{labels[i]: round(n / max(1, sum(c)), 4) for i, n in enumerate(c) if i}} for c in counts)
    return {"noise_in_selected": sel, "noise_share_corpus": seen}

def record(state, step, measures, counts, n, loss_sum, labels):  # appends an evaluation to the history; its log line
    e = {"step": step, "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
         "wall_s": round(state["wall_s"], 2), "train_loss": round(loss_sum / n, 4), **measures}
    line = (f"step {step} | loss {e['train_loss']:.3f} | sel {e['tokens_trained'] / e['tokens_seen']:.0%} | val hq "
            f"{e['val_loss_hq']:.3f} web {e['val_loss_web']:.3f} | acc {percent(e['accuracy'])}")
    if counts[0]:
        e.update(noise_shares(counts, labels))
        state["by_label"] = [[a + b for a, b in zip(*pair)] for pair in zip(state["by_label"], counts)]
        line += f" | noise-in-sel {e['noise_in_selected']['all']:.1%} (corpus {e['noise_share_corpus']['all']:.1%})"
    state["history"].append(e)
    return line

def write_token_losses(path, state, ev):  # <out>/<name>/tokens.npz: the token records and their web val windows
    if not state["tokens"]["web"]:
        return
    b = ev["web"].get(ev["web_val"], "cpu")
    arrays = {key: torch.stack(v).numpy() for key, v in state["tokens"].items()}  # (evals, windows, T)
    evals = state["history"][-len(state["tokens"]["web"]):]
    arrays.update(step=np.array([h["step"] for h in evals]), tokens_seen=np.array([h["tokens_seen"] for h in evals]),
                  web_x=torch.cat([b.x, b.y[:, -1:]], 1).int().numpy(), web_ref=b.ref[..., REF_LOSS].numpy(),
                  web_ref_entropy=b.ref[..., REF_ENTROPY].numpy(),
                  **({} if b.labels is None else {"web_labels": b.labels.numpy()}))
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)

def finish(cfg, meta, name, state, out_dir, model, extra):  # <out>/<name>/metrics.json; what a CPU run's bits rest on
    last, history = state["history"][-1], [{m: v for m, v in h.items() if m != "correct"} for h in state["history"]]
    correct = last.get("correct")  # the final evaluation's answers to all the problems, or None (--eval_problems 0)
    metrics = {"run": name, "mode": cfg.mode, "k": cfg.k, "select": cfg.select, "scope": cfg.scope, "steps": cfg.steps,
               "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
               "wall_s": round(state["wall_s"], 2), "eval_s": round(sum(h["eval_s"] for h in state["history"]), 2),
               "final": {"val_loss_hq": last["val_loss_hq"], "val_loss_web": last["val_loss_web"],
                         "accuracy": accuracy(correct) if correct else last["accuracy"], "correct": correct},
               "history": history, "losses": state["losses"], "config": asdict(cfg),
               "model_config": asdict(model.config), "n_params": sum(p.numel() for p in model.parameters()),
               "data": {"encoding": meta["encoding"], "sha256": meta["sha256"]}, "init_sha256": state["init_sha256"],
               **({"ref_weights_sha256": state["ref_sha256"]} if state["ref_sha256"] else {}), **extra,
               "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "processes": WORLD,
                       "cpu": torch.backends.cpu.get_cpu_capability(), "device": cfg.device},
               **(noise_shares(state["by_label"], meta["labels"]) if state["by_label"][0] else {})}
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    print(f"{name}: final val hq {last['val_loss_hq']:.4f} web {last['val_loss_web']:.4f} "
          f"acc {percent(metrics['final']['accuracy'])}{f' ({len(correct)} problems)' if correct else ''} -> "
          f"{out_dir}/metrics.json")
    return metrics

RUN_FILES = ("ckpt.pt", "metrics.json", "tokens.npz", "ref_scores.bin", "ref_scores.bin.json",
             "ref_scores.bin.partial", "ref_scores.bin.partial.json", "ref_scores.bin.done")

def earlier_run(out_dir, cfg):  # refuses an earlier run's files unless --resume or --overwrite
    old = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    old += [os.path.basename(d) for d in sorted(glob.glob(os.path.join(out_dir, "ckpt-*.dcp")))]  # FSDP's shards
    if old and not (cfg.resume or cfg.overwrite):  # a torn ckpt.pt (torch.save writes a zip) cannot be resumed
        torn = "ckpt.pt" in old and not zipfile.is_zipfile(os.path.join(out_dir, "ckpt.pt"))
        die(f"{out_dir}: holds a{' finished' if 'metrics.json' in old else 'n unfinished'} run ({', '.join(old)}): "
            + ("its ckpt.pt is not a whole torch file (cut short?), so it cannot resume: " if torn else
               "--resume continues it, ") + "--overwrite replaces it, --name NAME starts this one beside it")
    return old

LOCK = "run.lock"  # "PID HOST" of the command writing a run's folder; main removes it as that command exits

def lock_run(out_dir):  # a second command on the same run is refused while the first runs; a dead one's lock taken
    path = os.path.join(out_dir, LOCK)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        held = Path(path).read_text().split()  # [pid, host]
        here = len(held) == 2 and held[0].isdigit() and held[1] == socket.gethostname()  # a process on this machine
        if not here or int(held[0]) != os.getpid() and running(int(held[0])):
            die(f"{out_dir}: in use by " + (f"process {held[0]} on {held[1]}" if len(held) == 2 else "another command")
                + f" ({LOCK}): wait for it to end or stop it; if no command is running there, delete {path}")
        print(f"{out_dir}: took over {LOCK} of process {held[0]}, which is no longer running (killed?)")
        os.remove(path)
        return lock_run(out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}")

def running(pid):  # signal 0 only asks whether the process exists (PermissionError: it does, another user's)
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

def command(mode, cfg, **flags):
    """A rho.py command line that runs as is: --mode, --name, cfg's --data, --out and --device, then flags; a flag at
    its default (None, False) is left out."""
    default = {**asdict(RunConfig()), "dtype": "bfloat16" if cfg.device.startswith("cuda") else "float32"}
    given = {"name": flags.pop("name", None), "data": cfg.data, "out": cfg.out, "device": cfg.device, **flags}
    words = [f"--{key}" + ("" if v is True else f" {shlex.quote(str(v))}") for key, v in given.items()
             if v is not None and v is not False and v != default.get(key)]
    return f"`python rho.py {' '.join([f'--{mode}', *words])}`"

def saved_flags(ckpt, mode):  # the flags of a checkpoint's run that --mode reads; its shape where it was its own
    flags = {key: v for key, v in ckpt["config"].items() if key in MODE_FLAGS[mode] - {"resume", "overwrite"}}
    own = flags.get("init_from") in ("", "scratch")
    shape = {key: v for key, v in ckpt["model_config"].items() if key == "block_size" or own and key in SHAPE}
    return {**flags, **shape}

def claim(out_dir, old, cfg):  # the run's folder, once every check passed; locked; tested; --overwrite empties it
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock_run(out_dir)
        if earlier_run(out_dir, cfg) != old:  # another command wrote there since this one started
            die(f"{out_dir}: changed while this command started: run it again")
        write_atomic(os.path.join(out_dir, ".write-test"), b"")
        os.remove(os.path.join(out_dir, ".write-test"))
    except OSError as e:
        die(f"{out_dir}: cannot write the run there ({e.strerror}): pass another --out")
    for f in old if cfg.overwrite else ():
        (shutil.rmtree if f.endswith(".dcp") else os.remove)(os.path.join(out_dir, f))

def adamw(model, cfg):  # weight decay on matrices and embeddings, not biases and LayerNorm gains (nanoGPT)
    params = list(model.parameters())  # tied weights once
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

def split_step(cfg):  # sequences per forward on each process, checked against the step
    if cfg.batch_size % WORLD:
        die(f"--batch_size {cfg.batch_size}: not divisible by the {WORLD} processes; use a multiple of {WORLD}")
    share = cfg.batch_size // WORLD
    if share % (cfg.micro_batch or share):
        die(f"--micro_batch {cfg.micro_batch}: must divide the {share} sequences each process holds per step "
            f"(--batch_size {cfg.batch_size} over {WORLD} processes)")
    return cfg.micro_batch or share

def stop_non_finite(what, value, step, name, cfg, state, ckpt_path):  # before the optimizer step: no NaN checkpoint
    h = state["history"]  # what diverged is not known: the flags that size a step are named, none blamed
    last = f"; {ckpt_path} holds the last weights saved (step {h[-1]['step']}, val loss hq " \
        f"{h[-1]['val_loss_hq']:.4g})" if h else ""
    die(f"{name}: the {what} became {value} at step {step}, stopped before its update{last}. A step's "
        f"size comes from --lr {cfg.lr:g}, --weight_decay {cfg.weight_decay:g}, --grad_clip {cfg.grad_clip:g} (and "
        "the data): change what caused it, then start again with --overwrite (or another --name)")

def train(cfg, shape):
    meta, name = load_meta(cfg.data), run_name(cfg)
    master, out_dir = RANK == 0, os.path.join(cfg.out, name)  # the master logs, evaluates and saves
    ckpt_path, micro_bs, old = os.path.join(out_dir, "ckpt.pt"), split_step(cfg), earlier_run(out_dir, cfg)
    model = build_model(cfg, meta, shape)
    T = model.config.block_size
    train_w, hi, ref_sha = training_windows(cfg, meta, T)
    ev = eval_sets(cfg, meta, train_w if cfg.mode in ("clm", "slm") else web_windows(cfg, meta, T))
    gen = torch.Generator().manual_seed(cfg.seed)  # the random control's selection noise: the same on every process
    n_labels = len(meta["labels"]) if "labels" in meta and cfg.mode in ("clm", "slm") else 0  # the demo's audit
    state = {"history": [], "losses": [], "tokens_seen": 0, "tokens_trained": 0, "wall_s": 0.0,
             "by_label": [[0] * n_labels, [0] * n_labels], "tokens": {"hq": [], "web": [], "sel": []},  # seen, selected
             "init_sha256": weights_sha256(model), "ref_sha256": ref_sha}  # what the run starts from, by content
    model, start = wrap(model, cfg), 0
    opt = adamw(model, cfg)
    if cfg.resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, meta)
        check_resume(ckpt, cfg, model, meta, ckpt_path)
        if set(ckpt["state"]) != set(state):
            die(f"--resume: {ckpt_path} was written by another version of rho; give this run another --name")
        if ckpt["state"]["ref_sha256"] != ref_sha:
            die(f"--resume: {cfg.out}/{cfg.ref_run}/ref_scores.bin now holds the scores of another reference model "
                f"than the one {ckpt_path} trained with (was --ref run again?): restore those scores, or start "
                "this run again with --overwrite")
        load_states(model, opt, ckpt, cfg, ckpt_path)
        gen.set_state(ckpt["rng"])
        start, state = ckpt["step"], ckpt["state"]
    if master:
        claim(out_dir, old, cfg)
    if master and cfg.resume:
        print(f"{name}: " + (f"resumed from {ckpt_path} at step {start}" if start else "no checkpoint: from step 0"))
    fwd = torch.compile(model) if cfg.compile else model  # the forward that training calls; model keeps the weights
    fwd = DDP(fwd, device_ids=[LOCAL] if cfg.device.startswith("cuda") else None) if WORLD > 1 and not cfg.fsdp else fwd
    n_micro = cfg.batch_size // WORLD // micro_bs
    if master:
        split = f", {WORLD} process{'es' * (WORLD > 1)} x {n_micro} micro-batch{'es' * (n_micro > 1)} of {micro_bs}"
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.steps} steps of "
              f"{cfg.batch_size}x{T} tokens{split if micro_bs < cfg.batch_size else ''}, {cfg.mode}"
              + (f" k={cfg.k} select={cfg.select} scope={cfg.scope}" if cfg.mode == "slm" else ""))
    t_last, last, loss_sum = time.time(), start, 0.0  # since the last evaluation
    counts = torch.zeros(2, n_labels, dtype=torch.long, device=cfg.device)  # tokens seen, selected, per noise label
    for step in range(start, cfg.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        micro = train_w.micro_batches(step, cfg.batch_size, cfg.seed, cfg.device, hi, micro_bs)
        opt.zero_grad(set_to_none=True)
        loss, sels = train_step(model, fwd, micro, cfg, gen)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for what, v in (("loss", loss), ("gradient norm", norm)):
            if not torch.isfinite(v):
                stop_non_finite(what, v.item(), step, name, cfg, state, ckpt_path)
        opt.step()
        state["tokens_seen"] += cfg.batch_size * T
        state["tokens_trained"] += int(sum_ranks(sum(s.sum() for s in sels)))
        state["losses"].append(loss.item())
        loss_sum += state["losses"][-1]
        for b, sel in zip(micro, sels) if n_labels else ():  # web runs on the demo
            labels = b.labels.flatten().long()
            counts += torch.stack([torch.bincount(labels, minlength=n_labels),
                                   torch.bincount(labels[sel.flatten()], minlength=n_labels)])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            now = time.time()
            state["wall_s"] += now - t_last
            if n_labels:  # every process counted its own share
                sum_ranks(counts)
            if master or cfg.fsdp:  # under FSDP every process takes part in the evaluation's forwards
                with autocast(cfg):  # at the precision of training and scoring
                    measures, records = evaluate(model, ev, cfg, step + 1 == cfg.steps)
                states = save_states(model, opt, cfg, ckpt_path, step + 1)
            if master:
                measures["eval_s"] = round(time.time() - now, 2)  # what one evaluation costs, apart from wall_s
                n, dt = step + 1 - last, now - t_last
                line = record(state, step + 1, measures, counts.tolist(), n, loss_sum, meta.get("labels"))
                for key, v in records.items():
                    state["tokens"][key].append(v)
                save_checkpoint(ckpt_path, model, states, gen, step + 1, cfg, meta, state)
                print(f"{name} {line} | {n * cfg.batch_size * T / dt / 1000:.1f}k tok/s | eta "
                      f"{(cfg.steps - step - 1) * dt / n:.0f}s", flush=True)
            t_last, last, loss_sum = time.time(), step + 1, 0.0
            counts.zero_()
    extra = {"eval_problems": len(ev["problems"][:cfg.eval_problems]), "answer_tokens": ev["max_new"]}
    if cfg.mode == "ref":  # every process scores its share
        if cfg.fsdp:  # scoring needs no gradients or optimizer: each process scores with the whole model
            dist.barrier()  # once rank 0 has written the last ckpt.pt
            model = model_of(load_checkpoint(ckpt_path), None, ckpt_path).to(cfg.device)
        info = score_web(model, meta, cfg, name)
        extra.update(score_s=info["score_s"], score_tok_s=info["score_tok_s"])
    if master:
        write_token_losses(os.path.join(out_dir, "tokens.npz"), state, ev)
        return finish(cfg, meta, name, state, out_dir, model, extra)

def stopped(cfg, e):  # Ctrl-C or SIGTERM: one line saying where the run stopped and how it continues, no traceback
    frames = {f.f_code.co_name: f for f, _ in traceback.walk_tb(e.__traceback__)}  # main's callees, by name
    name, ckpt = run_name(cfg), os.path.join(cfg.out, run_name(cfg), "ckpt.pt")
    if cfg.mode == "score" or "score_web" in frames:  # the blocks marked done are kept
        msg = f"{name}: stopped while scoring: run " + ("the same command" if cfg.mode == "score" else
                                                        "the same command with --resume") + " to finish it"
    else:
        step = frames["train"].f_locals.get("step") if "train" in frames else None
        try:
            saved = f"{ckpt} holds step {torch.load(ckpt, 'cpu', weights_only=True, mmap=True)['step']}"
        except Exception:  # none yet, or not this run's
            saved = "no checkpoint yet"
        msg = (f"{name}: stopped " + (f"at step {step} of {cfg.steps}" if step is not None else "before training")
               + f"; {saved}: run the same command with --resume to continue")
    die(msg) if RANK == 0 else sys.exit(1)

def same_flags_on_every_process(cfg, shape):  # torchrun's processes must run one run: checked once, at start
    mine = {**asdict(cfg), **asdict(shape), "device": None}  # each process has its own device
    every = [None] * WORLD
    dist.all_gather_object(every, mine)
    for key in mine:
        if any(other[key] != mine[key] for other in every):
            values = ", ".join(f"rank {r}: {other[key]}" for r, other in enumerate(every))
            die(f"--{key}: the processes were started with other values ({values}): start every process with the "
                "same flags") if RANK == 0 else sys.exit(1)

# -----------------------------------------------------------------------------
# main

MODES = {"base": "train a base model on the general corpus (base.bin; the demo has one)",
         "ref": "train the reference model on hq, then score every web token with it",
         "score": "score the web tokens again with an existing reference model (--name, default ref)",
         "clm": "continual pretraining on web, loss on every token (the baseline)",
         "slm": "continual pretraining on web with the SLM loss (--k, --select, --scope)"}
CHOICES = {"select": ("excess", "random", "ref", "entropy", "ref_entropy", "train", "sample"), "preset": ("", *PRESETS),
           "scope": ("batch", "sequence"), "dtype": ("auto", "float32", "bfloat16"),
           "score_dtype": ("float32", "float16"), "scores": ("loss,entropy", "loss")}

# the flags each mode reads beyond the data, the output and the device; any other flag given is refused
SHAPE, SLM_FLAGS = ("block_size", "n_layer", "n_head", "n_embd"), {"k", "select", "scope", "ref_run"}
SCORE_FLAGS = {"score_batch", "score_dtype", "scores"}  # --ref's and --score's
RUN_FLAGS = {f.name for f in fields(RunConfig)} - SLM_FLAGS - SCORE_FLAGS - {"mode", "data", "out", "device"}
RUN_FLAGS |= set(SHAPE)
MODE_FLAGS = {"base": RUN_FLAGS, "ref": RUN_FLAGS | SCORE_FLAGS, "clm": RUN_FLAGS, "slm": RUN_FLAGS | SLM_FLAGS,
              "score": {"name", "dtype", "overwrite"} | SCORE_FLAGS}

def check_flags(a, mode, given):  # bad values and flags the mode ignores, one line each, before anything runs
    ignored = sorted(given - MODE_FLAGS[mode] - {"data", "out", "device"})
    if ignored:
        them = "them" if len(ignored) > 1 else "it"
        die(f"{' '.join('--' + f for f in ignored)}: --{mode} does not read {them}"
            + (" (--slm's flags)" if set(ignored) <= SLM_FLAGS else " (--ref's and --score's flags)"
               if set(ignored) <= SCORE_FLAGS else "") + f"; drop {them}")
    for flag in ("data", "ref_run"):  # '' would name the current folder (and break every command that quotes it)
        if not getattr(a, flag).strip():
            die(f"--{flag} {getattr(a, flag)!r}: empty: name a " + ("prepared data folder (default data/demo)"
                if flag == "data" else "reference run in --out (default ref)"))
    if not 0 < a.k <= 1:
        die(f"--k {a.k}: k is the share of tokens selected and must be in (0, 1], e.g. --k 0.6")
    shape = [(f, 1) for f in SHAPE if getattr(a, f) is not None]
    for flag, at_least in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("score_batch", 1), ("lr", 1e-30),
                           ("grad_clip", 1e-30), ("micro_batch", 0), ("warmup", 0), ("weight_decay", 0),
                           ("eval_problems", 0), ("seed", 0), *shape):
        v = getattr(a, flag)
        if not v >= at_least or v == math.inf:  # NaN fails every comparison
            die(f"--{flag} {v}: must be {'0 or more' if at_least == 0 else 'positive'}"
                + (" and finite" if isinstance(v, float) else ""))
    if a.seed > SEED_MAX:
        die(f"--seed {a.seed}: must be at most {SEED_MAX}")
    if not a.out:
        die("--out '': give the runs' folder (default out; '.' for the current folder)")
    for flag in ("name", "ref_run"):  # a run is a folder right in --out: a name, not a path
        v = getattr(a, flag)
        if v in (".", "..") or "/" in v or os.sep in v or len(v) > 100:  # '' is --name's default, --ref_run's above
            die(f"--{flag} {v[:40]!r}{'...' * (len(v) > 40)}: a run's name in --out: at most 100 characters, no "
                "path separators, not '.' or '..'")
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

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Selective Language Modeling (Rho-1): the reference model, scoring, SLM "
                                "and CLM continual pretraining.", argument_default=argparse.SUPPRESS,
                                allow_abbrev=False)  # --batch is not --batch_size
    if "--compare" in (sys.argv[1:] if argv is None else argv):
        die("--compare: the comparison of runs is report.py's: python report.py OUT [OUT ...]")
    p.error = lambda msg: die(f"{msg} (python rho.py --help lists the flags; abbreviations of them are not accepted)")
    job = p.add_mutually_exclusive_group(required=True)
    for mode, text in MODES.items():
        job.add_argument(f"--{mode}", action="store_true", help=text)
    d = RunConfig(device="cuda" if torch.cuda.is_available() else "cpu")
    for f in fields(RunConfig)[1:]:  # every field but mode is a flag
        v = getattr(d, f.name)
        if isinstance(v, bool):  # --compile and --no-compile: a preset's True can be turned off
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            choices = CHOICES.get(f.name)  # shown as {a|b}: a choice may hold a comma (--scores loss,entropy)
            shown = choices and "{" + "|".join(c or "''" for c in choices) + "}"
            p.add_argument(f"--{f.name}", type=type(v), choices=choices, metavar=shown,
                           help=f.metadata["help"] + (f" (default {v})" if v else ""))
    for key in SHAPE:  # GPTConfig's fields but vocab_size: the data's
        p.add_argument(f"--{key}", type=int, help=f"model {key} (default {getattr(GPTConfig, key)}; a run that starts "
                       "from a checkpoint or GPT-2 takes its shape, its context cropped to --block_size)")
    given = vars(p.parse_args(argv))  # only the flags given (no parser defaults): they win over a preset's
    mode = next(m for m in MODES if given.pop(m, False))
    preset = {key: v[mode] if isinstance(v, dict) else v for key, v in PRESETS.get(given.get("preset", d.preset),
              {}).items() if not isinstance(v, dict) or mode in v}
    a = argparse.Namespace(**{**asdict(d), **dict.fromkeys(SHAPE), **preset, **given})
    if "warmup" not in given:  # a default (or a preset's) warmup is at most a tenth of the run
        a.warmup = min(a.warmup, a.steps // 10)
    check_flags(a, mode, set(given))
    if mode != "slm":  # every token carries the loss
        a.k, a.select = 1.0, "all"
    a.dtype = ("bfloat16" if a.device.startswith("cuda") else "float32") if a.dtype == "auto" else a.dtype
    cfg = RunConfig(**{f.name: getattr(a, f.name) for f in fields(RunConfig)[1:]}, mode=mode)
    # the shape flags, None where not given: build_model takes them for a model from scratch, warns if it ignores them
    return cfg, GPTConfig(**{key: getattr(a, key) for key in SHAPE})

def main(argv=None):
    cfg, shape = parse_args(argv)
    # the folders this command may make: a failed one removes those it made that are still empty
    made = [d for d in (os.path.join(cfg.out, run_name(cfg)), cfg.out) if not os.path.exists(d)]
    if WORLD > 1 or cfg.fsdp:  # one of torchrun's processes (--fsdp on one too: a resume on fewer)
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{LOCAL}"
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")  # gloo on CPUs
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops a run as Ctrl-C does (stopped)
    try:
        if WORLD > 1:
            same_flags_on_every_process(cfg, shape)
        if cfg.mode != "score":
            return train(cfg, shape)
        meta, name = load_meta(cfg.data), run_name(cfg)
        path = os.path.join(cfg.out, name, "ckpt.pt")  # an FSDP run's shards are read from beside it
        ckpt = load_checkpoint(path, meta, "reference model")
        if RANK == 0:
            lock_run(os.path.join(cfg.out, name))
        info = score_web(model_of(ckpt, None, path).to(cfg.device), meta, cfg, name)
        if RANK == 0 and not os.path.isfile(os.path.join(cfg.out, name, "metrics.json")):
            print(f"note: {cfg.out}/{name}/metrics.json is missing (killed while scoring?): "
                  f"{command('ref', cfg, resume=True, **saved_flags(ckpt, 'ref'))} writes it and keeps these scores")
        return info
    except OSError as e:  # a full disk or a lost folder mid-run: a killed or failed run resumes
        again = "the same command again" if cfg.mode == "score" else "again with --resume"  # finished blocks kept
        die(f"{e.filename or cfg.out}: {e.strerror or e}: free space or fix the folder, then run {again}")
    except KeyboardInterrupt as e:
        stopped(cfg, e)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        if RANK == 0:
            unlock(os.path.join(cfg.out, run_name(cfg)))
        for d in made if RANK == 0 else ():
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        if dist.is_initialized():  # free DDP's reference cycles first: a gloo group left at interpreter exit can abort
            gc.collect()
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
