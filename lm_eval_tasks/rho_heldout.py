"""rho_heldout.yaml's functions: the data folder's held-out problems (eval.json, in its order) with the text of the
tokens rho.py's answers() feeds (its end-of-text token, then the prompt, as the data's encoding gives them), and rho's
score of a generated text (prepare.final_answer, the function answers() reads them with)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for prepare.py
from prepare import HFEncoding, final_answer, get_encoding  # noqa: E402

def problems(data):
    """eval.json's problems, each with "context": the text of rho's prompt ids, special tokens written out, which the
    exported tokenizer encodes (lm-eval's add_bos_token=False: no special token added) back to those ids."""
    path = os.path.join(data, "eval.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(data, "meta.json")):
        sys.exit(f"error: {path}: no held-out problems: pass --metadata '{{\"data\": \"FOLDER\"}}', a folder that "
                 "prepare.py wrote")
    with open(os.path.join(data, "meta.json")) as f:
        enc = get_encoding(json.load(f)["encoding"])
    text = (lambda ids: enc.tok.decode(ids, skip_special_tokens=False)) if isinstance(enc, HFEncoding) else enc.decode
    with open(path) as f:
        return [{**p, "context": text([enc.eot_token] + enc.encode_ordinary(p["prompt"]))} for p in json.load(f)]

def load(data="data/demo", **metadata):  # the task's dataset (custom_dataset): --metadata '{"data": FOLDER}'
    rows = problems(data)  # a missing folder said first, where lm-eval's datasets may be absent
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

def process_results(doc, results):  # 1 where the final answer of the text generated (up to end-of-text) is right
    return {"exact_match": int(final_answer(results[0]) == doc["answer"])}
