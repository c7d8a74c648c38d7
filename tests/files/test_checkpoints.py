"""Checkpoints are read without running code: .pth with weights_only=True, .pkl through an
unpickler that admits only what Detectron2's model zoo and the MSRA weights hold."""

import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import build_resnet_backbone

from d2kd.files import SafeDetectionCheckpointer, UnsafeFileError, read_checkpoint, read_pkl_checkpoint


class _WritesMarker:
    """Unpickled unsafely, it writes ``path`` (a harmless stand-in for a payload)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def _touch(path):  # module-level so that pickle can name it
    with open(path, "w") as f:
        f.write("ran")


def _payload(tmp_path, suffix):
    marker = str(tmp_path / f"marker{suffix}")
    path = str(tmp_path / f"evil{suffix}")
    content = {"model": {"w": np.zeros(2, np.float32)}, "__author__": "x", "payload": _WritesMarker(marker)}
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(content, f)
    else:
        torch.save({"model": {"w": torch.zeros(2)}, "payload": _WritesMarker(marker)}, path)
    return path, marker


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_a_payload_is_refused_and_never_runs(tmp_path, suffix):
    path, marker = _payload(tmp_path, suffix)
    with pytest.raises(UnsafeFileError, match=r"evil\.(pkl|pth).*_touch.*refused|evil\.(pkl|pth).*refused.*_touch"):
        read_checkpoint(path)
    assert not os.path.exists(marker)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UnsafeFileError, match="nothing was run"):
        SafeDetectionCheckpointer(model).load(path)
    assert not os.path.exists(marker)


def test_the_payload_really_runs_under_plain_pickle(tmp_path):
    """The stand-in is a real payload: Detectron2's plain ``pickle.load`` runs it."""
    path, marker = _payload(tmp_path, ".pkl")
    with open(path, "rb") as f:
        pickle.load(f)
    assert os.path.exists(marker)


def _c2_style_pickle(obj, numpy1_names: bool) -> bytes:
    """Protocol 2, as the zoo's Python pickles; numpy 1.x names its reconstructor numpy.core."""
    data = pickle.dumps(obj, protocol=2)
    if numpy1_names:
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n_reconstruct" in data
    return data


def _resnet():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("numpy1_names", [True, False])
def test_an_msra_format_pkl_loads_with_caffe2_names(tmp_path, numpy1_names):
    """MSRA's ImageNet R-50.pkl: a flat dict of Caffe2 blob names to float32 arrays, with
    ``_momentum`` blobs; Detectron2 maps the names by its Caffe2 heuristics."""
    rng = np.random.default_rng(0)
    blobs = {
        "conv1_w": rng.standard_normal((64, 3, 7, 7)).astype(np.float32),
        "conv1_w_momentum": np.zeros((64, 3, 7, 7), np.float32),
        "res_conv1_bn_s": rng.standard_normal(64).astype(np.float32),
        "res_conv1_bn_b": rng.standard_normal(64).astype(np.float32),
        "res2_0_branch2a_w": rng.standard_normal((64, 64, 1, 1)).astype(np.float32),
        "fc1000_w": rng.standard_normal((1000, 2048)).astype(np.float32),
    }
    path = tmp_path / "R-50.pkl"
    path.write_bytes(_c2_style_pickle(blobs, numpy1_names))
    model = _resnet()
    SafeDetectionCheckpointer(model).load(str(path))
    state = model.state_dict()
    np.testing.assert_array_equal(state["stem.conv1.weight"].numpy(), blobs["conv1_w"])
    np.testing.assert_array_equal(state["stem.conv1.norm.weight"].numpy(), blobs["res_conv1_bn_s"])
    np.testing.assert_array_equal(state["stem.conv1.norm.bias"].numpy(), blobs["res_conv1_bn_b"])
    np.testing.assert_array_equal(state["res2.0.conv1.weight"].numpy(), blobs["res2_0_branch2a_w"])


def test_a_model_zoo_format_pkl_loads(tmp_path):
    """The zoo's model_final_*.pkl: {"model": name -> array, "__author__", "matching_heuristics"}."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    weights = {
        "0.weight": np.arange(4 * 3 * 9, dtype=np.float32).reshape(4, 3, 3, 3),
        "0.bias": np.ones(4, np.float32),
        "1.weight": np.full(4, 2.0, np.float32),
        "1.bias": np.zeros(4, np.float32),
        "1.running_mean": np.zeros(4, np.float32),
        "1.running_var": np.ones(4, np.float32),
        "1.num_batches_tracked": np.array(7, np.int64),
    }
    zoo = {"model": weights, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True, "iteration": np.int64(270000)}
    path = tmp_path / "model_final_280758.pkl"
    path.write_bytes(_c2_style_pickle(zoo, numpy1_names=True))
    loaded = read_pkl_checkpoint(str(path))
    assert loaded["__author__"] == "Detectron2 Model Zoo" and loaded["iteration"] == 270000
    SafeDetectionCheckpointer(model).load(str(path))
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), weights["0.weight"])
    np.testing.assert_array_equal(model[1].weight.detach().numpy(), weights["1.weight"])


def test_a_pth_of_tensors_loads(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = str(tmp_path / "model.pth")
    torch.save({"model": {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}, "iteration": 3}, path)
    assert read_checkpoint(path)["iteration"] == 3
    SafeDetectionCheckpointer(model).load(path)
    assert torch.equal(model.weight, torch.full((2, 3), 0.5))
