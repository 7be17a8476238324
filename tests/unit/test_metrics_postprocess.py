"""mIoU on hand-computed cases, and each post-processing rule of docs/method.md §5 on hand-made logits."""
import math

import pytest
import torch

import spar
from spar.segment import PostProcess, postprocess


# ---------------------------------------------------------------------------------- metrics

def test_confusion_and_miou_by_hand():
    # 5 classes; two ground-truth pixels are ignored (255) and what is predicted there (3 and 0)
    # must not count; class 3 is then absent everywhere (no IoU), class 4 is predicted but absent (IoU 0).
    target = torch.tensor([[0, 0, 1, 1], [255, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [3, 2, 4, 0]])
    cm = spar.confusion_matrix(pred, target, num_classes=5)
    assert cm.tolist() == [[1, 1, 0, 0, 0],
                           [0, 2, 0, 0, 0],
                           [0, 0, 1, 0, 1],
                           [0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0]]
    iou = spar.iou_per_class(cm)
    assert iou[:3].tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2]) and math.isnan(iou[3]) and iou[4] == 0
    assert spar.mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3 + 1 / 2 + 0) / 4)
    scores = spar.segmentation_scores(cm, ["a", "b", "c", "d", "e"])
    assert scores["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 4, abs=1e-3)
    assert scores["aacc"] == pytest.approx(100 * 4 / 6, abs=1e-3) and scores["pixels"] == 6
    assert scores["iou"]["d"] is None and scores["iou"]["e"] == 0


def test_confusion_matrices_add_up_over_images():
    a_t, a_p = torch.tensor([0, 1, 1, 255]), torch.tensor([0, 1, 0, 1])
    b_t, b_p = torch.tensor([1, 1, 2, 2]), torch.tensor([1, 2, 2, 2])
    total = spar.confusion_matrix(a_p, a_t, 3) + spar.confusion_matrix(b_p, b_t, 3)
    joint = spar.confusion_matrix(torch.cat([a_p, b_p]), torch.cat([a_t, b_t]), 3)
    assert torch.equal(total, joint)
    # dataset mIoU is from the summed matrix (0.5556), not the mean of per-image mIoUs (0.5417)
    assert spar.mean_iou(total) == pytest.approx((1 / 2 + 1 / 2 + 2 / 3) / 3)
    per_image = (spar.mean_iou(spar.confusion_matrix(a_p, a_t, 3)) + spar.mean_iou(spar.confusion_matrix(b_p, b_t, 3))) / 2
    assert per_image == pytest.approx((1 / 2 + (1 / 2 + 2 / 3) / 2) / 2)


@pytest.mark.parametrize("pred,target,msg", [
    (torch.tensor([0, 1]), torch.tensor([0, 7]), "ground truth"),  # a label mapping gone wrong
    (torch.tensor([0, 5]), torch.tensor([0, 1]), "prediction"),
    (torch.tensor([0, 1, 2]), torch.tensor([0, 1]), "shape"),
])
def test_confusion_refuses_out_of_range_labels(pred, target, msg):
    with pytest.raises(ValueError, match=msg):
        spar.confusion_matrix(pred, target, num_classes=3)


# ------------------------------------------------------------------------------ postprocess

def pixels(*columns):
    """Logits (S, 1, W) from one list of S synonym logits per pixel."""
    return torch.tensor(columns, dtype=torch.float32).T.unsqueeze(1)


def test_class_takes_its_best_synonym_not_the_sum():
    owner = torch.tensor([0, 0, 1])  # class 0 has two synonyms, class 1 one
    # pixel 0: synonym 0 beats class 1; pixel 1: the two class-0 synonyms together outweigh class 1
    # (2 e^8 > e^8.4) but each alone does not, so class 1 wins.
    logits = pixels([0.30, 0.10, 0.25], [0.20, 0.20, 0.21])
    pred = postprocess(logits, owner, PostProcess(logit_scale=40), num_classes=2)
    assert pred.tolist() == [[0, 1]]


def test_logit_scale_sharpens_probabilities_against_prob_thd():
    owner = torch.arange(3)
    logits = pixels([0.20, 0.30, 0.25])
    # at scale 1 the softmax is nearly flat (~0.34 max) -> below prob_thd 0.5 -> class 0
    assert postprocess(logits, owner, PostProcess(logit_scale=1, prob_thd=0.5)).tolist() == [[0]]
    # at scale 100 class 1 is confident
    assert postprocess(logits, owner, PostProcess(logit_scale=100, prob_thd=0.5)).tolist() == [[1]]


def test_logit_bias_is_added_before_the_softmax():
    # A scalar bias shifts every logit equally: the softmax, hence the prediction and prob_thd,
    # must not change (it would if the bias were added to the probabilities).
    owner = torch.arange(3)
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) * 0.1
    base = postprocess(logits, owner, PostProcess(logit_scale=40, prob_thd=0.5))
    assert torch.equal(postprocess(logits, owner, PostProcess(logit_scale=40, logit_bias=-10, prob_thd=0.5)), base)


def test_prob_thd_sends_unsure_pixels_to_class_zero():
    owner = torch.arange(3)
    # probabilities at scale 1 on log-probabilities: exactly the given distributions
    probs = [[0.1, 0.6, 0.3], [0.2, 0.35, 0.45], [0.05, 0.9, 0.05]]
    logits = pixels(*[[math.log(p) for p in col] for col in probs])
    pred = postprocess(logits, owner, PostProcess(logit_scale=1, prob_thd=0.5))
    assert pred.tolist() == [[1, 0, 1]]  # 0.45 < 0.5 -> background; 0.6 and 0.9 stay
    assert postprocess(logits, owner, PostProcess(logit_scale=1)).tolist() == [[1, 2, 1]]


def test_area_thd_drops_small_classes_but_not_background():
    owner = torch.arange(3)
    # 30 pixels: 20 background, 9 class 1, 1 class 2 (its runner-up is background).
    cols = [[0.9, 0.05, 0.05]] * 20 + [[0.1, 0.8, 0.1]] * 9 + [[0.3, 0.1, 0.6]]
    logits = pixels(*[[math.log(p) for p in c] for c in cols])
    keep = postprocess(logits, owner, PostProcess(logit_scale=1))
    assert keep[0, -1] == 2
    # area_thd 0.1 of the class>=1 area (10 px) = 1 px: class 2's single pixel is "at most" -> dropped
    # (the 20 background pixels do not count towards the total, else the threshold would be 3 px)
    pred = postprocess(logits, owner, PostProcess(logit_scale=1, area_thd=0.1))
    assert pred[0, -1] == 0 and (pred[0, 20:29] == 1).all() and (pred[0, :20] == 0).all()
    # a slightly lower threshold keeps it
    assert postprocess(logits, owner, PostProcess(logit_scale=1, area_thd=0.09))[0, -1] == 2


def test_postprocess_checks_the_synonym_count():
    with pytest.raises(ValueError, match="logits"):
        postprocess(torch.zeros(4, 2, 2), torch.tensor([0, 0, 1]), num_classes=2)
