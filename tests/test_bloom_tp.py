"""Tensor-parallel BLOOM (tp_softmax.models.bloom) against Hugging Face's BLOOM, on CPU.

* In one process: the sharded attention / MLP of every rank of a simulated group, summed
  over the ranks (what the all-reduce does), equals Hugging Face's ``BloomAttention`` /
  ``BloomMLP``, with left padding, uneven head splits and a KV cache.
* With torchrun (gloo): ``launch/generate.py`` at world sizes 1, 2 and 3 (14 heads: uneven on
  3 ranks), with and without padding, float32 and bfloat16, must pass its own check against
  the unsharded Hugging Face model.
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BloomConfig, BloomForCausalLM  # noqa: E402
from transformers.models.bloom import modeling_bloom  # noqa: E402

import tp_softmax.models.bloom as tp_bloom  # noqa: E402
from tp_softmax import alibi_slopes, head_partition  # noqa: E402
from tp_softmax.models import TPBloomForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "generate.py")

HEADS, HIDDEN = 6, 48            # 6 heads: not a power of two (ALiBi's second slope series)
WORLD_SIZES = [1, 2, 3, 4]       # 4 ranks split 6 heads 2, 2, 1, 1
ATOL = {torch.float32: 2e-6}


def hf_model(seed=0, heads=HEADS, hidden=HIDDEN, layers=1, std=0.1):
    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=64, hidden_size=hidden, n_layer=layers, n_head=heads,
                         initializer_range=std, tie_word_embeddings=False)
    return BloomForCausalLM(config).eval()


def padded_mask(batch, length):
    """``[B, L]`` 1/0 mask, row b left-padded by ``b`` tokens."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        mask[b, :b] = 0
    return mask


def hf_attention_mask(mask, q_len, dtype):
    """The additive ``[B, 1, Q, K]`` causal + padding mask that Hugging Face's BLOOM adds."""
    k_len = mask.size(1)
    pos = torch.arange(q_len)[:, None] + (k_len - q_len)
    allowed = (torch.arange(k_len)[None, :] <= pos)[None] & mask.bool()[:, None, :]
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def hf_attention(attn, x, mask):
    alibi = modeling_bloom.build_alibi_tensor(mask, attn.num_heads, x.dtype)
    additive = hf_attention_mask(mask, x.size(1), x.dtype)
    try:
        out = attn(x, torch.zeros_like(x), alibi=alibi, attention_mask=additive)
    except RuntimeError:  # older transformers (4.4x): a bool mask, True = hidden
        out = attn(x, torch.zeros_like(x), alibi=alibi, attention_mask=additive < 0)
    return out[0]


def sharded(module_cls, hf_module, world_size, monkeypatch):
    """One shard per rank of a simulated group: the all-reduce is left to the caller."""
    monkeypatch.setattr(tp_bloom, "_all_reduce", lambda x, group, world: x)
    return [module_cls(hf_module, None, rank, world_size) for rank in range(world_size)]


def reduce_attention(shards, x, key_mask, past=None):
    """Sum of the ranks' partial outputs plus the bias once, and each rank's (k, v)."""
    outs, presents = zip(*(s(x, key_mask, None if past is None else past[r]) for r, s in enumerate(shards)))
    bias = shards[0].dense_bias
    return sum(o - bias for o in outs) + bias, list(presents)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("pad", [False, True])
