"""The tensor-parallel split as data (parallel/plan.py), checked against the Megatron rules worked out by hand."""

from __future__ import annotations

import pytest

from fuselm.config import ModelConfig
from fuselm.errors import FuselmError
from fuselm.parallel.plan import plan_shards, split_ceil, split_even


def _config(**changes) -> ModelConfig:
    base = dict(arch="chameleon", vocab_size=65536, hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                qk_norm=True)
    return ModelConfig(**{**base, **changes})


def test_chameleon_34b_over_4_ranks():
    plans = [plan_shards(_config(), r, 4, qk_norm_groups=(8, 8), ffn_unit=256) for r in range(4)]
    assert [p.q_heads for p in plans] == [range(0, 16), range(16, 32), range(32, 48), range(48, 64)]
    assert [p.kv_heads for p in plans] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    # 22016 = 86 blocks of 256: 22, 22, 21, 21 blocks
    assert [len(p.ffn) for p in plans] == [22 * 256, 22 * 256, 21 * 256, 21 * 256]
    assert plans[3].ffn.stop == 22016 and all(p.ffn.start % 256 == 0 for p in plans)
    assert [p.vocab for p in plans] == [range(0, 16384), range(16384, 32768), range(32768, 49152),
                                        range(49152, 65536)]
    # 8 qk-norm groups of 8 heads: 16 heads per rank = 2 whole groups
    assert [p.q_norm_rows for p in plans] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert plans[1].config.num_attention_heads == 16 and plans[1].config.num_key_value_heads == 2


def test_groups_equal_to_ranks_give_each_rank_its_group():
    plans = [plan_shards(_config(num_attention_heads=8, num_key_value_heads=8), r, 4, qk_norm_groups=(4, 4))
             for r in range(4)]
    assert [p.q_norm_rows for p in plans] == [(0,), (1,), (2,), (3,)]
    # 2 groups over 4 ranks: each rank's 2 heads lie in one group
    plans = [plan_shards(_config(num_attention_heads=8, num_key_value_heads=8), r, 4, qk_norm_groups=(2, 2))
             for r in range(4)]
    assert [p.q_norm_rows for p in plans] == [(0,), (0,), (1,), (1,)]


def test_kv_heads_that_do_not_divide():
    mqa = [plan_shards(_config(num_attention_heads=8, num_key_value_heads=1, qk_norm=False), r, 2) for r in range(2)]
    assert [p.kv_heads for p in mqa] == [(0,), (0,)]  # Falcon-7B: the one KV head on every rank
    gqa = [plan_shards(_config(num_attention_heads=4, num_key_value_heads=2, qk_norm=False), r, 4) for r in range(4)]
    assert [p.kv_heads for p in gqa] == [(0,), (0,), (1,), (1,)]
    odd = [plan_shards(_config(num_attention_heads=6, num_key_value_heads=3, qk_norm=False), r, 2) for r in range(2)]
    assert [p.kv_heads for p in odd] == [(0, 0, 1), (1, 2, 2)]  # no even sharing: one KV head per query head


def test_impossible_splits_are_one_error():
    with pytest.raises(FuselmError, match=r"the model's 6 attention heads do not split over 4 ranks"):
        plan_shards(_config(num_attention_heads=6, num_key_value_heads=6, qk_norm=False), 0, 4)


def test_feed_forward_too_narrow_for_whole_blocks_splits_by_feature():
    plans = [plan_shards(_config(intermediate_size=512, qk_norm=False), r, 4, ffn_unit=256) for r in range(4)]
    assert [p.ffn for p in plans] == [range(0, 128), range(128, 256), range(256, 384), range(384, 512)]


def test_splits():
    assert split_even(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert split_even(768, 2, 256) == [range(0, 512), range(512, 768)]
    assert split_ceil(10, 4) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
