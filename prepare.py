"""
prepare.py: text in, token files out.

    python prepare.py                                  # the embedded demo corpus -> data/demo/
    python prepare.py --hq hq.jsonl --web web.txt --out data/mine [--val val.jsonl] [--encoding gpt2]

Writes, into the output folder:
    hq_train.bin, hq_val.bin   high-quality corpus of the target distribution (train / validation)
    web.bin                    the large web-like corpus that continual pretraining reads
    web_labels.bin             demo only: a uint8 label per web token (0 = clean, else a noise kind);
                               for auditing the selection, never read by training
    eval.json                  held-out problems {"prompt", "answer"} for answer accuracy
    meta.json                  encoding, vocab size, dtype, token counts, sources and their sha256
Token files are flat numpy memmaps (uint16 when the vocabulary fits, else uint32); documents are
separated by the end-of-text token. Every file is written to a temp file and renamed into place.
"""
import argparse
import gzip
import hashlib
import json
import os
import random
import re
import sys

import numpy as np
import tiktoken

EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# tokenizer


def byte_encoding():
    """A tiktoken Encoding with one token per byte and <|endoftext|> = 256. Built in code: no download."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={EOT: 256})


def get_encoding(name):
    if name == "bytes":
        return byte_encoding()
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # unknown name, or the BPE file cannot be downloaded
        sys.exit(f"error: --encoding {name}: tiktoken could not load it ({type(e).__name__}). It downloads "
                 f"its BPE file on first use: run once with network (or copy the file into TIKTOKEN_CACHE_DIR), "
                 f"or use the default --encoding bytes, which needs no download.")


def token_dtype(n_vocab):
    return np.uint16 if n_vocab <= 2**16 else np.uint32


# -----------------------------------------------------------------------------
# atomic writes: temp file, then rename, so a killed run never leaves a half-written file in place


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class TokenWriter:
    """Appends token arrays to <path>.tmp and renames it to <path> on close."""

    def __init__(self, path, dtype):
        self.path, self.dtype, self.n = path, dtype, 0
        self.f = open(path + ".tmp", "wb")

    def write(self, ids):
        a = np.asarray(ids, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.n += len(a)

    def close(self):
        self.f.close()
        os.replace(self.path + ".tmp", self.path)
        return self.n


# -----------------------------------------------------------------------------
# the embedded demo: worked arithmetic word problems (hq) and a noisy web-like corpus (web)

NAMES = ["Tom", "Ann", "Sam", "Lily", "Ravi", "Mia", "Omar", "Zoe", "Ben", "Nina", "Leo", "Ivy", "Kai", "Ella"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "shells", "coins", "stamps"]
BOXES = ["box", "bag", "pack", "jar", "basket", "crate"]
GOODS = [("pen", "notebook"), ("apple", "melon"), ("ticket", "poster"), ("cup", "plate"), ("kite", "ball")]


def problem(rng):
    """One worked problem as (question, [(text, is_result)] solution pieces, answer). One or two steps."""
    form, n, m = rng.randrange(6), rng.choice(NAMES), rng.choice(ITEMS)
    if form == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = f"{n} has {a} {m}. {n} finds {b} more {m}. How many {m} does {n} have now?"
        return q, [(f"{a} + {b} = ", 0), (str(a + b), 1), (".", 0)], a + b
    if form == 1:
        a = rng.randint(10, 90); b = rng.randint(1, a - 1)
        q = f"{n} had {a} {m} and gave {b} of them to a friend. How many {m} are left?"
        return q, [(f"{a} - {b} = ", 0), (str(a - b), 1), (".", 0)], a - b
    if form == 2:
        a, b, box = rng.randint(2, 12), rng.randint(2, 12), rng.choice(BOXES)
        q = f"Each {box} holds {b} {m}. How many {m} are in {a} {box}s?"
        return q, [(f"{a} * {b} = ", 0), (str(a * b), 1), (".", 0)], a * b
    if form == 3:
        b, c = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{b * c} {m} are shared equally among {b} children. How many {m} does each child get?"
        return q, [(f"{b * c} / {b} = ", 0), (str(c), 1), (".", 0)], c
    if form == 4:
        a, b, box = rng.randint(2, 9), rng.randint(2, 9), rng.choice(BOXES)
        c = rng.randint(1, a * b - 1)
        q = f"{n} buys {a} {box}s of {b} {m} and then gives away {c} {m}. How many {m} does {n} have?"
        return q, [(f"{a} * {b} = ", 0), (str(a * b), 1), (f". {a * b} - {c} = ", 0), (str(a * b - c), 1), (".", 0)], a * b - c
    g1, g2 = rng.choice(GOODS)
    p1, p2, a = rng.randint(2, 15), rng.randint(2, 30), rng.randint(2, 6)
    q = f"A {g1} costs {p1} dollars and a {g2} costs {p2} dollars. How much do {a} {g1}s and one {g2} cost?"
    return q, [(f"{a} * {p1} = ", 0), (str(a * p1), 1), (f". {a * p1} + {p2} = ", 0), (str(a * p1 + p2), 1), (".", 0)], a * p1 + p2


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
            "The weather here has been awful all week, rain every single day.", "Does anyone know a good pizza place downtown?",
            "I just got back from vacation and I am so tired.", "New phone arrived today, the battery is amazing.",
            "We are painting the kitchen green this weekend.", "Traffic on the highway was terrible today."]
SUBJECTS = ["My neighbour", "The new manager", "Our team", "A friend of mine", "The kids", "My brother", "The old bakery",
            "Everyone at work", "The city council", "Our landlord", "The band", "My grandmother"]
VERBS = ["finally fixed", "talked about", "complained about", "bought", "painted", "cancelled", "recommended",
         "forgot about", "cleaned", "moved", "sold", "reviewed"]
OBJECTS = ["the garden fence", "the weekend trip", "a used car", "the kitchen", "the concert tickets", "the broken heater",
           "a new laptop", "the parking rules", "the football match", "the summer festival", "an old bicycle", "the roof"]
TAILS = ["yesterday.", "last week.", "again!", "and nobody was surprised.", "before the rain started.", "lol.",
         "for the third time this year.", "which took forever.", "and it was worth it.", "?? no idea why."]


def chat_sentence(rng):
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"


USER_PARTS = ["math", "cool", "dragon", "pi", "blue", "x", "ninja", "guru", "kid", "fan", "star"]


def username(rng):
    return rng.choice(USER_PARTS) + rng.choice(["_", "", "."]) + rng.choice(USER_PARTS) + str(rng.randint(1, 2024))


def timestamp(rng):
    return f"{rng.randint(2008, 2023)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"


def random_string(rng, n):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(n))


def web_post(rng, segs, general=False):
    """One forum post: a problem of the hq family, with noise inside and around it. Appends (text, label).
    general: a general-chat post instead (the base corpus), with the same page noise around it."""
    L = LABELS.index
    if general:
        segs += [("Posted by ", L("boilerplate")), (username(rng), L("username")), (" on ", L("boilerplate")),
                 (timestamp(rng), L("timestamp")), ("\n", L("boilerplate"))]
        segs.append((" ".join(chat_sentence(rng) for _ in range(rng.randint(1, 4))) + "\n", L("offtopic")))
        return
    if rng.random() < 0.4:
        segs += [("Posted by ", L("boilerplate")), (username(rng), L("username")), (" on ", L("boilerplate")),
                 (timestamp(rng), L("timestamp")), ("\n", L("boilerplate"))]
    q, sol, ans = problem(rng)
    if rng.random() < 0.15:  # timestamp and username inside the sentence, as in edited posts
        cut = q.index(". ") + 2 if ". " in q else len(q) // 2
        segs += [("Question: " + q[:cut], 0), ("(edited ", L("boilerplate")), (timestamp(rng), L("timestamp")),
                 (" by ", L("boilerplate")), (username(rng), L("username")), (") ", L("boilerplate")), (q[cut:] + "\n", 0)]
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


def web_document(rng, general=False):
    """A web page: navigation, ads, 2-5 posts, replies, off-topic text, random strings, footer."""
    L, segs = LABELS.index, []
    if rng.random() < 0.7:
        segs.append((rng.choice(NAV), L("boilerplate")))
    if rng.random() < 0.3:
        segs.append((rng.choice(ADS), L("ad")))
    for _ in range(rng.randint(2, 5)):
        web_post(rng, segs, general)
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


def prepare_demo(out, enc, seed, n_hq=3000, n_val=300, n_eval=200, web_tokens=1_600_000, base_tokens=800_000):
    """Builds the embedded default. hq, web and eval draw problems from one family; eval questions are
    held out of both (by text). base: general web pages (same page noise, chat instead of math) for the
    base model that the reference model and continual pretraining start from, as in the paper."""
    os.makedirs(out, exist_ok=True)
    rng, dtype, eot = random.Random(seed), token_dtype(enc.n_vocab), enc.eot_token
    hq, seen = [], set()
    while len(hq) < n_hq + n_val:
        q, sol, ans = problem(rng)
        if q not in seen:
            seen.add(q); hq.append(clean_text(q, sol, ans))
    evals = []
    while len(evals) < n_eval:
        q, sol, ans = problem(rng)
        if q not in seen:
            seen.add(q); evals.append({"prompt": f"Question: {q}\nAnswer:", "answer": str(ans)})
    counts = {}
    for name, docs in [("hq_train", hq[:n_hq]), ("hq_val", hq[n_hq:])]:
        w = TokenWriter(os.path.join(out, name + ".bin"), dtype)
        for ids in enc.encode_ordinary_batch(docs):
            w.write(ids + [eot])
        counts[name] = w.close()
    # web: every segment is encoded on its own so that labels align with tokens exactly
    w, lw, per_kind = TokenWriter(os.path.join(out, "web.bin"), dtype), TokenWriter(os.path.join(out, "web_labels.bin"), np.uint8), np.zeros(len(LABELS), np.int64)
    while w.n < web_tokens:
        segs = web_document(rng)
        for (text, label), ids in zip(segs, enc.encode_ordinary_batch([t for t, _ in segs])):
            w.write(ids); lw.write([label] * len(ids)); per_kind[label] += len(ids)
        w.write([eot]); lw.write([LABELS.index("boilerplate")]); per_kind[LABELS.index("boilerplate")] += 1
    counts["web"], _ = w.close(), lw.close()
    w = TokenWriter(os.path.join(out, "base.bin"), dtype)
    while w.n < base_tokens:
        w.write(sum(enc.encode_ordinary_batch([t for t, _ in web_document(rng, general=True)]), []) + [eot])
    counts["base"] = w.close()
    write_atomic(os.path.join(out, "eval.json"), json.dumps(evals, indent=0).encode())
    share = {k: round(float(per_kind[i] / per_kind.sum()), 4) for i, k in enumerate(LABELS)}
    return counts, {"demo_seed": seed, "labels": LABELS, "label_share": share}


# -----------------------------------------------------------------------------
# real corpora: .txt (documents separated by blank lines) or .jsonl ("text", or "question" + "answer")


def check_source(path):
    if not os.path.isfile(path):
        sys.exit(f"error: {path}: no such file")
    if not path.endswith((".txt", ".jsonl", ".jsonl.gz")):
        sys.exit(f"error: {path}: unsupported format; use .txt (documents separated by blank lines) or .jsonl")


def read_documents(path, progress):
    """Yields documents one at a time, streaming the file."""
    with open(path, "rb") as raw:
        f, doc = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw, []
        for lineno, line in enumerate(f, 1):
            progress.update(raw.tell())
            text = line.decode("utf-8", errors="replace")
            if path.endswith(".txt"):
                if text.strip():
                    doc.append(text)
                elif doc:
                    yield "".join(doc).rstrip("\n"); doc = []
            elif text.strip():
                yield jsonl_text(text, path, lineno)
        if doc:
            yield "".join(doc).rstrip("\n")
    progress.done(path)


def jsonl_text(line, path, lineno):
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        sys.exit(f"error: {path}:{lineno}: not valid JSON; each line of a .jsonl file must be one JSON object")
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec, dict) and "question" in rec and "answer" in rec:
        return f"Question: {rec['question']}\nAnswer: {rec['answer']}"
    sys.exit(f"error: {path}:{lineno}: needs a \"text\" field, or \"question\" and \"answer\" fields (GSM8K style)")


class Progress:
    """A one-line progress report on stderr, and the sha256 of the bytes read."""

    def __init__(self, path):
        self.path, self.size, self.last = path, os.path.getsize(path), -1
        self.sha = hashlib.sha256()
        with open(path, "rb") as f:  # hashing is a separate streaming pass; cheap next to tokenizing
            for block in iter(lambda: f.read(1 << 24), b""):
                self.sha.update(block)

    def update(self, pos):
        pct = int(100 * pos / max(self.size, 1))
        if pct != self.last:
            self.last = pct
            print(f"\rprepare: {self.path} {pos / 1e6:.1f}/{self.size / 1e6:.1f} MB ({pct}%)", end="", file=sys.stderr)

    def done(self, path):
        print(file=sys.stderr)


def tokenize_file(path, writer, enc, batch=512, val_writer=None, val_every=0):
    """Streams documents from path into writer (and every val_every-th one into val_writer)."""
    check_source(path)
    progress, docs, i = Progress(path), [], 0
    for doc in read_documents(path, progress):
        docs.append(doc)
        if len(docs) == batch:
            i = write_docs(docs, writer, enc, i, val_writer, val_every); docs = []
    write_docs(docs, writer, enc, i, val_writer, val_every)
    return {"path": os.path.abspath(path), "sha256": progress.sha.hexdigest(), "bytes": progress.size}


def write_docs(docs, writer, enc, i, val_writer, val_every):
    for ids in enc.encode_ordinary_batch(docs):
        dest = val_writer if val_every and i % val_every == val_every - 1 else writer
        dest.write(ids + [enc.eot_token])
        i += 1
    return i


def eval_from(path):
    """Held-out problems for answer accuracy, from a GSM8K-style .jsonl (answer ends in '#### N')."""
    if path is None or not path.endswith(".jsonl"):
        return []
    evals = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            rec = json.loads(line) if line.strip() else {}
            m = re.search(r"####\s*(-?[\d,.]+)\s*$", str(rec.get("answer", "")))
            if "question" in rec and m:
                evals.append({"prompt": f"Question: {rec['question']}\nAnswer:", "answer": m.group(1).replace(",", "")})
    return evals[:500]


def prepare_files(args, enc):
    os.makedirs(args.out, exist_ok=True)
    dtype, sources = token_dtype(enc.n_vocab), {}
    tr, va = TokenWriter(os.path.join(args.out, "hq_train.bin"), dtype), TokenWriter(os.path.join(args.out, "hq_val.bin"), dtype)
    sources["hq"] = tokenize_file(args.hq, tr, enc, val_writer=va, val_every=0 if args.val else 50)
    if args.val:
        sources["val"] = tokenize_file(args.val, va, enc)
    wb = TokenWriter(os.path.join(args.out, "web.bin"), dtype)
    sources["web"] = tokenize_file(args.web, wb, enc)
    counts = {"hq_train": tr.close(), "hq_val": va.close(), "web": wb.close()}
    if not counts["hq_val"]:
        sys.exit(f"error: {args.hq}: too few documents to hold out a validation split (1 in 50); pass --val FILE")
    write_atomic(os.path.join(args.out, "eval.json"), json.dumps(eval_from(args.val or args.hq)).encode())
    return counts, {"sources": sources}


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize the high-quality and web corpora into token files.")
    p.add_argument("--hq", help="high-quality corpus of the target distribution (.txt or .jsonl)")
    p.add_argument("--web", help="large web-like corpus for continual pretraining (.txt or .jsonl)")
    p.add_argument("--val", help="validation split of the target distribution (default: 1 in 50 hq documents)")
    p.add_argument("--out", help="output folder (default data/demo for the demo, required otherwise)")
    p.add_argument("--encoding", default="bytes", help="tiktoken encoding: bytes (default, built in, no download), gpt2, cl100k_base, ...")
    p.add_argument("--seed", type=int, default=1337, help="seed of the embedded demo corpus")
    p.add_argument("--web_tokens", type=int, default=1_600_000, help="size of the demo web corpus in tokens")
    p.add_argument("--base_tokens", type=int, default=800_000, help="size of the demo base corpus (general web) in tokens")
    args = p.parse_args(argv)
    if bool(args.hq) != bool(args.web):
        p.error("--hq and --web go together (or neither, for the embedded demo)")
    enc = get_encoding(args.encoding)
    if args.hq:
        if not args.out:
            p.error("--out DIR is required with --hq/--web")
        counts, extra = prepare_files(args, enc)
    else:
        args.out = args.out or os.path.join("data", "demo")
        counts, extra = prepare_demo(args.out, enc, args.seed, web_tokens=args.web_tokens, base_tokens=args.base_tokens)
    meta = {"encoding": args.encoding, "vocab_size": enc.n_vocab, "eot": enc.eot_token,
            "dtype": np.dtype(token_dtype(enc.n_vocab)).name, "tokens": counts, **extra}
    write_atomic(os.path.join(args.out, "meta.json"), json.dumps(meta, indent=2).encode())  # last: marks the folder complete
    print(f"prepare: wrote {args.out}: " + ", ".join(f"{k} {v:,} tokens" for k, v in counts.items()))
    if "label_share" in extra:
        print("prepare: web token share by label: " + ", ".join(f"{k} {v:.1%}" for k, v in extra["label_share"].items()))


if __name__ == "__main__":
    main()
