"""
prepare.py: text in, token files out.

    python prepare.py                                  # the embedded demo corpus -> data/demo/
    python prepare.py --hq hq.jsonl --web web.txt --out data/mine [--val val.jsonl] [--encoding gpt2] [--procs N]
    python prepare.py --hq hf:openai/gsm8k:main@train --val hf:openai/gsm8k:main@test \\
        --web owm/*.parquet --out data/mine

Sources: .txt (documents separated by blank lines), .jsonl or .jsonl.gz (a "text" field, or "question" and
"answer", or MetaMathQA's "query" and "response"), .parquet (the same columns; needs pyarrow), or
hf:NAME[:CONFIG][@SPLIT], a Hugging Face dataset streamed by name (needs datasets and the network; the split
defaults to train). --web takes several sources, and --max_web_tokens N stops after about N. Each source is read
once, in order, by this process (hq twice without --val: its validation documents first); a pool of --procs workers
parses and tokenizes it in tasks of about 2 MB of text, and the tokens are written in order, so the output is
byte-identical for any --procs. Bytes that are not UTF-8 become U+FFFD: a warning line says how many, and meta.json
counts them per source.
A source or flag that would give a file rho.py cannot read (a directory, no documents, every training document
dropped, a negative size) is refused in one line, and the folder keeps what it held.

Decontamination, by default: a training document (hq_train, web, the demo's base) is dropped if it shares a run of 13
words with a held-out text, i.e. the question of a validation record (or a whole plain-text validation document).
Words are compared after NFKC normalisation and lowercasing: a word is a run of letters, digits and marks of any
script, so whitespace, punctuation and symbols of any script (a non-breaking space, a curly apostrophe, an em dash)
separate words, and invisible format characters (a soft hyphen) are dropped. A held-out text of 8 to 12 words is
matched whole; one of fewer than 8 words ("Solution", "Chapter 3") is too short to check: it would match unrelated
documents, so it is not used, and the count of such texts is printed. The workers check every document, and meta.json
counts the dropped documents per source. --keep_contaminated keeps them (and still counts them). The held-out index
is about 8 bytes per held-out word plus a 4 MB table (its size is printed); building it takes about 4 bytes per
held-out character at its peak.

Eval problems: a validation record with a question and a final answer that final_answer reads (GSM8K's "#### 72",
MetaMathQA's "The answer is: 72"; a number with sign, commas or decimals, kept normalised: "1,000" -> "1000",
"12.50" -> "12.5", ".5" -> "0.5"). rho.py reads the model's answers with the same function. A --val without any
says so in one line (eval.json is then empty, and rho.py needs --eval_problems 0).

Writes, into the output folder:
    hq_train.bin, hq_val.bin   high-quality corpus of the target distribution (train / validation)
    web.bin                    the large web-like corpus that continual pretraining reads
    web_labels.bin             demo only: a uint8 label per web token (0 = clean, else a noise kind);
                               for auditing the selection, never read by training
    base.bin                   demo only: general web pages (chat, not math) for the base model
    eval.json                  held-out problems {"prompt", "answer", "solution"} for answer accuracy, from
                               validation records only (solution: the reference text after the prompt)
    meta.json                  encoding, vocab size, dtype, token counts, sources and their sha256 (for a Hugging
                               Face dataset: its name, config and split), decontamination counts, under "files"
                               the size and sha256 of every file above ({"web.bin": {"bytes", "sha256"}, ...}), the
                               tokenizer's name and fingerprint (rho.py checks a transformers model's own against it),
                               and the flags that define the data ("inputs")
Token files are flat numpy memmaps (uint16 when the vocabulary fits, else uint32); documents are
separated by the end-of-text token. Every file is written to a temp file, and all are renamed into place together once
written, meta.json last: a run that fails, is interrupted or meets a full disk leaves the folder as it was. A folder
holding data of other inputs (or other files) is refused unless --overwrite; the same data again is written again.
"""
import argparse
import codecs
import collections
import contextlib
import decimal
import functools
import gzip
import hashlib
import importlib
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import sys
import time
import unicodedata
import urllib.parse
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import tiktoken

EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# tokenizer

def byte_encoding():
    """A tiktoken Encoding with one token per byte and <|endoftext|> = 256. Built in code: no download."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={EOT: 256})

class HFEncoding:
    """A model's own fast tokenizer (hf:NAME or a save_pretrained directory) with the tiktoken calls prepare.py and
    rho.py make: each document is encoded with the model's special tokens (Llama's BOS first; GPT-2 and Qwen2 add
    none) and ends with its EOS, the same convention for training, scoring and the eval prompts. Text is encoded as
    text: "<s>" or "</s>" written inside a web page are characters, not document boundaries."""

    def __init__(self, name):
        try:
            from transformers import AutoTokenizer  # lazily: the demo needs neither transformers nor tokenizers
        except ImportError:
            sys.exit(f"error: --encoding {name}: needs transformers and tokenizers: pip install transformers "
                     "tokenizers")
        if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f))
                                           for f in ("tokenizer_config.json", "tokenizer.json")):
            sys.exit(f"error: --encoding {name}: no tokenizer saved there (no tokenizer_config.json): save the "
                     f"model's tokenizer with save_pretrained into it")  # transformers would make an empty one
        try:
            self.tok = from_hub(AutoTokenizer.from_pretrained, name.removeprefix("hf:"))
        except (OSError, ValueError) as e:
            sys.exit(f"error: --encoding {name}: could not load its tokenizer ({str(e).strip().splitlines()[0]}): "
                     f"run once where huggingface.co answers (it is then cached), or pass a directory saved with "
                     f"save_pretrained")
        self.name, self.n_vocab = name, len(self.tok)
        self.eot_token = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.bos_token_id
        if not self.tok.is_fast or self.eot_token is None:
            why = "no EOS or BOS token" if self.tok.is_fast else "not a fast tokenizer"
            sys.exit(f"error: --encoding {name}: {why}: rho needs a fast tokenizer with an end-of-document token")

    def encode_ordinary(self, text):
        # with the model's own special tokens (BOS, if it has one), but none read from the text
        return self.tok(text, split_special_tokens=True, verbose=False)["input_ids"]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

def from_hub(load, name, **kw):
    """load(name) of a transformers tokenizer, config or model: from a directory or the local cache first, and from
    the hub only if it answers within seconds, so that offline a missing model fails at once (transformers itself
    retries for up to a minute). Raises the cache's OSError when the hub cannot be reached."""
    try:
        return load(name, local_files_only=True, **kw)
    except OSError:
        if os.path.isdir(name) or not hub_reachable():
            raise
    return load(name, **kw)

