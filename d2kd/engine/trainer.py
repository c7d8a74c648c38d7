"""
``DistillTrainer``: Detectron2's ``DefaultTrainer`` with a frozen teacher and distillation
heads. A config without ``DISTILL.HEADS`` or ``DISTILL.INHERIT`` trains a plain detector (teachers, baselines).
"""

import copy
import logging
import os
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from detectron2.engine import DefaultTrainer, create_ddp_model, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import uses_teacher
from ..heads import BuildContext, build_distill_heads
from ..modeling.inherit import inherit_teacher_parameters
from ..deploy import write_student_config
from ..modeling.distiller import DistillationModel
from ..modeling.loss_balance import LossBalance
from ..modeling.schedule import DistillSchedule
from ..modeling.teacher import Teacher, build_teacher
from ..data.mapper import SafeDatasetMapper, check_images_decode
from ..data.sampler import ResumedTrainingSampler, SeededMapDataset
from .amp import build_step_trainer
from .checkpoint import SafeCheckpointer, head_options
from .hooks import (
    NonFiniteLossGuard,
    TrainingDivergedError,
    divergence_message,
    head_option_nodes,
    last_checkpoint_of,
    likely_fixes,
)
from .preflight import check_class_alignment, get_train_dataset_dicts, warn_unused_head_options
from .rng import RNGState

__all__ = ["DistillTrainer"]

logger = logging.getLogger(__name__)


