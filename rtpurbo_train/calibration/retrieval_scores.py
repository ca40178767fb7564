"""Retrieval scores per (layer, query head) and the calibrated SparsityPlan.

R_h = mean_{t in needle_2} sum_{j in needle_1} A_h(t, j), averaged over the documents of each
length, then over lengths (so every length weighs the same). Selection is per KV head, by the max
over its query heads (METHOD.md, RTPurbo step 1 Decision), through `SparsityPlan.from_scores`.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from rtpurbo_train import distributed as dist
from rtpurbo_train.calibration.echo_documents import EchoDocument
from rtpurbo_train.calibration.needle_echo_attention import NeedleEchoProbe, needle_echo_attention
from rtpurbo_train.plan import HeadLayout, SparsityPlan

# Settings that calibration itself decides; the caller must not pass them in plan_settings.
_RESERVED_PLAN_KEYS = {"model", "layers", "retrieval_fraction"}


@torch.no_grad()
def measure_retrieval_scores(model, documents: Sequence[EchoDocument], *, progress: bool = True) -> torch.Tensor:
    """Needle-echo retrieval score of every query head: float32 [L, Hq] (on CPU).

    One forward per document (batch 1) with the "rtpurbo_calibrate" attention function; the model's
    attention implementation and train/eval mode are restored afterwards. Several ranks deal the documents
    among themselves and gather the scores (`distributed.forward_share`).
    """
    if not documents:
        raise ValueError("no calibration documents")
    layout = HeadLayout.from_config(model.config)
    probe = NeedleEchoProbe(layout.num_layers, layout.num_q_heads)
    device = next(model.parameters()).device
    # Only the last position's logits: the scores come from attention, and full logits would cost
    # T x vocab memory for nothing.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    share = dist.forward_share(model)
    scores: dict[int, torch.Tensor] = {}  # document index -> [L, Hq]
    was_training = model.training
    model.eval()
    try:
        with needle_echo_attention(model, probe):
            for i in tqdm(dist.deal(range(len(documents)), share), desc="calibrate: needle-echo scores",
                          unit="doc", disable=not progress):
                doc = documents[i]
                probe.start_document(doc.needle_1, doc.needle_2)
                # Causal attention: tokens after needle_2 cannot change its rows, so they are not run.
                ids = doc.input_ids[: doc.needle_2[1]].to(device)[None]
                model(input_ids=ids, use_cache=False, **extra)
                scores[i] = probe.document_scores()
    finally:
        model.train(was_training)
    if share[1] > 1:
        scores = {i: s for part in dist.all_gather_objects(scores) for i, s in part.items()}
    per_length: dict[int, list[torch.Tensor]] = defaultdict(list)
    for i, doc in enumerate(documents):
        per_length[doc.length].append(scores[i])
    by_length = [torch.stack(rows).mean(0) for _, rows in sorted(per_length.items())]
    return torch.stack(by_length).mean(0).float()


def calibrate(model, documents: Sequence[EchoDocument], *, fraction: float = 0.15,
              plan_settings: Optional[dict] = None, progress: bool = True) -> tuple[SparsityPlan, torch.Tensor]:
    """Score the heads on `documents` and keep the top `fraction` of KV heads as retrieval heads.

    plan_settings: other SparsityPlan fields (window, sink_tokens, indexer_dim, top_p, top_k,
    block_size, seqlen_threshold). Returns (plan, q_scores float32 [L, Hq]).
    """
    settings = dict(plan_settings or {})
    reserved = _RESERVED_PLAN_KEYS & settings.keys()
    if reserved:
        raise ValueError(f"plan_settings must not set {sorted(reserved)}: calibration sets them "
                         "(pass the retrieval fraction as `fraction`)")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    q_scores = measure_retrieval_scores(model, documents, progress=progress)
    layout = HeadLayout.from_config(model.config)
    plan = SparsityPlan.from_scores(layout, q_scores.tolist(), fraction, **settings)
    return plan, q_scores
