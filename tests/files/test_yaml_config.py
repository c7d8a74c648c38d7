"""YAML configs are read as data: Python tags refused with file, line and tag; _BASE_ loops and
non-UTF-8 files named; the model zoo's one RetinaNet expression read as its value."""

import os

import pytest

from d2kd.config import get_distill_cfg, load_config
from d2kd.files import ConfigFileError, UnsafeFileError, load_yaml_with_base, read_yaml

MARKER = "d2kd_yaml_marker"


def _payload_yaml(folder):
    """A config whose payload, if loaded unsafely, writes a marker file (and does nothing else)."""
    marker = os.path.join(folder, MARKER)
    path = os.path.join(folder, "evil.yaml")
    with open(path, "w") as f:
        f.write("MODEL:\n  DEVICE: cpu\n")
        f.write(f"SEED: !!python/object/apply:builtins.exec [\"open({marker!r}, 'w').write('ran')\"]\n")
    return path, marker


def test_a_python_tag_is_refused_naming_file_line_and_tag(tmp_path):
    path, marker = _payload_yaml(str(tmp_path))
    with pytest.raises(UnsafeFileError, match=r"evil\.yaml, line 3, column 7: the YAML tag '!!python/object/apply:builtins\.exec'"):
        read_yaml(path)
    assert not os.path.exists(marker)


def test_load_config_refuses_the_payload_before_building_anything(tmp_path):
    path, marker = _payload_yaml(str(tmp_path))
    with pytest.raises(UnsafeFileError, match="evil.yaml"):
        load_config(path)
    assert not os.path.exists(marker)


def test_a_payload_in_a_base_file_is_refused(tmp_path):
    base, marker = _payload_yaml(str(tmp_path))
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: evil.yaml\nSOLVER:\n  MAX_ITER: 3\n")
    with pytest.raises(UnsafeFileError, match="evil.yaml, line 3"):
        load_config(str(child))
    assert not os.path.exists(marker)


def test_an_unknown_custom_tag_is_refused(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("SEED: !mytag 3\n")
    with pytest.raises(UnsafeFileError, match=r"tag\.yaml.*!mytag.*line 1"):
        read_yaml(str(path))


def test_the_model_zoo_retinanet_anchor_expression_reads_as_its_value():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    sizes = load_yaml_with_base(path)["MODEL"]["ANCHOR_GENERATOR"]["SIZES"]
    expected = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]
    assert sizes == expected
    assert sizes[0] == [32, 32 * 1.2599210498948732, 32 * 1.5874010519681994]
    cfg = load_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    assert [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES] == expected


def test_another_eval_expression_is_refused(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text('MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: !!python/object/apply:eval ["[[32]]"]\n')
    with pytest.raises(UnsafeFileError, match=r"line 3.*object/apply:eval"):
        read_yaml(str(path))


def test_a_python_tuple_reads_as_a_tuple(tmp_path):
    path = tmp_path / "tuple.yaml"
    path.write_text("INPUT:\n  MIN_SIZE_TRAIN: !!python/tuple [256, 288]\n")
    assert read_yaml(str(path)) == {"INPUT": {"MIN_SIZE_TRAIN": (256, 288)}}


def test_a_base_cycle_names_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: c.yaml\n")
    (tmp_path / "c.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigFileError, match=r"loops: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_config(str(tmp_path / "a.yaml"))


def test_a_file_that_bases_itself_is_a_cycle(tmp_path):
    (tmp_path / "self.yaml").write_text("_BASE_: ./self.yaml\n")
    with pytest.raises(ConfigFileError, match="loops"):
        load_yaml_with_base(str(tmp_path / "self.yaml"))


def test_a_yaml_that_is_not_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("OUTPUT_DIR: caf\u00e9\n".encode("latin-1"))  # é is 0xe9 at byte 15
    with pytest.raises(ConfigFileError, match=r"latin1\.yaml is not UTF-8 text: byte offset 15 \(0xe9\)"):
        load_config(str(path))


def test_bases_merge_like_detectron2(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 5\n  BASE_LR: 0.5\nSEED: 1\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 7\n")
    assert load_yaml_with_base(str(tmp_path / "child.yaml")) == {"SOLVER": {"MAX_ITER": 7, "BASE_LR": 0.5}, "SEED": 1}
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SEED) == (7, 0.5, 1)


def test_every_shipped_config_loads_safely():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = []
    for top in ("configs", os.path.join("benchmarks", "configs")):
        for folder, _, files in os.walk(os.path.join(repo, top)):
            paths += [os.path.join(folder, n) for n in files if n.endswith(".yaml")]
    assert len(paths) > 50
    for path in paths:
        assert isinstance(load_yaml_with_base(path), dict), path
    get_distill_cfg()  # the defaults themselves need no file
