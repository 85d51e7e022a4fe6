"""tritium.models.bigbird_layout against transformers' own numpy drawing of BigBird-Pegasus'
training-mode random blocks: both rules (the paper's lengths and the plan of any other
length), several block sizes, r, head counts and layer seeds."""

import numpy as np
import pytest
import torch

from tritium.models.bigbird_layout import random_layout

CASES = [  # block_size, r, heads, max_position_embeddings, seqlen, seed (the layer)
    (16, 1, 2, 256, 128, 0), (16, 1, 2, 256, 240, 3), (16, 2, 3, 256, 160, 1), (64, 2, 3, 4096, 960, 0),
    (64, 3, 2, 4096, 2048, 7), (64, 3, 4, 4096, 1024, 5), (64, 3, 4, 4096, 3072, 2), (64, 3, 2, 4096, 4096, 0),
    (32, 3, 2, 4096, 1024, 1), (16, 3, 2, 1024, 1024, 4), (128, 3, 2, 4096, 4096, 1),
]


def transformers_layout(size, r, heads, max_seqlen, seqlen, seed):
    from transformers import BigBirdPegasusConfig
    from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import BigBirdPegasusBlockSparseAttention

    config = BigBirdPegasusConfig(block_size=size, num_random_blocks=r, encoder_attention_heads=heads,
                                  d_model=8 * heads, max_position_embeddings=max_seqlen)
    module = BigBirdPegasusBlockSparseAttention(config, seed=seed).train()
    np.random.seed(seed)  # as its forward does in training
    if seqlen in (1024, 3072, 4096):
        rows = [module._bigbird_block_rand_mask(max_seqlen, max_seqlen, size, size, r, last_idx=1024)[: seqlen // size - 2]
                for _ in range(heads)]
    else:
        plan, counts = module._get_rand_attn_plan(seqlen, size, r)
        rows = module._bigbird_block_rand_mask_with_head(
            from_seq_length=seqlen, to_seq_length=seqlen, from_block_size=size, to_block_size=size, num_heads=heads,
            plan_from_length=plan, plan_num_rand_blocks=counts)
    return torch.from_numpy(np.stack(rows)).long()


@pytest.mark.parametrize("size,r,heads,max_seqlen,seqlen,seed", CASES)
def test_random_layout_is_transformers(size, r, heads, max_seqlen, seqlen, seed):
    ours = random_layout(seqlen, block_size=size, num_random_blocks=r, heads=heads, seed=seed, max_seqlen=max_seqlen)
    expected = transformers_layout(size, r, heads, max_seqlen, seqlen, seed)
    assert ours.shape == (heads, seqlen // size - 2, r)
    assert torch.equal(ours, expected)
    assert len(ours.unique()) > 1  # really random, not the eval layout


def test_random_layout_refuses_short_or_unaligned_inputs():
    for seqlen in (112, 120):  # (5 + 2) blocks of 16: full attention's; 120: not a multiple
        with pytest.raises(ValueError, match="multiple of block_size"):
            random_layout(seqlen, block_size=16, num_random_blocks=1, heads=2, seed=0, max_seqlen=256)
