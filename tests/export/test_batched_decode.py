"""Batches of prompts of different lengths (left padding, as `generate` pads them): every row decodes as it
would alone, and the decode step handles rows at different positions without a host sync."""
import pytest
import torch

from .tiny_sparse import random_ids, remote_model

LENGTHS = (37, 21, 50)  # 21 is shorter than the window + sink (28): its streaming ring has not wrapped


def _left_padded(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[1]:], mask[b, width - p.shape[1]:] = p[0], 1
    return ids, mask


@pytest.mark.parametrize("settings", [{"top_p": 0.6}, {"top_k": 2, "query_stride": 4}, {"seqlen_threshold": 45}])
def test_left_padded_generate_equals_each_row_alone(settings):
    model = remote_model(layers=2, retrieval=(1,), **settings)
    prompts = [random_ids(n, seed=10 + n) for n in LENGTHS]
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                               return_dict_in_generate=True, output_scores=True)
        for b, prompt in enumerate(prompts):
            cache = model.make_cache()
            cache.mode = "sparse"  # the batch's mode (below the threshold a row alone would run dense)
            alone = model.generate(prompt, max_new_tokens=20, do_sample=False, return_dict_in_generate=True,
                                   output_scores=True, past_key_values=cache)
            assert torch.equal(batch.sequences[b, ids.shape[1]:], alone.sequences[0, prompt.shape[1]:]), b
            for got, want in zip(batch.scores, alone.scores):
                torch.testing.assert_close(got[b], want[0], atol=1e-4, rtol=1e-4)
    # The longest prompt (50) is past seqlen_threshold 45: the whole batch takes its (sparse) mode.
    assert batch.past_key_values.mode == "sparse"
    assert batch.past_key_values.row_lengths() == [n + 20 - 1 for n in LENGTHS]


def test_decode_steps_of_a_ragged_batch_do_not_sync(monkeypatch, forbid_host_sync, forbid_python_syncs):
    model = remote_model(layers=2, retrieval=(1,), top_p=0.6)
    ids, mask = _left_padded([random_ids(n, seed=n) for n in LENGTHS])
    cache = model.make_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        step = torch.randint(0, 256, (3, 1), generator=torch.Generator().manual_seed(0))
        with monkeypatch.context() as patch:
            forbid_python_syncs(patch)
            with forbid_host_sync():
                for _ in range(20):  # crosses the block edges at 32, 48 and 64 on different steps per row
                    model(step, past_key_values=cache)
    assert cache.row_lengths() == [n + 20 for n in LENGTHS]


def test_padding_that_is_not_on_the_left_is_one_clear_error():
    model = remote_model(layers=1)
    ids = random_ids(20).repeat(2, 1)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    with pytest.raises(ValueError, match="left-padded"):
        model(ids, attention_mask=mask)


def test_a_ragged_cache_takes_one_token_per_step():
    model = remote_model(layers=1)
    ids, mask = _left_padded([random_ids(n, seed=n) for n in (20, 30)])
    cache = model.make_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="one token per row"):
            model(ids[:, :4], past_key_values=cache)