class DistillTrainer(DefaultTrainer):
    """
    Trains ``build_model(cfg)`` (the student) with the distillation heads named in
    ``cfg.DISTILL.HEADS``, from the teacher in ``cfg.DISTILL.TEACHER``.

    - The teacher is built from its own config, loaded strictly, frozen, kept in eval mode and
      run under ``no_grad``; it is not in the student's state_dict, optimizer or DDP wrapper.
      ``teacher`` is the model, ``teacher_cfg`` the config it was built from (None without one).
    - The optimised module is ``student + heads`` (:class:`DistillationModel`), wrapped once
      in DDP. Adapters are built before the optimizer, from the shapes the models report.
    - Checkpoints hold the student under ``"model"`` (so they load into plain Detectron2 with
      no missing or unexpected keys) and the heads' trainable parts under ``"distiller"``.
    - With ``DISTILL.EVAL_TEACHER`` the teacher is evaluated once and reported beside the
      student as ``teacher/...`` metrics.
    - With ``DISTILL.INHERIT.ENABLED`` a new run starts the student's neck and heads from the
      teacher's (FGD's inheriting strategy, :mod:`d2kd.modeling.inherit`); a resumed run keeps
      its checkpoint's values.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        warn_unused_head_options(cfg)
        if cfg.DATALOADER.DECODE_CHECK:  # before any model is built
            check_images_decode(get_train_dataset_dicts(cfg), cfg.INPUT.FORMAT)

        student = self.build_model(cfg)
        self.teacher = None
        self.teacher_cfg = None
        self.heads = torch.nn.ModuleDict()
        model = student
        if uses_teacher(cfg):  # distillation heads, or only DISTILL.INHERIT
            self.teacher, self.teacher_cfg = self.build_teacher(cfg)
            context = BuildContext(student, self.teacher, cfg, self.teacher_cfg)
            self.heads = build_distill_heads(cfg, context).to(student.device)
            check_class_alignment(cfg, self.teacher_cfg, self.heads)
        self.loss_balance = None
        if len(self.heads):
            self.loss_balance = LossBalance.from_config(cfg, list(self.heads.keys())).to(student.device)
            model = DistillationModel(
                student,
                self.teacher,
                self.heads,
                DistillSchedule.from_config(cfg),
                cfg.DISTILL.TEACHER.INPUT_SCALE,
                loss_balance=self.loss_balance,
                teacher_precision=cfg.DISTILL.TEACHER.PRECISION,
            )
        self.student = student
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp(model, student.device)
        # SOLVER.AMP: Detectron2's AMPTrainer on CUDA, CPU bfloat16 autocast on a CPU (d2kd.engine.amp).
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer, student.device)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        checkpointables = {"distiller": self.heads, "loss_balance": self.loss_balance} if len(self.heads) else {}
        # Random generator state, restored on resume in single-process runs (see RNGState).
        self._rng_state = RNGState()
        checkpointables["rng"] = self._rng_state
        self.checkpointer = SafeCheckpointer(
            student,
            cfg.OUTPUT_DIR,
            head_options=head_options(cfg, self.heads),
            trainer=weakref.proxy(self),
            **checkpointables,
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._teacher_results = None
        self._head_hooks = []
        self.register_hooks(self.build_hooks())
        if comm.is_main_process():
            # A config plain Detectron2 accepts, for the student that leaves d2kd (d2kd.deploy).
            write_student_config(cfg, cfg.OUTPUT_DIR)

    def resume_or_load(self, resume=True):
        """
        As in Detectron2, plus: a resumed run continues the training data stream where it
        stopped (instead of restarting it) and restores the random generators, so ``N``
        iterations straight equal ``k`` + resume + ``N - k``. ``resume`` into an OUTPUT_DIR
        without a checkpoint logs a warning naming the folder and starts a new run.
        """
        if resume and not self.checkpointer.has_checkpoint():
            # Warn, not refuse: a job script may always pass --resume (preemptible clusters).
            logger.warning(
                f"--resume, but OUTPUT_DIR {os.path.abspath(self.cfg.OUTPUT_DIR)} holds no checkpoint (no "
                "last_checkpoint file): starting a NEW run from iteration 0 with MODEL.WEIGHTS "
                f"({self.cfg.MODEL.WEIGHTS or 'empty: random initialisation'}). If you meant to continue a run, "
                "stop and check OUTPUT_DIR (a typo?)."
            )
        super().resume_or_load(resume=resume)
        if resume and self.start_iter > 0:
            self._trainer.reset_data_loader(lambda: self.build_train_loader(self.cfg, start_iter=self.start_iter))
        elif self.cfg.DISTILL.INHERIT.ENABLED:
            report = inherit_teacher_parameters(self.student, self.teacher, self.cfg.DISTILL.INHERIT.PREFIXES)
            logger.info(f"DISTILL.INHERIT: {report.summary()}.")

    def run_step(self):
        """
        Detectron2's step. The detector's own divergence error (a ``FloatingPointError`` such as
        the RPN's "Predicted boxes or scores contain Inf/NaN") is raised again as a
        :class:`TrainingDivergedError` naming the iteration, the last checkpoint and the fixes,
        as the guard's own loss and gradient checks do (d2kd.engine.hooks).
        """
        try:
            super().run_step()
        except TrainingDivergedError:
            raise
        except FloatingPointError as e:
            problem = f"Training diverged at iteration {self.iter}: the detector raised FloatingPointError: {e}"
            fixes = likely_fixes(list(head_option_nodes(self.heads).values()))
            raise TrainingDivergedError(divergence_message(problem, last_checkpoint_of(self.checkpointer), fixes)) from e

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        """
        Detectron2's train loader, whose sampler skips what ``start_iter`` iterations
        consumed and whose samples are augmented from seeds of their stream positions. With ``SEED >= 0`` the loader draws from its own seeded generator, not
        torch's global one, so creating it does not shift the training's random stream.
        """
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            if start_iter:
                logger.warning(f"{cfg.DATALOADER.SAMPLER_TRAIN} cannot skip consumed data: the data order restarts.")
            return build_detection_train_loader(cfg, mapper=SafeDatasetMapper(cfg, True))
        seed = cfg.SEED if cfg.SEED >= 0 else None
        dataset = get_train_dataset_dicts(cfg)  # empty datasets fail with the fix
        per_rank_batch = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        sampler = ResumedTrainingSampler(len(dataset), seed=seed, skip_per_rank=start_iter * per_rank_batch)
        # Each sample's augmentation is seeded by its stream position, so a resume is exact for
        # any DATALOADER.NUM_WORKERS (d2kd.data.sampler).
        dataset = SeededMapDataset(dataset, SafeDatasetMapper(cfg, True), sampler.seed)
        return build_detection_train_loader(  # explicit arguments: from a cfg, Detectron2 would add its own mapper
            dataset,
            mapper=None,
            sampler=sampler,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=seed,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader; an unreadable image fails naming the file."""
        return build_detection_test_loader(cfg, dataset_name, mapper=SafeDatasetMapper(cfg, False))

    @classmethod
    def build_teacher(cls, cfg) -> Teacher:
        """The frozen teacher and its config (:class:`~d2kd.modeling.teacher.Teacher`); override to build it differently."""
        return build_teacher(cfg)

    @property
    def head_hooks(self):
        """The hooks the distillation heads registered (e.g. GKD's prototype generation), in order."""
        return list(self._head_hooks)

    @property
    def last_eval_results(self):
        """The results of the last evaluation (the student's, and ``teacher/...`` with
        ``DISTILL.EVAL_TEACHER``); None before the first."""
        return getattr(self, "_last_eval_results", None)  # the attribute Detectron2's train() reads

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO-style AP/AP50/AP75 for every dataset (VOC datasets are converted)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        """Detectron2's hooks, with the evaluation reporting the teacher beside the student."""
        ret = super().build_hooks()
        # Stops at the first NaN/inf loss term, naming it, before the bad update (d2kd.engine.hooks).
        ret.insert(0, NonFiniteLossGuard(head_option_nodes(self.heads)))
        for i, hook in enumerate(ret):
            if isinstance(hook, hooks.EvalHook):
                ret[i] = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate_student_and_teacher)
        # Heads' own hooks (e.g. prototype updates) run before checkpointing and evaluation.
        head_hooks = [h for head in self.heads.values() for h in head.build_hooks(self)]
        self._head_hooks = head_hooks
        first_late = next(
            (i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))), len(ret)
        )
        return ret[:first_late] + head_hooks + ret[first_late:]

    def _evaluate_student_and_teacher(self):
        results = self.test(self.cfg, self.student)
        if self.cfg.DISTILL.EVAL_TEACHER and self.teacher is not None:
            if self._teacher_results is None:  # the teacher is frozen: measure it once
                self._teacher_results = self.test_teacher(self.cfg, Teacher(self.teacher, self.teacher_cfg))
            results = OrderedDict(results)
            results.update(self._teacher_results)
        self._last_eval_results = results
        return results

    @classmethod
    def test_teacher(cls, cfg, teacher: Optional[Teacher] = None):
        """
        Evaluate the teacher (a :class:`~d2kd.modeling.teacher.Teacher`; built from ``cfg``
        if None) on the student's test sets ``cfg.DATASETS.TEST``, fed through the teacher's
        own input pipeline. Returns results keyed ``teacher/<task>``.
        """
        model, teacher_cfg = teacher if teacher is not None else build_teacher(cfg)
        teacher_cfg = teacher_cfg.clone()
        teacher_cfg.defrost()
        teacher_cfg.DATASETS.TEST = cfg.DATASETS.TEST
        teacher_cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "teacher_eval")
        teacher_cfg.TEST.EXPECTED_RESULTS = []
        results = cls.test(teacher_cfg, model)
        model.eval()  # inference_on_dataset restores the previous mode; keep it eval
        return OrderedDict((f"teacher/{k}", copy.deepcopy(v)) for k, v in results.items())


def create_ddp(model, device):
    """``create_ddp_model`` that also works on CPU (gloo), where ``device_ids`` must be None."""
    device_ids = None if torch.device(device).type == "cpu" else [comm.get_local_rank()]
    return create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
