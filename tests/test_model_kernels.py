"""The whole model with the compiled kernels equals the model with the PyTorch references."""
import contextlib

import pytest

import torch

import llama2
import llama2_kernels
from llama2 import ModelArgs, Transformer
from test_model import CONFIGS, randomize_norms

# Fails without llama2_C, or skips with LLAMA2_ALLOW_NO_EXTENSION=1 (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("llama2_extension")


@pytest.fixture(autouse=True)
def _restore_kernels():
    before = llama2.kernels_in_use()
    yield
    llama2.set_kernels(before)


def run(model, path, tokens, targets, **kw):
    llama2.set_kernels(path)
    model.zero_grad(set_to_none=True)
    logits, loss = model(tokens, targets, **kw)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_logits_and_parameter_grads_ext_equal_ref(cfg, dtype, tol):
    torch.manual_seed(5)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS[cfg]))).to(dtype)
    V = model.args.vocab_size
    tokens, targets = torch.randint(0, V, (2, 33)), torch.randint(0, V, (2, 33))
    targets[:, :5] = -100
    ref_logits, ref_grads = run(model, "ref", tokens, targets)
    ext_logits, ext_grads = run(model, "ext", tokens, targets)
    torch.testing.assert_close(ext_logits, ref_logits, rtol=tol, atol=tol)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item() + 1e-30
        err = (ext_grads[name] - ref_grads[name]).abs().max().item()
        assert err <= tol * max(1.0, scale), f"{name}: max grad difference {err:.3g}"


def test_packed_batch_ext_equals_ref():
    torch.manual_seed(6)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["gqa"]))).double()
    tokens, targets = torch.randint(0, 300, (2, 20)), torch.randint(0, 300, (2, 20))
    cu = torch.tensor([0, 7, 20, 23, 31, 40], dtype=torch.int32)  # examples cross no row boundary
    ref_logits, ref_grads = run(model, "ref", tokens, targets, cu_seqlens=cu)
    ext_logits, ext_grads = run(model, "ext", tokens, targets, cu_seqlens=cu)
    torch.testing.assert_close(ext_logits, ref_logits, rtol=1e-10, atol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(ext_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10)


def test_kv_cache_generation_ext_equals_ref():
    torch.manual_seed(7)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["odd"]))).eval()
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (4, 11, 1)]
    llama2.set_kernels("ref")
    ref, ref_logits = model.generate(prompts, max_new_tokens=12, temperature=0, return_logits=True)
    llama2.set_kernels("ext")
    ext, ext_logits = model.generate(prompts, max_new_tokens=12, temperature=0, return_logits=True)
    assert ext == ref
    for a, b in zip(ext_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def compiled_and_eager_step(autocast: bool):
    """One forward+backward of a tiny model with the kernels, eager and under
    torch.compile(fullgraph=True), optionally under CPU bfloat16 autocast.
    -> (model with the compiled grads, compiled logits, eager logits, eager grads)."""
    torch.manual_seed(8)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    model = Transformer(args)
    llama2.set_kernels("ext")
    tokens, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        eager_logits, eager_grads = run(model, "ext", tokens, targets)
        compiled = torch.compile(model, fullgraph=True)
        model.zero_grad(set_to_none=True)
        logits, loss = compiled(tokens, targets)
        loss.backward()
    return model, logits.detach(), eager_logits, eager_grads


def test_compiled_training_step_fullgraph():
    model, logits, eager_logits, eager_grads = compiled_and_eager_step(autocast=False)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-5)


def test_head_dim_without_a_kernel_falls_back_to_the_reference():
    # The CPU kernel takes head_dim <= 256; a larger head must run on the reference, not fail.
    q, k, v = torch.randn(1, 5, 2, 272), torch.randn(1, 5, 1, 272), torch.randn(1, 5, 1, 272)
    assert not llama2_kernels.supports_attention(q, k, v)
    assert llama2_kernels.supports_attention(q[..., :256], k[..., :256], v[..., :256])
    llama2.set_kernels("ext")
    torch.testing.assert_close(llama2.attention(q, k, v), llama2.ref_attention(q, k, v))


def test_mixed_dtypes_and_expanded_keys_fall_back_or_copy_never_misread():
    llama2.set_kernels("ext")
    q = torch.randn(1, 4, 4, 32, dtype=torch.float64)
    k, v = torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32)
    assert not llama2_kernels.supports_attention(q, k, v)  # mixed dtypes: not sent to a kernel
    assert llama2_kernels.supports_attention(q, k.double(), v.double())
    # keys/values expanded along time (stride 0): the kernel must copy them, not read a bad layout
    k1, v1 = torch.randn(1, 1, 2, 32).expand(1, 6, 2, 32), torch.randn(1, 1, 2, 32).expand(1, 6, 2, 32)
    q1 = torch.randn(1, 6, 4, 32)
    torch.testing.assert_close(llama2_kernels.attention(q1, k1, v1), llama2.ref_attention(q1, k1, v1),
                               rtol=1e-5, atol=1e-6)


def test_generate_under_autocast_caches_in_the_autocast_dtype():
    # The stage scripts sample under autocast: keys/values then arrive in bfloat16, and the cache
    # must hold them in bfloat16 so attention sees one dtype (the CUDA kernel refuses a mix).
    model = Transformer(ModelArgs(**CONFIGS["gqa"])).eval()
    llama2.set_kernels("ext")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate([[1, 2, 3], [4]], max_new_tokens=4, temperature=0)
    assert model.layers[0].attention.cache_k.dtype == torch.bfloat16
    assert [len(o) for o in out] == [4, 4]


def test_bf16_autocast_runs_the_kernels_in_bf16_close_to_the_reference(monkeypatch):
    # Under CPU bfloat16 autocast every hot path reaches its kernel in bfloat16 (RMSNorm's float32
    # residual is cast by its AutocastCPU rule), weights and their gradients stay float32, and the
    # logits and gradients agree with the reference path under the same autocast to bf16 accuracy.
    torch.manual_seed(6)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["gqa"])))
    V = model.args.vocab_size
    tokens, targets = torch.randint(0, V, (2, 33)), torch.randint(0, V, (2, 33))
    seen = []
    for name in ("rms_norm_fwd", "rope", "attention_fwd"):
        op = getattr(torch.ops.llama2, name)

        def spy(*args, _op=op, _name=name):
            out = _op(*args)
            seen.append((_name, (out[0] if isinstance(out, tuple) else out).dtype))
            return out
        monkeypatch.setattr(torch.ops.llama2, name, spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_grads = run(model, "ref", tokens, targets)
        ext_logits, ext_grads = run(model, "ext", tokens, targets)
    assert {n for n, _ in seen} == {"rms_norm_fwd", "rope", "attention_fwd"}
    assert all(dt == torch.bfloat16 for _, dt in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in ext_grads.values())
    # bf16 has 8 bits of mantissa: compare relative to each tensor's scale
    err = (ext_logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert err < 3e-2, f"logits differ by {err:.3g} of their scale"
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item() + 1e-30
        err = (ext_grads[name] - ref_grads[name]).abs().max().item() / scale
        assert err < 0.1, f"{name}: grad differs by {err:.3g} of its scale"


def test_compiled_training_step_fullgraph_under_bf16_autocast():
    model, logits, eager_logits, eager_grads = compiled_and_eager_step(autocast=True)
    torch.testing.assert_close(logits, eager_logits, rtol=2e-2, atol=2e-2)
    for n, p in model.named_parameters():
        scale = eager_grads[n].abs().max().item() + 1e-30
        assert (p.grad - eager_grads[n]).abs().max().item() <= 5e-2 * scale, n
