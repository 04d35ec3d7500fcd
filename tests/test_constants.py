import torch

from dbrx_train.constants import IGNORE_INDEX, next_token_targets


def test_each_position_targets_the_next_label_and_the_last_none():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [1, 2, 3, 4]])
    assert next_token_targets(labels).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX], [2, 3, 4, IGNORE_INDEX]]
    assert labels.tolist()[0] == [5, 6, 7, IGNORE_INDEX]  # the labels themselves are left alone
