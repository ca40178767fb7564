"""Run by test_data_parallel_forwards.py as two processes (gloo; RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
in the environment), and in-process as the one-process reference: calibration scores and evaluate() on the
tiny sparse Llama, counting the model's forwards of each. Each rank writes its output to --out/rank<r>.json.
--zero3 marks a parameter the way DeepSpeed's ZeRO-3 marks the ones it partitions (`ds_id`)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.`

from rtpurbo_train.calibration import make_echo_documents, measure_retrieval_scores  # noqa: E402
from rtpurbo_train.evaluation import evaluate  # noqa: E402
from rtpurbo_train.synthetic import haystack_text  # noqa: E402
from tests.evaluation.test_evaluate_end_to_end import _tiny_sparse_model  # noqa: E402

LENGTHS = [320, 448]


def run(out_dir: Path, zero3: bool = False) -> dict:
    """3 calibration documents; 4 needle prompts, 3 perplexity documents, 2 timed lengths (one run each, no
    warm-up on CPU)."""
    model, tok, runtime, plan = _tiny_sparse_model(window=64, top_p=0.5)
    if zero3:
        next(model.parameters()).ds_id = 0
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    hay = torch.randint(0, 250, (600,), generator=torch.Generator().manual_seed(0))
    docs = make_echo_documents(hay, lengths=[64, 96], docs_per_length=2, needle_len=8, seed=1)[:3]
    scores = measure_retrieval_scores(model, docs, progress=False)
    calibration_forwards = len(forwards)
    texts = [haystack_text(n_chars=700, seed=s) for s in range(3)]
    results = evaluate(model, tok, runtime, plan, lengths=LENGTHS, depths=[0.2, 0.8], samples_per_cell=1,
                       perplexity_texts=texts, perplexity_len=256, perplexity_docs=3, perplexity_buckets=4,
                       timing_runs=1, out_dir=out_dir, progress=False)
    return json.loads(json.dumps({"calibration_forwards": calibration_forwards, "scores": scores.tolist(),
                                  "forwards": len(forwards) - calibration_forwards, "results": results}))


if __name__ == "__main__":
    import torch.distributed as tdist

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero3", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    out = run(Path(args.out) / "eval", args.zero3)
    (Path(args.out) / f"rank{tdist.get_rank()}.json").write_text(json.dumps(out))
    tdist.destroy_process_group()
