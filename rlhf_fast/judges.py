"""AI labellers (RLAIF, Lee et al. 2023): which of two responses to a prompt is better, as a probability.

- LMJudge: any local causal LM reads a template that states the criteria, with the prompt and the
  two responses filled in ({prompt}, {response_a}, {response_b}; optionally {criteria}, a per-pair
  question such as a constitution's principle, RL-CAI's way), and its preference is the
  probability of the verdict tokens (" A" vs " B" by default) at the next position, renormalised
  between the two:  P_A = p(A) / (p(A) + p(B)) = sigmoid(log p(A) - log p(B)). LLM judges favour a
  position, so, as the RLAIF paper does, each pair is judged in both orders and
      P(a > b) = (P_A(a first) + P_B(b first)) / 2.
  The two log-probs come from the fused head (rlhf_fast.kernels.token_logprobs) on the judge's last
  hidden state: the LM head never makes logits over the vocabulary.
- RewardModelJudge: a reward model saved by `rlhf-fast rm`: P(a > b) = sigmoid(r(x, a) - r(x, b)),
  the Bradley-Terry probability it was trained on (no position to be biased by).
- judge_reward(): an LM judge as a reward function (TRL GRPOTrainer's interface) for ppo / grpo.
"""
import string
from pathlib import Path

import torch

from rlhf_fast import data
from rlhf_fast.config import ConfigError
from rlhf_fast.device import autocast, module_device
from rlhf_fast.errors import DataError, ModelDirError
from rlhf_fast.kernels import token_logprobs
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.reward import load_reward_model, read_reward_config
from rlhf_fast.models.trunk import fusable_head, last_hidden

PAIRWISE = ("prompt", "response_a", "response_b")
POINTWISE = ("prompt", "response")
OPTIONAL = ("criteria",)  # filled per pair when the template places it

DEFAULT_TEMPLATE = (
    "Which response answers the request better: more helpful, more accurate, and harmless?\n\n"
    "Request: {prompt}\n\nResponse A: {response_a}\n\nResponse B: {response_b}\n\n"
    "The better response is Response")
DEFAULT_POINTWISE_TEMPLATE = (
    "Is the response a helpful, accurate and harmless answer to the request?\n\n"
    "Request: {prompt}\n\nResponse: {response}\n\nAnswer (Yes or No):")


def template_fields(template: str) -> set[str]:
    """The placeholders a template names."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, placeholders=PAIRWISE, *, what: str = "template") -> None:
    """ConfigError unless `template` names every placeholder, and nothing else but {criteria}
    ({{ and }} are literal braces)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"{what}: not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    missing = [p for p in placeholders if p not in fields]
    unknown = sorted({f for f in fields if f not in placeholders + OPTIONAL})
    if missing or unknown:
        problems = ([f"missing {', '.join('{' + p + '}' for p in missing)}"] if missing else []) + \
                   ([f"unknown {', '.join('{' + u + '}' for u in unknown)}"] if unknown else [])
        raise ConfigError(f"{what}: {'; '.join(problems)}; it must place "
                          f"{', '.join('{' + p + '}' for p in placeholders)} (and may place {{criteria}})")


