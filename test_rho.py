"""Tests that fail if the method is wrong. Run: python -m pytest -q test_rho.py

The sections follow rho.py (model, data, the SLM loss, the fused head, scoring, evaluation, training, main), then
prepare.py and the instruments; each opens with a line that says what is compared against what."""
import codecs
import contextlib
import gzip
import hashlib
import importlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import unicodedata
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors under its interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench  # noqa: E402
import prepare  # noqa: E402
import report  # noqa: E402
import rho  # noqa: E402

needs_triton = pytest.mark.skipif(rho.triton is None, reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_problems", "4", "--init_from", "scratch"]

def cfg_of(k, scope="batch", select="excess"):
    return rho.RunConfig(k=k, scope=scope, select=select)

def fused(h, w, y, r, k, scope="batch"):
    """rho's fused head as train_step calls it on a whole step: CLM's at k = 1, else SLM's: (loss, every token's
    loss, I_k)."""
    if k == 1:
        valid = y != rho.IGNORE
        return (*rho.fused_clm_loss(h, w, y, int(valid.sum())), valid)
    return rho.fused_slm_loss(h, w, y, r, cfg_of(k, scope))

def ref_of(*shape, generator=None, scale=1.0):
    """Reference scores (..., 2): L_RM and H_RM, random."""
    return torch.rand(*shape, 2, generator=generator) * scale

# -----------------------------------------------------------------------------
# model: a transformers causal LM (tiny random ones built here: no download) through rho's fused head, against
# transformers' own loss with labels, every gradient, and the full-logits reference slm_loss

def tiny_hf(vocab=50257, kind="gpt2", **kw):
    """A tiny random causal LM of a kind (gpt2: GPT-2's real vocabulary by default, several head chunks; llama: an
    untied head; qwen2: a tied head, q/k/v biases); every weight perturbed so that a wrong transpose or a dropped
    bias shows."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, **kw)
    cfg = {"gpt2": lambda: transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab,
                                                  activation_function="gelu_pytorch_tanh", **kw),  # gelu_new, fast
           "llama": lambda: transformers.LlamaConfig(**small, tie_word_embeddings=False),
           "qwen2": lambda: transformers.Qwen2Config(**small, tie_word_embeddings=True),
           "granite": lambda: transformers.GraniteConfig(**small, logits_scaling=2.0),
           "gemma2": lambda: transformers.Gemma2Config(**small, head_dim=8, final_logit_softcapping=1.0)}[kind]()
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf

@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_hf_fused_head_loss_and_grads_equal_transformers(kind, tmp_path):
    hf = tiny_hf(vocab=320, kind=kind)
    hf.save_pretrained(tmp_path / kind)
    model = rho.load_hf(str(tmp_path / kind), 33)
    assert model.config == rho.GPTConfig(33, 320, 2, *((2, 32) if kind == "gpt2" else (4, 32)))
    assert (model.lm_head.weight is model.hf.get_input_embeddings().weight) == (kind != "llama")
    idx = torch.randint(0, 320, (4, 34), generator=torch.Generator().manual_seed(2))
    labels = idx.clone()
    labels[1, 10:20] = -100  # HF's ignore index; ours is IGNORE
    y = labels[:, 1:].masked_fill(labels[:, 1:] == -100, rho.IGNORE)
    hf_loss = hf(idx, labels=labels).loss
    loss, _, _ = fused(model(idx[:, :-1]), model.lm_head.weight, y, None, 1.0)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-6, atol=1e-6)
    hf_loss.backward()
    loss.backward()
    for name, p in hf.named_parameters():
        torch.testing.assert_close(model.hf.get_parameter(name).grad, p.grad, rtol=1e-4, atol=1e-6)
    ref = ref_of(4, 33, generator=torch.Generator().manual_seed(3))
    h = model(idx[:, :-1])
    want = rho.slm_loss(model.lm_head(h), y, ref, 0.5)
    got = rho.fused_slm_loss(h, model.lm_head.weight, y, ref, cfg_of(0.5))
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    gw = [torch.autograd.grad(out, model.lm_head.weight, retain_graph=True)[0] for out in (want[0], got[0])]
    torch.testing.assert_close(gw[1], gw[0], rtol=1e-4, atol=1e-6)

@pytest.mark.parametrize("kind", ["granite", "gemma2"])
def test_hf_error_head_not_plain_linear(kind, tmp_path):
    tiny_hf(vocab=320, kind=kind).save_pretrained(tmp_path / kind)
    with pytest.raises(SystemExit, match=r"^error: --init_from .*: its logits are not a plain linear map of its final "
                                         r"hidden states .*: rho's fused head computes h @ W.T; use another model$"):
        rho.load_hf(str(tmp_path / kind))

def test_hf_batched_generation_equals_transformers(tmp_path):
    """rho's generate on a transformers model (left padding, its KV cache) gives transformers' own greedy tokens."""
    hf = tiny_hf(vocab=320, kind="llama")
    hf.save_pretrained(tmp_path / "llama")
    model = rho.load_hf(str(tmp_path / "llama"), 64).eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    got = rho.generate(model, prompts, 6)
    for p, g in zip(prompts, got):
        assert hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist() == g

def test_hf_init_from_local_directory(tmp_path, capsys):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    cfg, model_cfg = rho.parse_args(["--clm", "--init_from", str(tmp_path / "tiny-gpt2"), "--block_size", "32",
                                     "--device", "cpu"])
    assert model_cfg.block_size == 32 and model_cfg.n_layer is None and "warning" not in capsys.readouterr().err
    model = rho.build_model(cfg, {"encoding": "gpt2", "vocab_size": 50257}, model_cfg).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model(idx)), hf(idx).logits, rtol=1e-5, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    cfg_llama = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=320)
    transformers.LlamaModel(cfg_llama).save_pretrained(tmp_path / "llama")  # a body without its head
    cfg.init_from = str(tmp_path / "llama")  # transformers would load it with a random head, and only warn
    with pytest.raises(SystemExit, match=r"llama: no weights for lm_head.weight: not a causal LM checkpoint"):
        rho.build_model(cfg, {"encoding": "gpt2", "vocab_size": 50257}, model_cfg)
    cfg.init_from = str(tmp_path / "tiny-gpt2")
    with pytest.raises(SystemExit, match=r"--block_size 65: .*tiny-gpt2 has 64 positions; "
                                         r"pass --block_size 64 or less"):
        rho.build_model(cfg, {"encoding": "gpt2", "vocab_size": 50257}, rho.GPTConfig(block_size=65))
    (tmp_path / "tiny-gpt2" / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"tiny-gpt2: not a loadable transformers model \(.*model.safetensors"):
        rho.build_model(cfg, {"encoding": "gpt2", "vocab_size": 50257}, model_cfg)

def test_gpt2_shape_flags_with_init_from(tmp_path, capsys):
    """Shape flags not given stay None (a model from scratch takes the defaults); from GPT-2, --block_size crops its
    context and the other shape flags are ignored, with a warning."""
    _, shape = rho.parse_args(["--clm"])
    assert shape == rho.GPTConfig(block_size=None, n_layer=None, n_head=None, n_embd=None)
    tiny_hf().save_pretrained(tmp_path / "tiny-gpt2")
    cfg, shape = rho.parse_args(["--clm", "--init_from", str(tmp_path / "tiny-gpt2"), "--block_size", "16",
                                 "--n_layer", "3", "--device", "cpu"])
    model = rho.build_model(cfg, {"encoding": "gpt2", "vocab_size": 50257}, shape)
    assert (model.config.block_size, model.config.n_layer) == (16, 2)
    err = capsys.readouterr().err
    assert f"warning: --n_layer ignored: the model's shape comes from {tmp_path / 'tiny-gpt2'}\n" in err
    assert "--block_size" not in err

# -----------------------------------------------------------------------------
# data: batches against their definition (a function of seed and step; web val never trained on)

def test_same_batches_for_every_run_and_no_web_val_in_training():
    w = rho.Windows(np.arange(32 * 40 + 1, dtype=np.uint16), 32)
    hi = rho.web_split(w.n_windows, 32)
    starts = lambda: [w.get(w.step_windows(s, 4, 7, hi), "cpu").x[:, 0] // 32 for s in range(2 * (hi // 4))]
    first, second = starts(), starts()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # a function of (seed, step) alone
    epoch = torch.cat(first[:hi // 4]).tolist()
    assert len(set(epoch)) == len(epoch) == hi // 4 * 4  # one epoch: every window at most once
    assert max(torch.cat(first).tolist()) < hi  # web validation windows are never trained on

def record_files(data):
    """meta.json's "files" as prepare.py records them, {name: {"bytes", "sha256"}} of every file but meta.json (a
    no-op where prepare.py recorded them)."""
    meta = json.loads((data / "meta.json").read_text())
    meta.setdefault("files", {p.name: {"bytes": p.stat().st_size, "sha256": prepare.file_sha256(p)}
                              for p in sorted(data.iterdir()) if p.name != "meta.json"})
    (data / "meta.json").write_text(json.dumps(meta, indent=2))

def test_error_meta_json_invalid_or_missing_a_key(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    meta = json.loads((data / "meta.json").read_text())
    for text, msg in (((data / "meta.json").read_text()[:100], r"not valid JSON \(.*line \d+ column \d+"),
                      (json.dumps({k: v for k, v in meta.items() if k != "dtype"}), r"no key 'dtype'"),
                      (json.dumps([1]), r"no key 'encoding'")):
        (data / "meta.json").write_text(text)
        with pytest.raises(SystemExit, match=rf"^error: {data / 'meta.json'}: {msg}.*: run prepare.py again$") as e:
            rho.load_meta(str(data))
        assert "\n" not in str(e.value)
    (data / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    with pytest.raises(SystemExit, match=r"meta.json: no key 'files': not written by prepare.py: run prepare.py "
                                         r"again$"):
        run(demo, tmp_path, "--clm", "--steps", "1", "--data", str(data))

def test_error_token_file_cut_or_changed(demo, tmp_path, monkeypatch):
    """Every token file read is checked against meta.json: its size (a file cut at any byte), its sha256 (hashed up to
    HASH_MAX); --resume of a cut copy of the data is refused too."""
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    good = (data / "web.bin").read_bytes()
    meta = rho.load_meta(str(data))
    for cut in (len(good) - 1, len(good) // 2):  # an odd byte: half a token; half the file: half the data
        (data / "web.bin").write_bytes(good[:cut])
        with pytest.raises(SystemExit, match=rf"^error: .*web.bin: {cut:,} bytes, but prepare.py wrote {len(good):,} "
                                             r"\(cut short or replaced\): run prepare.py again$"):
            rho.token_windows(str(data), "web.bin", meta, 32)
    (data / "web.bin").write_bytes(good[:-2] + bytes([good[-2] ^ 1, good[-1]]))  # one token changed, same size
    with pytest.raises(SystemExit, match=r"web.bin: its content is not what prepare.py wrote \(sha256 differs\)"):
        rho.token_windows(str(data), "web.bin", meta, 32)
    monkeypatch.setattr(prepare, "HASH_MAX", len(good) - 1)  # above it: the size alone is checked
    assert rho.token_windows(str(data), "web.bin", meta, 32).n_windows == (len(good) // 2 - 1) // 32
    monkeypatch.undo()
    (data / "web.bin").write_bytes(good)
    run(demo, tmp_path, "--clm", "--steps", "2", "--eval_every", "1", "--data", str(data))
    (data / "web.bin").write_bytes(good[:len(good) // 2])
    with pytest.raises(SystemExit, match=r"web.bin: [\d,]+ bytes, but prepare.py wrote"):
        run(demo, tmp_path, "--clm", "--steps", "2", "--eval_every", "1", "--data", str(data), "--resume")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**{k: v for k, v in meta.items() if k != "files"},
                                                "tokens": {**meta["tokens"], "web": len(good) // 4}}))
    record_files(data)  # the cut copy with a meta.json that records it: other data, by its fingerprint
    with pytest.raises(SystemExit, match=r"--resume: .* is not the data that .*ckpt.pt was trained on"):
        run(demo, tmp_path, "--clm", "--steps", "2", "--eval_every", "1", "--data", str(data), "--resume")

# -----------------------------------------------------------------------------
# the SLM loss against a hand-written, token-by-token reference of Rho-1's equation

def reference_slm(logits, targets, ref, k, scope):
    """Rho-1's Eq. 2 written out token by token: rank by excess loss, lower index first on ties,
    keep ceil(k * n_valid), average -log p over the kept tokens."""
    B, T, V = logits.shape
    logp = logits.log_softmax(-1)
    loss = {(b, t): -logp[b, t, targets[b, t]] for b in range(B) for t in range(T) if targets[b, t] != rho.IGNORE}
    groups = ([[(b, t) for b in range(B) for t in range(T)]] if scope == "batch"
              else [[(b, t) for t in range(T)] for b in range(B)])
    chosen = []
    for g in groups:
        valid = [bt for bt in g if bt in loss]
        n = math.ceil(k * len(valid) - 1e-9)
        chosen += sorted(valid, key=lambda bt: (-(loss[bt].item() - ref[bt][0].item()), g.index(bt)))[:n]
    return sum(loss[bt] for bt in chosen) / len(chosen), set(chosen)

@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("k", [0.1, 0.35, 0.6, 1.0])
def test_slm_loss_matches_reference(scope, k):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 2] = targets[2, 5] = targets[1, 0] = rho.IGNORE
    ref = ref_of(B, T, generator=g, scale=3)
    loss, tok, sel = rho.slm_loss(logits, targets, ref, k, scope)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref_loss, ref_sel = reference_slm(logits, targets, ref, k, scope)
    ref_loss.backward()
    assert {tuple(i) for i in sel.nonzero().tolist()} == ref_sel
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_topk_counts_ignored_and_ties(scope):
    valid = torch.ones(4, 10, dtype=torch.bool)
    valid[1, 3:] = False  # a mostly padded row
    valid[2, ::2] = False
    score = torch.zeros(4, 10)  # all tied
    score[3, 9] = 5.0
    for k in [0.01, 0.25, 0.6, 0.999, 1.0]:
        sel = rho.select_topk(score, valid, k, scope)
        assert not (sel & ~valid).any(), "an ignored target was selected"
        if scope == "batch":
            assert sel.sum() == math.ceil(round(k * valid.sum().item(), 6))
        else:
            assert sel.sum(1).tolist() == [math.ceil(round(k * n, 6)) for n in valid.sum(1).tolist()]
        assert torch.equal(sel, rho.select_topk(score, valid, k, scope))
    # ties: lower index wins (after the one strictly larger score)
    sel = rho.select_topk(score, valid, 0.1, "batch")
    idx = sel.flatten().nonzero().flatten().tolist()
    assert idx == [0, 1, 39]  # ceil(0.1 * 28 valid) = 3: the top score, then indices 0 and 1

def test_topk_never_selects_ignored_even_with_extreme_scores():
    score = torch.tensor([[float("-inf"), -1e38, 5.0, float("inf")]])
    valid = torch.tensor([[True, True, False, False]])
    sel = rho.select_topk(score, valid, 1.0)
    assert sel.tolist() == [[True, True, False, False]]

def test_n_select_rounding():
    assert rho.n_select(0.6, 10) == 6 and rho.n_select(0.6, 11) == 7 and rho.n_select(1.0, 7) == 7
    assert rho.n_select(0.001, 10) == 1

def test_tiny_k_selects_one_token_and_nan_scores_never():
    """A k so small that ceil(k * n) rounds to 0 still selects one valid token (a finite loss, not 0/0); a NaN score
    (a reference loss that was never computed) is never selected, even when it would sort first."""
    g = torch.Generator().manual_seed(0)
    logits, y, ref = torch.randn(2, 8, 5, generator=g), torch.randint(0, 5, (2, 8), generator=g), ref_of(2, 8)
    for scope in ("batch", "sequence"):
        loss, _, sel = rho.slm_loss(logits, y, ref, 1e-12, scope)
        assert torch.isfinite(loss) and sel.sum().item() == (1 if scope == "batch" else 2)
    score = torch.tensor([[float("nan"), 1.0, float("nan"), 0.5]])
    assert rho.select_topk(score, torch.ones(1, 4, dtype=torch.bool), 0.5).tolist() == [[False, True, False, False]]
    assert rho.select_topk(score, torch.ones(1, 4, dtype=torch.bool), 1.0 - 1e-9).sum() == 2  # of the 2 non-NaN
    ref[0, 3, 0] = float("nan")  # excess, ref and ref_entropy: the token with no reference loss is never chosen
    for select in ("excess", "ref", "ref_entropy"):
        assert not rho.select_tokens(torch.zeros(2, 8), y, ref, 0.99, select=select)[0, 3]

def test_k1_equals_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 13, generator=g).requires_grad_()
    targets = torch.randint(0, 13, (2, 9), generator=g)
    targets[1, -3:] = rho.IGNORE
    a, _, sel = rho.slm_loss(logits, targets, ref_of(2, 9, generator=g), 1.0)
    ga, = torch.autograd.grad(a, logits)
    b = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=rho.IGNORE)
    gb, = torch.autograd.grad(b, logits)
    assert torch.equal(sel, targets != rho.IGNORE)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)

def test_random_select_is_seeded_and_uniform():
    logits, targets, ref = torch.zeros(4, 50, 5), torch.zeros(4, 50, dtype=torch.long), torch.zeros(4, 50, 2)
    pick = lambda seed: rho.slm_loss(logits, targets, ref, 0.3, select="random",
                                     gen=torch.Generator().manual_seed(seed))[2]
    assert torch.equal(pick(0), pick(0)) and not torch.equal(pick(0), pick(1))
    assert pick(0).sum() == 60

def test_selection_rules():
    """Every --select against selections worked out by hand, in the paper's Table 3 and App. H forms."""
    loss = torch.tensor([[3.0, 1.0, 2.0, 5.0], [0.5, 4.0, 4.0, 0.1], [2.0, 2.0, 2.0, 2.0]])
    ref_loss = torch.tensor([[1.0, 0.2, 2.5, 4.0], [0.4, 0.1, 3.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    entropy = torch.tensor([[0.5, 3.0, 0.1, 2.0], [1.0, 0.2, 4.0, 0.0], [0.3, 2.5, 0.4, 0.6]])
    ref = torch.stack([ref_loss, entropy], -1)
    y = torch.zeros(3, 4, dtype=torch.long)
    y[1, 3] = rho.IGNORE
    sel = lambda select, k: rho.select_tokens(loss, y, ref, k, select=select).nonzero().tolist()
    assert sel("ref", 3 / 11) == [[2, 0], [2, 1], [2, 2]]  # lowest reference loss; the ignored (1, 3) never, though 0.0
    assert sel("train", 3 / 11) == [[0, 3], [1, 1], [1, 2]]  # highest training loss
    assert sel("excess", 3 / 11) == [[0, 0], [1, 1], [2, 0]]  # excess 2.0, 3.9, 2.0: ties by index
    assert sel("entropy", 3 / 11) == [[0, 2], [1, 1], [2, 0]]  # lowest entropy: 0.1, 0.2, 0.3
    # ref_entropy: places by reference loss (0 = lowest) and by entropy; a token's score is the worse of the two:
    #   (2,0): 0 and 2 -> 2; (2,1): 1 and 9 -> 9; (2,2): 2 and 3 -> 3; (1,1): 4 and 1 -> 4; (0,0): 7 and 4 -> 7
    assert sel("ref_entropy", 3 / 11) == [[1, 1], [2, 0], [2, 2]]  # the three best of those: 2, 3, 4
    assert sel("ref_entropy", 1 / 11) == [[2, 0]]
    # sample (RHO-LOSS): mean excess per sequence is 0.825, 1.667, -0.25 -> the top ceil(k * 3) whole sequences
    assert sel("sample", 0.34) == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2]]
    assert sel("sample", 0.2) == [[1, 0], [1, 1], [1, 2]]

def test_reference_model_gets_no_gradient():
    torch.manual_seed(0)
    cfg = rho.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)
    ref_model, model = rho.GPT(cfg), rho.GPT(cfg)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    ref_loss = rho.token_loss(ref_model.lm_head(ref_model(x)), y)[..., None].expand(2, 16, 2)  # graph kept
    loss, _, _ = rho.slm_loss(model.lm_head(model(x)), y, ref_loss, 0.5)
    loss.backward()
    assert all(p.grad is None for p in ref_model.parameters())
    assert all(p.grad is not None for p in model.parameters())

# -----------------------------------------------------------------------------
# the fused head against slm_loss on full logits; its chunk kernels against float64

def fused_case(B=3, T=10, C=8, V=37, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(V, C, generator=g).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3] = y[2, 0] = y[2, 1] = y[1, -1] = rho.IGNORE
    r = ref_of(B, T, generator=g)
    with torch.no_grad():  # ties: rows 1 and 2 of sequence 0 are identical tokens with identical contexts
        h[0, 2] = h[0, 1]
    y[0, 2], r[0, 2] = y[0, 1], r[0, 1]
    return h, w, y.to(device), r.to(device)

def assert_fused_equals_plain(h, w, y, r, k, scope, rows, tol, monkeypatch):
    monkeypatch.setattr(rho, "chunk_rows", lambda V, device: rows)  # several chunks, the last one partial
    a, la, sa = rho.slm_loss(h.float() @ w.float().t(), y, r, k, scope)
    gh, gw = torch.autograd.grad(a, (h, w))
    b, lb, sb = fused(h, w, y, r, k, scope)
    fh, fw = torch.autograd.grad(b, (h, w))
    assert torch.equal(sa, sb)
    if scope == "batch":
        assert sb.sum() == rho.n_select(k, int((y != rho.IGNORE).sum()))
    for x, ref in [(b, a), (lb, la), (fh, gh), (fw, gw)]:
        torch.testing.assert_close(x.float(), ref.float(), **tol)

@pytest.mark.parametrize("rows", [4, 7, 1024])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("k", [0.01, 0.35, 0.6, 1.0])
def test_fused_head_equals_plain_slm_loss(k, scope, rows, monkeypatch):
    """k = 1 is CLM's one-pass head (gradients in the forward); k < 1 the SLM head (backward on the selected rows)."""
    assert_fused_equals_plain(*fused_case(), k, scope, rows, dict(rtol=1e-5, atol=1e-6), monkeypatch)

def test_clm_head_equals_torch_cross_entropy_and_native_op():
    h, w, y, _ = fused_case(V=131)
    a = fused(h, w, y, None, 1.0)[0]
    ga = torch.autograd.grad(a, (h, w))
    flat = lambda t: t.reshape(-1, t.shape[-1])
    refs = [lambda: F.cross_entropy(flat(h) @ w.t(), y.flatten(), ignore_index=rho.IGNORE)]
    if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13: the native chunked op
        refs.append(lambda: F.linear_cross_entropy(flat(h), w, y.flatten(), ignore_index=rho.IGNORE,
                                                   options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8)))
    for ref in refs:
        b = ref()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for x, x_ref in zip(ga, torch.autograd.grad(b, (h, w))):
            torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-6)

def test_fused_head_gradient_rows_are_zero_outside_selection():
    h, w, y, r = fused_case()
    loss, _, sel = fused(h, w, y, r, 0.3)
    dh, = torch.autograd.grad(loss, h)
    assert (dh[~sel] == 0).all() and (dh[sel].abs().sum(-1) > 0).all()

@pytest.mark.parametrize("k", [0.35, 1.0])
def test_fused_head_gradcheck_retained_graph_and_no_double_backward(k):
    """k = 1 (FullHeadLoss) and k < 1 (SelectedHeadLoss, on a fixed I_k) against finite differences of float64
    inputs (the head's logits are fp32 whatever the inputs: fp32-sized steps and tolerances); a second backward of a
    retained graph adds the same gradient again; create_graph (a double backward) raises instead of giving zero."""
    h, w, y, r = fused_case(B=3, T=4, C=3, V=11, dtype=torch.float64)
    sel = fused(h, w, y, r, k)[2]
    loss = lambda h, w: rho.fused_clm_loss(h, w, y, int(sel.sum()))[0] if k == 1 else \
        rho.selected_loss(h, w, y, rho.head_losses(h, w, y), sel, int(sel.sum()))
    assert torch.autograd.gradcheck(loss, (h, w), eps=1e-2, atol=1e-4, rtol=1e-3)
    out = loss(h, w)
    out.backward(retain_graph=True)
    once = h.grad.clone(), w.grad.clone()
    out.backward()
    for twice, g in zip((h.grad, w.grad), once):
        assert g.abs().sum() > 0 and torch.equal(twice, 2 * g)
    with pytest.raises(RuntimeError, match="no second derivative"):  # e.g. a gradient penalty: dh.pow(2).sum()
        torch.autograd.grad(loss(h, w), h, create_graph=True)

def chunk_case(C, V, kind, seed=0):
    """A (C, V) logits chunk (a view, for "strided"), with ignored rows and one hard property per kind."""
    g = torch.Generator().manual_seed(seed)
    pad = 13 if kind == "strided" else 0
    x = (torch.randn(C, V + 2 * pad, generator=g) * 3)[:, pad:pad + V]
    if kind == "large":  # the running max grows in every block: tests the online rescaling
        x[0::2] = torch.linspace(-100.0, 100.0, V)
        x[1::2] = torch.linspace(100.0, -100.0, V)
    y = torch.randint(0, V, (C,), generator=g)
    y[1::3] = rho.IGNORE
    if kind == "ties":
        x[0] = 7.5
    return x, y

