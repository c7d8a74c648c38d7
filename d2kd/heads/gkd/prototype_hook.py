"""
The Prototype Generation Module of Tang et al., "Distilling Object Detectors with Global
Knowledge" (ECCV 2022, Sec. 3.2, Alg. 1; docs/methods/gkd.md) as a Detectron2 hook.

Before training, and then every ``PGM.PERIOD`` iterations (0 = one epoch of the training
set, the paper's period "T = 1 epoch"), the hook:

1. takes the GT boxes of the training set that are larger than ``PGM.MIN_BOX_SIZE`` in the
   image the models see at test time, and per class a fixed random subset (seed
   ``PGM.SEED``) of at most ``PGM.MAX_IMAGES_PER_CLASS`` images containing such boxes;
2. runs student and teacher in eval mode with the test-time input pipeline (batch 1) and
   box-average-pools every FPN level inside each box (the integer cell windows). Teacher
   features are computed once and cached (the teacher is frozen); student features are
   recomputed at every update;
3. selects ``PGM.NUM_PROTOTYPES`` prototypes per class and level (density filter + matching
   pursuit, :mod:`d2kd.heads.gkd.prototypes`) and stores their raw features in the head's
   buffers, which are checkpointed with the head (``"distiller"``).

Under DDP the images are split over the ranks, the features gathered on rank 0, which
selects the prototypes and broadcasts them, so every rank holds identical prototypes.
A resumed run restores the prototypes from its checkpoint and does not recompute them
before its first step; the teacher's feature cache is rebuilt at the next scheduled update.
"""

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.engine import HookBase
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ...capture import Recorder
from .prototypes import box_average_pool, select_prototypes
from ...modeling.teacher import TeacherRunner

__all__ = ["PrototypeHook", "PGMPlan", "plan_pgm_instances", "broadcast_tensors", "gather_to_main"]

logger = logging.getLogger(__name__)


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0):
    """In place: every rank ends with rank ``src``'s values (no-op in a single process)."""
    if comm.get_world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t, src)


def gather_to_main(local: dict) -> Optional[dict]:
    """Merge the per-rank dicts on rank 0 (``None`` elsewhere); objects travel by pickle."""
    parts = comm.gather(local, dst=0)
    if not comm.is_main_process():
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


@dataclass
class PGMPlan:
    """Which images PGM reads and which of their boxes are instances of which class."""

    images: List[dict]  # dataset dicts + "pgm_index" and "pgm_boxes" (n, 4) XYXY original pixels
    class_instances: List[List[Tuple[int, np.ndarray]]]  # per class: (pgm_index, box rows)
    class_num_images: List[int]  # images per class before the per-class cap

    def num_instances(self, c: int) -> int:
        return int(sum(len(rows) for _, rows in self.class_instances[c]))


def plan_pgm_instances(
    dataset_dicts: Sequence[dict],
    num_classes: int,
    min_size_test: int,
    max_size_test: int,
    min_box_size: float = 30.0,
    max_images_per_class: int = 800,
    seed: int = 1,
) -> PGMPlan:
    """
    Alg. 1 step 1: boxes wider AND taller than ``min_box_size`` (strictly, as the code) in
    the test-time resized image; per class, at most ``max_images_per_class`` images (a
    subset drawn with ``numpy.random.default_rng([seed, class])``, so it is the same at
    every update and independent of the other classes). Crowd boxes are skipped.
    """
    valid: List[Dict[int, List[int]]] = []  # per image: class -> rows
    boxes_per_image = []
    for d in dataset_dicts:
        h, w = d["height"], d["width"]
        if min_size_test > 0:
            new_h, new_w = T.ResizeShortestEdge.get_output_shape(h, w, min_size_test, max_size_test)
        else:
            new_h, new_w = h, w
        sx, sy = new_w / w, new_h / h
        boxes, by_class = [], {}
        for ann in d.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            if (box[2] - box[0]) * sx > min_box_size and (box[3] - box[1]) * sy > min_box_size:
                by_class.setdefault(int(ann["category_id"]), []).append(len(boxes))
                boxes.append(box)
        valid.append(by_class)
        boxes_per_image.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))

    chosen: List[List[int]] = []
    class_num_images = []
    for c in range(num_classes):
        images = [i for i, by_class in enumerate(valid) if c in by_class]
        class_num_images.append(len(images))
        if len(images) > max_images_per_class:
            rng = np.random.default_rng([int(seed), c])
            images = sorted(rng.choice(images, size=max_images_per_class, replace=False).tolist())
        chosen.append(images)

    chosen_sets = [set(images) for images in chosen]
    used = sorted({i for images in chosen for i in images})
    pgm_index = {i: k for k, i in enumerate(used)}
    plan_images = []
    for k, i in enumerate(used):
        d = dataset_dicts[i]
        rows = sorted({r for c, rs in valid[i].items() if i in chosen_sets[c] for r in rs})
        remap = {r: j for j, r in enumerate(rows)}
        plan_images.append(
            {
                "file_name": d["file_name"],
                "height": d["height"],
                "width": d["width"],
                "image_id": d.get("image_id", i),
                "pgm_index": k,
                "pgm_boxes": boxes_per_image[i][rows],
                "pgm_rows": remap,
            }
        )
    class_instances = []
    for c in range(num_classes):
        refs = []
        for i in chosen[c]:
            k = pgm_index[i]
            remap = plan_images[k]["pgm_rows"]
            refs.append((k, np.asarray([remap[r] for r in valid[i][c]], dtype=np.int64)))
        class_instances.append(refs)
    for d in plan_images:
        del d["pgm_rows"]
    return PGMPlan(plan_images, class_instances, class_num_images)


