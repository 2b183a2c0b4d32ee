"""Converting a softmax model to fastmax: attention transfer, then fine-tuning (LoLCATs-style).

Stage 1, attention transfer. Two passes over the same batch:

1. the teacher pass (no gradient, LoRA adapters disabled, "fastmax_teacher"): the softmax
   model as it was; every attention layer records its SDPA output;
2. the student pass ("fastmax_distill"): every layer computes fastmax from its own
   trainable q/k (LoRA on q_proj/k_proj, a ``QueryGain``) and returns the recorded
   teacher output, so the residual stream, and with it every layer's input, is exactly
   the teacher's (teacher forcing). The loss is the MSE between student and teacher
   outputs, averaged over layers. Only these attention-side parameters train.

Stage 2, fine-tuning with fastmax, LoRA (peft) or full, on the language-modelling loss,
optionally mixed with the KL divergence from the softmax model's next-token distribution
(``logit_kl``).

The ``QueryGain``: a complex gain g_hf = a_hf + i b_hf per query head h and RoPE
frequency f, applied to the pair (x_f, x_{f+D/2}) that rotary embeddings rotate
together (Llama's rotate_half layout):

    x_f' = a x_f - b x_{f+D/2}      x_{f+D/2}' = b x_f + a x_{f+D/2}

A complex gain commutes with the RoPE rotation (both are complex multiplications), so
after training it folds exactly into the rows of q_proj, and the converted model is a
plain transformers model with no extra module: ``fold_query_gains``. Scores become
s_ij = Re(sum_f g_f q_if conj(k_jf)) * scale: a learned per-head temperature (b = 0,
a constant) generalised to a weight and phase per frequency. Gains on k would add
nothing (only the product of q's and k's gains enters s), so q alone carries them.

    from fastmax_hf import distill
    model, params = distill.start_attention_transfer(model, lora_rank=8)  # all else frozen
    distill.record_teacher(model, input_ids)          # pass 1
    model(input_ids)                                  # pass 2
    loss = distill.attention_transfer_loss(model)
    ...
    model = distill.finish_attention_transfer(model)  # LoRA merged, gains folded, "fastmax"
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TEACHER_ATTENTION = "fastmax_teacher"  # SDPA that records its output for the student pass
DISTILL_ATTENTION = "fastmax_distill"  # teacher-forced: returns the recorded softmax output, records the MSE
GAINED_ATTENTION = "fastmax_gained"  # the student alone: fastmax on gained queries (evaluation in stage 1)
GAIN_ATTRIBUTE = "fastmax_query_gain"


class QueryGain(nn.Module):
    """A complex gain per query head and RoPE frequency pair; the identity at initialisation.

    real, imag: (H, D/2). forward: q (B, H, N, D) -> (B, H, N, D).
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"QueryGain pairs dimensions (f, f + D/2), so head_dim must be even, got {head_dim}")
        self.real = nn.Parameter(torch.ones(num_heads, head_dim // 2))
        self.imag = nn.Parameter(torch.zeros(num_heads, head_dim // 2))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        a = self.real[None, :, None, :].to(q.dtype)  # (1, H, 1, D/2)
        b = self.imag[None, :, None, :].to(q.dtype)
        x1, x2 = q.chunk(2, dim=-1)  # (B, H, N, D/2) each
        return torch.cat([a * x1 - b * x2, b * x1 + a * x2], dim=-1)

    @torch.no_grad()
    def fold(self, rows: torch.Tensor) -> torch.Tensor:
        """The same gain applied to the rows of a projection that produces q before RoPE.

        rows: (H * D, ...) (a q_proj weight (H*D, in) or bias (H*D,)) -> same shape.
        """
        H, half = self.real.shape
        r = rows.reshape(H, 2, half, -1)  # head-major, then the two halves that RoPE pairs
        a = self.real.to(rows.dtype)[:, :, None]  # (H, D/2, 1)
        b = self.imag.to(rows.dtype)[:, :, None]
        x1, x2 = r[:, 0], r[:, 1]  # (H, D/2, in)
        return torch.stack([a * x1 - b * x2, b * x1 + a * x2], dim=1).reshape(rows.shape)


# --------------------------------------------------------------------------- which modules


def query_projection(attention: nn.Module) -> tuple[str, nn.Module] | None:
    """How ``attention`` makes its queries: ("q_proj", Linear) for the Llama family,
    ("c_attn", Conv1D) for GPT-2 self-attention, None for anything else. Under a peft
    LoRA wrapper the wrapped layer (``base_layer``) is returned."""
    if not hasattr(attention, "head_dim"):
        return None
    q_proj = getattr(attention, "q_proj", None)
    if isinstance(getattr(q_proj, "base_layer", q_proj), nn.Linear):
        return "q_proj", getattr(q_proj, "base_layer", q_proj)
    c_attn = getattr(attention, "c_attn", None)
    if c_attn is not None and not getattr(attention, "is_cross_attention", False):
        return "c_attn", getattr(c_attn, "base_layer", c_attn)
    return None


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules whose queries a QueryGain can act on (a module holding q_proj or c_attn)."""
    return [m for m in model.modules() if query_projection(m) is not None]


def num_query_heads(attention: nn.Module) -> int:
    kind, proj = query_projection(attention)
    width = proj.out_features if kind == "q_proj" else proj.nf // 3  # c_attn makes q, k and v side by side
    return width // attention.head_dim


# --------------------------------------------------------------------------- attention functions


def _student_attention(module, query, key, value, scaling, **kwargs):
    """Fastmax exactly as the converted model will run it ("fastmax" registered by
    fastmax_hf.integration), on queries passed through the module's QueryGain. (B, N, H, Dv)"""
    gained = getattr(module, GAIN_ATTRIBUTE)(query)
    fastmax_attention = ALL_ATTENTION_FUNCTIONS["fastmax"]
    out, _ = fastmax_attention(module, gained, key, value, None, dropout=0.0, scaling=scaling, **kwargs)
    return out


def _refuse_padding(attention_mask):
    # Attention transfer runs on packed blocks: no padding, so sdpa's mask function gives None
    # (plain causal). A mask here would need the padding handled twice, once per attention.
    if attention_mask is not None:
        raise ValueError(
            "attention transfer expects packed, unpadded batches (attention_mask=None); got a mask of shape "
            f"{tuple(attention_mask.shape)}"
        )


def fastmax_teacher_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA (B, N, Hq, D) that also keeps its output on the module for the student pass."""
    _refuse_padding(attention_mask)
    out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, **kwargs)
    module.fastmax_teacher_output = out.detach()
    return out, None


def fastmax_distill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Teacher-forced attention transfer, as an AttentionInterface function.

    query (B, Hq, N, D), key/value (B, Hk, N, D) -> (the recorded teacher output (B, N, Hq, D), None).
    Records ``module.fastmax_distill_mse``: mean squared difference between the fastmax output
    on gained queries and the teacher's (a scalar with a graph to the trainable q/k parameters).
    """
    _refuse_padding(attention_mask)
    teacher = module.__dict__.pop("fastmax_teacher_output", None)
    if teacher is None or teacher.shape[:2] != (query.shape[0], query.shape[2]):
        raise RuntimeError("no teacher output recorded for this batch: call distill.record_teacher(model, input_ids) first")
    student = _student_attention(module, query, key, value, scaling, **kwargs)
    module.fastmax_distill_mse = F.mse_loss(student.float(), teacher.float())
    return teacher, None


def fastmax_gained_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The student alone (fastmax on gained queries), to evaluate it during attention transfer."""
    _refuse_padding(attention_mask)
    return _student_attention(module, query, key, value, scaling, **kwargs), None


def register_distill_attention() -> None:
    """Register the three functions with transformers, and sdpa's mask function for them
    (None for unpadded causal batches, which ``_refuse_padding`` checks)."""
    functions = ((TEACHER_ATTENTION, fastmax_teacher_attention), (DISTILL_ATTENTION, fastmax_distill_attention),
                 (GAINED_ATTENTION, fastmax_gained_attention))
    for name, fn in functions:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


register_distill_attention()


# --------------------------------------------------------------------------- the two stages


def set_attention(model: nn.Module, name: str) -> None:
    """Switch every attention layer of ``model`` (a PreTrainedModel or a peft wrapper) to ``name``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Temporarily run ``model`` with another attention implementation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    set_attention(base, name)
    try:
        yield model
    finally:
        set_attention(base, previous)


def check_foldable(model: nn.Module) -> None:
    """Raise ValueError unless every attention layer's gains can fold into its query projection.

    A model that normalises q after projecting it (Qwen3's per-head q_norm) would undo a gain
    folded into q_proj, and the normalisation's weight is shared by the heads.
    """
    modules = self_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with q_proj or c_attn for query gains")
    normalised = [type(m).__name__ for m in modules if hasattr(m, "q_norm")]
    if normalised:
        raise ValueError(
            f"{normalised[0]} normalises q after q_proj (q_norm), so query gains cannot fold into q_proj: "
            "convert this model with --mode swap"
        )


def attach_query_gains(model: nn.Module) -> list[QueryGain]:
    """Give every self-attention module an identity ``QueryGain`` (kept in fp32 for the optimiser)."""
    check_foldable(model)
    modules = self_attention_modules(model)
    gains = []
    for attention in modules:
        proj = query_projection(attention)[1]
        gain = QueryGain(num_query_heads(attention), attention.head_dim).to(proj.weight.device)
        attention.add_module(GAIN_ATTRIBUTE, gain)
        gains.append(gain)
    return gains


@torch.no_grad()
def fold_query_gains(model: nn.Module) -> int:
    """Fold every QueryGain into its query projection and remove it; returns how many were folded.

    Afterwards the model computes with plain "fastmax" exactly what it computed with the
    gains, and saves as an ordinary transformers checkpoint.
    """
    folded = 0
    for attention in self_attention_modules(model):
        gain = getattr(attention, GAIN_ATTRIBUTE, None)
        if gain is None:
            continue
        kind, proj = query_projection(attention)
        if kind == "q_proj":  # Linear weight (H*D, in): the rows are q's features
            proj.weight.copy_(gain.fold(proj.weight))
            if proj.bias is not None:
                proj.bias.copy_(gain.fold(proj.bias))
        else:  # GPT-2 Conv1D weight (in, 3E): the first E columns make q
            E = proj.nf // 3
            proj.weight[:, :E] = gain.fold(proj.weight[:, :E].t()).t()
            proj.bias[:E] = gain.fold(proj.bias[:E])
        delattr(attention, GAIN_ATTRIBUTE)
        folded += 1
    return folded


QK_LORA_TARGETS = {"q_proj": ["q_proj", "k_proj"], "c_attn": ["c_attn"]}  # GPT-2 makes q, k, v in one layer


def start_attention_transfer(model: nn.Module, lora_rank: int = 0):
    """Stage 1: freeze the model, attach query gains (and LoRA of ``lora_rank`` on the q/k
    projections when > 0), switch to the teacher-forced attention.

    Returns (model, the trainable parameters); the model is a peft wrapper when lora_rank > 0.
    """
    model.requires_grad_(False)
    gains = attach_query_gains(model)
    params = [p for gain in gains for p in gain.parameters()]
    if lora_rank > 0:
        kind = query_projection(self_attention_modules(model)[0])[0]
        model = add_lora(model, rank=lora_rank, targets=QK_LORA_TARGETS[kind])
        params += [p for name, p in model.named_parameters() if "lora_" in name]
        for p in params:  # peft froze everything it did not add, the gains included
            p.requires_grad_(True)
    set_attention(model, DISTILL_ATTENTION)
    return model, params


@torch.no_grad()
def record_teacher(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Pass 1: run the softmax model as it was (adapters off) and keep each layer's attention output."""
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapters_off, attention_implementation(model, TEACHER_ATTENTION):
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)  # logits are not needed


def attention_transfer_loss(model: nn.Module) -> torch.Tensor:
    """Mean over layers of the MSE recorded by the last student pass (and clear the records)."""
    losses = []
    for attention in self_attention_modules(model):
        mse = attention.__dict__.pop("fastmax_distill_mse", None)
        if mse is not None:
            losses.append(mse)
    if not losses:
        raise RuntimeError(f"no attention transfer loss recorded: run the model with attn_implementation={DISTILL_ATTENTION!r}")
    return torch.stack(losses).mean()


def finish_attention_transfer(model: nn.Module) -> nn.Module:
    """End of stage 1: merge the q/k LoRA into the weights, then fold the gains into q (the gain
    acts on what the merged projection makes), unfreeze, switch to "fastmax".

    Returns the plain transformers model.
    """
    model = merge_lora(model)
    fold_query_gains(model)
    model.requires_grad_(True)
    set_attention(model, "fastmax")
    return model


# --------------------------------------------------------------------------- stage 2


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over tokens.

    (B, N, V), (B, N, V) -> scalar, in fp32. The whole distribution per token carries far
    more signal than the one sampled next token, so fine-tuning after attention transfer
    learns from the softmax model as well as from the data.
    """
    student = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)  # (B*N, V)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def lora_targets(model: nn.Module) -> list[str]:
    """The linear layers LoRA adapts: attention and MLP projections that exist in ``model``."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for targets in (LLAMA_LORA_TARGETS, GPT2_LORA_TARGETS):
        present = [t for t in targets if t in names]
        if present:
            return present
    raise ValueError(f"found none of {LLAMA_LORA_TARGETS + GPT2_LORA_TARGETS} in {type(model).__name__} for LoRA")


def add_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, targets: list[str] | None = None):
    """Wrap ``model`` with peft LoRA adapters (default: on every attention and MLP projection).

    Only the adapters train (peft freezes the rest). Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    targets = targets or lora_targets(model)
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
        target_modules=targets, task_type="CAUSAL_LM",
        fan_in_fan_out=any(t in GPT2_LORA_TARGETS for t in targets),  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain transformers model with LoRA adapters merged into its weights (no-op without peft)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
