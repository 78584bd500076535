"""The LLaMA-style model against transformers' LlamaForCausalLM (random weights), plus generation."""
import pytest
import torch

from speechgpt_min.model import IGNORE_INDEX, LM_PRESETS, KVCache, LMConfig, Transformer, left_pad, sample


def hf_pair(n_heads=4, n_kv_heads=4, tie=False, theta=1e4, vocab=97, seed=0):
    """A random transformers LlamaForCausalLM and our Transformer holding the same weights."""
    transformers = pytest.importorskip("transformers")
    cfg = LMConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=96,
                   max_seq_len=128, norm_eps=1e-6, rope_theta=theta, tie_embeddings=tie)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = Transformer(cfg).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    ours.load_state_dict(state, strict=True)
    return ours, hf


@pytest.mark.parametrize("n_kv_heads,tie,theta", [(4, False, 1e4), (2, True, 1e5), (4, True, 1e5), (1, False, 1e4)])
def test_matches_transformers_logits_and_greedy_ids(n_kv_heads, tie, theta):
    ours, hf = hf_pair(n_kv_heads=n_kv_heads, tie=tie, theta=theta)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    ours_ids = ours.generate(ids, 12, temperature=0)
    hf_ids = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_ids, hf_ids)


def test_tied_model_has_no_lm_head_and_reuses_embeddings():
    ours, _ = hf_pair(tie=True)
    assert ours.lm_head is None
    assert "lm_head.weight" not in ours.state_dict()
    h = torch.randn(3, 64)
    torch.testing.assert_close(ours.logits(h), h @ ours.embed_tokens.weight.T)


