"""Generation against plain references: a loop that recomputes the whole sequence per token (no KV
cache, no batching, no early stop), and a sampler written out with a full sort."""
import pytest
import torch

import llama2
from llama2 import ModelArgs, Transformer
from test_model import CONFIGS, randomize_norms


def reference_greedy(model, prompt, max_new_tokens, eos_id=None):
    """One prompt, full forward per new token, argmax, stop at eos_id (kept) or max_new_tokens."""
    seq, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new_tokens and len(seq) < model.args.max_seq_len:
            logits, _ = model(torch.tensor([seq]))
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            seq.append(tok)
            if tok == eos_id:
                break
    return out


@pytest.mark.parametrize("cfg", ["gqa", "odd"])
def test_batched_greedy_with_eos_and_early_stop_equals_plain_loop(cfg):
    torch.manual_seed(21)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS[cfg]))).eval()
    V = model.args.vocab_size
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 1, 9, 3, 6)]
    # An EOS that some rows reach early (the token the first row makes third), so that rows
    # finish at different steps and the loop may stop before max_new_tokens.
    eos = reference_greedy(model, prompts[0], 3)[-1]
    for max_new in (1, 7, 20):
        expected = [reference_greedy(model, p, max_new, eos_id=eos) for p in prompts]
        assert model.generate(prompts, max_new_tokens=max_new, temperature=0, eos_id=eos) == expected
        no_eos = [reference_greedy(model, p, max_new) for p in prompts]
        assert model.generate(prompts, max_new_tokens=max_new, temperature=0) == no_eos


def test_generation_stops_as_soon_as_every_row_has_its_eos(monkeypatch):
    torch.manual_seed(22)
    model = Transformer(ModelArgs(**CONFIGS["gqa"])).eval()
    V = model.args.vocab_size
    prompts = [torch.randint(0, V, (4,)).tolist() for _ in range(3)]  # same length: one prefill
    # EOS: a token every row makes, the one all rows reach soonest, so each row stops at its own
    # step and all are done well before max_new_tokens.
    free = [reference_greedy(model, p, 40) for p in prompts]
    common = set.intersection(*(set(r) for r in free))
    eos = min(common, key=lambda t: max(r.index(t) for r in free))
    expected = [reference_greedy(model, p, 40, eos_id=eos) for p in prompts]
    assert len({len(r) for r in expected}) > 1 and max(len(r) for r in expected) < 40
    calls = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda *a, **kw: calls.append(1) or hidden(*a, **kw))
    assert model.generate(prompts, max_new_tokens=40, temperature=0, eos_id=eos) == expected
    # one forward per new token of the longest row, none after every row is done
    assert len(calls) == max(len(r) for r in expected)


def test_stream_and_logits_follow_each_prompt_while_finished_rows_leave_the_batch():
    torch.manual_seed(23)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["odd"]))).eval()
    prompts = [torch.randint(0, model.args.vocab_size, (n,)).tolist() for n in (4, 1, 2, 4, 3, 2)]
    free = [reference_greedy(model, p, 20) for p in prompts]
    eos = max(set(sum(free, [])), key=lambda t: sum(t in r[:10] for r in free))  # ends many rows early
    expected = [reference_greedy(model, p, 20, eos_id=eos) for p in prompts]
    assert len({len(r) for r in expected}) > 2
    seen = {i: [] for i in range(len(prompts))}
    out, logits = model.generate(prompts, max_new_tokens=20, temperature=0, eos_id=eos, return_logits=True,
                                 stream=lambda row, tok: seen[row].append(tok))
    assert out == expected and [seen[i] for i in range(len(prompts))] == expected
    with torch.no_grad():
        for p, o, lg in zip(prompts, out, logits):
            full, _ = model(torch.tensor([p + o[:-1]]))
            torch.testing.assert_close(lg, full[0, len(p) - 1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_sampled_batch_with_eos_equals_plain_loop_on_the_same_uniforms(top_p):
    # One uniform per prompt per step (generate draws them for the whole batch, also once rows
    # have left it), and each row's token is the full-sort reference's on its full-recompute logits.
    torch.manual_seed(25)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["odd"]))).eval()
    prompts = [torch.randint(0, model.args.vocab_size, (3,)).tolist() for _ in range(6)]
    eos, N, T = 7, 25, 1.3
    g = torch.Generator().manual_seed(11)
    expected, live = [[] for _ in prompts], set(range(len(prompts)))
    with torch.no_grad():
        while live:
            u = torch.rand(len(prompts), 1, generator=g, dtype=torch.float64)
            for i in sorted(live):
                logits, _ = model(torch.tensor([prompts[i] + expected[i]]))
                expected[i].append(reference_top_p(logits[0, -1:], T, top_p, u[i:i + 1])[0])
                if expected[i][-1] == eos or len(expected[i]) == N:
                    live.discard(i)
    assert len({len(r) for r in expected}) > 2  # rows end at different steps
    assert model.generate(prompts, max_new_tokens=N, temperature=T, top_p=top_p, seed=11, eos_id=eos) == expected


