"""
Structured knowledge distillation / FBKD (Zhang & Ma, ICLR 2021, "Improve Object Detection
with Feature-based Knowledge Distillation: Towards Accurate and Efficient Detectors"; TPAMI
2023, "Structured Knowledge Distillation for Accurate and Efficient Object Detection");
docs/methods/fbkd.md.
"""

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import nn

from ...modeling.adapters import FeatureAdapter
from ...modeling.attention import channel_attention, channel_softmax_mask, spatial_attention, spatial_softmax_mask
from ...modeling.feature_pairs import FeaturePairing, add_feature_pairing_config, feature_pairing_from_config
from .non_local import NON_LOCAL_NORMS, NonLocalBlock
from ..base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead

__all__ = ["FBKD", "fbkd_spatial_mask", "fbkd_channel_mask", "default_non_local_setting"]

FORMS = ("code", "paper")
PAPER_DISTANCES = ("norm", "mse")


def fbkd_spatial_mask(student: torch.Tensor, teacher: torch.Tensor, temperature: float, form: str) -> torch.Tensor:
    """
    The detached spatial attention mask ``M^s`` (B, H, W) of FBKD:
    - ``"code"`` (official code, docs/methods/fbkd.md): ``½ [HW softmax(G^s(T)/τ) + HW softmax(G^s(S)/τ)]``;
    - ``"paper"`` (ICLR 2021 Sec. 3.1, reconstructed): ``HW softmax((G^s(S) + G^s(T))/τ)``.
    """
    with torch.no_grad():
        return _combined_mask(
            spatial_attention(student), spatial_attention(teacher), temperature, form, spatial_softmax_mask
        )


def fbkd_channel_mask(student: torch.Tensor, teacher: torch.Tensor, temperature: float, form: str) -> torch.Tensor:
    """The detached channel attention mask ``M^c`` (B, C); forms as :func:`fbkd_spatial_mask`."""
    with torch.no_grad():
        return _combined_mask(
            channel_attention(student), channel_attention(teacher), temperature, form, channel_softmax_mask
        )


def _combined_mask(g_student, g_teacher, temperature: float, form: str, softmax_mask) -> torch.Tensor:
    """
    The detached mask of :func:`fbkd_spatial_mask` / :func:`fbkd_channel_mask` from attention
    maps ``G`` (``softmax_mask``: :func:`spatial_softmax_mask` or :func:`channel_softmax_mask`).
    """
    g_student, g_teacher = g_student.detach(), g_teacher.detach()
    if form == "code":
        return 0.5 * (softmax_mask(g_teacher, temperature) + softmax_mask(g_student, temperature))
    return softmax_mask(g_student + g_teacher, temperature)


class _LevelAttention:
    """
    ``G^s`` and ``G^c`` of the student and teacher maps of one level, from one ``|A|`` pass
    per map (the masks and the paper-form L_AT share them). The student's maps carry
    gradients only when ``with_grad`` (paper-form L_AT); the masks always detach them.
    """

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor, with_grad: bool):
        s_abs = (student if with_grad else student.detach()).abs()
        t_abs = teacher.detach().abs()
        self.student_spatial, self.student_channel = s_abs.mean(dim=1), s_abs.mean(dim=(2, 3))
        self.teacher_spatial, self.teacher_channel = t_abs.mean(dim=1), t_abs.mean(dim=(2, 3))

    def spatial_mask(self, temperature: float, form: str) -> torch.Tensor:
        return _combined_mask(self.student_spatial, self.teacher_spatial, temperature, form, spatial_softmax_mask)

    def channel_mask(self, temperature: float, form: str) -> torch.Tensor:
        return _combined_mask(self.student_channel, self.teacher_channel, temperature, form, channel_softmax_mask)


def default_non_local_setting(stride: int) -> Tuple[int, int]:
    """
    ``(C_i, pool stride)`` of the official code's non-local block at a 256-channel FPN level of
    the given stride: P2 (4) -> (64, 8); P3 (8) -> (64, 4); P4-P6 (>= 16) -> (128, 2).
    """
    if stride <= 4:
        return 64, 8
    if stride <= 8:
        return 64, 4
    return 128, 2


