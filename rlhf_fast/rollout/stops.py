"""Stop strings: a response ends at the first token whose text completes one of them, as EOS ends it.

The engine decodes on the device and checks on the host, where it already checks whether every row has
ended (every step eager, every few steps where the step is captured): each unfinished row's response is
detokenised, and a row whose text now contains a stop string is cut after the token that completed it
(the stop string stays in the response, as Hugging Face's `stop_strings` keeps it); the tokens sampled
after it, if any, become padding. Text, not token ids, is matched, so a stop string is found however the
model happened to tokenise it.
"""
import torch


class StopStrings:
    """Cuts the rows of one generation batch at their first stop string (`apply` at each check)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], rows: int):
        self.tokenizer, self.stop = tokenizer, stop
        self.clean = [0] * rows  # per row: this many response tokens are known to hold no stop string
        # tokens a stop string can span: one character may take up to 4 byte-level tokens
        self.span = 4 * max(len(s) for s in stop)

    def _first_stop(self, row: int, tokens: list[int]) -> int | None:
        """The response length that ends at `tokens`' first stop string, or None. Only the tokens a
        stop string could reach past the known-clean ones are decoded, so a check costs the same at
        any response length."""
        start = max(0, self.clean[row] - self.span)
        if not any(s in self.tokenizer.decode(tokens[start:]) for s in self.stop):
            self.clean[row] = len(tokens)
            return None
        for length in range(self.clean[row] + 1, len(tokens) + 1):
            text = self.tokenizer.decode(tokens[start:length])
            if any(s in text for s in self.stop):
                return length
        return len(tokens)

    def apply(self, tokens: torch.Tensor, logprobs: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor,
              steps: int, pad_id: int) -> None:
        """After `steps` decode steps: end every unfinished row whose response holds a stop string,
        in place (finished, lengths; tokens and log-probs after the cut padded / zeroed)."""
        open_rows = (~finished[:len(self.clean)]).nonzero().flatten().tolist()
        if not open_rows:
            return
        sampled = tokens[open_rows, :steps].tolist()
        for row, row_tokens in zip(open_rows, sampled):
            length = self._first_stop(row, row_tokens)
            if length is None:
                continue
            finished[row], lengths[row] = True, length
            tokens[row, length:steps] = pad_id
            logprobs[row, length:steps] = 0.0