def chunk_ref64(x, y, scale):
    """loss, lse, entropy and the gradient (softmax - onehot) * scale of a chunk, in float64."""
    logp = torch.log_softmax(x.double(), 1)
    valid = y != rho.IGNORE
    loss = torch.where(valid, -logp.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
    onehot = torch.zeros_like(logp)
    onehot[valid.nonzero().squeeze(1), y[valid]] = 1.0
    entropy = -(logp.exp() * logp).sum(1)
    return loss, (x.double() - logp)[:, 0], entropy, (logp.exp() - onehot) * scale * valid[:, None]

CHUNK_OPS = {"torch": lambda: rho.TORCH_OPS, "triton": lambda: rho.TRITON_OPS}

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["plain", "ties", "large", "strided"])
@pytest.mark.parametrize("C,V", [(5, 7), (17, 130)])
def test_chunk_kernels_equal_float64_reference(C, V, kind, backend):
    """Each mode of both backends' per-chunk math against float64: loss, lse and entropy (SLM's forward, scoring),
    loss and gradient in one call (CLM), the gradient given the lse (SLM's backward); the gradient into a buffer of its
    own (the GEMMs' bf16 one) or into the chunk itself (an fp32 head)."""
    x, y = chunk_case(C, V, kind)
    block = {"block_v": 4 if V < 32 else 32} if backend == "triton" else {}  # several blocks, the last one partial
    ops = CHUNK_OPS[backend]()
    loss, lse, ent = ops.loss(x.clone(), y, entropy=True, **block)  # the torch version overwrites its chunk
    loss64, lse64, ent64, grad64 = chunk_ref64(x, y, 1 / 7)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=2e-6 * max(1.0, x.abs().max().item()))
    torch.testing.assert_close(ent.double(), ent64, rtol=1e-5, atol=1e-5)
    loss1, lse1, none = ops.loss(x.clone(), y, **block)
    assert torch.equal(lse1, lse) and torch.equal(loss1, loss) and none is None  # the entropy changes nothing else
    for in_place in (False, True):
        x2, x3 = x.clone(), x.clone()
        g2, g3 = (x2, x3) if in_place else (torch.full((C, V + 3), float("nan"))[:, :V] for _ in range(2))  # padded
        assert torch.equal(ops.loss_grad(x2, y, 1 / 7, g2, **block), loss)
        ops.grad(x3, y, lse, 1 / 7, g3, **block)
        for g in (g2, g3):
            torch.testing.assert_close(g.double(), grad64, rtol=1e-5, atol=1e-6)

@needs_triton
@pytest.mark.parametrize("k", [0.01, 0.6, 1.0])
def test_fused_head_with_triton_kernels_equals_plain(k, monkeypatch):
    monkeypatch.setattr(rho, "chunk_ops", lambda device: rho.TRITON_OPS)
    assert_fused_equals_plain(*fused_case(), k, "batch", 7, dict(rtol=1e-5, atol=1e-6), monkeypatch)

@needs_cuda
@needs_triton
@pytest.mark.parametrize("k", [0.01, 0.6, 1.0])
def test_fused_head_on_gpu_bf16(k, monkeypatch):
    h, w, y, r = fused_case(B=4, T=64, C=64, V=1000, device="cuda", dtype=torch.bfloat16)
    assert_fused_equals_plain(h, w, y, r, k, "batch", 64, dict(rtol=2e-2, atol=2e-2), monkeypatch)

# -----------------------------------------------------------------------------
# reference scoring: resumed and split scoring against one uninterrupted pass

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    prepare.main(["--out", str(d / "data"), "--web_tokens", "30000"])
    problems = json.loads((d / "data" / "eval.json").read_text())
    (d / "data" / "eval.json").write_text(json.dumps(problems[:48]))  # a final evaluation answers all: kept quick
    meta = json.loads((d / "data" / "meta.json").read_text())
    meta["files"]["eval.json"] = {"bytes": (d / "data" / "eval.json").stat().st_size,
                                  "sha256": prepare.file_sha256(d / "data" / "eval.json")}
    (d / "data" / "meta.json").write_text(json.dumps(meta, indent=2))
    return d

def run(demo, out, *args):
    return rho.main(["--data", str(demo / "data"), "--out", str(out), *TINY, *args])

def score(demo, out, *args):
    """--score reads no shape or training flags: it refuses them."""
    return rho.main(["--data", str(demo / "data"), "--out", str(out), "--score", *args])

def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

def recording_selection(monkeypatch=None):
    """Wraps rho.train_step to keep each step's selected tokens of this process (its rows, in order)."""
    masks, real = [], rho.train_step

    def train_step(*a):
        loss, sels = real(*a)
        masks.append(torch.cat(sels).clone())
        return loss, sels
    if monkeypatch:
        monkeypatch.setattr(rho, "train_step", train_step)
    else:
        rho.train_step = train_step
    return masks

def recording_grads(monkeypatch=None):
    """Wraps rho.train_step to keep each step's whole gradient before clipping, flat: AdamW and the clip ignore a
    constant factor on it (an average that sums, pytorch #162338), this does not. Under FSDP every process gathers."""
    grads, real = [], rho.train_step

    def train_step(*a):
        out = real(*a)
        whole = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in a[0].parameters()]
        grads.append(torch.cat([g.flatten() for g in whole]).clone())
        return out
    if monkeypatch:
        monkeypatch.setattr(rho, "train_step", train_step)
    else:
        rho.train_step = train_step
    return grads

def torchrun_child(rank, world, port, argv, record, kill_at=None):
    """One of `world` processes, as torchrun starts it; killed (KeyboardInterrupt: one line, then exit) as step kill_at
    begins."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    importlib.reload(rho)  # rho reads the environment at import: torchrun sets it before Python starts, spawn after
    if kill_at is not None:
        real = rho.lr_at
        rho.lr_at = lambda s, cfg: (_ for _ in ()).throw(KeyboardInterrupt) if s == kill_at else real(s, cfg)
    masks, grads = recording_selection(), recording_grads()
    try:
        rho.main(argv)
    except SystemExit:
        if kill_at is None:
            raise
        return
    torch.save(masks, f"{record}.{rank}.pt")
    torch.save(grads, f"{record}.{rank}.grads.pt")

def torchrun(world, argv, record):
    """rho.main(argv) in `world` CPU processes on the gloo backend; returns each step's selection, all ranks' rows."""
    torch.multiprocessing.spawn(torchrun_child, args=(world, free_port(), argv, record), nprocs=world)
    per_rank = [torch.load(f"{record}.{r}.pt") for r in range(world)]
    return [torch.cat(steps) for steps in zip(*per_rank)]

# c_attn's key bias has a zero true gradient (softmax ignores a constant added to a row's logits): Adam's first steps
# turn its summation-order noise into updates that grow with the LR, so these 3-step runs use a small one
SPLIT_LR = "3e-4"

@pytest.fixture(scope="module")
def one_process(demo, tmp_path_factory):
    """Reference scores, then a 3-step SLM run (and its random control) in one process, whole steps."""
    out = tmp_path_factory.mktemp("one")
    run(demo, out, "--ref", "--steps", "2", "--eval_every", "2")
    runs = {}
    for select in ("excess", "random"):
        mp = pytest.MonkeyPatch()
        masks, grads = recording_selection(mp), recording_grads(mp)
        run(demo, out, "--slm", "--select", select, "--batch_size", "8", "--steps", "3", "--eval_every", "3",
            "--name", select, "--lr", SPLIT_LR)
        mp.undo()
        runs[select], runs[f"{select} grads"] = masks, grads
    return out, runs

def test_scoring_resumes_after_a_kill_and_splits_across_processes(demo, one_process, tmp_path, monkeypatch):
    out, _ = one_process
    os.makedirs(tmp_path / "ref")
    os.symlink(out / "ref" / "ckpt.pt", tmp_path / "ref" / "ckpt.pt")
    argv = ["--data", str(demo / "data"), "--out", str(tmp_path), "--score", "--score_batch", "16"]
    rho.main(argv)  # one process, in one go; the same blocks as below (on some CPUs a GEMM's bits depend on its rows)
    whole = np.fromfile(tmp_path / "ref" / "ref_scores.bin", np.float32)
    os.remove(tmp_path / "ref" / "ref_scores.bin")
    real, calls = rho.model_token_loss, []

    def killed_after_5_blocks(*a, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(rho, "model_token_loss", killed_after_5_blocks)
    monkeypatch.setattr(time, "time", iter(range(0, 10**6, 31)).__next__)  # every block is synced to disk
    with pytest.raises(SystemExit, match=r"^error: ref: stopped while scoring: run the same command to finish it$"):
        rho.main(argv)
    assert not (tmp_path / "ref" / "ref_scores.bin").exists()
    assert np.fromfile(tmp_path / "ref" / "ref_scores.bin.done", np.uint8).sum() == 5
    with pytest.raises(SystemExit, match="scoring was interrupted"):
        rho.load_ref_scores(rho.RunConfig(out=str(tmp_path)), rho.load_meta(str(demo / "data")), 32)
    calls.clear()
    monkeypatch.undo()
    rho.main(argv)  # resumes: only the blocks not marked done
    assert np.array_equal(np.fromfile(tmp_path / "ref" / "ref_scores.bin", np.float32), whole, equal_nan=True)
    assert not (tmp_path / "ref" / "ref_scores.bin.partial").exists()
    os.remove(tmp_path / "ref" / "ref_scores.bin")
    torchrun(2, argv, tmp_path / "sel")  # two processes, blocks round-robin, written in place
    assert np.array_equal(np.fromfile(tmp_path / "ref" / "ref_scores.bin", np.float32), whole, equal_nan=True)
    assert json.loads((tmp_path / "ref" / "ref_scores.bin.json").read_text())["processes"] == 2

def test_float16_and_loss_only_scores_are_the_float32_ones_rounded_and_train(demo, one_process, tmp_path):
    """--score_dtype float16: 4 bytes a web token, each the float32 score rounded; an SLM run reads them. --scores
    loss: L_RM alone, 2 bytes a token; excess selects the same tokens from it; a rule that reads H_RM is refused."""
    out, _ = one_process
    run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2", "--score_dtype", "float16")
    half = np.fromfile(tmp_path / "ref" / "ref_scores.bin", np.float16)
    full = np.fromfile(out / "ref" / "ref_scores.bin", np.float32)
    assert half.nbytes * 2 == full.nbytes and np.array_equal(half, full.astype(np.float16), equal_nan=True)
    slm = ("--slm", "--steps", "2", "--eval_every", "1", "--eval_problems", "0")
    m = run(demo, tmp_path, *slm)
    assert m["tokens_trained"] == 2 * math.ceil(0.6 * 4 * 32)
    score(demo, tmp_path, "--scores", "loss", "--score_dtype", "float16")  # the same model: its file is replaced
    loss_only = np.fromfile(tmp_path / "ref" / "ref_scores.bin", np.float16)
    assert np.array_equal(loss_only, half[0::2], equal_nan=True)
    assert run(demo, tmp_path, *slm, "--name", "loss-only")["losses"] == m["losses"]
    with pytest.raises(SystemExit, match=r"^error: .*ref_scores.bin: holds L_RM alone \(scored with --scores loss\); "
                       r"--select entropy reads H_RM too: re-run `python rho.py --score --name ref --data .*`$"):
        run(demo, tmp_path, *slm, "--select", "entropy")

# -----------------------------------------------------------------------------
# evaluation: batched generation against one prompt at a time

def test_batched_generation_equals_one_by_one():
    torch.manual_seed(0)
    model = rho.GPT(rho.GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 1]]
    batched = rho.generate(model, prompts, 6)
    assert batched == [rho.generate(model, [p], 6)[0] for p in prompts]
    with torch.no_grad():  # and the first generated token is the plain forward's argmax
        assert batched[0][0] == model.lm_head(model(torch.tensor([prompts[0]])))[0, -1].argmax().item()
    for stop in {t for row in batched for t in row}:  # ends once every row has produced stop; the same tokens till then
        early = rho.generate(model, prompts, 6, lambda row: stop in row)
        ends = [row.index(stop) + 1 if stop in row else 6 for row in batched]
        assert len({len(r) for r in early}) == 1 and len(early[0]) == max(ends)
        assert all(e[:n] == b[:n] for e, b, n in zip(early, batched, ends))

def test_answer_forms_of_the_data_and_of_generated_text(monkeypatch):
    """prepare.final_answer reads GSM8K's '#### N' and MetaMathQA's 'The answer is: N' as normalised numbers, both for
    eval.json and in the model's text (answers); without problems the accuracy is None, not 0."""
    forms = {"#### 72": "72", "#### 1,000": "1000", "#### -3": "-3", "#### 12.5": "12.5", "#### 12.50": "12.5",
             "#### -0.5": "-0.5", "#### .5": "0.5", "####   007\n": "7", "#### -0": "0", "#### 7 apples": "7",
             "so 5 + 7 = 12.\nThe answer is: 12": "12", "The answer is: 12.": "12", "#### 7\nQuestion: #### 9": "7",
             "#### 25%": None, "The answer is: 2\\sqrt{3}": None, "#### 7x": None, "The answer is 12": None, "12": None}
    assert {t: prepare.final_answer(t) for t in forms} == forms
    gsm8k = {"question": "Q?", "answer": "3 * 4 = 12\n#### 12"}
    metamath = {"query": "Q?", "response": "The answer is: 12"}
    problem = {"prompt": "Question: Q?\nAnswer:", "answer": "12"}
    got = [prepare.eval_problem(gsm8k), prepare.eval_problem(metamath)]  # with the reference text after the prompt
    assert [{k: v for k, v in p.items() if k != "solution"} for p in got] == [problem] * 2
    assert [p["solution"] for p in got] == [" 3 * 4 = 12\n#### 12", " The answer is: 12"]
    assert prepare.eval_problem({"question": "Q?", "answer": "12"}) is None
    enc = prepare.get_encoding("bytes")
    out = [" 10 + 2.5 = 12.50\n#### 12.50\n", " The answer is: 1,000", " #### .5", " #### 12"]  # generated
    monkeypatch.setattr(rho, "generate", lambda model, prompts, *_: [enc.encode_ordinary(s) + [enc.eot_token]
                                                                     for s in out])
    problems = [{"prompt": "Q", "answer": a} for a in ("12.5", "1000", "0.5", "12.5")]
    assert rho.answers(None, problems, enc, 48) == [1, 1, 1, 0] and rho.answers(None, [], enc, 48) == []
    assert rho.accuracy([1, 1, 1, 0]) == 0.75 and rho.accuracy([]) is None

def test_a_row_ends_once_its_answer_is_settled():
    """Decoding of a row stops once a line has ended after its first answer: no later token can change what
    final_answer reads. Before that line ends, the number can still grow ('#### 7' -> '#### 72', '#### 7.' ->
    '#### 7.5')."""
    settled = ["#### 7\n", "#### 7.\n", "#### 7 apples\nQuestion:", "The answer is: 12\n", "#### 7\nQuestion: #### 9"]
    open_ = ["#### 7", "#### 7.", "#### 7 apples", "5 + 7 = 12\n", "#### x\n", "#### 1,0"]
    assert all(rho.answer_settled(t) for t in settled) and not any(rho.answer_settled(t) for t in open_)
    for t in settled:  # and whatever follows, the answer read is the one read when decoding stopped
        assert all(prepare.final_answer(t + more) == prepare.final_answer(t) for more in ("5", ".5", "\n#### 3", ""))

def test_eval_set_of_metamath_records_and_an_empty_one_refused(tmp_path, capsys):
    """A --val of MetaMathQA records gives eval problems; a --val without answers is said by prepare.py, refused by
    rho.py at start, and with --eval_problems 0 trained on without accuracy (None in metrics.json, '-' in the table)."""
    hq, val = tmp_path / "hq.txt", tmp_path / "val.jsonl"
    hq.write_text("\n\n".join(f"document {i} " * 20 for i in range(60)))
    val.write_text(json.dumps({"query": "What is 5 + 7?", "response": "5 + 7 = 12\nThe answer is: 12"}) + "\n"
                   + json.dumps({"query": "Name a colour.", "response": "Blue."}) + "\n")
    prepare.main(["--hq", str(hq), "--web", str(hq), "--val", str(val), "--out", str(tmp_path / "mm")])
    assert json.loads((tmp_path / "mm" / "eval.json").read_text()) == [{"prompt": "Question: What is 5 + 7?\nAnswer:",
                                                                        "answer": "12", "solution":
                                                                        " 5 + 7 = 12\nThe answer is: 12"}]
    assert ('prepare: eval: 1 problems (the first 500 at most) of 2 validation documents; 1 have no final answer '
            '("#### N" or "The answer is: N")\n') in capsys.readouterr().out
    prepare.main(["--hq", str(hq), "--web", str(hq), "--out", str(tmp_path / "none")])  # plain text: no answers
    assert (f'prepare: warning: {hq}: no validation record has a final answer ("#### N" as GSM8K, "The answer is: N" '
            f'as MetaMathQA), so eval.json is empty: rho.py then needs --eval_problems 0 (no accuracy)\n'
            ) in capsys.readouterr().out
    args = ["--ref", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *TINY, "--steps", "2"]
    with pytest.raises(SystemExit, match=r"^error: .*eval.json: no eval problems \(prepare.py found no \"#### N\" "
                                         r"or \"The answer is: N\" answer in --val\): .*or pass --eval_problems 0 to "
                                         r"train without measuring accuracy$"):
        rho.main(args)
    metrics = rho.main([*args, "--eval_problems", "0"])
    assert metrics["final"]["accuracy"] is None and {h["accuracy"] for h in metrics["history"]} == {None}
    capsys.readouterr()
    report.main([str(tmp_path / "out")])
    assert re.search(r"\nref +\d\.\d{4} +\d\.\d{4} +- +\d", capsys.readouterr().out)

def test_wilson_interval():
    lo, hi = report.wilson(0.5, 200)
    assert abs(lo - 0.4314) < 1e-3 and abs(hi - 0.5686) < 1e-3  # the textbook values
    assert report.wilson(0.0, 200)[0] == 0.0 and 0.0 < report.wilson(0.0, 200)[1] < 0.02
    assert report.wilson(1.0, 10)[1] == 1.0

# -----------------------------------------------------------------------------
# training: end to end; a fixed seed bitwise; resume against an uninterrupted run; many processes against one

def test_end_to_end_ref_slm_compare(demo, tmp_path, capsys):
    run(demo, tmp_path, "--ref", "--steps", "4", "--eval_every", "2")
    scores = np.fromfile(tmp_path / "ref" / "ref_scores.bin", np.float32).reshape(-1, 2)
    meta = json.loads((demo / "data" / "meta.json").read_text())
    assert len(scores) == meta["tokens"]["web"] and np.isnan(scores[0]).all() and np.isfinite(scores[1:32]).all()
    assert (scores[1:32, 1] > 0).all()  # the reference model's entropy, beside its loss
    run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2")
    run(demo, tmp_path, "--slm", "--k", "0.6", "--steps", "4", "--eval_every", "2")
    m = json.loads((tmp_path / "slm-k0.6" / "metrics.json").read_text())
    assert m["run"] == "slm-k0.6" and m["k"] == 0.6 and m["steps"] == 4 and len(m["history"]) == 2
    assert m["tokens_seen"] == 4 * 4 * 32 and m["tokens_trained"] == 4 * math.ceil(0.6 * 4 * 32)
    problems = json.loads((demo / "data" / "eval.json").read_text())
    assert set(m["final"]) == {"val_loss_hq", "val_loss_web", "accuracy", "correct"} and m["eval_problems"] == 4
    assert len(m["final"]["correct"]) == len(problems) > 4 and set(m["final"]["correct"]) <= {0, 1}  # all of them
    assert m["final"]["accuracy"] == round(sum(m["final"]["correct"]) / len(problems), 4)
    assert all("correct" not in h for h in m["history"])  # the curve: the first --eval_problems, at every evaluation
    assert m["eval_s"] == round(sum(h["eval_s"] for h in m["history"]), 2) > 0  # what the evaluations cost
    assert "timestamp" in m["noise_in_selected"] and "all" in m["noise_share_corpus"]
    assert "score_s" in json.loads((tmp_path / "ref" / "metrics.json").read_text())
    capsys.readouterr()
    report.main([str(tmp_path)])  # the table, and the page
    table = capsys.readouterr().out
    assert "slm-k0.6" in table and "clm" in table and "to CLM loss" in table and "to CLM acc" in table
    print(table)
    assert "\none seed: these runs" in table and "McNemar p" in table and "not the method" in table

def test_compare_names_a_broken_or_unfinished_run(one_process, tmp_path, capsys):
    """A cut or key-less metrics.json: one line naming it, in report.py; a run with a checkpoint but no
    metrics.json: one line saying it is unfinished, and the table of the others. Notes compare starting weights and
    reference models by their sha256 where runs record them, else by --init_from."""
    out = tmp_path / "out"
    shutil.copytree(one_process[0], out)
    path, good = out / "excess" / "metrics.json", json.loads((out / "excess" / "metrics.json").read_text())
    for text, msg in ((path.read_text()[:200], r"not valid JSON \(.*\)"),
                      (json.dumps({k: v for k, v in good.items() if k != "final"}), "no key 'final'")):
        path.write_text(text)
        with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(path))}: {msg}: the run may be unfinished "
                                             rf"or written by another rho version: re-run it with --resume, or "
                                             rf"move {re.escape(str(path.parent))} out of {re.escape(str(out))}$"):
            report.main([str(out)])
    path.write_text(json.dumps(good))
    random_run = json.loads((out / "random" / "metrics.json").read_text())
    os.remove(out / "random" / "metrics.json")
    capsys.readouterr()
    report.main([str(out)])
    table = capsys.readouterr().out
    assert table.startswith("random: unfinished (no metrics.json; `--resume` continues it)\n")
    assert json.loads((out / "report.json").read_text())["runs"] == ["ref", "excess"]
    assert "\nexcess " in table and "note" not in table
    for a, b, note in ((dict(init_sha256="a" * 64), dict(init_sha256="a" * 64, config={**random_run["config"],
                        "init_from": "base"}), None),  # the same weights under another name
                       (dict(init_sha256="a" * 64), dict(init_sha256="b" * 64), "note: the continual-pretraining runs "
                        "started from different weights (excess: aaaaaaaaaaaa; random: bbbbbbbbbbbb): not comparable."),
                       (dict(init_sha256="a" * 64), dict(init_sha256=None, config={**random_run["config"],
                                                                      "init_from": "base"}),  # an older rho: no sha
                        "different checkpoints (--init_from) (excess: scratch; random: base)"),
                       (dict(ref_weights_sha256="c" * 64), dict(ref_weights_sha256="d" * 64), "note: the SLM runs "
                        "read the scores of different reference models (excess: cccccccccccc; random: dddddddddddd)")):
        path.write_text(json.dumps({**good, **a}))
        (out / "random" / "metrics.json").write_text(json.dumps({**random_run, **b}))
        report.main([str(out)])
        printed = capsys.readouterr().out
        assert (note in printed) if note else "note" not in printed, printed

def test_fixed_seed_is_bitwise_reproducible_across_processes(demo, tmp_path):
    """The same command in two fresh processes, from other folders: bitwise the same losses and evaluations."""
    argv = [*TINY, "--clm", "--steps", "4", "--eval_every", "2", "--data", str(demo / "data"), "--out", "out"]
    for d in ("a", "bbbbbbbbbbbbbbbbbbbb"):  # other paths, other environments
        (tmp_path / d).mkdir()
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(rho.__file__)), "X": d * 1000}
        subprocess.run([sys.executable, "-m", "rho", *argv], cwd=tmp_path / d, env=env, check=True, capture_output=True)
    a, b = (json.loads((tmp_path / d / "out" / "clm" / "metrics.json").read_text())
            for d in ("a", "bbbbbbbbbbbbbbbbbbbb"))
    assert a["losses"] == b["losses"] and len(a["losses"]) == 4 and a["env"] == b["env"]
    assert [h["val_loss_hq"] for h in a["history"]] == [h["val_loss_hq"] for h in b["history"]]
    assert a["env"]["threads"] == torch.get_num_threads() and a["env"]["processes"] == 1

