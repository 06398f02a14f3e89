"""The classical mixtures of Part I: the 1991 adaptive mixture of local experts (:mod:`.mixture`,
:mod:`.losses`), hierarchical mixtures trained by EM (:mod:`.hme`, :mod:`.em`; Jordan & Jacobs 1994) and
the two-stage recipe of chapter 4 (:mod:`.two_stage`).

Everything here is built from the same pieces as :class:`moe_lib.MoELayer` — a dense softmax router
(:class:`moe_lib.routers.DenseRouter`), a bank of experts (:class:`moe_lib.LinearExperts`) and a weighted
combine — plus the classical losses and trainers.
"""
from . import em, hme, losses, mixture, two_stage
from .em import (EMResult, TrainerCurves, arm_problem, compare_trainers, describe_reached, em_step,
                 epochs_to_converge, epochs_to_reach, fit_em, fit_gradient, irls_gate, least_squares_error,
                 relative_error)
from .hme import HME
from .losses import competitive_loss, cooperative_loss, mixture_output, posterior
from .mixture import FitResult, accuracy, expert_usage, fit_mixture_classifier, local_experts, mlp
from .two_stage import (EnsembleMean, fit_end_to_end, fit_ensemble, fit_experts_on_subsets, fit_gate,
                        gate_from_centres, kmeans, per_seed, ratio_verdict, recipe_summary, sparse_copy, top_expert_error,
                        train_recipes)

__all__ = [
    "EMResult", "EnsembleMean", "FitResult", "HME", "TrainerCurves", "accuracy", "arm_problem", "compare_trainers",
    "competitive_loss", "cooperative_loss", "describe_reached", "epochs_to_reach", "least_squares_error",
    "em", "em_step", "epochs_to_converge", "expert_usage", "fit_mixture_classifier", "fit_em", "fit_end_to_end", "fit_ensemble", "fit_experts_on_subsets",
    "fit_gate", "fit_gradient", "gate_from_centres", "hme", "irls_gate", "kmeans", "local_experts", "losses", "mixture",
    "mixture_output", "mlp", "per_seed", "posterior", "ratio_verdict", "recipe_summary", "relative_error", "sparse_copy", "top_expert_error", "train_recipes", "two_stage",
]
