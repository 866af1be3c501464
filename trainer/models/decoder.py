"""One decoder for every family of healer/families.py (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3),
in the order data flows.

Module and parameter names mirror transformers' (model.embed_tokens, model.layers.N.self_attn.q_proj,
..., model.norm, lm_head), so HF safetensors keys and PEFT adapter keys map 1:1. Every linear LoRA
may target is a plain nn.Linear attribute (a bitsandbytes Linear4bit when loaded in 4-bit), so
LoRA wraps it by name. The math lives in ops.py, where kernels replace it. Which paths run (kernels,
FlexAttention, FP8, recompute) is the ModelOptions each module is built with; print(model) shows it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.models.ops import (
    AttentionShape,
    LayerMask,
    add_rms_norm,
    apply_rope,
    attention,
    causal_lm_loss,
    document_ids,
    gated_activation,
    layer_masks,
    logit_softcap,
    rms_norm,
    rope_tables,
    shift_targets,
)
from trainer.models.spec import ModelSpec, RopeSpec
from trainer.options import DEFAULT_OPTIONS, ModelOptions
from trainer.recompute import ActivationOffloader, OffloadedLayer


@dataclass
class CausalLMOutput:
    """logits [B, T, V] in the model dtype (final softcap applied); loss: float32 scalar when labels given."""

    logits: torch.Tensor | None  # None when the fused loss kernel ran (training on CUDA)
    loss: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + weight); Gemma stores w with offset 1, so its weights start at 0."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, options: ModelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.eps, self.offset, self.options = eps, offset, options
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, kernel=self.options.use_kernels(x))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm) in one pass: the residual stream and the next block's normed input."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.offset, kernel=self.options.use_kernels(x))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for integer positions; computed once per forward and shared by all layers."""

    def __init__(self, rope: RopeSpec):
        super().__init__()
        self.rope = rope
        self.register_buffer("inv_freq", rope.inv_freq(), persistent=False)
        if rope.kind == "longrope":
            self.register_buffer("long_inv_freq", rope.inv_freq(long=True), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        # LongRoPE switches to its long factors once the batch reaches past the pretraining length,
        # judged on the largest position as transformers does.
        if self.rope.kind == "longrope" and int(position_ids.max()) + 1 > self.rope.original_max_position_embeddings:
            inv_freq = self.long_inv_freq
        return rope_tables(position_ids, inv_freq, self.rope.attention_factor)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; per-layer sliding window and score softcap.

    With `spec.qk_norm` (Qwen3, Gemma 3) each head of q and of k is RMS-normed over head_dim before RoPE.
    """

    def __init__(self, spec: ModelSpec, layer_idx: int, options: ModelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.spec, self.options = spec, options
        h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        if spec.fused_qkv:
            # Phi-3 keeps q, k, v in one matrix. We keep it fused (LoRA wraps qkv_proj) so that module
            # names and adapter keys equal PEFT's for Phi3ForCausalLM, the checkpoint maps without
            # splitting, and one LoRA pair serves all three (PEFT targets qkv_proj the same way).
            self.qkv_proj = nn.Linear(spec.hidden_size, (h + 2 * kv) * d, bias=spec.qkv_bias)
        else:
            self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=spec.qkv_bias)
            self.k_proj = nn.Linear(spec.hidden_size, kv * d, bias=spec.qkv_bias)
            self.v_proj = nn.Linear(spec.hidden_size, kv * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps, spec.norm_offset, options)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps, spec.norm_offset, options)
        self.sliding_window = spec.sliding_windows[layer_idx]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: LayerMask) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        if s.fused_qkv:
            q, k, v = self.qkv_proj(x).split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                                              s.num_kv_heads * s.head_dim], dim=-1)
        else:
            q, k, v = self._qkv(x)
        if s.qk_norm:  # the norm's output is a fresh tensor, so RoPE below may still work in place
            q = self.q_norm(q.unflatten(-1, (s.num_heads, s.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (s.num_kv_heads, s.head_dim))).flatten(-2)
        # Rotated while still the projections' own [B, T, H * D] tensors, so the kernel can work in place
        # (Phi-3's split q, k are views of qkv and are rotated out of place: see kernels/rope.py).
        q, k = apply_rope(q, k, cos, sin, s.head_dim, kernel=self.options.use_kernels(q))
        q = q.view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        out = attention(q, k, v, mask, scale=s.attn_scale, softcap=s.attn_softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # imported here: trainer.lora imports trainer.models.ops, and so this package, at its top
        from trainer.lora import projections_use_kernel

        if projections_use_kernel(x, self.q_proj, self.k_proj, self.v_proj):
            # one Function for the three: x read once for their LoRA-A products, one input gradient
            # (imported here: importing Triton costs time the CPU-only paths need not pay)
            from trainer.kernels.lora_fused import lora_projections

            return lora_projections(x, (self.q_proj, self.k_proj, self.v_proj), fp8=self.options.fp8)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU or GeGLU.

    Where trainer.lora.mlp_uses_kernel allows (CUDA, LoRA without dropout or frozen bases), the whole block
    runs as one trainer.kernels.lora_fused.lora_mlp call, which keeps only x and the LoRA factors for
    backward. `recompute_gate_up` tells it whether its backward recomputes gate(x) and up(x) (True: without
    layer recompute, where every layer's activations wait for backward) or keeps them (False: with
    options.recompute on or offload, where the layer itself runs again right before its backward, so the
    fused MLP keeps gate(x) and up(x) from that run, for one layer at a time, instead of two more matmuls).
    """

    def __init__(self, spec: ModelSpec, options: ModelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.activation, self.fused, self.options = spec.activation, spec.fused_gate_up, options
        self.recompute_gate_up = options.recompute == "off"
        hidden, inter = spec.hidden_size, spec.intermediate_size
        if spec.fused_gate_up:  # Phi-3; fused for the same reason as qkv_proj
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=spec.mlp_bias)
        else:
            self.gate_proj = nn.Linear(hidden, inter, bias=spec.mlp_bias)
            self.up_proj = nn.Linear(hidden, inter, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor, *, output: bool = True) -> torch.Tensor:
        """output=False: the caller will not read the result's values (a recompute), so the fused path may
        skip the down product and return undefined values; the plain path computes it anyway."""
        # imported here: trainer.lora imports trainer.models.ops, and so this package, at its top
        from trainer.lora import mlp_uses_kernel

        gate_proj, up_proj = (self.gate_up_proj, None) if self.fused else (self.gate_proj, self.up_proj)
        if mlp_uses_kernel(x, self.options, gate_proj, up_proj, self.down_proj):
            from trainer.kernels.lora_fused import lora_mlp  # imported here: importing Triton takes time

            return lora_mlp(x, gate_proj, up_proj, self.down_proj, self.activation,
                            recompute=self.recompute_gate_up, output=output, fp8=self.options.fp8)
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(gated_activation(gate, up, self.activation, kernel=self.options.use_kernels(gate)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block; Gemma 2 and 3 also norm the attention and MLP outputs ("sandwich")."""

    def __init__(self, spec: ModelSpec, layer_idx: int, options: ModelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.sandwich = spec.sandwich_norms
        norm = lambda: RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset, options)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(spec, layer_idx, options)
        # The names follow the checkpoints: in Llama-style models post_attention_layernorm is the norm
        # *before* the MLP; in Gemma 2 and 3 it norms the attention output and pre_feedforward_layernorm
        # comes before the MLP.
        self.post_attention_layernorm = norm()
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(spec, options)
        # True while this layer runs again in backward (options.recompute on or offload): its output is
        # then not read, only differentiated or dropped
        self.in_recompute = False

    @contextmanager
    def recomputing(self) -> Iterator[None]:
        """Mark the enclosed forward as this layer's recompute (trainer.recompute and torch's checkpoint)."""
        self.in_recompute = True
        try:
            yield
        finally:
            self.in_recompute = False

    def recompute_context(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """torch.utils.checkpoint's context_fn: nothing around the forward, recomputing() around the recompute."""
        return nullcontext(), self.recomputing()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: LayerMask) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        # The residual add is fused with the norm that follows it inside the layer. The layer's last add
        # is not fused with the next layer's input norm: recompute (trainer/recompute.py) keeps
        # whole layers, and their boundary falls between the two.
        if self.sandwich:
            x, h = self.pre_feedforward_layernorm.forward_add(x, self.post_attention_layernorm(h))
            return x + self.post_feedforward_layernorm(self.mlp(h))
        x, h = self.post_attention_layernorm.forward_add(x, h)
        # In a recompute nothing reads this sum (the add saves nothing for backward), so the MLP may skip
        # its down product: a [tokens x intermediate x hidden] matmul, a third of the MLP's, per layer.
        # Not in Gemma 2/3 above: its post-MLP norm saves the MLP output for its backward.
        return x + self.mlp(h, output=not self.in_recompute)


class Decoder(nn.Module):
    """Embeddings, layers, final norm: transformers' `model` submodule."""

    def __init__(self, spec: ModelSpec, options: ModelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.spec, self.options = spec, options
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, padding_idx=spec.pad_token_id)
        self.rotary_emb = RotaryEmbedding(spec.rope)
        if spec.local_rope is not None:  # Gemma 3's sliding-window layers rotate with their own base
            self.local_rotary_emb = RotaryEmbedding(spec.local_rope)
        layers = [DecoderLayer(spec, i, options) for i in range(spec.num_layers)]
        # offload: each layer's input is parked in host memory by this one offloader (trainer.recompute)
        self.offloader = ActivationOffloader() if options.recompute == "offload" else None
        if self.offloader is not None:
            layers = [OffloadedLayer(layer, i, self.offloader) for i, layer in enumerate(layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset, options)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.spec.embed_scale is not None:
            # Gemma rounds sqrt(hidden) to the model dtype first (bf16: sqrt(3072) = 55.43 -> 55.5), and
            # its weights were trained with that rounding.
            h = h * float(torch.tensor(self.spec.embed_scale, dtype=h.dtype))
        return h

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                documents: torch.Tensor | None) -> torch.Tensor:
        h = self.embed(input_ids)
        s = self.spec
        tables = self.rotary_emb(position_ids)
        local_tables = self.local_rotary_emb(position_ids) if s.local_rope is not None else tables
        flex = self.options.use_flex_attention(input_ids)
        check = None
        if flex:  # q, k, v come out of the projections in the autocast dtype when autocast is on
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else h.dtype
            check = AttentionShape(s.num_heads, s.num_kv_heads, s.head_dim, dtype, s.attn_scale, s.attn_softcap)
        masks = layer_masks(documents, input_ids.shape[1], s.sliding_windows, input_ids.device,
                            flex=flex, softcap=s.attn_softcap, check=check)
        # Under CUDA graph capture (trainer.graphs, which captures only models without dropout) no layer
        # draws random numbers, and reading the generator's state would end the capture.
        keep_rng = not (h.is_cuda and torch.cuda.is_current_stream_capturing())
        for layer in self.layers:
            # each layer gets only its own mask: a dict keyed by None would trip the profiler's
            # record_shapes, which converts autograd.Function arguments (checkpoint's) to IValues
            mask = masks[layer.self_attn.sliding_window]
            cos, sin = tables if layer.self_attn.sliding_window is None else local_tables
            if self.options.recompute == "on" and self.training:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False, context_fn=layer.recompute_context,
                               preserve_rng_state=keep_rng)
            else:
                h = layer(h, cos, sin, mask)
        return self.norm(h)


