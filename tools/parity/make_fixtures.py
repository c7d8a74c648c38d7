#!/usr/bin/env python
"""
Parity fixtures: run the official / reference loss code on small seeded inputs and write the
values to ``tests/fixtures/parity/<method>.json`` (tests/heads/test_parity.py compares d2kd's
terms to them).

Nothing of the reference repositories is in d2kd. This script reads their files from local
git snapshots that whoever runs it fetched (a clone or a bare mirror; pass its git directory),
compiles only the loss functions it needs (``tools/parity/extract.py``: decorators dropped,
mmcv helpers replaced by small PyTorch stubs, ``.cuda()`` made a no-op while it runs) and
records, for every value, the repository, commit, file and function it came from, the inputs
(small nested lists) and the options.

Usage (every snapshot optional; a method whose snapshot is not given is skipped)::

    git clone https://github.com/open-mmlab/mmrazor /tmp/ref/mmrazor   # etc.
    python tools/parity/make_fixtures.py \
        --mmrazor /tmp/ref/mmrazor/.git --mdistiller /tmp/ref/mdistiller/.git \
        --fgd /tmp/ref/FGD/.git --defeat /tmp/ref/DeFeat.pytorch/.git \
        --fgfi /tmp/ref/Distilling-Object-Detectors/.git --gkd /tmp/ref/DAVAR-Lab-ML/.git \
        --mgd /tmp/ref/MGD/.git --mmcv /tmp/ref/mmcv/.git

Repositories: open-mmlab/mmrazor (KD's KLDivergence, CWD, FBKD, PKD, MGD), open-mmlab/mmcv (NonLocal2d,
the block under mmrazor's FBKD connectors: FBKD's non-local cases, only when given), megvii-research/mdistiller
(KD), yzd-v/FGD, ggjy/DeFeat.pytorch, twangnh/Distilling-Object-Detectors (FGFI),
hikvision-research/DAVAR-Lab-ML (Global Knowledge, folder
ECCV22_Distilling_Object_Detectors_with_Global_Knowledge), yzd-v/MGD (MGD's det FeatureLoss).
"""

import argparse
import contextlib
from abc import ABCMeta
import copy
import json
import os
import sys
import typing
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract import git_head, git_show, load_defs, load_statements  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity")

GKD_DIR = "ECCV22_Distilling_Object_Detectors_with_Global_Knowledge/ObjectPerceptron/mmdetection/third_party/kd/mmdet"


# ------------------------------------------------------------------------------------ helpers
def rnd(gen, *shape, scale=1.0, decimals=3):
    """Seeded normal values rounded to ``decimals``, as nested lists (short JSON, exact float32 rebuild)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return np.round(x.numpy(), decimals).tolist()


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def val(x):
    """A scalar tensor (or number) as a float; a tensor as nested lists."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float()
        return float(x.reshape(-1)[0]) if x.numel() == 1 and x.dim() <= 1 else x.tolist()
    return float(x)


