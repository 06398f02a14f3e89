"""Applications of mixtures of experts beyond language (chapter 17).

- :mod:`.mmoe`: multi-task learning — :class:`MMoE` (Ma et al. 2018), its one-gate :class:`OMoE`, the
  :class:`SharedBottom` baseline and the paper's synthetic tasks of controllable correlation.
- :mod:`.anomaly`: experts for the regimes of normal data, the mixture likelihood as an anomaly score, ROC/AUC.
- :mod:`.vision`: patch tokens through an MoE MLP on scikit-learn's bundled 8×8 digits.
"""
from . import anomaly, mmoe, vision
from .anomaly import SensorData, anomaly_aucs, mixture_scores, regime_sensor, roc_auc, roc_curve, single_model_scores
from .mmoe import (MMoE, MultiTaskData, OMoE, SharedBottom, fit_multitask, num_parameters, relative_error_run,
                   synthetic_tasks, task_mse)
from .vision import (VisionMoE, fit_vision, load_digits_tensors, lr_sweep, patchify, pick_lr, routing_purity,
                     split_validation, token_routes, vision_accuracy)

__all__ = [
    "anomaly", "mmoe", "vision",
    "MMoE", "OMoE", "SharedBottom", "MultiTaskData", "synthetic_tasks", "fit_multitask", "task_mse", "num_parameters",
    "relative_error_run",
    "SensorData", "regime_sensor", "mixture_scores", "single_model_scores", "roc_curve", "roc_auc", "anomaly_aucs",
    "VisionMoE", "patchify", "load_digits_tensors", "fit_vision", "vision_accuracy", "token_routes",
    "split_validation", "lr_sweep", "pick_lr", "routing_purity",
]