def _frobenius(diff: torch.Tensor) -> torch.Tensor:
    """``||diff||_F`` over the whole per-GPU batch (``torch.dist``; subgradient 0 at 0), in fp32."""
    return torch.linalg.vector_norm(diff.float())


def _per_image_distance(diff: torch.Tensor, distance: str) -> torch.Tensor:
    """Paper-form ℓ2, mean over images: Euclidean norm per image ("norm") or mean square ("mse")."""
    diff = diff.float().flatten(1)  # fp32: a sum over C*H*W squares overflows fp16
    if distance == "norm":
        return torch.linalg.vector_norm(diff, dim=1).mean()
    return diff.pow(2).mean()


@DISTILL_HEAD_REGISTRY.register()
class FBKD(DistillHead):
    """
    Attention-guided distillation (AGD: L_AT + L_AM) and non-local distillation (NLD) on the
    FPN levels ``IN_FEATURES`` (p2..p6, as the official Faster R-CNN code; mmrazor uses
    p2..p5). Each level ``l`` contributes the terms ``<l>_am``, ``<l>_at_c``, ``<l>_at_s`` and
    ``<l>_nld`` (logged as ``loss_kd_fbkd_p2_am`` ...); **levels are summed** (official code).

    Attention (docs/methods/fbkd.md): ``G^s(A) = mean_c |A|``, ``G^c(A) = mean_hw |A|``; masks are
    detached, see :func:`fbkd_spatial_mask` / :func:`fbkd_channel_mask`.

    ``FORM: "code"`` -- the released code (mmrazor port; docs/methods/fbkd.md):

    - ``L_AM = w_AM ||(T - f(S)) · sqrt(M^s [· M^c])||_F``; ``f`` = 1x1 conv (the FeaturePairing
      adapter); the channel mask is computed but **not applied** in the code (``CHANNEL_MASK False``);
    - ``L_AT,c = w_c ||mean_hw(T) - g_c(mean_hw(S))||_F`` and ``L_AT,s = w_s ||mean_c(T) - g_s(mean_c(S))||_F``
      with *signed* means, ``g_c`` = Linear(C_S, C_T), ``g_s`` = 3x3 conv 1->1;
    - ``L_NLD = w_NL ||h(NL_S(S)) - NL_T(T)||_F``, ``h`` = 1x1 conv;
    - every ``||·||_F`` is ``torch.dist``: one raw (not squared) Frobenius norm over the whole
      per-GPU batch, so the terms grow like sqrt(B·H·W) (docs/methods/fbkd.md). Constants
      7e-5 / 4e-3 / 4e-3 / 7e-5 and τ = 0.5 are tuned for 2 images/GPU at ~1333x800.

    ``FORM: "paper"`` -- the ICLR paper's formulas as reconstructed in docs/methods/fbkd.md:

    - masks ``M^s = HW softmax((G^s(S)+G^s(T))/τ)``, ``M^c = C softmax((G^c(S)+G^c(T))/τ)``;
    - ``L_AM = w_AM sqrt(Σ_chw (T - f(S))² M^s M^c)`` per image;
    - ``L_AT = w_s ℓ2(G^s(S), G^s(T)) + w_c ℓ2(G^c(S), G^c(T))`` on ``|A|`` attention, no adapters
      (so student and teacher must have equal channels);
    - ``L_NLD = w_NL ℓ2(h(NL_S(S)), NL_T(T))``.

      [UNVERIFIED] The paper writes each formula for one image; the batch reduction (mean over
      images) and ℓ2 (``PAPER_DISTANCE``: "norm" = Euclidean norm, "mse" = mean square) are
      choices of this toolkit, and the paper's α/β/γ/λ values and their mapping to the terms
      are not known: the paper preset's weights must be re-tuned.

    Non-local blocks (:class:`NonLocalBlock`): per level ``C_i`` and pool stride from
    ``NLD.INNER_CHANNELS`` / ``NLD.POOL_STRIDES`` (empty: the official P2 64/8, P3 64/4,
    P4-P6 128/2, chosen by the level's stride). With ``NLD.SCALE_INNER_CHANNELS`` the official
    ``C_i`` (for 256-channel FPNs) are scaled by ``C/256`` for narrower FPNs. The teacher-side
    block NL_T is **trainable and lives in this head** (it receives gradients from L_NLD); the
    teacher model itself is frozen and its features are detached. ``W_z`` is followed by a
    zero-initialised norm (``NLD.NORM``, GroupNorm by default instead of the original
    BatchNorm, for small per-process batches), so both blocks are the identity at start.

    ``AT.ENABLED``, ``AM.ENABLED`` and ``NLD.ENABLED`` switch the components (ablations "AGD
    only" = NLD off, "NLD only" = AT and AM off); modules of a disabled component are not
    built, so every registered parameter receives a gradient.

    Explicit construction: ``FBKD(pairing=FeaturePairing(student, teacher, ["p2", "p3"]),
    form="code")`` (the pairing's adapters are ``f``; the other modules are sized from its
    channels and strides).
    """

    @classmethod
    def add_config(cls, cfg):
        node = cfg.DISTILL.FBKD = CN()
        # "code": the released code's formulas; "paper": the paper's (see the class docstring).
        node.FORM = "code"
        add_feature_pairing_config(node)  # ADAPTER = f, the 1x1 conv of L_AM
        node.SPATIAL_TEMPERATURE = 0.5
        node.CHANNEL_TEMPERATURE = 0.5
        # Apply the channel mask M^c in L_AM (off in the official code, on in the paper).
        node.CHANNEL_MASK = False
        # Paper form only: the ℓ2 of L_AT and L_NLD, "norm" or "mse" [UNVERIFIED].
        node.PAPER_DISTANCE = "norm"
        node.AT = CN()
        node.AT.ENABLED = True
        node.AT.CHANNEL_WEIGHT = 4e-3
        node.AT.SPATIAL_WEIGHT = 4e-3
        node.AM = CN()
        node.AM.ENABLED = True
        node.AM.WEIGHT = 7e-5
        node.NLD = CN()
        node.NLD.ENABLED = True
        node.NLD.WEIGHT = 7e-5
        # Per IN_FEATURES entry; empty = the official values by stride (default_non_local_setting).
        node.NLD.INNER_CHANNELS = []
        node.NLD.POOL_STRIDES = []
        # Scale the inner channels by C/256 (the official values are for 256-channel FPNs).
        node.NLD.SCALE_INNER_CHANNELS = True
        # Norm after W_z, zero-initialised: "GN" (groups = gcd(32, C)), "BN", "SyncBN" or "".
        node.NLD.NORM = "GN"

    @configurable
    def __init__(
        self,
        *,
        pairing: FeaturePairing,
        form: str = "code",
        spatial_temperature: float = 0.5,
        channel_temperature: float = 0.5,
        channel_mask: bool = False,
        paper_distance: str = "norm",
        at_enabled: bool = True,
        at_channel_weight: float = 4e-3,
        at_spatial_weight: float = 4e-3,
        am_enabled: bool = True,
        am_weight: float = 7e-5,
        nld_enabled: bool = True,
        nld_weight: float = 7e-5,
        nld_inner_channels: Sequence[int] = (),
        nld_pool_strides: Sequence[int] = (),
        nld_scale_inner_channels: bool = True,
        nld_norm: str = "GN",
    ):
        super().__init__()
        _check_options(
            form=form,
            levels=list(pairing.names),
            temperatures={"SPATIAL_TEMPERATURE": spatial_temperature, "CHANNEL_TEMPERATURE": channel_temperature},
            paper_distance=paper_distance,
            enabled=(at_enabled, am_enabled, nld_enabled),
            nld_norm=nld_norm,
            nld_lists={"INNER_CHANNELS": nld_inner_channels, "POOL_STRIDES": nld_pool_strides},
        )
        self.form = form
        self.at_enabled, self.am_enabled, self.nld_enabled = at_enabled, am_enabled, nld_enabled
        self.spatial_temperature = spatial_temperature
        self.channel_temperature = channel_temperature
        self.channel_mask = channel_mask
        self.paper_distance = paper_distance
        self.at_channel_weight, self.at_spatial_weight = at_channel_weight, at_spatial_weight
        self.am_weight, self.nld_weight = am_weight, nld_weight

        self.pairing = pairing
        if not self.am_enabled:
            # f serves L_AM only; drop it so no registered parameter goes unused (DDP).
            self.pairing.adapters = nn.ModuleDict()
        names = self.pairing.names
        channels = {n: (self.pairing.student_channels[n], self.pairing.teacher_channels[n]) for n in names}
        self._validate_channels(channels)

        if self.at_enabled and self.form == "code":
            self.channel_adapters = nn.ModuleDict({n: nn.Linear(cs, ct) for n, (cs, ct) in channels.items()})
            self.spatial_adapters = nn.ModuleDict({n: nn.Conv2d(1, 1, 3, padding=1) for n in names})
        if self.nld_enabled:
            settings = self._non_local_settings(
                names, self.pairing.student_strides, nld_inner_channels, nld_pool_strides
            )
            self.student_non_local = nn.ModuleDict()
            self.teacher_non_local = nn.ModuleDict()
            self.non_local_adapters = nn.ModuleDict()
            for n, (cs, ct) in channels.items():
                inner, stride = settings[n]
                self.student_non_local[n] = NonLocalBlock(
                    cs, self._inner(inner, cs, nld_scale_inner_channels), stride, nld_norm
                )
                self.teacher_non_local[n] = NonLocalBlock(
                    ct, self._inner(inner, ct, nld_scale_inner_channels), stride, nld_norm
                )
                self.non_local_adapters[n] = FeatureAdapter(cs, ct, kernel_size=1)

        self.capture_pairing(self.pairing)

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        return {
            "pairing": feature_pairing_from_config(opts, context, cfg),
            "form": opts.FORM,
            "spatial_temperature": opts.SPATIAL_TEMPERATURE,
            "channel_temperature": opts.CHANNEL_TEMPERATURE,
            "channel_mask": opts.CHANNEL_MASK,
            "paper_distance": opts.PAPER_DISTANCE,
            "at_enabled": opts.AT.ENABLED,
            "at_channel_weight": opts.AT.CHANNEL_WEIGHT,
            "at_spatial_weight": opts.AT.SPATIAL_WEIGHT,
            "am_enabled": opts.AM.ENABLED,
            "am_weight": opts.AM.WEIGHT,
            "nld_enabled": opts.NLD.ENABLED,
            "nld_weight": opts.NLD.WEIGHT,
            "nld_inner_channels": list(opts.NLD.INNER_CHANNELS),
            "nld_pool_strides": list(opts.NLD.POOL_STRIDES),
            "nld_scale_inner_channels": opts.NLD.SCALE_INNER_CHANNELS,
            "nld_norm": opts.NLD.NORM,
        }

    # ---------------------------------------------------------------- build-time checks
    def _validate_channels(self, channels: Dict[str, Tuple[int, int]]):
        differ = {n: c for n, c in channels.items() if c[0] != c[1]}
        if not differ:
            return
        needs = []
        if self.channel_mask and self.am_enabled:
            needs.append("the channel mask (CHANNEL_MASK) averages student and teacher channel attention")
        if self.form == "paper" and self.at_enabled:
            needs.append("the paper-form L_AT compares channel attention without an adapter")
        if needs:
            raise DistillConfigError(
                f"DISTILL.FBKD: student and teacher channels differ at {differ} (student, teacher), but "
                f"{'; '.join(needs)}. Pair FPN levels of equal width, or use FORM 'code' with CHANNEL_MASK False."
            )

    @staticmethod
    def _non_local_settings(
        names: Sequence[str], strides: Dict[str, int], inner_channels: Sequence[int], pool_strides: Sequence[int]
    ) -> Dict[str, Tuple[int, int]]:
        out = {}
        for i, name in enumerate(names):
            inner, stride = default_non_local_setting(strides[name])
            if inner_channels:
                inner = int(inner_channels[i])
            if pool_strides:
                stride = int(pool_strides[i])
            out[name] = (inner, stride)
        return out

    @staticmethod
    def _inner(inner: int, channels: int, scale: bool) -> int:
        return max(1, round(inner * channels / 256)) if scale else inner

    # ---------------------------------------------------------------- losses
    def forward(self, student, teacher, step) -> Dict[str, torch.Tensor]:
        terms: Dict[str, torch.Tensor] = {}
        for name in self.pairing.names:
            s = self.pairing.student_feature(student, name)
            t_full = self.pairing.teacher_feature(teacher, name).detach()
            s_aligned, t = self.pairing.match_extent(name, s, t_full)
            adapted = self.pairing.align(name, s, t_full)[0] if self.am_enabled else None
            for term, value in self.level_terms(name, adapted, s_aligned, t):
                terms[f"{name}_{term}"] = value
        return terms

    def level_terms(self, name: str, adapted: torch.Tensor, s_aligned: torch.Tensor, t: torch.Tensor) -> List:
        """
        The weighted terms of one level: ``[(term, value), ...]``, from the adapted student
        map, the raw student map on the teacher's grid, and the teacher map.
        """
        out = []
        code = self.form == "code"
        paper_at = self.at_enabled and not code
        attention = _LevelAttention(s_aligned, t, with_grad=paper_at) if (self.am_enabled or paper_at) else None
        if self.am_enabled:
            mask = attention.spatial_mask(self.spatial_temperature, self.form)[:, None]
            if self.channel_mask:
                mask = mask * attention.channel_mask(self.channel_temperature, self.form)[:, :, None, None]
            weighted = (t - adapted) * mask.sqrt()
            am = _frobenius(weighted) if code else _per_image_distance(weighted, "norm")
            out.append(("am", self.am_weight * am))
        if self.at_enabled:
            if code:
                s_channel = self.channel_adapters[name](s_aligned.mean(dim=(2, 3)))
                s_spatial = self.spatial_adapters[name](s_aligned.mean(dim=1, keepdim=True))
                at_c = _frobenius(t.mean(dim=(2, 3)) - s_channel)
                at_s = _frobenius(t.mean(dim=1, keepdim=True) - s_spatial)
            else:
                at_c = _per_image_distance(attention.student_channel - attention.teacher_channel, self.paper_distance)
                at_s = _per_image_distance(attention.student_spatial - attention.teacher_spatial, self.paper_distance)
            out.append(("at_c", self.at_channel_weight * at_c))
            out.append(("at_s", self.at_spatial_weight * at_s))
        if self.nld_enabled:
            diff = self.non_local_adapters[name](self.student_non_local[name](s_aligned)) - self.teacher_non_local[name](t)
            nld = _frobenius(diff) if code else _per_image_distance(diff, self.paper_distance)
            out.append(("nld", self.nld_weight * nld))
        return out


