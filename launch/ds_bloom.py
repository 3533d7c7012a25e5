"""DeepSpeed's own tensor-parallel BLOOM inference with tp_softmax patched in, against Hugging Face.

    torchrun --standalone --nproc-per-node 2 launch/ds_bloom.py                # 2 GPUs, float16
    torchrun --standalone --nproc-per-node 2 launch/ds_bloom.py --dtype bfloat16 --pad

Every rank builds the same random BLOOM (``BloomConfig`` + ``--seed``), calls
:func:`tp_softmax.deepspeed.patch`, then ``deepspeed.init_inference(model,
tensor_parallel={"tp_size": N}, dtype=..., replace_with_kernel_inject=True)``: DeepSpeed
replaces every ``BloomBlock`` by its ``DeepSpeedBloomInference`` layer, shards the weights
over the N ranks, and its ``BloomSelfAttention`` runs tp_softmax's ``SoftmaxOp`` instead of
DeepSpeed's softmax kernel. Greedy generation uses the model's KV cache (a prefill, then
one token per step). Rank 0 also runs the unsharded Hugging Face model on the same tokens
and checks the logits of every step (within ``DS_RTOL`` of their scale) and the greedy tokens
(equal, or a tie within that bound, as in ``launch/generate.py``). It also checks that
DeepSpeed really injected its layers and that tp_softmax's op ran in every layer of every
step; every rank exits non-zero otherwise.

``--ds-fallback`` replaces DeepSpeed's compiled inference ops (JIT-built with nvcc on first use)
by their PyTorch fallbacks: for a machine where they cannot be built, and for a dry run on
CPU (gloo) of everything else.

Versions: DeepSpeed's BLOOM injection refuses transformers > 4.43.4, so this needs
``transformers<=4.43.4`` (with ``tokenizers<0.20`` and ``huggingface-hub<1.0``).
"""

import argparse
import copy
import os
import sys
import types

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from generate import DTYPES, check_tokens, make_inputs, pick_device, run_in_group  # noqa: E402
from teardown import exit_now  # noqa: E402

MAX_TRANSFORMERS = (4, 43)
# DeepSpeed's fused kernels round differently from Hugging Face (and its PyTorch fallbacks use
# the exact GELU where BLOOM uses the tanh one): logits may differ by up to 1% of their scale.
# A wrong head offset or alibi slice moves them by tens of percent.
DS_RTOL = 1e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--pad", action="store_true", help="left-padded prompts of different lengths")
    p.add_argument("--ds-fallback", action="store_true",
                   help="DeepSpeed's PyTorch fallbacks instead of its compiled inference ops")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per rank when CUDA has enough of them, else CPU")
    p.add_argument("--timeout", type=float, default=600.0, help="process group timeout, seconds")
    return p.parse_args(argv)


def check_versions():
    import transformers

    version = tuple(int(v) for v in transformers.__version__.split(".")[:2])
    if version > MAX_TRANSFORMERS:
        raise SystemExit(f"ds_bloom: DeepSpeed's BLOOM kernel injection needs transformers <= 4.43.4, found "
                         f"{transformers.__version__}: install transformers==4.43.4 tokenizers==0.19.1 "
                         "huggingface-hub==0.24.7")


def build_model(args):
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden, n_layer=args.layers, n_head=args.heads,
                         initializer_range=args.init_std, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    return BloomForCausalLM(config).eval()


def use_deepspeed_fallbacks():
    """Make every DeepSpeed inference op take its PyTorch path (no compiled module)."""
    from deepspeed.ops.transformer.inference.op_binding.base import BaseOp

    BaseOp.inference_module = types.SimpleNamespace()


def check_step(step, ours, ref, select):
    """Rank 0's check of one step's logits: returns (ok, line, bound)."""
    ours, ref = ours.float()[select], ref.float()[select]
    diff = (ours - ref).abs().max().item()
    bound = DS_RTOL * max(1.0, ref.abs().max().item())
    return diff <= bound, f"step {step:3d}: max |logit diff| = {diff:.3e} (bound {bound:.2e})", bound


