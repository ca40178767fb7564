"""Retrieval-head calibration (RTPurbo step 1): needle-echo documents -> per-query-head retrieval
scores -> top fraction of KV heads -> SparsityPlan, plus a heatmap.

    docs = make_echo_documents(haystack_ids, lengths=[2048, 4096], docs_per_length=4, prefix_ids=[bos])
    plan, q_scores = calibrate(model, docs, fraction=0.15, plan_settings={"window": 1024, "sink_tokens": 4})
    plan.save(out / "plan.json")
    writer.add_image("calibration/retrieval_scores", save_heatmap(q_scores, out / "heads.png", plan),
                     dataformats="HWC")
"""
from rtpurbo_train.calibration.echo_documents import EchoDocument, make_echo_documents
from rtpurbo_train.calibration.heatmap import figure_to_image, retrieval_heatmap_figure, save_heatmap
from rtpurbo_train.calibration.needle_echo_attention import (
    CALIBRATION_ATTN,
    NeedleEchoProbe,
    needle_echo_attention,
    register_calibration_attention,
)
from rtpurbo_train.calibration.retrieval_scores import calibrate, measure_retrieval_scores

__all__ = [
    "CALIBRATION_ATTN",
    "EchoDocument",
    "NeedleEchoProbe",
    "calibrate",
    "figure_to_image",
    "make_echo_documents",
    "measure_retrieval_scores",
    "needle_echo_attention",
    "register_calibration_attention",
    "retrieval_heatmap_figure",
    "save_heatmap",
]