def verdict_token_ids(tokenizer, verdicts, *, where: str = "verdicts") -> tuple[int, int]:
    """The token id of each verdict string; ConfigError unless each is exactly one token and they differ."""
    if len(verdicts) != 2:
        raise ConfigError(f"{where}: expected two verdict strings (the first means response A), got {list(verdicts)}")
    ids = []
    for verdict in verdicts:
        tokens = tokenizer(verdict, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise ConfigError(f"{where}: {verdict!r} is {len(tokens)} tokens {pieces} in the judge's tokenizer, not "
                              "one; pick verdict strings that are single tokens (often with a leading space, ' A')")
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise ConfigError(f"{where}: {verdicts[0]!r} and {verdicts[1]!r} are the same token")
    return ids[0], ids[1]


class LMJudge:
    """A causal LM as a pairwise (or, with a {response} template, pointwise) judge; see the module."""

    def __init__(self, model, tokenizer, *, template: str = DEFAULT_TEMPLATE, verdicts=(" A", " B"),
                 chat: bool = False, batch_size: int = 8, max_length: int = 0):
        fusable_head(model)
        self.pairwise = "response_a" in template
        check_template(template, PAIRWISE if self.pairwise else POINTWISE)
        self.uses_criteria = "criteria" in template_fields(template)
        self.model, self.tokenizer, self.template, self.chat = model, tokenizer, template, chat
        self.verdict_ids = verdict_token_ids(tokenizer, verdicts)
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def load(cls, directory, *, device="auto", dtype="auto", attn="auto", trust_remote_code=False, **options):
        """The judge in `directory`, checked (template, verdict tokens) before its weights load."""
        tokenizer = load_tokenizer(directory, padding_side="left", trust_remote_code=trust_remote_code)
        check_template(options.get("template", DEFAULT_TEMPLATE),
                       PAIRWISE if "response_a" in options.get("template", DEFAULT_TEMPLATE) else POINTWISE)
        verdict_token_ids(tokenizer, options.get("verdicts", (" A", " B")))
        model = load_causal_lm(directory, device=device, dtype=dtype, attn=attn,
                               trust_remote_code=trust_remote_code).requires_grad_(False).eval()
        return cls(model, tokenizer, **options)

    def render(self, prompt: str, *responses: str, criteria: str | None = None) -> str:
        """The judge's input text for a prompt and two responses (or one, pointwise), and the pair's
        criteria where the template places {criteria}."""
        keys = ("response_a", "response_b") if self.pairwise else ("response",)
        if self.uses_criteria and criteria is None:
            raise DataError(f"the judge's template places {{criteria}} but none was given for prompt {prompt!r}")
        extra = {"criteria": criteria} if self.uses_criteria else {}
        text = self.template.format(prompt=prompt, **dict(zip(keys, responses)), **extra)
        if self.chat:
            text = data.render_chat_prompt([{"role": "user", "content": text}], self.tokenizer)
        return text

    @torch.no_grad()
    def verdict_logprobs(self, texts: list[str]) -> torch.Tensor:
        """[N, 2] fp32: log p(verdict 0), log p(verdict 1) as the next token after each text, through the
        fused head on the last hidden state (two targets per text, never the vocabulary's logits)."""
        device = module_device(self.model)
        head = fusable_head(self.model)
        out = []
        for first in range(0, len(texts), self.batch_size):
            chunk = [data.encode_prompt(self.tokenizer, t) for t in texts[first:first + self.batch_size]]
            if self.max_length and max(map(len, chunk)) > self.max_length:
                worst = max(range(len(chunk)), key=lambda i: len(chunk[i]))
                raise DataError(f"judge input of {len(chunk[worst])} tokens exceeds max_length={self.max_length} "
                                f"(it starts {texts[first + worst][:60]!r}); shorten the template or raise max_length")
            input_ids, attention_mask = data.pad_batch(chunk, self.tokenizer.pad_token_id, side="left")
            with autocast(device, next(self.model.parameters()).dtype):
                hidden = last_hidden(self.model, input_ids.to(device), attention_mask.to(device))[:, -1]  # [n, D]
            targets = torch.tensor(self.verdict_ids, device=device).repeat(len(chunk))                     # [2n]
            logprobs, _ = token_logprobs(hidden.repeat_interleave(2, dim=0), head.weight, targets, bias=head.bias)
            out.append(logprobs.view(-1, 2))
        return torch.cat(out)

    def preference(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
                   criteria: list[str] | None = None) -> torch.Tensor:
        """[N] P(response_a better than response_b), averaged over both orders in the template;
        `criteria`: one per pair, for a template that places {criteria}."""
        if not self.pairwise:
            raise ConfigError("this judge's template is pointwise ({response}); a pairwise preference needs "
                              "{response_a} and {response_b}")
        n = len(prompts)
        rows = list(zip(prompts, responses_a, responses_b, criteria or [None] * n))
        texts = ([self.render(x, a, b, criteria=c) for x, a, b, c in rows]
                 + [self.render(x, b, a, criteria=c) for x, a, b, c in rows])
        p = self.verdict_logprobs(texts).softmax(dim=-1)       # [2N, 2], renormalised between the verdicts
        return (p[:n, 0] + p[n:, 1]) / 2                        # a first: verdict A; a second: verdict B

    def score(self, prompts: list[str], responses: list[str], criteria: list[str] | None = None) -> torch.Tensor:
        """[N] pointwise: log p(verdict 0) - log p(verdict 1) (the log-odds of " Yes" over " No", say)."""
        if self.pairwise:
            raise ConfigError("this judge's template is pairwise; a pointwise score needs a {response} template")
        rows = zip(prompts, responses, criteria or [None] * len(prompts))
        logprobs = self.verdict_logprobs([self.render(x, y, criteria=c) for x, y, c in rows])
        return logprobs[:, 0] - logprobs[:, 1]


class RewardModelJudge:
    """A reward model as the labeller: P(a > b) = sigmoid(r(x, a) - r(x, b))."""

    def __init__(self, reward_model, tokenizer, *, max_length: int = 512, batch_size: int = 8):
        self.reward_model, self.tokenizer = reward_model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def load(cls, directory, *, tokenizer_dir=None, device="cpu", dtype="auto", **options):
        """A reward model saved by `rlhf-fast rm`, with the tokenizer of the model it was trained on
        (recorded as its base) or of `tokenizer_dir`."""
        saved = read_reward_config(directory)
        source = saved.get("base") or tokenizer_dir
        if not source:
            raise ModelDirError(f"{directory}: no base model recorded to take the tokenizer from; pass the policy "
                                "(or a model directory with the same tokenizer)")
        tokenizer = load_tokenizer(source)
        reward_model = load_reward_model(directory, device=device, dtype=dtype).requires_grad_(False).eval()
        return cls(reward_model, tokenizer, **options)

    @torch.no_grad()
    def rewards(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """[N] fp32: r(x, y) of each (prompt, response), encoded as `rm` trained on them (prompt, response, EOS)."""
        device = module_device(self.reward_model.trunk)
        out = []
        for first in range(0, len(prompts), self.batch_size):
            rows = [data.encode_pair(self.tokenizer, x, y, self.max_length).input_ids
                    for x, y in zip(prompts[first:first + self.batch_size], responses[first:first + self.batch_size])]
            input_ids, attention_mask = data.pad_batch(rows, self.tokenizer.pad_token_id)
            out.append(self.reward_model(input_ids.to(device), attention_mask.to(device)).float())
        return torch.cat(out)

    def preference(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
                   criteria: list[str] | None = None) -> torch.Tensor:
        """[N] P(response_a better than response_b); a reward model has no criteria to read."""
        r = self.rewards(prompts + prompts, responses_a + responses_b)
        return torch.sigmoid(r[:len(prompts)] - r[len(prompts):])


def judge_reward(directory, *, template: str = DEFAULT_POINTWISE_TEMPLATE, verdicts=(" Yes", " No"),
                 reference_field: str = "", chat: bool = False, batch_size: int = 8, device="auto", dtype="auto"):
    """An LM judge as a reward function with TRL GRPOTrainer's interface, for `reward_functions`:
    f(prompts=[...], completions=[...], **prompt fields) -> one float per completion.

    Pointwise (a template with {prompt} and {response}): the judge's log-odds of verdicts[0] over
    verdicts[1]. Pairwise (a template with {response_a} and {response_b}; `reference_field` names
    the prompt-line field holding a reference answer): P(completion better than the reference),
    order-averaged, in [0, 1]. A template that places {criteria} reads it from the prompt lines'
    "criteria" field. The judge loads on the first call, so a module that defines
        judge = judge_reward("runs/judge-model")
    can be named `my_module:judge` in a config without loading a model when the config is checked.
    """
    pairwise = "response_a" in template
    check_template(template, PAIRWISE if pairwise else POINTWISE)
    if pairwise and not reference_field:
        raise ConfigError("judge_reward: a pairwise template compares with a reference answer: set reference_field "
                          "to the prompt-line field that holds it")
    if not Path(directory).is_dir():
        raise ModelDirError(f"judge model directory {directory} does not exist")
    loaded = {}

    def reward(prompts, completions, **fields):
        if "judge" not in loaded:
            loaded["judge"] = LMJudge.load(directory, template=template, verdicts=tuple(verdicts), chat=chat,
                                           batch_size=batch_size, device=device, dtype=dtype)
        judge = loaded["judge"]
        criteria = fields.get("criteria") if judge.uses_criteria else None
        if judge.uses_criteria and (criteria is None or any(not isinstance(c, str) for c in criteria)):
            raise DataError("judge_reward: the template places {criteria}: every prompt line needs a text field "
                            "'criteria'")
        if not pairwise:
            return judge.score(list(prompts), list(completions), criteria).tolist()
        references = fields.get(reference_field)
        if references is None or any(not isinstance(r, str) for r in references):
            raise DataError(f"judge_reward: every prompt line needs a text field {reference_field!r} (the reference "
                            "answer the completion is compared with)")
        return judge.preference(list(prompts), list(completions), list(references), criteria).tolist()

    return reward
