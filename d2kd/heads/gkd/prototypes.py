"""
Prototype maths of "Distilling Object Detectors with Global Knowledge" (Tang et al., ECCV
2022; docs/methods/gkd.md): instance features pooled in boxes, the density filter and the greedy
matching pursuit of the Prototype Generation Module (PGM, Eqs. 2-5, Alg. 1), and the
projections / robust weights of the Robust Distillation Module (RDM, Eqs. 6 and 8).

Conventions: instance features are rows, ``(N, D)``. The teacher space is ``t``, the
student space ``s``; both hold the same N instances (one box seen by both models).
Everything here is plain tensor maths, independent of Detectron2, and is pinned by
independent numpy tests (tests/test_gkd.py).
"""

from typing import Tuple

import torch
import torch.nn.functional as F

from ...modeling.box_masks import box_windows
from ...losses.precision import fp32, full_precision

__all__ = [
    "box_average_pool",
    "gaussian_density",
    "density_candidates",
    "mp_coefficients",
    "matching_pursuit",
    "select_prototypes",
    "cosine_projection",
    "mp_projection",
    "robust_weights",
]


def box_average_pool(feature: torch.Tensor, boxes: torch.Tensor, stride: float) -> torch.Tensor:
    """
    Mean of ``feature`` ``(C, H, W)`` over each box's integer cell window (the GK code's
    instance feature: cells ``[floor(x1/s), floor(x2/s)+1) x [floor(y1/s), floor(y2/s)+1)``,
    see :func:`~d2kd.modeling.box_masks.box_windows`), for boxes ``(N, 4)`` XYXY in the
    coordinates of the image the map was computed from. Returns ``(N, C)``, differentiable.

    Computed as ``rows^T F cols`` with 0/1 window indicators (one batched matrix product,
    exact sums, no Python loop over boxes).
    """
    c, h, w = feature.shape
    if len(boxes) == 0:
        return feature.reshape(c, -1)[:, :0].t()  # (0, C), still attached to the graph
    x0, y0, x1, y1 = box_windows(boxes.float(), stride, (h, w)).unbind(1)
    hs = torch.arange(h, device=feature.device)
    ws = torch.arange(w, device=feature.device)
    # fp32 window sums and means, also under autocast (mixed precision).
    feature = fp32(feature)
    rows = ((hs[None] >= y0[:, None]) & (hs[None] < y1[:, None])).to(feature.dtype)  # (N, H)
    cols = ((ws[None] >= x0[:, None]) & (ws[None] < x1[:, None])).to(feature.dtype)  # (N, W)
    with full_precision(feature):
        sums = torch.einsum("chw,nw->nch", feature, cols)
        sums = torch.einsum("nch,nh->nc", sums, rows)
    area = ((y1 - y0) * (x1 - x0)).to(feature.dtype)
    return sums / area[:, None]


def gaussian_density(normed: torch.Tensor, kernel_width: float = 0.1) -> torch.Tensor:
    """``rho_n = sum_m exp(-(D_nm / kernel_width)^2)`` with cosine distances ``D = 1 - X X^T``
    of L2-normalised rows (Alg. 1 step 3 in the code: kernel width 0.1)."""
    distances = 1.0 - normed @ normed.t()
    return torch.exp(-((distances / kernel_width) ** 2)).sum(dim=1)


def density_candidates(
    teacher_normed: torch.Tensor, student_normed: torch.Tensor, kernel_width: float = 0.1, percentile: float = 40.0
) -> torch.Tensor:
    """
    Indices of the candidate prototypes: instances whose density exceeds the
    ``percentile``-th value in BOTH spaces. As in the code, the bound is the sorted density
    at position ``int(N * percentile / 100)`` and the comparison is strict, so ties at the
    bound are dropped.

    If no instance qualifies (one instance, or all densities equal) every instance is a
    candidate; the code would crash there (argmin over nothing).
    """
    n = teacher_normed.shape[0]
    if student_normed.shape[0] != n:
        raise ValueError(f"{n} teacher instances but {student_normed.shape[0]} student instances.")
    middle = min(n - 1, int(n * percentile / 100.0))
    keep = torch.ones(n, dtype=torch.bool, device=teacher_normed.device)
    for normed in (teacher_normed, student_normed):
        density = gaussian_density(normed, kernel_width)
        keep &= density > density.sort().values[middle]
    candidates = torch.nonzero(keep).flatten()
    if candidates.numel() == 0:
        candidates = torch.arange(n, device=teacher_normed.device)
    return candidates