def _check_options(*, form, levels, temperatures, paper_distance, enabled, nld_norm, nld_lists):
    """The option values of :class:`FBKD`, each error naming its key under ``DISTILL.FBKD``."""
    key = "DISTILL.FBKD"
    if form not in FORMS:
        raise DistillConfigError(f"{key}.FORM must be one of {FORMS}, got '{form}'.")
    if not any(enabled):
        raise DistillConfigError(
            f"{key}: AT, AM and NLD are all disabled; enable at least one (or remove 'fbkd' from DISTILL.HEADS)."
        )
    for name, value in temperatures.items():
        if value <= 0:
            raise DistillConfigError(f"{key}.{name} must be > 0, got {value}.")
    if paper_distance not in PAPER_DISTANCES:
        raise DistillConfigError(f"{key}.PAPER_DISTANCE must be one of {PAPER_DISTANCES}, got '{paper_distance}'.")
    if nld_norm not in NON_LOCAL_NORMS:
        raise DistillConfigError(f"{key}.NLD.NORM must be one of {NON_LOCAL_NORMS}, got '{nld_norm}'.")
    n = len(levels)
    for name, values in nld_lists.items():
        values = list(values)
        if values and len(values) != n:
            raise DistillConfigError(
                f"{key}.NLD.{name} has {len(values)} entries but IN_FEATURES has {n} "
                f"({levels}); give one value per level, or leave it empty for the "
                "official values by level."
            )
        if any(int(v) != v or v < 1 for v in values):
            raise DistillConfigError(f"{key}.NLD.{name} must hold positive integers, got {values}.")
