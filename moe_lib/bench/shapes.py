"""The MoE layer shapes the benchmark measures, and the token counts of its two phases.

One *shape* is one MoE FFN layer with SwiGLU experts: model width ``d``, expert hidden width ``f``,
``E`` routed experts, ``k`` experts per token (shared experts and the router are not part of it).
Every number comes from the model's published configuration (``config.json`` on the Hugging Face
Hub): Mixtral-8x7B ``hidden_size`` 4096, ``intermediate_size`` 14336, 8 experts, top-2; Qwen3-30B-A3B
2048 / ``moe_intermediate_size`` 768, 128 experts, top-8; DeepSeek-V3 7168 / 2048, 256 routed experts,
top-8; OLMoE-1B-7B 2048 / 1024, 64 experts, top-8; GPT-OSS-120B 2880 / 2880, 128 experts, top-4.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    """One MoE FFN layer: ``y = Σ_j w_j · (silu(x Wg_e) ⊙ x Wu_e) Wd_e`` over the ``k`` chosen experts."""

    name: str
    d: int  # model width (d_model)
    f: int  # hidden width of one expert (d_ff)
    E: int  # routed experts
    k: int  # experts per token

    @property
    def fine_grained(self) -> bool:
        """Many small experts (``E ≥ 64``): the shapes where grouped GEMMs lose the most to dense."""
        return self.E >= 64

    def expert_params(self) -> int:
        """Parameters of one expert: ``3·d·f`` (gate, up and down projections)."""
        return 3 * self.d * self.f

    def flops(self, T: int, backward: bool = False) -> int:
        """Useful FLOPs of the layer on ``T`` tokens: ``6·T·k·d·f`` forward, three times that with the
        backward (two GEMMs per forward GEMM: gradients of the input and of the weight)."""
        fwd = 6 * T * self.k * self.d * self.f
        return 3 * fwd if backward else fwd

    def as_dict(self) -> dict:
        return asdict(self)


#: The five production shapes of the issue (bf16 on the GPU).
SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
    Shape("deepseek-v3", 7168, 2048, 256, 8),
    Shape("olmoe-1b-7b", 2048, 1024, 64, 8),
    Shape("gpt-oss-120b", 2880, 2880, 128, 4),
)}

#: Tiny shapes for ``--smoke`` (CPU, float32, Triton interpreter): one coarse, one fine-grained.
SMOKE_SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("smoke-coarse", 32, 64, 4, 2),
    Shape("smoke-fine", 32, 32, 8, 4),
)}

#: The book's CPU shapes (float32, a laptop's 2 threads): Mixtral's coarse layout (``E = 8``, top-2) at two
#: widths and a fine-grained one (``E = 32``, top-4). Issue 16 measured the padded ``torch`` backend slower
#: than the ``loop`` backend on them; they are small enough to time on a CPU at :data:`CPU_PREFILL_T`.
CPU_SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("cpu-d128-e8", 128, 256, 8, 2),
    Shape("cpu-d256-e32", 256, 128, 32, 4),
    Shape("cpu-d512-e8", 512, 1024, 8, 2),
)}

#: Token counts: prefill (one long prompt, or a training micro-batch) and decode (one token per sequence).
PREFILL_T = (16384,)
DECODE_T = (1, 16, 64, 128)
SMOKE_PREFILL_T = (64,)
SMOKE_DECODE_T = (1, 16)
CPU_PREFILL_T = (4096,)  # T·k = 8192 or 16384 rows: 1.6 to 26 GFLOP per forward

PHASES = ("prefill", "decode")
MODES = ("fwd", "fwdbwd")  # forward; forward + backward (training)
ROUTINGS = ("router", "balanced", "zipf")


def get_shape(name: str) -> Shape:
    """Look a shape up by name among :data:`SHAPES`, :data:`CPU_SHAPES` and :data:`SMOKE_SHAPES`."""
    table = {**SHAPES, **CPU_SHAPES, **SMOKE_SHAPES}
    if name not in table:
        raise ValueError(f"unknown shape {name!r}; accepted: {sorted(table)}")
    return table[name]
