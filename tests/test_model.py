"""The model against independent references: float64 math, Meta's formulas, hand-counted sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

import llama2
from llama2 import ModelArgs, Transformer

# Three small shapes: GQA, ffn_dim_multiplier with a non-default multiple_of, odd sizes.
CONFIGS = {
    "gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64),
    "ffn_mult": dict(dim=96, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=257, multiple_of=48,
                     ffn_dim_multiplier=1.3, max_seq_len=64, rope_theta=500.0),
    "odd": dict(dim=60, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=101, multiple_of=7, norm_eps=1e-6,
                max_seq_len=48),
}


def randomize_norms(model):
    # Norm weights start at 1; random ones make a test sensitive to a misplaced norm weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------- shapes and sizes

@pytest.mark.parametrize("name,expected", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                           ("llama2-70b", 68_976_648_192)])
def test_released_parameter_counts_without_allocating(name, expected):
    assert llama2.count_params(ModelArgs.preset(name)) == expected


@pytest.mark.parametrize("name,hidden", [("llama2-7b", 11008), ("llama2-13b", 13824), ("llama2-70b", 28672)])
def test_ffn_hidden_size_rule(name, hidden):
    assert ModelArgs.preset(name).hidden_dim == hidden


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="llama2-7b.*llama2-13b.*llama2-70b"):
        ModelArgs.preset("llama2-8b")


def test_bad_head_config_is_refused():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=8, n_kv_heads=3)


# ---------------------------------------------------------------- hot-path references

def test_ref_rms_norm_matches_float64_formula():
    x = torch.randn(3, 5, 17, dtype=torch.float64)
    w = torch.randn(17, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 17 + 1e-5) * w
    torch.testing.assert_close(llama2.ref_rms_norm(x, w, 1e-5), expected, rtol=1e-12, atol=1e-12)
    # bfloat16 input: statistics in float32, result cast back (Meta's .type_as(x))
    xb = x.bfloat16()
    out = llama2.ref_rms_norm(xb, torch.ones(17, dtype=torch.bfloat16), 1e-5)
    assert out.dtype == torch.bfloat16


def test_ref_rope_matches_metas_complex_rotation():
    B, T, H, D, theta = 2, 7, 3, 16, 10000.0
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 3, 0, 1, 2, 40, 5]])
    cos, sin = llama2.rope_table(D, 64, theta, dtype=torch.float64)
    # Meta: freqs_cis = polar(1, t * theta^(-2i/D)); x as complex pairs times freqs_cis
    freqs = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = positions[..., None].double() * freqs  # (B, T, D/2)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    xc = torch.view_as_complex(x.reshape(B, T, H, D // 2, 2).contiguous())
    expected = torch.view_as_real(xc * freqs_cis).reshape(B, T, H, D)
    torch.testing.assert_close(llama2.ref_rope(x, positions, cos, sin), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,KV,Tq,Tk", [(4, 4, 5, 5), (8, 2, 6, 6), (6, 1, 1, 9), (4, 2, 3, 8)])
def test_ref_attention_matches_repeated_heads_loop(H, KV, Tq, Tk):
    B, D = 2, 8
    q = torch.randn(B, Tq, H, D, dtype=torch.float64)
    k = torch.randn(B, Tk, KV, D, dtype=torch.float64)
    v = torch.randn(B, Tk, KV, D, dtype=torch.float64)
    out = llama2.ref_attention(q, k, v, causal=True)
    # Independent: one head and one query at a time, Meta's repeat_kv order (head h -> kv h // (H/KV))
    expected = torch.empty_like(out)
    for b in range(B):
        for h in range(H):
            kv = h // (H // KV)
            for i in range(Tq):
                last = i + Tk - Tq
                s = torch.tensor([float(q[b, i, h] @ k[b, j, kv]) / math.sqrt(D) for j in range(last + 1)],
                                 dtype=torch.float64)
                p = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                expected[b, i, h] = (p[:, None] * v[b, :last + 1, kv]).sum(0)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_ref_attention_packed_equals_separate_sequences():
    lens = [3, 1, 5, 2]
    T, H, KV, D = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(1, T, n, D, dtype=torch.float64) for n in (H, KV, KV))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    out = llama2.ref_attention(q, k, v, causal=True, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = llama2.ref_attention(q[:, s:e], k[:, s:e], v[:, s:e], causal=True)
        torch.testing.assert_close(out[:, s:e], sep, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the whole model

def test_packed_forward_equals_separate_examples():
    torch.manual_seed(1)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["gqa"]))).double()
    rows = [[5, 7], [2, 8, 2]]  # two rows of 12 tokens, each packed with examples of these lengths
    B, T = 2, 12
    tokens = torch.randint(0, 300, (B, T))
    cu = [0]
    for row in rows:
        for n in row:
            cu.append(cu[-1] + n)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    logits, _ = model(tokens, cu_seqlens=cu_t)
    flat_tok, flat_logits = tokens.view(-1), logits.view(B * T, -1)
    for s, e in zip(cu[:-1], cu[1:]):
        alone, _ = model(flat_tok[s:e][None])
        torch.testing.assert_close(flat_logits[s:e], alone[0], rtol=1e-9, atol=1e-9)


def test_bad_packing_and_positions_are_clear_errors():
    # checked once per forward while on the host (the kernels read them unchecked)
    model = Transformer(ModelArgs(**CONFIGS["gqa"]))
    tokens = torch.randint(0, 300, (2, 6))
    for cu in ([0, 5, 11], [0, 7, 5, 12], [1, 6, 12]):  # short of B*T, decreasing, not from 0
        with pytest.raises(ValueError, match="cu_seqlens must be"):
            model(tokens, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    model(tokens, cu_seqlens=torch.tensor([0, 6, 6, 12], dtype=torch.int32))  # an empty segment
    limit = 2 * model.args.max_seq_len
    for bad in (-1, limit):
        pos = torch.arange(6).expand(2, 6).clone()
        pos[1, 3] = bad
        with pytest.raises(ValueError, match=rf"positions must lie in \[0, {limit}\)"):
            model(tokens, positions=pos)


def test_loss_ignores_minus_100_targets():
    model = Transformer(ModelArgs(**CONFIGS["odd"]))
    tokens = torch.randint(0, 101, (2, 10))
    targets = tokens.clone()
    targets[:, :4] = -100
    logits, loss = model(tokens, targets)
    kept = logits[:, 4:].reshape(-1, 101)
    expected = F.cross_entropy(kept.double(), tokens[:, 4:].reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-5


def test_tiny_model_overfits_a_short_text():
    torch.manual_seed(0)
    args = ModelArgs.preset("tiny")
    model = Transformer(args)
    data = torch.randint(0, args.vocab_size, (1, 65))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    first = None
    for step in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0  # ~ln(512) at init
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after 150 steps"


def test_too_long_input_is_a_clear_error():
    model = Transformer(ModelArgs(**CONFIGS["odd"]))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit the context"):
        model.generate([[1] * 48], max_new_tokens=4)


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("cfg", ["gqa", "odd"])
def test_kv_cache_greedy_equals_full_recompute(cfg):
    torch.manual_seed(2)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS[cfg]))).eval()
    prompt = torch.randint(0, model.args.vocab_size, (7,)).tolist()
    out, step_logits = model.generate([prompt], max_new_tokens=12, temperature=0, return_logits=True)
    out, step_logits = out[0], step_logits[0]
    assert len(out) == 12
    seq = list(prompt)
    with torch.no_grad():
        for i, tok in enumerate(out):
            full, _ = model(torch.tensor([seq]))
            torch.testing.assert_close(step_logits[i], full[0, -1], rtol=1e-4, atol=1e-5)
            assert int(full[0, -1].argmax()) == tok
            seq.append(tok)


def test_batched_generation_with_mixed_lengths_equals_one_at_a_time():
    torch.manual_seed(3)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["gqa"]))).eval()
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 9, 1, 6)]
    batched = model.generate(prompts, max_new_tokens=10, temperature=0)
    for p, b in zip(prompts, batched):
        assert model.generate([p], max_new_tokens=10, temperature=0)[0] == b


def test_generation_stops_at_eos_and_seed_reproduces():
    torch.manual_seed(4)
    model = Transformer(ModelArgs(**CONFIGS["gqa"])).eval()
    prompt = [1, 5, 9]
    greedy = model.generate([prompt], max_new_tokens=8, temperature=0)[0]
    stop = greedy[3]
    cut = model.generate([prompt], max_new_tokens=8, temperature=0, eos_id=stop)[0]
    assert cut == greedy[:greedy.index(stop) + 1]
    a = model.generate([prompt], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    b = model.generate([prompt], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    assert a == b


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(llama2.sample(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert int(llama2.sample(logits, 0.0, 0.9)) == 0


def test_training_after_generation():
    # generate() runs in inference mode; what it caches (the RoPE table) must still serve training.
    model = Transformer(ModelArgs(**CONFIGS["gqa"]))
    model.generate([[1, 2, 3]], max_new_tokens=2, temperature=0)
    _, loss = model(torch.randint(0, 300, (1, 8)), torch.randint(0, 300, (1, 8)))
    loss.backward()
    assert model.output.weight.grad is not None
