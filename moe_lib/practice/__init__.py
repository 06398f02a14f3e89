"""Practice with mixtures of experts (Part V of the book): fine-tuning, upcycling and merging.

* :mod:`~moe_lib.practice.finetune` — parameter roles (router / experts / non-expert) and freezing by role
  (ST-MoE, Zoph et al. 2022, §4), expert dropout, router drift and expert utilisation;
* :mod:`~moe_lib.practice.upcycle` — sparse upcycling (Komatsuzaki et al. 2023): a dense FFN copied into
  every expert of a new MoE layer, or a whole dense :class:`~moe_lib.models.TransformerLM` made sparse;
* :mod:`~moe_lib.practice.merge` — several dense models merged into one MoE whose gate vectors are each
  source domain's mean hidden state (the "hidden" gate recipe behind Phixtral and SegMoE).
"""
from .finetune import (PARAMETER_ROLES, DropoutExperts, add_expert_dropout, expert_utilisation, finetune_lm,
                       finetune_recipes, freeze_roles, parameter_roles, per_seed_values, role_counts, router_drift,
                       top_expert_assignments)
from .merge import (domain_subset, ffn_inputs, gate_vectors_from_hidden, merge_finetunes, merge_into_moe,
                    merge_task_experts)
from .upcycle import UpcyclingRun, upcycle, upcycle_ffn, upcycling_comparison

__all__ = [
    "PARAMETER_ROLES", "parameter_roles", "role_counts", "freeze_roles", "DropoutExperts", "add_expert_dropout",
    "top_expert_assignments", "router_drift", "expert_utilisation", "finetune_lm", "finetune_recipes",
    "per_seed_values", "upcycle", "upcycle_ffn", "upcycling_comparison", "UpcyclingRun", "merge_into_moe",
    "gate_vectors_from_hidden", "ffn_inputs", "domain_subset", "merge_finetunes", "merge_task_experts",
]
