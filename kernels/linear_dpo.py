"""linear_dpo_loss: DPO and its variants straight from hidden states and the LM head, the gradient made
in the forward.

A pair's loss is a function of its two sequences' summed log-probs S_c, S_r (and constants: the
reference's sums, lengths, margin), so d loss / d lp_t of every token t of a sequence is the same
number d loss / d S of that sequence (times 1 / |y| where the loss length-normalises): known as soon
as the pair's two sums are, before any gradient GEMM. The shared loss head (kernels/_fused_loss.py)
therefore runs it in one pass: its chunks hold whole pairs (group_ends), walked pair by pair
(row_order: chosen_0, rejected_0, chosen_1, ... whatever the input's layout), and DPORule makes a
chunk's sums from the chunk's own log-probs, then the per-token gradient, while the logits are in hand.

GEMM count (the LM head's, at the aten level; tests/test_linear_dpo.py counts them):
  - 3 per chunk in the forward (logits, d hidden, d weight; 2 with a frozen head), none in the
    backward (it scales the saved gradients); chunks hold whole pairs, so there can be a few more
    chunks than linear_nll_loss walks for the same rows (a pair never straddles two);
  - a pair longer than a chunk is the exception: its two sums are made first, without a gradient
    (one GEMM per chunk of its rows), after which its rows may be split like any others: 4 GEMMs
    per chunk of those rows, and memory stays one chunk whatever the pair's length;
  - without any gradient (no_grad, or every input frozen): 1 per chunk of the same walk; so does
    linear_dpo_logps, the reference's sums (the same chunks: bitwise the loss's own sums on equal
    inputs, so a DPO run's first step has rewards exactly 0).

Losses (the same definitions as rlhf_fast.preference_losses, whose fp64 twin is
kernels.reference.preference_loss): with pi, ref the policy's and the reference's summed log-probs
of chosen (c) and rejected (r), |y| the counted tokens, e the label smoothing, m the margin:
    sigmoid, robust, hinge   h = (pi_c - ref_c) - (pi_r - ref_r)
    ipo                      h = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|
    simpo                    h = pi_c / |y_c| - pi_r / |y_r|               (no reference)
    z = beta h - m (- gamma for simpo)
    sigmoid, simpo  -(1 - e) log sig(z) - e log sig(-z)      robust  (-(1 - e) log sig(z) + e log sig(-z)) / (1 - 2e)
    hinge           max(0, 1 - z)                            ipo     (z / beta - 1 / (2 beta))^2
The pair math runs in fp64 on (P,) vectors (O(P) per chunk); the per-token work stays in the head.
"""
import itertools

import torch
import torch.nn.functional as F

from . import reference
from ._dispatch import check_shapes, resolve_backend
from ._fused_loss import chunk_rows, forward_with_gradient, linear_loss
from ._lm_head import check_targets, flatten_head_inputs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
SMOOTHED = ("sigmoid", "robust", "simpo")  # the losses that read label_smoothing
LENGTH_NORMALISED = ("ipo", "simpo")
REFERENCE_FREE = ("simpo",)
REDUCTIONS = ("mean", "sum")
F64 = torch.float64


