"""The rollout engine: the one path by which every stage samples (a stage never calls HF `generate`).

One call of `RolloutEngine.sample`:
  1. refresh the generation view (weights.py): the policy's current adapters, never the base;
  2. left-pad the prompts to P columns, repeat each `num_samples` times (rows grouped by prompt),
     split the rows into generation batches of `generation_batch_size`;
  3. per batch: one prefill forward into a static KV cache of C = P + max_new_tokens slots (on
     CUDA, C = max_length or a multiple of 64, and the rows padded to a fixed count, so the
     captured decode step is reused), then one decode step per new token: forward of the last
     token, temperature / top-k / top-p, draw, EOS bookkeeping; stop when every row has ended;
  4. assemble the `Rollout`, with the log-prob each sampled token was drawn with (and, asked for,
     the trunk's final hidden state before each response token: `return_hidden`).
Uncaptured decode steps of Llama-layout models run through `LeanDecodeStep` (lean_step.py), the
model's own modules without transformers' per-call machinery; the prefill always goes through the
model's forward.
Position ids are cumsum(attention_mask) - 1, as `models.trunk.last_hidden` makes them in
training, so a token is scored at the position it was sampled at.
"""
import inspect
import weakref

import torch
from torch.nn import functional as F
from transformers import StaticCache

from rlhf_fast import distributed
from rlhf_fast.data import pad_batch
from rlhf_fast.device import autocast, module_device
from rlhf_fast.models.modes import evaluating
from rlhf_fast.models.sharding import is_sharded
from rlhf_fast.models.trunk import decoder_of, fusable_head, lm_head_of, unwrap_peft
from rlhf_fast.rollout import lean_step
from rlhf_fast.rollout.frame import Rollout
from rlhf_fast.rollout.gathered import GatheredCopy, gathered_copy_bytes, resolve_sharded_weights
from rlhf_fast.rollout.sampling import SamplingConfig, check_sampling_args, check_stop, choose_tokens
from rlhf_fast.rollout.stops import StopStrings
from rlhf_fast.rollout.weights import GenerationView, merged_copy_bytes, resolve_weights

# CUDA only: the KV cache length is rounded up to this many slots when no max_length fixes it, so
# prompts of similar lengths share one captured decode step.
CUDA_LENGTH_BUCKET = 64
# CUDA only: decode steps between checks that every row has ended (each check syncs the host).
CUDA_EOS_CHECK_EVERY = 8


def compile_step(step):
    """The decode step, captured once per shape: torch.compile with CUDA graphs."""
    return torch.compile(step, mode="reduce-overhead", dynamic=False)