# ---------------------------------------------------------------- the sampler

def reference_top_p(logits, temperature, top_p, u):
    """Full sort, Meta's nucleus rule, then the first token whose cumulative mass exceeds u * mass
    (top_p >= 1: every token, in vocabulary order)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    out = []
    for row, x in zip(probs, u.flatten().tolist()):
        if top_p < 1:
            p, idx = row.sort(descending=True)
            p = p * ((p.cumsum(0) - p) <= top_p)
        else:
            p, idx = row, torch.arange(len(row))
        cdf = p.cumsum(0)
        i = int((cdf > x * cdf[-1]).nonzero()[0])
        out.append(int(idx[i]))
    return out


@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_sample_equals_full_sort_reference_for_the_same_uniforms(top_p):
    torch.manual_seed(24)
    V = 300
    # Peaked rows (the nucleus fits in the topk candidates) and flat ones (it does not: full sort).
    logits = torch.cat([torch.randn(6, V) * 4, torch.randn(3, V) * 0.1])
    got = llama2.sample(logits, 0.7, top_p, torch.Generator().manual_seed(9))
    u = torch.rand(len(logits), 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    # Peaked rows alone take the topk path (their 64 most likely tokens hold more than top_p);
    # the reference does not care which path ran.
    top64 = torch.softmax(logits / 0.7, -1).topk(64, dim=-1).values.sum(-1)
    assert bool((top64[:6] > 0.9).all()) and bool((top64[6:] < 0.5).all())
    peaked = llama2.sample(logits[:6], 0.7, top_p, torch.Generator().manual_seed(9))
    assert got.tolist() == reference_top_p(logits, 0.7, top_p, u)
    assert peaked.tolist() == reference_top_p(logits[:6], 0.7, top_p, u[:6])


def test_sample_rows_on_all_three_paths_in_one_batch_equal_the_reference():
    # A vocabulary of 4096: peaked rows are covered by the top 64, middling ones by the top 512,
    # flat ones need the full sort; mixed in one batch, each row still draws what the full-sort
    # reference draws with its own uniform.
    torch.manual_seed(5)
    V, top_p = 4096, 0.9
    logits = torch.cat([torch.randn(3, V) * 5, torch.randn(3, V) * 2.2, torch.randn(3, V) * 0.05])
    logits = logits[torch.tensor([0, 3, 6, 1, 7, 4, 2, 8, 5])]  # interleaved paths
    p = torch.softmax(logits / 0.7, -1)
    top64, top512 = (p.topk(k, dim=-1).values.sum(-1) for k in (64, 512))
    path = [0 if a > top_p else 1 if b > top_p else 2 for a, b in zip(top64, top512)]
    assert path == [0, 1, 2, 0, 2, 1, 0, 2, 1], path
    got = llama2.sample(logits, 0.7, top_p, torch.Generator().manual_seed(3))
    u = torch.rand(len(logits), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert got.tolist() == reference_top_p(logits, 0.7, top_p, u)


def test_sample_frequencies_follow_the_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(20000, 5)
    draws = llama2.sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    # 20000 draws: the standard error of each frequency is below 0.0036; allow ~4 of them
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.015)


def test_draw_never_picks_a_token_without_mass():
    # u at its largest, rounding of u * mass up to the mass, zero-mass tokens first, last, between
    p = torch.tensor([[0.0, 0.2, 0.0, 0.3, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 1e-30]])
    u_max = torch.full((3, 1), 1.0, dtype=torch.float64).nextafter(torch.zeros(3, 1, dtype=torch.float64))
    for u in (torch.zeros(3, 1, dtype=torch.float64), u_max, torch.ones(3, 1, dtype=torch.float64)):
        assert llama2._draw(p, u).tolist() == ([1, 0, 5] if u.max() == 0 else [3, 0, 5])
    # and temperature far below 1 (most of the softmax underflows to exactly 0)
    logits = torch.randn(64, 50) * 10
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(logits / 1e-3, dim=-1)
    assert (probs == 0).float().mean() > 0.9
    for _ in range(20):
        tok = llama2.sample(logits, 1e-3, 1.0, g)
        assert bool((probs.gather(-1, tok[:, None]) > 0).all())