def hub_reachable():
    """Does the Hugging Face hub answer a connection within 3 s? Not with HF_HUB_OFFLINE; behind a proxy, assumed."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # only the hub's own answer, through the proxy, tells
    try:
        socket.create_connection((urllib.parse.urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
        return True
    except OSError:
        return False

def get_encoding(name):
    if name == "bytes":
        return byte_encoding()
    if name.startswith("hf:") or os.path.isdir(name):
        return HFEncoding(name)
    if os.sep in name or name.startswith("."):  # a path, not an encoding's name
        sys.exit(f"error: --encoding {name}: no such tokenizer directory; give a directory saved with save_pretrained "
                 f"(data prepared with one record its path in meta.json: if the tokenizer moved, put it back there "
                 f"or prepare the data again)")
    if name not in tiktoken.list_encoding_names():
        sys.exit(f"error: --encoding {name}: tiktoken could not load it: unknown encoding; choose bytes (built in), "
                 f"{', '.join(tiktoken.list_encoding_names())}, hf:NAME or a directory saved with save_pretrained")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # the BPE file cannot be downloaded
        sys.exit(f"error: --encoding {name}: tiktoken could not load it ({type(e).__name__}). It downloads "
                 f"its BPE file on first use: run once with network (or copy the file into TIKTOKEN_CACHE_DIR), "
                 f"or use the default --encoding bytes, which needs no download.")

SEED_MAX = 2**32 - 1  # --seed of prepare.py and rho.py: 0 to SEED_MAX

# a text of several scripts, numbers, markup and code, whose ids tell one tokenizer from another
PROBE = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.\n"
         "Answer: 48 / 2 = 24; 48 + 24 = 72\n#### 72 The answer is: -1,000.5 \\frac{1}{2} $x^2$ <br/> &amp; "
         "def f(x):\n    return x  # naïve café, π ≈ 3.14159, 数学, математика, 😀\t  \n\n")

def tokenizer_id(enc):
    """A tokenizer's fingerprint (meta.json's "tokenizer"): the sha256 of its size, its end token and the ids it gives
    PROBE. Two names of one vocabulary (tiktoken's gpt2 and hf:gpt2) agree; another vocabulary differs."""
    ids = [enc.n_vocab, enc.eot_token, *map(int, enc.encode_ordinary(PROBE))]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()

def tokenizer_id_of(model):
    """The fingerprint of the tokenizer saved with a transformers model (hf:NAME or a directory); None without one."""
    try:
        return tokenizer_id(HFEncoding(model))
    except SystemExit:
        return None

def token_dtype(n_vocab):
    return np.uint16 if n_vocab <= 2**16 else np.uint32

# -----------------------------------------------------------------------------
# atomic writes: temp file, then rename, so a killed run never leaves a half-written file in place. Each file written
# is recorded in `files` (meta.json's "files": its size and sha256, hashed as it is written), so that a reader can
# check that it reads what was written. prepare.py writes every file of the folder to a temp file first, and renames
# them all into place only once all are written (commit, meta.json last): a run that fails, is interrupted or meets a
# full disk leaves the folder as it was, and its temp files are removed (discard_temps)

def write_atomic(path, data, files=None):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    if files is not None:
        files[os.path.basename(path)] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

_temps = {}  # the temp files this run wrote, path -> its file: discard_temps removes them

def open_temp(path):
    _temps[path + ".tmp"] = f = open(path + ".tmp", "wb")
    return f

def write_temp(path, data, files):
    """Writes <path>.tmp, recorded in files; commit renames it to path."""
    with open_temp(path) as f:
        f.write(data)
    files[os.path.basename(path)] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

def discard_temps():
    """Removes this run's temp files. On a full disk a file's last write fails again as it closes: it goes anyway."""
    for tmp, f in _temps.items():
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _temps.clear()

class TokenWriter:
    """Appends token arrays to <path>.tmp, recording it in files on close (commit renames it to <path>)."""

    def __init__(self, path, dtype, files):
        self.path, self.dtype, self.n, self.files, self.sha = path, dtype, 0, files, hashlib.sha256()
        self.f = open_temp(path)

    def write(self, ids):
        b = np.asarray(ids, dtype=self.dtype).tobytes()
        self.f.write(b); self.sha.update(b)
        self.n += len(b) // np.dtype(self.dtype).itemsize

    def close(self):
        self.f.close()
        self.files[os.path.basename(self.path)] = {"bytes": self.n * np.dtype(self.dtype).itemsize,
                                                   "sha256": self.sha.hexdigest()}
        return self.n

# -----------------------------------------------------------------------------
# reading the prepared data back (rho.py, report.py): every file checked against meta.json, so a file cut short,
# edited or replaced is refused in one line that says to run prepare.py again

HASH_MAX = 1 << 28  # files up to 256 MiB are hashed at every start; larger ones are checked by size alone
META_KEYS = ("encoding", "vocab_size", "dtype", "tokens", "files")  # what rho.py reads of meta.json

def read_json(path):
    with open(path, "rb") as f:
        return json.loads(f.read())

def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2).encode())

def sha256_differs(path, want):
    """Whether a file's sha256 is not the one recorded (None: not recorded); files over HASH_MAX are not hashed."""
    return want is not None and os.path.getsize(path) <= HASH_MAX and file_sha256(path) != want

def load_meta(data):
    """A prepared folder's meta.json, with its own sha256: the data's fingerprint (it covers every file's)."""
    path = os.path.join(data, "meta.json")
    if not os.path.isfile(path):
        demo = os.path.normpath(data) == os.path.normpath("data/demo")
        sys.exit(f"error: {data}: data not prepared (no meta.json): run `python prepare.py"
                 + ("`" if demo else f" --hq FILE --web FILE --out {data}`"))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except ValueError as e:  # a cut or hand-edited file (a UnicodeDecodeError is a ValueError too)
        sys.exit(f"error: {path}: not valid JSON ({e}): run prepare.py again")
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else [META_KEYS[0]]
    if missing:
        sys.exit(f"error: {path}: no key {missing[0]!r}: not written by prepare.py: run prepare.py again")
    return {**meta, "sha256": hashlib.sha256(raw).hexdigest()}

def prepared_path(data, name, meta):
    """A prepared file's path, once its size and sha256 are those meta.json recorded."""
    path = os.path.join(data, name)
    if not os.path.isfile(path):
        sys.exit(f"error: {path}: missing; re-run prepare.py for {data}")
    rec, size = meta["files"].get(name), os.path.getsize(path)
    if rec is None:
        sys.exit(f"error: {path}: not recorded in {os.path.join(data, 'meta.json')}: run prepare.py again")
    if size != rec["bytes"]:
        sys.exit(f"error: {path}: {size:,} bytes, but prepare.py wrote {rec['bytes']:,} (cut short or replaced): "
                 "run prepare.py again")
    if sha256_differs(path, rec["sha256"]):
        sys.exit(f"error: {path}: its content is not what prepare.py wrote (sha256 differs): run prepare.py again")
    return path

def read_array(data, name, meta, dtype, n=None):
    """A prepared file as a read-only memmap of dtype; with n, it must hold n values of it."""
    path = prepared_path(data, name, meta)
    if n is not None and os.path.getsize(path) != n * np.dtype(dtype).itemsize:
        sys.exit(f"error: {path}: {os.path.getsize(path):,} bytes are not {n:,} tokens of {dtype}, as meta.json says "
                 "(edited?): run prepare.py again")
    return np.memmap(path, dtype=dtype, mode="r")

def read_tokens(data, name, meta):
    """A token file (web.bin, ...): its ids must fit the vocabulary (files over HASH_MAX are not read whole)."""
    tokens = read_array(data, name, meta, meta["dtype"], meta["tokens"][name.removesuffix(".bin")])
    if tokens.nbytes <= HASH_MAX and tokens.max(initial=0) >= meta["vocab_size"]:
        sys.exit(f"error: {os.path.join(data, name)}: holds token id {tokens.max()}, beyond the vocabulary of "
                 f"{meta['vocab_size']} in meta.json (edited?): run prepare.py again")
    return tokens

# -----------------------------------------------------------------------------
# decontamination: a training document that shares a run of 13 words with a held-out question is dropped
# (GPT-3's rule). Text is normalised first (NFKC, lowercased), and a word is then a run of letters, digits and marks of
# any script: whitespace, punctuation and symbols of any script (a non-breaking space, a curly apostrophe, an em dash)
# separate words, and invisible format characters (a soft hyphen, a zero-width space) are dropped, so that neither
# case, spacing, punctuation nor the way a page was encoded hides a duplicate. Questions are held out, not answers:
# an answer is mostly numbers and template words ("#### 5"), and 13 words of it would match unrelated problems.
# A held-out text of 8 to 12 words is matched whole; one of fewer than MIN_WORDS words is not used: a phrase that
# short ("Solution", "Chapter 3", "How much does she have left?") recurs in unrelated documents, and matching it would
# drop them all, while a real problem (a GSM8K question: typically a few dozen words) is far longer. Hashes are
# polynomials mod 2^64 (numpy's uint64 wraps), the same in every process, unlike Python's salted hash().

NGRAM = 13
MIN_WORDS = 8  # a held-out text of fewer words is too short to check (counted and printed, never matched)
P, Q = np.uint64(0x100000001B3), np.uint64(0x9E3779B97F4A7C15)  # odd multipliers of the word and the run hashes
BITS = 22  # a table of 2^22 flags, one per top 22 bits of a held-out hash: most runs are ruled out by one look-up
ASCII_KIND = np.array([1 if chr(c).isalnum() else 0 for c in range(128)], np.int8)  # 1: letter or digit, 0: other

def powers(base, n):
    """base^0 .. base^(n-1) mod 2^64."""
    p = np.full(n, base, np.uint64)
    p[0] = 1
    return np.cumprod(p)

def normalise(text):
    """NFKC (a full-width digit, a ligature or a non-breaking space becomes its plain form), then lowercased."""
    return text.lower() if text.isascii() else unicodedata.normalize("NFKC", text).casefold()

@functools.cache
def char_kind(c):
    """1 for a letter, digit or mark of any script, -1 for an invisible format character, else 0 (a separator)."""
    cat = unicodedata.category(chr(c))
    return 1 if cat[0] in "LMN" else -1 if cat == "Cf" else 0

