"""
export.py: a trained rho run as a Hugging Face folder (config, safetensors weights, tokenizer files) that
transformers' AutoModelForCausalLM and AutoTokenizer load offline, for your own code or lm-evaluation-harness.

    python export.py out/slm-k0.6 hf/slm-k0.6               # a run folder (or its ckpt.pt) -> a new folder
    python export.py out/slm-k0.6 hf/slm-k0.6 --overwrite   # replace an earlier export there

The model: rho's GPT as GPT2LMHeadModel (the same weights, its nn.Linear ones transposed to GPT-2's Conv1D layout),
a run started from a transformers model (--init_from hf:NAME or a directory) as that model's own class, an FSDP run's
shards gathered into one. The tokenizer, with the data's ids: the demo's bytes and tiktoken's encodings (gpt2) as
byte-level BPE tokenizers built here (no download), a transformers tokenizer (--encoding hf:NAME or a directory) as
it is. The folder is written under a temporary name beside OUT_DIR, then renamed into place.

It prints the lm-evaluation-harness command that answers the data's held-out problems as rho's own evaluation does
(lm_eval_tasks/rho_heldout.yaml: rho's prompt, greedy, its context and length, its answer pattern): SCALE.md.
"""
import argparse
import os
import shutil
import tempfile

from torch.distributed.checkpoint.api import CheckpointException

import prepare
import rho
from rho import die

# -----------------------------------------------------------------------------
# the model: rho's GPT is GPT-2 (GPT-2's names, 1:1); a transformers model is saved as itself

def gpt2_of(model, eot):
    """rho's GPT as transformers' GPT2LMHeadModel: the same architecture (pre-LayerNorm blocks, tanh GELU, tied
    head, learned positions), weights copied; GPT-2's Conv1D holds a weight as (in, out), nn.Linear as (out, in)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_pytorch_tanh",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot,
                                    eos_token_id=eot, tie_word_embeddings=True))
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    hf.load_state_dict({name: t.t().contiguous() if name.endswith(conv1d) else t
                        for name, t in model.state_dict().items()})  # strict: every weight, none left random
    return hf

def load_run(run):  # (the run's model, its checkpoint, the path) or one line saying why it cannot be exported
    path = os.path.join(run, "ckpt.pt") if os.path.isdir(run) else run
    ckpt = rho.load_checkpoint(path, what="run checkpoint (RUN_DIR: a run folder of rho.py, or its ckpt.pt)")
    try:
        return rho.model_from_checkpoint(ckpt, None, path).eval(), ckpt, path
    except (OSError, RuntimeError, ValueError, CheckpointException) as e:  # shards cut short or of another model
        die(f"{path}: its weights could not be read ({type(e).__name__}): export a complete run")

# -----------------------------------------------------------------------------
# the tokenizer: the data's encoding with the same ids

def byte_chars():  # GPT-2's printable stand-in for every byte, as transformers' ByteLevel pre-tokenizer maps them
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}

def byte_level_tokenizer(enc):
    """A tiktoken Encoding (the demo's bytes, GPT-2's) as a byte-level BPE tokenizer of the same ids: the same pieces
    (its regex), its tokens as the vocabulary, and every way to build a token from two shorter ones as a merge, in
    the token's rank order (tiktoken merges the pair of lowest rank first); a piece that is a token is taken whole."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    ranks, char = enc._mergeable_ranks, byte_chars()
    text = lambda b: "".join(char[x] for x in b)
    merges = sorted((r, ranks[t[:i]], ranks[t[i:]]) for t, r in ranks.items() for i in range(1, len(t))
                    if t[:i] in ranks and t[i:] in ranks)
    token = {r: text(t) for t, r in ranks.items()}
    vocab = {**{s: r for r, s in token.items()}, **enc._special_tokens}
    tk = Tokenizer(models.BPE(vocab, [(token[a], token[b]) for _, a, b in merges], ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(enc._pat_str), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in enc._special_tokens])
    return tk

