import numpy as np
import pytest

from model.clicks import first_click, interior_distance, next_click, sample_error_click, sample_point


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_first_click_is_the_deepest_interior_point():
    gt = rect(40, 60, 10, 31, 5, 56)  # 21 rows tall: the centre row is 20
    x, y = first_click(gt)
    assert gt[y, x] and y == 20
    assert interior_distance(gt)[y, x] == interior_distance(gt).max() == 11


def test_image_border_counts_as_boundary():
    gt = rect(20, 20, 0, 20, 0, 20)
    assert first_click(gt) in [(9, 9), (10, 10), (9, 10), (10, 9)]


def test_first_click_on_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        first_click(np.zeros((5, 5), bool))


def test_next_click_picks_the_larger_error_region_and_labels_it():
    gt = rect(50, 50, 5, 45, 5, 45)
    pred = rect(50, 50, 5, 45, 5, 20)  # misses a big part -> positive click there
    x, y, label = next_click(pred, gt)
    assert label == 1 and gt[y, x] and not pred[y, x] and x > 20
    pred2 = gt | rect(50, 50, 0, 50, 46, 50)  # spurious band only
    x, y, label = next_click(pred2, gt)
    assert label == 0 and pred2[y, x] and not gt[y, x]
    assert next_click(gt, gt) is None


def test_next_click_checks_shapes():
    with pytest.raises(ValueError, match="shape"):
        next_click(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_training_samples_lie_in_the_right_regions():
    rng = np.random.default_rng(0)
    gt = rect(30, 30, 5, 25, 5, 25)
    pred = rect(30, 30, 0, 15, 0, 30)
    for _ in range(50):
        x, y = sample_point(gt, rng)
        assert gt[y, x]
        x, y, lab = sample_error_click(pred, gt, rng)
        assert pred[y, x] != gt[y, x] and lab == int(gt[y, x])
