"""Target / non-target mask aggregation (pipeline.method.masks)."""

import torch

from pipeline.method.masks import class_masks, target_and_nontarget_masks


def _logits():
    # B=2, C=3, H=1, W=2; values chosen so each max is a different class
    return torch.tensor(
        [
            [[[1.0, -2.0]], [[3.0, -1.0]], [[0.0, 5.0]]],
            [[[-1.0, 2.0]], [[0.5, 0.5]], [[4.0, -4.0]]],
        ]
    )


def test_class_masks_are_the_sigmoid_of_the_logits():
    S = _logits()
    assert torch.equal(class_masks(S), torch.sigmoid(S))


def test_target_mask_is_max_over_present_classes():
    S = _logits()
    y = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    m, n = target_and_nontarget_masks(S, y)
    assert m.shape == (2, 1, 2) and n.shape == (2, 1, 2)
    # image 0: classes 0,1 → max(1,3)=3 and max(-2,-1)=-1 ; non-target class 2 → (0, 5)
    torch.testing.assert_close(m[0], torch.sigmoid(torch.tensor([[3.0, -1.0]])))
    torch.testing.assert_close(n[0], torch.sigmoid(torch.tensor([[0.0, 5.0]])))
    # image 1: classes 0,2 → max(-1,4)=4, max(2,-4)=2 ; non-target class 1 → (0.5, 0.5)
    torch.testing.assert_close(m[1], torch.sigmoid(torch.tensor([[4.0, 2.0]])))
    torch.testing.assert_close(n[1], torch.sigmoid(torch.tensor([[0.5, 0.5]])))


def test_bool_labels_give_the_same_masks_as_float_labels():
    S = _logits()
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    for a, b in zip(target_and_nontarget_masks(S, y), target_and_nontarget_masks(S, y.bool())):
        assert torch.equal(a, b)


def test_image_without_label_has_target_mask_exactly_zero_and_finite_gradients():
    S = _logits().requires_grad_(True)
    y = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m, n = target_and_nontarget_masks(S, y)
    assert torch.equal(m[0], torch.zeros(1, 2))
    torch.testing.assert_close(n[0], torch.sigmoid(torch.tensor([[3.0, 5.0]])))
    (m.sum() + n.sum()).backward()
    assert torch.isfinite(S.grad).all()


def test_image_with_every_label_has_nontarget_mask_exactly_zero_and_finite_gradients():
    S = _logits().requires_grad_(True)
    y = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    m, n = target_and_nontarget_masks(S, y)
    assert torch.equal(n[0], torch.zeros(1, 2))
    assert torch.isfinite(m).all() and torch.isfinite(n).all()
    (m.sum() + n.sum()).backward()
    assert torch.isfinite(S.grad).all()
    # no gradient reaches a class through a mask it is not part of: image 0 has no non-target class,
    # so n[0] sends nothing; m[0] sends the sigmoid derivative to the argmax classes only
    s = torch.sigmoid(torch.tensor([3.0, 5.0]))
    expected = torch.zeros(3, 1, 2)
    expected[1, 0, 0] = s[0] * (1 - s[0])
    expected[2, 0, 1] = s[1] * (1 - s[1])
    torch.testing.assert_close(S.grad[0], expected)
