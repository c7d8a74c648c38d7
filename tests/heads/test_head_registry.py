"""The head registry: an unknown head name is an error that lists the registered heads."""

import pytest

from d2kd import DistillTrainer
from d2kd.heads import DistillConfigError

from conftest import distill_cfg


def test_unknown_head_lists_registered_heads(tmp_path, teacher_r18_weights):
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=["DISTILL.HEADS", ["fitnett"]])
    with pytest.raises(DistillConfigError, match="fitnett.*Registered heads.*fitnet"):
        DistillTrainer(cfg)
