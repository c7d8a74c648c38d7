"""FGD: focal and global distillation (Yang et al., CVPR 2022; docs/methods/fgd.md)."""

from typing import Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import nn

from ...capture import feature_shapes
from ...modeling.attention import channel_attention_mask, spatial_attention_mask
from ...modeling.box_masks import box_value_mask, gt_boxes_of
from ...modeling.feature_pairs import FeaturePairing, add_feature_pairing_config, feature_pairing_from_config
from .focal_global import fgd_attention_loss, fgd_feature_loss, fgd_global_loss
from .gc_block import GlobalContextBlock
from ..base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead

__all__ = ["FGD", "fgd_masks"]

BOX_SCALES = ("stride", "image_shape")


def fgd_masks(boxes: torch.Tensor, feature_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    FGD's foreground scale mask and background mask of one image (Eq. 4-5), ``(H, W)`` each.

    ``boxes`` are ``(N, 4)`` XYXY **in feature-map cells** (already scaled). As the official
    code, box ``i`` covers cells ``[floor(x1), ceil(x2)] x [floor(y1), ceil(y2)]``
    (inclusive; the ``"outward"`` window convention) and carries ``1 / (h_i * w_i)`` with
    ``h_i = ceil(y2) + 1 - floor(y1)`` and ``w_i = ceil(x2) + 1 - floor(x1)`` (before clipping
    to the map); overlapping boxes keep the maximum, i.e. the smallest box. The background
    mask is ``1 / N_bg`` on the ``N_bg`` cells no box covers (all zero if there are none).
    """
    if len(boxes):
        heights = torch.ceil(boxes[:, 3]) + 1 - torch.floor(boxes[:, 1])
        widths = torch.ceil(boxes[:, 2]) + 1 - torch.floor(boxes[:, 0])
        fg = box_value_mask(boxes, 1.0 / (heights * widths), 1.0, feature_hw, reduce="max", convention="outward")
    else:
        fg = torch.zeros(tuple(feature_hw), dtype=torch.float32, device=boxes.device)
    bg = (fg == 0).to(torch.float32)
    n_bg = bg.sum()
    if n_bg > 0:
        bg = bg / n_bg
    return fg, bg


@DISTILL_HEAD_REGISTRY.register()
class FGD(DistillHead):
    """
    Focal and Global Distillation (Yang et al., "Focal and Global Knowledge Distillation for
    Detectors", CVPR 2022; official code ``yzd-v/FGD``), per FPN level, levels summed (the
    code builds one loss per level and adds them).

    Focal part. Teacher attention with temperature ``TEMPERATURE`` (tau, Eq. 2-3):
    ``A^S = H W softmax_hw(mean_c |T| / tau)``, ``A^C = C softmax_c(mean_hw |T| / tau)``
    (:mod:`d2kd.modeling.attention`); the masks of :func:`fgd_masks` (GT boxes scaled to the
    map; foreground ``1/(h w)`` of the box, max over overlaps; background ``1/N_bg``). Then
    (:mod:`d2kd.heads.fgd.focal_global`), every sum over ``C*H*W`` and the batch, divided by
    the batch size ``B``::

        fg  = sum M^fg A^S_t A^C_t (S - T)^2 / B          (x ALPHA)
        bg  = sum M^bg A^S_t A^C_t (S - T)^2 / B          (x BETA)
        at  = (sum |A^C_t - A^C_s| + sum |A^S_t - A^S_s|) / B   (x GAMMA)

    Global part (Eq. 9-10): ``glb = sum (GC_t(T) - GC_s(S))^2 / B`` (x LAMBDA), with a
    trainable :class:`GlobalContextBlock` on each side (student and teacher each their own,
    last layer zero-initialised, LayerNorm inside), one pair per level.

    ``S`` is the student feature after the optional 1x1 align conv (``ADAPTER.ENABLED``; the
    code adds it only when the channel counts differ); the student's attention is computed on
    it. Terms are logged as ``loss_kd_fgd_<level>_{fg,bg,at,glb}``.

    Box scaling (``BOX_SCALE``): ``"stride"`` divides the boxes by the map's stride (aligned
    with the features); ``"image_shape"`` is the official code's ``x * W_feat / W_img`` with the
    unpadded image size, which stretches boxes when the batch is padded (docs/methods/fgd.md).

    Defaults: the Faster R-CNN R101->R50 row of the official configs (alpha 5e-5, beta 2.5e-5,
    gamma 5e-5, lambda 5e-7, tau 0.5) on P2..P5. The sums are unnormalised, so these weights
    presume ~1333x800 inputs, 256 channels and 2 images per GPU (docs/methods/fgd.md, "Loss scale"). The
    code's "inheriting strategy" (``init_student=True``: the student starts from the teacher's
    neck and heads) is not part of this head: it is ``DISTILL.INHERIT`` (any head, or none;
    ``configs/bccd/distill_fgd_inherit_R50_R18.yaml`` is FGD with it).

    Explicit construction: ``FGD(pairing=FeaturePairing(student, teacher, ["p2", "p3"],
    adapter_enabled=False), alpha=5e-5, beta=2.5e-5, gamma=5e-5, lam=5e-7, temperature=0.5)``;
    the global-context blocks are sized from the pairing's teacher channels.
    """

    # An empty IN_FEATURES means the RoI heads' levels (p2..p5 on an FPN Faster R-CNN).
    LEVEL_SOURCE = "roi"

    @classmethod
    def add_config(cls, cfg):
        node = cfg.DISTILL.FGD = CN()
        node.ALPHA = 5e-5
        node.BETA = 2.5e-5
        node.GAMMA = 5e-5
        node.LAMBDA = 5e-7
        node.TEMPERATURE = 0.5
        # "stride" (boxes / stride) or "image_shape" (the official x * W_feat / W_img).
        node.BOX_SCALE = "stride"
        add_feature_pairing_config(node, kernel_size=1)
        # The official align conv exists only when channel counts differ: off by default.
        node.ADAPTER.ENABLED = False

    @configurable
    def __init__(
        self,
        *,
        pairing: FeaturePairing,
        alpha: float = 5e-5,
        beta: float = 2.5e-5,
        gamma: float = 5e-5,
        lam: float = 5e-7,
        temperature: float = 0.5,
        box_scale: str = "stride",
    ):
        super().__init__()
        _check_options(temperature, box_scale)
        self.alpha, self.beta, self.gamma, self.lam = alpha, beta, gamma, lam
        self.temperature = temperature
        self.box_scale = box_scale
        self.pairing = pairing
        self.gc_student = nn.ModuleDict()
        self.gc_teacher = nn.ModuleDict()
        for name in self.pairing.names:
            self.gc_student[name] = GlobalContextBlock(self.pairing.teacher_channels[name])
            self.gc_teacher[name] = GlobalContextBlock(self.pairing.teacher_channels[name])
        self.capture_pairing(self.pairing)

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        teacher_names = list(opts.TEACHER_FEATURES) or list(opts.IN_FEATURES)
        s_shapes = feature_shapes(context.student, opts.IN_FEATURES, "student")
        t_shapes = feature_shapes(context.teacher, teacher_names, "teacher")
        if not opts.ADAPTER.ENABLED:
            for s_name, t_name in zip(opts.IN_FEATURES, teacher_names):
                if s_shapes[s_name].channels != t_shapes[t_name].channels:
                    raise DistillConfigError(
                        f"FGD: student '{s_name}' has {s_shapes[s_name].channels} channels and teacher "
                        f"'{t_name}' {t_shapes[t_name].channels}; set DISTILL.FGD.ADAPTER.ENABLED True "
                        "(a 1x1 align conv, as the official code adds when widths differ)."
                    )
        return {
            "pairing": feature_pairing_from_config(opts, context, cfg),
            "alpha": opts.ALPHA,
            "beta": opts.BETA,
            "gamma": opts.GAMMA,
            "lam": opts.LAMBDA,
            "temperature": opts.TEMPERATURE,
            "box_scale": opts.BOX_SCALE,
        }

    def _masks(self, name, feature_hw, step):
        """``(B, H, W)`` foreground scale masks and background masks on the loss grid."""
        h, w = feature_hw
        fgs, bgs = [], []
        for i, inst in enumerate(step.gt_instances):
            boxes = gt_boxes_of(inst).clone().float()
            if self.box_scale == "stride":
                boxes = boxes / self.pairing.target_strides[name]
            else:
                img_h, img_w = step.student_images.image_sizes[i]
                boxes[:, 0::2] *= w / img_w
                boxes[:, 1::2] *= h / img_h
            fg, bg = fgd_masks(boxes, (h, w))
            fgs.append(fg)
            bgs.append(bg)
        return torch.stack(fgs), torch.stack(bgs)

    def forward(self, student, teacher, step):
        terms = {}
        for name, s, t, _ in self.pairing.pairs(student, teacher):
            fg_mask, bg_mask = (m.to(t.device) for m in self._masks(name, t.shape[-2:], step))
            spatial_t = spatial_attention_mask(t, self.temperature)
            channel_t = channel_attention_mask(t, self.temperature)
            spatial_s = spatial_attention_mask(s, self.temperature)
            channel_s = channel_attention_mask(s, self.temperature)
            fg, bg = fgd_feature_loss(s, t, fg_mask, bg_mask, spatial_t, channel_t)
            at = fgd_attention_loss(spatial_s, spatial_t, channel_s, channel_t)
            glb = fgd_global_loss(self.gc_student[name](s), self.gc_teacher[name](t))
            terms[f"{name}_fg"] = self.alpha * fg
            terms[f"{name}_bg"] = self.beta * bg
            terms[f"{name}_at"] = self.gamma * at
            terms[f"{name}_glb"] = self.lam * glb
        return terms


def _check_options(temperature, box_scale):
    if temperature <= 0:
        raise DistillConfigError(f"DISTILL.FGD.TEMPERATURE must be > 0, got {temperature}.")
    if box_scale not in BOX_SCALES:
        raise DistillConfigError(f"DISTILL.FGD.BOX_SCALE {box_scale!r} is unknown; choose one of {BOX_SCALES}.")
