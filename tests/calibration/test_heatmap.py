"""Heatmap PNG / image array of retrieval scores."""
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from rtpurbo_train.calibration import save_heatmap
from rtpurbo_train.plan import HeadLayout, SparsityPlan

LAYOUT = HeadLayout(num_layers=6, num_q_heads=8, num_kv_heads=4, head_dim=64)


def _scores():
    return torch.rand(6, 8, generator=torch.Generator().manual_seed(0))


def _red_pixels(img):
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return int(((r > 200) & (g < 60) & (b < 60)).sum())


def test_png_and_array(tmp_path):
    path = tmp_path / "sub" / "heads.png"
    img = save_heatmap(_scores(), path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    on_disk = imread(path)
    assert on_disk.shape[:2] == img.shape[:2]
    assert _red_pixels(img) == 0        # viridis has no pure red: nothing is outlined without a plan


def test_selected_heads_are_outlined(tmp_path):
    scores = _scores()
    plan = SparsityPlan.from_scores(LAYOUT, scores.tolist(), 0.25)
    img = save_heatmap(scores, tmp_path / "heads.png", plan)
    assert _red_pixels(img) > 50


def test_tensorboard_accepts_image(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    img = save_heatmap(_scores(), tmp_path / "heads.png")
    with SummaryWriter(tmp_path / "tb") as writer:
        writer.add_image("calibration/retrieval_scores", img, 0, dataformats="HWC")
    assert any((tmp_path / "tb").iterdir())


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="layers, query heads"):
        save_heatmap(torch.rand(6), tmp_path / "x.png")
    plan = SparsityPlan.from_scores(LAYOUT, _scores().tolist(), 0.25)
    with pytest.raises(ValueError, match="plan is for"):
        save_heatmap(torch.rand(5, 8), tmp_path / "x.png", plan)