@contextlib.contextmanager
def cpu_cuda():
    """``Tensor.cuda()`` returns the tensor itself while the reference code runs on the CPU."""
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def constant_init(module, val, bias=0):
    """Stand-in for mmcv.cnn.constant_init."""
    if getattr(module, "weight", None) is not None:
        nn.init.constant_(module.weight, val)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def kaiming_init(module, a=0, mode="fan_out", nonlinearity="relu", bias=0, distribution="normal"):
    """Stand-in for mmcv.cnn.kaiming_init."""
    if distribution == "uniform":
        nn.init.kaiming_uniform_(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    else:
        nn.init.kaiming_normal_(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def normal_init(module, mean=0, std=1, bias=0):
    """Stand-in for mmengine.model.normal_init."""
    if getattr(module, "weight", None) is not None:
        nn.init.normal_(module.weight, mean, std)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


class _ConvModule(nn.Module):
    """
    Stand-in for mmcv.cnn.ConvModule as mmcv's non-local block builds it: ``conv [-> BN] [-> ReLU]``,
    ``bias="auto"`` (a bias only without a norm), the BN under mmcv's name ``bn`` (``.norm`` returns it).
    Only ``Conv2d`` and ``BN`` configs, the ones FBKD's connectors use.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias="auto",
                 conv_cfg=None, norm_cfg=None, act_cfg=dict(type="ReLU")):
        super().__init__()
        if conv_cfg not in (None, {"type": "Conv2d"}) or norm_cfg not in (None, {"type": "BN"}):
            raise NotImplementedError(f"stand-in ConvModule: conv_cfg {conv_cfg}, norm_cfg {norm_cfg}")
        self.norm_cfg = norm_cfg
        self.with_norm = norm_cfg is not None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              bias=(not self.with_norm) if bias == "auto" else bias)
        if self.with_norm:
            self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU() if act_cfg is not None else None

    @property
    def norm(self):
        return self.bn if self.with_norm else None

    def forward(self, x):
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


def base_ns(**extra):
    ns = {"torch": torch, "nn": nn, "F": F, "np": np, "copy": copy, "OrderedDict": OrderedDict, "dist": dist}
    ns.update({k: getattr(typing, k) for k in ("Any", "Dict", "List", "Optional", "Sequence", "Tuple", "Union")})
    ns.update(extra)
    return ns


class Cfg(dict):
    """An mmcv-Config-like dict: attribute access and ``.get``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def source(repos, key, path, functions):
    git_dir, name = repos[key]
    return {"repo": name, "commit": git_head(git_dir), "file": path, "functions": list(functions)}


def write(method, payload):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{method}.json")
    payload = {"method": method, "generated_by": "tools/parity/make_fixtures.py", "torch": torch.__version__, **payload}
    blobs = []

    def compact(obj):  # numeric (nested) lists on one line each, the rest indented
        if isinstance(obj, dict):
            return {k: compact(v) for k, v in obj.items()}
        if isinstance(obj, list) and obj and all(isinstance(x, (int, float, list)) for x in obj):
            blobs.append(json.dumps(obj, separators=(",", ":")))
            return f"@@{len(blobs) - 1}@@"
        if isinstance(obj, list):
            return [compact(x) for x in obj]
        return obj

    text = json.dumps(compact(payload), indent=1)
    for i, blob in enumerate(blobs):
        text = text.replace(f'"@@{i}@@"', blob, 1)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.relpath(path, ROOT)}: {len(payload['cases'])} cases")


def state_lists(module, prefix):
    return {k: v.detach().tolist() for k, v in module.state_dict().items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ KD
def make_kd(repos):
    cases, sources = [], []
    gen = torch.Generator().manual_seed(100)
    if "mmrazor" in repos:
        path = "mmrazor/models/losses/kl_divergence.py"
        ns = load_defs(git_show(repos["mmrazor"][0], path), ["KLDivergence"], base_ns(), path)
        sources.append(source(repos, "mmrazor", path, ["KLDivergence.forward"]))
        for tau in (1.0, 4.0):
            s, t = rnd(gen, 6, 5, scale=2.0), rnd(gen, 6, 5, scale=2.0)
            loss = ns["KLDivergence"](tau=tau, reduction="batchmean", loss_weight=1.0)(t32(s), t32(t))
            cases.append({
                "name": f"mmrazor_batchmean_tau{tau:g}", "source": len(sources) - 1,
                "options": {"tau": tau, "reduction": "batchmean", "loss_weight": 1.0},
                "inputs": {"student_logits": s, "teacher_logits": t},
                "outputs": {"loss": val(loss)},
            })
    if "mdistiller" in repos:
        path = "mdistiller/distillers/KD.py"
        ns = load_defs(git_show(repos["mdistiller"][0], path), ["kd_loss"], base_ns(), path)
        sources.append(source(repos, "mdistiller", path, ["kd_loss"]))
        for tau in (1.0, 4.0):
            s, t = rnd(gen, 6, 5, scale=2.0), rnd(gen, 6, 5, scale=2.0)
            loss = ns["kd_loss"](t32(s), t32(t), tau)
            cases.append({
                "name": f"mdistiller_kd_loss_T{tau:g}", "source": len(sources) - 1,
                "options": {"temperature": tau},
                "inputs": {"student_logits": s, "teacher_logits": t},
                "outputs": {"loss": val(loss)},
            })
    if cases:
        write("kd", {"sources": sources, "cases": cases})


# ------------------------------------------------------------------------------------ CWD
def make_cwd(repos):
    path = "mmrazor/models/losses/cwd.py"
    ns = load_defs(git_show(repos["mmrazor"][0], path), ["ChannelWiseDivergence"], base_ns(), path)
    sources = [source(repos, "mmrazor", path, ["ChannelWiseDivergence.forward"])]
    gen = torch.Generator().manual_seed(200)
    cases = []
    for tau, weight in ((1.0, 10.0), (4.0, 3.0)):
        s, t = rnd(gen, 2, 4, 6, 6, scale=2.0), rnd(gen, 2, 4, 6, 6, scale=2.0)
        loss = ns["ChannelWiseDivergence"](tau=tau, loss_weight=weight)(t32(s), t32(t))
        cases.append({
            "name": f"tau{tau:g}_w{weight:g}", "source": 0, "options": {"tau": tau, "loss_weight": weight},
            "inputs": {"student": s, "teacher": t}, "outputs": {"loss": val(loss)},
        })
    write("cwd", {"sources": sources, "cases": cases})


# ------------------------------------------------------------------------------------ FGD
FGD_WEIGHTS = {"alpha_fgd": 5e-5, "beta_fgd": 2.5e-5, "gamma_fgd": 5e-5, "lambda_fgd": 5e-7}


def make_fgd(repos):
    path = "mmdet/distillation/losses/fgd.py"
    ns = load_defs(
        git_show(repos["fgd"][0], path), ["FeatureLoss"],
        base_ns(constant_init=constant_init, kaiming_init=kaiming_init), path,
    )
    sources = [source(repos, "fgd", path, ["FeatureLoss.forward", "get_attention", "get_fea_loss", "get_mask_loss",
                                           "spatial_pool", "get_rela_loss"])]
    FeatureLoss = ns["FeatureLoss"]
    gen = torch.Generator().manual_seed(300)
    stride, n, c, h, w = 4, 2, 4, 6, 6
    # Box corners chosen so that no scaled coordinate is an integer (floor/ceil stay unambiguous).
    boxes = [[[2.5, 3.3, 13.7, 11.2], [8.6, 6.4, 21.3, 20.9]], [[1.1, 1.7, 9.3, 7.5]]]
    cases = []
    for mode, img_shapes in (("stride", [(24, 24), (24, 24)]), ("image_shape", [(21, 22), (23, 18)])):
        s, t = rnd(gen, n, c, h, w, scale=1.5), rnd(gen, n, c, h, w, scale=1.5)
        torch.manual_seed(301)
        module = FeatureLoss(c, c, "p2", temp=0.5, **FGD_WEIGHTS)
        g = torch.Generator().manual_seed(302)
        with torch.no_grad():
            for p in module.parameters():  # trained-looking global context blocks
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float() * 0.3)
        metas = [{"img_shape": (ih, iw, 3)} for ih, iw in img_shapes]
        gt = [t32(b) for b in boxes]
        raw = {}
        for term, key in (("fg", "alpha_fgd"), ("bg", "beta_fgd"), ("at", "gamma_fgd"), ("glb", "lambda_fgd")):
            for k in FGD_WEIGHTS:
                setattr(module, k, 1.0 if k == key else 0.0)
            raw[term] = val(module(t32(s), t32(t), gt, metas))
        for k, v in FGD_WEIGHTS.items():
            setattr(module, k, v)
        total = val(module(t32(s), t32(t), gt, metas))
        cases.append({
            "name": f"box_scale_{mode}", "source": 0,
            "options": {"temp": 0.5, **FGD_WEIGHTS, "stride": stride, "d2kd_box_scale": mode,
                        "padded_image_hw": [h * stride, w * stride]},
            "inputs": {"student": s, "teacher": t, "gt_bboxes": boxes, "img_shape_hw": [list(x) for x in img_shapes],
                       "gc_state": state_lists(module, "")},
            "outputs": {**{f"raw_{k}": v for k, v in raw.items()}, "weighted_total": total},
        })
    write("fgd", {"sources": sources, "cases": cases,
                  "note": "img_shape = the padded size in the 'stride' case, where the official scaling "
                          "x / W_img * W_feat equals d2kd's x / stride; the unpadded size in the 'image_shape' case."})


# ------------------------------------------------------------------------------------ FBKD
def make_fbkd(repos):
    loss_path = "mmrazor/models/losses/fbkd_loss.py"
    conn_path = "mmrazor/models/architectures/connectors/fbkd_connector.py"
    git_dir = repos["mmrazor"][0]
    ns = load_defs(git_show(git_dir, loss_path), ["mask_l2_loss", "FBKDLoss.forward"], base_ns(), loss_path)
    conn_src = git_show(git_dir, conn_path)
    # Both connectors define forward_train: compile them one at a time.
    s_fn = load_defs(conn_src, ["FBKDStudentConnector.forward_train"], base_ns(), conn_path)["forward_train"]
    t_fn = load_defs(conn_src, ["FBKDTeacherConnector.forward_train"], base_ns(), conn_path)["forward_train"]
    sources = [source(repos, "mmrazor", conn_path, ["FBKDStudentConnector.forward_train",
                                                     "FBKDTeacherConnector.forward_train"]),
               source(repos, "mmrazor", loss_path, ["FBKDLoss.forward", "mask_l2_loss"])]
    gen = torch.Generator().manual_seed(400)
    n, c, h, w = 2, 4, 6, 6
    cases = []
    for temp in (0.5, 1.0):
        s, t = rnd(gen, n, c, h, w, scale=1.5), rnd(gen, n, c, h, w, scale=1.5)
        adapt = {"adapt_w": rnd(gen, c, c, 1, 1, scale=0.5), "adapt_b": rnd(gen, c, scale=0.1),
                 "channel_w": rnd(gen, c, c, scale=0.5), "channel_b": rnd(gen, c, scale=0.1),
                 "spatial_w": rnd(gen, 1, 1, 3, 3, scale=0.5), "spatial_b": rnd(gen, 1, scale=0.1)}
        lin = nn.Linear(c, c)
        sconv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            lin.weight.copy_(t32(adapt["channel_w"]))
            lin.bias.copy_(t32(adapt["channel_b"]))
            sconv.weight.copy_(t32(adapt["spatial_w"]))
            sconv.bias.copy_(t32(adapt["spatial_b"]))
        zero_relation = lambda x: x * 0.0  # noqa: E731  (the non-local part is not compared)
        s_self = SimpleNamespace(
            spatial_T=temp, channel_T=temp, in_channels=c,
            adaptation_layers=lambda x: F.conv2d(x, t32(adapt["adapt_w"]), t32(adapt["adapt_b"])),
            channel_wise_adaptation=lin, spatial_wise_adaptation=sconv,
            student_non_local=zero_relation, non_local_adaptation=lambda x: x,
        )
        t_self = SimpleNamespace(spatial_T=temp, channel_T=temp, in_channels=c, teacher_non_local=zero_relation)
        with torch.no_grad():
            s_out = s_fn(s_self, t32(s))
            t_out = t_fn(t_self, t32(t))
            raw = {}
            for term, weights in (("am", (1, 0, 0, 0)), ("at_c", (0, 1, 0, 0)), ("at_s", (0, 0, 1, 0))):
                loss_self = SimpleNamespace(mask_l2_weight=weights[0], channel_weight=weights[1],
                                            spatial_weight=weights[2], nonloacl_weight=weights[3], loss_weight=1.0)
                raw[term] = val(ns["forward"](loss_self, s_out, t_out))
        spatial_mask = ((t_out[0] + s_out[0]) / 2)[:, 0]
        channel_mask = ((t_out[1] + s_out[1]) / 2)[:, :, 0, 0]
        cases.append({
            "name": f"code_form_T{temp:g}", "source": 1,
            "options": {"spatial_T": temp, "channel_T": temp, "form": "code", "nonlocal": "not compared (zeroed)"},
            "inputs": {"student": s, "teacher": t, **adapt},
            "outputs": {"spatial_mask": val(spatial_mask), "channel_mask": val(channel_mask),
                        "raw_am": raw["am"], "raw_at_c": raw["at_c"], "raw_at_s": raw["at_s"]},
        })
    note = None
    if "mmcv" in repos:
        _fbkd_non_local_cases(repos, ns["forward"], conn_src, conn_path, sources, cases)
        note = ("Non-local cases: mmrazor's connectors (their own __init__ and forward_train) on mmcv's NonLocal2d "
                "(mode 'dot_product', sub_sample, BN after conv_out). NonLocal2d(sub_sample=True) already wraps g "
                "and phi in MaxPool2d(2) and NonLocal2dMaxpoolNstride wraps them again in MaxPool2d(maxpool_stride), "
                "so keys and values are max-pooled by 2 * maxpool_stride ('effective_pool_stride', checked when "
                "the fixture is made). States use the reference modules' state_dict keys.")
    else:
        print("fbkd: no --mmcv snapshot, the non-local cases are left out")
    write("fbkd", {"sources": sources, "cases": cases, **({"note": note} if note else {})})


def _fbkd_non_local_state(gen, module):
    """Seeded, rounded values for every float tensor of ``module``'s state (BN: weight ~ 1, var > 0), loaded."""
    state = {}
    for key, p in module.state_dict().items():
        if not p.is_floating_point():
            continue
        leaf = key.rsplit(".", 1)[-1]
        if ".bn." in key and leaf == "weight":
            x = (1.0 + np.asarray(rnd(gen, *p.shape, scale=0.2))).round(3)
        elif leaf == "running_var":
            x = (0.5 + np.abs(np.asarray(rnd(gen, *p.shape, scale=0.5)))).round(3)
        else:
            scale = {"weight": 0.5, "bias": 0.1, "running_mean": 0.3}[leaf]
            x = np.asarray(rnd(gen, *p.shape, scale=scale))
        state[key] = x.tolist()
    missing, unexpected = module.load_state_dict({k: t32(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return state


def _fbkd_non_local_cases(repos, loss_forward, conn_src, conn_path, sources, cases):
    """FBKD's non-local term: mmrazor's connectors with mmcv's NonLocal2d, seeded weights (not zero-initialised)."""
    nl_path = "mmcv/cnn/bricks/non_local.py"
    nl_ns = load_defs(
        git_show(repos["mmcv"][0], nl_path), ["_NonLocalNd", "NonLocal2d"],
        base_ns(ABCMeta=ABCMeta, ConvModule=_ConvModule, normal_init=normal_init, constant_init=constant_init),
        nl_path,
    )
    cns = load_defs(conn_src, ["NonLocal2dMaxpoolNstride", "FBKDStudentConnector", "FBKDTeacherConnector"],
                    base_ns(NonLocal2d=nl_ns["NonLocal2d"], BaseConnector=_BaseConnector), conn_path)
    conn_index = len(sources)
    sources += [source(repos, "mmrazor", conn_path,
                       ["NonLocal2dMaxpoolNstride.__init__", "FBKDStudentConnector.__init__",
                        "FBKDStudentConnector.forward_train", "FBKDTeacherConnector.__init__",
                        "FBKDTeacherConnector.forward_train"]),
                source(repos, "mmcv", nl_path, ["_NonLocalNd.__init__", "_NonLocalNd.init_weights",
                                                "_NonLocalNd.dot_product", "_NonLocalNd.forward",
                                                "NonLocal2d.__init__"])]
    gen = torch.Generator().manual_seed(410)
    n = 2
    # (name, in_channels, reduction, maxpool_stride, (h, w), BN mode)
    settings = (("nonlocal_c4_r2_pool2_train", 4, 2, 2, (8, 8), "train"),
                ("nonlocal_c8_r4_pool4_train", 8, 4, 4, (17, 16), "train"),
                ("nonlocal_c8_r4_pool2_eval", 8, 4, 2, (9, 10), "eval"))
    for name, c, reduction, mp, (h, w), bn_mode in settings:
        s, te = rnd(gen, n, c, h, w, scale=1.5), rnd(gen, n, c, h, w, scale=1.5)
        kwargs = dict(in_channels=c, reduction=reduction, mode="dot_product", sub_sample=True, maxpool_stride=mp)
        torch.manual_seed(411)  # the connectors' other layers (not part of the non-local term)
        s_conn = cns["FBKDStudentConnector"](**kwargs)
        t_conn = cns["FBKDTeacherConnector"](**kwargs)
        s_state = _fbkd_non_local_state(gen, s_conn.student_non_local)
        t_state = _fbkd_non_local_state(gen, t_conn.teacher_non_local)
        adapt = {"non_local_adapt_w": rnd(gen, c, c, 1, 1, scale=0.5), "non_local_adapt_b": rnd(gen, c, scale=0.1)}
        with torch.no_grad():
            s_conn.non_local_adaptation.weight.copy_(t32(adapt["non_local_adapt_w"]))
            s_conn.non_local_adaptation.bias.copy_(t32(adapt["non_local_adapt_b"]))
        # float64: the maps sum many products (float32 rounding would be ~1e-6 of their scale); the code is
        # dtype-agnostic, and the test runs d2kd's blocks in float64 too.
        s_conn.double().train(bn_mode == "train")
        t_conn.double().train(bn_mode == "train")
        block = s_conn.student_non_local
        inter = block.inter_channels
        x = t32(s).double()
        with torch.no_grad():
            # The keys / values are pooled twice (2, then maxpool_stride): one max-pool of 2 * maxpool_stride.
            conv_g = block.g[0][0]
            assert torch.equal(block.g(x), F.max_pool2d(conv_g(x), 2 * mp)), "pooling is not 2 * maxpool_stride"
            pooled_hw = list(block.g(x).shape[-2:])
            s_relation = block(x)  # train mode: batch statistics (the running ones are updated, not used)
            s_out = s_conn(x)
            t_out = t_conn(t32(te).double())
            loss_self = SimpleNamespace(mask_l2_weight=0, channel_weight=0, spatial_weight=0, nonloacl_weight=1,
                                        loss_weight=1.0)
            raw_nld = loss_forward(loss_self, s_out, t_out)
        assert block.mode == "dot_product" and block.sub_sample and inter == max(c // reduction, 1)
        cases.append({
            "name": name, "term": "nonlocal", "source": conn_index, "extra_sources": [conn_index + 1, 1],
            "options": {"in_channels": c, "reduction": reduction, "inter_channels": inter, "mode": "dot_product",
                        "sub_sample": True, "maxpool_stride": mp, "effective_pool_stride": 2 * mp,
                        "pooled_hw": pooled_hw, "norm_cfg": "BN", "bn_mode": bn_mode, "zeros_init": True,
                        "dtype": "float64",
                        "weights": "seeded (replace the zero / N(0, 0.01) init)"},
            "inputs": {"student": s, "teacher": te, "student_non_local_state": s_state,
                       "teacher_non_local_state": t_state, **adapt},
            "outputs": {"student_relation": val(s_relation), "student_relation_adapt": val(s_out[4]),
                        "teacher_relation": val(t_out[3]), "raw_nld": val(raw_nld)},
        })


# ------------------------------------------------------------------------------------ DeFeat
def make_defeat(repos):
    train_path = "mmdet/apis/train.py"
    head_path = "mmdet/models/dense_heads/anchor_head.py"
    git_dir = repos["defeat"][0]
    ns = load_defs(git_show(git_dir, train_path), ["KLDivergenceLoss", "BCELoss", "parse_losses", "batch_processor_kd"],
                   base_ns(), train_path)
    hns = load_defs(git_show(git_dir, head_path), ["AnchorHead._map_roi_levels", "AnchorHead.get_gt_mask"],
                    base_ns(), head_path)
    sources = [source(repos, "defeat", train_path, ["batch_processor_kd", "KLDivergenceLoss", "parse_losses"]),
               source(repos, "defeat", head_path, ["AnchorHead.get_gt_mask", "AnchorHead._map_roi_levels"])]
    strides = [4, 8, 16, 32, 64]
    img_h, img_w = 128, 96
    n, c = 2, 2
    rpn = SimpleNamespace(anchor_generator=SimpleNamespace(strides=strides))
    rpn._map_roi_levels = lambda rois, num: hns["_map_roi_levels"](rpn, rois, num)
    kd_cfg = Cfg(type="SampleSTU,neck,neck-decouple,mask-neck-gt,pixel-wise,head-cls,KL-decouple",
                 hint_neck_w=3, hint_neck_back_w=12, head_cls_w=2, head_cls_back_w=2, head_cls_T=1)
    box_sets = {
        # P2 (< 112 px), P3 (112-224 px), a box whose window is empty (its top-left cell only).
        "levels": [[[10.3, 12.7, 50.2, 60.9], [2.2, 4.7, 94.9, 127.3], [33.2, 33.1, 35.0, 35.4]],
                   [[60.2, 30.8, 75.9, 41.3], [3.1, 40.6, 90.4, 126.3]]],
        "second_draw": [[[20.3, 22.1, 40.7, 50.2], [50.6, 70.2, 95.1, 126.8]], []],
    }
    gen = torch.Generator().manual_seed(500)
    cases = []
    for name, boxes in box_sets.items():
        student = [rnd(gen, n, c, img_h // s, img_w // s, decimals=2) for s in strides]
        teacher = [rnd(gen, n, c, img_h // s, img_w // s, decimals=2) for s in strides]
        labels = [0, 2, 3, 1, 3, 3, 0, 3]  # 3 = background (K = 3 classes)
        s_logits, t_logits = rnd(gen, len(labels), 4, scale=2.0), rnd(gen, len(labels), 4, scale=2.0)
        gt = [t32(b).reshape(-1, 4) for b in boxes]
        s_feats = tuple(t32(x) for x in student)
        t_feats = tuple(t32(x) for x in teacher)

        def model(**kw):
            masks = hns["get_gt_mask"](rpn, list(s_feats), None, gt)
            head = {"neck": s_feats, "backbone": None, "cls_score": t32(s_logits), "bbox_pred": None,
                    "bbox_targets": (torch.tensor(labels),), "sampling": None}
            return {}, head, {"neck_mask_batch": masks, "bb_mask_batch": None}, None, None

        def model_t(**kw):
            head = {"neck": t_feats, "backbone": None, "cls_score": t32(t_logits), "bbox_pred": None}
            return {}, head, {}, None, None

        with cpu_cuda(), torch.no_grad():
            out = ns["batch_processor_kd"](model, model_t, {"img": SimpleNamespace(data=[0, 0])}, True, kd_cfg=kd_cfg)
            masks = hns["get_gt_mask"](rpn, list(s_feats), None, gt)
            levels = [hns["_map_roi_levels"](rpn, b, len(strides)).tolist() for b in gt]
        logs = out["log_vars"]
        cases.append({
            "name": name, "source": 0,
            "options": {**{k: v for k, v in kd_cfg.items()}, "strides": strides, "image_hw": [img_h, img_w],
                        "adapter": "none (identity)", "num_classes": 3},
            "inputs": {"student": student, "teacher": teacher, "gt_bboxes": boxes, "roi_labels": labels,
                       "student_logits": s_logits, "teacher_logits": t_logits},
            "outputs": {"losskd_neck": logs["losskd_neck"], "losskd_neck_back": logs["losskd_neck_back"],
                        "losskd_hcls": logs["losskd_hcls"], "losskd_hcls_back": logs["losskd_hcls_back"],
                        "neck_masks": [m.float().tolist() for m in masks], "box_levels": levels},
        })
    # The box-to-level rule alone, near its thresholds: the code's sqrt((w + 1)(h + 1)) against
    # d2kd's sqrt(w h) (111 x 111 px: P3 in the code, P2 in d2kd).
    level_boxes = [[0.0, 0.0, 50.0, 60.0], [0.0, 0.0, 111.0, 111.0], [10.0, 10.0, 121.5, 121.5],
                   [0.0, 0.0, 223.0, 223.0], [0.0, 0.0, 230.0, 230.0], [5.0, 5.0, 500.0, 400.0],
                   [0.0, 0.0, 900.0, 900.0]]
    levels = hns["_map_roi_levels"](rpn, t32(level_boxes), len(strides)).tolist()
    cases.append({"name": "box_levels", "source": 1, "options": {"num_levels": len(strides)},
                  "inputs": {"boxes": level_boxes}, "outputs": {"levels_from_p2": levels}})
    write("defeat", {"sources": sources, "cases": cases})


# ------------------------------------------------------------------------------------ FGFI
def make_fgfi(repos):
    ov_path = "lib/model/rpn/bbox_transform.py"
    at_path = "lib/model/rpn/anchor_target_layer.py"
    git_dir = repos["fgfi"][0]
    ns = load_defs(git_show(git_dir, ov_path), ["bbox_overlaps_batch"], base_ns(), ov_path)
    mask_code = load_statements(git_show(git_dir, at_path), "_AnchorTargetLayer", "forward", "mask_batch", 2, at_path)
    sources = [source(repos, "fgfi", at_path, ["_AnchorTargetLayer.forward (imitation mask statements)"]),
               source(repos, "fgfi", ov_path, ["bbox_overlaps_batch"])]
    stride, h, w = 16, 8, 10
    sizes = [32.0, 64.0, 128.0]
    ratios = [0.5, 1.0, 2.0]
    base = []
    for r in ratios:  # Detectron2's DefaultAnchorGenerator cell anchors, (h, w, a) order
        for size in sizes:
            aw = (size * size / r) ** 0.5
            ah = aw * r
            base.append([-aw / 2, -ah / 2, aw / 2, ah / 2])
    base = torch.tensor(base, dtype=torch.float32)
    ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
    shifts = torch.stack([xs.flatten(), ys.flatten(), xs.flatten(), ys.flatten()], dim=1).float()
    anchors = t32(np.round((shifts[:, None, :] + base[None]).reshape(-1, 4).numpy(), 2).tolist())
    num_a = base.shape[0]
    box_sets = {
        "two_images": [[[20.3, 30.7, 90.2, 100.9], [100.5, 12.2, 150.8, 60.1]], [[40.6, 40.1, 140.3, 120.7]]],
        "small_and_large": [[[5.2, 6.9, 24.8, 22.3]], [[2.4, 3.1, 155.7, 124.2], [70.1, 80.3, 96.6, 104.2]]],
    }
    cases = []
    for name, boxes in box_sets.items():
        k = max(len(b) for b in boxes)
        gt = torch.zeros(len(boxes), k, 5)
        for i, b in enumerate(boxes):
            gt[i, : len(b), :4] = t32(b)
            gt[i, : len(b), 4] = 1.0
        with cpu_cuda(), torch.no_grad():
            iou_map = ns["bbox_overlaps_batch"](anchors, gt).view(len(boxes), h, w, num_a, k)
            env = base_ns(batch_size=len(boxes), IOU_map=iou_map, height=h, width=w, A=num_a, gt_boxes=gt)
            exec(mask_code, env)
        masks = [(m > 0).float().tolist() for m in env["mask_batch"]]
        cases.append({
            "name": name, "source": 0,
            "options": {"psi": 0.5, "stride": stride, "anchor_sizes": sizes, "aspect_ratios": ratios,
                        "feature_hw": [h, w]},
            "inputs": {"anchors": anchors.tolist(), "gt_bboxes": boxes},
            "outputs": {"masks": masks},
        })
    write("fgfi", {"sources": sources, "cases": cases,
                   "note": "The official IoU uses the +1 pixel convention; d2kd uses Detectron2's pairwise_iou "
                           "(documented in docs/methods/fgfi.md)."})


# ------------------------------------------------------------------------------------ GKD
def make_gkd(repos):
    git_dir = repos["gkd"][0]
    loss_path = f"{GKD_DIR}/models/losses/kd_loss.py"
    one_path = f"{GKD_DIR}/strategy/kd_one_stage_strategy.py"
    pgm_path = f"{GKD_DIR}/strategy/prototype_generation_module.py"
    lns = load_defs(git_show(git_dir, loss_path), ["KDLoss.forward", "KDLoss.knowledge_distillation_kl_div_loss"],
                    base_ns(), loss_path)
    ons = load_defs(git_show(git_dir, one_path),
                    ["OneStageDetStrategy.template_box_distance", "OneStageDetStrategy.r2i_om_loss"],
                    base_ns(), one_path)
    pns = load_defs(git_show(git_dir, pgm_path), ["PrototypeGenerationModule._norm_feats",
                                                  "PrototypeGenerationModule._generate_prototypes_single"],
                    base_ns(), pgm_path)
    sources = [source(repos, "gkd", loss_path, ["KDLoss.forward", "KDLoss.knowledge_distillation_kl_div_loss"]),
               source(repos, "gkd", one_path, ["OneStageDetStrategy.r2i_om_loss",
                                               "OneStageDetStrategy.template_box_distance"]),
               source(repos, "gkd", pgm_path, ["PrototypeGenerationModule._generate_prototypes_single",
                                               "PrototypeGenerationModule._norm_feats"])]
    gen = torch.Generator().manual_seed(600)
    cases = []

    # Feature term (decoupled, KDLoss p_str='decouple') and response term (soft weights).
    kd_self = SimpleNamespace(kd_t=2)
    kd_self.knowledge_distillation_kl_div_loss = (
        lambda *a: lns["knowledge_distillation_kl_div_loss"](kd_self, *a))
    n, c, h, w = 2, 4, 6, 6
    for name, (bg_w, fg_w) in (("feature_fg1_bg4", (4.0, 1.0)), ("feature_fg1_bg0", (0.0, 1.0))):
        s, t = rnd(gen, n, c, h, w), rnd(gen, n, c, h, w)
        mask = torch.zeros(n, h, w)
        g = torch.Generator().manual_seed(601)
        mask[0, 1:4, 2:5] = torch.rand(3, 3, generator=g) * 0.9 + 0.05
        mask[1, 0:2, 0:6] = torch.rand(2, 6, generator=g) * 0.9 + 0.05
        mask = t32(np.round(mask.numpy(), 3).tolist())
        with cpu_cuda(), torch.no_grad():
            out = lns["forward"](kd_self, kd_param=[[1, 0], [1], [bg_w, fg_w]], st_feat=[t32(s)], tc_feat=[t32(t)],
                                 feat_mask=[mask[:, None].repeat(1, c, 1, 1)], p_str="decouple")
        cases.append({
            "name": name, "term": "feature", "source": 0,
            "options": {"kd_param": [[1, 0], [1], [bg_w, fg_w]], "p_str": "decouple"},
            "inputs": {"student": s, "teacher": t, "mask": mask.tolist()},
            "outputs": {"feat": val(out["feat"]), "feat_bg": val(out["feat_bg"])},
        })
    for temp in (2.0, 15.0):
        kd_self.kd_t = temp
        r, k = 7, 5
        s, t = rnd(gen, r, k, scale=2.0), rnd(gen, r, k, scale=2.0)
        weights = np.round(torch.rand(r, generator=gen, dtype=torch.float64).numpy(), 3).tolist()
        with cpu_cuda(), torch.no_grad():
            out = lns["forward"](kd_self, kd_param=[[1, 0], [1], [4, 1]], st_pred=t32(s), tc_pred=t32(t),
                                 soft_weights=t32(weights))
        cases.append({
            "name": f"response_T{temp:g}", "term": "response", "source": 0,
            "options": {"kd_t": temp, "kd_param": [[1, 0], [1], [4, 1]]},
            "inputs": {"student_logits": s, "teacher_logits": t, "soft_weights": weights},
            "outputs": {"pred": val(out["pred"])},
        })

    # Global term and robust weights (r2i_om_loss, the one-stage strategy's form).
    stride, n, c, h, w = 8, 2, 4, 8, 8
    boxes = [[[3.2, 5.1, 30.7, 26.4], [20.5, 33.3, 60.2, 62.9]], [[8.8, 1.2, 44.6, 50.1]]]
    labels = [[0, 1], [1]]
    per_class = 2
    for pwf in (1.0, 5.0):
        s, t = rnd(gen, n, c, h, w), rnd(gen, n, c, h, w)
        proto_s, proto_t = rnd(gen, 2 * per_class, c), rnd(gen, 2 * per_class, c)
        o_self = SimpleNamespace(pool_ops=nn.AdaptiveAvgPool2d(1), gt_labels=[torch.tensor(x) for x in labels],
                                 pair_wise_factor=pwf, kd_att_val=1.0)
        o_self.template_box_distance = lambda a, b: ons["template_box_distance"](o_self, a, b)
        with cpu_cuda(), torch.no_grad():
            loss, weights = ons["r2i_om_loss"](o_self, [t32(b) for b in boxes], t32(s), t32(t), t32(proto_s),
                                               t32(proto_t), stride, [0, per_class, 2 * per_class], True)
        cases.append({
            "name": f"global_pwf{pwf:g}", "term": "global", "source": 1,
            "options": {"anchor_stride": stride, "pair_wise_factor": pwf, "kd_att_val": 1.0,
                        "cls_start_index": [0, per_class, 2 * per_class]},
            "inputs": {"student": s, "teacher": t, "gt_bboxes": boxes, "gt_labels": labels,
                       "student_prototypes": proto_s, "teacher_prototypes": proto_t},
            "outputs": {"loss": val(loss), "robust_weights": [x.reshape(-1).tolist() for x in weights]},
        })

    # Prototype picks (PGM matching pursuit after the density filter).
    for seed, (num, alpha) in ((602, (5, 10)), (603, (4, 1))):
        g = torch.Generator().manual_seed(seed)
        centres_a = torch.randn(3, 6, generator=g, dtype=torch.float64) * 2
        centres_b = torch.randn(3, 5, generator=g, dtype=torch.float64) * 2
        assign = torch.randint(0, 3, (30,), generator=g)
        fa = centres_a[assign] + torch.randn(30, 6, generator=g, dtype=torch.float64) * 0.4
        fb = centres_b[assign] + torch.randn(30, 5, generator=g, dtype=torch.float64) * 0.4
        fa = np.round(fa.numpy(), 3)
        fb = np.round(fb.numpy(), 3)
        picks = {}
        with cpu_cuda(), torch.no_grad():
            p_self = SimpleNamespace()
            p_self._norm_feats = lambda x: pns["_norm_feats"](p_self, x)
            picks["fp16_as_released"] = pns["_generate_prototypes_single"](p_self, fa, fb, "c", num, alpha)[2].tolist()
            # The same loop on fp32-normalised features (the released _norm_feats casts to fp16 for the GPU).
            p32 = SimpleNamespace(_norm_feats=lambda x: torch.from_numpy(
                x / np.sqrt(np.power(x, 2).sum(1)).reshape(-1, 1)).float())
            picks["fp32"] = pns["_generate_prototypes_single"](p32, fa, fb, "c", num, alpha)[2].tolist()
        cases.append({
            "name": f"prototypes_seed{seed}", "term": "prototypes", "source": 2,
            "options": {"max_num_prototypes": num, "alpha": alpha, "kernel_width": 0.1, "percentile": 40},
            "inputs": {"feats_a": fa.tolist(), "feats_b": fb.tolist()},
            "outputs": {"picks_fp16_as_released": picks["fp16_as_released"], "picks_fp32": picks["fp32"]},
        })
    write("gkd", {"sources": sources, "cases": cases})


# ------------------------------------------------------------------------------------ PKD
def make_pkd(repos):
    path = "mmrazor/models/losses/pkd_loss.py"
    ns = load_defs(git_show(repos["mmrazor"][0], path), ["PKDLoss"], base_ns(), path)
    sources = [source(repos, "mmrazor", path, ["PKDLoss.forward", "PKDLoss.norm"])]
    PKDLoss = ns["PKDLoss"]
    gen = torch.Generator().manual_seed(700)
    n, c = 2, 4
    cases = []
    # (name, loss_weight, student (h, w) per level, teacher (h, w) per level, per-channel scale / shift)
    settings = (
        ("levels_w6", 6.0, [(6, 6), (3, 3)], [(6, 6), (3, 3)], False),
        ("levels_w10_scaled", 10.0, [(6, 6), (3, 3), (2, 2)], [(6, 6), (3, 3), (2, 2)], True),
        ("resize_student_w1", 1.0, [(5, 5), (4, 4)], [(6, 6), (3, 3)], False),
    )
    for name, weight, s_sizes, t_sizes, scaled in settings:
        student = [rnd(gen, n, c, h, w, scale=1.5) for h, w in s_sizes]
        teacher = [rnd(gen, n, c, h, w, scale=1.5) for h, w in t_sizes]
        # Teacher maps correlated with the student's where the sizes agree (r well away from 0).
        teacher = [np.round(0.6 * np.asarray(x) + 0.8 * np.asarray(y), 3).tolist() if np.shape(x) == np.shape(y) else y
                   for x, y in zip(student, teacher)]
        if scaled:  # channels of very different magnitude and offset (the teacher's)
            teacher = [np.round(np.asarray(x) * np.array([0.01, 1.0, 30.0, 200.0])[None, :, None, None]
                                + np.array([5.0, -2.0, 0.0, 40.0])[None, :, None, None], 3).tolist()
                       for x in teacher]
        loss_fn = PKDLoss(loss_weight=weight, resize_stu=True)
        with torch.no_grad():
            total = loss_fn(tuple(t32(x) for x in student), tuple(t32(x) for x in teacher))
            per_level = [val(loss_fn(t32(x), t32(y))) for x, y in zip(student, teacher)]
        cases.append({
            "name": name, "source": 0,
            "options": {"loss_weight": weight, "resize_stu": True},
            "inputs": {"student": student, "teacher": teacher},
            "outputs": {"loss": val(total), "per_level": per_level},
        })
    write("pkd", {"sources": sources, "cases": cases,
                  "note": "Levels are passed as tuples (one term per pair, summed, times loss_weight); "
                          "'per_level' is the same module on each pair alone. In 'resize_student_w1' the "
                          "student maps are resized bilinearly to the teacher's (align_corners=False)."})


# ------------------------------------------------------------------------------------ MGD
class _BaseConnector(nn.Module):
    """Stand-in for mmrazor's BaseConnector: ``forward`` is ``forward_train``."""

    def __init__(self, init_cfg=None):
        super().__init__()

    def forward(self, feature):
        return self.forward_train(feature)


def _mgd_weights(gen, module):
    """Seeded, rounded weights for every parameter of ``module``, loaded into it; returned as lists."""
    state = {}
    for key, p in module.state_dict().items():
        scale = 0.3 if key.endswith("weight") else 0.1
        state[key] = rnd(gen, *p.shape, scale=scale)
    module.load_state_dict({k: t32(v) for k, v in state.items()})
    return state


def _mgd_mask(seed, shape, lam):
    """The reference's mask for the draws after ``torch.manual_seed(seed)``: 0 where r > 1 - lambda, else 1."""
    torch.manual_seed(seed)
    draws = torch.rand(shape)
    return torch.where(draws > 1 - lam, 0.0, 1.0)


def make_mgd(repos):
    gen = torch.Generator().manual_seed(800)
    n, h, w = 2, 6, 6
    sources, cases = [], []
    if "mmrazor" in repos:
        conn_path = "mmrazor/models/architectures/connectors/mgd_connector.py"
        loss_path = "mmrazor/models/losses/mgd_loss.py"
        git_dir = repos["mmrazor"][0]
        cns = load_defs(git_show(git_dir, conn_path), ["MGDConnector"], base_ns(BaseConnector=_BaseConnector),
                        conn_path)
        lns = load_defs(git_show(git_dir, loss_path), ["MGDLoss"], base_ns(), loss_path)
        sources += [source(repos, "mmrazor", conn_path, ["MGDConnector.__init__", "MGDConnector.forward_train"]),
                    source(repos, "mmrazor", loss_path, ["MGDLoss.forward", "MGDLoss.get_dis_loss"])]
        for name, cs, ct, alpha, lam, seed in (("mmrazor_equal_widths", 4, 4, 2e-5, 0.65, 801),
                                               ("mmrazor_align_3to4", 3, 4, 5e-7, 0.45, 802)):
            s, te = rnd(gen, n, cs, h, w, scale=1.5), rnd(gen, n, ct, h, w, scale=1.5)
            conn = cns["MGDConnector"](cs, ct, lambda_mgd=lam)
            state = _mgd_weights(gen, conn)
            loss_fn = lns["MGDLoss"](alpha_mgd=alpha)
            with torch.no_grad():
                torch.manual_seed(seed)
                generated = conn(t32(s))
                mask = _mgd_mask(seed, (n, 1, h, w), lam)
                aligned = conn.align(t32(s)) if conn.align is not None else t32(s)
                assert torch.equal(conn.generation(aligned * mask), generated), "the recorded mask is not the one used"
                loss = loss_fn(generated, t32(te))
                dis = loss_fn.get_dis_loss(generated, t32(te))
            cases.append({
                "name": name, "source": len(sources) - 1,
                "options": {"student_channels": cs, "teacher_channels": ct, "alpha_mgd": alpha, "lambda_mgd": lam,
                            "mask_on_channel": False, "mask_seed": seed},
                "inputs": {"student": s, "teacher": te, "mask": mask.tolist(),
                           "align_state": {k[len("align."):]: v for k, v in state.items() if k.startswith("align.")},
                           "generation_state": {k[len("generation."):]: v for k, v in state.items()
                                                if k.startswith("generation.")}},
                "outputs": {"loss": val(loss), "dis_loss": val(dis), "generated": val(generated)},
            })
    if "mgd" in repos:
        path = "det/mmdet/distillation/losses/mgd.py"
        ns = load_defs(git_show(repos["mgd"][0], path), ["FeatureLoss"], base_ns(), path)
        sources.append(source(repos, "mgd", path, ["FeatureLoss.forward", "FeatureLoss.get_dis_loss"]))
        for name, cs, ct, alpha, lam, seed in (("official_det_equal_widths", 4, 4, 2e-5, 0.65, 803),
                                               ("official_det_align_3to4", 3, 4, 5e-7, 0.45, 804)):
            s, te = rnd(gen, n, cs, h, w, scale=1.5), rnd(gen, n, ct, h, w, scale=1.5)
            module = ns["FeatureLoss"](cs, ct, "p2", alpha_mgd=alpha, lambda_mgd=lam)
            state = _mgd_weights(gen, module)
            with torch.no_grad():
                torch.manual_seed(seed)
                loss = module(t32(s), t32(te))
                module.alpha_mgd = 1.0
                torch.manual_seed(seed)
                dis = module(t32(s), t32(te))
            mask = _mgd_mask(seed, (n, 1, h, w), lam)
            cases.append({
                "name": name, "source": len(sources) - 1,
                "options": {"student_channels": cs, "teacher_channels": ct, "alpha_mgd": alpha, "lambda_mgd": lam,
                            "mask_seed": seed},
                "inputs": {"student": s, "teacher": te, "mask": mask.tolist(),
                           "align_state": {k[len("align."):]: v for k, v in state.items() if k.startswith("align.")},
                           "generation_state": {k[len("generation."):]: v for k, v in state.items()
                                                if k.startswith("generation.")}},
                "outputs": {"loss": val(loss), "dis_loss": val(dis)},
            })
    if cases:
        write("mgd", {"sources": sources, "cases": cases,
                      "note": "The mask is the one the reference drew (torch.rand((N, 1, H, W)) on the CPU after "
                              "torch.manual_seed(mask_seed)); the align conv (when the widths differ) and the "
                              "generation block carry the seeded weights recorded in align_state / generation_state."})


# ------------------------------------------------------------------------------------ main
REPOS = {
    "mmrazor": "open-mmlab/mmrazor",
    "mdistiller": "megvii-research/mdistiller",
    "fgd": "yzd-v/FGD",
    "defeat": "ggjy/DeFeat.pytorch",
    "fgfi": "twangnh/Distilling-Object-Detectors",
    "gkd": "hikvision-research/DAVAR-Lab-ML",
    "mgd": "yzd-v/MGD",
    "mmcv": "open-mmlab/mmcv",
}
METHODS = {
    "kd": (make_kd, ("mmrazor", "mdistiller"), any),
    "cwd": (make_cwd, ("mmrazor",), all),
    "fgd": (make_fgd, ("fgd",), all),
    "fbkd": (make_fbkd, ("mmrazor",), all),
    "defeat": (make_defeat, ("defeat",), all),
    "fgfi": (make_fgfi, ("fgfi",), all),
    "gkd": (make_gkd, ("gkd",), all),
    "pkd": (make_pkd, ("mmrazor",), all),
    "mgd": (make_mgd, ("mmrazor", "mgd"), any),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, name in REPOS.items():
        parser.add_argument(f"--{key}", metavar="GIT_DIR", help=f"git directory of a snapshot of {name}")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    repos = {k: (getattr(args, k), REPOS[k]) for k in REPOS if getattr(args, k)}
    for method in args.methods:
        fn, needs, rule = METHODS[method]
        if not rule(k in repos for k in needs):
            print(f"skip {method}: no snapshot given for {', '.join(needs)}")
            continue
        fn(repos)


if __name__ == "__main__":
    main()