class PairLoss:
    """The loss of P pairs as a function of their 2P summed log-probs S (chosen sequences, then the
    rejected ones), fp64, on S's device: z, the per-pair losses, the rewards, and d loss / d S."""

    def __init__(self, loss_type, beta, label_smoothing, simpo_gamma, margin, ref, lengths, scale):
        # ref (2P,) | None, lengths (2P,) counted tokens, margin (P,) | None, scale (P,): each pair's
        # weight in the reduced loss; label_smoothing a float or (P,)
        self.loss_type, self.beta = loss_type, float(beta)
        reference_free = ref is None or loss_type in REFERENCE_FREE
        self.ref = torch.zeros_like(lengths, dtype=F64) if reference_free else ref.to(F64)
        self.norm = (1 / lengths.to(F64).clamp_min(1) if loss_type in LENGTH_NORMALISED
                     else torch.ones_like(lengths, dtype=F64))
        shift = torch.zeros_like(scale, dtype=F64) if margin is None else margin.to(F64)
        self.shift = shift + (simpo_gamma if loss_type == "simpo" else 0.0)
        self.e = label_smoothing.to(F64) if torch.is_tensor(label_smoothing) else float(label_smoothing)
        self.scale = scale.to(F64)

    def z(self, sums):
        x = self.norm * (sums.to(F64) - self.ref)
        half = x.shape[0] // 2
        return self.beta * (x[:half] - x[half:]) - self.shift

    def losses(self, z):
        e = self.e
        if self.loss_type in ("sigmoid", "simpo"):
            return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
        if self.loss_type == "robust":
            return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
        if self.loss_type == "hinge":
            return torch.relu(1 - z)
        return (z / self.beta - 1 / (2 * self.beta)) ** 2  # ipo

    def dloss_dz(self, z):
        e = self.e
        if self.loss_type in ("sigmoid", "simpo"):
            return -(1 - e) * torch.sigmoid(-z) + e * torch.sigmoid(z)
        if self.loss_type == "robust":
            return (-(1 - e) * torch.sigmoid(-z) - e * torch.sigmoid(z)) / (1 - 2 * e)
        if self.loss_type == "hinge":
            return -(z < 1).to(F64)  # relu's gradient at 0 is 0, as torch's
        return 2 * (z / self.beta - 1 / (2 * self.beta)) / self.beta  # ipo

    def grad(self, sums):
        """d (sum_p scale_p loss_p) / d S, (2P,) fp64: dz/dS_c = beta / |y_c| or beta, dz/dS_r its negative."""
        g = self.scale * self.dloss_dz(self.z(sums)) * self.beta
        return torch.cat([g, -g]) * self.norm

    def rewards(self, sums):
        """beta (pi - ref) per sequence (simpo: beta pi / |y|), TRL's rewards, (2P,)."""
        x = sums.to(F64) - self.ref
        return self.beta * (x * self.norm if self.loss_type == "simpo" else x)


def segment_sums(values, starts, ends):
    """fp32 sums of values[starts[s]:ends[s]] for each s, accumulated in fp64 by a cumulative sum
    (deterministic, no atomics); starts/ends (S,) int64 on values' device, clamped into [0, len(values)].
    Rounded to fp32 once, so that a sum made twice from the same log-probs is the same number."""
    cumulative = F.pad(values.to(F64).cumsum(0), (1, 0))
    n = values.shape[0]
    return (cumulative[ends.clamp(0, n)] - cumulative[starts.clamp(0, n)]).float()


class DPORule:
    """linear_dpo_loss's per-token gradient and value (kernels/_fused_loss.py's TokenGradientRule).

    grad: the chunk (positions [a, b) of the pair-by-pair walk) holds whole pairs, or pieces of pairs
    whose sums were made beforehand (`known`); each sequence's sum is a segment of the chunk's
    log-probs, and every token gets d loss / d S of its sequence. value: the loss from all N log-probs
    in the rows' own order, and TRL's metrics (kept in .stats).
    """

    want_entropy = False

    def __init__(self, pair_loss, walk, known=None, known_sums=None):
        self.pair_loss, self.walk, self.stats = pair_loss, walk, None
        self.known, self.known_sums = known, known_sums  # (2P,) bool and fp32: sums made beforehand

    def grad(self, rows, logprobs, entropy):
        walk = self.walk
        sums = segment_sums(logprobs, walk.walk_starts - rows.start, walk.walk_ends - rows.start)
        if self.known is not None:
            sums = torch.where(self.known, self.known_sums, sums)
        return self.pair_loss.grad(sums)[walk.sequence[rows]].float(), None

    def value(self, logprobs, entropy):
        sums = self.walk.sums(logprobs)
        loss = self.pair_loss
        z = loss.z(sums)
        rewards = loss.rewards(sums)
        half = sums.shape[0] // 2
        self.stats = {name: value.detach().float() for name, value in metrics(rewards[:half], rewards[half:],
                                                                              sums[:half], sums[half:]).items()}
        return (loss.scale * loss.losses(z)).sum().float()


def metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """Means over the pairs under TRL DPOTrainer's names (rlhf_fast.preference_losses.preference_metrics's)."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(F64).mean(),
            "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}


class _Plain:
    """A rule for a forward without a gradient (log-probs only)."""

    want_entropy = False


class Walk:
    """The order the chunks take the rows of 2P sequences in: pair by pair (chosen_0, rejected_0,
    chosen_1, ...), each sequence's rows in their order, in chunks of whole pairs of at most `size`
    rows (pair_groups; a longer pair split where the packing fills chunks). linear_dpo_loss (with or
    without a gradient) and linear_dpo_logps walk the same chunks, so the same inputs give the same
    log-probs, bitwise, and the same sums.

    lengths: the sequences' row counts (host ints). On `device`: starts, ends (2P,) each sequence's
    rows of hidden; row_order (N,) or None (one pair: the rows' own order); sequence (N,) the sequence
    of each walk position; walk_starts, walk_ends (2P,) each sequence's positions in the walk.
    """

    def __init__(self, lengths, size, device):
        n_pairs = len(lengths) // 2
        self.lengths = lengths
        length_t = torch.tensor(lengths, device=device, dtype=torch.long)
        self.ends = length_t.cumsum(0)
        self.starts = self.ends - length_t
        sequence = torch.repeat_interleave(torch.arange(2 * n_pairs, device=device), length_t)         # (N,)
        self.row_order = None
        if n_pairs > 1:
            self.row_order = torch.argsort((sequence % n_pairs) * 2 + sequence // n_pairs, stable=True)
        self.sequence = sequence if self.row_order is None else sequence[self.row_order]
        interleaved = torch.stack([length_t[:n_pairs], length_t[n_pairs:]], 1).reshape(-1)          # c0, r0, c1, ...
        walk_ends = interleaved.cumsum(0)
        walk_starts = walk_ends - interleaved
        self.walk_starts = torch.cat([walk_starts[0::2], walk_starts[1::2]])                           # by sequence
        self.walk_ends = torch.cat([walk_ends[0::2], walk_ends[1::2]])
        pair_lengths = [c + r for c, r in zip(lengths[:n_pairs], lengths[n_pairs:])]
        self.group_ends, self.long_sequences = pair_groups(pair_lengths, size)

    def sums(self, logprobs):
        """(2P,) fp32: each sequence's summed log-probs, from the (N,) log-probs in the rows' order."""
        return segment_sums(logprobs, self.starts, self.ends)

    def logprobs(self, hidden, weight, bias, targets, temperature, ignore_index, backend):
        """The (N,) log-probs in the rows' order, without a gradient: one GEMM per chunk of the walk."""
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            lp, _, _ = forward_with_gradient(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                             targets, _Plain(), temperature, ignore_index, backend,
                                             (False, False, False), self.group_ends, self.row_order)
        return lp

    def long_sums(self, hidden, weight, bias, targets, temperature, ignore_index, backend):
        """(known (2P,) bool, sums (2P,) fp32) of the sequences of pairs longer than a chunk (the others:
        False, 0), each sequence walked alone without a gradient; (None, None) when there is none."""
        if not self.long_sequences:
            return None, None
        device = hidden.device
        known = torch.zeros(len(self.lengths), dtype=torch.bool, device=device)
        sums = torch.zeros(len(self.lengths), dtype=torch.float32, device=device)
        ends = list(itertools.accumulate(self.lengths))
        frozen = [None if x is None else x.detach() for x in (weight, bias)]
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for s in self.long_sequences:
                rows = slice(ends[s] - self.lengths[s], ends[s])
                lp, _, _ = forward_with_gradient(hidden[rows].detach(), *frozen, targets[rows], _Plain(), temperature,
                                                 ignore_index, backend, (False, False, False))
                sums[s] = lp.to(F64).sum()  # fp64 accumulation, one rounding to fp32, as segment_sums
        known[self.long_sequences] = True
        return known, sums


def pair_groups(pair_lengths, size):
    """(group_ends, long pairs' sequences) for the walk: a group ends after every pair; a pair longer
    than `size` rows (its sums made beforehand, so any split will do) is also cut where the greedy
    packing of _lm_head.group_chunks closes a chunk, so that its pieces fill whole chunks. Its two
    sequences (p and P + p) are listed."""
    n_pairs = len(pair_lengths)
    group_ends, long_sequences = [], []
    chunk_start = position = 0  # where group_chunks' open chunk starts, where the walk is
    for p, pair_length in enumerate(pair_lengths):
        end = position + pair_length
        if pair_length > size:
            long_sequences += [p, n_pairs + p]
            cut = chunk_start + size if chunk_start + size > position else position + size
            while cut < end:
                group_ends.append(cut)
                chunk_start, cut = cut, cut + size
        elif end - chunk_start > size:
            chunk_start = position
        group_ends.append(end)
        position = end
    return group_ends, long_sequences


def _sequence_lengths(op, hidden, sequence_ends):
    """The 2P sequences' row counts (host ints): (2P, T, D) hidden's rows, or sequence_ends of (N, D)."""
    if hidden.dim() == 3:
        if sequence_ends is not None:
            raise ValueError(f"{op}: sequence_ends is for packed (N, D) hidden; (2P, T, D) hidden has one "
                             f"sequence per row, got both")
        if hidden.shape[0] < 2 or hidden.shape[0] % 2:
            raise ValueError(f"{op}: hidden (2P, T, D) must hold P >= 1 chosen rows then P rejected rows, got "
                             f"{hidden.shape[0]} rows")
        return [hidden.shape[1]] * hidden.shape[0]
    if sequence_ends is None:
        raise ValueError(f"{op}: packed (N, D) hidden needs sequence_ends (2P,): where each sequence's rows end, "
                         f"the P chosen sequences then the P rejected ones")
    ends = torch.as_tensor(sequence_ends).tolist()
    if not isinstance(ends, list) or len(ends) < 2 or len(ends) % 2:
        raise ValueError(f"{op}: sequence_ends must be (2P,) with P >= 1 (chosen sequences, then rejected), got "
                         f"{len(ends) if isinstance(ends, list) else 'a scalar'} entries")
    lengths = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    if min(lengths) < 0 or ends[-1] != hidden.shape[0]:
        raise ValueError(f"{op}: sequence_ends must be non-decreasing from 0 and end at N={hidden.shape[0]}, "
                         f"got {ends[:8]}{'...' if len(ends) > 8 else ''}")
    return lengths


def _check_pair_inputs(op, loss_type, beta, label_smoothing, reduction, temperature, n_pairs, ref_chosen_logps,
                       ref_rejected_logps, margin, pair_weights):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{op}: unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if loss_type not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"{op}: loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps (P,)")
    if torch.is_tensor(label_smoothing):
        check_shapes(op, (n_pairs,), "one per pair", label_smoothing=label_smoothing)
    else:
        high = 0.5 if loss_type == "robust" else 1.0
        if not 0 <= label_smoothing < high:
            raise ValueError(f"{op}: label_smoothing must be in [0, {high}) for {loss_type!r}, got {label_smoothing}")
    if loss_type not in SMOOTHED and (torch.is_tensor(label_smoothing) or label_smoothing != 0):
        raise ValueError(f"{op}: loss_type {loss_type!r} does not read label_smoothing (only {SMOOTHED} do)")
    check_shapes(op, (n_pairs,), "one per pair", ref_chosen_logps=ref_chosen_logps,
                 ref_rejected_logps=ref_rejected_logps, margin=margin, pair_weights=pair_weights)


