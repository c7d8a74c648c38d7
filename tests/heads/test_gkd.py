"""GKD (docs/methods/gkd.md): PGM maths and losses against numpy, the DDP broadcast, BCCD and RetinaNet runs."""

import math
import os

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from d2kd import DistillTrainer
from d2kd.engine.launch import launch
from d2kd.heads.gkd.prototype_hook import PrototypeHook, broadcast_tensors, gather_to_main, plan_pgm_instances
from d2kd.heads import BuildContext, DistillConfigError, build_distill_heads
from d2kd.heads.gkd import GKD, decoupled_feature_loss, global_knowledge_loss, response_loss
from d2kd.modeling.distiller import DistillationModel
from d2kd.heads.gkd.prototypes import (
    box_average_pool,
    density_candidates,
    matching_pursuit,
    mp_coefficients,
    robust_weights,
    select_prototypes,
)
from d2kd.modeling.schedule import DistillSchedule
from d2kd.modeling.teacher import build_teacher, build_teacher_cfg

from conftest import (
    RETINA_LEVELS,
    RETINA_STUDENT,
    distill_cfg,
    heads_cfg,
    log_messages,
    save_random_checkpoint,
    step,
    synthetic_batch,
)


GKD_TERMS = [f"{kind}_p{l}" for l in range(2, 7) for kind in ("global", "feat")] + ["resp"]
RETINA_TERMS = [f"{kind}_p{l}" for l in range(3, 8) for kind in ("global", "feat")] + ["resp"]


def _np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# PGM maths
# --------------------------------------------------------------------------------------------
def test_eq5_closed_form_matches_least_squares():
    rng = np.random.default_rng(0)
    for alpha in (0.0, 1.0, 10.0, 37.5):
        x_t, r_t = rng.normal(size=6), rng.normal(size=6)
        x_s, r_s = rng.normal(size=4), rng.normal(size=4)
        # Direct least squares of ||r_t - a_t x_t||^2 + ||r_s - a_s x_s||^2 + alpha (a_t - a_s)^2.
        design = np.zeros((6 + 4 + 1, 2))
        design[:6, 0], design[6:10, 1] = x_t, x_s
        design[10] = [math.sqrt(alpha), -math.sqrt(alpha)]
        target = np.concatenate([r_t, r_s, [0.0]])
        expected = np.linalg.lstsq(design, target, rcond=None)[0]
        # ... and the 2x2 normal equations of Eq. 5 solved directly.
        system = np.array([[x_t @ x_t + alpha, -alpha], [-alpha, x_s @ x_s + alpha]])
        np.testing.assert_allclose(np.linalg.solve(system, [x_t @ r_t, x_s @ r_s]), expected, rtol=1e-9)
        a_t, a_s = mp_coefficients(
            torch.tensor(x_t @ r_t), torch.tensor(x_s @ r_s), float(x_t @ x_t), float(x_s @ x_s), alpha
        )
        np.testing.assert_allclose([float(a_t), float(a_s)], expected, rtol=1e-9)
    # Unit prototypes: the code's form a_t = (p_t + alpha (p_t + p_s)) / (1 + 2 alpha).
    p_t, p_s, alpha = 0.3, -0.7, 10.0
    a_t, a_s = mp_coefficients(torch.tensor(p_t), torch.tensor(p_s), 1.0, 1.0, alpha)
    assert float(a_t) == pytest.approx((p_t + alpha * (p_t + p_s)) / (1 + 2 * alpha))
    assert float(a_s) == pytest.approx((p_s + alpha * (p_t + p_s)) / (1 + 2 * alpha))


def _numpy_matching_pursuit(xt, xs, candidates, steps, alpha):
    """Alg. 1 step 4 with explicit residual matrices and a 2x2 solve per instance."""
    rt, rs = xt.copy(), xs.copy()
    picks = []
    for _ in range(steps):
        best, best_j, best_a = None, np.inf, None
        for g in candidates:
            system = np.array([[xt[g] @ xt[g] + alpha, -alpha], [-alpha, xs[g] @ xs[g] + alpha]])
            a = np.linalg.solve(system, np.stack([rt @ xt[g], rs @ xs[g]]))  # (2, N)
            j = (
                ((rt - a[0][:, None] * xt[g]) ** 2).sum()
                + ((rs - a[1][:, None] * xs[g]) ** 2).sum()
                + alpha * ((a[0] - a[1]) ** 2).sum()
            )
            if j < best_j:
                best, best_j, best_a = g, j, a
        picks.append(best)
        rt = rt - best_a[0][:, None] * xt[best]
        rs = rs - best_a[1][:, None] * xs[best]
    return picks


def test_matching_pursuit_picks_the_known_best_prototype():
    # A tight cluster around u (pairs of opposite perturbations, so u is its centre, and u
    # itself is instance 0) plus two outliers, seen in two spaces related by a rotation.
    u = _np_unit(np.array([1.0, 1.0, 0.2]))
    e1 = _np_unit(np.cross(u, [0, 0, 1.0]))
    e2 = np.cross(u, e1)
    rows = [u]
    for eps in (0.05, 0.1):
        for e in (e1, e2):
            rows += [_np_unit(u + eps * e), _np_unit(u - eps * e)]
    rows += [_np_unit(np.array([1.0, -1.0, 0.0])), np.array([0.0, 0.0, 1.0])]
    xt = np.stack(rows)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    xs = xt @ q.T
    picks = matching_pursuit(
        torch.tensor(xt), torch.tensor(xs), torch.arange(len(xt)), num_prototypes=3, alpha=10.0
    ).tolist()
    assert picks[0] == 0, picks
    assert picks == _numpy_matching_pursuit(xt, xs, list(range(len(xt))), 3, 10.0)


def test_matching_pursuit_matches_explicit_residuals():
    rng = np.random.default_rng(2)
    xt = _np_unit(rng.normal(size=(14, 6)))
    xs = _np_unit(rng.normal(size=(14, 5)))
    candidates = [1, 3, 4, 8, 9, 13]
    expected = _numpy_matching_pursuit(xt, xs, candidates, 4, 10.0)
    got = matching_pursuit(torch.tensor(xt), torch.tensor(xs), torch.tensor(candidates), 4, 10.0).tolist()
    assert got == expected


