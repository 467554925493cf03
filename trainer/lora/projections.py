"""LoRA projections that read the same input, computed as one matrix product.

An attention's query, key and value projections all read the same tokens (the context's key and
value in cross-attention). With a LoRA on each, peft runs every
projection on its own: the base product, the rank-r down and up products and an add, forward and
backward, about fifteen kernels per projection, most of them too small to fill a GPU. Here a
group of projections is one product of the input with the stacked base weights *and* LoRA down
weights, one up product with the LoRA up weights placed block-diagonally, and one add; in the
backward the input's gradient is again one product. For an SDXL LoRA step that is about 2,000 fewer
kernels (see ``bench/NOTES.md``).

The arithmetic is peft's (``base(x) + lora_B(lora_A(x)) * scaling``) with the products grouped, so
results agree to rounding: each output element is the same dot product, accumulated in fp32 by
a differently shaped kernel. The LoRA parameters stay peft's, so saving, loading and resume see
nothing of this; a layer whose LoRA is not plain (dropout, DoRA, merged, several adapters) keeps
peft's own forward.

Only the UNets' attentions are grouped. SD3's joint attention, grouped the same way, measured
slower on an H100 (17.4 against 18.3 samples/s, batch 4 at 1024 px): gathering the gradients of
the two token streams' queries, keys and values for one product cost more than the kernels it
saved.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("finetune")


def groupable(layers: list[nn.Module]) -> bool:
    """Whether peft LoRA ``layers`` (one group's projections) can run as one product: each plain
    LoRA on an ``nn.Linear`` with one adapter, no dropout, the same scaling and input size."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if len(layers) < 2 or not all(type(layer) is LoraLinear for layer in layers):
        return False
    adapters = {tuple(layer.active_adapters) for layer in layers}
    if len(adapters) != 1 or len(next(iter(adapters))) != 1:
        return False
    (adapter,) = next(iter(adapters))
    scalings, inputs = set(), set()
    for layer in layers:
        if adapter not in layer.lora_A or layer.merged or layer.disable_adapters:
            return False
        if layer.use_dora.get(adapter) or adapter in getattr(layer, "lora_variant", {}):
            return False
        if getattr(layer, "fan_in_fan_out", False) or not isinstance(layer.get_base_layer(), nn.Linear):
            return False
        if not isinstance(layer.lora_dropout[adapter], nn.Identity):
            return False
        scalings.add(float(layer.scaling[adapter]))
        inputs.add(layer.get_base_layer().in_features)
    return len(scalings) == 1 and len(inputs) == 1


def grouped_lora_linear(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` for a :func:`groupable` group, in three products.

    ``x @ [W_1; ...; W_n; A_1; ...; A_n]^T`` gives every base output and every LoRA hidden
    state at once; the hidden states times the block-diagonal ``diag(B_1, ..., B_n)`` give the
    LoRA outputs, added and split.
    """
    adapter = layers[0].active_adapters[0]
    bases = [layer.get_base_layer() for layer in layers]
    downs = [layer.lora_A[adapter].weight for layer in layers]
    ups = [layer.lora_B[adapter].weight for layer in layers]
    scaling = layers[0].scaling[adapter]
    # The frozen base's dtype is the compute dtype (bf16 under mixed precision). LoRA weights are
    # cast to it before the cat, as autocast would cast them in F.linear, so the stacked weight
    # is built once, in that dtype.
    dtype = bases[0].weight.dtype
    weight = torch.cat([b.weight.to(dtype) for b in bases] + [d.to(dtype) for d in downs])
    bias = None
    if any(b.bias is not None for b in bases):
        parts = [
            b.bias.to(dtype) if b.bias is not None else x.new_zeros(b.out_features, dtype=dtype)
            for b in bases
        ]
        bias = torch.cat(parts + [x.new_zeros(sum(d.shape[0] for d in downs), dtype=dtype)])
    widths = [b.out_features for b in bases]
    out = F.linear(x, weight, bias)
    base, hidden = out.split([sum(widths), out.shape[-1] - sum(widths)], dim=-1)
    up = torch.block_diag(*[u.to(dtype) for u in ups])
    result = base + F.linear(hidden, up) * scaling
    return list(result.split(widths, dim=-1))


class GroupedProjectionsProcessor:
    """An attention processor whose grouped projections run through :func:`grouped_lora_linear`.

    Replaces diffusers' ``AttnProcessor2_0`` on the UNet attentions :func:`install` found
    eligible, and computes what it computes. A call with something it does not cover (an
    attention mask, image-shaped input, extra arguments, a context where it expected none or none
    where it expected one) goes to the processor it replaced.

    Args:
        original: the processor replaced.
        kind: "self" (a self-attention: q, k, v grouped) or "cross" (a cross-attention: the
            context's k, v grouped).
    """

    def __init__(self, original, kind: str):
        self.original = original
        self.kind = kind

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        context_as_expected = (encoder_hidden_states is None) == (self.kind == "self")
        if attention_mask is not None or args or kwargs or hidden_states.ndim != 3 or not context_as_expected:
            extra = {"temb": temb} if temb is not None else {}
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, *args, **extra, **kwargs
            )
        # AttnProcessor2_0 for 3-D input, no mask and none of the optional norms (install checks).
        batch = hidden_states.shape[0]
        if self.kind == "self":
            query, key, value = grouped_lora_linear([attn.to_q, attn.to_k, attn.to_v], hidden_states)
        else:
            query = attn.to_q(hidden_states)
            key, value = grouped_lora_linear([attn.to_k, attn.to_v], encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _processor_for(attn: nn.Module) -> GroupedProjectionsProcessor | None:
    """The grouped processor for ``attn``, or None where it has nothing to group or something this
    module does not reproduce."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processor = getattr(attn, "processor", None)
    if type(processor) is not AttnProcessor2_0:
        return None
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
        return None
    if getattr(attn, "is_cross_attention", False):
        ok = groupable([attn.to_k, attn.to_v])
        return GroupedProjectionsProcessor(processor, "cross") if ok else None
    ok = groupable([attn.to_q, attn.to_k, attn.to_v])
    return GroupedProjectionsProcessor(processor, "self") if ok else None


def install(model: nn.Module) -> int:
    """Group the LoRA projections of every eligible attention in ``model``; returns how many.

    Call after the LoRA is injected. :func:`uninstall` puts the replaced processors back.
    """
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), GroupedProjectionsProcessor):
            continue
        grouped = _processor_for(module) if hasattr(module, "set_processor") else None
        if grouped is None:
            continue
        # set_processor also logs and resets a cached flag; the attribute is all the forward reads.
        module.processor = grouped
        count += 1
    return count


def uninstall(model: nn.Module) -> None:
    """Put back the processors :func:`install` replaced."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, GroupedProjectionsProcessor):
            module.processor = processor.original
