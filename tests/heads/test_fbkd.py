"""FBKD (docs/methods/fbkd.md): attention maps, masks and non-local blocks against numpy, head terms, build errors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from d2kd import get_distill_cfg
from d2kd.heads import DistillConfigError
from d2kd.heads.fbkd import FBKD, fbkd_channel_mask, fbkd_spatial_mask
from d2kd.modeling.attention import channel_attention, spatial_attention
from d2kd.heads.fbkd.non_local import NonLocalBlock

from conftest import backbone_records, empty_step, fake_fpn_context, np64, np_conv1x1, np_softmax_1d, random_features


# ---------------------------------------------------------------------------------------------
# Numpy references and head helpers
# ---------------------------------------------------------------------------------------------


def _conv3x3_single(x, w, b):
    """x (B, H, W), w (3, 3), zero padding 1, cross-correlation as torch."""
    bsz, h, wd = x.shape
    p = np.zeros((bsz, h + 2, wd + 2))
    p[:, 1:-1, 1:-1] = x
    out = np.full((bsz, h, wd), float(b))
    for i in range(3):
        for j in range(3):
            out += w[i, j] * p[:, i : i + h, j : j + wd]
    return out


def _maxpool(x, s):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // s, s, w // s, s).max(axis=(3, 5))


def _group_norm(x, groups, gamma, beta, eps=1e-5):
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    g = (g - g.mean(axis=2, keepdims=True)) / np.sqrt(g.var(axis=2, keepdims=True) + eps)
    return g.reshape(b, c, h, w) * gamma[None, :, None, None] + beta[None, :, None, None]


def _non_local_np(block, x):
    """Wang et al. 2018 embedded dot product (1/N_p), max-pooled phi/g, W_z (+GN), residual."""
    b, c, h, w = x.shape
    s = block.pool_stride
    theta = np_conv1x1(x, np64(block.theta.weight), np64(block.theta.bias)).reshape(b, -1, h * w)
    phi = _maxpool(np_conv1x1(x, np64(block.phi.weight), np64(block.phi.bias)), s).reshape(b, theta.shape[1], -1)
    g = _maxpool(np_conv1x1(x, np64(block.g.weight), np64(block.g.bias)), s).reshape(b, theta.shape[1], -1)
    affinity = np.einsum("bih,bip->bhp", theta, phi) / phi.shape[2]
    y = np.einsum("bhp,bip->bih", affinity, g).reshape(b, -1, h, w)
    if block.norm is None:
        z = np_conv1x1(y, np64(block.w_z.weight), np64(block.w_z.bias))
    else:
        z = np_conv1x1(y, np64(block.w_z.weight))
        z = _group_norm(z, block.norm.num_groups, np64(block.norm.weight), np64(block.norm.bias))
    return x + z


def _fbkd_cfg(**kw):
    cfg = get_distill_cfg()
    o = cfg.DISTILL.FBKD
    o.IN_FEATURES = ["p2", "p3"]
    o.NLD.INNER_CHANNELS = [2, 2]
    o.NLD.POOL_STRIDES = [2, 1]
    o.NLD.SCALE_INNER_CHANNELS = False
    for key, value in kw.items():
        node = o
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return cfg


def _activate_non_local(head, gen):
    """Give the (identity at init) non-local blocks non-trivial norm affine parameters."""
    for blocks in (head.student_non_local, head.teacher_non_local):
        for block in blocks.values():
            block.norm.weight.data = torch.rand(block.norm.weight.shape, generator=gen) + 0.5
            block.norm.bias.data = torch.randn(block.norm.bias.shape, generator=gen) * 0.1
            for conv in (block.theta, block.phi, block.g):
                conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * 0.5


# ---------------------------------------------------------------------------------------------
# Attention maps and masks: hand-computed golden values
# ---------------------------------------------------------------------------------------------

# One image, 2 channels, 2x2.
S_HAND = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]], [[3.0, 0.0], [-1.0, 0.0]]]])
T_HAND = torch.tensor([[[[0.0, 2.0], [2.0, -2.0]], [[-2.0, 0.0], [0.0, 2.0]]]])


def test_attention_maps_hand_values():
    # G^s = mean_c |A|: S -> [[2, .5], [.5, 1]]; T -> [[1, 1], [1, 2]].
    assert torch.allclose(spatial_attention(S_HAND), torch.tensor([[[2.0, 0.5], [0.5, 1.0]]]))
    assert torch.allclose(spatial_attention(T_HAND), torch.tensor([[[1.0, 1.0], [1.0, 2.0]]]))
    # G^c = mean_hw |A|: S -> [1, 1]; T -> [1.5, 1].
    assert torch.allclose(channel_attention(S_HAND), torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(channel_attention(T_HAND), torch.tensor([[1.5, 1.0]]))


def test_fbkd_masks_code_and_paper_form_hand_values():
    T = 0.5
    gs_s = [2.0, 0.5, 0.5, 1.0]
    gs_t = [1.0, 1.0, 1.0, 2.0]

    def hw_softmax(values):
        z = sum(math.exp(v / T) for v in values)
        return [4 * math.exp(v / T) / z for v in values]

    # Code form: average of the two separately softmaxed maps.
    code = [0.5 * (a + b) for a, b in zip(hw_softmax(gs_t), hw_softmax(gs_s))]
    # Paper form: one softmax of the summed maps: sums [3, 1.5, 1.5, 3].
    paper = hw_softmax([a + b for a, b in zip(gs_s, gs_t)])
    e3, e15 = math.exp(6), math.exp(3)
    assert paper[0] == pytest.approx(4 * e3 / (2 * e3 + 2 * e15))
    got_code = fbkd_spatial_mask(S_HAND, T_HAND, T, "code")
    got_paper = fbkd_spatial_mask(S_HAND, T_HAND, T, "paper")
    assert got_code.shape == (1, 2, 2)
    assert got_code.flatten().tolist() == pytest.approx(code, rel=1e-6)
    assert got_paper.flatten().tolist() == pytest.approx(paper, rel=1e-6)
    assert got_code.mean().item() == pytest.approx(1.0) and got_paper.mean().item() == pytest.approx(1.0)

    # Channel masks, C = 2: student [1, 1], teacher [1.5, 1].
    c_code_t = [2 * math.exp(3) / (math.exp(3) + math.exp(2)), 2 * math.exp(2) / (math.exp(3) + math.exp(2))]
    c_code = [0.5 * (c_code_t[0] + 1.0), 0.5 * (c_code_t[1] + 1.0)]
    c_paper = [2 * math.exp(5) / (math.exp(5) + math.exp(4)), 2 * math.exp(4) / (math.exp(5) + math.exp(4))]
    assert fbkd_channel_mask(S_HAND, T_HAND, T, "code").flatten().tolist() == pytest.approx(c_code, rel=1e-6)
    assert fbkd_channel_mask(S_HAND, T_HAND, T, "paper").flatten().tolist() == pytest.approx(c_paper, rel=1e-6)


def test_fbkd_masks_are_detached():
    s = S_HAND.clone().requires_grad_(True)
    for form in ("code", "paper"):
        assert not fbkd_spatial_mask(s, T_HAND, 0.5, form).requires_grad
        assert not fbkd_channel_mask(s, T_HAND, 0.5, form).requires_grad


# ---------------------------------------------------------------------------------------------
# Non-local block
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["GN", "BN", ""])
def test_non_local_block_is_identity_at_init(norm):
    torch.manual_seed(0)
    block = NonLocalBlock(8, 4, pool_stride=2, norm=norm)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(block(x), x)
    if norm:
        assert torch.count_nonzero(block.norm.weight) == 0


def test_non_local_block_golden_and_gn_groups():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64).float()
    plain = NonLocalBlock(6, 3, pool_stride=2, norm="")
    nn.init.normal_(plain.w_z.weight, generator=gen)
    nn.init.normal_(plain.w_z.bias, generator=gen)
    for conv in (plain.theta, plain.phi, plain.g):
        conv.weight.data = torch.randn(conv.weight.shape, generator=gen)
    np.testing.assert_allclose(np64(plain(x)), _non_local_np(plain, np64(x)), rtol=1e-4, atol=1e-5)

    gn = NonLocalBlock(6, 3, pool_stride=2, norm="GN")
    assert gn.norm.num_groups == 2  # gcd(32, 6)
    gn.norm.weight.data = torch.rand(6, generator=gen) + 0.5
    gn.norm.bias.data = torch.randn(6, generator=gen)
    np.testing.assert_allclose(np64(gn(x)), _non_local_np(gn, np64(x)), rtol=1e-4, atol=1e-4)
    assert NonLocalBlock(128, 32, norm="GN").norm.num_groups == 32
    # A map smaller than the pool stride pools to one cell instead of failing.
    assert NonLocalBlock(6, 3, pool_stride=8, norm="GN")(torch.randn(1, 6, 2, 3)).shape == (1, 6, 2, 3)


# ---------------------------------------------------------------------------------------------
# FBKD head: each term against numpy
# ---------------------------------------------------------------------------------------------


def _expected_code_level(head, name, s, t):
    w_am, w_c, w_s, w_nl = 7e-5, 4e-3, 4e-3, 7e-5
    tau = 0.5
    b, _, h, w = t.shape

    def hw_mask(x):
        g = np.abs(x).mean(axis=1).reshape(b, -1)
        return np.stack([h * w * np_softmax_1d(g[i] / tau) for i in range(b)]).reshape(b, h, w)

    ms = 0.5 * (hw_mask(t) + hw_mask(s))
    f = head.pairing.adapters[name].conv
    fs = np_conv1x1(s, np64(f.weight), np64(f.bias))
    am = w_am * np.sqrt(np.sum((t - fs) ** 2 * ms[:, None]))
    lin = head.channel_adapters[name]
    at_c = w_c * np.sqrt(np.sum((t.mean(axis=(2, 3)) - (s.mean(axis=(2, 3)) @ np64(lin.weight).T + np64(lin.bias))) ** 2))
    conv = head.spatial_adapters[name]
    gs = _conv3x3_single(s.mean(axis=1), np64(conv.weight)[0, 0], np64(conv.bias)[0])
    at_s = w_s * np.sqrt(np.sum((t.mean(axis=1) - gs) ** 2))
    h_conv = head.non_local_adapters[name].conv
    nl_s = np_conv1x1(_non_local_np(head.student_non_local[name], s), np64(h_conv.weight), np64(h_conv.bias))
    nl_t = _non_local_np(head.teacher_non_local[name], t)
    nld = w_nl * np.sqrt(np.sum((nl_s - nl_t) ** 2))
    return {"am": am, "at_c": at_c, "at_s": at_s, "nld": nld}


def test_fbkd_code_form_terms_golden_with_different_widths():
    gen = torch.Generator().manual_seed(0)
    head = FBKD(_fbkd_cfg(), fake_fpn_context(3, 4))
    _activate_non_local(head, gen)
    s, t = random_features(gen, 3), random_features(gen, 4)
    out = head(backbone_records(s), backbone_records(t), empty_step())
    assert set(out) == {f"{l}_{k}" for l in ("p2", "p3") for k in ("am", "at_c", "at_s", "nld")}
    for level in ("p2", "p3"):
        expected = _expected_code_level(head, level, np64(s[level]), np64(t[level]))
        for term, value in expected.items():
            assert out[f"{level}_{term}"].item() == pytest.approx(value, rel=1e-4), (level, term)
    # Non-local settings as configured (not scaled): C_i 2, strides 2 / 1.
    assert head.student_non_local["p2"].pool_stride == 2 and head.teacher_non_local["p3"].pool_stride == 1
    assert head.student_non_local["p2"].inner_channels == 2


def test_fbkd_code_form_channel_mask_option():
    gen = torch.Generator().manual_seed(3)
    head = FBKD(_fbkd_cfg(CHANNEL_MASK=True, AT__ENABLED=False, NLD__ENABLED=False), fake_fpn_context(3, 3))
    s, t = random_features(gen, 3), random_features(gen, 3)
    out = head(backbone_records(s), backbone_records(t), empty_step())
    assert set(out) == {"p2_am", "p3_am"}
    sn, tn = np64(s["p2"]), np64(t["p2"])
    b = sn.shape[0]

    def c_mask(x):
        g = np.abs(x).mean(axis=(2, 3))
        return np.stack([3 * np_softmax_1d(g[i] / 0.5) for i in range(b)])

    def s_mask(x):
        g = np.abs(x).mean(axis=1).reshape(b, -1)
        return np.stack([16 * np_softmax_1d(g[i] / 0.5) for i in range(b)]).reshape(b, 4, 4)

    mc = 0.5 * (c_mask(tn) + c_mask(sn))
    ms = 0.5 * (s_mask(tn) + s_mask(sn))
    f = head.pairing.adapters["p2"].conv
    diff2 = (tn - np_conv1x1(sn, np64(f.weight), np64(f.bias))) ** 2
    expected = 7e-5 * np.sqrt(np.sum(diff2 * ms[:, None] * mc[:, :, None, None]))
    assert out["p2_am"].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("distance", ["norm", "mse"])
def test_fbkd_paper_form_terms_golden(distance):
    gen = torch.Generator().manual_seed(2)
    cfg = _fbkd_cfg(FORM="paper", CHANNEL_MASK=True, PAPER_DISTANCE=distance, SPATIAL_TEMPERATURE=0.7, CHANNEL_TEMPERATURE=0.3)
    head = FBKD(cfg, fake_fpn_context(3, 3))
    assert not hasattr(head, "channel_adapters")  # the paper's AT has no adapters
    _activate_non_local(head, gen)
    s, t = random_features(gen, 3), random_features(gen, 3)
    out = head(backbone_records(s), backbone_records(t), empty_step())

    def dist(d):
        d = d.reshape(d.shape[0], -1)
        return np.linalg.norm(d, axis=1).mean() if distance == "norm" else np.mean(d**2)

    for level in ("p2", "p3"):
        sn, tn = np64(s[level]), np64(t[level])
        b, c, h, w = sn.shape
        gs = np.abs(sn).mean(axis=1).reshape(b, -1) + np.abs(tn).mean(axis=1).reshape(b, -1)
        gc = np.abs(sn).mean(axis=(2, 3)) + np.abs(tn).mean(axis=(2, 3))
        ms = np.stack([h * w * np_softmax_1d(gs[i] / 0.7) for i in range(b)]).reshape(b, h, w)
        mc = np.stack([c * np_softmax_1d(gc[i] / 0.3) for i in range(b)])
        f = head.pairing.adapters[level].conv
        diff2 = (tn - np_conv1x1(sn, np64(f.weight), np64(f.bias))) ** 2 * ms[:, None] * mc[:, :, None, None]
        am = 7e-5 * np.sqrt(diff2.reshape(b, -1).sum(axis=1)).mean()
        at_c = 4e-3 * dist(np.abs(sn).mean(axis=(2, 3)) - np.abs(tn).mean(axis=(2, 3)))
        at_s = 4e-3 * dist(np.abs(sn).mean(axis=1) - np.abs(tn).mean(axis=1))
        h_conv = head.non_local_adapters[level].conv
        nl_s = np_conv1x1(_non_local_np(head.student_non_local[level], sn), np64(h_conv.weight), np64(h_conv.bias))
        nld = 7e-5 * dist(nl_s - _non_local_np(head.teacher_non_local[level], tn))
        for term, value in {"am": am, "at_c": at_c, "at_s": at_s, "nld": nld}.items():
            assert out[f"{level}_{term}"].item() == pytest.approx(value, rel=1e-4), (level, term)


def test_fbkd_code_form_zero_for_a_perfect_student():
    """Identity adapters and identical features: every code-form term is 0 (and its gradient finite)."""
    head = FBKD(_fbkd_cfg(NLD__ENABLED=False), fake_fpn_context(2, 2))
    for adapter in head.pairing.adapters.values():
        adapter.conv.weight.data = torch.eye(2)[:, :, None, None]
        adapter.conv.bias.data.zero_()
    for lin in head.channel_adapters.values():
        lin.weight.data, lin.bias.data = torch.eye(2), torch.zeros(2)
    for conv in head.spatial_adapters.values():
        conv.weight.data.zero_()
        conv.weight.data[0, 0, 1, 1] = 1.0
        conv.bias.data.zero_()
    gen = torch.Generator().manual_seed(4)
    s = {k: v.requires_grad_(True) for k, v in random_features(gen, 2).items()}
    t = {k: v.detach().clone() for k, v in s.items()}
    out = head(backbone_records(s), backbone_records(t), empty_step())
    assert all(abs(v.item()) < 1e-6 for v in out.values())
    sum(out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_fbkd_no_gradient_to_teacher_but_nl_t_trains():
    gen = torch.Generator().manual_seed(5)
    head = FBKD(_fbkd_cfg(), fake_fpn_context(3, 3))  # non-local blocks at their identity init
    s = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}
    t = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}  # as if not detached
    out = head(backbone_records(s), backbone_records(t), empty_step())
    sum(out.values()).backward()
    assert all(v.grad is None for v in t.values()), "a gradient reached the teacher's features"
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in s.values())
    for name, p in head.named_parameters():
        assert p.grad is not None, f"{name} is registered but unused"
    for blocks in (head.teacher_non_local, head.student_non_local):
        for block in blocks.values():
            # gamma = 0 at start: only the zero-initialised norm gets a gradient from L_NLD.
            assert block.norm.weight.grad.abs().sum() > 0


def test_fbkd_paper_form_attention_gradient_matches_direct_formula():
    """The paper-form L_AT reaches the student through its |S| attention maps (computed once
    per level and shared with the detached masks): the gradient equals autograd of a direct
    formula; the masks and the teacher get none."""
    gen = torch.Generator().manual_seed(7)
    cfg = _fbkd_cfg(FORM="paper", CHANNEL_MASK=True, PAPER_DISTANCE="mse", AM__ENABLED=False, NLD__ENABLED=False)
    head = FBKD(cfg, fake_fpn_context(3, 3))
    s, t = random_features(gen, 3), random_features(gen, 3)
    s_head = {k: v.clone().requires_grad_(True) for k, v in s.items()}
    t_head = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out = head(backbone_records(s_head), backbone_records(t_head), empty_step())
    assert set(out) == {f"{lv}_{term}" for lv in ("p2", "p3") for term in ("at_c", "at_s")}
    sum(out.values()).backward()
    for level in ("p2", "p3"):
        x = s[level].clone().requires_grad_(True)
        y = t[level]
        direct = 4e-3 * ((x.abs().mean(dim=(2, 3)) - y.abs().mean(dim=(2, 3))) ** 2).mean()
        direct = direct + 4e-3 * ((x.abs().mean(dim=1) - y.abs().mean(dim=1)) ** 2).mean()
        (expected,) = torch.autograd.grad(direct, x)
        assert torch.allclose(s_head[level].grad, expected, rtol=1e-4, atol=1e-9), level
        assert t_head[level].grad is None


@pytest.mark.parametrize(
    "switches, terms, modules",
    [
        ({"NLD__ENABLED": False}, {"am", "at_c", "at_s"}, {"pairing", "channel_adapters", "spatial_adapters"}),
        ({"AT__ENABLED": False, "AM__ENABLED": False}, {"nld"}, {"student_non_local", "teacher_non_local", "non_local_adapters"}),
    ],
    ids=["agd_only", "nld_only"],
)
def test_fbkd_ablations_build_only_what_they_use(switches, terms, modules):
    gen = torch.Generator().manual_seed(6)
    head = FBKD(_fbkd_cfg(**switches), fake_fpn_context(3, 4))
    built = {n for n, m in head.named_children() if len(list(m.parameters()))}
    assert built == modules
    out = head(backbone_records(random_features(gen, 3)), backbone_records(random_features(gen, 4)), empty_step())
    assert {k.split("_", 1)[1] for k in out} == terms
    sum(out.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_fbkd_inner_channels_scale_with_fpn_width():
    cfg = get_distill_cfg()
    cfg.DISTILL.FBKD.IN_FEATURES = ["p2", "p3"]
    head = FBKD(cfg, fake_fpn_context(128, 128))
    # Official (64, 8) at P2 and (64, 4) at P3 for 256 channels; 128 channels -> C_i 32.
    assert [(b.inner_channels, b.pool_stride) for b in head.student_non_local.values()] == [(32, 8), (32, 4)]
    cfg.DISTILL.FBKD.NLD.SCALE_INNER_CHANNELS = False
    head = FBKD(cfg, fake_fpn_context(128, 256))
    assert head.student_non_local["p2"].inner_channels == 64 and head.teacher_non_local["p3"].inner_channels == 64


@pytest.mark.parametrize(
    "opts, channels, match",
    [
        ({"FORM": "official"}, (3, 3), "FORM must be one of"),
        ({"AT__ENABLED": False, "AM__ENABLED": False, "NLD__ENABLED": False}, (3, 3), "all disabled"),
        ({"NLD__POOL_STRIDES": [8, 4, 2]}, (3, 3), "POOL_STRIDES has 3 entries but IN_FEATURES has 2"),
        ({"NLD__NORM": "FrozenBN"}, (3, 3), "NLD.NORM must be one of"),
        ({"SPATIAL_TEMPERATURE": 0.0}, (3, 3), "SPATIAL_TEMPERATURE must be > 0"),
        ({"PAPER_DISTANCE": "l1"}, (3, 3), "PAPER_DISTANCE"),
        ({"FORM": "paper"}, (3, 4), "channels differ.*paper-form L_AT"),
        ({"CHANNEL_MASK": True}, (3, 4), "channels differ.*CHANNEL_MASK"),
    ],
)
def test_fbkd_bad_config_raises_at_build(opts, channels, match):
    with pytest.raises(DistillConfigError, match=match):
        FBKD(_fbkd_cfg(**opts), fake_fpn_context(*channels))
