"""rho_heldout.yaml's functions: the data folder's held-out problems (eval.json, in its order), and rho's score of a
generated text (prepare.final_answer, the function rho.py's answers() reads them with)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for prepare.py
from prepare import final_answer  # noqa: E402

def load(data="data/demo", **metadata):  # --metadata '{"data": FOLDER}': read by datasets' json builder, offline
    import datasets
    path = os.path.join(data, "eval.json")
    if not os.path.isfile(path):
        sys.exit(f"error: {path}: no held-out problems: pass --metadata '{{\"data\": \"FOLDER\"}}', a folder that "
                 "prepare.py wrote")
    return datasets.load_dataset("json", data_files={"test": path})

def process_results(doc, results):  # 1 where the final answer of the text generated (up to end-of-text) is right
    return {"exact_match": int(final_answer(results[0]) == doc["answer"])}
