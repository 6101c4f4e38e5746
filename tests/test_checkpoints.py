"""Checkpoints: Hugging Face transformers in both directions, Meta's model-parallel shards, ours."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import llama2
from llama2 import ModelArgs, Transformer
from test_model import CONFIGS, randomize_norms

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (requirements-dev.txt)")


def hf_logits(path, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def hf_config(args: ModelArgs):
    return transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, tie_word_embeddings=False)


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_export_loads_in_transformers_with_same_logits(cfg, tmp_path):
    torch.manual_seed(10)
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS[cfg]))).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 20))
    ours, _ = model(tokens)
    llama2.export_hf(model, str(tmp_path))
    theirs = hf_logits(str(tmp_path), tokens)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_transformers_checkpoint_loads_here_with_same_logits(cfg, layout, tmp_path):
    torch.manual_seed(11)
    args = ModelArgs(**CONFIGS[cfg])
    hf = transformers.LlamaForCausalLM(hf_config(args)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    if layout == "bin":
        hf.config.save_pretrained(str(tmp_path))
        torch.save(hf.state_dict(), str(tmp_path / "pytorch_model.bin"))
    else:
        hf.save_pretrained(str(tmp_path), max_shard_size="20KB" if layout == "sharded" else "5GB")
    if layout == "sharded":
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        theirs = hf(tokens).logits
    model, _ = llama2.load_model(str(tmp_path))
    ours, _ = model(tokens)
    assert model.args.hidden_dim == args.hidden_dim
    assert (ours - theirs).abs().max().item() <= 1e-4


def split_meta(sd: dict, n: int) -> list:
    """Split a state dict into n model-parallel shards by Meta's rules (SPEC.md section 1)."""
    shards = [{} for _ in range(n)]
    for k, t in sd.items():
        if k.endswith("norm.weight"):
            parts = [t.clone() for _ in range(n)]  # replicated
        elif k == "tok_embeddings.weight" or k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            parts = t.chunk(n, dim=1)
        else:
            parts = t.chunk(n, dim=0)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    for s in shards:
        s["rope.freqs"] = torch.zeros(4)  # Meta's files carry this buffer; the loader must skip it
    return shards


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_shards_load_to_the_same_logits(n_shards, tmp_path):
    torch.manual_seed(12)
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, multiple_of=32, max_seq_len=64)
    model = randomize_norms(Transformer(args)).eval()
    tokens = torch.randint(0, 128, (2, 16))
    expected, _ = model(tokens)
    params = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=-1, multiple_of=32, norm_eps=1e-5)
    (tmp_path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(split_meta(model.state_dict(), n_shards)):
        torch.save(shard, str(tmp_path / f"consolidated.{i:02d}.pth"))
    loaded, _ = llama2.load_model(str(tmp_path))
    got, _ = loaded(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_our_checkpoint_round_trips_with_tokenizer(tmp_path, tokenizer):
    model = randomize_norms(Transformer(ModelArgs(**CONFIGS["gqa"]))).eval()
    ckpt = {"model_args": vars(model.args), "model": model.state_dict(), "stage": "pretrain", "config": {},
            "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8)}
    torch.save(ckpt, str(tmp_path / "ckpt.pt"))
    loaded, tok = llama2.load_model(str(tmp_path))
    tokens = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)
    assert tok.encode("the king 42") == tokenizer.encode("the king 42")


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    model = Transformer(ModelArgs(**CONFIGS["gqa"]))
    sd = model.state_dict()
    sd.pop("layers.1.feed_forward.w3.weight")
    sd["layers.0.attention.bias"] = torch.zeros(3)
    sd["norm.weight"] = torch.ones(65)
    torch.save({"model_args": vars(model.args), "model": sd}, str(tmp_path / "ckpt.pt"))
    with pytest.raises(ValueError) as e:
        llama2.load_model(str(tmp_path))
    msg = str(e.value)
    assert "missing (1): layers.1.feed_forward.w3.weight" in msg
    assert "unexpected (1): layers.0.attention.bias" in msg
    assert "norm.weight: checkpoint (65,) vs model (64,)" in msg


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        llama2.load_model(str(tmp_path))


def _extra_rss_to_load(ckpt_dir, root):
    """Peak RSS growth (bytes) of a fresh process that loads ckpt_dir in bfloat16 and reads every weight."""
    script = textwrap.dedent(f"""
        import torch, llama2
        def status(key):  # kB figures from /proc/self/status
            return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = status("VmRSS:")
        model, _ = llama2.load_model({str(ckpt_dir)!r}, dtype=torch.bfloat16)
        s = sum(p.sum().item() for p in model.parameters())  # touch every weight
        print(status("VmHWM:") - base)
    """)
    env = {**os.environ, "LLAMA2_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def _write_bf16_checkpoint(path, args):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {k: torch.randn(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    path.mkdir()
    torch.save({"model_args": vars(args), "model": sd}, str(path / "ckpt.pt"))
    return sum(t.numel() * 2 for t in sd.values())


def test_bfloat16_load_needs_about_one_copy_of_the_weights(tmp_path):
    # A 7B model in bfloat16 must load without a second copy: the tensors are memory-mapped and
    # assigned into a model built on the meta device. Measured as the peak RSS growth of loading a
    # ~190 MB checkpoint minus that of a tiny one (the fixed cost of building and running a model).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    big = ModelArgs(dim=1024, n_layers=6, n_heads=8, vocab_size=8000, multiple_of=256, max_seq_len=128)
    small = ModelArgs(dim=64, n_layers=6, n_heads=8, vocab_size=8000, multiple_of=256, max_seq_len=128)
    size = _write_bf16_checkpoint(tmp_path / "big", big)
    _write_bf16_checkpoint(tmp_path / "small", small)
    extra = _extra_rss_to_load(tmp_path / "big", root) - _extra_rss_to_load(tmp_path / "small", root)
    print(f"loaded {size / 1e6:.0f} MB of weights with {extra / 1e6:.0f} MB more peak RSS than a tiny model")
    assert extra < 1.3 * size, f"loading {size / 1e6:.0f} MB took {extra / 1e6:.0f} MB of extra RSS"
