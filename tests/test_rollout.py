"""Rollout framing: which tokens are the response, in the [B, L-1] target frame."""
import torch

from rlhf_fast.data import pad_batch
from rlhf_fast.rollout import response_frame


def test_left_pad_aligns_prompt_ends():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_response_frame_stops_after_first_eos():
    eos, pad = 2, 0
    sequences = torch.tensor([
        [9, 9, 4, 5, 2, 0, 0],   # EOS at column 4: response = 4, 5, 2
        [0, 9, 4, 2, 0, 0, 0],   # EOS right after one token
        [9, 9, 4, 5, 6, 7, 8],   # no EOS: runs to max_new_tokens
    ])
    mask, ended = response_frame(sequences, prompt_length=2, eos_ids={eos}, pad_id=pad)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_pad_equal_to_eos_keeps_the_eos():
    sequences = torch.tensor([[9, 4, 2, 2, 2]])
    mask, ended = response_frame(sequences, prompt_length=1, eos_ids={2}, pad_id=2)
    assert mask.tolist() == [[0, 1, 1, 0, 0]] and ended.tolist() == [True]