def test_density_filter_keeps_instances_dense_in_both_spaces():
    def unit2d(degrees):
        a = np.deg2rad(degrees)
        return torch.tensor(np.stack([np.cos(a), np.sin(a)], 1))

    # Teacher: a cluster at 0/2/4/10 degrees (10 the loosest) and two isolated instances (4, 5).
    # Student: instance 0 is isolated, 1..4 form the cluster (4 the loosest), 5 isolated.
    teacher = unit2d([0, 2, 4, 10, 60, 120])
    student = unit2d([90, 0, 2, 4, 10, 200])
    # 40th percentile of 6 densities = the 3rd smallest (index int(2.4) = 2): teacher keeps
    # {0, 1, 2}, student keeps {1, 2, 3}; candidates must be dense in both: {1, 2}.
    assert density_candidates(teacher, student, 0.1, 40.0).tolist() == [1, 2]
    # The same from the densities written out in numpy.
    for x, kept in ((teacher, [0, 1, 2]), (student, [1, 2, 3])):
        x = x.numpy()
        rho = np.exp(-(((1 - x @ x.T) / 0.1) ** 2)).sum(1)
        assert np.nonzero(rho > np.sort(rho)[2])[0].tolist() == kept
    # Nothing above the bound (identical instances): every instance stays a candidate.
    same = unit2d([5, 5, 5])
    assert density_candidates(same, same).tolist() == [0, 1, 2]


def test_select_prototypes_stores_indices_of_raw_features():
    rng = np.random.default_rng(3)
    raw_t = torch.tensor(rng.normal(size=(20, 6)) * 5)
    raw_s = torch.tensor(rng.normal(size=(20, 4)) * 0.1)
    idx, candidates = select_prototypes(raw_t, raw_s, num_prototypes=3, alpha=10.0)
    assert len(idx) == 3 and set(idx.tolist()) <= set(candidates.tolist())
    # Selection is scale-free (features are L2-normalised first).
    idx2, _ = select_prototypes(raw_t * 7, raw_s * 0.5, num_prototypes=3, alpha=10.0)
    assert idx.tolist() == idx2.tolist()


def test_robust_weight_is_one_when_spaces_agree_and_eq8_otherwise():
    rng = np.random.default_rng(4)
    feats = torch.tensor(rng.normal(size=(5, 4)))
    protos = torch.tensor(rng.normal(size=(2, 3, 4)))
    labels = torch.tensor([0, 1, 1, 0, 1])
    valid = torch.ones(2, dtype=torch.uint8)
    q = torch.tensor(np.linalg.qr(rng.normal(size=(4, 4)))[0])
    # Teacher space = rotated and rescaled student space: same cosines, w = 1.
    w = robust_weights(feats, 3.0 * feats @ q.T, protos, 3.0 * protos @ q.T, valid, labels)
    torch.testing.assert_close(w, torch.ones(5, dtype=w.dtype), rtol=0, atol=1e-6)

    # Hand-made: max cos 0.8 in the student space, 0.5 in the teacher space -> w = 0.7.
    # Class 1 holds a prototype identical to the features; it must not be used for class 0.
    f_s, f_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    p_s = torch.tensor([[[0.8, 0.6], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    p_t = torch.tensor([[[0.5, math.sqrt(0.75)], [-1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    w = robust_weights(f_s, f_t, p_s, p_t, torch.tensor([1, 1]), torch.tensor([0]))
    assert float(w) == pytest.approx(0.7, abs=1e-6)
    # A class without prototypes gives w = 1.
    w = robust_weights(f_s, f_t, p_s, p_t, torch.tensor([0, 1]), torch.tensor([0]))
    assert float(w) == 1.0


def test_box_average_pool_uses_integer_windows():
    feature = torch.arange(2 * 5 * 6, dtype=torch.float64).reshape(2, 5, 6).requires_grad_()
    boxes = torch.tensor([[3.0, 5.0, 13.0, 9.0], [1.0, 1.0, 2.0, 2.0], [20.0, 17.0, 40.0, 40.0]])
    pooled = box_average_pool(feature, boxes, stride=4)
    f = feature.detach().numpy()
    # Cells [floor(x1/s), floor(x2/s)+1) x [floor(y1/s), floor(y2/s)+1), clipped to the map.
    expected = np.stack(
        [f[:, 1:3, 0:4].mean((1, 2)), f[:, 0:1, 0:1].mean((1, 2)), f[:, 4:5, 5:6].mean((1, 2))]
    )
    np.testing.assert_allclose(pooled.detach().numpy(), expected)
    pooled.sum().backward()
    assert feature.grad is not None and feature.grad[:, 0, 0].gt(0).all()
    empty = box_average_pool(feature, torch.zeros(0, 4), stride=4)
    assert empty.shape == (0, 2) and empty.requires_grad


# --------------------------------------------------------------------------------------------
# RDM loss values
# --------------------------------------------------------------------------------------------
def _np_smooth_l1(x):
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def test_global_loss_values():
    rng = np.random.default_rng(5)
    fs, ft = rng.normal(size=(3, 4)), rng.normal(size=(3, 6)) * 3
    ps, pt = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
    w = np.array([1.0, 0.5, 0.9])
    cos_s = _np_unit(fs) @ _np_unit(ps).T
    cos_t = _np_unit(ft) @ _np_unit(pt).T
    student = torch.tensor(fs, requires_grad=True)
    args = (student, torch.tensor(ft), torch.tensor(ps), torch.tensor(pt), torch.tensor(w))

    loss = global_knowledge_loss(*args, projection="cosine")
    expected = _np_smooth_l1(w[:, None] * cos_s - w[:, None] * cos_t).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0

    alpha = 10.0
    a_t = (cos_t + alpha * (cos_t + cos_s)) / (1 + 2 * alpha)
    a_s = (cos_s + alpha * (cos_t + cos_s)) / (1 + 2 * alpha)
    loss = global_knowledge_loss(*args, projection="mp", alpha=alpha)
    assert float(loss) == pytest.approx(_np_smooth_l1(w[:, None] * (a_s - a_t)).mean(), rel=1e-6)
    # Large differences reach the linear part of SmoothL1 (beta = 1).
    big = global_knowledge_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
        torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]),
    )
    assert float(big) == pytest.approx(2.0 - 0.5)
    # No instance (an image without positives) gives 0.
    zero = global_knowledge_loss(torch.zeros(0, 4), torch.zeros(0, 6), torch.tensor(ps), torch.tensor(pt), torch.zeros(0))
    assert float(zero) == 0.0


def test_decoupled_feature_loss_matches_the_code_formula():
    rng = np.random.default_rng(6)
    s, t = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    m = np.zeros((2, 4, 5))
    m[0, 1:3, 1:4] = 0.8
    m[0, 2, 3] = 0.6
    m[1, 0, 0] = 1.0
    # The code (KDLoss): mask repeated over channels, normalisers max(1, 2 * sum).
    d2 = (s - t) ** 2
    m_c = np.repeat(m[:, None], 3, axis=1)
    bg_c = 1.0 - (m_c > 0)
    fg = (d2 * m_c).sum() / max(1.0, 2 * m_c.sum())
    bg = (d2 * bg_c).sum() / max(1.0, 2 * bg_c.sum())
    loss = decoupled_feature_loss(torch.tensor(s), torch.tensor(t), torch.tensor(m), fg_weight=1.0, bg_weight=4.0)
    assert float(loss) == pytest.approx(fg + 4 * bg, rel=1e-6)
    fg_only = decoupled_feature_loss(torch.tensor(s), torch.tensor(t), torch.tensor(m), 1.0, 0.0)
    assert float(fg_only) == pytest.approx(fg, rel=1e-6)
    empty = decoupled_feature_loss(torch.tensor(s, requires_grad=True), torch.tensor(t), torch.zeros(2, 4, 5), 1.0, 0.0)
    assert float(empty) == 0.0 and empty.requires_grad


def test_weighted_response_kl_values():
    rng = np.random.default_rng(7)
    zs, zt, w, T = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)) * 2, np.array([1.0, 0.2, 0.7, 0.0]), 2.0

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    q, lq, lp = np.exp(log_softmax(zt / T)), log_softmax(zt / T), log_softmax(zs / T)
    kl = (q * (lq - lp)).sum(1)
    got = response_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(w), T, "softmax")
    assert float(got) == pytest.approx((w * kl).mean() * T * T, rel=1e-6)
    got = response_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(w), T, "softmax", class_mean=True)
    assert float(got) == pytest.approx((w * kl / 5).mean() * T * T, rel=1e-6)