def linear_dpo_loss(hidden, weight, targets, ref_chosen_logps=None, ref_rejected_logps=None, *, bias=None,
                    sequence_ends=None, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
                    margin=None, pair_weights=None, reduction="mean", temperature=1.0, ignore_index=-100,
                    backend="auto"):
    """DPO / IPO / SLiC hinge / robust DPO / SimPO of P preference pairs from hidden states and the LM head.

    hidden: (2P, T, D), the P chosen sequences' rows then the P rejected ones' (TRL's and Liger's
    concatenated layout), or packed (N, D) with sequence_ends; bf16/fp16/fp32. weight: (V, D),
    hidden's dtype; bias: (V,) or None. targets: int, hidden's leading shape, ignore_index where a
    position is not a response token (prompt, padding: no log-prob, no gradient).
    sequence_ends: (2P,) ints (list or tensor), the row where each packed sequence ends, chosen
    sequences first, in the same pair order as the rejected ones; (2P, T, D) hidden needs none.
    ref_chosen_logps, ref_rejected_logps: (P,) the reference's summed response log-probs (the
    adapters-off model's, precomputed; constants); ignored, and may be None, for simpo.
    loss_type: "sigmoid" (DPO), "ipo", "hinge", "robust", "simpo" (module docstring); beta > 0;
    label_smoothing: a float, or (P,) per-pair soft labels (sigmoid, robust, simpo); simpo_gamma:
    SimPO's margin; margin: (P,) Llama 2's per-pair offset subtracted from z, or None; pair_weights:
    (P,) each pair's weight, or None (1). The per-pair losses are summed with their weights
    ("sum") or that sum divided by P ("mean", TRL's and Liger's). Log-probs are those of
    log softmax((hidden @ weight.T + bias) / temperature) at the targets, summed per sequence;
    |y| is a sequence's counted tokens (ipo and simpo divide by it, at least 1).
    backend: "triton" | "torch" | "reference" | "auto".
    Returns (loss fp32 scalar, stats): rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (TRL's names; means over the pairs, unweighted;
    logps summed over each response; rewards beta (pi - ref), simpo beta pi / |y|), detached fp32
    scalars. Gradients to hidden, weight and bias (those that require grad), made in the forward
    (3 GEMMs per chunk; see the module for the count with pairs longer than a chunk) and scaled by
    the backward; none is made when nothing requires grad. Never holds the (N, V) logits, never an
    (N, D) copy of hidden; d weight is accumulated in fp32. Deterministic (no atomics).
    """
    op = "linear_dpo_loss"
    backend = resolve_backend(backend, hidden, op)
    hidden2, targets1, lengths = _head_inputs(op, hidden, weight, bias, targets, sequence_ends, ignore_index)
    n_pairs = len(lengths) // 2
    _check_pair_inputs(op, loss_type, beta, label_smoothing, reduction, temperature, n_pairs, ref_chosen_logps,
                       ref_rejected_logps, margin, pair_weights)
    if loss_type in REFERENCE_FREE:
        ref_chosen_logps = ref_rejected_logps = None
    if backend == "reference":
        loss, stats = reference.linear_dpo_loss(
            hidden, weight, targets, ref_chosen_logps, ref_rejected_logps, bias=bias, sequence_ends=sequence_ends,
            loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, margin=margin,
            pair_weights=pair_weights, reduction=reduction, temperature=temperature, ignore_index=ignore_index)
        return loss.float(), {name: value.detach().float() for name, value in stats.items()}
    device = hidden.device
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    # 1. the walk: pair by pair, in chunks of whole pairs (the budget of a chunk that adds d weight, if one does)
    walk = Walk(lengths, chunk_rows(hidden2.shape[0], weight, backend, needs[1]), device)

    # 2. the pair math: constants of each pair, each pair's share of the reduced loss
    counted = segment_sums((targets1 != ignore_index).float(), walk.starts, walk.ends)
    ref = None if ref_chosen_logps is None else torch.cat([ref_chosen_logps, ref_rejected_logps]).detach()
    scale = torch.ones(n_pairs, device=device, dtype=F64) if pair_weights is None else pair_weights.detach().to(F64)
    if reduction == "mean":
        scale = scale / n_pairs
    pair_loss = PairLoss(loss_type, beta, label_smoothing.detach() if torch.is_tensor(label_smoothing)
                         else label_smoothing, simpo_gamma, None if margin is None else margin.detach(),
                         ref, counted, scale)

    # 3. pairs longer than a chunk: their sums first, without a gradient (then any split of their rows will do)
    known, known_sums = (None, None)
    if any(needs):
        known, known_sums = walk.long_sums(hidden2, weight, bias, targets1, temperature, ignore_index, backend)

    # 4. one pass: per chunk the logits, its pairs' sums, d loss / d lp, d hidden and d weight (or the logits alone)
    rule = DPORule(pair_loss, walk, known, known_sums)
    loss, _, _ = linear_loss(hidden2, weight, bias, targets1, rule, temperature=temperature,
                             ignore_index=ignore_index, backend=backend, group_ends=walk.group_ends,
                             row_order=walk.row_order)
    return loss, rule.stats