class CausalLM(nn.Module):
    """The decoder plus lm_head: transformers' *ForCausalLM, trimmed to training."""

    def __init__(self, spec: ModelSpec, options: ModelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.spec, self.options = spec, options
        self.model = Decoder(spec, options)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.tie_weights()

    def extra_repr(self) -> str:
        return f"options={self.options}"

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head (call again after replacing either)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *,
                num_items_in_batch: int | torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids, labels, position_ids: [B, T]. Positions restarting mid-row start a new document
        (see ops.document_ids): attention and next-token targets never cross documents."""
        b, t = input_ids.shape
        documents = None
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        else:
            position_ids = position_ids.expand(b, t)
            documents = document_ids(position_ids)
            if not bool((documents[:, -1] != 0).any()):  # one document per row: plain causal (flash) path
                documents = None
        hidden = self.model(input_ids, position_ids, documents)
        if labels is not None and self.options.use_kernels(hidden) and type(self.lm_head) is nn.Linear \
                and self.lm_head.bias is None:
            # chunked loss: the [tokens x vocab] logits are never materialized (none are returned)
            from trainer.kernels import fused_linear_cross_entropy

            loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, shift_targets(labels, documents),
                                              softcap=self.spec.final_softcap, num_items_in_batch=num_items_in_batch)
            return CausalLMOutput(logits=None, loss=loss)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, shift_targets(labels, documents), softcap=self.spec.final_softcap,
                                  num_items_in_batch=num_items_in_batch)
        if self.spec.final_softcap is not None:
            logits = logit_softcap(logits, self.spec.final_softcap).to(logits.dtype)
        return CausalLMOutput(logits=logits, loss=loss)