@functools.cache
def bmp_kinds():
    """char_kind of every code point below 2^16, built once per process that meets one (about 0.1 s)."""
    return np.array([char_kind(c) for c in range(1 << 16)], np.int8)

def char_kinds(cps):
    """char_kind of each code point: by table below 2^16, and one look-up per distinct code point above."""
    if not len(cps) or cps.max() < 128:
        return ASCII_KIND[cps]
    kind = bmp_kinds()[np.minimum(cps, 0xFFFF)]
    astral = np.flatnonzero(cps > 0xFFFF)  # emoji, rare CJK, ...
    if len(astral):
        distinct, inverse = np.unique(cps[astral], return_inverse=True)
        kind[astral] = np.array([char_kind(int(c)) for c in distinct], np.int8)[inverse]
    return kind

def words(texts):
    """The words of texts (see above) as (a 64-bit hash per word, the index of its text), in order."""
    parts = [normalise(t) for t in texts]
    b = np.frombuffer("\n".join(parts).encode("utf-32-le", "replace"), np.uint32)  # a code point each
    ends = np.cumsum([len(p) + 1 for p in parts])  # where each text's separating "\n" ends
    kind = char_kinds(b)
    if kind.min(initial=0) < 0:  # drop format characters; each text end moves back by those dropped before it
        ends -= np.concatenate([[0], np.cumsum(kind < 0)])[np.minimum(ends, len(b))]
        b, kind = b[kind >= 0], kind[kind >= 0]
    pos = np.flatnonzero(kind > 0)
    if not len(pos):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.diff(pos, prepend=-2) != 1)  # a word starts where a run of letters does
    offset = np.arange(len(pos)) - np.repeat(starts, np.diff(starts, append=len(pos)))  # a letter's place in its word
    h = np.add.reduceat(b[pos].astype(np.uint64) * powers(P, int(offset.max()) + 1)[offset], starts)
    per_text = np.diff(np.searchsorted(pos[starts], ends), prepend=0)
    return h, np.repeat(np.arange(len(parts)), per_text)

def runs(h, doc, lengths):
    """Yields (L, hashes, text index) of the runs of L words inside one text, for each L in lengths."""
    g = np.zeros(len(h), np.uint64)
    for L in range(1, max(lengths) + 1):
        n = len(h) - L + 1
        if n <= 0:
            return
        g = g[:n] * Q + h[L - 1:]  # Horner: the run of L words starting at each word, from the run of L - 1
        if L in lengths:
            inside = doc[:n] == doc[L - 1:]  # its first and last word in the same text
            yield L, g[inside], doc[:n][inside]

def pieces(texts, chars=100_000):
    """Yields (a, b): consecutive slices texts[a:b] of about `chars` characters. numpy's temporaries then stay in the
    CPU cache (a quarter faster than 2 MB at once), and their memory stays bounded."""
    a = 0
    while a < len(texts):
        b, n = a, 0
        while b < len(texts) and n < chars:
            n += len(texts[b]); b += 1
        yield a, b
        a = b

def held_out_index(texts):
    """((keys, flags), too_short): keys {L: sorted hashes} holds every 13-word run of the held-out texts and the
    whole run of each text of MIN_WORDS to 12 words; flags marks the top bits of every key; too_short counts the texts
    of fewer than MIN_WORDS words, which are not used. Built a piece of text at a time: besides the texts, memory holds
    the run hashes found (8 bytes a held-out word, twice while they are sorted) and the 4 MB of flags."""
    found, too_short = collections.defaultdict(list), 0
    for a, b in pieces(texts):
        h, doc = words(texts[a:b])
        n_words = np.bincount(doc, minlength=b - a)
        too_short += int((n_words < MIN_WORDS).sum())
        whole = {int(n) for n in n_words if MIN_WORDS <= n < NGRAM}  # texts matched whole
        for L, g, d in runs(h, doc, whole | {NGRAM}):
            found[L].append(g if L == NGRAM else g[n_words[d] == L])
    keys = {L: np.unique(np.concatenate(g)) for L, g in found.items()}
    flags = np.zeros(1 << BITS, bool)
    for k in keys.values():
        flags[k >> np.uint64(64 - BITS)] = True
    return ({L: k for L, k in keys.items() if len(k)}, flags), too_short

def match_runs(texts, keys, flags):
    """A bool per text: does it hold a run of words that keys holds?"""
    hit = np.zeros(len(texts), bool)
    h, doc = words(texts)
    for L, g, d in runs(h, doc, set(keys)):
        maybe = flags[g >> np.uint64(64 - BITS)]
        g, d = g[maybe], d[maybe]
        i = np.searchsorted(keys[L], g).clip(max=len(keys[L]) - 1)
        hit[d[keys[L][i] == g]] = True
    return hit

def contaminated(texts, index):
    """A bool per text: does it hold a run of words that the held-out index holds? Checked a piece at a time."""
    (keys, flags), hit = index, np.zeros(len(texts), bool)
    if keys:
        for a, b in pieces(texts):
            hit[a:b] = match_runs(texts[a:b], keys, flags)
    return hit

def index_bytes(index):
    keys, flags = index
    return sum(k.nbytes for k in keys.values()) + flags.nbytes

def print_held_out(n_texts, too_short, index):
    print(f"prepare: decontamination: {n_texts:,} held-out texts, {too_short:,} of them shorter than {MIN_WORDS} words "
          f"(too short to check: not used); index {index_bytes(index) / 1e6:.1f} MB")

def print_dropped(source, n_docs, caught, keep):
    print(f"prepare: decontamination: {source}: {caught:,} of {n_docs:,} documents share a {NGRAM}-word run with a "
          f"held-out question, " + ("kept (--keep_contaminated)" if keep else "dropped"))

def decontamination_meta(n_held_out, too_short, dropped, keep):
    return {"n": NGRAM, "min_words": MIN_WORDS, "held_out_texts": n_held_out, "too_short": too_short,
            "dropped_docs": dropped, "kept": keep}

# -----------------------------------------------------------------------------
# the embedded demo: worked arithmetic word problems (hq) and a noisy web-like corpus (web)

NAMES = ["Tom", "Ann", "Sam", "Lily", "Ravi", "Mia", "Omar", "Zoe", "Ben", "Nina", "Leo", "Ivy", "Kai", "Ella"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "shells", "coins", "stamps"]

def problem(rng):
    """One problem as (question, [(text, is_result)] solution pieces, answer): one-digit addition or subtraction in a
    sentence that varies (name, item), with the sum written at its end. A held-out question is then new text while
    its arithmetic is the table every problem teaches (14 names x 10 items x 126 sums: 17,640 questions)."""
    n, m, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"{n} has {a} {m} and gets {b} more. {a} + {b} = ?", [(str(a + b), 1)], a + b
    a, b = max(a, b), min(a, b)
    return f"{n} has {a} {m} and gives {b} away. {a} - {b} = ?", [(str(a - b), 1)], a - b

def clean_text(q, sol, ans):
    return f"Question: {q}\nAnswer: " + "".join(t for t, _ in sol) + f"\n#### {ans}"

# The noise model. Each kind is what the Rho-1 paper shows in OpenWebMath-like data. Its token share is
# measured and printed by prepare.py and written to meta.json.
LABELS = ["clean", "timestamp", "username", "boilerplate", "ad", "markup", "random", "offtopic", "wrong"]
NAV = ["Home | Forums | Homework Help | Math | Sign in | Register\n", "Skip to content\nMenu\nSearch\n",
       "You are here: Home > Math > Word problems\n", "Forum index :: Elementary math :: Homework\n"]
FOOT = ["\nCopyright 2021 MathHelpBoards. All rights reserved. Privacy | Terms | Contact us",
        "\nShare this: Facebook Twitter Email Print", "\nPowered by phpBB(R) Forum Software",
        "\nBack to top\nReport this post\nQuote"]
ADS = ["[Ad] Get 50% off textbooks today! Free shipping on orders over $35.\n",
       "Sponsored: Learn to code in 30 days. Click here to start your free trial.\n",
       "ADVERTISEMENT\nBest online tutors near you. Book a lesson now.\n"]
MARKUP = ["<br />", "</p><p>", "&nbsp;", "<div class=\"post-body\">", "</div>", "\\begin{align}", "\\end{align}",
          "<span class=\"MathJax\">", "[/quote]", "[quote]", "&amp;", "<td>", "</tr>"]
