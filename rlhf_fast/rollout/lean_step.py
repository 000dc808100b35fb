"""The uncaptured decode step for Llama-layout decoders, without transformers' per-call machinery.

A decode step feeds one token per row through the whole decoder. Through transformers' forward
that is ~60 module calls with their keyword plumbing, a causal mask rebuilt from the 2-D attention
mask, a cache update through `StaticCache`, output dataclasses: on the 2-core dev CPU, bench
`ppo_step`'s tiny model, 5.8-7.5 ms per step where the same arithmetic called directly takes
4.5-6.1 ms (the step's GEMMs, weight-read bound, are ~1.9 ms of it). A captured CUDA step replays
none of that Python, so this step serves the eager path only (the CPU, `compile=False`).

It runs the model's own modules (embeddings, norms, q/k/v/o projections, the MLP, the rotary
embedding), so a generation view's merged or low-rank layers, RoPE scaling and the norms' own
arithmetic are the model's; what it writes itself is the part between them: RoPE applied with the
model's `apply_rotary_pos_emb`, the new key and value written into the prefill's `StaticCache`
slot, and SDPA over the cache with the query heads grouped by key-value head (the layout
transformers 5.24's SDPA path also uses for one query token; earlier releases repeat the keys and
values per query head, the same sums in another kernel call), against a boolean mask kept across
steps (the prompt's attention mask, then one more visible slot per step).

Layouts reproduced (`supports`): the pre-norm residual decoder of Llama, Mistral, Qwen2 and Qwen3
(Qwen3's per-head q/k norms included), with SDPA attention; a sliding window only where the cache
is no longer than it. Any other model decodes through its own forward.
"""
import sys

import torch
from torch.nn import functional as F

from rlhf_fast.models.sharding import is_sharded
from rlhf_fast.models.trunk import decoder_of, unwrap_peft

# transformers model types whose decoder layer is exactly: x += attn(norm1(x)); x += mlp(norm2(x)),
# attention = q/k/v projections (Qwen3: a norm per head on q and k), RoPE, softmax(q k^T s) v, o projection
LAYOUTS = {"llama", "mistral", "qwen2", "qwen3"}
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups", "scaling")
LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def sliding_window(model) -> int | None:
    """The narrowest sliding attention window of the model's layers (None: every layer attends to
    the whole cache). Mistral declares one for every layer in its config; Qwen2/3 per layer."""
    config = unwrap_peft(model).config
    windows = [getattr(config, "sliding_window", None)] if config.model_type == "mistral" else [
        getattr(layer.self_attn, "sliding_window", None) for layer in decoder_of(model).layers]
    windows = [w for w in windows if w is not None]
    return min(windows) if windows else None


def supports(model, cache_length: int) -> bool:
    """Whether `LeanDecodeStep` computes what `model`'s own forward computes for a cache of
    `cache_length` slots. Not for eager or flex attention (eager's softmax runs in fp32 where
    SDPA's need not), and never for a sharded (FSDP2) model: its layers gather their weights in
    forward hooks that calling the projections directly would skip."""
    config = unwrap_peft(model).config
    if (getattr(config, "model_type", None) not in LAYOUTS or getattr(config, "_attn_implementation", None) != "sdpa"
            or is_sharded(model)):
        return False
    decoder = decoder_of(model)
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in decoder.layers:
        if not all(hasattr(layer, name) for name in LAYER_PARTS):
            return False
        if not all(hasattr(layer.self_attn, name) for name in ATTENTION_PARTS):
            return False
    if not hasattr(sys.modules[type(decoder.layers[0].self_attn).__module__], "apply_rotary_pos_emb"):
        return False
    window = sliding_window(model)
    return window is None or cache_length <= window


def after_prefill(model, cache, prompt_mask: torch.Tensor, cache_length: int) -> "LeanDecodeStep | None":
    """A LeanDecodeStep continuing from `cache`, a transformers StaticCache of `cache_length` slots
    that the model's forward has just filled with the prompts [B, P], or None where the model's
    forward must go on decoding: `supports` says no, or the cache is not one full-length key and
    value tensor per layer (a config that declares a sliding window gets shorter, rolling layers)."""
    layers = getattr(cache, "layers", None)
    if not layers or not supports(model, cache_length):
        return None
    full_length = [getattr(layer, part, None) is not None and getattr(layer, part).shape[2] == cache_length
                   for layer in layers for part in ("keys", "values")]
    if not all(full_length):
        return None
    step = LeanDecodeStep(model)
    step.begin(cache, prompt_mask)
    return step


class LeanDecodeStep:
    """Decode steps for one generation batch after its prefill: `begin` once, then one call per token.

    model: the module decoded with (a generation view, or the model itself); `supports(model)` true.
    """

    def __init__(self, model):
        self.decoder = decoder_of(model)
        self.layers = list(self.decoder.layers[:unwrap_peft(model).config.num_hidden_layers])
        attention = self.layers[0].self_attn
        # the model's own RoPE application, from the module that defines its attention class
        self.apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.head_dim = attention.head_dim
        self.groups = attention.num_key_value_groups
        self.keys = self.values = self.visible = None
        self.slot = 0

    def begin(self, cache, prompt_mask: torch.Tensor) -> None:
        """Continue from a prefill of the prompts [B, P] into `cache` (a transformers StaticCache
        with P slots written): the next token goes to slot P and sees the prompt's real tokens."""
        self.keys = [layer.keys for layer in cache.layers[:len(self.layers)]]
        self.values = [layer.values for layer in cache.layers[:len(self.layers)]]
        rows, prompt_length = prompt_mask.shape
        self.visible = torch.zeros((rows, 1, 1, self.keys[0].shape[2]), dtype=torch.bool, device=prompt_mask.device)
        self.visible[:, 0, 0, :prompt_length] = prompt_mask.bool()
        self.slot = prompt_length

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The final (normed) hidden state [B, D] after feeding input_ids [B, 1] at position_ids
        [B, 1]; its key and value go into the cache's next slot."""
        self.visible[..., self.slot] = True
        x = self.decoder.embed_tokens(input_ids)
        cos, sin = self.decoder.rotary_emb(x, position_ids)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            x = x + self._attend(layer.self_attn, layer.input_layernorm(x), cos, sin, keys, values)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.slot += 1
        return self.decoder.norm(x)[:, -1]

    def _attend(self, attention, x, cos, sin, keys, values):
        """The attention block's output [B, 1, D] for its normed input x [B, 1, D]; the new key and
        value [B, Hkv, 1, d] written into keys / values [B, Hkv, C, d] at this step's slot."""
        rows = x.shape[0]
        heads = (rows, 1, -1, self.head_dim)
        q, k = attention.q_proj(x).view(heads), attention.k_proj(x).view(heads)
        if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm over each head's dims
            q, k = attention.q_norm(q), attention.k_norm(k)
        v = attention.v_proj(x).view(heads).transpose(1, 2)
        q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        keys[:, :, self.slot] = k[:, :, 0]
        values[:, :, self.slot] = v[:, :, 0]
        # one query token: each key-value head's group of query heads as the query rows
        q = q.reshape(rows, keys.shape[1], self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.visible, scale=attention.scaling)
        return attention.o_proj(out.reshape(rows, 1, -1))