# --------------------------------------------------------------------------------------------
# PGM instance plan and the DDP path
# --------------------------------------------------------------------------------------------
def test_pgm_plan_filters_sizes_caps_images_per_class_and_is_seeded():
    def image(i, anns):
        return {
            "file_name": f"img{i}.jpg", "height": 100, "width": 200, "image_id": i,
            "annotations": [
                {"bbox": list(b), "bbox_mode": BoxMode.XYWH_ABS, "category_id": c, "iscrowd": crowd}
                for b, c, crowd in anns
            ],
        }

    # Test-time resize: short side 100 -> 50 (scale 0.5); MIN_BOX_SIZE 12 px in that image.
    dicts = [image(i, [((0, 0, 30, 30), 0, 0)]) for i in range(5)]  # 15x15 after resize: kept
    dicts[1]["annotations"].append({"bbox": [10, 10, 30, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 0})
    dicts.append(image(5, [((0, 0, 24, 60), 0, 0), ((0, 0, 60, 60), 1, 1), ((5, 5, 40, 40), 1, 0)]))
    # image 5: the class-0 box is 12 px wide after resize (not > 12): dropped; the crowd box too.
    plan = plan_pgm_instances(dicts, 3, 50, 1000, min_box_size=12.0, max_images_per_class=2, seed=1)
    assert plan.class_num_images == [5, 2, 0]
    chosen0 = [plan.images[k]["image_id"] for k, _ in plan.class_instances[0]]
    assert len(chosen0) == 2 and set(chosen0) <= set(range(5))
    assert sorted(plan.images[k]["image_id"] for k, _ in plan.class_instances[1]) == [1, 5]
    assert plan.class_instances[2] == [] and plan.num_instances(1) == 2
    # Image 5 contributes only its class-1 box (XYXY, original pixels).
    img5 = next(d for d in plan.images if d["image_id"] == 5)
    np.testing.assert_allclose(img5["pgm_boxes"], [[5, 5, 45, 45]])
    # The same subset at every update (fixed seed), another one with another seed.
    again = plan_pgm_instances(dicts, 3, 50, 1000, 12.0, 2, seed=1)
    assert [plan.images[k]["image_id"] for k, _ in again.class_instances[0]] == chosen0
    others = {
        tuple(sorted(p.images[k]["image_id"] for k, _ in p.class_instances[0]))
        for p in (plan_pgm_instances(dicts, 3, 50, 1000, 12.0, 2, seed=s) for s in range(2, 8))
    }
    assert len(others) > 1


def _ddp_worker(out_dir):
    """Each rank extracts different "instances"; rank 0 selects; everyone gets its prototypes."""
    from detectron2.utils import comm

    rank = comm.get_rank()
    local = {rank * 10 + i: f for i, f in enumerate(_rank_feats(rank))}
    merged = gather_to_main(local)
    prototypes = torch.zeros(3, 3)
    valid = torch.zeros(2, dtype=torch.uint8)
    if comm.is_main_process():
        feats = torch.cat([merged[k] for k in sorted(merged)])
        idx, _ = select_prototypes(feats, feats.flip(1), num_prototypes=3, alpha=10.0)
        prototypes.copy_(feats[idx])
        valid.fill_(1)
    broadcast_tensors([prototypes, valid])
    keys = sorted(merged) if merged is not None else None
    torch.save({"prototypes": prototypes, "valid": valid, "keys": keys}, os.path.join(out_dir, f"rank{rank}.pth"))


@pytest.mark.train
def test_prototypes_identical_on_two_ranks(tmp_path):
    # Two spawned CPU processes (gloo), as `train_net.py --num-gpus 2` starts them.
    launch(_ddp_worker, 2, dist_url="auto", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    assert r0["keys"] == [0, 1, 10, 11] and r1["keys"] is None  # both ranks' shares reached rank 0
    assert torch.equal(r0["prototypes"], r1["prototypes"]) and r0["prototypes"].abs().sum() > 0
    assert r0["valid"].tolist() == r1["valid"].tolist() == [1, 1]
    # Rank 0 selected from the union of both ranks' instances.
    feats = torch.cat([f for r in (0, 1) for f in _rank_feats(r)])
    idx, _ = select_prototypes(feats, feats.flip(1), num_prototypes=3, alpha=10.0)
    torch.testing.assert_close(r1["prototypes"], feats[idx])


def _rank_feats(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 3, generator=gen) for _ in range(2)]


# --------------------------------------------------------------------------------------------
# A short BCCD run
# --------------------------------------------------------------------------------------------
PGM_TINY = ["DISTILL.GKD.PGM.MAX_IMAGES_PER_CLASS", 1]


@pytest.fixture(scope="module")
def gkd_run(tmp_path_factory, teacher_r18_weights):
    out = tmp_path_factory.mktemp("gkd")
    cfg = distill_cfg("bccd/distill_gkd_R50_R18.yaml", out / "run", teacher_r18_weights, opts=PGM_TINY, max_iter=2)
    with log_messages("d2kd.heads.gkd.prototype_hook") as messages:
        trainer = DistillTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    return cfg, trainer, messages


def _hook(trainer):
    return next(h for h in trainer._hooks if isinstance(h, PrototypeHook))


@pytest.mark.train
def test_short_bccd_run_all_terms_finite_and_logged(gkd_run):
    cfg, trainer, messages = gkd_run
    head = trainer.heads["gkd"]
    for term in GKD_TERMS:
        values = [v for v, _ in trainer.storage.history(f"loss_kd_gkd_{term}").values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), term
    assert any(v > 0 for v, _ in trainer.storage.history("loss_kd_gkd_resp").values())
    # Prototypes: computed once, before training, for every class (BCCD has all three).
    assert _hook(trainer).num_updates == 1 and int(head.prototype_iter) == 0
    assert head.prototype_valid.all()
    ps, pt, _ = head.prototypes("p3")
    assert ps.shape == (3, 10, 128) and ps.abs().sum(-1).gt(0).all() and pt.abs().sum(-1).gt(0).all()
    # Progress lines with counts, time and ETA, and a summary with instance counts.
    assert any("features of" in m and "images" in m and "ETA" in m for m in messages), messages
    assert any("prototypes updated before iteration 0" in m and "instances" in m for m in messages), messages
    # Robust weights are logged and lie in [0, 1].
    w = trainer.storage.history("gkd/robust_weight_feat").latest()
    assert 0.0 <= w <= 1.0


@pytest.mark.train
def test_resume_restores_prototypes_without_recomputing(gkd_run):
    cfg, trainer, _ = gkd_run
    saved = {k: v.clone() for k, v in trainer.heads.state_dict().items() if "prototype" in k}
    checkpoint = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
    assert {k for k in checkpoint["distiller"] if "prototype" in k} == set(saved)

    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 3
    resumed = DistillTrainer(cfg)
    assert int(resumed.heads["gkd"].prototype_iter) == -1
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    head = resumed.heads["gkd"]
    for k, v in saved.items():
        assert torch.equal(resumed.heads.state_dict()[k], v), k
    resumed.train()
    assert _hook(resumed).num_updates == 0, "prototypes were recomputed after resuming"
    for k, v in saved.items():
        assert torch.equal(resumed.heads.state_dict()[k], v), k
    assert int(head.prototype_iter) == 0
    assert math.isfinite(resumed.storage.history("loss_kd_gkd_global_p2").latest())


@pytest.mark.train
def test_images_without_boxes_and_missing_prototypes(gkd_run):
    cfg, trainer, _ = gkd_run
    batch = next(iter(trainer.data_loader))
    for x in batch:
        x["instances"] = x["instances"][:0]
    model = trainer.model
    model.train()
    with EventStorage(1):
        losses = model(batch)
        terms = {k: v for k, v in losses.items() if k.startswith("loss_kd_gkd")}
        assert set(terms) == {f"loss_kd_gkd_{t}" for t in GKD_TERMS}
        assert all(torch.isfinite(v) for v in terms.values())
        # No instance: no global, foreground or response loss.
        assert all(float(v) == 0.0 for v in terms.values())
        sum(losses.values()).backward()

        head = trainer.heads["gkd"]
        head.prototype_iter.fill_(-1)
        try:
            with pytest.raises(RuntimeError, match="prototypes have not been generated"):
                model(batch)
        finally:
            head.prototype_iter.fill_(0)


@pytest.mark.train
def test_released_code_preset_has_no_global_term(gkd_run, teacher_r18_weights, tmp_path):
    _, trainer, _ = gkd_run
    cfg = distill_cfg(
        "bccd/distill_gkd_released_code_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=PGM_TINY, max_iter=2
    )
    opts = cfg.DISTILL.GKD
    assert (opts.GLOBAL_WEIGHT, opts.BG_WEIGHT, opts.RESPONSE_WEIGHT, opts.KL_CLASS_MEAN, opts.LINEAR_DECAY) == (
        0.0, 4.0, 1.0, True, True,
    )
    context = BuildContext(trainer.student, trainer.teacher, cfg, trainer.teacher_cfg)
    head = GKD(cfg, context)
    head.load_state_dict(trainer.heads["gkd"].state_dict())  # same buffers and adapters
    assert head.decay(1) == pytest.approx(0.5) and head.needs_prototypes
    model = DistillationModel(trainer.student, trainer.teacher, torch.nn.ModuleDict({"gkd": head}), DistillSchedule())
    model.train()
    batch = next(iter(trainer.data_loader))
    with EventStorage(0):
        losses = model(batch)
    terms = {k for k in losses if k.startswith("loss_kd_gkd")}
    assert terms == {f"loss_kd_gkd_feat_p{l}" for l in range(2, 7)} | {"loss_kd_gkd_resp"}
    assert all(torch.isfinite(losses[k]) for k in terms)
    # The background term makes every level's feature loss positive.
    assert all(float(losses[f"loss_kd_gkd_feat_p{l}"]) > 0 for l in range(2, 7))


@pytest.mark.train
@pytest.mark.parametrize(
    "opts, message",
    [
        (["DISTILL.GKD.PROJECTION", "dot"], "PROJECTION must be one of"),
        (["DISTILL.GKD.PGM.NUM_PROTOTYPES", 0], "NUM_PROTOTYPES must be >= 1"),
        (["DISTILL.GKD.PGM.DENSITY_PERCENTILE", 100.0], "DENSITY_PERCENTILE"),
        (["DISTILL.GKD.IN_FEATURES", ["p2", "p4", "p5"]], "consecutive FPN levels"),
        (["DISTILL.GKD.IN_FEATURES", ["p2", "p3", "p4"]], "no prototypes for.*p5"),
        (["DISTILL.GKD.GLOBAL_WEIGHT", 0.0, "DISTILL.GKD.FEATURE_WEIGHT", 0.0, "DISTILL.GKD.RESPONSE_WEIGHT", 0.0], "nothing to distil"),
        (["DISTILL.GKD.ROBUST_WEIGHT_FLOOR", -2.0], "ROBUST_WEIGHT_FLOOR must be in"),
    ],
)
def test_bad_config_is_a_build_error(gkd_run, teacher_r18_weights, tmp_path, opts, message):
    _, trainer, _ = gkd_run
    cfg = distill_cfg("bccd/distill_gkd_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=opts)
    with pytest.raises(DistillConfigError, match=message):
        GKD(cfg, BuildContext(trainer.student, trainer.teacher, cfg, trainer.teacher_cfg))


@pytest.mark.train
def test_robust_weight_floor(gkd_run, teacher_r18_weights, tmp_path):
    """Eq. 8 reaches -1 when the two spaces disagree; the head raises it to ROBUST_WEIGHT_FLOOR
    (default 0), and -1.0 keeps the code's raw weight."""
    _, trainer, _ = gkd_run
    c = 128
    # Class 0: student prototypes all along e0 (max cos 1 for a student instance along e0);
    # teacher prototypes all along -e0 (max cos -1 for a teacher instance along e0): w = 1 - 2 = -1.
    # Class 1: max cos 0.8 in the student space, 0.5 in the teacher space: w = 0.7.
    e0, e1 = torch.zeros(c), torch.zeros(c)
    e0[0], e1[1] = 1.0, 1.0
    p_s = torch.stack([e0.repeat(10, 1), (0.8 * e0 + 0.6 * e1).repeat(10, 1), e0.repeat(10, 1)])
    p_t = torch.stack([(-e0).repeat(10, 1), (0.5 * e0 + math.sqrt(0.75) * e1).repeat(10, 1), e0.repeat(10, 1)])
    feats, labels = torch.stack([e0, e0]), torch.tensor([0, 1])
    expected = {0.0: [0.0, 0.7], -1.0: [-1.0, 0.7], 0.75: [0.75, 0.75]}
    for floor, want in expected.items():
        opts = [] if floor == 0.0 else ["DISTILL.GKD.ROBUST_WEIGHT_FLOOR", floor]
        cfg = distill_cfg("bccd/distill_gkd_R50_R18.yaml", tmp_path / str(floor), teacher_r18_weights, opts=opts)
        head = GKD(cfg, BuildContext(trainer.student, trainer.teacher, cfg, trainer.teacher_cfg))
        for cls in range(3):
            head.set_prototypes(0, cls, p_s[cls], p_t[cls])
        w = head._robust_weights(feats, feats, "p2", labels)
        torch.testing.assert_close(w, torch.tensor(want), rtol=0, atol=1e-6)


def test_prototype_update_schedule():
    """Updates before training and every PERIOD iterations; none after a resume restored them."""
    from types import SimpleNamespace

    def make_hook(period, proto_iter):
        hook = PrototypeHook.__new__(PrototypeHook)  # the schedule only: no models, no data
        hook.period = period
        hook.head = SimpleNamespace(prototype_iter=torch.tensor(proto_iter))
        hook.head.prototypes_ready = lambda: int(hook.head.prototype_iter) >= 0
        hook.calls = []
        hook.update = lambda it, reason: (hook.calls.append(it), hook.head.prototype_iter.fill_(it))
        return hook

    def run(hook, start, stop):
        hook.trainer = SimpleNamespace(iter=start)
        hook.before_train()
        for it in range(start, stop):
            hook.trainer.iter = it
            hook.before_step()
        return hook.calls

    assert run(make_hook(3, -1), 0, 8) == [0, 3, 6]
    # Resumed at 7 with prototypes from iteration 6: nothing before the first step.
    assert run(make_hook(3, 6), 7, 10) == [9]
    # Resumed exactly at a scheduled iteration: the straight run updates there too.
    assert run(make_hook(3, 6), 9, 10) == [9]


@pytest.mark.train
def test_head_terms_on_hand_made_records(gkd_run):
    """The head's wiring (levels, windows, robust weights, mask, KL) against numpy."""
    from detectron2.structures import Boxes, Instances

    from d2kd.capture import Records
    from d2kd.heads import StepInputs

    cfg, trainer, _ = gkd_run
    head = GKD(cfg, BuildContext(trainer.student, trainer.teacher, cfg, trainer.teacher_cfg))
    g = torch.Generator().manual_seed(0)
    c, k = 128, 10
    for level in range(5):
        for cls in range(3):
            head.set_prototypes(level, cls, torch.randn(k, c, generator=g), torch.randn(k, c, generator=g))
    head.prototype_iter.fill_(0)
    sizes = {"p2": 16, "p3": 8, "p4": 4, "p5": 2, "p6": 1}
    fs = {n: torch.randn(1, c, s, s, generator=g) for n, s in sizes.items()}
    ft = {n: torch.randn(1, c, s, s, generator=g) for n, s in sizes.items()}
    proposals = Instances((64, 64))
    proposals.proposal_boxes = Boxes(torch.tensor([[4.0, 4.0, 24.0, 24.0], [30.0, 30.0, 60.0, 60.0]]))
    proposals.gt_classes = torch.tensor([1, 3])  # one positive of class 1, one background (K = 3)
    zs, zt = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    rs, rt = torch.randn(2, c, 7, 7, generator=g), torch.randn(2, c, 7, 7, generator=g)
    student = Records({
        "backbone": [((), fs)], "roi_heads.label_and_sample_proposals": [((), [proposals])],
        "roi_heads.box_predictor": [((), (zs, None))], "roi_heads.box_pooler": [((), rs)],
    })
    teacher = Records({"backbone": [((), ft)], "roi_heads.box_predictor": [((), (zt, None))], "roi_heads.box_pooler": [((), rt)]})
    terms = head(student, teacher, StepInputs([], [], None, None, iteration=0))

    # The 20x20 box: level p2 (sqrt(area) < 112); windows [floor(x1/s), floor(x2/s)+1) clipped.
    windows = {"p2": (1, 7), "p3": (0, 4), "p4": (0, 2), "p5": (0, 1), "p6": (0, 1)}

    def w_of(f_s, f_t, name, cls=1):
        p_s, p_t, _ = (x.numpy() for x in head.prototypes(name))
        return 1 - abs((_np_unit(p_s[cls]) @ _np_unit(f_s)).max() - (_np_unit(p_t[cls]) @ _np_unit(f_t)).max())

    for name, (a, b) in windows.items():
        f_s = fs[name][0, :, a:b, a:b].numpy().mean((1, 2))
        f_t = ft[name][0, :, a:b, a:b].numpy().mean((1, 2))
        w = w_of(f_s, f_t, name)
        p_s, p_t = (x.numpy().reshape(-1, c) for x in head.prototypes(name)[:2])
        diff = w * (_np_unit(p_s) @ _np_unit(f_s)) - w * (_np_unit(p_t) @ _np_unit(f_t))
        assert float(terms[f"global_{name}"]) == pytest.approx(1.0 * _np_smooth_l1(diff).mean(), rel=1e-5), name
        if name == "p2":
            adapted = head.pairing.adapters["p2"](fs["p2"]).detach().numpy()[0]
            mask = np.zeros((16, 16))
            mask[a:b, a:b] = w
            fg = (((adapted - ft["p2"][0].numpy()) ** 2) * mask[None]).sum() / max(1.0, 2 * c * mask.sum())
            assert float(terms["feat_p2"]) == pytest.approx(1.0 * fg / 5, rel=1e-5)
        else:  # no instance assigned to this level and no background term
            assert float(terms[f"feat_{name}"]) == 0.0

    # Response: the positive RoI only, weighted by Eq. 8 on the RoIAlign features at p2.
    w_r = w_of(rs[0].numpy().mean((1, 2)), rt[0].numpy().mean((1, 2)), "p2")
    log_q = torch.log_softmax(zt[0] / 2, 0).numpy()
    log_p = torch.log_softmax(zs[0] / 2, 0).numpy()
    kl = (np.exp(log_q) * (log_q - log_p)).sum()
    # T^2 = 4; KL_CLASS_MEAN (default) divides by the K+1 logits.
    assert float(terms["resp"]) == pytest.approx(5.0 * w_r * 4 * kl / zt.shape[1], rel=1e-5)


# --------------------------------------------------------------------------------------------
# RetinaNet: the response term on positive anchors
# --------------------------------------------------------------------------------------------
def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_binary_kl(zs, zt, T):
    """T^2 * sum_c KL(Bern(sigmoid(zt/T)) || Bern(sigmoid(zs/T))) per row."""
    q, p = 1 / (1 + np.exp(-zt / T)), 1 / (1 + np.exp(-zs / T))
    return T * T * (q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))).sum(-1)


