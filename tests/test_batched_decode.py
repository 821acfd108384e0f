"""Sequences at different positions share one batch: each row decodes exactly as it would alone."""

from __future__ import annotations

import pytest
import tiny_hf
import torch

import fuselm
from fuselm.generation.decoder import Decoder, decode_ids, new_state, next_token
from fuselm.generation.sampling import GREEDY

PROMPTS = [[5, 9, 17, 33, 2, 61], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 8, 9]]
JOIN_AT = [0, 2, 5]  # the step at which each sequence joins the batch
NEW = 14


@pytest.fixture(scope="module", params=["llama", "mistral-window-8"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return fuselm.load(tiny_hf.make_llama(d) if request.param == "llama" else tiny_hf.make_mistral(d, window=8))


def test_three_sequences_joined_at_different_steps_equal_decoding_alone(model):
    solo = [list(decode_ids(model.transformer, p, max_new_tokens=NEW, sampling=GREEDY)) for p in PROMPTS]
    decoder = Decoder(model.transformer, rows=3, capacity=64)
    states, out, step, widths = {}, {i: [] for i in range(3)}, 0, []
    while any(len(tokens) < NEW for tokens in out.values()):
        for i, at in enumerate(JOIN_AT):
            if at == step:
                states[i] = new_state(PROMPTS[i], 64, "cpu")
                states[i].rows = [decoder.take_row(PROMPTS[i])]
        active = [i for i in states if len(out[i]) < NEW]
        fed = decoder.feed([states[i].rows[0] for i in active])
        widths.append(len(active))
        for i in active:
            token = next_token(states[i], fed[states[i].rows[0]][None], (), GREEDY, None)
            out[i].append(token)
            if len(out[i]) < NEW:
                decoder.push(states[i].rows, [token])
            else:
                decoder.release(states[i].rows)
        step += 1
    assert max(widths) == 3  # all three decoded together for a while, at different positions
    assert [out[i] for i in range(3)] == solo


def test_rows_at_different_positions_give_the_logits_of_a_full_forward(model):
    """One batched step over rows at lengths 6, 11 and 3 equals each sequence's own full forward."""
    decoder = Decoder(model.transformer, rows=3, capacity=32)
    rows = [decoder.take_row(p) for p in PROMPTS]
    decoder.feed(rows)  # three prefills, alone
    nxt = [3, 4, 5]
    for row, token in zip(rows, nxt):
        decoder.push([row], [token])
    fed = decoder.feed(rows)  # one batched forward, rows at different positions
    assert sorted(decoder.cache.lengths.tolist()) == sorted(len(p) + 1 for p in PROMPTS)
    for row, prompt, token in zip(rows, PROMPTS, nxt):
        full = model(torch.tensor([prompt + [token]]))[0, -1]
        torch.testing.assert_close(fed[row], full, rtol=0, atol=1e-5)