def test_resume_equals_uninterrupted(demo, tmp_path, monkeypatch):
    run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2")
    args = ("--slm", "--select", "random", "--steps", "6", "--eval_every", "2")  # random: resumes the RNG too
    run(demo, tmp_path / "full", *args, "--name", "x")
    os.makedirs(tmp_path / "killed", exist_ok=True)
    os.symlink(tmp_path / "ref", tmp_path / "killed" / "ref")
    real_lr_at = rho.lr_at

    def killed_at_step_5(step, cfg):
        if step == 5:
            raise KeyboardInterrupt
        return real_lr_at(step, cfg)

    monkeypatch.setattr(rho, "lr_at", killed_at_step_5)
    with pytest.raises(SystemExit, match=r"x: stopped at step 5 of 6; .*x/ckpt.pt holds step 4: run the same command "
                                         r"with --resume to continue$"):
        run(demo, tmp_path / "killed", *args, "--name", "x")
    monkeypatch.setattr(rho, "lr_at", real_lr_at)
    assert torch.load(tmp_path / "killed" / "x" / "ckpt.pt", weights_only=True)["step"] == 4
    run(demo, tmp_path / "killed", *args, "--name", "x", "--resume")
    full, resumed = (json.loads((tmp_path / d / "x" / "metrics.json").read_text()) for d in ("full", "killed"))
    assert (full["losses"] == resumed["losses"]
            and full["history"][-1]["val_loss_hq"] == resumed["history"][-1]["val_loss_hq"])
    a = torch.load(tmp_path / "full" / "x" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "x" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    za, zb = (np.load(tmp_path / d / "x" / "tokens.npz") for d in ("full", "killed"))  # per-token records survive
    assert list(za["step"]) == [2, 4, 6] and set(za.files) == set(zb.files)
    assert all(np.array_equal(za[f], zb[f]) for f in za.files)

def test_resume_refuses_a_changed_run(demo, tmp_path, capsys):
    """--resume with a flag that defines the run changed: one line naming the flag and both values; the checkpoint is
    left as it was. Flags that change how, not what, a run computes (--micro_batch, --device, ...) may change."""
    run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2", "--name", "x")
    ckpt = (tmp_path / "x" / "ckpt.pt").read_bytes()
    for flag, value, saved in (("--lr", "0.001", "0.003"), ("--seed", "7", "1337"), ("--batch_size", "2", "4"),
                               ("--steps", "8", "4"), ("--n_layer", "2", "1")):
        with pytest.raises(SystemExit, match=rf"^error: --resume: {flag} is {value}\S* here "
                                             rf"but {saved}\S* in .*ckpt.pt"):
            run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2", "--name", "x", "--resume", flag, value)
    with pytest.raises(SystemExit, match=r"^error: --resume: this is a --slm run, but .* holds a --clm run"):
        run(demo, tmp_path, "--slm", "--select", "random", "--steps", "4", "--eval_every", "2", "--name", "x",
            "--resume")
    assert (tmp_path / "x" / "ckpt.pt").read_bytes() == ckpt
    run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2", "--name", "x", "--resume", "--micro_batch", "2")
    os.makedirs(tmp_path / "moved")
    os.rename(tmp_path / "x", tmp_path / "moved" / "y")  # a run moved to another --out and --name is the same run
    run(demo, tmp_path / "moved", "--clm", "--steps", "4", "--eval_every", "2", "--name", "y", "--resume")

@pytest.mark.parametrize("world,micro,select,shard", [(1, 2, "excess", ()), (2, 2, "excess", ()), (2, 4, "excess", ()),
                                                      (2, 2, "random", ()), (2, 4, "excess", ("--fsdp",)),
                                                      (2, 2, "excess", ("--fsdp", "--act_ckpt"))])
def test_split_steps_select_the_same_tokens_as_one_process(demo, one_process, world, micro, select, shard, tmp_path,
                                                            monkeypatch):
    """world=1, micro=2: 4 micro-batches of gradient accumulation; world=2: two gloo processes (DDP, or FSDP2 with
    the head weight sharded: pytorch #162338's silent gloo AVG bug would show here), with 2 micro-batches each
    (micro 2) or a whole share in one forward (micro 4)."""
    out, runs = one_process
    os.symlink(out / "ref", tmp_path / "ref")
    argv = ["--data", str(demo / "data"), "--out", str(tmp_path), *TINY, "--slm", "--select", select,
            "--batch_size", "8", "--steps", "3", "--eval_every", "3", "--name", select, "--micro_batch", str(micro),
            "--lr", SPLIT_LR, *shard]
    if world == 1:
        masks, grads = recording_selection(monkeypatch), recording_grads(monkeypatch)
        rho.main(argv)
    else:
        masks = torchrun(world, argv, tmp_path / "sel")
        grads = torch.load(tmp_path / "sel.0.grads.pt")  # every process holds the whole averaged gradient
    assert_same_run(out / select, tmp_path / select, runs[select], masks)
    # the gradients before clipping: a sum where an average belongs doubles them (the weights above would not show it)
    assert len(grads) == 3 and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                                   for a, b in zip(grads, runs[f"{select} grads"]))

def test_fsdp_killed_on_two_processes_resumes_on_one(demo, one_process, tmp_path):
    """An FSDP2 run on 2 gloo processes, killed after its checkpoint of step 2, resumed by 1 process: the same
    selection and losses as the uninterrupted run of one process. Its checkpoints are torch.distributed.checkpoint
    shards (ckpt.pt names their folder), resharded as they are read; a run without FSDP starts from them."""
    out, runs = one_process
    os.symlink(out / "ref", tmp_path / "ref")
    argv = ["--data", str(demo / "data"), "--out", str(tmp_path), *TINY, "--slm", "--batch_size", "8", "--steps", "3",
            "--eval_every", "1", "--eval_problems", "0", "--name", "excess", "--lr", SPLIT_LR, "--fsdp"]
    # killed as step 2 begins, after its checkpoint
    torch.multiprocessing.spawn(torchrun_child, args=(2, free_port(), argv, None, 2), nprocs=2)
    ckpt = torch.load(tmp_path / "excess" / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["model"]) == (2, "ckpt-2.dcp")
    assert [p.name for p in (tmp_path / "excess").glob("*.dcp")] == ["ckpt-2.dcp"]  # step 1's removed
    masks = torchrun(1, [*argv, "--resume"], tmp_path / "sel")
    assert torch.equal(masks[0], runs["excess"][2])
    m, want = (json.loads((d / "excess" / "metrics.json").read_text()) for d in (tmp_path, out))
    np.testing.assert_allclose(m["losses"], want["losses"], rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*(weights(d / "excess").values()
                                                                           for d in (out, tmp_path))))
    assert rho.earlier_run(str(tmp_path / "excess"), rho.RunConfig(resume=True))[-1] == "ckpt-3.dcp"
    cont = run(demo, tmp_path, "--clm", "--steps", "1", "--eval_every", "1", "--eval_problems", "0", "--name", "c",
               "--init_from", "excess")
    path = str(tmp_path / "excess" / "ckpt.pt")
    assert cont["init_sha256"] == rho.weights_sha256(rho.model_from_checkpoint(rho.load_checkpoint(path), None, path))
    with pytest.raises(SystemExit, match=r"^error: --fsdp: shards the model across torchrun's processes"):
        rho.main(argv)

def test_fsdp_reference_run_scores_with_its_shards(demo, tmp_path):
    """--ref under FSDP on 2 gloo processes: its checkpoint is shards, which each process then reads whole to score
    its blocks: the scores of the same run in one process, up to float summation order; --score of it again in one
    process gives its own scores bit for bit."""
    argv = ["--data", str(demo / "data"), *TINY, "--ref", "--steps", "2", "--eval_every", "2", "--lr", SPLIT_LR]
    rho.main([*argv, "--out", str(tmp_path / "one")])
    torchrun(2, [*argv, "--out", str(tmp_path / "two"), "--fsdp"], tmp_path / "sel")
    assert torch.load(tmp_path / "two" / "ref" / "ckpt.pt", weights_only=True)["model"] == "ckpt-2.dcp"
    one, two = (np.fromfile(tmp_path / d / "ref" / "ref_scores.bin", np.float32) for d in ("one", "two"))
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6, equal_nan=True)
    # issue 31, review 1: --score again, in one process from another folder, reads the shards beside its ckpt.pt
    for f in ("ref_scores.bin", "ref_scores.bin.json"):
        os.remove(tmp_path / "two" / "ref" / f)
    rho.main(["--data", str(demo / "data"), "--out", str(tmp_path / "two"), "--score"])
    assert np.array_equal(np.fromfile(tmp_path / "two" / "ref" / "ref_scores.bin", np.float32), two, equal_nan=True)

def assert_same_run(a, b, masks_a, masks_b):
    """The same tokens selected at every step; losses and weights equal up to float summation order."""
    assert len(masks_a) == len(masks_b) == 3 and all(torch.equal(x, y) for x, y in zip(masks_a, masks_b))
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["tokens_trained"] == mb["tokens_trained"] and ma["noise_in_selected"] == mb["noise_in_selected"]
    np.testing.assert_allclose(ma["losses"], mb["losses"], rtol=1e-5)
    wa, wb = weights(a), weights(b)
    assert all(torch.allclose(wa[n], wb[n], rtol=1e-4, atol=1e-6) for n in wa)

def weights(run):  # a run's whole weights: its ckpt.pt, or the FSDP shards it names
    path = str(run / "ckpt.pt")
    return rho.model_from_checkpoint(rho.load_checkpoint(path), None, path).state_dict()

def test_init_from_starts_from_base_weights(demo, tmp_path):
    run(demo, tmp_path, "--base", "--steps", "10", "--eval_every", "10", "--lr", "1e-2")
    base = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert base["run"] == "base" and "noise_in_selected" not in base
    for init in ("base", str(tmp_path / "base" / "ckpt.pt")):  # a run name in --out, or a path
        run(demo, tmp_path, "--clm", "--steps", "2", "--eval_every", "2", "--name", "cont", "--init_from", init,
            "--overwrite")
        cont = json.loads((tmp_path / "cont" / "metrics.json").read_text())
        assert cont["losses"][0] < base["losses"][0] - 0.1  # starts where the base ended, not from scratch

def test_demo_runs_start_from_the_base_run(demo, tmp_path, capsys):
    """On data with a base corpus, --ref, --clm and --slm start from <out>/base without a flag, and say so (shape
    flags are ignored, with a warning); without it, one line that says what to run."""
    with pytest.raises(SystemExit, match=r"base/ckpt.pt: no base model: --clm on .* starts from the base run; run "
                                         r"`python rho.py --base --data .* --out .*` first, or pass --init_from "
                                         r"scratch"):
        rho.main(["--data", str(demo / "data"), "--out", str(tmp_path), *TINY[:-2], "--clm", "--steps", "1"])
    run(demo, tmp_path, "--base", "--steps", "2", "--eval_every", "2")
    m = rho.main(["--data", str(demo / "data"), "--out", str(tmp_path), *TINY[:-2], "--clm", "--steps", "2",
                  "--eval_every", "2"])
    printed = capsys.readouterr()
    assert m["config"]["init_from"] == "base" and "clm: starting from the base run" in printed.out
    assert "warning: --n_layer --n_head --n_embd ignored: the model's shape comes from base" in printed.err

def test_reference_runs_own_their_scores(demo, tmp_path):
    """--ref --name myref scores into <out>/myref/, and --slm --ref_run myref reads them; --slm alone asks for ref."""
    run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2", "--name", "myref")
    assert (tmp_path / "myref" / "ref_scores.bin").is_file() and not (tmp_path / "ref").exists()
    with pytest.raises(SystemExit, match=r"ref/ref_scores.bin: reference scores missing: run "
                                         r"`python rho.py --ref --data .*`"):
        run(demo, tmp_path, "--slm", "--steps", "1")
    m = run(demo, tmp_path, "--slm", "--steps", "2", "--eval_every", "2", "--ref_run", "myref")
    assert m["config"]["ref_run"] == "myref"
    score(demo, tmp_path, "--name", "myref")  # re-scoring names the run too

def test_error_reference_scores_missing_or_mismatched(demo, tmp_path):
    with pytest.raises(SystemExit, match=r"reference scores missing: run `python rho.py --ref --data .*`"):
        run(demo, tmp_path, "--slm", "--steps", "1")
    run(demo, tmp_path, "--ref", "--steps", "1")
    path = tmp_path / "ref" / "ref_scores.bin"
    info = json.loads((tmp_path / "ref" / "ref_scores.bin.json").read_text())
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(SystemExit, match=r"do not match .*cut short: [\d,]+ of [\d,]+ tokens\): "
                                         r"re-run `python rho.py --score"):
        run(demo, tmp_path, "--slm", "--steps", "1")
    score(demo, tmp_path)  # re-scoring repairs it
    with pytest.raises(SystemExit, match=r"windows of 32 tokens, this run uses 16: pass --block_size 32"):
        run(demo, tmp_path, "--slm", "--steps", "1", "--block_size", "16")
    (tmp_path / "ref" / "ref_scores.bin.json").write_text(json.dumps({**info, "data_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match=r"reference scores do not match .*: re-run `python rho.py --score"):
        run(demo, tmp_path, "--slm", "--steps", "1")

def test_error_reference_vocabulary_differs(demo, tmp_path):
    run(demo, tmp_path, "--ref", "--steps", "1")
    ckpt = torch.load(tmp_path / "ref" / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "encoding": "gpt2", "n_vocab": 50257}, tmp_path / "ref" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"vocabulary gpt2 \(50257 tokens\) but the data has bytes \(257\)"):
        score(demo, tmp_path)
    with pytest.raises(SystemExit, match=r"base checkpoint has vocabulary gpt2"):
        run(demo, tmp_path, "--clm", "--steps", "1", "--init_from", str(tmp_path / "ref" / "ckpt.pt"))

def test_error_nan_loss_keeps_last_good_checkpoint(demo, tmp_path, monkeypatch):
    real, calls = rho.fused_clm_loss, {"n": 0}

    def nan_at_third_step(*args):
        loss, tok = real(*args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), tok

    monkeypatch.setattr(rho, "fused_clm_loss", nan_at_third_step)
    with pytest.raises(SystemExit, match=r"clm: the loss became nan at step 2, stopped before its update; "
                                         r".*clm/ckpt.pt holds the last weights saved \(step 2, val loss hq "
                                         r"[\d.]+\)\. A step's size comes from --lr 0.003, --weight_decay 0.1, "
                                         r"--grad_clip 1 \(and the data\): change what caused it, then start again "
                                         r"with --overwrite \(or another --name\)$"):
        run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2")
    assert torch.load(tmp_path / "clm" / "ckpt.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "clm" / "metrics.json").exists()

def shas(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

def test_nothing_lost_finished_runs_other_scores_and_a_kill_while_scoring(demo, tmp_path, monkeypatch, capsys):
    """Data loss: a finished run is refused unless --resume or --overwrite; a reference model scoring other data
    leaves its scores in place; a --ref killed while scoring, finished by --score as before, then --ref --resume:
    metrics.json written, the scores kept (not computed again)."""
    run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2")
    before = shas(tmp_path / "ref")
    with pytest.raises(SystemExit, match=r"ref: holds a finished run \(ckpt.pt, metrics.json, tokens.npz, "
                                         r"ref_scores.bin, ref_scores.bin.json\): --resume continues it, --overwrite "
                                         r"replaces it, --name NAME starts this one beside it$"):
        run(demo, tmp_path, "--ref", "--steps", "4", "--eval_every", "2")
    prepare.main(["--out", str(tmp_path / "other"), "--web_tokens", "20000", "--seed", "5"])
    with pytest.raises(SystemExit, match=r"ref_scores.bin: holds the scores of .*data by this reference model; "
                                         r"scoring .*other would replace them: pass --overwrite, or copy the run "
                                         r"\(cp -r .*ref .*ref-2\) and score that: `python rho.py --score "
                                         r"--name ref-2 --data .*other --out .*`$"):
        rho.main(["--data", str(tmp_path / "other"), "--out", str(tmp_path), "--score"])
    score(demo, tmp_path)  # the same data and model: nothing to do
    assert "already holds this model's scores" in capsys.readouterr().out and shas(tmp_path / "ref") == before
    real_score, calls = rho.score_web, []

    def killed_in_scoring(*a):
        def loss(*b, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_loss(*b, **kw)
        real_loss = rho.model_token_loss
        with monkeypatch.context() as m:
            m.setattr(rho, "model_token_loss", loss)
            m.setattr(time, "time", iter(range(0, 10**6, 31)).__next__)  # every block is synced to disk
            return real_score(*a)
    monkeypatch.setattr(rho, "score_web", killed_in_scoring)
    with pytest.raises(SystemExit, match=r"^error: k: stopped while scoring: run the same command with --resume to "
                                         r"finish it$"):
        run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2", "--name", "k", "--score_batch", "8")
    monkeypatch.undo()
    assert not (tmp_path / "k" / "metrics.json").exists() and (tmp_path / "k" / "ref_scores.bin.partial").exists()
    with pytest.raises(SystemExit, match=r"scoring was interrupted: finish the reference run: `python rho.py --ref "
                                         r"--name k --data .* --out .* --resume --steps 2 .*--init_from scratch "
                                         r"--block_size 32 --n_layer 1 --n_head 2 --n_embd 32`$"):
        run(demo, tmp_path, "--slm", "--steps", "1", "--ref_run", "k")
    score(demo, tmp_path, "--name", "k")
    assert re.search(r"metrics.json is missing \(killed while scoring\?\): `python rho.py --ref --name k --data .* "
                     r"--resume --steps 2 .*` writes it", capsys.readouterr().out)
    scores = shas(tmp_path / "k")["ref_scores.bin"]
    m = run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2", "--name", "k", "--score_batch", "8",
            "--resume")
    assert "already holds this model's scores" in capsys.readouterr().out
    assert shas(tmp_path / "k")["ref_scores.bin"] == scores and m["run"] == "k" and "score_s" in m
    run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2", "--seed", "3", "--overwrite")
    assert shas(tmp_path / "ref")["ckpt.pt"] != before["ckpt.pt"]  # replaced, as asked

def test_silent_mistakes_refused(demo, tmp_path):
    """Flags the mode ignores are refused; a preset's --compile can be turned off; the default warmup fits short
    runs; AdamW decays matrices and embeddings only; an SLM run refuses to resume on another reference model."""
    for argv, msg in ((["--clm", "--k", "0.3", "--select", "random", "--scope", "sequence"],
                       r"--k --scope --select: --clm does not read them \(--slm's flags\); drop them"),
                      (["--score", "--steps", "3"], r"--steps: --score does not read it; drop it"),
                      (["--clm", "--warmup", "100", "--steps", "4"], r"--warmup 100: must be fewer than --steps 4"),
                      (["--clm", "--resume", "--overwrite"], r"--resume --overwrite: .* not both")):
        with pytest.raises(SystemExit, match=rf"^error: {msg}"):
            rho.parse_args(argv)
    cfg, _ = rho.parse_args(["--slm", "--preset", "gpt2-owm", "--no-compile", "--device", "cpu"])
    assert not cfg.compile and rho.parse_args(["--clm", "--preset", "gpt2-owm", "--device", "cpu"])[0].compile
    assert [rho.parse_args(["--clm", "--steps", s])[0].warmup for s in ("4", "50", "1200")] == [0, 5, 20]
    model = rho.GPT(rho.GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    groups = rho.adamw(model, rho.RunConfig()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[1]["params"]} == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert groups[1]["weight_decay"] == 0 and "transformer.wpe.weight" in {names[id(p)] for p in groups[0]["params"]}
    run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2")
    run(demo, tmp_path, "--slm", "--steps", "2", "--eval_every", "2")
    run(demo, tmp_path, "--ref", "--steps", "2", "--eval_every", "2", "--seed", "3", "--overwrite")
    with pytest.raises(SystemExit, match=r"--resume: .*ref_scores.bin now holds the scores of another reference "
                                         r"model than the one .*ckpt.pt trained with"):
        run(demo, tmp_path, "--slm", "--steps", "2", "--eval_every", "2", "--resume")

def test_nan_in_slm_stops_before_a_checkpoint_holds_it(demo, tmp_path, monkeypatch):
    """Every logit NaN: SLM selects no token (NaN is never selected), yet the run stops at that step, and the last
    checkpoint keeps finite weights; an infinite gradient norm stops it too."""
    run(demo, tmp_path, "--ref", "--steps", "1")
    real, calls = rho.GPT.forward, []

    def nan_at_third_training_forward(self, *a, **kw):
        calls.append(self.training)
        h = real(self, *a, **kw)
        return h * float("nan") if sum(calls) == 3 and self.training else h
    monkeypatch.setattr(rho.GPT, "forward", nan_at_third_training_forward)
    with pytest.raises(SystemExit, match=r"slm-k0.6: the loss became nan at step 2, stopped .*\(step 2, val"):
        run(demo, tmp_path, "--slm", "--steps", "4", "--eval_every", "2")
    ckpt = torch.load(tmp_path / "slm-k0.6" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(t.isfinite().all() for t in ckpt["model"].values())
    monkeypatch.undo()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a: torch.tensor(float("inf")))
    with pytest.raises(SystemExit, match=r"clm: the gradient norm became inf at step 0, stopped before its update\. "
                                         r"A step's .*--overwrite \(or another --name\)$"):
        run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2")
    assert not (tmp_path / "clm" / "ckpt.pt").exists()

def test_errors_at_start_leave_nothing_and_disk_errors_are_one_line(demo, tmp_path, monkeypatch):
    """A torch file that is not a rho checkpoint; a run refused at start leaves no folder; a --out that cannot be
    written fails before any work; a full disk at a checkpoint or while scoring: one line, no temp file left."""
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other.pt: a torch file, but not a checkpoint written by rho.py \(no "
                                         r"config, encoding, model, model_config, n_vocab\)"):
        run(demo, tmp_path / "o", "--clm", "--steps", "1", "--init_from", str(tmp_path / "other.pt"))
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=r"afile/clm: cannot write the run there \(Not a directory\): pass another"):
        run(demo, tmp_path / "afile", "--clm", "--steps", "1")
    real_atomic = rho.write_atomic

    def read_only(path, data):
        if path.endswith(".write-test"):
            raise OSError(30, "Read-only file system", path)
        return real_atomic(path, data)
    monkeypatch.setattr(rho, "write_atomic", read_only)
    with pytest.raises(SystemExit, match=r"ro/clm: cannot write the run there \(Read-only file system\)"):
        run(demo, tmp_path / "ro", "--clm", "--steps", "1")
    monkeypatch.undo()
    real_save, saves = torch.save, []

    def full_disk(obj, path):
        saves.append(path)
        if len(saves) == 2:
            open(path, "wb").write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(obj, path)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"clm/ckpt.pt: could not write the checkpoint \(.*unexpected pos 64 vs 0\); "
                                         r"the checkpoint of step 2 is intact: free disk space, then run again with "
                                         r"--resume$"):
        run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "clm") == ["ckpt.pt"]
    assert torch.load(tmp_path / "clm" / "ckpt.pt", weights_only=True)["step"] == 2
    run(demo, tmp_path, "--ref", "--steps", "1", "--name", "r", "--score_batch", "8")
    os.remove(tmp_path / "r" / "ref_scores.bin")
    monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(SystemExit, match=r"No space left on device: free space or fix the folder, then run the same "
                                         r"command again$"):  # --score resumes without --resume
        score(demo, tmp_path, "--name", "r")

def test_errors_that_used_to_loop_or_leave_folders(demo, tmp_path):
    """A run stopped by NaN before its first checkpoint leaves no empty folder; the advice for scores of a wider
    context says what to do when the model has fewer positions."""
    with pytest.raises(SystemExit, match=r"nan2: the loss became nan at step 1, stopped"):
        run(demo, tmp_path, "--clm", "--lr", "1e30", "--steps", "2", "--name", "nan2")
    assert not (tmp_path / "nan2").exists()
    run(demo, tmp_path, "--base", "--steps", "1", "--block_size", "16", "--name", "base16")
    run(demo, tmp_path, "--ref", "--steps", "1")  # scores of windows of 32 tokens
    with pytest.raises(SystemExit, match=r"this run uses 16: pass --block_size 32 .*\(a model of fewer positions: "
                                         r"train the reference model with --block_size 16 and score again\)$"):
        run(demo, tmp_path, "--slm", "--steps", "1", "--init_from", "base16", "--block_size", "16")

def test_slm_can_crop_its_base_to_the_reference_context(demo, tmp_path):
    """The advice for scores of another context works for a base checkpoint: --block_size crops its context."""
    run(demo, tmp_path, "--base", "--steps", "1")
    run(demo, tmp_path, "--ref", "--steps", "1", "--block_size", "16")
    with pytest.raises(SystemExit, match=r"windows of 16 tokens, this run uses 32: pass --block_size 16"):
        rho.main(["--data", str(demo / "data"), "--out", str(tmp_path), "--slm", "--steps", "1", "--init_from", "base"])
    m = rho.main(["--data", str(demo / "data"), "--out", str(tmp_path), "--slm", "--steps", "1", "--init_from", "base",
                  "--block_size", "16", "--eval_problems", "4"])
    assert m["model_config"]["block_size"] == 16
    with pytest.raises(SystemExit, match=r"--block_size 64: .*base/ckpt.pt has 32 positions; pass --block_size 32"):
        rho.main(["--data", str(demo / "data"), "--out", str(tmp_path), "--clm", "--steps", "1", "--block_size", "64"])

def test_error_init_from_missing(demo, tmp_path):
    with pytest.raises(SystemExit, match=r"nope: no such base checkpoint"):
        run(demo, tmp_path, "--clm", "--steps", "1", "--init_from", "nope")

def test_error_too_few_windows_and_no_base_corpus(demo, tmp_path):
    with pytest.raises(SystemExit, match=r"hq_train.bin: \d+ training windows of 33 tokens, fewer than one batch: "
                                         r"lower --batch_size"):
        run(demo, tmp_path, "--ref", "--steps", "1", "--batch_size", "100000")
    (tmp_path / "hq.txt").write_text("\n\n".join(f"document {i} " * 20 for i in range(60)))
    prepare.main(["--hq", str(tmp_path / "hq.txt"), "--web", str(tmp_path / "hq.txt"), "--out", str(tmp_path / "real")])
    with pytest.raises(SystemExit, match=r"has no base corpus .*--init_from CKPT"):
        rho.main(["--base", "--data", str(tmp_path / "real"), "--out", str(tmp_path), *TINY])