def mp_coefficients(
    p_t: torch.Tensor, p_s: torch.Tensor, sqnorm_t, sqnorm_s, alpha: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Eq. 5: the coefficients ``(a_t, a_s)`` of residuals on a prototype ``(x_t, x_s)`` that
    minimise ``||r_t - a_t x_t||^2 + ||r_s - a_s x_s||^2 + alpha (a_t - a_s)^2``, i.e. the
    solution of::

        [ ||x_t||^2 + alpha   -alpha            ] [a_t]   [p_t = x_t . r_t]
        [ -alpha              ||x_s||^2 + alpha ] [a_s] = [p_s = x_s . r_s]

    ``p_t, p_s`` broadcast against the squared norms (e.g. ``(K, N)`` and ``(K, 1)``). With
    unit prototypes this is the code's ``a_t = (p_t + alpha (p_t + p_s)) / (1 + 2 alpha)``.
    """
    det = (sqnorm_t + alpha) * (sqnorm_s + alpha) - alpha * alpha
    a_t = ((sqnorm_s + alpha) * p_t + alpha * p_s) / det
    a_s = (alpha * p_t + (sqnorm_t + alpha) * p_s) / det
    return a_t, a_s


def matching_pursuit(
    teacher: torch.Tensor, student: torch.Tensor, candidates: torch.Tensor, num_prototypes: int, alpha: float
) -> torch.Tensor:
    """
    Greedy joint selection of Eq. 2 (Eqs. 3-5; Alg. 1 step 4): ``num_prototypes`` times,
    pick the candidate ``gamma`` minimising::

        J(gamma) = sum_n ||r_t,n - a_t,n x_t,gamma||^2 + ||r_s,n - a_s,n x_s,gamma||^2
                   + alpha (a_t,n - a_s,n)^2                      (coefficients by Eq. 5)

    over all N instances' residuals, then subtract its contribution. Rows of ``teacher``
    ``(N, Dt)`` and ``student`` ``(N, Ds)`` are the (normalised) instances; ``candidates``
    indexes the rows allowed as prototypes. As in the code, a chosen candidate is not
    excluded from later picks. Returns the ``num_prototypes`` row indices in pick order.

    Implementation: inner products with the residuals and the residual norms are updated in
    closed form (``x_k . r_n`` loses ``a_n x_k . x_gamma`` per pick), so each pick costs
    O(candidates x N) instead of O(candidates x D x N).
    """
    x_t, x_s = teacher[candidates], student[candidates]  # (K, Dt), (K, Ds)
    sq_t = (x_t * x_t).sum(1, keepdim=True)  # (K, 1)
    sq_s = (x_s * x_s).sum(1, keepdim=True)
    p_t = x_t @ teacher.t()  # (K, N): x_k . r_n, residuals start as the instances
    p_s = x_s @ student.t()
    gram_t = x_t @ x_t.t()  # (K, K)
    gram_s = x_s @ x_s.t()
    res_t = (teacher * teacher).sum(1)  # (N,): ||r_n||^2
    res_s = (student * student).sum(1)
    picks = []
    for _ in range(int(num_prototypes)):
        a_t, a_s = mp_coefficients(p_t, p_s, sq_t, sq_s, alpha)
        err = (
            res_t[None] - 2 * a_t * p_t + a_t * a_t * sq_t
            + res_s[None] - 2 * a_s * p_s + a_s * a_s * sq_s
            + alpha * (a_t - a_s) ** 2
        ).sum(dim=1)
        g = int(torch.argmin(err))
        picks.append(int(candidates[g]))
        at_g, as_g = a_t[g], a_s[g]  # (N,)
        res_t = res_t - 2 * at_g * p_t[g] + at_g * at_g * sq_t[g]
        res_s = res_s - 2 * as_g * p_s[g] + as_g * as_g * sq_s[g]
        p_t = p_t - gram_t[:, g : g + 1] * at_g[None]
        p_s = p_s - gram_s[:, g : g + 1] * as_g[None]
    return torch.tensor(picks, dtype=torch.long, device=teacher.device)


def select_prototypes(
    teacher_feats: torch.Tensor,
    student_feats: torch.Tensor,
    num_prototypes: int = 10,
    alpha: float = 10.0,
    kernel_width: float = 0.1,
    percentile: float = 40.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    PGM for one class at one level (Alg. 1 steps 2-4): L2-normalise each space, keep the
    dense candidates, run the matching pursuit. Returns ``(indices (num_prototypes,),
    candidates)``; the caller stores the RAW features at ``indices`` (step 5).
    """
    t = F.normalize(teacher_feats.float(), dim=1)
    s = F.normalize(student_feats.float(), dim=1)
    candidates = density_candidates(t, s, kernel_width, percentile)
    return matching_pursuit(t, s, candidates, num_prototypes, alpha), candidates


def cosine_projection(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``phi(f; P) = [cos(f, p_1), ..., cos(f, p_K)]`` for rows ``(N, D)`` and ``(K, D)``:
    the code's "projection" (``template_box_distance``)."""
    with full_precision(feats):
        return F.normalize(feats.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).t()


def mp_projection(cos_t: torch.Tensor, cos_s: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    [UNVERIFIED reading of the paper's "calculated exactly the same as in Eq. 5"] the joint
    Eq. 5 coefficients of one normalised instance on each unit prototype, taken separately
    per prototype: ``a_t = (c_t + alpha (c_t + c_s)) / (1 + 2 alpha)`` and symmetrically
    ``a_s``, from the cosines ``c_t, c_s`` ``(N, K)``. Note ``a_s - a_t = (c_s - c_t) / (1 + 2
    alpha)``: compared with cosines the loss sees a difference shrunk by ``1 + 2 alpha``.
    """
    return mp_coefficients(cos_t, cos_s, 1.0, 1.0, alpha)


def robust_weights(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    student_prototypes: torch.Tensor,
    teacher_prototypes: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """
    Eq. 8 (reconstructed from the code, ``r2i_om_loss`` / ``r2i_soft_weight``), detached::

        w_i = 1 - | max_k cos(f_s,i, p_s,c_i,k) - max_k cos(f_t,i, p_t,c_i,k) |

    with only the prototypes of the instance's class ``c_i``. Prototypes are ``(C, K, D)``
    per space; ``valid`` ``(C,)`` says which classes have prototypes. An instance of a class
    without prototypes (no training instance passed the PGM filters) gets ``w = 1`` (the
    code would fail on the empty slice).
    """
    if len(labels) == 0:
        return student_feats.new_zeros((0,), dtype=torch.float32)
    with torch.no_grad(), full_precision(student_feats):
        labels = labels.long()
        s = F.normalize(student_feats.detach().float(), dim=1)
        t = F.normalize(teacher_feats.detach().float(), dim=1)
        ps = F.normalize(student_prototypes[labels].float(), dim=2)  # (N, K, Ds)
        pt = F.normalize(teacher_prototypes[labels].float(), dim=2)
        max_s = torch.einsum("nd,nkd->nk", s, ps).max(dim=1).values
        max_t = torch.einsum("nd,nkd->nk", t, pt).max(dim=1).values
        w = 1.0 - (max_s - max_t).abs()
        return torch.where(valid[labels].bool(), w, torch.ones_like(w))