def test_sharded_attention_equals_hf(world_size, pad, monkeypatch):
    hf = hf_model().transformer.h[0].self_attention
    shards = sharded(tp_bloom.TPBloomAttention, hf, world_size, monkeypatch)
    assert [s.local_heads for s in shards] == [head_partition(HEADS, world_size, r)[1] for r in range(world_size)]
    batch, length = 3, 7
    x = torch.randn(batch, length, HIDDEN)
    mask = padded_mask(batch, length) if pad else torch.ones(batch, length, dtype=torch.long)

    with torch.no_grad():
        expected = hf_attention(hf, x, mask)
        out, _ = reduce_attention(shards, x, mask.bool()[:, None, None, :])
    rows = mask.bool()  # padding query rows see no key: Hugging Face uniform, tp_softmax zeros
    torch.testing.assert_close(out[rows], expected[rows], atol=ATOL[torch.float32], rtol=0)
    assert torch.isfinite(out).all()
    if pad:  # a padding row has no visible key: its context is zero, only the bias is left
        torch.testing.assert_close(out[~rows], shards[0].dense_bias.expand_as(out[~rows]), atol=0, rtol=0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_sharded_attention_with_cache_equals_hf(world_size, monkeypatch):
    """Prefill 5 tokens, then decode 3 one at a time (Q == 1, growing K) with the cache."""
    hf = hf_model(seed=1).transformer.h[0].self_attention
    shards = sharded(tp_bloom.TPBloomAttention, hf, world_size, monkeypatch)
    batch, prompt, total = 3, 5, 8
    x = torch.randn(batch, total, HIDDEN)
    mask = padded_mask(batch, total)
    with torch.no_grad():
        expected = hf_attention(hf, x, mask)
        _, cache = reduce_attention(shards, x[:, :prompt], mask[:, :prompt].bool()[:, None, None, :])
        for t in range(prompt, total):
            out, cache = reduce_attention(shards, x[:, t:t + 1], mask[:, :t + 1].bool()[:, None, None, :], cache)
            torch.testing.assert_close(out[:, 0], expected[:, t], atol=ATOL[torch.float32], rtol=0)
    assert cache[0][0].shape == (batch, shards[0].local_heads, total, HIDDEN // HEADS)


@pytest.mark.parametrize("world_size", [1, 3])
def test_sharded_mlp_equals_hf(world_size, monkeypatch):
    hf = hf_model().transformer.h[0].mlp
    shards = sharded(tp_bloom.TPBloomMLP, hf, world_size, monkeypatch)
    widths = [s.dense_h_to_4h.out_features for s in shards]
    assert sum(widths) == 4 * HIDDEN and max(widths) - min(widths) <= 1
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        bias = shards[0].dense_4h_to_h_bias
        out = sum(s(x) - bias for s in shards) + bias
        expected = hf(x, torch.zeros_like(x))
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


def test_alibi_is_bloom_alibi_up_to_a_row_constant():
    """Why slopes work for BLOOM: its position-based bias minus ours is constant over the
    visible keys of each row, for every head, in left-padded rows too."""
    heads, batch, length = HEADS, 3, 9
    mask = padded_mask(batch, length)
    theirs = modeling_bloom.build_alibi_tensor(mask, heads, torch.float64).view(batch, heads, 1, length)
    pos = torch.arange(length)
    distance = (pos[:, None] - pos[None, :]).abs().double()                       # [Q, K]
    ours = -alibi_slopes(heads).double()[None, :, None, None] * distance          # [1, H, Q, K]
    visible = (pos[None, :] <= pos[:, None])[None, None] & mask.bool()[:, None, None, :]
    delta = theirs - ours
    row_min = torch.where(visible, delta, torch.inf).amin(-1)
    row_max = torch.where(visible, delta, -torch.inf).amax(-1)
    rows = visible.any(-1).expand_as(row_min)
    assert rows.sum() == heads * (mask.sum())
    assert torch.allclose(row_max[rows], row_min[rows], atol=1e-6)
    assert delta[visible.expand_as(delta)].abs().max() > 0.1  # the two biases are not equal


def test_tp_model_at_world_size_one_equals_hf_logits():
    hf = hf_model(layers=2)
    model = TPBloomForCausalLM.from_hf(hf)
    assert model.world_size == 1
    ids = torch.randint(0, 64, (3, 6))
    mask = padded_mask(3, 6)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        logits, cache = model(ids, mask)
    rows = mask.bool()
    torch.testing.assert_close(logits[rows], expected[rows], atol=1e-5, rtol=0)
    assert len(cache) == 2
    with_grad, _ = model(ids, mask)  # autograd on: the softmax must not run in place
    torch.testing.assert_close(with_grad.detach(), logits, atol=0, rtol=0)
    model.to(torch.bfloat16)  # a dtype cast leaves the float32 slopes alone
    assert model.h[0].self_attention.slopes.dtype == torch.float32
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, :1], mask, cache)  # K is 7 with the cache, the mask has 6


def load_launcher():
    spec = importlib.util.spec_from_file_location("generate_launcher", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_verdict_can_fail():
    gen = load_launcher()
    ref = torch.tensor([[[0.0, 3.0, 1.0]]])
    ok, _, bound = gen.check_step(0, ref + 1e-7, ref, None, torch.float32, (slice(None), -1))
    assert ok and bound == pytest.approx(gen.FP32_RTOL * 3.0)
    ok, line, _ = gen.check_step(0, ref + 1e-3, ref, None, torch.float32, (slice(None), -1))
    assert not ok
    lowp = ref.to(torch.bfloat16)
    ok, _, _ = gen.check_step(0, lowp + 0.5, lowp, ref, torch.bfloat16, (slice(None), -1))
    assert not ok
    last = torch.tensor([[0.0, 3.0, 2.99]])
    assert gen.check_tokens(torch.tensor([1]), last, 1e-4)[0]
    assert not gen.check_tokens(torch.tensor([2]), last, 1e-4)[0]      # 0.01 below: a wrong token
    assert gen.check_tokens(torch.tensor([2]), last, 0.02)[0]           # within the bound: a tie


LAUNCH_CASES = [(world, pad, dtype) for world in (1, 2, 3) for pad in (False, True)
                for dtype in ("float32", "bfloat16")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,pad,dtype", LAUNCH_CASES)
def test_generate_launcher(world, pad, dtype):
    new_tokens = 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           LAUNCHER, "--heads", "14", "--hidden", "112", "--layers", "2", "--dtype", dtype,
           "--new-tokens", str(new_tokens), "--device", "cpu", "--timeout", "60"]
    if pad:
        cmd.append("--pad")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "PASS: tensor-parallel logits and tokens match Hugging Face" in proc.stdout, out[-4000:]
    assert f"world size {world}" in proc.stdout
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == new_tokens
    assert math.isfinite(float(proc.stdout.split("max |logit diff| = ")[1].split()[0].rstrip(";")))