def test_hf_error_wrong_encoding(demo, tmp_path):
    tiny_hf(vocab=320, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path / "tiny-gpt2")
    with pytest.raises(SystemExit, match=r"its vocabulary \(320 tokens\) is not that of .* \(bytes, 257\): prepare the "
                                         r"data with `python prepare.py ... --encoding .*tiny-gpt2` "
                                         r"\(its own tokenizer"):
        rho.main(["--clm", "--data", str(demo / "data"), "--out", str(tmp_path), "--init_from",
                  str(tmp_path / "tiny-gpt2")])

def test_hf_error_transformers_missing_or_offline(tmp_path, monkeypatch):
    cfg, model_cfg = rho.parse_args(["--clm", "--init_from", "hf:gpt2", "--device", "cpu"])
    meta = {"encoding": "gpt2", "vocab_size": 50257}
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(SystemExit, match=r"^error: --init_from hf:gpt2: needs transformers: pip install transformers$"):
        rho.build_model(cfg, meta, model_cfg)
    monkeypatch.undo()
    transformers = pytest.importorskip("transformers")

    def offline(*args, **kwargs):  # what from_pretrained raises with no network and an empty cache
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck ...")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(SystemExit, match=r"hf:gpt2: could not load it \(We couldn't connect.*\): "
                                         r"run once with network to fill the "
                                         r"Hugging Face cache \(HF_HUB_OFFLINE=1 .*save_pretrained$"):
        rho.build_model(cfg, meta, model_cfg)

def tiny_llama_with_tokenizer(path, texts):
    """A tiny random Llama saved with save_pretrained, beside a byte-level BPE tokenizer trained here on texts (no
    download) that starts every document with <s> (Llama's convention) and ends it with </s>."""
    transformers, tok = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    tk = tok.Tokenizer(tok.models.BPE())
    tk.pre_tokenizer, tk.decoder = tok.pre_tokenizers.ByteLevel(add_prefix_space=False), tok.decoders.ByteLevel()
    tk.train_from_iterator(texts, tok.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=tok.pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = tok.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, bos_token_id=0,
                                   eos_token_id=1, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)

def test_hf_model_and_tokenizer_end_to_end(tmp_path, capsys):
    """prepare.py with a model's own tokenizer (its BOS/EOS at document boundaries), then --ref, --clm, --slm and
    report.py, all from that model."""
    qa = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
          for a in range(12) for b in range(12)]
    web = [f"Page {i}: buy now, {i} deals. The sum of {i} and {i + 1} is {2 * i + 1}." for i in range(400)]
    (tmp_path / "hq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (tmp_path / "web.txt").write_text("\n\n".join(web) + "\n")
    model = str(tmp_path / "tiny-llama")
    tiny_llama_with_tokenizer(model, [r["question"] + " " + r["answer"] for r in qa] + web)
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    prepare.main(["--hq", str(tmp_path / "hq.jsonl"), "--web", str(tmp_path / "web.txt"), "--out", data,
                  "--encoding", model, "--procs", "2"])
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert (meta["encoding"], meta["vocab_size"], meta["eot"], meta["dtype"]) == (model, 300, 1, "uint16")
    ids = np.fromfile(tmp_path / "data" / "web.bin", np.uint16)
    assert ids[0] == 0 and ids[-1] == 1 and (ids == 1).sum() == 400 and (ids == 0).sum() == 400  # <s> doc </s>
    assert all(ids[i + 1] == 0 for i in np.flatnonzero(ids[:-1] == 1))  # every </s> followed by the next <s>
    enc = prepare.get_encoding(model)
    assert enc.decode(ids[:np.argmax(ids == 1)].tolist()) == web[0]
    assert prepare.token_dtype(128256) == np.uint32  # Llama 3's vocabulary needs 32 bits
    common = ["--data", data, "--out", out, "--init_from", model, "--steps", "2", "--batch_size", "4",
              "--block_size", "32", "--eval_every", "2", "--eval_problems", "4", "--device", "cpu"]
    rho.main(["--ref", *common])
    clm, slm = rho.main(["--clm", *common]), rho.main(["--slm", "--k", "0.6", *common])
    assert clm["model_config"] == slm["model_config"] == {"block_size": 32, "vocab_size": 320, "n_layer": 2,
                                                         "n_head": 4, "n_embd": 32}
    assert slm["tokens_trained"] == math.ceil(0.6 * 4 * 32) * 2 and clm["tokens_trained"] == 4 * 32 * 2
    info = rho.main(["--score", "--data", data, "--out", out])  # the reference model again, from its checkpoint
    assert "already holds this model's scores" in capsys.readouterr().out and info["n_tokens"] == len(ids)
    report.main([str(out)])  # the table and the page, from that model's runs
    assert [r["run"] for r in report.load_runs(str(out))] == ["ref", "clm", "slm-k0.6"]

def test_gpt2_train_resume_and_reload_as_rho_checkpoint(demo, tmp_path, monkeypatch):
    """A tiny GPT-2 continually pretrained on gpt2-labelled data: resume equals an uninterrupted run, and the
    checkpoint is an ordinary rho checkpoint (weights_only, --init_from <run>)."""
    # a small head: fast evals
    tiny_hf(vocab=320, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path / "tiny-gpt2")
    data = tmp_path / "data"
    data.mkdir()
    for f in (demo / "data").iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "encoding": "gpt2"}))  # the byte ids pass for gpt2 ids
    monkeypatch.setattr(rho, "get_encoding", lambda name: prepare.byte_encoding())  # no tiktoken download
    args = ["--clm", "--data", str(data), "--out", str(tmp_path / "out"), "--batch_size", "4", "--eval_every", "2",
            "--eval_problems", "0", "--lr", "1e-3", "--device", "cpu"]
    gpt2 = [*args, "--init_from", str(tmp_path / "tiny-gpt2"), "--block_size", "32"]
    full = rho.main([*gpt2, "--steps", "4", "--name", "full"])
    real_lr_at = rho.lr_at
    monkeypatch.setattr(rho, "lr_at", lambda step, cfg: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else
                        real_lr_at(step, cfg))  # killed after the checkpoint of step 2
    with pytest.raises(SystemExit, match=r"cut: stopped at step 2 of 4; .*cut/ckpt.pt holds step 2"):
        rho.main([*gpt2, "--steps", "4", "--name", "cut"])
    monkeypatch.setattr(rho, "lr_at", real_lr_at)
    cut = rho.main([*gpt2, "--steps", "4", "--name", "cut", "--resume"])
    assert cut["losses"] == full["losses"]
    assert full["model_config"] == {"block_size": 32, "vocab_size": 320, "n_layer": 2, "n_head": 2, "n_embd": 32}
    assert torch.load(tmp_path / "out" / "full" / "ckpt.pt", weights_only=True)["encoding"] == "gpt2"
    cont = rho.main([*args, "--init_from", "full", "--steps", "2", "--name", "cont"])  # a rho checkpoint now
    assert (cont["model_config"] == full["model_config"]
            and cont["losses"][0] < full["losses"][0])  # starts where full ended

# -----------------------------------------------------------------------------
# main: bad flags against the one line each must give

def test_error_data_not_prepared(tmp_path):
    with pytest.raises(SystemExit, match=r"data not prepared .*python prepare.py --hq FILE --web FILE"):
        rho.main(["--clm", "--data", str(tmp_path / "nothing")])

def test_error_bad_flags_one_line_each():
    for argv, msg in ((["--slm", "--k", "0"], r"--k 0.0: k is the share of tokens selected and must be in \(0, 1\]"),
                      (["--slm", "--k", "1.5"], r"--k 1.5: .*must be in \(0, 1\]"),
                      (["--clm", "--lr", "-1"], r"--lr -1.0: must be positive"),
                      (["--clm", "--steps", "0"], r"--steps 0: must be positive"),
                      (["--clm", "--warmup", "-1"], r"--warmup -1: must be 0 or more"),
                      (["--clm", "--lr", "nan"], r"--lr nan: must be positive and finite"),
                      (["--clm", "--weight_decay", "nan"], r"--weight_decay nan: must be 0 or more and finite"),
                      (["--clm", "--grad_clip", "nan"], r"--grad_clip nan: must be positive and finite"),
                      (["--clm", "--seed", "-1"], r"--seed -1: must be 0 or more"),
                      (["--clm", "--block_size", "0"], r"--block_size 0: must be positive"),
                      (["--clm", "--n_embd", "0"], r"--n_embd 0: must be positive"),
                      (["--clm", "--device", "tpu"], r"--device tpu: rho runs on cpu, cuda or cuda:N"),
                      (["--slm", "--select", "sample", "--scope", "sequence"],
                       r"--select sample ranks whole sequences"),
                      (["--clm", "--batch", "64"], r"unrecognized arguments: --batch 64 .*abbreviations"),
                      (["--clm", "--preset", "gpt2-owm", "--batch", "64"], r"unrecognized arguments: --batch 64")):
        with pytest.raises(SystemExit, match=rf"^error: {msg}") as e:
            rho.main(argv)
        assert "\n" not in str(e.value)

def test_preset_values_are_defaults_that_flags_beat():
    cfg, model_cfg = rho.parse_args(["--slm", "--preset", "gpt2-owm", "--batch_size", "64", "--device", "cpu"])
    assert (cfg.batch_size, cfg.micro_batch, cfg.steps, cfg.lr, cfg.init_from) == (64, 32, 2000, 1e-4, "hf:gpt2")
    cfg, _ = rho.parse_args(["--ref", "--preset", "gpt2-owm", "--steps", "10", "--device", "cpu"])
    assert (cfg.batch_size, cfg.steps, cfg.lr, cfg.k, cfg.select) == (512, 10, 1e-4, 1.0, "all")

# -----------------------------------------------------------------------------
# prepare.py: text in, tokens out; its decontamination against a plain substring search