def _np_softmax_kl(zs, zt, T):
    lq, lp = _np_log_softmax(zt / T), _np_log_softmax(zs / T)
    return T * T * (np.exp(lq) * (lq - lp)).sum(-1)


def test_response_loss_values_binary_and_softmax():
    rng = np.random.default_rng(8)
    zs, zt, w, T = rng.normal(size=(4, 3)) * 2, rng.normal(size=(4, 3)) * 3, np.array([1.0, 0.2, 0.7, 0.0]), 2.0
    student = torch.tensor(zs, requires_grad=True)
    got = response_loss(student, torch.tensor(zt), torch.tensor(w), T, "binary")
    assert float(got) == pytest.approx((w * _np_binary_kl(zs, zt, T)).mean(), rel=1e-6)
    got.backward()
    assert student.grad[:3].abs().sum() > 0 and float(student.grad[3].abs().sum()) == 0.0  # w = 0 row
    got = response_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(w), T, "binary", class_mean=True)
    assert float(got) == pytest.approx((w * _np_binary_kl(zs, zt, T) / 3).mean(), rel=1e-6)
    got = response_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(w), T, "softmax")
    assert float(got) == pytest.approx((w * _np_softmax_kl(zs, zt, T)).mean(), rel=1e-6)
    got = response_loss(torch.tensor(zs), torch.tensor(zt), None, T, "softmax", class_mean=True)
    assert float(got) == pytest.approx((_np_softmax_kl(zs, zt, T) / 3).mean(), rel=1e-6)
    # A student equal to the teacher costs 0 in the binary form; no row gives 0.
    assert float(response_loss(torch.tensor(zt), torch.tensor(zt), None, T, "binary")) == pytest.approx(0.0, abs=1e-12)
    empty = response_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3), torch.zeros(0), T, "binary")
    assert float(empty) == 0.0 and empty.requires_grad