def test_kv_cache_decoding_equals_full_recomputation():
    ours, _ = hf_pair(n_kv_heads=2)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)  # (2, 9, V)
        cache = KVCache(ours.config, batch_size=2, max_len=9, dtype=torch.float32, device="cpu")
        # prefill 4, then a chunk of 3 (exercises the offset causal mask), then 2 single tokens
        chunks = [ours.logits(ours.hidden_states(ids[:, a:b], cache)) for a, b in [(0, 4), (4, 7), (7, 8), (8, 9)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 9

    greedy = ours.generate(ids, 8, temperature=0)
    seq = ids
    with torch.no_grad():
        for _ in range(8):  # no cache: recompute the whole sequence every step
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq)


def test_kv_cache_refuses_overflow():
    cfg = LMConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(cfg, 1, 9, torch.float32, "cpu")
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_ignores_masked_targets_and_matches_cross_entropy():
    ours, _ = hf_pair()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    targets = ids.roll(-1, dims=1)
    targets[:, :4] = IGNORE_INDEX
    logits, loss = ours(ids, targets)
    keep = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # changing a masked target changes nothing
    targets2 = targets.clone()
    targets2[:, 0] = IGNORE_INDEX
    torch.testing.assert_close(ours(ids, targets2)[1], loss)
    _, zero = ours(ids, torch.full_like(ids, IGNORE_INDEX))
    assert zero.item() == 0.0


def test_gradient_checkpointing_gives_the_same_gradients():
    ours, _ = hf_pair(n_kv_heads=2)
    ours.train()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        ours(ids, ids.roll(-1, dims=1))[1].backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_presets_sizes_and_unknown_name():
    with torch.device("meta"):  # shapes only, no memory
        smol = Transformer(LMConfig.from_preset("smollm2-135m"))
        llama = Transformer(LMConfig.from_preset("llama-7b"))
    assert smol.num_params() == 134_515_008  # SmolLM2-135M, tied embeddings
    assert llama.num_params() == 6_738_415_616  # LLaMA-7B
    assert LMConfig.from_preset("llama-7b").ffn_dim == LMConfig(dim=4096, n_heads=32).ffn_dim == 11008
    toy = LMConfig.from_preset("toy", vocab_size=1234)
    assert (toy.vocab_size, toy.head_dim, toy.n_kv_heads, toy.ffn_dim) == (1234, 64, 4, 688)
    assert 2e6 < Transformer(toy).num_params(non_embedding=True) < 5e6
    with pytest.raises(ValueError) as err:
        LMConfig.from_preset("toy-")  # exact names only
    for name in LM_PRESETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="not divisible"):  # checked after the overrides
        LMConfig.from_preset("toy", dim=250)
    with pytest.raises(ValueError, match=r"unknown LMConfig field\(s\) \['width'\]"):
        LMConfig.from_preset("toy", width=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        LMConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_sampling_is_valid_reproducible_and_respects_stop_ids():
    ours, _ = hf_pair(n_kv_heads=2)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    a = ours.generate(ids, 20, temperature=0.9, top_k=10, top_p=0.9, generator=123)
    b = ours.generate(ids, 20, temperature=0.9, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(123))
    c = ours.generate(ids, 20, temperature=0.9, top_k=10, top_p=0.9, generator=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 25) and torch.equal(a[:, :5], ids)
    assert ((a >= 0) & (a < 97)).all()
    # top_k=1 and a tiny nucleus are both greedy
    greedy = ours.generate(ids, 10, temperature=0)
    assert torch.equal(ours.generate(ids, 10, temperature=1.0, top_k=1, generator=0), greedy)
    assert torch.equal(ours.generate(ids, 10, temperature=1.0, top_p=1e-6, generator=0), greedy)
    # stop at the third greedy token: it is kept, nothing follows
    stop = greedy[0, 7].item()
    first = (greedy[0, 5:] == stop).nonzero()[0, 0].item()
    out = ours.generate(ids, 10, temperature=0, stop_ids=[stop])
    assert torch.equal(out, greedy[:, :5 + first + 1])
    streamed = list(ours.stream(ids, 10, temperature=0, stop_ids=[stop]))
    assert [t.item() for t in streamed] == out[0, 5:].tolist()


def test_batched_generation_stops_when_every_row_has_stopped():
    ours, _ = hf_pair()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(6))
    greedy = ours.generate(ids, 6, temperature=0)
    stop = greedy[0, 6].item()  # row 0 stops after its 2nd token
    out = ours.generate(ids, 6, temperature=0, stop_ids=[stop, greedy[1, 8].item()])
    row1_end = 5 + (out[1, 5:] == greedy[1, 8]).nonzero()[0, 0].item()
    assert out.shape[1] == max(7, row1_end + 1)
    assert (out[0, 6:] == stop).all()  # row 0 repeats its stop token once finished


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    ours, _ = hf_pair(n_kv_heads=2)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (7, 3, 11)]
    ids, pad_mask = left_pad(prompts, pad_id=5)
    assert ids.shape == pad_mask.shape == (3, 11)
    assert pad_mask.sum(1).tolist() == [4, 8, 0] and ids[1, :8].eq(5).all() and ids[1, 8:].tolist() == prompts[1]
    alone = [ours.generate(torch.tensor([p]), 10, temperature=0)[0, len(p):] for p in prompts]
    assert not all(torch.equal(alone[0], a) for a in alone[1:])  # the rows differ: the test can fail
    batched = ours.generate(ids, 10, temperature=0, pad_mask=pad_mask)
    for row, a in zip(batched[:, 11:], alone):
        assert torch.equal(row, a)
    # the next-token logits after each prompt's last real token, batched and alone
    with torch.no_grad():
        cache = KVCache(ours.config, 3, 11, torch.float32, "cpu", pad_mask)
        last = ours.decode_step(ids, cache)  # (3, V)
        for row, p in zip(last, prompts):
            torch.testing.assert_close(row, ours(torch.tensor([p]))[0, -1], rtol=0, atol=1e-5)
        # without the mask the padding leaks into the shorter prompts
        unmasked = ours.decode_step(ids, KVCache(ours.config, 3, 11, torch.float32, "cpu"))
        assert not torch.allclose(unmasked[1], last[1], atol=1e-3)
    # a row that meets its stop token repeats it while the others go on
    stop = alone[1][2].item()
    out = ours.generate(ids, 10, temperature=0, stop_ids=[stop], pad_mask=pad_mask)
    first = (alone[1] == stop).nonzero()[0, 0].item()
    assert (out[1, 11 + first:] == stop).all()
    for row, a in zip(out[:, 11:], alone):  # a row stops at its first stop token, if it has one
        n = (a == stop).nonzero()[0, 0].item() + 1 if (a == stop).any() else len(a)
        assert torch.equal(row[:n], a[:n])
    with pytest.raises(ValueError, match="left only"):
        ours.generate(ids, 2, pad_mask=pad_mask.flip(1))


def test_compiled_decoding_gives_the_same_tokens():
    ours, hf = hf_pair(n_kv_heads=2)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    eager = ours.generate(ids, 12, temperature=0)
    assert torch.equal(ours.generate(ids, 12, temperature=0, compile=True), eager)
    assert torch.equal(hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0), eager)


def test_sample_top_k_support():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(400, 1)
    picks = sample(logits, temperature=5.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}
    picks = sample(logits, temperature=5.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) <= {1, 2} and 1 in picks.tolist()
