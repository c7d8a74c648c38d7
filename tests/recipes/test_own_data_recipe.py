"""
The README's "your data" recipe from YAML files only: a copy of BCCD with renamed classes and a
renamed split, declared with DATASETS.DEFINE; train the teacher, distil (two processes, so the
workers register the data themselves), evaluate.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BCCD = os.path.join(REPO, "datasets", "bccd")
RENAMED = {"RBC": "red_cell", "WBC": "white_cell", "Platelets": "platelet"}
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
]


def make_dataset(root, ids_by_split):
    for folder in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for split, ids in ids_by_split.items():
        for image_id in ids:
            text = open(os.path.join(BCCD, "Annotations", image_id + ".xml")).read()
            text = re.sub(r"<name>(\w+)</name>", lambda m: f"<name>{RENAMED[m.group(1)]}</name>", text)
            with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
                f.write(text)
            shutil.copy(os.path.join(BCCD, "JPEGImages", image_id + ".jpg"), os.path.join(root, "JPEGImages"))
        with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", D2KD_DATASETS=os.path.join(cwd, "no_bccd_here"))
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_net.py")] + args, cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return result


@pytest.mark.train
def test_own_voc_data_from_yaml_only(tmp_path):
    project = tmp_path / "project"
    train_ids = [f"BloodImage_{i:05d}" for i in range(0, 8)]
    test_ids = [f"BloodImage_{i:05d}" for i in range(10, 14)]
    make_dataset(str(project / "cells"), {"cells_fit": train_ids, "cells_holdout": test_ids})
    datasets = {
        "DEFINE": [["cells_fit", "voc", "cells", "cells_fit"], ["cells_holdout", "voc", "cells", "cells_holdout"]],
        "CLASSES": list(RENAMED.values()),
        "TRAIN": ["cells_fit"],
        "TEST": ["cells_holdout"],
    }
    (project / "teacher.yaml").write_text(yaml.safe_dump({
        "_BASE_": os.path.join(REPO, "configs", "bccd", "teacher_R50_FPN.yaml"),
        "DATASETS": datasets,
        "OUTPUT_DIR": "output/teacher",
    }))
    (project / "student.yaml").write_text(yaml.safe_dump({
        "_BASE_": os.path.join(REPO, "configs", "bccd", "distill_kd_R50_R18.yaml"),
        "DATASETS": datasets,
        "DISTILL": {"TEACHER": {"CONFIG_FILE": "teacher.yaml", "WEIGHTS": "output/teacher/model_final.pth"}},
        "OUTPUT_DIR": "output/student",
    }))
    cwd = str(project)
    run(["--config-file", "teacher.yaml"] + TINY, cwd)
    result = run(["--config-file", "student.yaml", "--num-gpus", "2"] + TINY, cwd)
    assert "CLASS ORDER NOT CHECKED" not in result.stdout + result.stderr  # the teacher's classes are declared
    run(["--config-file", "student.yaml", "--eval-only", "MODEL.WEIGHTS", "output/student/model_final.pth",
         "OUTPUT_DIR", "output/eval"] + TINY, cwd)
    results = json.load(open(project / "output" / "eval" / "eval_results.json"))
    assert "AP" in results["bbox"]  # a 2-iteration student may detect nothing (AP NaN)
    assert {"AP-red_cell", "AP-white_cell", "AP-platelet"} <= set(results["teacher/bbox"])
