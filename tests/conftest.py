"""Shared fixtures: a tokenizer trained once per session on made-up text, tiny model configs;
the tiny chat models and checkpoints the RLHF tests (test_rlhf.py, test_ppo.py) start from."""
import os
import random
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llama2  # noqa: E402
import training  # noqa: E402
import llama2_kernels  # noqa: E402

# The kernel tests need the compiled extension. Where it did not build or import they fail, so that
# a run cannot pass with no kernel tested (CI); LLAMA2_ALLOW_NO_EXTENSION=1 lets them skip instead,
# for a machine without a compiler. CI never sets it.
ALLOW_NO_EXTENSION = os.environ.get("LLAMA2_ALLOW_NO_EXTENSION") == "1"

WORDS = ("the king queen lord lady sword crown castle night day love death fair sweet noble "
         "speak thou thee thy hath doth wherefore art gentle heart soul fortune star moon sun "
         "answer question number sum list word letter count reverse sort first last").split()


def make_corpus(path, n_lines=3000, seed=0):
    """Plain text with words, digits and punctuation, enough to train a small BPE vocab."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_lines):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            if rng.random() < 0.4:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
            f.write(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = make_corpus(str(d / "corpus.txt"))
    return llama2.train_tokenizer([corpus], str(d / "tok"), vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return llama2.Tokenizer(tokenizer_path)


@pytest.fixture
def llama2_extension():
    """Fails the test when llama2_C was not built or does not import (skips it with
    LLAMA2_ALLOW_NO_EXTENSION=1)."""
    if llama2_kernels.AVAILABLE:
        return
    msg = (f"the llama2_C extension is not built or does not import ({llama2_kernels.IMPORT_ERROR}); "
           "build it with `bash setup.sh` (or `pip install --no-build-isolation -e .`), or set "
           "LLAMA2_ALLOW_NO_EXTENSION=1 to skip the kernel tests on a machine without a compiler")
    if ALLOW_NO_EXTENSION:
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# tiny models for the RLHF tests (imported: `from conftest import chat_model, ...`)


def chat_model(tokenizer, seed=0):
    """A tiny random chat model that ends its replies: every token embedding shares a constant
    component, and EOS's output row reads it, so EOS has a fair chance at every step."""
    torch.manual_seed(seed)
    args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=256)
    m = llama2.Transformer(args)
    with torch.no_grad():
        m.tok_embeddings.weight[:, 0] = 1.0
        m.output.weight[tokenizer.eos_id, 0] = 0.5
    return m


def plain_model(tokenizer, seed):
    torch.manual_seed(seed)
    return llama2.Transformer(llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words,
                                                      max_seq_len=256))


def save_model(path, model, tokenizer, stage):
    """`model` as one of our checkpoints, <path>/ckpt.pt, recorded as `stage`. -> path."""
    training.save_checkpoint(path / "ckpt.pt", {
        "model_args": asdict(model.args), "model": model.state_dict(), "config": {},
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "stage": stage})
    return path