@pytest.fixture(scope="module")
def gkd_retina_run(tmp_path_factory):
    """2 iterations of the RetinaNet GKD config (R18 RetinaNet teacher, random weights)."""
    out = tmp_path_factory.mktemp("gkd_retina")
    weights = save_random_checkpoint(RETINA_STUDENT, str(out / "teacher.pth"))
    cfg = distill_cfg(
        "bccd/distill_gkd_retinanet_R50_R18.yaml", out / "run", weights, teacher_config=RETINA_STUDENT, opts=PGM_TINY
    )
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, trainer


@pytest.mark.train
def test_retinanet_short_bccd_run_all_terms_finite(gkd_retina_run):
    cfg, trainer = gkd_retina_run
    assert list(cfg.DISTILL.GKD.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"] and cfg.DISTILL.GKD.ANCHOR_KL == "binary"
    assert type(trainer.student).__name__ == type(trainer.teacher).__name__ == "RetinaNet"
    assert sorted(trainer.model.teacher_runner.parts) == ["backbone", "dense"]
    for term in RETINA_TERMS:
        values = [v for v, _ in trainer.storage.history(f"loss_kd_gkd_{term}").values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (term, values)
    assert all(v > 0 for v, _ in trainer.storage.history("loss_kd_gkd_resp").values())
    assert any(v > 0 for v, _ in trainer.storage.history("loss_kd_gkd_feat_p3").values())
    head = trainer.heads["gkd"]
    assert _hook(trainer).num_updates == 1 and head.prototype_valid.all()
    assert head.prototypes("p7")[0].shape == (3, 10, 128)
    for key in ("gkd/robust_weight_resp", "gkd/robust_weight_feat"):
        assert 0.0 <= trainer.storage.history(key).latest() <= 1.0

    # Images without ground truth: no positive anchor, no instance -> every term is 0.
    batch = next(iter(trainer.data_loader))
    for x in batch:
        x["instances"] = x["instances"][:0]
    trainer.model.train()
    with EventStorage(2):
        losses = trainer.model(batch)
    terms = {k: v for k, v in losses.items() if k.startswith("loss_kd_gkd")}
    assert set(terms) == {f"loss_kd_gkd_{t}" for t in RETINA_TERMS}
    assert all(float(v) == 0.0 for v in terms.values()), {k: float(v) for k, v in terms.items()}
    sum(losses.values()).backward()
    trainer.student.zero_grad(set_to_none=True)


def _retina_head(cfg, trainer, opts):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(["DISTILL.GKD.GLOBAL_WEIGHT", 0.0, "DISTILL.GKD.FEATURE_WEIGHT", 0.0] + list(opts))
    return GKD(cfg, BuildContext(trainer.student, trainer.teacher, cfg, trainer.teacher_cfg))


@pytest.mark.train
def test_anchor_response_on_hand_made_records(gkd_retina_run):
    """The RetinaNet response term (positive anchors, matched GT's Eq. 8 weight, binary KL,
    1 / #positive anchors) on hand-made records, against numpy."""
    from d2kd.capture import Records
    from d2kd.heads import StepInputs

    cfg, trainer = gkd_retina_run
    head = _retina_head(cfg, trainer, [])
    assert head.response_weight == 5.0 and head.temperature == 2.0 and head.anchor_kl == "binary"
    g = torch.Generator().manual_seed(1)
    c, k, n_cls = 128, 10, 3
    for level in range(5):
        for cls in range(n_cls):
            head.set_prototypes(level, cls, torch.randn(k, c, generator=g), torch.randn(k, c, generator=g))
    head.prototype_iter.fill_(0)
    # Two images; p3..p7 maps of a 64 x 64 input (strides 8..128), one anchor per cell.
    sizes = {"p3": 8, "p4": 4, "p5": 2, "p6": 1, "p7": 1}
    fs = {n: torch.randn(2, c, s, s, generator=g) for n, s in sizes.items()}
    ft = {n: torch.randn(2, c, s, s, generator=g) for n, s in sizes.items()}
    zs = {n: torch.randn(2, n_cls, s, s, generator=g) * 2 for n, s in sizes.items()}
    zt = {n: torch.randn(2, n_cls, s, s, generator=g) * 3 for n, s in sizes.items()}
    deltas = [torch.zeros(2, 4, s, s) for s in sizes.values()]
    num_anchors = 64 + 16 + 4 + 1 + 1
    # GT instances of image 0 (box, class). A and C are small (p3); B is ~245 px: p5 by the
    # one-stage rule of the official code (under 112 px P3, 112-224 P4, 224-448 P5).
    gt = {"A": ([4.0, 4.0, 40.0, 36.0], 0), "B": ([0.0, 0.0, 250.0, 240.0], 2), "C": ([10.0, 20.0, 50.0, 60.0], 0)}
    positives = {5: "A", 20: "A", 40: "C", 70: "B", 75: "B", 84: "B"}  # anchor index -> GT (64..79: p4, 84: p6)
    labels = torch.full((2, num_anchors), n_cls, dtype=torch.long)  # background
    labels[0, [1, 2, 60]] = -1  # ignored
    labels[1, [0, 9]] = -1  # image 1: no positive anchor
    matched = torch.rand(2, num_anchors, 4, generator=g) * 64  # meaningless where not positive
    for a, name in positives.items():
        labels[0, a] = gt[name][1]
        matched[0, a] = torch.tensor(gt[name][0])
    student = Records({
        "backbone": [((), fs)],
        "head": [((), ([zs[n] for n in sizes], deltas))],
        "label_anchors": [((), (list(labels), list(matched)))],
    })
    teacher = Records({"backbone": [((), ft)], "head": [((), ([zt[n] for n in sizes], deltas))]})
    step_inputs = StepInputs([], [], None, None, iteration=0)

    # numpy: logits flattened level by level, then (y, x) row-major.
    flat_s = np.concatenate([zs[n].numpy().transpose(0, 2, 3, 1).reshape(2, -1, n_cls) for n in sizes], 1)
    flat_t = np.concatenate([zt[n].numpy().transpose(0, 2, 3, 1).reshape(2, -1, n_cls) for n in sizes], 1)
    # Eq. 8 of each GT at its assigned level, windows [floor(x1/s), floor(x2/s)+1) clipped:
    # A at p3 (stride 8): x 0..5, y 0..4; C at p3: x 1..6, y 2..7; B at p5 (stride 32): all 2x2.
    windows = {"A": ("p3", 0, 5, 0, 6), "C": ("p3", 2, 8, 1, 7), "B": ("p5", 0, 2, 0, 2)}

    def eq8(name):
        level, y0, y1, x0, x1 = windows[name]
        cls = gt[name][1]
        f_s = fs[level][0, :, y0:y1, x0:x1].numpy().mean((1, 2))
        f_t = ft[level][0, :, y0:y1, x0:x1].numpy().mean((1, 2))
        p_s, p_t, _ = (x.numpy() for x in head.prototypes(level))
        return 1 - abs((_np_unit(p_s[cls]) @ _np_unit(f_s)).max() - (_np_unit(p_t[cls]) @ _np_unit(f_t)).max())

    w_gt = {name: eq8(name) for name in gt}
    assert len({round(v, 6) for v in w_gt.values()}) == 3, w_gt  # the weights tell the GTs apart
    anchors = sorted(positives)
    w = np.array([w_gt[positives[a]] for a in anchors])
    rows_s, rows_t = flat_s[0, anchors], flat_t[0, anchors]

    terms = head(student, teacher, step_inputs)
    assert set(terms) == {"resp"}
    expected = 5.0 * (w * _np_binary_kl(rows_s, rows_t, 2.0) / n_cls).sum() / len(anchors)
    assert float(terms["resp"]) == pytest.approx(expected, rel=1e-5)
    # KL_CLASS_MEAN False: the per-class binary KL summed over the K classes, not averaged.
    summed = _retina_head(cfg, trainer, ["DISTILL.GKD.KL_CLASS_MEAN", False])
    summed.load_state_dict(head.state_dict())
    expected_sum = 5.0 * (w * _np_binary_kl(rows_s, rows_t, 2.0)).sum() / len(anchors)
    assert float(summed(student, teacher, step_inputs)["resp"]) == pytest.approx(expected_sum, rel=1e-5)

    # Gradients reach exactly the positive anchors' student logits.
    zs_grad = {n: zs[n].clone().requires_grad_() for n in sizes}
    student_grad = Records({
        "backbone": [((), fs)],
        "head": [((), ([zs_grad[n] for n in sizes], deltas))],
        "label_anchors": [((), (list(labels), list(matched)))],
    })
    head(student_grad, teacher, step_inputs)["resp"].backward()
    grads = np.concatenate([zs_grad[n].grad.numpy().transpose(0, 2, 3, 1).reshape(2, -1, n_cls) for n in sizes], 1)
    assert sorted(np.nonzero(np.abs(grads).sum(-1)[0])[0].tolist()) == anchors and not grads[1].any()

    # The released code's softmax over the sigmoid logits, with its mean over classes.
    soft = _retina_head(cfg, trainer, ["DISTILL.GKD.ANCHOR_KL", "softmax", "DISTILL.GKD.KL_CLASS_MEAN", True])
    soft.load_state_dict(head.state_dict())
    expected = 5.0 * (w * _np_softmax_kl(rows_s, rows_t, 2.0) / n_cls).mean()
    assert float(soft(student, teacher, step_inputs)["resp"]) == pytest.approx(expected, rel=1e-5)
    # Without robust weights every positive anchor counts 1.
    plain = _retina_head(cfg, trainer, ["DISTILL.GKD.ROBUST_WEIGHTS", False, "DISTILL.GKD.GLOBAL_WEIGHT", 0.0])
    expected = 5.0 * (_np_binary_kl(rows_s, rows_t, 2.0) / n_cls).mean()
    assert float(plain(student, teacher, step_inputs)["resp"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.train
def test_retinanet_bad_anchor_kl_is_a_build_error(gkd_retina_run):
    cfg, trainer = gkd_retina_run
    with pytest.raises(DistillConfigError, match="ANCHOR_KL must be one of"):
        _retina_head(cfg, trainer, ["DISTILL.GKD.ANCHOR_KL", "sigmoid"])


# ---------------------------------------------------------------------------------------
# GKD between detector types: a RetinaNet pair, a Faster R-CNN teacher of a RetinaNet student
# ---------------------------------------------------------------------------------------


@pytest.mark.train
def test_gkd_on_retinanet_uses_positive_anchors(retina_pair, retina_models):
    """GKD builds on two RetinaNets (response term on the dense head) and one training forward
    (one image without ground truth) gives finite global, feature and response terms."""
    cfg = heads_cfg(retina_pair, ["gkd"], ["DISTILL.GKD.IN_FEATURES", RETINA_LEVELS])
    student, teacher = retina_models
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, build_teacher_cfg(cfg)))
    head = heads["gkd"]
    assert head.teacher_parts == {"backbone", "dense"} and "label_anchors" in head.student_methods
    g = torch.Generator().manual_seed(0)
    for level, name in enumerate(head.names):
        s_protos, t_protos, _ = head.prototypes(name)
        for cls in range(3):
            head.set_prototypes(level, cls, torch.randn(s_protos.shape[1:], generator=g), torch.randn(t_protos.shape[1:], generator=g))
    head.prototype_iter.fill_(0)
    model = DistillationModel(student, teacher, heads, DistillSchedule.from_config(cfg))
    # The fixture's student and teacher hold the same random weights: shift the teacher's class
    # logits so that the response term on the positive anchors cannot be 0.
    bias = teacher.head.cls_score.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(1.0)
        losses = step(model, synthetic_batch())
    finally:
        with torch.no_grad():
            bias.copy_(saved)
        model.student_recorder.remove()
        model.teacher_recorder.remove()
    expected = {f"loss_kd_gkd_{kind}_{l}" for l in RETINA_LEVELS for kind in ("global", "feat")} | {"loss_kd_gkd_resp"}
    assert expected <= set(losses), sorted(losses)
    assert all(torch.isfinite(losses[k]) for k in expected), {k: float(losses[k]) for k in expected}
    assert float(losses["loss_kd_gkd_resp"]) > 0
    sum(losses[k] for k in expected).backward()
    assert any(p.grad is not None for p in student.head.parameters())
    student.zero_grad(set_to_none=True)


def test_gkd_mixed_pair_needs_the_response_term_off(tmp_path, retina_models, teacher_r18_weights):
    """A Faster R-CNN teacher has no dense head: the GKD response term is a build-time error
    naming the fix; the global and feature terms alone work."""
    opts = ["DISTILL.HEADS", ["gkd"], "DISTILL.GKD.IN_FEATURES", ["p3", "p4", "p5", "p6"]]
    cfg = distill_cfg("bccd/distill_fitnet_FRCNN-R50_retinanet-R18.yaml", tmp_path, teacher_r18_weights, opts=opts)
    student, _ = retina_models
    teacher, teacher_cfg = build_teacher(cfg)
    assert type(teacher).__name__ == "GeneralizedRCNN"
    context = BuildContext(student, teacher, cfg, teacher_cfg)
    with pytest.raises(DistillConfigError, match=r"teacher \(GeneralizedRCNN\) has none.*RESPONSE_WEIGHT 0"):
        build_distill_heads(cfg, context)
    cfg.DISTILL.GKD.RESPONSE_WEIGHT = 0.0
    head = build_distill_heads(cfg, context)["gkd"]
    assert head.teacher_parts == {"backbone"} and not head.two_stage