def fp32_logits(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """hidden [B, D] @ W.T + b as fp32 logits [B, V], products summed in fp32 and never rounded to the
    weights' dtype: what the trainer's fused head (kernels.token_logprobs) computes. A bf16 LM head
    rounds each logit to 8 bits of mantissa (about 0.03 at a logit of 10), which would move every
    log-prob by that much."""
    weight = head.weight
    if weight.dtype == hidden.dtype == torch.float32:
        logits = F.linear(hidden, weight)
    elif hidden.is_cuda and weight.dtype == hidden.dtype:  # cuBLAS: half-precision in, fp32 sums and out
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:  # the CPU, or mixed dtypes: fp32 copies, fp32 sums
        logits = F.linear(hidden.float(), weight.float())
    return logits if head.bias is None else logits + head.bias.float()


class RolloutEngine:
    """Samples responses from a causal LM (plain, or peft with LoRA adapters) at merged-weight
    speed without ever writing to its weights.

    model: a transformers *ForCausalLM or a PeftModel wrapping one; the engine holds it weakly
    and samples from whatever adapters are active (or disabled) at each call.
    generation_weights: "merged_copy" | "lora" | "auto" (see weights.py and SamplingConfig); an
    unsharded model without LoRA layers is read directly whatever the choice ("none"); a sharded
    (FSDP2) one decodes from a gathered copy or through its shards (gathered.py).
    generation_batch_size: rows decoded together (0 = all rows of a call).
    max_length: a fixed KV-cache length (prompt + max_new_tokens must fit), so that CUDA captures
    the decode step once per run; 0 = sized per call.
    eos_token_ids: the ids that end a response (default: the tokenizer's EOS).
    compile: capture the decode step (torch.compile, mode "reduce-overhead"); default: on CUDA.
    fp32_head: the logits come from the model's decoder and an fp32 head (`fp32_logits`), as the
    trainer's fused head computes them, so that the rollout's log-probs can stand in for the
    trainer's (PPO's old_logprobs "rollout"). Needs an LM head that is a plain linear layer
    (`fusable_head`).
    return_hidden: every Rollout carries `response_hidden`, the trunk's final hidden state before
    each response token (what a value head on the policy trunk reads); implies fp32_head.
    lean: uncaptured decode steps go through `LeanDecodeStep` where `lean_step.supports` the model
    (the same arithmetic, less Python); False: through the model's forward, as captured steps do.
    """

    def __init__(self, model, tokenizer, *, generation_weights: str = "auto", generation_batch_size: int = 0,
                 max_length: int = 0, eos_token_ids=None, compile: bool | None = None, fp32_head: bool = False,
                 return_hidden: bool = False, lean: bool = True):
        if generation_batch_size < 0:
            raise ValueError(f"generation_batch_size must be >= 0 (0 = one batch), got {generation_batch_size}")
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0 (0 = sized per call), got {max_length}")
        eos = tokenizer.eos_token_id if eos_token_ids is None else eos_token_ids
        if eos is None or tokenizer.pad_token_id is None:
            raise ValueError("rollout engine: the tokenizer needs an EOS and a pad token")
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        self.pad_id = tokenizer.pad_token_id
        self.generation_batch_size, self.max_length = generation_batch_size, max_length
        self.device = module_device(model)
        self.dtype = next(unwrap_peft(model).parameters()).dtype
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        self.requested_weights = generation_weights
        self._set_weights(model)
        self.fp32_head, self.return_hidden = fp32_head or return_hidden, return_hidden
        self.lean = lean
        if self.fp32_head:
            fusable_head(model)
        forward = inspect.signature(unwrap_peft(model).forward).parameters
        # the KV cache argument: `past_key_values` in transformers 5.17, `cache` in 5.24
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._model = weakref.ref(model)
        self._tokenizer = tokenizer  # stop strings are matched on its text
        self._view: GenerationView | GatheredCopy | None = None
        self._step = None
        self._cache, self._cache_shape = None, None
        self._inputs, self._inputs_key = None, None
        self._eos = torch.tensor(self.eos_ids, device=self.device)

    @property
    def copy_bytes(self) -> int:
        """Bytes the generation copy holds: the merged copy of the adapted layers, or a sharded
        policy's gathered copy (0 when the engine decodes from the policy's own weights)."""
        model = self._model()
        if model is None or self.weights not in ("merged_copy", "gathered"):
            return 0
        return merged_copy_bytes(model) if self.weights == "merged_copy" else gathered_copy_bytes(model)

    def kv_cache_rows(self, rows: int) -> int:
        """Rows of the KV cache (and of each decode step) for a call with `rows` rows: the
        generation batch, rounded up to a power of two where the step is captured so that few
        shapes are ever captured (every batch of a call, the last too, has this many rows)."""
        batch = min(self.generation_batch_size or rows, rows)
        return 1 << (batch - 1).bit_length() if self.compile else batch

    def sample_with(self, prompts: list[list[int]], sampling: SamplingConfig, *, num_samples: int = 1,
                    do_sample: bool = True, generator: torch.Generator | None = None,
                    rows: slice | None = None) -> Rollout:
        """`sample` with a stage's SamplingConfig."""
        return self.sample(prompts, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                           top_p=sampling.top_p, top_k=sampling.top_k, num_samples=num_samples,
                           do_sample=do_sample, generator=generator, rows=rows, stop=sampling.stop)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, do_sample: bool = True,
               generator: torch.Generator | None = None, rows: slice | None = None, stop=()) -> Rollout:
        """`num_samples` responses per prompt, rows grouped by prompt, as a Rollout [B, L] with
        B = len(prompts) * num_samples and its `logprobs` [B, L-1] fp32.

        prompts: token id lists (non-empty). do_sample=False decodes greedily (argmax; the
        log-probs still use `temperature`). generator: the RNG of the draws (default: torch's
        global one). stop: strings that end a response at the token completing the first of them
        (kept; stops.py), as EOS does. Never writes to the model's weights, never changes its
        train/eval mode.

        rows: generate only these rows of the B (a rank's share under torchrun, with every rank
        calling with the same prompts and generator state). They come out as the whole batch's
        would: left-padded to the whole batch's prompt length, each step's noise drawn for all B
        rows (the share's rows kept), and every rank decodes until all ranks' rows have ended, so
        the ranks' shares together equal one process's rollout of B rows in one generation batch.
        """
        check_sampling_args(max_new_tokens, temperature, top_p, top_k)
        check_stop(stop)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not prompts:
            raise ValueError("sample needs at least one prompt")
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty: a response needs at least one prompt token")
        module = self._refreshed_view()
        prompt_ids, prompt_mask = (t.to(self.device).repeat_interleave(num_samples, dim=0)
                                   for t in pad_batch(prompts, self.pad_id, side="left"))
        whole_batch = prompt_ids.shape[0]
        share = slice(*(rows or slice(None)).indices(whole_batch))
        prompt_ids, prompt_mask = prompt_ids[share], prompt_mask[share]
        rows, prompt_length = prompt_ids.shape
        if rows == 0:
            raise ValueError(f"rows {share} of a batch of {whole_batch} is empty")
        cache_length = self._cache_length(prompt_length, max_new_tokens)
        batch = min(self.generation_batch_size or rows, rows)
        padded = self.kv_cache_rows(rows)
        sampling = (temperature, top_k, top_p, do_sample)
        # a share draws each step's noise as the whole batch in one generation batch would
        noise_rows = None if share.stop - share.start == whole_batch else max(self.kv_cache_rows(whole_batch), whole_batch)
        with evaluating(module):
            pieces = [self._generate(module, prompt_ids[first:first + batch], prompt_mask[first:first + batch],
                                     padded, cache_length, max_new_tokens, sampling, generator,
                                     None if noise_rows is None else (noise_rows, share.start + first),
                                     StopStrings(self._tokenizer, tuple(stop), min(batch, rows - first)) if stop
                                     else None)
                      for first in range(0, rows, batch)]
        return self._assemble(prompt_ids, prompt_mask, pieces)

    # 1. the view
    def _refreshed_view(self):
        model = self._model()
        if model is None:
            raise RuntimeError("rollout engine: its model no longer exists")
        if (self.weights in ("gathered", "sharded")) != is_sharded(model):  # sharded since the engine was made
            self._set_weights(model)
        if self.weights == "sharded":
            return model  # through the FSDP2 module itself: its hooks gather each layer at every step
        view_class = GatheredCopy if self.weights == "gathered" else GenerationView
        if not isinstance(self._view, view_class) or not self._view.matches(model):
            if view_class is GenerationView:  # other adapters: the merged copy's size changed
                self._set_weights(model)
            self._view = (GatheredCopy(model) if self.weights == "gathered" else
                          GenerationView(model, "merged_copy" if self.weights == "merged_copy" else "lora"))
            self._step, self._cache, self._cache_shape, self._inputs, self._inputs_key = (None,) * 5
        self._view.refresh()
        return self._view.module

    def _set_weights(self, model) -> None:
        """self.weights for `model` as it is now (weights.resolve_weights; for a sharded model
        gathered.resolve_sharded_weights, a collective). Decoding through the shards is never
        captured: each step runs FSDP2's all-gathers."""
        if not is_sharded(model):
            self.weights = resolve_weights(self.requested_weights, model, self.device)
            return
        self.weights = resolve_sharded_weights(self.requested_weights, model, self.device)
        if self.weights == "sharded":
            self.compile = False

    # 2. shapes
    def _cache_length(self, prompt_length: int, max_new_tokens: int) -> int:
        needed = prompt_length + max_new_tokens
        if self.max_length and needed > self.max_length:
            raise ValueError(f"prompt ({prompt_length} tokens, left-padded) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the engine's max_length {self.max_length}")
        if not self.compile:
            return needed
        return self.max_length or -(-needed // CUDA_LENGTH_BUCKET) * CUDA_LENGTH_BUCKET

    def _kv_cache(self, module, rows: int, length: int) -> StaticCache:
        """A static cache of `rows` x `length` slots; a captured step keeps reusing one (its
        tensors are static addresses in the CUDA graph), so it is held between calls."""
        if self.compile and self._cache_shape == (rows, length):
            self._cache.reset()
            return self._cache
        cache = StaticCache(config=module.config, max_cache_len=length)
        if self.compile:
            self._cache, self._cache_shape = cache, (rows, length)
        return cache

    # 3. decode
    def _forward_last(self, module, cache, input_ids, attention_mask, position_ids, lean=None):
        """(fp32 logits [B, V] of the last position, its final hidden state [B, D] where fp32_head,
        else None), the KV cache filled in place; through `lean` (a LeanDecodeStep holding its
        own mask) where given, one token per row."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **{self._cache_arg: cache})
        with autocast(self.device, self.dtype):
            if lean is None and not self.fp32_head:  # the model's own head, whatever it does
                return module(**inputs, logits_to_keep=1).logits[:, -1].float(), None
            hidden = (decoder_of(module)(**inputs).last_hidden_state[:, -1] if lean is None else
                      lean(input_ids, position_ids))
            if not self.fp32_head:  # a lean layout's head is a plain linear layer
                return lm_head_of(module)(hidden).float(), None
        return fp32_logits(hidden, lm_head_of(module)), hidden

    def _pick(self, logits, finished, lengths, noise, sampling):
        """Next tokens [B] (pad for rows that have ended), their log-probs [B] (0 there), which
        rows have ended [B] and response lengths [B] after this token."""
        temperature, top_k, top_p, _ = sampling
        tokens, logprobs = choose_tokens(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens = tokens.masked_fill(finished, self.pad_id)
        logprobs = logprobs.masked_fill(finished, 0.0)
        lengths = lengths + (~finished).long()
        return tokens, logprobs, finished | torch.isin(tokens, self._eos), lengths

    def _decode_step(self, module, cache, last_tokens, position_ids, attention_mask, finished, lengths, noise,
                     sampling, lean=None):
        logits, hidden = self._forward_last(module, cache, last_tokens, attention_mask, position_ids, lean)
        return *self._pick(logits, finished, lengths, noise, sampling), hidden if self.return_hidden else None

    def _step_inputs(self, rows: int, cache_length: int, vocab: int) -> dict[str, torch.Tensor]:
        """The decode step's tensor inputs, rewritten in place every step. Where the step is
        captured they are held between calls at fixed addresses (marked static, like the KV
        cache), so a CUDA-graph replay copies nothing in; made per call otherwise. The largest is
        the sampling noise, rows x vocab fp32 (131 MB at 256 x 128256)."""
        key = (rows, cache_length, vocab)
        if self.compile and self._inputs_key == key:
            return self._inputs
        inputs = {"attention_mask": torch.ones((rows, cache_length), dtype=torch.long, device=self.device),
                  "last_tokens": torch.zeros((rows, 1), dtype=torch.long, device=self.device),
                  "position_ids": torch.zeros((rows, 1), dtype=torch.long, device=self.device),
                  "finished": torch.zeros(rows, dtype=torch.bool, device=self.device),
                  "lengths": torch.zeros(rows, dtype=torch.long, device=self.device),
                  "noise": torch.empty((rows, vocab), dtype=torch.float32, device=self.device)}
        if self.compile:
            for tensor in inputs.values():
                torch._dynamo.mark_static_address(tensor)
            self._inputs, self._inputs_key = inputs, key
        return inputs

    def _generate(self, module, prompt_ids, prompt_mask, padded, cache_length, max_new_tokens, sampling, generator,
                  noise_rows: tuple[int, int] | None = None, stops: StopStrings | None = None):
        """(tokens [b, n] int64, log-probs [b, n] fp32, lengths [b], ended [b], hidden [b, n, D] or
        None) for one generation batch of b rows, decoded as `padded` >= b rows; n <= max_new_tokens
        is the longest response, pad / 0 after each row's end (hidden: the state each token was
        drawn from; after a row's end, whatever the step computed). noise_rows = (B, first): these
        rows are rows first.. of a batch of B whose noise is drawn whole each step, and decoding
        goes on until every rank's rows have ended. stops: the batch's stop strings, checked
        where the end of every row is."""
        rows, prompt_length = prompt_ids.shape
        if padded > rows:  # filler rows repeat the last real one and are dropped at the end
            prompt_ids = torch.cat([prompt_ids, prompt_ids[-1:].expand(padded - rows, -1)])
            prompt_mask = torch.cat([prompt_mask, prompt_mask[-1:].expand(padded - rows, -1)])
        cache = self._kv_cache(module, padded, cache_length)
        x = self._step_inputs(padded, cache_length, module.get_output_embeddings().weight.shape[0])
        # slots after the prompt hold real tokens; causality hides the ones not written yet
        x["attention_mask"].fill_(1)
        x["attention_mask"][:, :prompt_length] = prompt_mask
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        x["position_ids"].copy_(position_ids[:, -1:] + 1)
        x["finished"].zero_()
        x["lengths"].zero_()
        do_sample = sampling[3]

        def noise():
            if not do_sample:
                return None
            if noise_rows is None:
                return x["noise"].exponential_(generator=generator)
            whole = torch.empty((noise_rows[0], x["noise"].shape[1]), dtype=torch.float32, device=self.device)
            whole.exponential_(generator=generator)
            x["noise"][:rows].copy_(whole[noise_rows[1]:noise_rows[1] + rows])
            x["noise"][rows:].fill_(1.0)  # filler rows, dropped at the end
            return x["noise"]

        ended_everywhere = bool if noise_rows is None else distributed.all_across

        tokens = torch.full((padded, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((padded, max_new_tokens), dtype=torch.float32, device=self.device)
        hidden = (torch.zeros((padded, max_new_tokens, lm_head_of(module).weight.shape[1]), dtype=self.dtype,
                              device=self.device) if self.return_hidden else None)
        logits, last_hidden = self._forward_last(module, cache, prompt_ids, x["attention_mask"], position_ids)
        outputs = *self._pick(logits, x["finished"], x["lengths"], noise(), sampling), last_hidden
        step = self._compiled_step()
        lean = (lean_step.after_prefill(module, cache, prompt_mask, cache_length) if self.lean and not self.compile
                else None)
        for t in range(max_new_tokens):
            if t > 0:
                if self.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                outputs = step(module, cache, x["last_tokens"], x["position_ids"], x["attention_mask"],
                               x["finished"], x["lengths"], noise(), sampling, lean)
                x["position_ids"] += 1
            # copied out at once: a captured step's outputs are overwritten by its next replay
            new_tokens, new_logprobs, new_finished, new_lengths, new_hidden = outputs
            tokens[:, t].copy_(new_tokens)
            logprobs[:, t].copy_(new_logprobs)
            if hidden is not None:
                hidden[:, t].copy_(new_hidden)
            x["last_tokens"].copy_(new_tokens[:, None])
            x["finished"].copy_(new_finished)
            x["lengths"].copy_(new_lengths)
            check = not self.compile or t % CUDA_EOS_CHECK_EVERY == CUDA_EOS_CHECK_EVERY - 1
            if check and stops is not None:
                stops.apply(tokens, logprobs, x["finished"], x["lengths"], t + 1, self.pad_id)
            if check and ended_everywhere(bool(x["finished"][:rows].all())):
                break
        else:
            if stops is not None:  # the steps since the last check
                stops.apply(tokens, logprobs, x["finished"], x["lengths"], max_new_tokens, self.pad_id)
        lengths = x["lengths"][:rows].clone()
        longest = int(lengths.max())
        return (tokens[:rows, :longest], logprobs[:rows, :longest], lengths, x["finished"][:rows].clone(),
                None if hidden is None else hidden[:rows, :longest])

    def _compiled_step(self):
        if self._step is None:
            self._step = compile_step(self._decode_step) if self.compile else self._decode_step
        return self._step

    # 4. the Rollout
    def _assemble(self, prompt_ids, prompt_mask, pieces) -> Rollout:
        width = max(piece[0].shape[1] for piece in pieces)
        tokens = torch.cat([F.pad(p[0], (0, width - p[0].shape[1]), value=self.pad_id) for p in pieces])
        logprobs = torch.cat([F.pad(p[1], (0, width - p[1].shape[1])) for p in pieces])
        lengths = torch.cat([p[2] for p in pieces])
        ended = torch.cat([p[3] for p in pieces])
        hidden = (None if pieces[0][4] is None else
                  torch.cat([F.pad(p[4], (0, 0, 0, width - p[4].shape[1])) for p in pieces]))
        rows, prompt_length = prompt_ids.shape
        in_response = (torch.arange(width, device=self.device) < lengths[:, None]).long()
        attention_mask = torch.cat([prompt_mask, in_response], dim=1)
        token_mask = torch.cat([torch.zeros_like(prompt_mask), in_response], dim=1)
        frame_logprobs = torch.zeros((rows, prompt_length + width - 1), dtype=torch.float32, device=self.device)
        frame_logprobs[:, prompt_length - 1:] = logprobs
        return Rollout(torch.cat([prompt_ids, tokens], dim=1), attention_mask, token_mask[:, 1:].clone(),
                       prompt_length, ended, frame_logprobs, hidden)


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, tokenizer, *, generation_weights: str = "auto", generation_batch_size: int = 0,
               max_length: int = 0) -> RolloutEngine:
    """The engine kept for `model` with these options (made on first use), so the module-level
    `sample` reuses one view, KV cache and captured step across calls. Dropped with the model."""
    eos = tokenizer.eos_token_id
    key = (generation_weights, generation_batch_size, max_length, tokenizer.pad_token_id,
           tuple(sorted({eos} if isinstance(eos, int) else set(eos or ()))))
    engines = _ENGINES.setdefault(model, {})
    if key not in engines:
        engines[key] = RolloutEngine(model, tokenizer, generation_weights=generation_weights,
                                     generation_batch_size=generation_batch_size, max_length=max_length)
    return engines[key]


def sample(policy, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, do_sample: bool = True,
           generation_weights: str = "auto", generation_batch_size: int = 0, stop=()) -> Rollout:
    """Sample `num_samples` responses per prompt (rows grouped by prompt) through the policy's
    engine (`engine_for`); see RolloutEngine.sample."""
    engine = engine_for(policy, tokenizer, generation_weights=generation_weights,
                        generation_batch_size=generation_batch_size)
    return engine.sample(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, num_samples=num_samples, do_sample=do_sample, stop=stop)


def sample_with(policy, tokenizer, prompts: list[list[int]], sampling: SamplingConfig, *,
                num_samples: int = 1) -> Rollout:
    """`sample` with a stage's SamplingConfig (its generation_weights and generation_batch_size too)."""
    engine = engine_for(policy, tokenizer, generation_weights=sampling.generation_weights,
                        generation_batch_size=sampling.generation_batch_size)
    return engine.sample_with(prompts, sampling, num_samples=num_samples)