OFFTOPIC = ["lol thanks, btw is anyone watching the game tonight?", "My cat knocked my coffee over again this morning.",
            "The weather here has been awful all week, rain every single day.",
            "Does anyone know a good pizza place downtown?",
            "I just got back from vacation and I am so tired.", "New phone arrived today, the battery is amazing.",
            "We are painting the kitchen green this weekend.", "Traffic on the highway was terrible today."]
SUBJECTS = ["My neighbour", "The new manager", "Our team", "A friend of mine", "The kids", "My brother",
            "The old bakery", "Everyone at work", "The city council", "Our landlord", "The band", "My grandmother"]
VERBS = ["finally fixed", "talked about", "complained about", "bought", "painted", "cancelled", "recommended",
         "forgot about", "cleaned", "moved", "sold", "reviewed"]
OBJECTS = ["the garden fence", "the weekend trip", "a used car", "the kitchen", "the concert tickets",
           "the broken heater", "a new laptop", "the parking rules", "the football match", "the summer festival",
           "an old bicycle", "the roof"]
TAILS = ["yesterday.", "last week.", "again!", "and nobody was surprised.", "before the rain started.", "lol.",
         "for the third time this year.", "which took forever.", "and it was worth it.", "?? no idea why."]

def chat_sentence(rng):
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"

USER_PARTS = ["math", "cool", "dragon", "pi", "blue", "x", "ninja", "guru", "kid", "fan", "star"]

def username(rng):
    return rng.choice(USER_PARTS) + rng.choice(["_", "", "."]) + rng.choice(USER_PARTS) + str(rng.randint(1, 2024))

def timestamp(rng):
    return (f"{rng.randint(2008, 2023)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}")

def random_string(rng, n):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(n))

def web_post(rng, segs, general=False, problems=None):
    """One forum post: a problem of the hq family, with noise inside and around it. Appends (text, label).
    general: a general-chat post instead (the base corpus), with the same page noise around it.
    problems: where the problem comes from (default: problem(rng))."""
    L = LABELS.index
    if general:
        segs += [("Posted by ", L("boilerplate")), (username(rng), L("username")), (" on ", L("boilerplate")),
                 (timestamp(rng), L("timestamp")), ("\n", L("boilerplate"))]
        segs.append((" ".join(chat_sentence(rng) for _ in range(rng.randint(1, 4))) + "\n", L("offtopic")))
        return
    if rng.random() < 0.4:
        segs += [("Posted by ", L("boilerplate")), (username(rng), L("username")), (" on ", L("boilerplate")),
                 (timestamp(rng), L("timestamp")), ("\n", L("boilerplate"))]
    q, sol, ans = next(problems) if problems else problem(rng)
    if rng.random() < 0.15:  # timestamp and username inside the sentence, as in edited posts
        cut = q.index(". ") + 2 if ". " in q else len(q) // 2
        segs += [("Question: " + q[:cut], 0), ("(edited ", L("boilerplate")), (timestamp(rng), L("timestamp")),
                 (" by ", L("boilerplate")), (username(rng), L("username")), (") ", L("boilerplate")),
                 (q[cut:] + "\n", 0)]
    else:
        segs.append(("Question: " + q + "\n", 0))
    if rng.random() < 0.2:
        segs.append((rng.choice(MARKUP) + rng.choice(MARKUP), L("markup")))
    # 15% of solutions have wrong arithmetic: the final result (and so the answer line) is off; the wrong
    # numbers are labelled "wrong", the rest of the problem stays "clean"
    wrong = rng.random() < 0.15
    delta = rng.choice([-3, -2, -1, 1, 2, 10]) if wrong else 0
    segs.append(("Answer: ", 0))
    for i, (t, is_result) in enumerate(sol):
        last = is_result and not any(r for _, r in sol[i + 1:])
        segs.append((str(int(t) + delta), L("wrong")) if last and wrong else (t, 0))
    segs += [("\n#### ", 0), (str(ans + delta), L("wrong") if wrong else 0), ("\n", 0)]

def web_document(rng, general=False, problems=None):
    """A web page: navigation, ads, 2-5 posts, replies, off-topic text, random strings, footer."""
    L, segs = LABELS.index, []
    if rng.random() < 0.7:
        segs.append((rng.choice(NAV), L("boilerplate")))
    if rng.random() < 0.3:
        segs.append((rng.choice(ADS), L("ad")))
    for _ in range(rng.randint(2, 5)):
        web_post(rng, segs, general, problems)
        if rng.random() < 0.15:
            segs += [("Reply from ", L("boilerplate")), (username(rng), L("username")), (": ", L("boilerplate")),
                     (rng.choice(OFFTOPIC) + "\n", L("offtopic"))]
        if rng.random() < 0.1:
            segs.append(("sid=" + random_string(rng, rng.randint(16, 40)) + "\n", L("random")))
    if rng.random() < 0.15:
        segs.append((" ".join(rng.sample(OFFTOPIC, 3)) + "\n", L("offtopic")))
    if rng.random() < 0.7:
        segs.append((rng.choice(FOOT), L("boilerplate")))
    return segs

def fresh_problems(rng, index):
    """Yields problems whose question shares no 13-word run with a held-out question (checked 1000 at a time)."""
    while True:
        drawn = [problem(rng) for _ in range(1000)]
        yield from (p for p, caught in zip(drawn, contaminated([q for q, _, _ in drawn], index)) if not caught)

def unique_problems(problems, n):
    """The first n problems with distinct questions."""
    found, seen = [], set()
    for q, sol, ans in problems:
        if q not in seen:
            seen.add(q); found.append((q, sol, ans))
            if len(found) == n:
                return found

def check_docs(docs, index):
    """Yields (document, caught by the held-out index), checking 32 documents at a time."""
    for part in iter(lambda: list(itertools.islice(docs, 32)), []):
        caught = contaminated(["".join(t for t, _ in segs) for segs in part], index) if index else [False] * len(part)
        yield from zip(part, caught)

def write_demo_corpus(path, enc, docs, index, keep, files, n_tokens=0, labels_path=None):
    """Writes documents (lists of (text, label) pieces) to path, each followed by end-of-text, until n_tokens (or the
    end of docs). Every piece is encoded on its own so that labels align with tokens exactly (labels_path: a uint8
    label per token). A document that the held-out index catches is dropped, or kept with keep.
    Returns (tokens, documents, caught, tokens per label)."""
    w, n_docs, n_caught = TokenWriter(path, token_dtype(enc.n_vocab), files), 0, 0
    per_kind = np.zeros(len(LABELS), np.int64)
    lw = TokenWriter(labels_path, np.uint8, files) if labels_path else None
    for segs, caught in check_docs(docs, index):
        n_docs, n_caught = n_docs + 1, n_caught + caught
        if caught and not keep:
            continue
        segs = segs + [(EOT, LABELS.index("boilerplate"))]
        for (text, label), ids in zip(segs, [enc.encode_ordinary(t) for t, _ in segs[:-1]] + [[enc.eot_token]]):
            w.write(ids); per_kind[label] += len(ids)
            if lw:
                lw.write([label] * len(ids))
        if n_tokens and w.n >= n_tokens:
            break
    if lw:
        lw.close()
    return w.close(), n_docs, int(n_caught), per_kind

def prepare_demo(out, enc, seed, keep=False, n_hq=3000, n_val=300, n_eval=1000, web_tokens=4_700_000,
                 base_tokens=1_250_000):
    """Builds the embedded default. hq, web and eval draw problems from one family. The held-out problems (hq_val and
    eval) are drawn first; hq_train and the web posts then draw only problems whose question shares no 13-word run
    with a held-out question (the decontamination rule), so the check of every training document catches none.
    base: general web pages (same page noise, chat instead of math) for the base model that the reference model and
    continual pretraining start from, as in the paper."""
    rng, path = random.Random(seed), lambda name: os.path.join(out, name)
    held = unique_problems((problem(rng) for _ in itertools.count()), n_val + n_eval)
    index, too_short = held_out_index([q for q, _, _ in held])
    print_held_out(len(held), too_short, index)
    fresh = fresh_problems(rng, index)
    hq = lambda problems: ([(clean_text(*p), 0)] for p in problems)
    pages = lambda **kw: (web_document(rng, **kw) for _ in itertools.count())
    counts, dropped, kinds, files = {}, {}, {}, {}
    counts["hq_val"] = write_demo_corpus(path("hq_val.bin"), enc, hq(held[:n_val]), None, keep, files)[0]
    for name, docs, n, labels in [("hq_train", hq(unique_problems(fresh, n_hq)), 0, None),
                                  ("web", pages(problems=fresh), web_tokens, path("web_labels.bin")),
                                  ("base", pages(general=True), base_tokens, None)]:
        result = write_demo_corpus(path(name + ".bin"), enc, docs, index, keep, files, n, labels)
        counts[name], n_docs, dropped[name], kinds[name] = result
        print_dropped(name, n_docs, dropped[name], keep)
    prompts = [(f"Question: {q}\nAnswer:", q, sol, ans) for q, sol, ans in held[n_val:]]
    evals = [{"prompt": p, "answer": str(ans), "solution": clean_text(q, sol, ans)[len(p):]}
             for p, q, sol, ans in prompts]
    write_temp(path("eval.json"), json.dumps(evals, indent=0).encode(), files)
    share = {k: round(float(kinds["web"][i] / kinds["web"].sum()), 4) for i, k in enumerate(LABELS)}
    return counts, {"demo_seed": seed, "labels": LABELS, "label_share": share,
                    "decontamination": decontamination_meta(len(held), too_short, dropped, keep), "files": files}