def tokenizer_of(encoding, block_size):  # the data's tokenizer as transformers' (its ids: prepare.get_encoding's)
    from transformers import PreTrainedTokenizerFast
    enc = prepare.get_encoding(encoding)  # one line where it cannot be loaded (not cached, not found)
    if isinstance(enc, prepare.HFEncoding):
        return enc.tok
    return PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(enc), bos_token=prepare.EOT,
                                   eos_token=prepare.EOT, model_max_length=block_size)

# -----------------------------------------------------------------------------
# the folder: written whole under a temporary name, then renamed into place

def is_export(folder):  # a save_pretrained folder (or an empty one): what --overwrite may replace
    return os.path.isdir(folder) and (not os.listdir(folder) or os.path.isfile(os.path.join(folder, "config.json")))

def write_folder(out, hf, tok, overwrite):
    if os.path.exists(out) and not overwrite:
        die(f"{out}: exists: pass --overwrite to replace it, or another OUT_DIR")
    if os.path.exists(out) and not is_export(out):
        die(f"{out}: holds files that are not an exported model (no config.json): --overwrite replaces only an "
            "export; pass another OUT_DIR")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + ".", suffix=".tmp", dir=parent)
    except OSError as e:
        die(f"{out}: cannot write there ({e.strerror}): pass another OUT_DIR")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's folder is the owner's alone
        hf.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        tok.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json
    except OSError as e:
        shutil.rmtree(tmp)
        die(f"{out}: could not write the export ({e.strerror or e}): free space or pass another OUT_DIR")
    if os.path.exists(out):  # --overwrite: the old export aside, the new one in its place, then the old one removed
        os.replace(out, tmp + ".old")
    os.replace(tmp, out)
    if os.path.isdir(tmp + ".old"):
        shutil.rmtree(tmp + ".old")

# -----------------------------------------------------------------------------
# main

def export(run, out, overwrite=False):
    try:
        import transformers  # noqa: F401  (lazily: rho and the demo need neither transformers nor tokenizers)
    except ImportError:
        die("export.py needs transformers and tokenizers: pip install transformers")
    model, ckpt, path = load_run(run)
    T, encoding = model.config.block_size, ckpt["encoding"]
    tok = tokenizer_of(encoding, T)
    eot = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id  # prepare.py's end of a document
    hf = model.hf if isinstance(model, rho.HF) else gpt2_of(model, eot)
    hf.config.rho_encoding = encoding  # rho.py --init_from OUT_DIR trains it on data of this encoding (bytes too)
    write_folder(out, hf, tok, overwrite)
    data, steps = ckpt["config"]["data"], ckpt["config"]["steps"]
    print(f"export: {path} (step {ckpt['step']}{'' if ckpt['step'] == steps else f' of {steps}'}) -> {out}: "
          f"{type(hf).__name__}, {sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M params, {encoding} tokenizer "
          f"({len(tok)} tokens)")
    # rho's answers(): greedy, a prompt's last T - T/2 tokens, the answer in the other T/2 (stops once settled)
    print(f"lm-eval on {data}'s held-out problems, as rho evaluates them:\n  lm_eval --model hf --model_args "
          f"pretrained={out},dtype=float32,max_length={T},add_bos_token=False --include_path lm_eval_tasks "
          f"--tasks rho_heldout --metadata '{{\"data\": \"{data}\"}}' --gen_kwargs max_gen_toks={T // 2} "
          f"--batch_size 64 --output_path {os.path.join(os.path.dirname(path), 'lm_eval')} --log_samples")
    return hf, tok

def main(argv=None):
    p = argparse.ArgumentParser(description="A rho run as a Hugging Face save_pretrained folder (model, tokenizer) "
                                "that transformers and lm-evaluation-harness load offline.", allow_abbrev=False)
    p.error = lambda msg: die(f"{msg} (python export.py --help)")  # argparse's errors in one line
    p.add_argument("run", metavar="RUN_DIR", help="a run folder of rho.py (out/slm-k0.6), or its ckpt.pt")
    p.add_argument("out", metavar="OUT_DIR", help="the folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    a = p.parse_args(argv)
    return export(a.run, a.out, a.overwrite)

if __name__ == "__main__":
    main()