def linear_dpo_logps(hidden, weight, targets, *, bias=None, sequence_ends=None, temperature=1.0, ignore_index=-100,
                     backend="auto"):
    """(chosen_logps (P,), rejected_logps (P,)) fp32: the summed log-probs of each sequence's counted
    tokens, the numbers linear_dpo_loss reads, for the reference's ref_chosen_logps / ref_rejected_logps
    (run it on the reference model's hidden states). Same inputs and layouts as linear_dpo_loss; no
    gradient (the outputs are detached). It walks the chunks linear_dpo_loss walks, so where the two
    models agree (a DPO run's first step: the policy is the reference) the sums are bitwise those the
    loss makes and the rewards exactly 0; the exception is a trained LM head on CUDA, whose loss walks
    larger chunks (CUDA_WEIGHT_GRAD_CHUNK_FACTOR): equal there to rounding. One GEMM per chunk; never
    holds the (N, V) logits. backend: "triton" | "torch" | "reference" | "auto".
    """
    op = "linear_dpo_logps"
    backend = resolve_backend(backend, hidden, op)
    hidden2, targets1, lengths = _head_inputs(op, hidden, weight, bias, targets, sequence_ends, ignore_index)
    n_pairs = len(lengths) // 2
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if backend == "reference":
        sums = reference.sequence_logprob_sums(hidden, weight, targets, bias=bias, sequence_ends=sequence_ends,
                                               temperature=temperature, ignore_index=ignore_index).float()
    else:
        walk = Walk(lengths, chunk_rows(hidden2.shape[0], weight, backend, False), hidden.device)
        sums = walk.sums(walk.logprobs(hidden2, weight, bias, targets1, temperature, ignore_index, backend))
    return sums[:n_pairs], sums[n_pairs:]


def _head_inputs(op, hidden, weight, bias, targets, sequence_ends, ignore_index):
    """Checked and flattened: (hidden (N, D), targets (N,) contiguous, the 2P sequences' row counts)."""
    if targets.dtype.is_floating_point:
        raise TypeError(f"{op}: targets must be an integer tensor, got {targets.dtype}")
    hidden2, rows, _ = flatten_head_inputs(op, hidden, weight, bias, targets=targets)
    lengths = _sequence_lengths(op, hidden, sequence_ends)
    targets1 = rows["targets"].contiguous()
    check_targets(op, targets1, weight.shape[0], ignore_index)
    return hidden2, targets1, lengths