def test_prepare_roundtrips_text(tmp_path):
    docs = ["First document.\nIt has two lines.", "Second, with unicode: é ✓ π", "Third"]
    (tmp_path / "hq.txt").write_text("\n\n".join(docs * 30) + "\n")
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "val.jsonl").write_text(json.dumps({"question": "What is 2 + 3?",
                                                    "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    out = tmp_path / "data"
    prepare.main(["--hq", str(tmp_path / "hq.txt"), "--web", str(tmp_path / "web.jsonl"),
                  "--val", str(tmp_path / "val.jsonl"), "--out", str(out)])
    meta = json.loads((out / "meta.json").read_text())
    enc = prepare.get_encoding(meta["encoding"])
    decode = lambda name: enc.decode(np.fromfile(out / name, dtype=meta["dtype"]).tolist()).split(prepare.EOT)[:-1]
    assert decode("web.bin") == docs
    assert decode("hq_train.bin") == docs * 30
    assert decode("hq_val.bin") == ["Question: What is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5"]
    assert json.loads((out / "eval.json").read_text()) == [{"prompt": "Question: What is 2 + 3?\nAnswer:",
                                                            "answer": "5", "solution": " 2 + 3 = 5\n#### 5"}]
    assert meta["tokens"]["web"] == os.path.getsize(out / "web.bin") // 2 and meta["dtype"] == "uint16"
    assert len(meta["sources"]["web"]["sha256"]) == 64
    assert not list(out.glob("*.tmp"))
    assert_files_fingerprinted(out, meta)

def assert_files_fingerprinted(out, meta):
    """meta.json's "files": the size and sha256 of every file prepare.py wrote but meta.json itself."""
    names = {f.name for f in out.iterdir()} - {"meta.json"}
    assert meta["files"] == {n: {"bytes": os.path.getsize(out / n),
                                 "sha256": hashlib.sha256((out / n).read_bytes()).hexdigest()} for n in names}

def test_prepare_demo_is_deterministic_and_labelled(tmp_path):
    for d in ("a", "b"):
        prepare.main(["--out", str(tmp_path / d), "--web_tokens", "20000", "--seed", "3"])
    for name in ("hq_train.bin", "hq_val.bin", "web.bin", "web_labels.bin", "base.bin", "eval.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert_files_fingerprinted(tmp_path / "a", meta)
    assert set(meta["files"]) == {*OUTPUTS[:4], "web_labels.bin", "base.bin"}
    web = np.fromfile(tmp_path / "a" / "web.bin", np.uint16)
    labels = np.fromfile(tmp_path / "a" / "web_labels.bin", np.uint8)
    assert len(web) == len(labels) == meta["tokens"]["web"]
    enc = prepare.get_encoding("bytes")
    clean = enc.decode(web[(labels == 0) & (web != enc.eot_token)][:2000].tolist())
    assert "Question:" in clean and "Posted by" not in clean and "sid=" not in clean
    assert 0.2 < 1 - meta["label_share"]["clean"] < 0.55  # the documented noise share, give or take a 20k-token sample
    hq_text = enc.decode(np.fromfile(tmp_path / "a" / "hq_train.bin", np.uint16).tolist())
    for p in json.loads((tmp_path / "a" / "eval.json").read_text()):
        assert p["prompt"] not in hq_text  # eval problems are held out

EMPTY_FIX = "a .txt source holds documents separated by blank lines, a .jsonl one JSON object a line"
TOO_LONG = "words " * 20  # a document of 20 words
THREE = "\n\n".join(f"document {i} {TOO_LONG}" for i in range(3))

@pytest.mark.parametrize("files, args, msg", [
    ({}, ["--web_tokens", "-5"], r"--web_tokens -5: must be 1 or more$"),
    ({}, ["--base_tokens", "0"], r"--base_tokens 0: must be 1 or more$"),
    ({}, ["--seed", "-1"], r"--seed -1: must be 0 or more$"),
    ({}, ["--procs", "0"], r"--procs 0: must be 1 or more$"),
    ({"h.txt": "a\n\nb\n"}, ["--hq", "h.txt", "--web", "h.txt", "--max_web_tokens", "-1"],
     r"--max_web_tokens -1: must be 0 or more$"),
    ({"out": "a file"}, ["--hq", "h.txt", "--web", "h.txt", "--out", "out"], r"--out .*out: is a file; give a folder"),
    ({}, ["--encoding", "no_such_encoding"], r"--encoding no_such_encoding: tiktoken could not load it"),
    ({"h.txt": "a\n"}, ["--hq", "nope.txt", "--web", "h.txt"], r"nope.txt: no such file$"),
    ({"h.txt": "a\n", "d/x.jsonl": "{}"}, ["--hq", "h.txt", "--web", "d"], r"/d: is a directory; a source is one file "
     r"\(--web takes several: .*/d/\*.jsonl, which the shell expands\) or hf:NAME"),
    ({"h.txt": "a\n\nb\n"}, ["--hq", "h.txt", "--web", "h.txt"], r"h.txt: 2 documents, too few to hold out a "
     r"validation split \(1 in 50\), so hq_val.bin would be empty; pass --val FILE$"),
    ({"h.txt": "\n\n  \n\n"}, ["--hq", "h.txt", "--web", "h.txt"], rf"h.txt: no documents, so hq_val.bin and "
     rf"hq_train.bin would be empty; {EMPTY_FIX}"),
    ({"h.txt": TOO_LONG, "v.jsonl": ""}, ["--hq", "h.txt", "--web", "h.txt", "--val", "v.jsonl"],
     rf"v.jsonl: no documents, so hq_val.bin would be empty; {EMPTY_FIX}"),
    ({"h.txt": "\n\n", "v.txt": TOO_LONG}, ["--hq", "h.txt", "--web", "v.txt", "--val", "v.txt"],
     rf"h.txt: no documents, so hq_train.bin would be empty; {EMPTY_FIX}"),
    ({"h.txt": TOO_LONG, "v.txt": "x " * 40, "w.jsonl": ""}, ["--hq", "h.txt", "--web", "w.jsonl", "--val", "v.txt"],
     rf"w.jsonl: no documents, so web.bin would be empty; {EMPTY_FIX}"),
    ({"h.txt": TOO_LONG, "v.txt": "x " * 40, "w.txt": "\n \n\n\t\n", "w2.txt": "\n\n"},
     ["--hq", "h.txt", "--web", "w.txt", "w2.txt", "--val", "v.txt"],
     rf"--web \(2 sources\): no documents, so web.bin would be empty; {EMPTY_FIX}"),
    ({"h.txt": THREE}, ["--hq", "h.txt", "--web", "h.txt", "--val", "h.txt"], r"h.txt: all 3 documents share a 13-word "
     r"run with a held-out question, so hq_train.bin would be empty; is --val the same data\?"),
    ({"h.txt": "\n\n".join(["a"] * 49 + [TOO_LONG]), "bad.jsonl": '{"title": "x"}\n'},
     ["--hq", "h.txt", "--web", "bad.jsonl"],
     r'bad.jsonl:1: needs a "text" field'),
])
def test_prepare_bad_input_one_line_and_folder_kept(files, args, msg, tmp_path, capsys):
    """Each bad flag or source: one line naming it and the fix, before or instead of a file that rho could not read; the
    output folder keeps what it held (here an earlier run's files) and no temp file."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    old = tmp_path / "o"
    old.mkdir()
    for name in ("web.bin", "hq_val.bin", "meta.json"):
        (old / name).write_text("an earlier run's file")
    args = [str(tmp_path / a) if a in files or a.startswith("nope") or a == "d" else a for a in args]
    with pytest.raises(SystemExit) as e:
        prepare.main(["--out", str(old), *args])
    assert re.search(rf"^error: .*{msg}", str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(f.name for f in old.iterdir()) == ["hq_val.bin", "meta.json", "web.bin"]
    assert all(f.read_text() == "an earlier run's file" for f in old.iterdir())

def normalised(text):
    """prepare's words, one character at a time: NFKC, lowercased; letters, digits and marks of any script are kept,
    format characters dropped, and the rest separates words."""
    kind = lambda c: c if unicodedata.category(c)[0] in "LMN" else "" if unicodedata.category(c) == "Cf" else " "
    return " " + " ".join("".join(map(kind, unicodedata.normalize("NFKC", text).casefold())).split()) + " "

def held_out_runs(question):
    """What no training text may hold: each run of 13 words of the question, or all of one of 8 to 12 words."""
    w = normalised(question).split()
    return [" " + " ".join(w[i:i + 13]) + " " for i in range(max(len(w) - 12, 1))] if len(w) >= 8 else []

def test_contaminated_equals_plain_reference():
    """The hashed, vectorised check against substring search on normalised text, on random texts of few words (so that
    runs match often), unicode, held-out texts of 0 to ~30 words, and texts that span the 100k-character pieces."""
    rng = random.Random(0)
    pieces = ["a", "B", "7", "é", "É", "数", ".", ", ", " ", "\n", "--", "\u00a0", "’", "—", "\u00ad",
              "Ａ", "ß", "x" * 5_000]
    for _ in range(200):
        held = ["".join(rng.choice(pieces[:-1]) for _ in range(rng.randint(0, 90))) for _ in range(rng.randint(0, 4))]
        texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 80))) for _ in range(rng.randint(0, 12))]
        texts += [rng.choice(["", "zz "]) + h.upper() + " yy" for h in held if rng.random() < 0.5]  # planted
        runs = [r for q in held for r in held_out_runs(q) if r.strip()]
        want = [any(r in t for r in runs) for t in map(normalised, texts)]
        assert prepare.contaminated(texts, prepare.held_out_index(held)[0]).tolist() == want

def test_prepare_demo_holds_out_its_questions(tmp_path):
    """No 13-word run of an eval or hq_val question (nor all of a shorter one) is left in web, hq_train or base."""
    out = tmp_path / "demo"
    prepare.main(["--out", str(out), "--web_tokens", "30000", "--base_tokens", "30000"])
    enc = prepare.get_encoding("bytes")
    text = lambda name: enc.decode(np.fromfile(out / name, np.uint16).tolist())
    evals = [p["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
             for p in json.loads((out / "eval.json").read_text())]
    val = [d.split("\nAnswer:")[0].removeprefix("Question: ") for d in text("hq_val.bin").split(prepare.EOT)[:-1]]
    assert len(evals) == 1000 and len(val) == 300 and len(set(evals + val)) == 1300
    runs = [r for q in evals + val for r in held_out_runs(q)]
    for name in ("web.bin", "hq_train.bin", "base.bin"):
        train = normalised(text(name))
        assert not [r for r in runs if r in train], name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["decontamination"] == {"n": 13, "min_words": 8, "held_out_texts": 1300, "too_short": 0, "kept": False,
                                       "dropped_docs": {"hq_train": 0, "web": 0, "base": 0}}  # none drawn: none found

def test_prepare_drops_training_documents_that_hold_a_held_out_question(tmp_path, capsys):
    """Planted copies of --val questions in hq and web documents: exact, or with whitespace, case and punctuation
    changed, are dropped; 12 shared words, a short question with a word changed, or an answer alone are kept."""
    long_q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May?")
    wage_q = "Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."
    short_q = "What is 17 times 23, plus 4 more?"  # 8 words (the minimum): matched whole
    answer = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    val = [{"question": long_q, "answer": answer}, {"question": wage_q, "answer": "12/60 * 50 = 10\n#### 10"},
           {"question": short_q, "answer": "17 * 23 + 4 = 395\n#### 395"}]
    hq = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many apples does Tom have?",
           "answer": f"#### {2 * i + 1}"} for i in range(5)]
    hq[2:2] = [{"question": long_q, "answer": "#### 72"},
               {"question": long_q.upper().replace(" ", "\n\t").replace(",", ";"), "answer": "72"}]
    web = ["A clean page: 1/2 + 1/4 = 3/4.",
           f"Posted by math_fan\n{long_q.lower()} thanks!!",  # dropped
           "Q:   " + long_q.replace(". ", ".\n\n").replace("?", " ?!"),  # dropped
           "My sister earns 12 dollars an hour for babysitting. Yesterday, she just did 50 push-ups.",  # 12 words: kept
           "My sister earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of yoga.",  # 13
           "quick one: WHAT is 17 times 23 -- plus 4 MORE??? no calculator",  # dropped
           "what is 17 times 230, plus 4 more? and is 17 times 23 odd?",  # kept: neither is the short question's run
           answer]  # kept: answers are not held out
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    (tmp_path / "hq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hq))
    write_source(tmp_path / "web.jsonl", web)
    paths = {name: str(tmp_path / f"{name}.jsonl") for name in ("hq", "web", "val")}
    args = ["--hq", paths["hq"], "--web", paths["web"], "--val", paths["val"], "--procs", "1"]
    prepare.main([*args, "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert decode(out, "web.bin") == [web[i] for i in (0, 3, 6, 7)]
    assert decode(out, "hq_train.bin") == [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in hq[:2] + hq[4:]]
    assert [p["answer"] for p in json.loads((out / "eval.json").read_text())] == ["72", "10", "395"]
    meta = json.loads((out / "meta.json").read_text())["decontamination"]
    assert meta == {"n": 13, "min_words": 8, "held_out_texts": 3, "too_short": 0, "kept": False,
                    "dropped_docs": {"hq_train": {paths["hq"]: 2}, "web": {paths["web"]: 4}}}
    assert (f"prepare: decontamination: {paths['web']}: 4 of 8 documents share a 13-word run with a held-out question, "
            f"dropped\n") in capsys.readouterr().out
    prepare.main([*args, "--out", str(tmp_path / "kept"), "--keep_contaminated"])
    assert decode(tmp_path / "kept", "web.bin") == web and len(decode(tmp_path / "kept", "hq_train.bin")) == 7
    assert json.loads((tmp_path / "kept" / "meta.json").read_text())["decontamination"] == {**meta, "kept": True}
    assert "4 of 8 documents share a 13-word run with a held-out question, kept" in capsys.readouterr().out

def test_decontamination_unicode_and_too_short_held_out_texts(tmp_path, capsys):
    """Unicode does not hide a held-out question: a non-breaking space, curly apostrophe, em dash, soft hyphen or
    full-width digit separates or reads as the plain character; letters of any script stay letters. A held-out text of
    fewer than 8 words is counted and not used, so a held-out "Solution" or "Chapter 3" drops no document."""
    assert len(prepare.words(["a\u00a0b"])[0]) == 2 and len(prepare.words(["a\u2014b a\u2019b"])[0]) == 4
    assert (prepare.words(["naïve ＮＡÏＶＥ na\u00adïve"])[0] == prepare.words(["naïve"])[0][0]).all()
    assert len(prepare.words(["数学 é", "αβγ-δ"])[0]) == 4
    q = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
         "friends every day with four.")
    val = [{"question": q, "answer": "#### 18"}, {"question": "Solution", "answer": "#### 1"},
           {"question": "Chapter 3", "answer": "#### 3"}]
    web = ["Copied from a page: " + q.replace(" ", "\u00a0"),  # dropped
           q.replace("'", "\u2019").replace(". ", "\u2014").replace("16", "１６")
            .replace("ffi", "f\u00adfi"),  # dropped
           "Solution: see Chapter 3 below, then the next chapter.",  # kept: its held-out texts are too short to check
           "Janet\u2019s ducks lay 16 eggs per day. She eats three for lunch."]  # kept: 12 words shared
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    write_source(tmp_path / "web.jsonl", web)
    prepare.main(["--hq", str(tmp_path / "web.jsonl"), "--web", str(tmp_path / "web.jsonl"), "--val",
                  str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "out"), "--procs", "1"])
    assert decode(tmp_path / "out", "web.bin") == web[2:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())["decontamination"]
    assert meta["too_short"] == 2 and meta["held_out_texts"] == 3 and meta["min_words"] == prepare.MIN_WORDS == 8
    out = capsys.readouterr().out
    assert re.search(r"prepare: decontamination: 3 held-out texts, 2 of them shorter than 8 words \(too short to "
                     r"check: not used\); index \d+\.\d MB\n", out)

def test_prepare_counts_bytes_that_are_not_utf8(tmp_path, capsys):
    """Bytes that are not UTF-8 become U+FFFD, are counted per source in meta.json, and each source that had any gets
    one warning line (hq, read twice without --val, once)."""
    docs = [f"document {i} says caf\u00e9" for i in range(100)]
    raw = "\n\n".join(docs).encode().replace(b"document 7 ", b"document \xff\xfe7 ")
    raw = raw.replace(b"document 8 says caf\xc3\xa9", b"document 8 says caf\xe9")  # latin-1
    (tmp_path / "hq.txt").write_bytes(raw)
    write_source(tmp_path / "web.jsonl", docs)
    prepare.main(["--hq", str(tmp_path / "hq.txt"), "--web", str(tmp_path / "web.jsonl"), "--out", str(tmp_path / "o")])
    sources = json.loads((tmp_path / "o" / "meta.json").read_text())["sources"]
    assert sources["hq"]["non_utf8_bytes"] == 3 and sources["web"]["non_utf8_bytes"] == 0
    assert decode(tmp_path / "o", "hq_train.bin")[7:9] == ["document \ufffd\ufffd7 says café",
                                                           "document 8 says caf\ufffd"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"prepare: warning: {tmp_path / 'hq.txt'}: 3 byte(s) not UTF-8: each bad sequence became "
                        f"U+FFFD (meta.json's sources count them); if the file is in another encoding, convert it to "
                        f"UTF-8"]

def test_prepare_without_val_holds_out_every_50th_hq_question(tmp_path):
    """Without --val, the 50th and 100th hq documents are the validation split: their questions are held out of web and
    of every other hq document (also of those read before them), and only they give eval.json."""
    recs = [{"question": f"Ann packs {i} boxes with {i + 3} pens each and then gives {i} pens to a friend at school. "
                         f"How many pens are left?", "answer": f"#### {i * (i + 2)}"} for i in range(100)]
    recs[10] = {**recs[99], "answer": "a copy, read before the original"}
    web = ["I need help: " + recs[49]["question"].replace(". ", ".\n"), recs[5]["question"], "nothing to see"]
    (tmp_path / "hq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    hq, web_path = str(tmp_path / "hq.jsonl"), write_source(tmp_path / "web.jsonl", web)
    prepare.main(["--hq", hq, "--web", web_path, "--out", str(tmp_path / "out"), "--procs", "1"])
    out = tmp_path / "out"
    text = lambda r: f"Question: {r['question']}\nAnswer: {r['answer']}"
    assert decode(out, "hq_val.bin") == [text(recs[49]), text(recs[99])]
    assert decode(out, "hq_train.bin") == [text(r) for i, r in enumerate(recs) if i not in (10, 49, 99)]
    assert decode(out, "web.bin") == web[1:]
    assert json.loads((out / "eval.json").read_text()) == [prepare.eval_problem(r) for r in (recs[49], recs[99])]
    meta = json.loads((out / "meta.json").read_text())["decontamination"]
    assert meta["held_out_texts"] == 2 and meta["dropped_docs"] == {"hq_train": {hq: 1}, "web": {web_path: 1}}

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None

OUTPUTS = ["hq_train.bin", "hq_val.bin", "web.bin", "eval.json", "meta.json"]

def corpus(n=240, seed=0):
    """Documents of mixed size and script; two are larger than a (shrunk) task."""
    rng = random.Random(seed)
    words = ["the", "sum", "of", "42", "é", "naïve", "✓", "π", "数学", "😀", "Ω≈ç", "<br/>",
             "\\frac{1}{2}", "#### 7"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 300))) for _ in range(n)]
    docs[7] = docs[n // 2] = "\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(500))  # ~50k chars
    return docs

def write_source(path, docs):
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    if path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text(lines, encoding="utf-8")
    elif path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=50)
    return str(path)

def decode(out, name):
    meta = json.loads((out / "meta.json").read_text())
    return (prepare.get_encoding(meta["encoding"]).decode(np.fromfile(out / name, dtype=meta["dtype"]).tolist())
            .split(prepare.EOT)[:-1])

@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz",
                                 pytest.param("parquet", marks=pytest.mark.skipif(pq is None,
                                                                                  reason="pyarrow not installed"))])
def test_prepare_procs_1_and_2_byte_identical(fmt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "TASK_CHARS", 20_000)  # ~20 tasks per source: more than the 2N in flight
    docs = corpus()
    docs[49] += " the sum of 42" * 2  # 8 words at least: long enough to check
    docs[10] = docs[49]  # a training copy of a validation document (held out whole: plain text), read before it
    src = write_source(tmp_path / f"c.{fmt}", docs)
    for procs in (1, 2):
        prepare.main(["--hq", src, "--web", src, "--out", str(tmp_path / str(procs)), "--procs", str(procs)])
    for name in OUTPUTS:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    out = tmp_path / "2"
    assert decode(out, "web.bin") == [d for i, d in enumerate(docs) if i % 50 != 49 and i != 10]  # decontaminated
    assert decode(out, "hq_val.bin") == docs[49::50]  # the split follows the global document index, not the tasks
    assert decode(out, "hq_train.bin") == [d for i, d in enumerate(docs) if i % 50 != 49 and i != 10]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["decontamination"]["dropped_docs"] == {"hq_train": {src: 1}, "web": {src: 5}}
    with open(src, "rb") as f:
        assert meta["sources"]["web"] == {"path": os.path.abspath(src), "sha256": hashlib.sha256(f.read()).hexdigest(),
                                          "bytes": os.path.getsize(src),
                                          **({"non_utf8_bytes": 0} if fmt != "parquet" else {})}
    err = capsys.readouterr().err
    assert f"prepare: {src}: {meta['tokens']['web']:,} tokens in " in err and " tok/s)" in err  # the summary line

def test_prepare_web_shards_equal_one_file(tmp_path):
    docs = corpus(60)
    one, a, b = (write_source(tmp_path / f"{n}.jsonl", d)
                 for n, d in (("one", docs), ("a", docs[:25]), ("b", docs[25:])))
    prepare.main(["--hq", one, "--web", one, "--out", str(tmp_path / "one"), "--procs", "1"])
    prepare.main(["--hq", one, "--web", a, b, "--out", str(tmp_path / "shards"), "--procs", "2"])
    assert (tmp_path / "one" / "web.bin").read_bytes() == (tmp_path / "shards" / "web.bin").read_bytes()
    assert [s["path"] for s in json.loads((tmp_path / "shards" / "meta.json").read_text())["sources"]["web"]] == [a, b]

def test_prepare_max_web_tokens_and_metamath_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TASK_CHARS", 5_000)
    docs = [d[:2000] for d in corpus(60)]  # tasks of a few documents
    web, web2 = write_source(tmp_path / "web.jsonl", docs), write_source(tmp_path / "web2.jsonl", docs[::-1])
    hq = tmp_path / "hq.jsonl"
    hq.write_text("".join(json.dumps({"query": f"q{i}", "response": f"r{i}"}) + "\n" for i in range(100)))
    for procs in (1, 2):
        prepare.main(["--hq", str(hq), "--web", web, web2, "--max_web_tokens", "20000",
                      "--out", str(tmp_path / str(procs)), "--procs", str(procs)])
    one, two = tmp_path / "1", tmp_path / "2"
    assert (one / "web.bin").read_bytes() == (two / "web.bin").read_bytes()
    meta = json.loads((two / "meta.json").read_text())
    kept = decode(two, "web.bin")
    assert 20000 <= meta["tokens"]["web"] < 30000 and kept == docs[:len(kept)]  # a prefix, cut after a task
    assert (meta["sources"]["web"]["stopped_at_tokens"] == meta["tokens"]["web"]
            and meta["sources"]["web"]["sha256"] is None)
    assert decode(two, "hq_train.bin")[0] == "Question: q0\nAnswer: r0"  # MetaMathQA's query and response

def test_run_tasks_keeps_at_most_depth_tasks_in_flight():
    class Pool:  # runs nothing: counts the tasks submitted and not yet collected
        out = peak = 0

        def submit(self, f, task):
            Pool.out += 1; Pool.peak = max(Pool.peak, Pool.out)
            return types.SimpleNamespace(result=lambda: (setattr(Pool, "out", Pool.out - 1), task)[1])

    read = []

    def tasks():
        for i in range(20):
            read.append(i)
            yield i, ("mark", i)

    results = prepare.run_tasks(tasks(), Pool(), depth=4)
    assert next(results) == (0, ("mark", 0)) and len(read) == 4  # reading waits while 4 tasks are in flight
    assert [r for r, _ in results] == list(range(1, 20)) and Pool.peak == 4

def fake_datasets(records, calls):
    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name == "offline/x":
            raise ConnectionError("Couldn't reach 'offline/x' on the Hub (LocalEntryNotFoundError)\nmore detail")
        return iter(records)
    return types.SimpleNamespace(load_dataset=load_dataset)

def test_prepare_hf_streams_like_jsonl(tmp_path, monkeypatch):
    records = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(60)]
    records += [{"text": d, "url": "x"} for d in corpus(40)]
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(records, calls))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare.main(["--hq", "hf:openai/gsm8k:main@test", "--web", "hf:someone/web",
                  "--out", str(tmp_path / "hf"), "--procs", "1"])
    prepare.main(["--hq", str(tmp_path / "c.jsonl"), "--web", str(tmp_path / "c.jsonl"),
                  "--out", str(tmp_path / "jsonl"), "--procs", "1"])
    for name in OUTPUTS[:4]:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "jsonl" / name).read_bytes(), name
    assert json.loads((tmp_path / "hf" / "eval.json").read_text()) == [prepare.eval_problem(records[49])]  # val only
    gsm8k = ("openai/gsm8k", "main", "test", True)
    assert calls == [gsm8k, gsm8k, ("someone/web", None, "train", True)]  # hq twice: its validation documents first
    sources = json.loads((tmp_path / "hf" / "meta.json").read_text())["sources"]
    assert sources == {"hq": {"dataset": "openai/gsm8k", "config": "main", "split": "test"},
                       "web": {"dataset": "someone/web", "config": None, "split": "train"}}

def test_prepare_errors_at_scale(tmp_path, monkeypatch, capsys):
    def fails(*args, procs=1):
        with pytest.raises(SystemExit) as e:
            prepare.main([*args, "--out", str(tmp_path / "o"), "--procs", str(procs)])
        assert "\n" not in str(e.value) and "Traceback" not in capsys.readouterr().err
        return str(e.value)

    docs = corpus(120)
    good = write_source(tmp_path / "good.jsonl", docs)
    monkeypatch.setattr(prepare, "TASK_CHARS", 20_000)
    (tmp_path / "bad.jsonl").write_text(open(good).read() + '{"text": "cut short\n')  # in the last task, in a worker
    assert fails("--hq", good, "--web", str(tmp_path / "bad.jsonl"), procs=2) == (
        f"error: {tmp_path / 'bad.jsonl'}:121: not valid JSON; each line of a .jsonl file must be one JSON object")
    gz = write_source(tmp_path / "c.jsonl.gz", docs)
    (tmp_path / "cut.jsonl.gz").write_bytes(open(gz, "rb").read()[:3000])
    assert fails("--hq", good, "--web", str(tmp_path / "cut.jsonl.gz")).startswith(
        f"error: {tmp_path / 'cut.jsonl.gz'}: cannot read it (EOFError")
    assert "no such file" in fails("--hq", good, "--web", str(tmp_path / "nope.jsonl"))
    (tmp_path / "c.csv").write_text("a,b\n")
    assert "unsupported format" in fails("--hq", good, "--web", str(tmp_path / "c.csv"))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert fails("--hq", good, "--web", str(tmp_path / "x.parquet")) == (
        f"error: {tmp_path / 'x.parquet'}: reading parquet needs pyarrow: pip install pyarrow")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert fails("--hq", good, "--web", "hf:someone/web") == (
        "error: hf:someone/web: streaming a Hugging Face dataset needs datasets: pip install datasets")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([], []))
    msg = fails("--hq", good, "--web", "hf:offline/x")
    assert (msg.startswith("error: hf:offline/x: could not stream it (ConnectionError: Couldn't reach")
            and "run where the network is" in msg)
    assert "hf:NAME[:CONFIG][@SPLIT]" in fails("--hq", good, "--web", "hf:")

# -----------------------------------------------------------------------------
# the instruments: report.py's rules against worked examples, bench.py on toy sizes

def test_loss_category_rule():
    t = [0, 1, 2]  # one token per column: L->L, H->L, L->H, H->H, then dL of exactly +0.2 and -0.2, and just over 0.2
    losses = np.array([[1.0, 3.0, 1.0, 4.0, 1.0, 2.0, 1.0],
                       [1.0, 2.0, 2.0, 4.0, 1.1, 1.9, 1.1001],
                       [1.0, 1.0, 3.0, 4.0, 1.2, 1.8, 1.2002]])  # mean final loss 1.886
    cats = [report.CATEGORIES[c] for c in report.loss_category(losses, t)]
    assert cats == ["L->L", "H->L", "L->H", "H->H", "L->L", "L->L", "L->H"]
    # one token: final = mean
    assert report.CATEGORIES[report.loss_category(np.array([[3.0], [3.1], [3.2]]), t)[0]] == "L->L"
    noisy = np.array([[1.0], [0.5], [1.3]])  # the fit, not the endpoints: 1.0 -> 1.3 but the line rises by 0.3
    assert report.CATEGORIES[report.loss_category(noisy, t)[0]] == "L->H"

def test_t_quantiles_against_the_tables():
    for p, df, want in ((0.975, 4, 2.776), (0.975, 1, 12.706), (0.975, 30, 2.042), (0.995, 10, 3.169)):
        assert abs(report.t_ppf(p, df) - want) < 5e-4
    assert abs(report.betainc(2, 3, 0.4) - 0.5248) < 1e-12  # I_x(2, 3) = x^2 (6 - 8x + 3x^2), by hand
    assert abs(report.t_sf2(report.t_ppf(0.975, 7), 7) - 0.05) < 1e-9  # the p-value inverts the quantile

def test_paired_t_interval_by_hand():
    """d = 0.1 .. 0.5: mean 0.3, sd sqrt(0.025) = 0.15811, se 0.15811 / sqrt(5) = 0.070711, t(0.975, 4) = 2.7764:
    0.3 -+ 0.19632 = [0.1037, 0.4963]. d = 0.1, 0.3, 0.2: mean 0.2, se 0.1 / sqrt(3), t = 3.4641 with 2 degrees of
    freedom, whose two-sided p-value is 1 - t / sqrt(2 + t^2) = 1 - 3.4641 / 3.7417 = 0.07418."""
    t = report.paired_t([0.1, 0.2, 0.3, 0.4, 0.5])
    lo, hi = t["ci"](0.05)
    assert abs(t["diff"] - 0.3) < 1e-12 and abs(lo - 0.1037) < 1e-4 and abs(hi - 0.4963) < 1e-4
    t = report.paired_t([0.1, 0.3, 0.2])
    assert abs(t["p"] - 0.07418) < 1e-5 and t["ci"](0.05)[0] < 0 < t["ci"](0.1)[0]  # 0.074: out at 90%, in at 95%
    assert report.paired_t([0.2]) is None and report.paired_t([0.1, 0.1])["p"] == 0.0  # no spread: no interval
    runs = [{"final": {"val_loss_hq": v}} for v in (1.0, 2.0, 3.0)]
    lower = [{"final": {"val_loss_hq": v}} for v in (0.9, 1.8, 2.95)]
    one = report.seed_test(report.per_seed(lower[:1], runs[:1], "val_loss_hq"))
    assert one == {"diff": -0.09999999999999998, "per_seed": [-0.09999999999999998], "seeds": 1, "why": "one seed"}
    three = report.seed_test(report.per_seed(lower, runs, "val_loss_hq"))
    assert three["seeds"] == 3 and abs(three["diff"] + 0.1167) < 1e-3 and three["sign"] == [0, 3]

def test_mcnemar_on_a_small_table():
    """12 discordant pairs, 10 of them the run's: 2 P(X <= 2) with X ~ Bin(12, 1/2) = 2 (1 + 12 + 66) / 4096 =
    0.038574. No discordant pair: p = 1. Balanced: p = 1 (capped). One-sided 5 of 5: 2 / 32 = 0.0625."""
    assert abs(report.mcnemar(10, 2) - 158 / 4096) < 1e-15 and report.mcnemar(2, 10) == report.mcnemar(10, 2)
    assert report.mcnemar(0, 0) == 1.0 and report.mcnemar(3, 3) == 1.0 and report.mcnemar(5, 0) == 0.0625

def test_holm_on_a_small_family():
    """alpha 0.05, p = 0.01, 0.04, 0.03, 0.005. Sorted: 0.005 <= 0.05/4 rejected; 0.01 <= 0.05/3 rejected; 0.03 >
    0.05/2: stop, 0.03 and 0.04 kept. Adjusted: 4 * 0.005 = 0.02, 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 0.04)
    = 0.06. Levels: their step's (0.0125, 0.01667), the kept ones the stopping step's (0.025)."""
    out = report.holm([0.01, 0.04, 0.03, 0.005])
    assert [o[1] for o in out] == [True, False, False, True]
    assert np.allclose([o[0] for o in out], [0.03, 0.06, 0.06, 0.02])
    assert np.allclose([o[2] for o in out], [0.05 / 3, 0.025, 0.025, 0.0125])

def synthetic(losses, correct, data="same"):
    """A run per seed with a final loss and per-problem records: what report.py reads of metrics.json."""
    return [{"final": {"val_loss_hq": v, "accuracy": float(np.mean(c)), "correct": [int(x) for x in c]},
             "eval_problems": len(c),
             "data": {"sha256": data}} for v, c in zip(losses, correct)]

def test_sign_test_and_seeds_needed():
    """The exact sign test is McNemar's binomial on the signs: 5 of 5 seeds positive give 2 / 32 = 0.0625, which no
    five seeds can beat; ties are dropped. Under Holm over 4 tests, the sign test needs 8 seeds (2 / 256 <= 0.0125;
    7 give 0.0156); alone, 6 (0.031)."""
    assert report.sign_test([0.1, 0.2, 0.3, 0.4, 0.5]) == (5, 0, 0.0625)
    assert report.sign_test([0.1, -0.2, 0.0, 0.4]) == (2, 1, 1.0)
    assert report.seeds_for_sign(1) == 6 and report.seeds_for_sign(4) == 8

def test_median_interval_counts_the_seeds_that_never_reach():
    """Order statistics: with 10 seeds the interval is (x2, x9), coverage 1 - 2 (1 + 10) / 1024 = 97.85%; (x3, x8)
    would be 89%. Under 6 seeds the range, at its own coverage (5: 93.75%). A seed that never reaches the target
    counts below every other: with 3 of 5 never, the median is 'never' (<1x), not the mean of the other two."""
    xs = [{"x": float(v), "at_first": False, "tokens": 1.0} for v in range(1, 11)]
    m = report.median_interval(xs)
    assert (m["median"]["x"], m["lo"]["x"], m["hi"]["x"]) == (5.0, 2.0, 9.0)
    assert abs(m["coverage"] - 0.978515625) < 1e-12
    m = report.median_interval(xs[:2] + [None] * 3)
    assert m["median"] is None and m["lo"] is None and m["hi"]["x"] == 2.0 and m["never"] == 3
    assert abs(m["coverage"] - 0.9375) < 1e-12 and report.fmt_speeds(xs[:2] + [None] * 3) == "<1x [<1x, 2.0x]"
    assert report.fmt_speeds([None]) == "never" and report.fmt_speeds([{**xs[3], "at_first": True}]) == "0.00M >=4.0x"

def test_calls_agree_with_intervals_and_records_missing():
    """Holm over a table's seed-level t tests (loss and accuracy together): a difference is called exactly where its
    interval, at its Holm level, excludes 0; each seed's McNemar test describes that seed's pair of runs beside it;
    one seed tests nothing about the method."""
    rng = np.random.default_rng(1)
    base = synthetic([1.0, 1.1, 0.9], rng.random((3, 200)) < 0.3)
    groups = {"clm": base}
    for i, (shift, p) in enumerate(((-0.1, 0.45), (0.0, 0.3), (-0.02, 0.33), (0.01, 0.2))):
        groups[f"run{i}"] = synthetic([1.0 + shift, 1.1 + shift * 1.1, 0.9 + shift * 0.9], rng.random((3, 200)) < p)
    tests = report.against(groups, "clm")
    ts = [t for ts in tests.values() for t in ts.values()]
    assert len(ts) == 8 and all(t["family"] == 8 for t in ts) and tests["run0"]["val_loss_hq"]["called"]
    assert not all(t["called"] for t in ts)
    assert all(t["called"] == (t["lo"] > 0 or t["hi"] < 0) == (t["p_holm"] <= 0.05) for t in ts)
    acc = tests["run0"]["accuracy"]  # the t test on the three seeds' accuracy differences, McNemar per seed beside
    d = [np.array(r["final"]["correct"]) - np.array(b["final"]["correct"]) for r, b in zip(groups["run0"], base)]
    assert np.allclose(acc["per_seed"], [x.mean() for x in d], atol=1e-4) and acc["seeds"] == 3
    assert abs(acc["p"] - report.paired_t(acc["per_seed"])["p"]) < 1e-12
    assert [e["discordant"] for e in acc["each_seed"]] == [[(x == 1).sum(), (x == -1).sum()] for x in d]
    assert acc["each_seed"][0]["p"] == report.mcnemar(*acc["each_seed"][0]["discordant"])
    one = report.against({n: rs[:1] for n, rs in groups.items()}, "clm")  # one seed: no test of the method
    assert "p" not in one["run0"]["accuracy"] and one["run0"]["val_loss_hq"]["why"] == "one seed"
    assert report.fmt_p(one["run0"]["accuracy"]) == f"{one['run0']['accuracy']['each_seed'][0]['p']:.2g}"
    assert "describe this pair of runs, not the method" in report.explain(one)
    for r in groups["run1"]:
        del r["final"]["correct"]
    assert "each_seed" not in report.against(groups, "clm")["run1"]["accuracy"]
    assert "200 problems a seed" in report.noise(tests) and "known to +-6.9 points" in report.noise(tests)

def null_replicates(scenario, n_reps=400, seeds=5, problems=1000, effect=0.0, seed=0):
    """Synthetic tables of two runs over seeds with no true difference (effect 0): 'drift', each run's accuracy and
    loss moved by its own training noise (sd 10 points, 0.02 nats); 'shared', a seed effect both runs share. The
    calls report.against makes, per test: (loss called, accuracy called) each replicate."""
    rng, calls = np.random.default_rng(seed), []
    for _ in range(n_reps):
        shared = rng.normal(0, 0.1, seeds) if scenario == "shared" else np.zeros(seeds)
        drift = lambda: rng.normal(0, 0.1, seeds) if scenario == "drift" else np.zeros(seeds)
        p_clm, p_run = 0.3 + shared + drift(), 0.3 + shared + drift() + effect
        noise = lambda: rng.normal(0, 0.005, seeds)  # what any two runs differ by, drift or not
        loss_clm, loss_run = 0.4 + (shared + drift()) / 5 + noise(), 0.4 + (shared + drift()) / 5 + noise() - effect / 5
        groups = {"clm": synthetic(loss_clm, rng.random((seeds, problems)) < np.clip(p_clm, 0, 1)[:, None]),
                  "run": synthetic(loss_run, rng.random((seeds, problems)) < np.clip(p_run, 0, 1)[:, None])}
        t = report.against(groups, "clm")["run"]
        calls.append((t["val_loss_hq"]["called"], t["accuracy"]["called"]))
    return np.array(calls)

def test_the_report_calls_differences_at_its_nominal_rate():
    """Calibration: under no true difference the table calls a difference in at most 5% of its tests, within the
    binomial margin (2 standard errors over 800 tests: 5% + 1.5%), with run-level drift and with a shared seed
    effect; and the family of a table (Holm over its 2 tests) errs at most as often. Pooling the seeds' problems into
    one McNemar test called ~10% under drift. Power: a true +25 points and -0.05 nats over 5 seeds are called."""
    for scenario in ("drift", "shared"):
        calls = null_replicates(scenario)
        margin = 2 * math.sqrt(0.05 * 0.95 / calls.size)
        assert calls.mean() <= 0.05 + margin and calls.any(1).mean() <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / len(calls))
    power = null_replicates("drift", n_reps=100, effect=0.25, seed=1).mean(0)
    assert power[0] >= 0.6 and power[1] >= 0.6

def test_smoothed_crossing_on_a_hand_made_curve():
    """Loss 7 - x at x = 1..7 (tokens 100 x), with a dip of -2.5 at x = 3. Smoothed (a line through the 5 nearest
    evaluations): at x = 3, 4, 5 the moving averages 3.5, 2.5, 1.5; at x = 1, 2 the line 6.5 - x (the dip at the
    window's centre lowers it by 0.5); at x = 6, 7 the line 6.5 - x + 0.5 (x - 5): 1.0 and 0.5. The raw curve first
    reaches 3.0 in the dip (x = 2.57); the smoothed one between 3.5 at x = 3 and 2.5 at x = 4: at x = 3.5."""
    history = [{"tokens_seen": 100 * x, "val_loss_hq": 7.0 - x - (2.5 if x == 3 else 0), "wall_s": 10.0 * x}
               for x in range(1, 8)]
    assert np.allclose(report.smooth([h["tokens_seen"] for h in history], [h["val_loss_hq"] for h in history]),
                       [5.5, 4.5, 3.5, 2.5, 1.5, 1.0, 0.5])
    assert abs(report.crossing(history, 3.0, "val_loss_hq") - 350) < 1e-9
    assert abs(report.crossing(history, 3.0, "val_loss_hq", "wall_s") - 35) < 1e-9
    assert report.crossing(history, 0.4, "val_loss_hq") is None
    up = [{"tokens_seen": h["tokens_seen"], "accuracy": -h["val_loss_hq"]} for h in history]  # accuracy: at or above
    assert abs(report.crossing(up, -3.0, "accuracy") - 350) < 1e-9

def test_speedup_is_clm_whole_run_over_first_reach():
    """The paper's 'N x sooner': CLM's tokens for its whole run over the tokens a run needs to first reach CLM's final
    value. A CLM loss line falling to its end reaches its own final value at its end: 1.0x; a run 100 tokens ahead
    reaches it at 400: 500 / 400 = 1.25x. A flat CLM accuracy curve reaches its own final value early, so its own row
    reads above 1; a run past the target at its first evaluation is a lower bound (>=)."""
    line = {"history": [{"tokens_seen": 100 * x, "val_loss_hq": 6.0 - x, "accuracy": 0.2} for x in range(1, 6)]}
    faster = {"history": [{"tokens_seen": 100 * x, "val_loss_hq": 5.0 - x, "accuracy": 0.5} for x in range(1, 6)]}
    assert report.speedup(line, line, "val_loss_hq") == {"tokens": 500.0, "x": 1.0, "at_first": False}
    assert report.speedup(faster, line, "val_loss_hq") == {"tokens": 400.0, "x": 1.25, "at_first": False}
    assert report.speedup(line, line, "accuracy") == {"tokens": 100, "x": 5.0, "at_first": True}
    assert report.fmt_speed(report.speedup(faster, line, "accuracy")) == ">=5.0x"

def test_speedups_count_the_seeds_that_never_reach():
    """A seed that never reaches CLM's final value is in the estimate as <1x, not dropped: a copy of CLM that
    reaches its own final value in half the seeds reads <1x at its median, not 1.05x."""
    clm = [{"history": [{"tokens_seen": 50, "val_loss_hq": 1.2}, {"tokens_seen": 100, "val_loss_hq": 1.0}]}] * 4
    reach, never = ({"history": [{"tokens_seen": 50, "val_loss_hq": 1.1}, {"tokens_seen": 100, "val_loss_hq": v}]}
                    for v in (0.9, 1.1))
    xs = report.speedups([reach, never, reach, never], clm, "val_loss_hq")
    assert [x and round(x["x"], 4) for x in xs] == [1.3333, None, 1.3333, None]
    assert report.fmt_speeds(xs) == "<1x [<1x, 1.3x]" and report.median_interval(xs)["never"] == 2
    reach["mode"] = never["mode"] = "slm"  # the printed table's cell
    assert report.fmt_reach([reach, never], clm[:2], "val_loss_hq") == "<1x [<1x, 1.3x]"

def test_report_on_tiny_runs_and_seeds(demo, tmp_path):
    for seed, out in ((1337, tmp_path / "a"), (7, tmp_path / "b")):
        common = ("--eval_every", "2", "--seed", str(seed))
        run(demo, out, "--ref", "--steps", "2", *common)
        run(demo, out, "--clm", "--steps", "4", *common)
        run(demo, out, "--slm", "--k", "0.6", "--steps", "4", *common)
        run(demo, out, "--slm", "--k", "0.6", "--select", "entropy", "--steps", "4", *common)
    report.main([str(tmp_path / "a")])
    html, rep = (tmp_path / "a" / "report.html").read_text(), json.loads((tmp_path / "a" / "report.json").read_text())
    assert {"efficiency", "selection", "dynamics", "highlight", "cost", "k_sweep", "rules", "scope"} <= set(rep)
    assert abs(sum(rep["dynamics"]["categories_web"].values()) - 1) < 1e-3 and rep["k_sweep"]["best_k"] in (0.6, 1.0)
    assert "slm-k0.6 selected" in rep["dynamics"]["slm_selected_vs_unselected"] and rep["highlight"]["docs"]
    assert html.count("<svg") >= 5 and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert set(rep["rules"]) == {"clm", "slm-k0.6", "slm-k0.6-entropy"}
    report.report([str(tmp_path / "a"), str(tmp_path / "b")])  # over two seeds: means, ranges, paired differences
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    vs = rep["efficiency"]["slm-k0.6"]["vs_clm"]
    assert rep["efficiency"]["slm-k0.6"]["seeds"] == 2 and vs["val_loss_hq"]["seeds"] == 2 and "lo" in vs["val_loss_hq"]
    assert "every seed" not in (tmp_path / "a" / "report.html").read_text() and "polygon" in html
    for r in ("clm", "slm-k0.6"):  # runs without their token records: the report says so, and does not crash
        os.remove(tmp_path / "a" / r / "tokens.npz")
        os.remove(tmp_path / "b" / r / "tokens.npz")
    report.report([str(tmp_path / "a")])
    assert "rerun" in (tmp_path / "a" / "report.html").read_text()
    assert json.loads((tmp_path / "a" / "report.json").read_text())["dynamics"] == {}

def test_report_flags_and_a_folder_it_cannot_write(one_process, tmp_path, capsys, monkeypatch):
    """--help and unknown flags as rho.py's; a folder the report cannot be written into is refused before the work,
    by a write: root ignores permissions, so as root a refused write (a read-only mount's) stands in for chmod."""
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0 and "report.html" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: unrecognized arguments: --bogus \(python report.py --help\)$"):
        report.main(["--bogus", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: out: no such folder: give rho.py's --out folder"):  # the default
        report.main([])
    os.mkdir(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"^error: out: no runs with metrics.json"):
        report.main([])
    os.rmdir(tmp_path / "out")
    out = tmp_path / "out"
    shutil.copytree(one_process[0], out)
    before = sorted(os.listdir(out))
    out.chmod(0o555)

    def read_only(*a, **kw):
        raise OSError(30, "Read-only file system")
    try:
        (out / "probe").touch()
    except PermissionError:
        pass  # the chmod holds: the real check
    else:  # root: permissions are not checked
        (out / "probe").unlink()
        monkeypatch.setattr(report.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(SystemExit, match=rf"^error: out: cannot write the report there \((Permission denied|Read-only "
                                         r"file system)\): make it writable, or copy the folders somewhere writable"):
        report.main(["out"])
    out.chmod(0o755)
    assert sorted(os.listdir(out)) == before

@pytest.mark.parametrize("impl", ["naive_clm", "naive_slm", "fused_clm", "fused_slm", "torch_lce", "torch_lce_slm"])
def test_bench_head_measures_each_impl(impl):
    if bench.unavailable(impl, torch.device("cpu")):
        pytest.skip(bench.unavailable(impl, torch.device("cpu")))
    row = bench.bench_one("head", impl, (64, 16, 37, 0.5), "cpu", "float32", 0, 1)
    assert row["case"] == "head" and row["impl"] == impl and row["ms"] > 0 and "peak_mb" in row

@pytest.mark.parametrize("impl", ["clm", "slm", "slm_split"])
def test_bench_train_step_and_scoring_scale_run(impl):
    tiny = rho.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)
    ms, _ = bench.bench_train(impl, tiny, 4, 0.5, torch.device("cpu"), "float32", 0, 1)
    assert ms > 0 and min(bench.bench_scale(4096, torch.device("cpu"), "float32")) > 0

def test_bench_train_rounds_interleave_and_count_flops(monkeypatch, capsys):
    """--cases train: CLM and SLM alternate round by round, each ratio is against the CLM of its own round, and the
    FLOP count gives SLM's expected ratio: GPT-2 small's 124,439,808 parameters less its embeddings are the trunk."""
    todo = bench.plan(["train"], 0.6, False, rounds=3)
    assert [impl for _, impl, _ in todo] == ["clm", "slm", "slm_split"] * 3
    ms = iter([10.0, 9.0, 12.0, 20.0, 19.0, 24.0, 10.0, 10.0, 13.0])  # round 2 on a machine twice as slow
    monkeypatch.setattr(bench, "bench_one", lambda case, impl, shape, *a: {
        "case": case, "impl": impl, "N": shape[0], "d": shape[1], "V": shape[2], "k": shape[3], "ms": next(ms),
        "peak_mb": 1.0})
    pool = lambda n: contextlib.nullcontext(types.SimpleNamespace(apply=lambda fn, args: fn(*args)))
    monkeypatch.setattr(bench.mp, "get_context", lambda method: types.SimpleNamespace(Pool=pool))  # no spawn
    summary = bench.train_summary(bench.measure(todo, "cpu", "float32"))
    assert [summary[i]["ms"] for i in ("clm", "slm", "slm_split")] == [10.0, 10.0, 13.0]
    assert summary["clm"]["ms_ratio"] == 1.0
    assert summary["slm"]["ms_ratio"] == 0.95 and summary["slm_split"]["ms_ratio"] == 1.2
    P, N, d, V, L, T = 124_439_808 - 50257 * 768 - 1024 * 768, 2048, 768, 50257, 12, 1024
    dense = 6 * N * P + 12 * L * d * T * N
    assert summary["slm"]["flops_ratio"] == round((dense + 5.6 * N * d * V) / (dense + 6 * N * d * V), 3) == 0.982
    assert "0.950 0.900-1.000" in " ".join(capsys.readouterr().out.split())

def test_bench_gpu_script_runs_in_its_cpu_mode(tmp_path, monkeypatch, capsys):
    """bench.py --gpu at toy sizes on a CPU: the whole plan runs and writes its rows (the tests it starts first are
    this file's, run here anyway: faked)."""
    monkeypatch.setattr(subprocess, "run",
                        lambda *a, **kw: types.SimpleNamespace(returncode=0, stdout="1 passed", stderr=""))
    monkeypatch.setattr(bench, "measure", lambda todo, device, dtype, ceiling, repeats: [
        {**bench.bench_one(c, i, s, device, dtype, 0, 1), "ms_ratio": 1.0, "mem_ratio": 1.0} for c, i, s in todo
        if not (c == "head" and bench.unavailable(i, torch.device(device)))])  # in this process: no spawn
    rows = bench.main(["--gpu", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    assert {r["impl"] for r in rows} >= {"naive_clm", "fused_clm", "fused_slm", "clm", "slm", "slm_split"}
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == rows and "1 passed" in capsys.readouterr().out

def test_bench_estimate_of_the_paper_presets(capsys, monkeypatch):
    """The estimate counts what it says: TinyLlama's 1.1B and Mistral's 7.24B parameters from their configs, 16 bytes
    a parameter sharded over 8 GPUs, and SLM's head at (2 + 6k) N d V beside CLM's 6 N d V."""
    tiny, mistral = bench.estimate("tinyllama-owm"), bench.estimate("mistral-owm")
    assert round(tiny["params"] / 1e6) == 1100 and round(mistral["params"] / 1e6) == 7242
    mem = mistral["memory"]
    assert (mem["params fp32 (sharded)"] + mem["grads fp32 (sharded)"] + mem["AdamW fp32 (sharded)"]
            == 2 * mistral["params"])
    assert mistral["act_ckpt"] < mistral["act_full"] / 5
    assert "estimate tinyllama-owm (not measured)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: --fsdp: .* run under torchrun --nproc_per_node N$"):
        rho.parse_args(["--slm", "--preset", "tinyllama-owm", "--device", "cpu"])
    monkeypatch.setenv("RANK", "0")  # as under torchrun
    cfg, _ = rho.parse_args(["--slm", "--preset", "tinyllama-owm", "--device", "cpu"])
    assert (cfg.k, cfg.lr, cfg.batch_size, cfg.fsdp, cfg.init_from) == (0.6, 8e-5, 512, True,
                                                                        "hf:TinyLlama/TinyLlama_v1.1")

def test_bench_prepare_is_linear_in_size(monkeypatch, capsys):
    monkeypatch.setattr(bench, "PREPARE_MB", 0.05)
    rows = bench.bench_prepare(2, "bytes")
    out = capsys.readouterr().out
    assert [json.loads(line) for line in out.splitlines()[:18]] == rows and "cpu s/Mtok" in out
    assert "decontamination alone on 1x: " in out.splitlines()[-1]
    tokens = {(r["procs"], r["size"]): r["tokens"] for r in rows}
    for p in (1, 2):
        assert tokens[p, "2x"] == 2 * tokens[p, "1x"] and tokens[p, "4x"] == 4 * tokens[p, "1x"] == 4 * tokens[1, "1x"]
    assert all(r["encoding"] == "bytes" and r["seconds"] > 0 and r["s_per_mtok"] > 0 for r in rows)



# --- issue 31: report.py's folders: seeds of one configuration, one data, the reference model they name

def test_report_refuses_folders_that_are_not_seeds_of_one_configuration(one_process, tmp_path, capsys):
    """A missing folder or a file, a folder given twice, two folders of one --seed, a run whose defining flags differ
    between folders, runs of other data in one folder: one line each, nothing written; an SLM run that read another
    reference model's scores than the ref row's: a note."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(one_process[0], a)
    shutil.copytree(one_process[0], b)
    (tmp_path / "f").write_text("x")
    seed_b = lambda m: {**m, "config": {**m["config"], "seed": 7}}
    for name in ("ref", "excess", "random"):
        edit(b / name / "metrics.json", seed_b)
    files = lambda d: {p: sha(p) for p in d.rglob("*") if p.is_file()}
    before, names_b = files(a), set(files(b))
    for argv, msg in (([tmp_path / "none"], "none: no such folder: give rho.py's --out folder"),
                      ([tmp_path / "f"], "f: a file, not a folder: give rho.py's --out folder"),
                      ([a, tmp_path / ".." / tmp_path.name / "a"], "a folder given twice: each folder is one seed"),
                      ([a, one_process[0]], ": both ran --seed 1337: one seed, not two; give one of them")):
        with pytest.raises(SystemExit, match=rf"^error: .*{re.escape(msg)}"):
            report.main([str(x) for x in argv])
    edit(b / "excess" / "metrics.json", lambda m: {**m, "config": {**m["config"], "lr": 0.1}})
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(b))}/excess: --lr 0.1, where {re.escape(str(a))}"
                                         rf"/excess has {float(SPLIT_LR)}: not seeds of one configuration; report them "
                                         "separately$"):
        report.main([str(a), str(b)])
    edit(b / "random" / "metrics.json", lambda m: {**m, "data": {**m["data"], "sha256": "e" * 64}})
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(b))}: its runs were trained on different data "
                                         r"\(.*random: eeeeeeeeeeee\): only runs of one data can be paired"):
        report.main([str(b)])
    assert files(a) == before and set(files(b)) == names_b  # every refusal: nothing written, nothing changed
    edit(a / "excess" / "metrics.json", lambda m: {**m, "ref_weights_sha256": "c" * 64})
    capsys.readouterr()
    report.main([str(a)])
    assert "note: excess selected by the scores of another reference model (cccccccccccc) than ref's" in \
        capsys.readouterr().out

def edit(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))

def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()

# --- issue 31: data loss, tracebacks, silent (rho.py)
# each bad input or fault against what a careful user expects: one line naming the flag or file and the fix, and
# every file that was there before unchanged (their sha256)

def data_copy(demo, tmp_path):
    """A copy of the demo data to edit."""
    shutil.copytree(demo / "data", tmp_path / "data")
    return tmp_path / "data"

def edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))

def refused(msg, demo, out, *args):
    """rho.main refuses with one line that matches msg; every file under out is as it was."""
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=msg) as e:
        run(demo, out, *args)
    assert "\n" not in str(e.value)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()} == before

def test_issue31_overwrite_checks_everything_before_it_deletes(demo, tmp_path):
    run(demo, tmp_path, "--clm", "--steps", "2", "--eval_problems", "0")
    refused(r"fewer than one batch: lower --batch_size$", demo, tmp_path, "--clm", "--steps", "2", "--overwrite",
            "--batch_size", "100000")
    assert sorted(os.listdir(tmp_path / "clm")) == ["ckpt.pt", "metrics.json", "tokens.npz"]

def test_issue31_a_second_command_on_a_run_is_refused_while_the_first_runs(demo, tmp_path, capsys, monkeypatch):
    """The lock holds "PID HOST" while a command runs and goes as it exits; a live holder's refuses a second command,
    a dead one's is taken over (a killed run resumes); a run that another command finished while this one started
    is refused, not replaced."""
    args = ("--clm", "--steps", "2", "--eval_problems", "0")
    real = rho.eval_sets

    def another_command_finishes_first(*a):  # after train's first look at the folder, before take_run_folder's
        monkeypatch.setattr(rho, "eval_sets", real)
        run(demo, tmp_path, *args)
        return real(*a)
    monkeypatch.setattr(rho, "eval_sets", another_command_finishes_first)
    with pytest.raises(SystemExit, match=r"clm: holds a finished run \(ckpt.pt, metrics.json, tokens.npz\)"):
        run(demo, tmp_path, *args)  # looked at again under the lock
    monkeypatch.undo()
    lock = tmp_path / "clm" / rho.LOCK
    assert not lock.exists()
    lock.write_text(f"{os.getppid()} {socket.gethostname()}")  # a process that runs
    refused(rf"clm: in use by process {os.getppid()} on .*: wait for it to end or stop it; if no command is running "
            rf"there, delete .*clm/{rho.LOCK}$", demo, tmp_path, *args, "--overwrite")
    lock.write_text("")  # a command killed as it took the lock, or another's: it cannot tell
    refused(r"clm: in use by another command", demo, tmp_path, *args, "--resume")
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock.write_text(f"{dead.pid} {socket.gethostname()}")
    m = run(demo, tmp_path, *args, "--resume")
    assert f"took over {rho.LOCK} of process {dead.pid}, which is no longer running" in capsys.readouterr().out
    assert m["steps"] == 2 and not lock.exists()

def test_issue31_seed_range_shared_with_prepare(tmp_path):
    big = str(rho.SEED_MAX + 1)
    with pytest.raises(SystemExit, match=rf"^error: --seed {big}: must be at most {rho.SEED_MAX}$"):
        rho.parse_args(["--clm", "--seed", big])
    with pytest.raises(SystemExit, match=rf"^error: --seed {big}: must be at most {rho.SEED_MAX}$"):
        prepare.main(["--out", str(tmp_path / "d"), "--seed", big])
    assert rho.parse_args(["--clm", "--seed", str(rho.SEED_MAX)])[0].seed == rho.SEED_MAX

def test_issue31_bad_data_and_scores_one_line_each(demo, tmp_path):
    """meta.json's vocab_size cut or dtype edited, eval.json cut or not JSON, ref_scores.bin zeroed or its .json not
    JSON: one line each, nothing written; --score repairs the scores."""
    data = data_copy(demo, tmp_path)
    meta = data / "meta.json"
    original = meta.read_text()
    edit_json(meta, lambda m: {**m, "vocab_size": 100})
    refused(r"web.bin: holds token id \d+, beyond the vocabulary of 100 in meta.json \(edited\?\): run prepare.py "
            r"again$", demo, tmp_path, "--clm", "--steps", "1", "--data", str(data))
    for dtype in ("uint8", "uint32"):
        edit_json(meta, lambda m: {**json.loads(original), "dtype": dtype})
        refused(rf"bytes are not [\d,]+ tokens of {dtype}, as meta.json says \(edited\?\): run prepare.py again$",
                demo, tmp_path, "--clm", "--steps", "1", "--data", str(data))
    meta.write_text(original)
    edit_json(data / "eval.json", lambda problems: problems[:3])
    refused(r"eval.json: \d+ bytes, but prepare.py wrote [\d,]+ \(cut short or replaced\)", demo, tmp_path, "--clm",
            "--steps", "1", "--data", str(data))
    (data / "eval.json").write_text("[{")
    refused(r"eval.json: 2 bytes, but prepare.py wrote", demo, tmp_path, "--clm", "--steps", "1", "--data", str(data))
    run(demo, tmp_path, "--ref", "--steps", "1", "--eval_problems", "0")
    scores = tmp_path / "ref" / "ref_scores.bin"
    good = scores.read_bytes()
    assert json.loads((tmp_path / "ref" / "ref_scores.bin.json").read_text())["sha256"] == \
        hashlib.sha256(good).hexdigest()
    scores.write_bytes(bytes(len(good)))
    refused(r"ref_scores.bin: its content is not what scoring wrote \(sha256 differs\): re-run `python rho.py "
            r"--score --name ref", demo, tmp_path, "--slm", "--steps", "1")
    score(demo, tmp_path)  # scored again, not "kept"
    assert scores.read_bytes() == good
    info = (tmp_path / "ref" / "ref_scores.bin.json").read_text()
    (tmp_path / "ref" / "ref_scores.bin.json").write_text(info[:20])
    refused(r"ref_scores.bin.json: not valid JSON, or without the reference model's fingerprint: "
            r"re-run `python rho.py --score --name ref", demo, tmp_path, "--slm", "--steps", "1")
    score(demo, tmp_path)
    assert scores.read_bytes() == good and json.loads((tmp_path / "ref" / "ref_scores.bin.json").read_text())

def test_issue31_block_size_1_and_fsdp_shards_missing(demo, tmp_path):
    refused(r"^error: --block_size 1: answer accuracy needs a context of 2 tokens or more: pass a larger "
            r"--block_size, or --eval_problems 0$", demo, tmp_path, "--clm", "--steps", "1", "--block_size", "1")
    assert not (tmp_path / "clm").exists()
    run(demo, tmp_path, "--clm", "--steps", "1", "--eval_problems", "0", "--name", "c")
    ckpt = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    os.makedirs(tmp_path / "f")
    torch.save({**ckpt, "model": "ckpt-1.dcp", "optimizer": None}, tmp_path / "f" / "ckpt.pt")  # an FSDP run's
    refused(r"f/ckpt.pt: its weights are the FSDP shards ckpt-1.dcp beside it, which are missing: restore that "
            r"folder next to ckpt.pt", demo, tmp_path, "--clm", "--steps", "1", "--init_from", "f")

def test_issue31_ctrl_c_and_sigterm_say_where_the_run_stopped(demo, tmp_path, monkeypatch):
    real, handler = rho.lr_at, signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, as in a terminal: a shell's background job (CI's, nohup's) starts with SIGINT ignored
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    for how in ("SIGINT", "SIGTERM"):
        def stop_at_step_3(step, cfg):
            if step == 3:  # as a user's Ctrl-C (KeyboardInterrupt) or a scheduler's SIGTERM arrives
                os.kill(os.getpid(), getattr(signal, how))
            return real(step, cfg)
        monkeypatch.setattr(rho, "lr_at", stop_at_step_3)
        with pytest.raises(SystemExit, match=rf"^error: {how}: stopped at step 3 of 4; .*{how}/ckpt.pt holds step 2: "
                                             r"run the same command with --resume to continue$"):
            run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2", "--eval_problems", "0", "--name", how)
        assert signal.getsignal(signal.SIGTERM) == handler and not (tmp_path / how / rho.LOCK).exists()
    signal.signal(signal.SIGINT, interrupt)
    monkeypatch.setattr(rho, "lr_at", real)
    m = run(demo, tmp_path, "--clm", "--steps", "4", "--eval_every", "2", "--eval_problems", "0", "--name", "SIGTERM",
            "--resume")
    assert len(m["losses"]) == 4

def mismatched_child(rank, world, port, argvs, record):
    """A torchrun process whose flags are argvs[rank]: its SystemExit, kept in record.<rank>."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    importlib.reload(rho)
    try:
        rho.main(argvs[rank])
    except SystemExit as e:
        open(f"{record}.{rank}", "w").write(str(e.code))

def test_issue31_torchrun_processes_must_share_every_flag(demo, tmp_path):
    argv = ["--data", str(demo / "data"), "--out", str(tmp_path), *TINY, "--clm", "--eval_problems", "0"]
    argvs = [[*argv, "--steps", "2"], [*argv, "--steps", "3"]]
    torch.multiprocessing.spawn(mismatched_child, args=(2, free_port(), argvs, tmp_path / "exit"), nprocs=2)
    assert (tmp_path / "exit.0").read_text() == ("error: --steps: the processes were started with other values (rank "
                                                 "0: 2, rank 1: 3): start every process with the same flags")
    assert (tmp_path / "exit.1").read_text() == "1" and not (tmp_path / "clm").exists()

def test_issue31_ignored_flags_and_names_refused(tmp_path):
    for argv, msg in ((["--clm", "--score_dtype", "float16", "--scores", "loss", "--score_batch", "8"],
                       r"--score_batch --score_dtype --scores: --clm does not read them \(--ref's and --score's "
                       r"flags\); drop them"),
                      (["--slm", "--scores", "loss"], r"--scores: --slm does not read it .*; drop it"),
                      (["--clm", "--out", ""], r"--out '': give the runs' folder"),
                      (["--clm", "--name", "../x"], r"--name '../x': a run's name in --out: at most 100 characters, no "
                                                    r"path separators, not '.' or '..'"),
                      (["--clm", "--name", ".."], r"--name '..': a run's name"),
                      (["--slm", "--ref_run", "a/b"], r"--ref_run 'a/b': a run's name"),
                      (["--clm", "--name", "n" * 300], r"--name 'n{40}'...: a run's name in --out: at most 100")):
        with pytest.raises(SystemExit, match=rf"^error: {msg}"):
            rho.parse_args(argv)
    assert rho.parse_args(["--ref", "--scores", "loss"])[0].scores == "loss"

def test_issue31_head_scaled_by_its_config_refused_where_the_probe_passes(tmp_path):
    """Gemma 2's default soft-capping at 30 leaves a random model's small logits linear: the probe alone passes it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, head_dim=8)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(SystemExit, match=r"^error: --init_from .*gemma2: its logits are not a plain linear map of its "
                                         r"final hidden states \(final_logit_softcapping 30.0\): rho's fused head"):
        rho.load_hf(str(tmp_path / "gemma2"))
    with torch.no_grad():  # what the probe sees
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gemma2")
        idx = torch.arange(8)[None]
        h = hf.model(idx).last_hidden_state
        assert torch.allclose(hf(idx).logits, h @ hf.lm_head.weight.t(), rtol=1e-4, atol=1e-4)

# --- issue 31: prepare, tokenizers, bench
# What a careful user expects of prepare.py's and bench.py's edges, each against the folder's sha256 before and after:
# a refusal or a failure is one line and leaves every earlier file as it was, with no temp file and no new folder.

def sha_of(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in os.listdir(folder)}

def small_sources(tmp_path, n=120, name="web.txt"):
    """An hq .jsonl of GSM8K-style records (every 50th a validation record) and a web .txt."""
    hq = [{"question": f"Ann has {i} apples and buys {i + 3} more at the market on day {i}. How many does she have?",
           "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"} for i in range(n)]
    (tmp_path / "hq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hq))
    (tmp_path / name).write_text("\n\n".join(f"Page {i}: the sum of {i} and {i + 1} is {2 * i + 1}." for i in range(n)))
    return str(tmp_path / "hq.jsonl"), str(tmp_path / name)

def prepare_fails(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        prepare.main(argv)
    msg = str(e.value)
    assert "\n" not in msg and (capsys is None or "Traceback" not in capsys.readouterr().err), msg
    return msg

class FullDisk:
    """A temp file on a full disk: every write fails, and so does the flush as it closes."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        raise OSError(28, "No space left on device")

    def close(self):
        self.f.close()
        raise OSError(28, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

def test_prepare_full_disk_and_ctrl_c_keep_the_folder(tmp_path, monkeypatch, capsys):
    """The demo and file sources on a full disk (the last write failing again while the temp files go), and Ctrl-C
    while tokenizing: one line each, every earlier file unchanged, no temp file."""
    demo = tmp_path / "demo"
    small = ["--web_tokens", "20000", "--base_tokens", "5000", "--out", str(demo)]
    prepare.main(small)
    before, real_open = sha_of(demo), prepare.open_temp

    def full_disk(path, where=""):  # the temp file, and the one the run discards, both on the full disk
        prepare._temps[path + ".tmp"] = f = FullDisk(real_open(path)) if where in path else real_open(path)
        return f
    monkeypatch.setattr(prepare, "open_temp", lambda path: full_disk(path, "web"))
    assert prepare_fails(small, capsys) == (f"error: {demo}: No space left on device; nothing was replaced ({demo} "
                                            f"keeps what it held): free space or fix the folder, then run the same "
                                            f"command again")
    assert sha_of(demo) == before
    hq, web = small_sources(tmp_path)
    files = ["--hq", hq, "--web", web, "--out", str(tmp_path / "o"), "--procs", "1"]
    assert not any(f.endswith(".tmp") for f in os.listdir(demo))
    monkeypatch.undo()
    prepare.main(files)
    before = sha_of(tmp_path / "o")
    monkeypatch.setattr(prepare, "open_temp", full_disk)
    assert "No space left on device; nothing was replaced" in prepare_fails(files, capsys)
    assert sha_of(tmp_path / "o") == before
    assert prepare_fails([*files[:-4], "--out", str(tmp_path / "new"), "--procs", "1"]) == (
        f"error: {tmp_path / 'new'}: No space left on device; nothing was written: free space or fix the folder, "
        f"then run the same command again")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    real_tasks = prepare.run_tasks

    def ctrl_c(tasks, pool, depth):  # the first task's tokens, then Ctrl-C
        yield next(real_tasks(tasks, pool, depth))
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "run_tasks", ctrl_c)
    with pytest.raises(SystemExit) as e:
        prepare.main(files)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 130 and err == (f"prepare: interrupted while reading {hq}; nothing was replaced "
                                           f"({tmp_path / 'o'} keeps what it held): run the same command again to "
                                           f"start over")
    assert sha_of(tmp_path / "o") == before
    prepare.init_worker("bytes", pool=True)  # a worker leaves Ctrl-C to the main process
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)

def test_prepare_refuses_a_folder_of_other_data_and_a_web_source_twice(tmp_path, capsys):
    """Other inputs into a folder of prepared data: refused before any work (recorded inputs) or before any rename
    (files that differ); the same command again rewrites the same bytes; --overwrite replaces. A --web source given
    twice, by another path or as a copy, is refused; a failed command leaves no folder it made."""
    hq, web = small_sources(tmp_path)
    out = tmp_path / "o"
    prepare.main(["--hq", hq, "--web", web, "--out", str(out), "--procs", "1"])
    before = sha_of(out)
    prepare.main(["--hq", hq, "--web", web, "--out", str(out), "--procs", "2"])  # the same data: written again
    assert sha_of(out) == before
    (tmp_path / "web2.txt").write_text("Another page.\n\nAnd one more, with other words in it.\n")
    other = ["--hq", hq, "--web", str(tmp_path / "web2.txt"), "--out", str(out), "--procs", "1"]
    assert prepare_fails(other, capsys) == (f"error: --out {out}: holds data prepared from other inputs (--web "
                                            f"{web}, not {tmp_path / 'web2.txt'}); nothing was changed: pass "
                                            f"--overwrite to replace it, or give another --out")
    assert prepare_fails(["--out", str(out)], capsys) == (f"error: --out {out}: holds data prepared from other "
                                                          f"inputs (--hq {hq}, not the embedded demo); nothing was "
                                                          f"changed: pass --overwrite to replace it, or give another "
                                                          f"--out")
    meta = json.loads((out / "meta.json").read_text())
    del meta["inputs"]  # as an older prepare.py wrote it: the files themselves are compared, after the work
    (out / "meta.json").write_text(json.dumps(meta))
    before = sha_of(out)
    assert prepare_fails(other, capsys).endswith("holds other prepared data (web.bin differs); nothing was changed: "
                                                 "pass --overwrite to replace it, or give another --out")
    assert sha_of(out) == before and not any(f.suffix == ".tmp" for f in out.iterdir())
    demo = ["--out", str(out), "--web_tokens", "20000", "--base_tokens", "5000"]
    assert prepare_fails(demo, capsys).endswith("holds other prepared data (hq_val.bin differs); nothing was changed: "
                                                "pass --overwrite to replace it, or give another --out")
    prepare.main([*other, "--overwrite"])
    assert json.loads((out / "meta.json").read_text())["inputs"]["web"] == [str(tmp_path / "web2.txt")]
    shutil.copy(web, tmp_path / "copy.txt")
    new = tmp_path / "new" / "deeper"
    assert prepare_fails(["--hq", hq, "--web", web, f"{tmp_path}/./web.txt", "--out", str(new)]) == (
        f"error: {tmp_path}/./web.txt: given twice in --web ({web} is the same file), so it would be trained "
        f"on twice; give each source once")
    assert prepare_fails(["--hq", hq, "--web", web, str(tmp_path / "copy.txt"), "--out", str(new)]).startswith(
        f"error: {tmp_path / 'copy.txt'}: the same content as {web} (sha256 ")
    (tmp_path / "v.txt").write_text("A short validation text here")
    assert prepare_fails(["--hq", hq, "--web", web, "--val", str(tmp_path / "v.txt"), "--out", str(new)]) == (
        f"error: {tmp_path / 'v.txt'}: hq_val.bin would hold 29 tokens, fewer than 33, too few to evaluate (rho.py "
        f"reads windows of --block_size + 1 tokens: 65 at its default): give more validation documents")
    assert not (tmp_path / "new").exists()

def test_prepare_encoding_names_bom_and_tokenizer_paths(tmp_path, monkeypatch, capsys):
    """An unknown --encoding lists the valid ones; a .jsonl with a UTF-8 byte order mark reads as without one; a
    tokenizer directory given by a relative path is recorded by its absolute one, and a missing one is named."""
    msg = prepare_fails(["--encoding", "nosuch", "--out", str(tmp_path / "o")])
    assert msg.startswith("error: --encoding nosuch: tiktoken could not load it: unknown encoding; choose bytes "
                          "(built in), gpt2, ") and "hf:NAME or a directory" in msg
    assert prepare_fails(["--encoding", "./tok", "--out", str(tmp_path / "o")]).startswith(
        "error: --encoding ./tok: no such tokenizer directory")
    assert not (tmp_path / "o").exists()
    hq, web = small_sources(tmp_path)
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + open(hq, "rb").read())
    for name, source in (("b", str(tmp_path / "bom.jsonl")), ("p", hq)):
        prepare.main(["--hq", source, "--web", web, "--out", str(tmp_path / name), "--procs", "1"])
    assert (tmp_path / "b" / "hq_train.bin").read_bytes() == (tmp_path / "p" / "hq_train.bin").read_bytes()
    model = tmp_path / "tok"
    tiny_llama_with_tokenizer(str(model), ["Page 1: the sum of 1 and 2 is 3."] * 20)
    monkeypatch.chdir(tmp_path)
    prepare.main(["--hq", hq, "--web", web, "--out", "rel", "--encoding", "tok", "--procs", "1"])
    meta = json.loads((tmp_path / "rel" / "meta.json").read_text())
    assert meta["encoding"] == meta["tokenizer"]["name"] == str(model)
    shutil.rmtree(model)
    with pytest.raises(SystemExit, match=rf"^error: --encoding {model}: no such tokenizer directory; .* if the "
                                         rf"tokenizer moved, put it back there or prepare the data again\)$"):
        rho.get_encoding(meta["encoding"])  # as rho.py reads the data's tokenizer

def test_hf_tokenizer_offline_fails_fast_and_is_asked_once(tmp_path, monkeypatch):
    """Not in the cache and the hub unreachable: transformers is asked once, from the cache only, and the one line
    says what to do (rho's --init_from too); with the hub reachable, it is asked again, from the hub."""
    transformers = pytest.importorskip("transformers")
    calls = []

    def offline(name, **kw):
        calls.append(kw.get("local_files_only", False))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr(prepare, "hub_reachable", lambda: False)
    assert prepare_fails(["--encoding", "hf:gpt2", "--out", str(tmp_path / "o")]) == (
        "error: --encoding hf:gpt2: could not load its tokenizer (We couldn't connect to 'https://huggingface.co' to "
        "load the files, and couldn't find them in the cached files.): run once where huggingface.co answers (it is "
        "then cached), or pass a directory saved with save_pretrained")
    assert calls == [True] and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match=r"^error: --init_from hf:gpt2: could not load it \(We couldn't connect"):
        rho.load_hf("hf:gpt2")
    assert calls == [True, True]
    monkeypatch.setattr(prepare, "hub_reachable", lambda: True)
    with pytest.raises(SystemExit):
        rho.load_hf("hf:gpt2")
    assert calls == [True, True, True, False]
    monkeypatch.undo()
    monkeypatch.setattr(importlib.import_module("huggingface_hub").constants, "HF_HUB_OFFLINE", True)
    assert prepare.hub_reachable() is False

def test_hf_tokenizer_identity_and_special_tokens_in_text(tmp_path, capsys):
    """meta.json records the tokenizer's fingerprint; a model whose own tokenizer differs (a vocabulary no larger than
    its own, which the size check lets through) is refused; "<s>" and "</s>" inside a web page stay text: the ids of
    those tokens mark only the documents' ends."""
    web = [f"<p>Page {i}: the sum of {i} and {i + 1} is {2 * i + 1}.</s> <s>next</p>" for i in range(150)]
    qa = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
          for a in range(12) for b in range(12)]
    (tmp_path / "hq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (tmp_path / "web.txt").write_text("\n\n".join(web) + "\n")
    ours, other = str(tmp_path / "ours"), str(tmp_path / "other")
    tiny_llama_with_tokenizer(ours, web + [r["question"] for r in qa])
    tiny_llama_with_tokenizer(other, [f"Other words {i}, other merges {i * i}." for i in range(300)])
    data = tmp_path / "data"
    prepare.main(["--hq", str(tmp_path / "hq.jsonl"), "--web", str(tmp_path / "web.txt"), "--out", str(data),
                  "--encoding", ours, "--procs", "1"])
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"] == {"name": ours, "sha256": prepare.tokenizer_id(prepare.get_encoding(ours))}
    ids = np.fromfile(data / "web.bin", np.uint16)
    assert (ids == 0).sum() == (ids == 1).sum() == len(web)  # one <s> and one </s> a document: its boundaries
    assert prepare.get_encoding(ours).decode(ids[:np.argmax(ids == 1)].tolist()) == web[0]
    assert prepare.tokenizer_id_of(str(tmp_path)) is None  # no tokenizer saved there
    cfg, shape = rho.parse_args(["--clm", "--data", str(data), "--init_from", other, "--device", "cpu"])
    with pytest.raises(SystemExit, match=rf"^error: --init_from {other}: {data} was prepared with another tokenizer "
                                         rf"\({ours}\): prepare it with `python prepare.py ... --encoding {other}`$"):
        rho.build_model(cfg, rho.load_meta(str(data)), shape)
    cfg.init_from = ours
    assert rho.build_model(cfg, rho.load_meta(str(data)), shape).config.vocab_size == 320

def test_bench_devices_and_k_one_line(capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^error: --device cuda: no CUDA device here "
                                             r"\(torch.cuda.is_available\(\) is False\): use --device cpu$"):
            bench.main(["--device", "cuda"])
        with pytest.raises(SystemExit, match=r"^error: --gpu: no CUDA device here .*: run it on a GPU machine, or add "
                                             r"--device cpu to check its plan at toy sizes$"):
            bench.main(["--gpu"])
    for k in ("0", "-0.5", "1.5"):
        with pytest.raises(SystemExit, match=rf"^error: --k {float(k)}: the share of tokens SLM selects must be in "
                                             rf"\(0, 1\], e.g. 0.6$"):
            bench.main(["--k", k])

# -----------------------------------------------------------------------------
# --- issue 33: export: export.py's folder through transformers against rho's own model (logits), the data's ids
# (tokenizer) and training (--init_from the folder); lm_eval_tasks/rho_heldout against rho's answers(); report.py's
# reader of lm-eval's samples files

import export  # noqa: E402

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")

def rho_logits(path, idx):  # a run's logits as rho computes them, fp32
    model = rho.model_from_checkpoint(rho.load_checkpoint(path), None, path).eval()
    with torch.no_grad():
        return model.lm_head(model(idx))

def hf_logits(folder, idx):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return type(hf).__name__, hf(idx).logits

def test_export_gpt_logits_equal_and_folder_kept(demo, tmp_path, capsys, monkeypatch):
    """rho's GPT (2 layers) as GPT2LMHeadModel: transformers' logits are rho's (fp32, atol 1e-5); the folder is
    written whole and never replaced without --overwrite, and then only if it is an export; what cannot be exported
    says so in one line."""
    pytest.importorskip("transformers")
    run(demo, tmp_path, "--base", "--steps", "2", "--eval_every", "2", "--n_layer", "2")
    out = tmp_path / "hf" / "base"
    export.main([str(tmp_path / "base"), str(out)])
    idx = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(0))
    kind, got = hf_logits(out, idx)
    assert kind == "GPT2LMHeadModel"
    torch.testing.assert_close(got, rho_logits(str(tmp_path / "base" / "ckpt.pt"), idx), rtol=0, atol=1e-5)
    printed = capsys.readouterr().out
    assert f"-> {out}: GPT2LMHeadModel, " in printed and "max_length=32," in printed and "max_gen_toks=16 " in printed
    with pytest.raises(SystemExit, match=r"^error: .*hf/base: exists: pass --overwrite to replace it, or another "):
        export.main([str(tmp_path / "base"), str(out)])
    (out / "mark").write_text("")
    export.main([str(tmp_path / "base"), str(out), "--overwrite"])
    assert not (out / "mark").exists() and os.listdir(tmp_path / "hf") == ["base"]  # no temporary folder left
    with pytest.raises(SystemExit, match=r"^error: .*: holds files that are not an exported model \(no config.json\)"):
        export.main([str(tmp_path / "base"), str(tmp_path), "--overwrite"])
    with pytest.raises(SystemExit, match=r"^error: .*nothing: no such run checkpoint \(RUN_DIR: a run folder"):
        export.main([str(tmp_path / "nothing"), str(tmp_path / "hf2")])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"^error: .*other.pt: a torch file, but not a checkpoint written by rho.py"):
        export.main([str(tmp_path / "other.pt"), str(tmp_path / "hf2")])
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(SystemExit, match=r"^error: export.py needs transformers and tokenizers: pip install "):
        export.main([str(tmp_path / "base"), str(tmp_path / "hf2")])
    assert not (tmp_path / "hf2").exists()

def test_export_fsdp_shards_gathered(demo, tmp_path):
    """A run saved as torch.distributed.checkpoint shards (ckpt.pt names the folder, as under --fsdp) exports the same
    model as its whole state_dict; shards gone: one line."""
    pytest.importorskip("transformers")
    import warnings

    import torch.distributed.checkpoint as dcp
    run(demo, tmp_path, "--base", "--steps", "2", "--eval_every", "2")
    path = tmp_path / "base" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    with warnings.catch_warnings(action="ignore"):  # its "assuming ... a single process"
        dcp.save({"model": ckpt["model"]}, checkpoint_id=str(tmp_path / "base" / "ckpt-2.dcp"), no_dist=True)
    torch.save({**ckpt, "model": "ckpt-2.dcp"}, path)
    export.main([str(tmp_path / "base"), str(tmp_path / "hf")])
    idx = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(tmp_path / "hf", idx)[1], rho_logits(str(path), idx), rtol=0, atol=1e-5)
    shutil.rmtree(tmp_path / "base" / "ckpt-2.dcp")
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt: its weights are the FSDP shards ckpt-2.dcp beside it, "
                                         r"which are missing: restore that folder next to ckpt.pt"):
        export.main([str(tmp_path / "base"), str(tmp_path / "hf2")])

def test_export_reloaded_by_init_from_continues_with_the_same_losses(demo, tmp_path):
    """--clm from the exported folder (transformers' GPT-2 under rho's fused head) against --clm from the run itself
    (rho's GPT): the same batches, so the same losses up to fp32 summation order (transformers' attention and
    Conv1D's addmm against rho's SDPA and nn.Linear): rtol 1e-5 over 3 steps."""
    pytest.importorskip("transformers")
    run(demo, tmp_path, "--base", "--steps", "4", "--eval_every", "4")
    export.main([str(tmp_path / "base"), str(tmp_path / "hf")])
    cont = ["--clm", "--steps", "3", "--eval_every", "3", "--lr", "1e-3"]
    own = run(demo, tmp_path, *cont, "--init_from", "base", "--name", "own")
    hf = run(demo, tmp_path, *cont, "--init_from", str(tmp_path / "hf"), "--name", "hf")
    assert hf["model_config"] == own["model_config"] and hf["n_params"] == own["n_params"]
    np.testing.assert_allclose(hf["losses"], own["losses"], rtol=1e-5)
    for key in ("val_loss_hq", "val_loss_web"):
        assert abs(hf["final"][key] - own["final"][key]) <= 1e-4  # rounded to 4 decimals

def tiny_tiktoken(texts, n_merges=60):
    """A tiktoken Encoding with merges, built here (no download): byte-pair merges learnt on texts within GPT-2's
    pieces (its regex), <|endoftext|> after them."""
    import collections
    import tiktoken
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ranks = {bytes([i]): i for i in range(256)}
    words = [[bytes([b]) for b in w.encode()] for t in texts for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", t)]
    for _ in range(n_merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                w[i:i + 2] = [a + b] if (w[i], w[i + 1]) == (a, b) else w[i:i + 2]
                i += 1
    return tiktoken.Encoding(name="tiny", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={prepare.EOT: len(ranks)})

def test_export_tokenizers_give_the_data_ids(demo, tmp_path):
    """The exported byte-level tokenizer, loaded by AutoTokenizer: the data's ids for every held-out problem (its
    prompt and its worked answer) and every held-out document of hq_val.bin, and decodes them back (ids of the
    padded vocabulary dropped, as rho's answers() drops them); a tiktoken encoding with merges converted the same way
    gives tiktoken's ids."""
    transformers = pytest.importorskip("transformers")
    export.tokenizer_of("bytes", 64).save_pretrained(tmp_path / "tok")
    tok, enc = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok"), prepare.byte_encoding()
    texts = [t for p in json.loads((demo / "data" / "eval.json").read_text())
             for t in (p["prompt"], f"{p['prompt']} {p['answer']}\n#### {p['answer']}")]
    ids = np.fromfile(demo / "data" / "hq_val.bin", np.uint16).tolist()
    ends = [i for i, t in enumerate(ids) if t == enc.eot_token]
    docs = [ids[a + 1:b] for a, b in zip([-1, *ends], ends)]  # each held-out document, as the data holds its ids
    assert len(docs) == 300 and len(texts) == 96
    for want in [enc.encode_ordinary(t) for t in texts] + docs:
        text = enc.decode(want)
        assert tok(text)["input_ids"] == want and tok.decode(want) == text
    assert tok.eos_token_id == enc.eot_token and tok.decode([72, 300, 105, enc.eot_token], skip_special_tokens=True) \
        == "Hi"
    for p in task_module().problems(str(demo / "data")):  # lm-eval's input (add_bos_token=False): rho's prompt ids
        assert tok(p["context"], add_special_tokens=False)["input_ids"] == [enc.eot_token] + enc.encode_ordinary(
            p["prompt"])
    corpus = ["The answer is: 42. Then the cat's 3 apples cost $12.50 each; it's 1,000 in all."] * 3
    tiny = tiny_tiktoken(corpus)
    tk = export.byte_level_tokenizer(tiny)
    for text in [*corpus, "théâtre 日本 the  answers\n\n  x<|endoftext|>They'll", *texts[:20]]:
        want = tiny.encode(text, allowed_special="all")
        assert tk.encode(text).ids == want and tk.decode(want, skip_special_tokens=False) == text
    assert len(tiny.encode(corpus[0])) < len(corpus[0]) / 2  # the merges are used

def test_export_llama_run_logits_and_tokenizer(tmp_path):
    """A run from a tiny random Llama (its own tokenizer, its BOS/EOS): exported as LlamaForCausalLM, transformers'
    logits are rho's (fp32, atol 1e-5), and its tokenizer gives the data's ids on every held-out problem."""
    transformers = pytest.importorskip("transformers")
    qa = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
          for a in range(10) for b in range(10)]
    (tmp_path / "hq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (tmp_path / "web.txt").write_text("\n\n".join(f"Page {i}: the sum of {i} and 2 is {i + 2}." for i in range(200)))
    model, data = str(tmp_path / "tiny-llama"), str(tmp_path / "data")
    tiny_llama_with_tokenizer(model, [r["question"] + " " + r["answer"] for r in qa])
    prepare.main(["--hq", str(tmp_path / "hq.jsonl"), "--web", str(tmp_path / "web.txt"), "--out", data,
                  "--encoding", model, "--procs", "1"])
    rho.main(["--clm", "--data", data, "--out", str(tmp_path / "out"), "--init_from", model, "--steps", "1",
              "--batch_size", "4", "--block_size", "32", "--eval_every", "1", "--eval_problems", "0"])
    export.main([str(tmp_path / "out" / "clm"), str(tmp_path / "hf")])
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    kind, got = hf_logits(tmp_path / "hf", idx)
    assert kind == "LlamaForCausalLM"
    torch.testing.assert_close(got, rho_logits(str(tmp_path / "out" / "clm" / "ckpt.pt"), idx), rtol=0, atol=1e-5)
    tok, enc = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), prepare.get_encoding(model)
    problems = json.loads((tmp_path / "data" / "eval.json").read_text())
    assert len(problems) == 2 and tok.eos_token_id == enc.eot_token  # every 50th hq record is held out
    for p in problems:
        want = enc.encode_ordinary(p["prompt"])
        assert want[0] == tok.bos_token_id and tok(p["prompt"])["input_ids"] == want
        assert tok.decode(want, skip_special_tokens=True) == p["prompt"]
    for p in task_module().problems(data):  # lm-eval's input (add_bos_token=False): rho's ids, </s> <s> Question...
        assert tok(p["context"], add_special_tokens=False)["input_ids"] == [enc.eot_token] + enc.encode_ordinary(
            p["prompt"])

def task_module():  # lm_eval_tasks/rho_heldout.py, as lm-eval loads a task's !function module: from its file
    import importlib.util
    spec = importlib.util.spec_from_file_location("rho_heldout", os.path.join(TASKS, "rho_heldout.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def test_lm_eval_task_file_asks_and_scores_as_rho(tmp_path):
    """The task file's pieces without lm-eval: rho's prompt ids as text (their test: the tokenizers' below), zero-shot,
    greedy, no stop string but the end-of-text token (lm-eval adds it), rho's 48 new tokens; the score is rho's
    (final_answer equals the answer)."""
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):  # lm-eval's !function tag: here its name
        pass
    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(os.path.join(TASKS, "rho_heldout.yaml")) as f:
        cfg = yaml.load(f, Loader)
    assert (cfg["task"], cfg["output_type"], cfg["doc_to_text"], cfg["doc_to_target"], cfg["num_fewshot"]) == \
        ("rho_heldout", "generate_until", "{{context}}", "{{answer}}", 0)
    assert cfg["generation_kwargs"] == {"until": [], "do_sample": False, "max_gen_toks": 48}
    assert (cfg["custom_dataset"], cfg["process_results"]) == ("rho_heldout.load", "rho_heldout.process_results")
    assert cfg["metric_list"][0]["metric"] == "exact_match"
    task = task_module()
    for text, answer, right in ((" 7\n#### 7\nQuestion:", "7", 1), (" 12\n#### 1,000.50", "1000.5", 1),
                                (" 7\n#### 8", "7", 0), (" 7", "7", 0), ("The answer is: -3.", "-3", 1)):
        assert task.process_results({"prompt": "", "answer": answer}, [text]) == {"exact_match": right}
        assert right == int(prepare.final_answer(text) == answer)
    with pytest.raises(SystemExit, match=r"^error: .*nowhere/eval.json: no held-out problems: pass --metadata "):
        task.load(str(tmp_path / "nowhere"))

def rho_texts(model, problems, enc):  # the texts answers() reads, each up to the end-of-text token
    cut = lambda o: o[:o.index(enc.eot_token)] if enc.eot_token in o else o
    text = lambda o: enc.decode([t for t in cut(o) if t < enc.n_vocab])  # padded ids dropped
    prompts = [[enc.eot_token] + enc.encode_ordinary(p["prompt"]) for p in problems]
    done = lambda o: enc.eot_token in o or rho.answer_settled(text(o))
    return [text(o) for i in range(0, len(prompts), 64) for o in rho.generate(model, prompts[i:i + 64], 48, done)]

def test_lm_eval_runs_the_task_offline_with_rho_answers(demo, tmp_path, monkeypatch, capsys):
    """lm-eval itself (where installed; CI does not install it): export.py's printed command, offline, on an exported
    run: for every held-out problem the text rho's answers() generates (rho stops a batch once every row's answer is
    settled, lm-eval at its max_gen_toks: one text a prefix of the other) and the same 0/1 score; report.read_lm_eval
    reads them back in eval.json's order."""
    pytest.importorskip("lm_eval")
    import shlex
    run(demo, tmp_path, "--base", "--steps", "2", "--eval_every", "2", "--block_size", "128")  # prompts whole
    ckpt, gen = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True), torch.Generator().manual_seed(0)
    for t in ckpt["model"].values():  # weights far from their init: texts that differ from problem to problem
        t.add_(torch.randn(t.shape, generator=gen))
    torch.save(ckpt, tmp_path / "base" / "ckpt.pt")
    export.main([str(tmp_path / "base"), str(tmp_path / "hf")])
    command = capsys.readouterr().out.splitlines()[-1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [TASKS if a == "lm_eval_tasks" else a for a in shlex.split(command)]
                        + ["--device", "cpu"])
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
    got = report.read_lm_eval(str(tmp_path / "base"))
    path = str(tmp_path / "base" / "ckpt.pt")
    model, enc = rho.model_from_checkpoint(rho.load_checkpoint(path), None, path).eval(), prepare.byte_encoding()
    problems = json.loads((demo / "data" / "eval.json").read_text())
    assert list(got) == ["rho_heldout"] and got["rho_heldout"].tolist() == rho.answers(model, problems, enc, 48)
    samples = [json.loads(line) for f in (tmp_path / "base" / "lm_eval").glob("*/samples_rho_heldout_*.jsonl")
               for line in f.read_text().splitlines()]
    assert [{k: s["doc"][k] for k in ("prompt", "answer")} for s in sorted(samples, key=lambda s: s["doc_id"])] \
        == [{k: p[k] for k in ("prompt", "answer")} for p in problems]
    for s, text in zip(sorted(samples, key=lambda s: s["doc_id"]), rho_texts(model, problems, enc)):
        assert s["resps"][0][0].startswith(text) or text.startswith(s["resps"][0][0])
    assert len({s["resps"][0][0] for s in samples}) > 5  # texts that differ from problem to problem

def lm_eval_samples(path, task_rows):
    """A samples file as `lm_eval ... --log_samples` writes it (lm-eval 0.4.13): a JSON line per problem and filter."""
    lines = []
    for doc_id, doc, filt, metrics, resp in task_rows:
        gen = {"until": [], "do_sample": False, "max_gen_toks": 32}
        lines.append(json.dumps({"doc_id": doc_id, "doc": doc, "target": doc["answer"],
                                 "arguments": {"gen_args_0": {"arg_0": doc["prompt"], "arg_1": gen}},
                                 "resps": [[resp]], "filtered_resps": [resp], "filter": filt, "metrics": list(metrics),
                                 "doc_hash": "263a5e", "prompt_hash": "77f768", "target_hash": "d4735e", **metrics}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")

def test_report_reads_lm_eval_samples(tmp_path):
    """report.read_lm_eval: the newest samples file of each task under <run>/lm_eval, 0/1 in doc_id order, a key per
    filter where a task has several (gsm8k_cot), exact_match first; {} without any; a broken file in one line."""
    run_dir = tmp_path / "slm-k0.6"
    assert report.read_lm_eval(str(run_dir)) == {}
    model = run_dir / "lm_eval" / "__work__hf__slm-k0.6"
    docs = [{"prompt": f"Question: {a} + 1 = ?\nAnswer:", "answer": str(a + 1)} for a in range(4)]
    (model.parent / "x").mkdir(parents=True)
    (model.parent / "x" / "results_2026-12-07T09-43-18.925137.json").write_text("{}")  # results alone: not read
    lm_eval_samples(model / "samples_rho_heldout_2026-12-06T23-59-59.000001.jsonl",  # an older run: not read
                    [(i, d, "none", {"exact_match": 0}, "") for i, d in enumerate(docs)])
    lm_eval_samples(model / "samples_rho_heldout_2026-12-07T09-43-18.925137.jsonl",
                    [(i, docs[i], "none", {"exact_match": int(i % 2 == 0)}, " 1\n#### 1") for i in (2, 0, 3, 1)])
    lm_eval_samples(model / "samples_gsm8k_cot_2026-12-07T10-00-00.000000.jsonl",
                    [(i, d, f, {"exact_match": float(f == "strict-match" and i < 2)}, "The answer is 1.")
                     for f in ("strict-match", "flexible-extract") for i, d in enumerate(docs)])
    lm_eval_samples(model / "samples_minerva_math_algebra_2026-12-07T10-00-00.000000.jsonl",
                    [(i, d, "none", {"math_verify": 1, "exact_match": i % 2}, "") for i, d in enumerate(docs[:3])])
    got = report.read_lm_eval(str(run_dir))
    assert {k: v.tolist() for k, v in got.items()} == {
        "gsm8k_cot,flexible-extract": [0, 0, 0, 0], "gsm8k_cot,strict-match": [1, 1, 0, 0],
        "minerva_math_algebra": [0, 1, 0], "rho_heldout": [1, 0, 1, 0]}
    assert got["rho_heldout"].dtype == np.int64
    lm_eval_samples(model / "samples_rho_heldout_2026-12-08T00-00-00.000000.jsonl",  # a problem missing
                    [(i, d, "none", {"exact_match": 1}, "") for i, d in enumerate(docs) if i != 1])
    with pytest.raises(SystemExit, match=r"^error: .*samples_rho_heldout_2026-12-08T00-00-00.000000.jsonl: not one "
                                         r"0/1 exact_match per problem 0..2 \(filter none\): run lm-eval again into "):
        report.read_lm_eval(str(run_dir))
    path = model / "samples_rho_heldout_2026-12-08T00-00-00.000000.jsonl"
    path.write_text(path.read_text()[:100])  # cut short
    with pytest.raises(SystemExit, match=r"^error: .*jsonl: not lm-eval's samples file \(JSONDecodeError: .*\): run "):
        report.read_lm_eval(str(run_dir))

def test_report_pairs_lm_eval_accuracies_as_its_own():
    """lm-eval's answers of each run (read_lm_eval) are paired with CLM's of the same seed as rho's own accuracy: the
    t test over seeds in the table's Holm family, McNemar describing each seed's pair of runs."""
    rng = np.random.default_rng(3)
    groups = {name: [{**r, "lm_eval": {"rho_heldout": (rng.random(200) < p).astype(np.int64)}}
                     for r in synthetic([1.0, 1.1, 0.9], rng.random((3, 200)) < p)] for name, p in (("clm", 0.3),
                                                                                                     ("slm", 0.6))}
    t = report.against(groups, "clm")["slm"]
    lm = t["lm-eval rho_heldout"]
    d = [r["lm_eval"]["rho_heldout"].mean() - b["lm_eval"]["rho_heldout"].mean() for b, r in zip(*groups.values())]
    assert np.allclose(lm["per_seed"], d) and lm["family"] == 3 and len(lm["each_seed"]) == 3
    assert lm["each_seed"][0]["discordant"][0] == int(((groups["slm"][0]["lm_eval"]["rho_heldout"] == 1)
                                                       & (groups["clm"][0]["lm_eval"]["rho_heldout"] == 0)).sum())
    assert "lm-eval rho_heldout" in report.per_seed_section(report.against(groups, "clm"), "clm")

# --- issue 31: misleading messages, review items
# each refusal: one line naming the flag or file and what works; the files that were there keep their sha256

def rejects(match, *argv, folder):
    """rho.main(argv) fails with one line matching match, and leaves folder's files as they were: the message."""
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}
    with pytest.raises(SystemExit, match=rf"^error: {match}") as e:
        rho.main([str(a) for a in argv])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()} == before
    assert "\n" not in str(e.value.code)
    return str(e.value.code)

def suggested(msg):
    """The argv of the first `python rho.py ...` command a message suggests."""
    return shlex.split(re.search(r"`python rho.py ([^`]*)`", msg).group(1))

def test_init_from_a_folder_empty_flags_and_help(demo, tmp_path, capsys):
    """--init_from a run's folder is its ckpt.pt; an empty folder or a data folder is named for what it is; --data ''
    and --ref_run '' are refused; --help shows --scores' two choices apart."""
    run(demo, tmp_path, "--base", "--steps", "1", "--eval_problems", "0")
    (tmp_path / "empty").mkdir()
    for folder, what in ((tmp_path / "empty", "an empty folder"), (demo / "data", r"prepared data \(meta.json\)")):
        rejects(rf"--init_from {folder}: {what}, not a model: pass a run's folder or its ckpt.pt, the name of a run "
                r"in --out \(.*\), scratch, hf:NAME, or a folder saved by transformers' save_pretrained$",
                "--data", demo / "data", "--out", tmp_path, *TINY, "--clm", "--steps", "1", "--init_from", folder,
                folder=tmp_path)
    assert not (tmp_path / "clm").exists()
    m = run(demo, tmp_path, "--clm", "--steps", "1", "--eval_problems", "0", "--init_from", str(tmp_path / "base"))
    assert m["init_sha256"] == rho.weights_sha256(weights_model := rho.model_from_checkpoint(
        rho.load_checkpoint(str(tmp_path / "base" / "ckpt.pt")), None, "")) and weights_model.config.n_layer == 1
    rejects(r"--data '': empty: name a prepared data folder \(default data/demo\)$", "--clm", "--data", "",
            "--out", tmp_path, folder=tmp_path)
    rejects(r"--ref_run '': empty: name a reference run in --out \(default ref\)$", "--slm", "--ref_run", "",
            "--data", demo / "data", "--out", tmp_path, folder=tmp_path)
    with pytest.raises(SystemExit):
        rho.parse_args(["--help"])
    assert "--scores {loss,entropy|loss}" in capsys.readouterr().out

def test_suggested_commands_run_as_is_after_a_scores_mismatch(demo, tmp_path):
    """Scores of other data (float16, L_RM alone, in another --out), a float16 file behind a float32 .json, a
    deleted .json: each message says which, and the command it suggests runs as printed (its --out, --data, the
    scores' layout, --overwrite where other data's scores go); the SLM run then trains."""
    prepare.main(["--out", str(tmp_path / "other"), "--web_tokens", "20000", "--seed", "5"])
    out = tmp_path / "o6"
    rho.main(["--data", str(tmp_path / "other"), "--out", str(out), *TINY, "--ref", "--steps", "1", "--scores", "loss",
              "--score_dtype", "float16", "--eval_problems", "0"])
    slm = ["--data", demo / "data", *TINY, "--slm", "--steps", "1", "--eval_problems", "0"]
    msg = rejects(r".*o6/ref/ref_scores.bin: reference scores do not match .*data: computed for .*other \(its "
                  r"meta.json differs\): re-run `python rho.py --score --name ref --data .*data --out .*o6 "
                  r"--score_dtype float16 --scores loss --overwrite`$", *slm, "--out", out, folder=tmp_path)
    rho.main(suggested(msg))
    assert np.fromfile(out / "ref" / "ref_scores.bin", np.float16).size == rho.load_meta(str(demo / "data"))[
        "tokens"]["web"]
    rho.main([str(a) for a in slm] + ["--out", str(out)])
    run(demo, tmp_path, "--ref", "--steps", "1", "--eval_problems", "0")
    run(demo, tmp_path / "half", "--ref", "--steps", "1", "--score_dtype", "float16", "--eval_problems", "0")
    shutil.copy(tmp_path / "half" / "ref" / "ref_scores.bin", tmp_path / "ref" / "ref_scores.bin")
    msg = rejects(r".*ref_scores.bin: reference scores do not match its .json: 4 bytes a token, as float32 loss or "
                  r"float16 loss,entropy scores are, but the .json says float32 loss,entropy \(8 bytes\): re-run "
                  r"`python rho.py --score --name ref --data .* --out .*`$", *slm, "--out", tmp_path, folder=tmp_path)
    rho.main(suggested(msg))
    os.remove(tmp_path / "ref" / "ref_scores.bin.json")
    msg = rejects(r".*ref_scores.bin.json: reference scores missing: re-run `python rho.py --score --name ref --data "
                  r".* --out .*`$", *slm, "--out", tmp_path, folder=tmp_path)
    rho.main(suggested(msg))
    assert rho.main([str(a) for a in slm] + ["--out", str(tmp_path)])["tokens_trained"] == math.ceil(0.6 * 4 * 32)

def test_divergence_eval_json_torn_checkpoint_and_short_eval_set(demo, tmp_path, capsys):
    """--weight_decay 1e6 diverges: the message names the flags that size a step, blames none, calls no weights good;
    a missing eval.json says so; a torn ckpt.pt is not offered --resume; --eval_problems above the eval set's size
    is said once."""
    msg = rejects(r"wd: the loss became nan at step \d+, stopped before its update; .*wd/ckpt.pt holds the last "
                  r"weights saved \(step \d+, val loss hq .*\)\. A step's size comes from --lr 0.003, "
                  r"--weight_decay 1e\+06, --grad_clip 1 \(and the data\): change what caused it, then start again "
                  r"with --overwrite",
                  "--data", demo / "data", "--out", tmp_path, *TINY, "--clm", "--steps", "8", "--eval_every", "2",
                  "--name", "wd", "--weight_decay", "1e6", folder=demo / "data")
    assert "good" not in msg and "lower --lr" not in msg
    shutil.copytree(demo / "data", tmp_path / "noeval", ignore=shutil.ignore_patterns("base.bin"))
    os.remove(tmp_path / "noeval" / "eval.json")
    rejects(r".*noeval/eval.json: missing \(prepare.py writes it beside the token files\): run prepare.py for .*noeval "
            r"again, or pass --eval_problems 0 to train without measuring accuracy$", "--data", tmp_path / "noeval",
            "--out", tmp_path / "o5", *TINY, "--clm", "--steps", "1", folder=tmp_path)
    assert not (tmp_path / "o5").exists()
    run(demo, tmp_path, "--clm", "--steps", "1", "--eval_problems", "0")
    (tmp_path / "clm" / "ckpt.pt").write_bytes((tmp_path / "clm" / "ckpt.pt").read_bytes()[:1000])  # a run cut
    os.remove(tmp_path / "clm" / "metrics.json")
    rejects(r".*clm: holds an unfinished run \(ckpt.pt, tokens.npz\): its ckpt.pt is not a whole torch file \(cut "
            r"short\?\), so it cannot resume: --overwrite replaces it, --name NAME starts this one beside it$",
            "--data", demo / "data", "--out", tmp_path, *TINY, "--clm", "--steps", "1", folder=tmp_path)
    capsys.readouterr()
    run(demo, tmp_path, "--clm", "--steps", "2", "--eval_every", "1", "--eval_problems", "200", "--overwrite")
    err = capsys.readouterr().err
    assert err.count("note: --eval_problems 200: ") == 1 and "eval.json holds 48 problems; each evaluation answers " \
        "all 48" in err

def test_failed_commands_leave_no_folder_they_made(demo, tmp_path, monkeypatch):
    """Fewer than one batch is refused before the run's folder is made; a run that fails (or is interrupted) before
    its first checkpoint removes the run folder and the --out folder it made, never a folder that was there."""
    for mode in ("--clm", "--ref"):
        rejects(r".*training windows of 33 tokens, fewer than one batch: lower --batch_size$", "--data",
                demo / "data", "--out", tmp_path / "o11", *TINY, mode, "--steps", "1", "--batch_size", "100000",
                folder=tmp_path)
    monkeypatch.setattr(rho, "evaluate", lambda *a: rho.die("failed in the evaluation"))
    with pytest.raises(SystemExit, match="failed in the evaluation"):
        run(demo, tmp_path / "o11", "--clm", "--steps", "1")
    monkeypatch.setattr(rho, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit, match="clm: stopped at step 0 of 1; no checkpoint yet"):  # Ctrl-C
        run(demo, tmp_path / "o11", "--clm", "--steps", "1")
    assert not (tmp_path / "o11").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(SystemExit, match="clm: stopped at step 0 of 1; no checkpoint yet"):
        run(demo, tmp_path / "kept", "--clm", "--steps", "1")
    assert os.listdir(tmp_path / "kept") == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_bf16_head_gemms_sum_and_store_in_fp32(device):
    """Review 6: mm_fp32 and addmm_fp32_ with bf16 operands (CUDA: the out_dtype GEMMs; CPU: the same math on fp32
    copies) equal a float64 product of the same bf16 values to fp32 precision, far inside bf16's rounding; so do the
    fused head's losses under CPU bf16 autocast (logits rounded to bf16 first erred by about 1e-2 nats here)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*shape, generator=g).bfloat16().to(device) for shape in ((37, 64), (64, 101)))
    want = a.double() @ b.double()
    out = rho.mm_fp32(a, b, torch.empty(37, 101, device=device))
    dw = torch.randn(37, 101, generator=g).to(device)
    acc = rho.addmm_fp32_(dw.clone(), a, b)
    bf16_error = (want.bfloat16().double() - want).abs().max()
    for got, ref in ((out, want), (acc, dw.double() + want)):
        assert got.dtype == torch.float32 and (got.double() - ref).abs().max() < min(1e-4, bf16_error / 50)
    h, w = torch.randn(1, 64, 64, generator=g), torch.randn(1000, 64, generator=g) * 0.3
    y = torch.randint(0, 1000, (1, 64), generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        loss = rho.head_losses(h, w, y).loss[0]
    logits = h[0].bfloat16().double() @ w.bfloat16().double().t()
    ref = torch.logsumexp(logits, 1) - logits.gather(1, y[0][:, None]).squeeze(1)
    assert (loss.double() - ref).abs().max() < 1e-5

def test_evaluation_runs_at_the_training_precision(demo, tmp_path, monkeypatch):
    """Review 8: the evaluation runs under the autocast that training and scoring use (--dtype bfloat16; on CUDA its
    default), not in fp32 beside them; at the CPU's default float32 there is none."""
    real, seen = rho.evaluate, []

    def evaluate(*a, **kw):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real(*a, **kw)
    monkeypatch.setattr(rho, "evaluate", evaluate)
    for dtype in ("bfloat16", "float32"):
        run(demo, tmp_path, "--clm", "--steps", "1", "--eval_problems", "0", "--dtype", dtype, "--name", dtype)
    assert seen == [torch.bfloat16, False]

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_generation_passes_a_cache_object_without_warnings(kind, tmp_path, monkeypatch):
    """Review 7: generate hands transformers a Cache object from its first step (the API transformers 5.23.0, which
    CI and the README pin, supports), with no warning, and gives transformers' own greedy tokens."""
    transformers = pytest.importorskip("transformers")
    hf = tiny_hf(vocab=320, kind=kind)
    hf.save_pretrained(tmp_path / kind)
    model = rho.load_hf(str(tmp_path / kind), 64).eval()
    real, passed = model.hf.base_model.forward, []

    def forward(*a, **kw):
        passed.append(type(kw["past_key_values"]))
        return real(*a, **kw)
    monkeypatch.setattr(model.hf.base_model, "forward", forward)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = rho.generate(model, prompts, 4)
    assert len(passed) == 5 and all(issubclass(t, transformers.Cache) for t in passed)  # the prompt, 4 tokens
    monkeypatch.undo()
    for p, g in zip(prompts, got):
        assert hf.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist() == g
    assert "transformers==5.23.0" in open(os.path.join(os.path.dirname(rho.__file__), "README.md")).read()

def test_compiled_run_gives_eager_losses(demo, one_process, tmp_path):
    """Review 9: --compile (the gpt2-owm preset's) trains as eager does: the same losses to rtol 1e-5 (Inductor fuses
    LayerNorm, GELU and the residual adds and so sums in another order: fp32 round-off of about 1e-7 a step; a wrong
    kernel moves a loss by far more) and the same selection. Skipped where torch.compile cannot run (no C compiler)."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as e:  # Inductor's CPU backend compiles C++: without a compiler it raises on the first call
        pytest.skip(f"torch.compile cannot run here: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    os.symlink(one_process[0] / "ref", tmp_path / "ref")
    argv = ("--slm", "--batch_size", "8", "--steps", "3", "--eval_every", "3", "--eval_problems", "0")
    eager, compiled = run(demo, tmp_path, *argv), run(demo, tmp_path, *argv, "--name", "compiled", "--compile")
    assert compiled["config"]["compile"] and not eager["config"]["compile"]
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=1e-5)
    assert compiled["tokens_trained"] == eager["tokens_trained"] and \
        compiled["noise_in_selected"] == eager["noise_in_selected"]
    assert compiled["final"]["val_loss_hq"] == pytest.approx(eager["final"]["val_loss_hq"], rel=1e-4)

def with_eval_set(demo, tmp_path, problems):
    """A copy of the demo data whose eval.json holds problems (meta.json records its size and sha256, as prepare)."""
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data, ignore=shutil.ignore_patterns("base.bin"))
    (data / "eval.json").write_text(json.dumps(problems))
    meta = json.loads((data / "meta.json").read_text())
    meta["files"]["eval.json"] = {"bytes": (data / "eval.json").stat().st_size,
                                  "sha256": prepare.file_sha256(data / "eval.json")}
    (data / "meta.json").write_text(json.dumps(meta, indent=2))
    return data

def test_answers_are_sized_from_the_eval_sets_reference_solutions(demo, tmp_path, capsys):
    """Review 4: an answer gets twice the longest reference solution's tokens and 16, within the half of the context
    generate leaves it (the demo: 11 bytes -> 38, capped to 32 of 64); a set whose solutions do not fit is said once;
    prompts keep the context's first half whatever max_new, so a longer max_new only lets an answer run on."""
    def sized(data, T):
        cfg = rho.RunConfig(data=str(data), eval_problems=4)
        meta = rho.load_meta(cfg.data)
        return rho.eval_sets(cfg, meta, rho.web_windows(cfg, meta, T)).max_new
    problems = json.loads((demo / "data" / "eval.json").read_text())
    assert max(len(p["solution"].encode()) for p in problems) == 11
    assert (sized(demo / "data", 64), sized(demo / "data", 32), sized(demo / "data", 128)) == (32, 16, 38)
    assert capsys.readouterr().err == ""
    long = with_eval_set(demo, tmp_path / "long", [{**p, "solution": " " + "x" * 39} for p in problems])
    assert sized(long, 64) == 32
    assert capsys.readouterr().err == (f"note: {long}/eval.json: reference answers of up to 40 tokens, but a context "
                                       "of 64 leaves answers 32: longer ones are cut short (a larger --block_size fits "
                                       "them)\n")
    torch.manual_seed(0)
    model = rho.GPT(rho.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = list(range(1, 14))  # longer than half the context: its last 8 tokens are kept, whatever max_new
    assert rho.generate(model, [prompt], 8)[0][:3] == rho.generate(model, [prompt], 3)[0] == \
        rho.generate(model, [prompt[-8:]], 3)[0]
    assert run(demo, tmp_path, "--clm", "--steps", "1")["answer_tokens"] == 16
