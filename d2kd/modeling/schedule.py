"""Distillation loss schedules: warm-up delay, stop iteration, optional linear decay."""

__all__ = ["DistillSchedule"]


class DistillSchedule:
    """
    Factor applied to every distillation term at iteration ``it``:
    0 before ``warmup_iters`` (FGFI skips imitation for its first 400 iterations), 0 from
    ``stop_iter`` on (if >= 0), otherwise 1, or a linear decay ``1 - it / max_iter`` when
    ``linear_decay`` (the Global Knowledge code's ``kd_attenuation``).
    """

    def __init__(self, warmup_iters: int = 0, stop_iter: int = -1, linear_decay: bool = False, max_iter: int = 0):
        self.warmup_iters = int(warmup_iters)
        self.stop_iter = int(stop_iter)
        self.linear_decay = bool(linear_decay)
        self.max_iter = int(max_iter)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.DISTILL.WARMUP_ITERS, cfg.DISTILL.STOP_ITER, False, cfg.SOLVER.MAX_ITER)

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters or (self.stop_iter >= 0 and it >= self.stop_iter):
            return 0.0
        if self.linear_decay and self.max_iter > 0:
            return max(0.0, 1.0 - it / self.max_iter)
        return 1.0
