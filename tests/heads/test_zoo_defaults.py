"""
Every head on a model-zoo RetinaNet and Mask R-CNN student config with nothing but DISTILL.HEADS
and the teacher set: the heads' levels default to what the detector reads (p3..p7 / p2..p6).
Random weights, one training step with all applicable heads together.
"""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import PolygonMasks

from conftest import build_distiller, step, synthetic_batch
from d2kd.config import get_distill_cfg, load_config, merge_config, resolve_config_file

SMALL = ["INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 96,
         "INPUT.MAX_SIZE_TEST", 128, "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
ZOO = {
    "retinanet": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml",
                  ["fitnet", "cwd", "fbkd", "fgfi", "fgd", "gkd", "hgd", "densekd", "pkd", "mgd"], ["p3", "p4", "p5", "p6", "p7"]),
    "mask_rcnn": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
                  ["kd", "chen2017", "fitnet", "cwd", "fbkd", "fgfi", "defeat", "fgd", "gkd", "hgd", "pkd", "mgd"],
                  ["p2", "p3", "p4", "p5", "p6"]),
}


def _with_masks(batch):
    for sample in batch:
        boxes = sample["instances"].gt_boxes.tensor.tolist()
        sample["instances"].gt_masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes])
    return batch


@pytest.mark.train
@pytest.mark.parametrize("detector", sorted(ZOO))
def test_every_head_on_a_zoo_student_with_nothing_but_heads(detector, tmp_path):
    zoo_config, heads, levels = ZOO[detector]
    torch.manual_seed(0)
    teacher_weights = str(tmp_path / "teacher.pth")
    checkpointer = DetectionCheckpointer(build_model(load_config(zoo_config, SMALL)), save_dir=str(tmp_path))
    checkpointer.save("teacher")

    cfg = get_distill_cfg()
    merge_config(cfg, resolve_config_file(zoo_config), SMALL + [
        "DISTILL.HEADS", heads,
        "DISTILL.TEACHER.CONFIG_FILE", zoo_config,
        "DISTILL.TEACHER.WEIGHTS", teacher_weights,
        "DISTILL.TEACHER.OPTS", ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128, "MODEL.WEIGHTS", ""],
    ])
    model = build_distiller(cfg)
    gkd = model.heads["gkd"]  # prototypes as the PrototypeHook would leave them (random here)
    for level, name in enumerate(gkd.names):
        s_shape, t_shape = getattr(gkd, f"prototypes_student_{name}").shape, getattr(gkd, f"prototypes_teacher_{name}").shape
        for cls in range(gkd.num_classes):
            gkd.set_prototypes(level, cls, torch.randn(*s_shape[1:]), torch.randn(*t_shape[1:]))
    gkd.prototype_iter.fill_(0)
    for name in ("fitnet", "cwd", "fgfi", "gkd"):
        assert model.heads[name].pairing.names == levels, name
    batch = synthetic_batch(empty=())
    losses = step(model, _with_masks(batch) if detector == "mask_rcnn" else batch)
    for name in heads:
        assert any(key.startswith(f"loss_kd_{name}") for key in losses), name
    total = sum(losses.values())
    assert torch.isfinite(total), {k: float(v) for k, v in losses.items()}
    total.backward()
