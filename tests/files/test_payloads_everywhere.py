"""
A downloaded file never runs code: a YAML payload and a .pkl/.pth payload (harmless: each only
writes a marker file) are refused at every place d2kd reads configs and weights, and the marker
is never written. (Before d2kd.files, Detectron2's merge_from_file ran the YAML payload through
yaml.unsafe_load and its checkpointer ran the .pkl payload through pickle.load.)
"""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from d2kd import DistillTrainer
from d2kd.deploy.export import export_student
from d2kd.files import UnsafeFileError
from d2kd.modeling.teacher import build_teacher, build_teacher_cfg

from conftest import CONFIGS, FITNET, cli_args, distill_cfg, load_test_cfg, train_net

STUDENT = "bccd/student_R18_FPN.yaml"


def _write_marker(path):  # what the payloads would run
    with open(path, "w") as f:
        f.write("ran")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload_ran"
    yield str(path)
    assert not path.exists(), "a payload ran"


def yaml_payload(path, marker, base=os.path.join(CONFIGS, STUDENT)):
    """A working config (``_BASE_`` a shipped one) with one Python tag that would write ``marker``."""
    with open(path, "w") as f:
        f.write(f"_BASE_: {base}\n")
        f.write(f"SEED: !!python/object/apply:builtins.exec [\"open({marker!r}, 'w').write('ran')\"]\n")
    return str(path)


def weights_payload(path, marker, real_weights=None):
    """A checkpoint (``.pkl`` or ``.pth`` by ``path``) that would write ``marker`` when unpickled."""
    path = str(path)
    if path.endswith(".pkl"):
        model = {"w": np.zeros(2, np.float32)}
        if real_weights:
            model = {k: v.numpy() for k, v in torch.load(real_weights, weights_only=True)["model"].items()}
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": "somebody", "payload": _Payload(marker)}, f)
    else:
        model = torch.load(real_weights, weights_only=True)["model"] if real_weights else {"w": torch.zeros(2)}
        torch.save({"model": model, "payload": _Payload(marker)}, path)
    return path


def test_the_payloads_are_real(tmp_path):
    """Loaded the unsafe way, both payloads write their marker: the refusals below are meaningful."""
    import yaml

    for name in ("a", "b", "c"):
        marker = str(tmp_path / name)
        if name == "a":
            with open(yaml_payload(tmp_path / "p.yaml", marker)) as f:
                yaml.unsafe_load(f)
        elif name == "b":
            with open(weights_payload(tmp_path / "p.pkl", marker), "rb") as f:
                pickle.load(f)
        else:
            torch.load(weights_payload(tmp_path / "p.pth", marker), weights_only=False)
        assert os.path.exists(marker), name


def test_train_net_refuses_a_config_file_payload(tmp_path, marker, teacher_r18_weights):
    config = yaml_payload(tmp_path / "user.yaml", marker, base=os.path.join(CONFIGS, FITNET))
    with pytest.raises(UnsafeFileError, match=r"user\.yaml, line 2"):
        train_net.main(cli_args(config, tmp_path / "run", teacher_r18_weights))
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_a_teacher_config_file_payload_is_refused(tmp_path, marker, teacher_r18_weights):
    teacher_config = yaml_payload(tmp_path / "teacher.yaml", marker)
    cfg = distill_cfg(FITNET, tmp_path / "run", teacher_r18_weights, teacher_config=teacher_config)
    with pytest.raises(UnsafeFileError, match=r"teacher\.yaml, line 2"):
        build_teacher(cfg)


@pytest.mark.parametrize("config_file_given", [False, True])
def test_a_downloaded_teacher_folder_config_payload_is_refused(tmp_path, marker, teacher_r18_weights, config_file_given):
    """DISTILL.TEACHER.WEIGHTS in a folder holding config.yaml: d2kd reads that config when
    CONFIG_FILE is empty, and for the architecture cross-check when it is given."""
    folder = tmp_path / "downloaded_teacher"
    folder.mkdir()
    weights = str(shutil.copy(teacher_r18_weights, folder / "model_final.pth"))
    yaml_payload(folder / "config.yaml", marker)
    cfg = distill_cfg(FITNET, tmp_path / "run", weights)
    cfg.DISTILL.TEACHER.CONFIG_FILE = os.path.join(CONFIGS, STUDENT) if config_file_given else ""
    with pytest.raises(UnsafeFileError, match=r"downloaded_teacher/config\.yaml, line 2"):
        build_teacher_cfg(cfg)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_teacher_weights_payload_is_refused(tmp_path, marker, teacher_r18_weights, suffix):
    weights = weights_payload(tmp_path / f"teacher{suffix}", marker, teacher_r18_weights)
    with pytest.raises(UnsafeFileError, match=rf"teacher\{suffix}.*refused"):
        build_teacher(distill_cfg(FITNET, tmp_path / "run", weights))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_student_model_weights_payload_is_refused(tmp_path, marker, suffix):
    weights = weights_payload(tmp_path / f"student{suffix}", marker)
    trainer = DistillTrainer(load_test_cfg(STUDENT, tmp_path / "run", ["MODEL.WEIGHTS", weights]))
    with pytest.raises(UnsafeFileError, match=rf"student\{suffix}.*refused"):
        trainer.resume_or_load(resume=False)


def test_resume_from_a_payload_checkpoint_is_refused(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    weights_payload(run / "model_0000004.pth", marker)
    (run / "last_checkpoint").write_text("model_0000004.pth")
    trainer = DistillTrainer(load_test_cfg(STUDENT, run))
    with pytest.raises(UnsafeFileError, match=r"model_0000004\.pth.*refused"):
        trainer.resume_or_load(resume=True)


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_eval_only_weights_payload_is_refused(tmp_path, marker, teacher_r18_weights, suffix, partial):
    weights = weights_payload(tmp_path / f"student{suffix}", marker)
    flags = {"eval_only": True, "allow_partial_weights": True} if partial else {"eval_only": True}
    args = cli_args(FITNET, tmp_path / "eval", teacher_r18_weights, ["MODEL.WEIGHTS", weights], **flags)
    with pytest.raises(UnsafeFileError, match=rf"student\{suffix}.*refused"):
        train_net.main(args)


def test_export_refuses_a_payload_run_config_and_checkpoint(tmp_path, marker, teacher_r18_weights):
    run = tmp_path / "run"
    run.mkdir()
    yaml_payload(run / "config.yaml", marker)
    shutil.copy(teacher_r18_weights, run / "model_final.pth")
    with pytest.raises(UnsafeFileError, match=r"run/config\.yaml, line 2"):
        export_student(str(run))
    (run / "config.yaml").write_text(f"_BASE_: {os.path.join(CONFIGS, STUDENT)}\n")
    weights_payload(run / "model_final.pth", marker)
    with pytest.raises(UnsafeFileError, match=r"model_final\.pth.*refused"):
        export_student(str(run))


def test_the_speed_benchmark_refuses_a_payload(tmp_path, marker, load_script):
    speed = load_script("speed")
    weights = weights_payload(tmp_path / "student.pkl", marker)
    with pytest.raises(UnsafeFileError, match=r"student\.pkl.*refused"):
        speed.build(load_test_cfg(STUDENT, tmp_path / "run"), weights)