# -----------------------------------------------------------------------------
# real corpora, each read once (hq twice without --val): .txt (documents separated by blank lines), .jsonl /
# .jsonl.gz ("text", or "question" + "answer"), .parquet (the same columns; needs pyarrow), or a Hugging Face dataset
# streamed by name (needs datasets)

TASK_CHARS = 2_000_000  # text per pool task: pickling is cheap next to tokenizing, and 2N tasks in flight stay small
# GSM8K's fields, MetaMathQA's: one "Question: ...\nAnswer: ..." text
PAIRS = (("question", "answer"), ("query", "response"))
N_EVAL = 500  # eval problems kept from the validation documents
VAL_EVERY = 50  # without --val, every 50th hq document (by global index) is a validation document
MIN_VAL_TOKENS = 33  # hq_val.bin holds at least one evaluation window of a 32-token context and its next token

class BadInput(Exception):
    """A problem with the input data, raised while reading or in a worker; main prints it as one `error:` line."""

def short(e):
    """An exception as one short line: its type and the first line of its message."""
    msg = str(e).strip().split("\n")[0][:200]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}

def source_kind(spec):
    """txt, jsonl, parquet or hf, once the source is found and its reader is installed."""
    if spec.startswith("hf:"):
        hf_source(spec)  # checks the syntax
        need("datasets", spec, "streaming a Hugging Face dataset")
        return "hf"
    if os.path.isdir(spec):
        raise BadInput(f"{spec}: is a directory; a source is one file (--web takes several: "
                       f"{os.path.join(spec, '*.jsonl')}, which the shell expands) or hf:NAME[:CONFIG][@SPLIT]")
    if not os.path.exists(spec):
        raise BadInput(f"{spec}: no such file")
    if not os.path.isfile(spec):
        raise BadInput(f"{spec}: not a regular file (a pipe or a device); save the data to a file and pass that")
    if not os.access(spec, os.R_OK):
        raise BadInput(f"{spec}: not readable (permission denied); check its permissions")
    kind = next((k for ext, k in FORMATS.items() if spec.endswith(ext)), None)
    if kind is None:
        raise BadInput(f"{spec}: unsupported format; use .txt (documents separated by blank lines), .jsonl, .jsonl.gz, "
                       f".parquet, or hf:NAME[:CONFIG][@SPLIT] for a Hugging Face dataset")
    if kind == "parquet":
        need("pyarrow.parquet", spec, "reading parquet", "pyarrow")
    return kind