class PrototypeHook(HookBase):
    """
    Runs PGM for a :class:`~d2kd.heads.gkd.GKD` head (see the module docstring).

    Args:
        head: the GKD head; prototypes are written into its buffers.
        trainer: the DistillTrainer (its cfg, student and teacher are read here).
    """

    def __init__(self, head, trainer):
        self.head = head
        cfg = trainer.cfg
        self.cfg = cfg
        self.student = trainer.student
        self.teacher = trainer.teacher
        self.opts = head.pgm_options
        self.teacher_input = TeacherRunner(
            self.teacher, set(), Recorder(self.teacher, role="teacher"), self.student.input_format,
            cfg.DISTILL.TEACHER.INPUT_SCALE,
        )
        self.input_scale = float(cfg.DISTILL.TEACHER.INPUT_SCALE)
        dataset_dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        epoch = max(1, math.ceil(len(dataset_dicts) / cfg.SOLVER.IMS_PER_BATCH))
        self.period = int(self.opts.PERIOD) or epoch
        self.plan = plan_pgm_instances(
            dataset_dicts,
            head.num_classes,
            cfg.INPUT.MIN_SIZE_TEST,
            cfg.INPUT.MAX_SIZE_TEST,
            self.opts.MIN_BOX_SIZE,
            self.opts.MAX_IMAGES_PER_CLASS,
            self.opts.SEED,
        )
        self._teacher_cached = False
        self._teacher_cache: Optional[Dict[int, List[torch.Tensor]]] = None  # rank 0 only
        self.num_updates = 0
        logger.info(
            f"GKD prototypes: {len(self.plan.images)} training images hold the PGM instances "
            f"({self._class_summary()}); updated before training and every {self.period} iterations"
            + (" (one epoch)." if not self.opts.PERIOD else ".")
        )
        if not any(self.plan.class_instances):
            logger.warning(
                "GKD PGM found no training box larger than PGM.MIN_BOX_SIZE = "
                f"{self.opts.MIN_BOX_SIZE} px in the test-time input: no class gets prototypes, so "
                "every robust weight is 1 and the global loss is 0. Lower DISTILL.GKD.PGM.MIN_BOX_SIZE."
            )

    def _class_summary(self) -> str:
        names = self.head.class_names
        return ", ".join(
            f"{names[c]}: {self.plan.num_instances(c)} boxes in {len(self.plan.class_instances[c])}"
            f"/{self.plan.class_num_images[c]} images"
            for c in range(self.head.num_classes)
        )

    # -- schedule -------------------------------------------------------------------------
    def before_train(self):
        it = self.trainer.iter
        if self.head.prototypes_ready():
            logger.info(
                f"GKD prototypes restored from the checkpoint (computed before iteration "
                f"{int(self.head.prototype_iter)}); not recomputed before iteration {it}."
            )
            return
        self.update(it, "before training")

    def before_step(self):
        it = self.trainer.iter
        if it % self.period == 0 and int(self.head.prototype_iter) != it:
            self.update(it, f"scheduled every {self.period} iterations")

    # -- one update -----------------------------------------------------------------------
    def update(self, iteration: int, reason: str):
        start = time.perf_counter()
        need_teacher = not self._teacher_cached
        if need_teacher and self.num_updates > 0:
            logger.info("GKD PGM: the teacher's instance features are not cached in this process; computing them once.")
        local = self._extract(iteration, need_teacher)
        merged = gather_to_main(local)
        summary = ""
        if comm.is_main_process():
            if need_teacher:
                self._teacher_cache = {k: v[1] for k, v in merged.items()}
            student = {k: v[0] for k, v in merged.items()}
            summary = self._select(student, self._teacher_cache)
        self._teacher_cached = True
        broadcast_tensors(self.head.prototype_buffers(), src=0)
        self.head.prototype_iter.fill_(iteration)
        self.num_updates += 1
        comm.synchronize()
        logger.info(
            f"GKD prototypes updated before iteration {iteration} ({reason}) in "
            f"{time.perf_counter() - start:.1f} s: {summary}"
        )

    @torch.no_grad()
    def _extract(self, iteration: int, need_teacher: bool) -> Dict[int, tuple]:
        """This rank's share: pgm_index -> (student per-level (n, Ds), teacher per-level or None)."""
        head = self.head
        loader = build_detection_test_loader(
            dataset=self.plan.images,
            mapper=DatasetMapper(self.cfg, is_train=False),
            num_workers=self.cfg.DATALOADER.NUM_WORKERS,
        )
        total = len(self.plan.images)
        local_total = len(loader)
        every = max(1, local_total // 10)
        what = "student + teacher" if need_teacher else "student"
        was_training = self.student.training
        self.student.eval()
        self.teacher.eval()
        out = {}
        start = time.perf_counter()
        try:
            for i, batch in enumerate(loader):
                d = batch[0]
                sy = d["image"].shape[1] / d["height"]
                sx = d["image"].shape[2] / d["width"]
                boxes = torch.as_tensor(d["pgm_boxes"]) * torch.tensor([sx, sy, sx, sy])
                images = self.student.preprocess_image(batch)
                features = self.student.backbone(images.tensor)
                boxes = boxes.to(images.tensor.device)
                student_feats = [
                    box_average_pool(features[n][0], boxes, head.student_strides[n]).float().cpu() for n in head.names
                ]
                teacher_feats = None
                if need_teacher:
                    t_images = self.teacher_input.preprocess(batch)
                    t_features = self.teacher.backbone(t_images.tensor)
                    t_boxes = boxes.to(t_images.tensor.device) * self.input_scale
                    teacher_feats = [
                        box_average_pool(t_features[head.teacher_names[n]][0], t_boxes, head.teacher_strides[n])
                        .float()
                        .cpu()
                        for n in head.names
                    ]
                out[int(d["pgm_index"])] = (student_feats, teacher_feats)
                done = i + 1
                if done % every == 0 or done == local_total:
                    elapsed = time.perf_counter() - start
                    eta = elapsed / done * (local_total - done)
                    logger.info(
                        f"GKD PGM before iteration {iteration}: {what} features of {done}/{local_total} images "
                        f"on this rank ({total} in all), {elapsed:.1f} s, ETA {eta:.1f} s"
                    )
        finally:
            self.student.train(was_training)
        return out

    def _select(self, student: Dict[int, list], teacher: Dict[int, list]) -> str:
        """Rank 0: prototypes of every class and level into the head's buffers."""
        head, opts = self.head, self.opts
        device = head.prototype_iter.device
        parts = []
        for c, refs in enumerate(self.plan.class_instances):
            if not refs:
                head.clear_prototypes(c)
                parts.append(f"{head.class_names[c]}: no instance, no prototypes")
                continue
            candidates = []
            for level, name in enumerate(head.names):
                xs = torch.cat([student[k][level][torch.as_tensor(rows)] for k, rows in refs]).to(device)
                xt = torch.cat([teacher[k][level][torch.as_tensor(rows)] for k, rows in refs]).to(device)
                idx, cand = select_prototypes(
                    xt, xs, opts.NUM_PROTOTYPES, opts.ALPHA, opts.DENSITY_KERNEL, opts.DENSITY_PERCENTILE
                )
                head.set_prototypes(level, c, xs[idx], xt[idx])
                candidates.append(len(cand))
            parts.append(
                f"{head.class_names[c]}: {self.plan.num_instances(c)} instances, candidates per level {candidates}"
            )
        return "; ".join(parts)