class StepModel:
    """Greedy steps with the model's own KV cache (Hugging Face 4.x ``past_key_values``)."""

    def __init__(self, model, ids, mask):
        self.model, self.ids, self.mask, self.past = model, ids, mask, None

    @torch.no_grad()
    def logits(self):
        new = self.ids if self.past is None else self.ids[:, -1:]
        out = self.model(input_ids=new, attention_mask=self.mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits

    def append(self, tokens):
        self.ids = torch.cat((self.ids, tokens[:, None]), dim=1)
        self.mask = torch.cat((self.mask, torch.ones_like(tokens)[:, None]), dim=1)


def run(args, device, group) -> bool:
    import deepspeed
    from deepspeed.ops.transformer.inference.ds_attention import BloomSelfAttention

    import tp_softmax.deepspeed as tp_ds

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[args.dtype]
    model = build_model(args)
    ids, mask = make_inputs(args, args.vocab, model.config.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    ref = None
    if rank == 0:
        ref = StepModel(copy.deepcopy(model).to(device=device, dtype=dtype), ids, mask)

    if args.ds_fallback:
        use_deepspeed_fallbacks()
    tp_ds.patch()
    try:
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=dtype,
                                          replace_with_kernel_inject=True)
    finally:
        tp_ds.unpatch()
    attention = [m for m in engine.module.modules() if isinstance(m, BloomSelfAttention)]
    ops = [m.softmax_func for m in attention]
    calls = [0]
    for op in ops:
        if isinstance(op, tp_ds.SoftmaxOp):
            op.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    ok = len(attention) == args.layers and all(isinstance(op, tp_ds.SoftmaxOp) for op in ops)
    if rank == 0:
        print(f"DeepSpeed {deepspeed.__version__}: {len(attention)} injected BLOOM attention layers, "
              f"softmax ops: {sorted({type(op).__module__ + '.' + type(op).__name__ for op in ops})}, "
              f"{'PyTorch fallbacks' if args.ds_fallback else 'compiled inference ops'}", flush=True)
        print(f"BLOOM: {args.layers} layers, {args.heads} heads, hidden {args.hidden}, {args.dtype}, "
              f"tp_size {world}, device {device.type}, batch {args.batch}, prompt {args.prompt_len}"
              f"{' (left-padded)' if args.pad else ''}", flush=True)
    for op in ops:
        if isinstance(op, tp_ds.SoftmaxOp):
            heads = (op.head_offset, op.head_offset + op.num_attention_heads_per_partition)
            print(f"rank {rank}: tp_softmax heads [{heads[0]}, {heads[1]}) of {op.total_heads}", flush=True)
            break

    ours = StepModel(engine.module, ids, mask)
    equal = 0
    for step in range(args.new_tokens):
        logits = ours.logits()
        next_tok = logits[:, -1].float().argmax(-1)
        if rank == 0:
            ref_logits = ref.logits()
            select = ours.mask.bool() if step == 0 else (slice(None), -1)
            step_ok, line, bound = check_step(step, logits, ref_logits, select)
            tok_ok, text = check_tokens(next_tok, ref_logits[:, -1].float(), bound)
            equal += int(torch.equal(next_tok, ref_logits[:, -1].float().argmax(-1)))
            ok = ok and step_ok and tok_ok
            print(line + text + ("" if step_ok and tok_ok else "  FAIL"), flush=True)
            ref.append(next_tok)
        ours.append(next_tok)
    expected_calls = args.layers * args.new_tokens
    if calls[0] != expected_calls:
        print(f"rank {rank}: tp_softmax ran {calls[0]} times, expected {expected_calls}", flush=True)
        ok = False
    if rank == 0:
        print(f"tokens: {equal} of {args.new_tokens} steps equal to Hugging Face's greedy choice in every row; "
              f"generated {ours.ids[:, args.prompt_len:].tolist()}", flush=True)
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    check_versions()
    device = pick_device(args)
    if device.type != "cuda" and not args.ds_fallback:
        raise SystemExit("ds_bloom: without CUDA only --ds-fallback can run")

    def init_deepspeed():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")

    return run_in_group(device, args.timeout, lambda: run(args, device, dist.group.WORLD),
                        "PASS: DeepSpeed inference with tp_softmax matches Hugging Face",
                        "FAIL: DeepSpeed inference with tp_softmax does not match Hugging Face",
                        setup=init_deepspeed)


if __name__ == "__main__":
    exit_now(main())