def need(module, spec, what, package=None):
    """Imports an optional dependency, or fails with one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module
        raise BadInput(f"{spec}: {what} needs {package}: pip install {package}") from None

def hf_source(spec):
    """hf:NAME[:CONFIG][@SPLIT] -> its meta.json record, e.g. hf:openai/gsm8k:main@test. The split defaults to train."""
    rest, _, split = spec[3:].partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise BadInput(f"{spec}: a Hugging Face dataset is hf:NAME[:CONFIG][@SPLIT], e.g. hf:openai/gsm8k:main@train")
    return {"dataset": name, "config": config or None, "split": split or "train"}

class HashedFile(io.RawIOBase):
    """A file whose bytes are hashed as they are read: the source is read from disk once and its sha256 comes free."""

    def __init__(self, path):
        self.f, self.sha, self.pos = open(path, "rb", buffering=0), hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.sha.update(memoryview(b)[:n]); self.pos += n
        return n

    def close(self):
        self.f.close(); super().close()

_reading = None  # the source being read, for the line that says where Ctrl-C stopped the run
_decoding = {}  # the meta.json record of the source being decoded: count_bad_utf8 counts into it

def count_bad_utf8(e):
    """A codecs error handler: as errors="replace" (U+FFFD for each bad sequence), counting the bytes replaced."""
    _decoding["non_utf8_bytes"] += e.end - e.start
    return "\ufffd", e.end

codecs.register_error("prepare_count", count_bad_utf8)

def read_lines(path, kind, src):
    """Yields (line number, text): a .txt document, or a .jsonl line (the workers parse it). src["pos"] follows the
    bytes read from disk, src["non_utf8_bytes"] counts the bytes that are not UTF-8, and src["sha256"] is set at the
    end."""
    global _decoding
    raw, doc, _decoding = HashedFile(path), [], src
    src["non_utf8_bytes"] = 0
    with io.BufferedReader(raw, 1 << 20) as buf:
        f = gzip.GzipFile(fileobj=buf) if path.endswith(".gz") else buf
        # lines end at "\n" only; a UTF-8 byte order mark (as Windows tools write) is not text
        lines = io.TextIOWrapper(f, encoding="utf-8-sig", errors="prepare_count", newline="\n")
        try:
            for lineno, text in enumerate(lines, 1):
                src["pos"] = raw.pos
                if kind == "jsonl":
                    if text.strip():
                        yield lineno, text
                elif text.strip():
                    doc.append(text)
                elif doc:
                    yield lineno, "".join(doc).rstrip("\n"); doc = []
            while buf.read(1 << 20):  # hash any bytes the decoder did not need (gzip padding)
                pass
        except (OSError, EOFError, zlib.error) as e:
            raise BadInput(f"{path}: cannot read it ({short(e)}); check that the file is complete "
                           f"and is what its name says")
    if doc:
        yield lineno, "".join(doc).rstrip("\n")
    src["sha256"], src["pos"] = raw.sha.hexdigest(), raw.pos

def read_parquet(path, src):
    """Yields (row number, record) in record batches (bounded memory), reading only the text/question/answer columns."""
    pq = need("pyarrow.parquet", path, "reading parquet", "pyarrow")
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "text" not in names and not any(set(pair) <= set(names) for pair in PAIRS):
            raise BadInput(f'{path}: needs a "text" column, or "question" and "answer" columns '
                           f'(GSM8K style, or MetaMathQA\'s "query" and "response"); it has {names}')
        n, rows = 0, max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(batch_size=1024, columns=[c for c in ("text", *sum(PAIRS, ())) if c in names]):
            for rec in batch.to_pylist():
                n += 1
                yield n, rec
            src["pos"] = src["bytes"] * n // rows
    except BadInput:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...
        raise BadInput(f"{path}: cannot read it as parquet ({short(e)}); check that the file is complete") from None
    # pyarrow reads the footer first and skips unused columns, so the bytes are hashed in a pass of their own
    src["sha256"] = file_sha256(path)

def file_sha256(path):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()

def read_hf(spec, src):
    """Yields (row number, record) of a Hugging Face dataset, streamed: nothing is downloaded whole."""
    datasets = need("datasets", spec, "streaming a Hugging Face dataset")
    try:
        yield from enumerate(datasets.load_dataset(src["dataset"], src["config"], split=src["split"],
                                                   streaming=True), 1)
    except Exception as e:  # no network, an unknown name, config or split, ...
        raise BadInput(f"{spec}: could not stream it ({short(e)}); check the name, config and split. Streaming needs "
                       f"huggingface.co: run where the network is, or download the data and pass a local "
                       f".jsonl or .parquet file") from None

def open_source(spec):
    """(kind, the source's meta.json record, its items as they are read)."""
    kind = source_kind(spec)
    if kind == "hf":
        src = hf_source(spec)
        return kind, src, read_hf(spec, src)
    src = {"path": os.path.abspath(spec), "sha256": None, "bytes": os.path.getsize(spec), "pos": 0}  # pos: read so far
    return kind, src, read_parquet(spec, src) if kind == "parquet" else read_lines(spec, kind, src)

def make_tasks(spec, kind, items, src, val_every, held_out):
    """Groups the items into tasks of about TASK_CHARS characters. A task carries the global index of its first
    document, so the 1-in-val_every validation split does not depend on where the tasks are cut.
    Yields (task, (bytes read, documents read)) for the progress line."""
    task, chars, first = [], 0, 0
    for item in items:
        task.append(item)
        chars += text_size(item[1])
        if chars >= TASK_CHARS:
            yield (spec, kind, first, val_every, held_out, task), (src.get("pos"), first + len(task))
            task, chars, first = [], 0, first + len(task)
    if task:
        yield (spec, kind, first, val_every, held_out, task), (src.get("pos"), first + len(task))

def text_size(x):
    """Characters of a document, a .jsonl line, or the text fields of a record."""
    if isinstance(x, str):
        return len(x)
    return sum(len(v) for v in x.values() if isinstance(v, str)) if isinstance(x, dict) else 1

# -----------------------------------------------------------------------------
# tokenizing in a process pool: workers parse and encode, the main process reads and writes in order

_enc = _index = None  # the worker's encoding and held-out index, set once per process by init_worker
_keep = False  # --keep_contaminated

def init_worker(encoding, index=None, keep=False, pool=False):
    global _enc, _index, _keep
    if pool:  # Ctrl-C reaches every process of the terminal's group: the main process alone answers it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _index, _keep = index, keep
    try:
        _enc = get_encoding(encoding)
    except SystemExit as e:  # fail in the first task, with the message, rather than as a broken pool
        _enc = BadInput(str(e).removeprefix("error: "))

def record_text(rec, where):
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    for q, a in PAIRS:
        if isinstance(rec, dict) and q in rec and a in rec:
            return f"Question: {rec[q]}\nAnswer: {rec[a]}"
    raise BadInput(f"{where}: needs a \"text\" field, or \"question\" and \"answer\" fields "
                   f"(GSM8K style, or MetaMathQA's \"query\" and \"response\")")

def jsonl_record(line, path, lineno):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise BadInput(f"{path}:{lineno}: not valid JSON; each line of a .jsonl file must be one JSON object") from None

# A final answer, as the data writes it: GSM8K's "#### 72" and MetaMathQA's "The answer is: 72", with a number that may
# have a sign, thousands commas and decimals (-1,000.5, .5), ending at a space, a line end or sentence punctuation
# (so "The answer is: 2\sqrt{3}" or "25%" is no number). The first such answer counts: a model that goes on past its
# answer may write another. Read from the record's solution (eval.json) and from the model's text (rho.py).
ANSWER = re.compile(r"(?:####|The answer is:)\s*(-?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+))(?=[.,;:!?)]?(?:\s|$))")

def final_answer(text):
    """The final answer in text as a normalised number string, or None. Normalised so that equal numbers are equal
    strings: no commas, no trailing decimal zeros, no leading zeros ("1,000" -> "1000", "12.50" -> "12.5",
    ".5" -> "0.5", "-0" -> "0")."""
    m = ANSWER.search(text)
    if not m:
        return None
    x = decimal.Decimal(m.group(1).replace(",", ""))
    return "0" if x == 0 else f"{x.normalize():f}"

def eval_problem(rec):
    """A held-out problem {"prompt", "answer", "solution"} from a question-answer record (GSM8K's or MetaMathQA's
    fields) whose solution has a final answer, else None."""
    for q, a in PAIRS:
        if isinstance(rec, dict) and isinstance(rec.get(q), str) and isinstance(rec.get(a), str):
            answer = final_answer(rec[a])
            return {"prompt": f"Question: {rec[q]}\nAnswer:", "answer": answer, "solution": f" {rec[a]}"} \
                if answer else None
    return None

def held_out_text(rec, text):
    """What no training document may contain: the question of a record, else the whole validation document."""
    for q, _ in PAIRS:
        if isinstance(rec, dict) and isinstance(rec.get(q), str):
            return rec[q]
    return text

def encode_task(task):
    """Worker: the tokens of a task's documents, each followed by end-of-text. held_out: the validation documents
    (every val_every-th by global document index; val_every 1: all), with their eval problems and held-out texts.
    Else the others, less those that the held-out index catches (kept with --keep_contaminated, still counted).
    One thread per process: --procs N uses N cores."""
    path, kind, first, val_every, held_out, items = task
    if isinstance(_enc, BadInput):
        raise _enc
    docs, problems, texts, t0 = [], [], [], time.process_time()
    for i, (n, x) in enumerate(items, first):
        if bool(val_every and i % val_every == val_every - 1) != held_out:
            continue  # a document of the other split
        rec = jsonl_record(x, path, n) if kind == "jsonl" else x
        if kind != "txt":
            x = record_text(rec, f"{path}:{n}" if kind == "jsonl" else f"{path}: record {n}")
        docs.append(x)
        if held_out:
            texts.append(held_out_text(rec, x))
            problems.append(eval_problem(rec))  # None: no final answer in a form that final_answer reads
    caught = contaminated(docs, _index) if _index else np.zeros(len(docs), bool)
    ids = []
    for x, c in zip(docs, caught):
        if c and not _keep:
            continue
        ids += _enc.encode_ordinary(x)
        ids.append(_enc.eot_token)
    cpu = time.process_time() - t0  # for bench.py
    return np.array(ids, token_dtype(_enc.n_vocab)), problems, texts, len(docs), int(caught.sum()), cpu

@contextlib.contextmanager
def start_pool(procs, encoding, index=None, keep=False):
    """None for --procs 1: tasks then run in this process. Workers are spawned, not forked: each is a fresh interpreter
    that imports only this file (numpy, tiktoken), so no lock or thread of the parent (torch's, a test runner's) is
    copied half-held into it; starting costs well under a second, and it is what macOS and Windows do anyway.
    ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies (out of memory) fails the run with
    BrokenProcessPool, where Pool would wait for its result forever. The held-out index goes to each worker once."""
    if procs == 1:
        init_worker(encoding, index, keep)
        yield None
        return
    pool = ProcessPoolExecutor(procs, multiprocessing.get_context("spawn"), initializer=init_worker,
                               initargs=(encoding, index, keep, True))
    try:
        yield pool
    except BaseException:  # an error or Ctrl-C: no result is wanted any more, so the workers are stopped now (a
        # Ctrl-C that lands inside submit leaves a task that is never queued, and shutdown would wait for it forever)
        for worker in list(pool._processes.values()):
            worker.kill()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

def run_tasks(tasks, pool, depth):
    """Yields (result, mark) of each task, in order. At most `depth` tasks are in flight, so memory stays bounded
    (Pool.imap or Executor.map would not do: they read the whole source ahead)."""
    if pool is None:
        for task, mark in tasks:
            yield encode_task(task), mark
        return
    inflight = collections.deque()
    for task, mark in tasks:
        inflight.append((pool.submit(encode_task, task), mark))
        if len(inflight) >= depth:
            future, mark = inflight.popleft()
            yield future.result(), mark
    while inflight:
        future, mark = inflight.popleft()
        yield future.result(), mark

class Progress:
    """One line on stderr, redrawn at most 4 times a second: MB done/total, percent, MB/s, tokens/s and ETA (for a
    stream of unknown size: documents, tokens and tokens/s). Then a summary line."""

    def __init__(self, name, size):
        self.name, self.size, self.t0, self.shown, self.tokens, self.width = name, size, time.time(), 0.0, 0, 0
        self.cpu = 0.0  # CPU seconds spent tokenizing, in whichever process ran the tasks

    def update(self, mark, tokens):
        (pos, docs), now = mark, time.time()
        self.tokens += tokens
        if now - self.shown < 0.25:
            return
        self.shown, dt = now, max(now - self.t0, 1e-6)
        if self.size:
            eta = (self.size - pos) * dt / max(pos, 1)
            line = (f"{pos / 1e6:,.1f}/{self.size / 1e6:,.1f} MB ({pos / self.size:.0%}) | {pos / dt / 1e6:.1f} MB/s | "
                    f"{rate(self.tokens / dt)} tok/s | eta {duration(eta)}")
        else:
            line = f"{docs:,} documents | {self.tokens:,} tokens | {rate(self.tokens / dt)} tok/s"
        self.show(f"prepare: {self.name} {line}", end="")

    def done(self):
        dt = time.time() - self.t0
        self.show(f"prepare: {self.name}: {self.tokens:,} tokens in {dt:.1f} s "
                  f"({rate(self.tokens / max(dt, 1e-6))} tok/s)")

    def show(self, line, end="\n"):
        print("\r" + line.ljust(self.width), end=end, file=sys.stderr, flush=True)
        self.width = 0 if end else len(line)  # the next line pads over this one

def rate(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"

def duration(s):
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.0f}m" if s < 5400 else f"{s / 3600:.1f}h"

def tokenize_source(spec, writer, pool, depth, val_every=0, held_out=False, limit=0):
    """Reads one source once, tokenizes it in tasks and writes the tokens in order: its validation documents (held_out;
    see encode_task) or its others. With a limit, stops after the task that brings writer to `limit` tokens: a task
    boundary, the same for any number of processes. Returns the source's meta.json record and what its tasks found:
    the first N_EVAL eval problems, the validation records without a final answer, the held-out texts, the documents
    of this split, those caught, all documents read, the CPU seconds."""
    global _reading
    kind, src, items, _reading = *open_source(spec), spec
    found = {"problems": [], "no_answer": 0, "held_out": [], "docs": 0, "caught": 0, "read": 0}
    first_of_two = held_out and val_every > 1  # hq read for its validation documents: it is read again
    progress = Progress(spec + (" (validation documents)" if first_of_two else ""), src.get("bytes"))
    try:
        tasks = make_tasks(spec, kind, items, src, val_every, held_out)
        for (ids, problems, texts, docs, caught, cpu), mark in run_tasks(tasks, pool, depth):
            progress.cpu += cpu
            writer.write(ids)
            found["problems"] += [p for p in problems if p][:N_EVAL - len(found["problems"])]
            found["no_answer"] += problems.count(None)
            found["held_out"] += texts
            found["docs"], found["caught"], found["read"] = found["docs"] + docs, found["caught"] + caught, mark[1]
            progress.update(mark, len(ids))
            if limit and writer.n >= limit:
                src.update(sha256=None, stopped_at_tokens=writer.n, bytes_read=mark[0],
                           documents_read=mark[1])  # a prefix
                break
    except BaseException as e:
        if progress.width:  # a progress line is showing: end it, so that an error starts on a line of its own
            print(file=sys.stderr)
        if isinstance(e, BrokenProcessPool):
            raise BadInput(f"{spec}: a tokenizing process died ({short(e)}); if it ran out of memory, "
                           f"use fewer --procs") from None
        raise
    progress.done()
    if src.get("non_utf8_bytes") and not first_of_two:
        print(f"prepare: warning: {spec}: {src['non_utf8_bytes']:,} byte(s) not UTF-8: each bad sequence became "
              f"U+FFFD (meta.json's sources count them); if the file is in another encoding, convert it to UTF-8",
              file=sys.stderr)
    src.pop("pos", None)
    return src, {**found, "cpu": progress.cpu}

NO_DOCS = ("a .txt source holds documents separated by blank lines, a .jsonl one JSON object a line: check that it is "
           "the file you meant")

def refuse_empty(spec, name, found):
    """Bad input: a training file would hold no tokens (rho.py could not read it)."""
    if not found["docs"]:
        raise BadInput(f"{spec}: no documents, so {name} would be empty; {NO_DOCS}")
    raise BadInput(f"{spec}: all {found['docs']:,} documents share a {NGRAM}-word run with a held-out question, so "
                   f"{name} would be empty; is --val the same data? Give other validation records "
                   f"(--keep_contaminated keeps them)")

def print_eval(spec, held):
    if held["problems"]:
        print(f"prepare: eval: {len(held['problems']):,} problems (the first {N_EVAL} at most) of {held['docs']:,} "
              f"validation documents; {held['no_answer']:,} have no final answer (\"#### N\" or \"The answer is: N\")")
    else:
        print(f"prepare: warning: {spec}: no validation record has a final answer (\"#### N\" as GSM8K, \"The answer "
              f"is: N\" as MetaMathQA), so eval.json is empty: rho.py then needs --eval_problems 0 (no accuracy)")

def prepare_files(args, enc):
    """The validation documents first (--val, or every VAL_EVERY-th hq document), so that the held-out questions are
    all known before any training document is checked; then hq_train (the other hq documents) and web."""
    files, dtype = {}, token_dtype(enc.n_vocab)
    out = {name: TokenWriter(os.path.join(args.out, name + ".bin"), dtype, files)
           for name in ("hq_val", "hq_train", "web")}
    return write_files(args, out, files)

def check_sources(args):
    """Every source, before any is read; a web source given twice (by two paths, or two copies) would be trained on
    twice. Files of equal size are hashed to tell."""
    for spec in filter(None, (args.hq, args.val, *args.web)):
        source_kind(spec)
    seen, by_size = {}, collections.defaultdict(list)
    for spec in args.web:
        key = spec if spec.startswith("hf:") else os.path.realpath(spec)
        if key in seen:
            what = "dataset" if spec.startswith("hf:") else "file"
            raise BadInput(f"{spec}: given twice in --web ({seen[key]} is the same {what}), so it would be trained "
                           f"on twice; give each source once")
        seen[key] = spec
        if not spec.startswith("hf:"):
            by_size[os.path.getsize(spec)].append(spec)
    for specs in (s for s in by_size.values() if len(s) > 1):
        first = {}
        for spec in specs:
            sha = file_sha256(spec)
            if sha in first:
                raise BadInput(f"{spec}: the same content as {first[sha]} (sha256 {sha[:12]}...), both in --web, so "
                               f"it would be trained on twice; give each source once")
            first[sha] = spec

def write_files(args, out, files):
    depth, keep, every = 2 * args.procs, args.keep_contaminated, 0 if args.val else VAL_EVERY
    with start_pool(args.procs, args.encoding) as pool:
        val_src, held = tokenize_source(args.val or args.hq, out["hq_val"], pool, depth, every or 1, held_out=True)
    if not held["docs"]:
        if args.val or not held["read"]:
            refuse_empty(args.val or args.hq, "hq_val.bin" if args.val else "hq_val.bin and hq_train.bin", held)
        raise BadInput(f"{args.hq}: {held['read']} documents, too few to hold out a validation split "
                       f"(1 in {VAL_EVERY}), so hq_val.bin would be empty; pass --val FILE")
    if out["hq_val"].n < MIN_VAL_TOKENS:
        raise BadInput(f"{args.val or args.hq}: hq_val.bin would hold {out['hq_val'].n:,} tokens, fewer than "
                       f"{MIN_VAL_TOKENS}, too few to evaluate (rho.py reads windows of --block_size + 1 tokens: 65 "
                       f"at its default): give more validation documents" + ("" if args.val else " (or --val FILE)"))
    print_eval(args.val or args.hq, held)
    texts = held.pop("held_out")
    index, too_short = held_out_index(texts)
    print_held_out(len(texts), too_short, index)
    dropped, web, web_found = {"hq_train": {}, "web": {}}, [], {"docs": 0, "caught": 0}

    def count(corpus, spec, found):  # dropped documents, per source
        dropped[corpus][spec] = dropped[corpus].get(spec, 0) + found["caught"]
        print_dropped(spec, found["docs"], found["caught"], keep)

    with start_pool(args.procs, args.encoding, index, keep) as pool:
        hq_src, found = tokenize_source(args.hq, out["hq_train"], pool, depth, every)
        count("hq_train", args.hq, found)
        if not out["hq_train"].n:
            refuse_empty(args.hq, "hq_train.bin", found)
        for spec in args.web:  # shards, in the order given, until --max_web_tokens
            if args.max_web_tokens and out["web"].n >= args.max_web_tokens:
                break
            src, found = tokenize_source(spec, out["web"], pool, depth, limit=args.max_web_tokens)
            web.append(src); count("web", spec, found)
            web_found = {k: web_found[k] + found[k] for k in web_found}
    if not out["web"].n:
        refuse_empty(args.web[0] if len(args.web) == 1 else f"--web ({len(args.web)} sources)", "web.bin", web_found)
    counts = {name: w.close() for name, w in out.items()}
    write_temp(os.path.join(args.out, "eval.json"), json.dumps(held["problems"]).encode(), files)
    sources = {"hq": hq_src, **({"val": val_src} if args.val else {}), "web": web[0] if len(web) == 1 else web}
    return counts, {"sources": sources, "decontamination": decontamination_meta(len(texts), too_short, dropped, keep),
                    "files": files}

# -----------------------------------------------------------------------------

def checked(f, *args):
    """f(*args), with bad input (found while reading, or in a worker and passed back) as one line."""
    try:
        return f(*args)
    except BadInput as e:
        sys.exit(f"error: {e}")

def check_flags(args):
    """Bad numbers and a bad --out, each as one line, before anything is read."""
    for flag, least in (("procs", 1), ("web_tokens", 1), ("base_tokens", 1), ("max_web_tokens", 0), ("seed", 0)):
        if getattr(args, flag) < least:
            sys.exit(f"error: --{flag} {getattr(args, flag)}: must be {least} or more")
    if args.seed > SEED_MAX:
        sys.exit(f"error: --seed {args.seed}: must be at most {SEED_MAX}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: --out {args.out}: is a file; give a folder (it is created if missing)")

def make_out(out):
    """Creates the output folder; returns the folders it created, deepest first (removed if the run fails)."""
    made, d = [], os.path.abspath(out)
    while not os.path.exists(d):
        made.append(d); d = os.path.dirname(d)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out {out}: cannot create it ({short(e)}); give a folder you can write to")
    if not os.access(out, os.W_OK):
        remove_empty(made)
        sys.exit(f"error: --out {out}: not writable; give a folder you can write to")
    return made

def remove_empty(folders):
    for d in folders:
        with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
            os.rmdir(d)

def inputs_of(args):
    """meta.json's "inputs": the flags that define the data, with paths made absolute."""
    path = lambda spec: spec if spec is None or spec.startswith("hf:") else os.path.abspath(spec)
    given = {**vars(args), "hq": path(args.hq), "val": path(args.val), "web": [path(s) for s in args.web or ()]}
    defining = ("hq", "val", "web", "max_web_tokens") if args.hq else ("seed", "web_tokens", "base_tokens")
    return {key: given[key] for key in sorted(("encoding", "keep_contaminated", *defining))}

def read_meta(out):
    """The folder's meta.json, or None if it has none; {} if it cannot be read."""
    try:
        meta = read_json(os.path.join(out, "meta.json"))
        return meta if isinstance(meta, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}

OVERWRITE = "nothing was changed: pass --overwrite to replace it, or give another --out"

def check_out(args, inputs):
    """A folder holding data prepared from other inputs is refused before any work (with --overwrite, replaced)."""
    old = read_meta(args.out)
    if args.overwrite or not old or "inputs" not in old or old["inputs"] == inputs:
        return  # else commit compares the files themselves
    was, show = old["inputs"], lambda v: " ".join(v) if isinstance(v, list) else v
    if ("hq" in was) != ("hq" in inputs):  # the demo and files
        source = lambda given: f"--hq {given['hq']}" if "hq" in given else "the embedded demo"
        why = f"{source(was)}, not {source(inputs)}"
    else:
        flag = next(k for k in sorted({*was, *inputs}) if was.get(k) != inputs.get(k))
        why = f"--{flag} {show(was.get(flag))}, not {show(inputs.get(flag))}"
    sys.exit(f"error: --out {args.out}: holds data prepared from other inputs ({why}); {OVERWRITE}")

def commit(out, files, meta, overwrite):
    """Renames this run's temp files into place, meta.json last. A folder holding other prepared data (other files, or
    files without a meta.json) is kept without --overwrite; the same files again (the demo prepared twice) pass."""
    old, names = read_meta(out), [*files, "meta.json"]
    same = old is not None and old.get("files") == files
    found = [n for n in names if os.path.exists(os.path.join(out, n))]
    if found and not same and not overwrite:
        why = ("meta.json cannot be read" if old == {} else "no meta.json" if old is None else
               next((f"{n} differs" for n in files if old.get("files", {}).get(n) != files[n]), "other files"))
        sys.exit(f"error: --out {out}: holds other prepared data ({why}); {OVERWRITE}")
    write_temp(os.path.join(out, "meta.json"), json.dumps(meta, indent=2).encode(), {})
    for name in names:
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    _temps.clear()

def stopped(args, e, made):
    """The one line for a run that did not finish: a full disk, a folder gone, Ctrl-C."""
    where = "nothing was written" if made else f"nothing was replaced ({args.out} keeps what it held)"
    if isinstance(e, KeyboardInterrupt):
        at = f" while reading {_reading}" if _reading else ""
        print(f"prepare: interrupted{at}; {where}: run the same command again to start over", file=sys.stderr)
        sys.exit(130)
    sys.exit(f"error: {e.filename or args.out}: {e.strerror or short(e)}; {where}: free space or fix the folder, "
             f"then run the same command again")

def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize the high-quality and web corpora into token files. A source is a "
                                "file (.txt, .jsonl, .jsonl.gz, .parquet) or hf:NAME[:CONFIG][@SPLIT], a Hugging Face "
                                "dataset streamed by name (split default train), e.g. hf:openai/gsm8k:main@test.")
    p.add_argument("--hq", help="high-quality corpus of the target distribution (a source, as above)")
    p.add_argument("--web", nargs="+", help="large web-like corpus for continual pretraining: one source or several "
                   "(shards, e.g. owm/*.parquet), tokenized in the order given into one web.bin")
    p.add_argument("--val", help="validation split of the target distribution "
                   "(a source; default: 1 in 50 hq documents)")
    p.add_argument("--out", help="output folder (default data/demo for the demo, required otherwise)")
    p.add_argument("--encoding", default="bytes",
                   help="tiktoken encoding: bytes (default, built in, no download), gpt2, cl100k_base, "
                   "...; or a model's own tokenizer: hf:NAME or a save_pretrained directory (needs transformers)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the embedded demo corpus")
    p.add_argument("--max_web_tokens", type=int, default=0, help="stop reading the web sources after about this many "
                   "tokens (a large stream or many shards; meta.json records where it stopped); default: read them all")
    p.add_argument("--web_tokens", type=int, default=4_700_000, help="size of the demo web corpus in tokens")
    p.add_argument("--base_tokens", type=int, default=1_250_000, help="size of the demo base corpus "
                   "(general web) in tokens")
    p.add_argument("--keep_contaminated", action="store_true", help="keep the training documents that share a "
                   f"{NGRAM}-word run with a held-out question (default: drop them); they are counted either way")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="tokenizing processes "
                   "(default: all cores; 1: no pool)")
    p.add_argument("--overwrite", action="store_true", help="replace data of other inputs in --out (without it, such "
                   "a folder is refused; the same data again is always written)")
    args = p.parse_args(argv)
    if bool(args.hq) != bool(args.web):
        p.error("--hq and --web go together (or neither, for the embedded demo)")
    if args.hq and not args.out:
        p.error("--out DIR is required with --hq/--web")
    args.out = args.out or os.path.join("data", "demo")
    check_flags(args)
    if os.path.isdir(args.encoding):  # a tokenizer's directory: meta.json records where it is from anywhere
        args.encoding = os.path.abspath(args.encoding)
    global _reading
    made, _reading = [], None
    try:
        enc, inputs = get_encoding(args.encoding), inputs_of(args)
        if args.hq:
            checked(check_sources, args)
        check_out(args, inputs)
        made = make_out(args.out)
        if args.hq:
            counts, extra = checked(prepare_files, args, enc)
        else:
            counts, extra = prepare_demo(args.out, enc, args.seed, args.keep_contaminated,
                                         web_tokens=args.web_tokens, base_tokens=args.base_tokens)
        meta = {"encoding": args.encoding, "vocab_size": enc.n_vocab, "eot": enc.eot_token,
                "dtype": np.dtype(token_dtype(enc.n_vocab)).name, "tokens": counts, **extra,
                "tokenizer": {"name": args.encoding, "sha256": tokenizer_id(enc)}, "inputs": inputs}
        commit(args.out, extra["files"], meta, args.overwrite)
    except BaseException as e:
        discard_temps()
        remove_empty(made)
        if isinstance(e, (KeyboardInterrupt, OSError)):
            stopped(args, e, made)
        raise
    print(f"prepare: wrote {args.out}: " + ", ".join(f"{k} {v:,} tokens" for k, v in counts.items()))
    if "label_share" in extra:
        print("prepare: web token share by label: "
              + ", ".join(f"{k} {v:.1%}" for k, v in extra["label_share"].items()))

if __name__ == "__main__":
    main()
