"""Greedy generation with a tensor-parallel BLOOM, checked against the unsharded Hugging Face model.

    torchrun --standalone --nproc-per-node 2 launch/generate.py --pad
    torchrun --standalone --nproc-per-node 3 launch/generate.py --heads 14 --dtype bfloat16

Every rank builds the same random BLOOM (``BloomConfig`` + ``--seed``, nothing downloaded) and
shards it with :class:`tp_softmax.models.TPBloomForCausalLM`. Generation uses the KV cache:
one prefill, then one decode step (Q == 1, growing K) per new token. Rank 0 also runs the
unsharded Hugging Face model on the same inputs (its own greedy loop, full recompute each
step), compares the logits of every step (all non-padding positions of the prefill, the last
position of each decode step) and the generated tokens, prints one line per step and a
verdict. Every rank exits non-zero when the check fails.

Tokens: at every step our greedy token must be Hugging Face's greedy token on the same
sequence; a different token passes only when Hugging Face's own logits of the two tokens are
within the step's logit bound (a tie at this precision, possible in float16 / bfloat16),
and is printed as such. Both models then continue with our token, so every later step still
compares the two models on the same sequence.

Tolerance: float32 logits must agree to ``FP32_RTOL * max|logit|``. For float16 / bfloat16,
rank 0 also runs the Hugging Face model in float32 on the same tokens: the sharded model's
error against it may be at most ``LOWP_FACTOR`` times Hugging Face's own low-precision error
plus ``LOWP_FLOOR_ULPS`` units of the dtype at the logits' scale (the FlashAttention rule).

GPUs: nccl, one GPU per rank (``cuda:LOCAL_RANK``); CPU: gloo.
"""

import argparse
import copy
import datetime
import gc
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # teardown

from tp_softmax.models import TPBloomForCausalLM  # noqa: E402
from teardown import exit_now  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_RTOL = 1e-5
LOWP_FACTOR = 2.0
LOWP_FLOOR_ULPS = 2.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=14, help="total heads (14 splits unevenly on 3 or 4 ranks)")
    p.add_argument("--hidden", type=int, default=112, help="hidden size, a multiple of --heads")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.1,
                   help="std of the random weights (BLOOM's 0.02 makes the attention output tiny "
                        "next to the residual: generation would barely depend on it)")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--pad", action="store_true",
                   help="prompts of different lengths, left-padded, with an attention mask")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per rank when CUDA has enough of them, else CPU")
    p.add_argument("--timeout", type=float, default=120.0, help="process group timeout, seconds")
    args = p.parse_args(argv)
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.prompt_len < 1 or args.new_tokens < 1 or args.batch < 1:
        p.error("--prompt-len, --new-tokens and --batch must be >= 1")
    return args


def make_inputs(args, vocab: int, pad_id: int):
    """Random prompts ``[B, P]`` and their mask; with --pad row b has ``b`` fewer tokens (at
    least one), left-padded with ``pad_id``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    if args.pad:
        for b in range(args.batch):
            n_pad = min(b * max(1, args.prompt_len // max(args.batch, 2)), args.prompt_len - 1)
            mask[b, :n_pad] = 0
            ids[b, :n_pad] = pad_id
    return ids, mask


def build_hf_model(args):
    from transformers import BloomConfig, BloomForCausalLM

    # Untied LM head: with tied embeddings a random BLOOM mostly repeats its last input token.
    config = BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden, n_layer=args.layers,
                         n_head=args.heads, initializer_range=args.init_std, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    return BloomForCausalLM(config).eval()


class Reference:
    """Rank 0's unsharded Hugging Face model: full recompute of the whole sequence each step."""

    def __init__(self, hf_model, hf_fp32, ids, mask):
        self.model, self.fp32 = hf_model, hf_fp32
        self.ids, self.mask = ids, mask

    @torch.no_grad()
    def logits(self):
        """Logits of the current sequence ``[B, L, vocab]``, and in float32 (or None)."""
        logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits
        logits32 = None
        if self.fp32 is not None:
            logits32 = self.fp32(input_ids=self.ids, attention_mask=self.mask).logits
        return logits, logits32

    def append(self, tokens):
        self.ids = torch.cat((self.ids, tokens[:, None]), dim=1)
        self.mask = torch.cat((self.mask, torch.ones_like(tokens)[:, None]), dim=1)


def logit_bound(ref, ref32, dtype) -> float:
    """How far the sharded model's logits may be from ``ref`` (see the module docstring)."""
    scale = max(1.0, ref.abs().max().item())
    if dtype == torch.float32:
        return FP32_RTOL * scale
    hf_err = (ref - ref32).abs().max().item()
    return LOWP_FACTOR * hf_err + LOWP_FLOOR_ULPS * torch.finfo(dtype).eps * scale


def check_step(step, ours, ref, ref32, dtype, select):
    """Rank 0's check of one step: returns (ok, line, bound).

    ``ours`` / ``ref`` / ``ref32``: ``[B, Q, vocab]`` logits of the positions this step
    computed; ``select`` picks the compared ones (the padding positions of a prompt are not
    compared: their rows see no key, Hugging Face gives them a uniform softmax, tp_softmax zeros).
    """
    ours, ref = ours.float()[select], ref.float()[select]
    ref32 = None if ref32 is None else ref32.float()[select]
    bound = logit_bound(ref, ref32, dtype)
    diff = (ours - ref).abs().max().item()
    if dtype == torch.float32:
        ok = diff <= bound
        line = f"step {step:3d}: max |logit diff| = {diff:.3e} (bound {bound:.1e})"
    else:
        ours_err = (ours - ref32).abs().max().item()
        ok = ours_err <= bound
        line = (f"step {step:3d}: max |logit diff| = {diff:.3e}; vs float32: ours {ours_err:.3e}, "
                f"Hugging Face {(ref - ref32).abs().max().item():.3e} (bound {bound:.3e})")
    return ok, line, bound


def check_tokens(ours_tok, ref_last, bound):
    """Our greedy tokens against Hugging Face's last-position logits ``[B, vocab]``.

    Returns (ok, text). A different token passes only as a tie at this precision: Hugging
    Face's logits of the two tokens are within ``bound`` of each other.
    """
    ref_tok = ref_last.argmax(-1)
    top2 = ref_last.topk(2, dim=-1).values
    text = f", top-2 gap {(top2[:, 0] - top2[:, 1]).min().item():.2e}"
    if torch.equal(ours_tok, ref_tok):
        return True, text
    rows = (ours_tok != ref_tok).nonzero().flatten()
    shortfall = (ref_last.max(-1).values - ref_last.gather(-1, ours_tok[:, None]).squeeze(-1))[rows]
    ties = bool((shortfall <= bound).all())
    text += (f"; tokens differ in rows {rows.tolist()}: ours {ours_tok[rows].tolist()}, Hugging Face "
             f"{ref_tok[rows].tolist()}, {shortfall.max().item():.2e} below its best "
             + ("(a tie within the bound)" if ties else "(not a tie)"))
    return ties, text


def run(args, device, group) -> bool:
    rank = dist.get_rank(group)
    dtype = DTYPES[args.dtype]
    hf32 = build_hf_model(args)
    ids, mask = make_inputs(args, args.vocab, hf32.config.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    hf = copy.deepcopy(hf32).to(device=device, dtype=dtype) if dtype != torch.float32 else hf32.to(device)
    model = TPBloomForCausalLM.from_hf(hf, group)

    ref = None
    if rank == 0:
        ref = Reference(hf, hf32.to(device) if dtype != torch.float32 else None, ids, mask)
        print(f"BLOOM: {args.layers} layers, {args.heads} heads, hidden {args.hidden}, vocab {args.vocab}, "
              f"{args.dtype}, world size {dist.get_world_size(group)}, device {device.type}, "
              f"batch {args.batch}, prompt {args.prompt_len}{' (left-padded)' if args.pad else ''}, "
              f"{args.new_tokens} new tokens", flush=True)
    del hf32

    ok, equal, generated = True, 0, []
    with torch.no_grad():
        logits, cache = model(ids, mask)  # prefill
        for step in range(args.new_tokens):
            next_tok = logits[:, -1].float().argmax(-1)
            if ref is not None:
                ref_logits, ref32 = ref.logits()
                n = logits.size(1)
                # Prefill: every non-padding position; decode: the one new position.
                select = mask.bool() if step == 0 else (slice(None), -1)
                step_ok, line, bound = check_step(step, logits, ref_logits[:, -n:],
                                                  None if ref32 is None else ref32[:, -n:], dtype, select)
                tok_ok, text = check_tokens(next_tok, ref_logits[:, -1].float(), bound)
                equal += int(torch.equal(next_tok, ref_logits[:, -1].float().argmax(-1)))
                ok = ok and step_ok and tok_ok
                print(line + text + ("" if step_ok and tok_ok else "  FAIL"), flush=True)
                ref.append(next_tok)  # both models go on with the same sequence
            generated.append(next_tok)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            if step + 1 < args.new_tokens:
                logits, cache = model(next_tok[:, None], mask, cache)  # decode: Q == 1

    if rank == 0:
        print(f"generated: {torch.stack(generated, dim=1).tolist()}")
        print(f"tokens: {equal} of {args.new_tokens} steps equal to Hugging Face's greedy choice in every row",
              flush=True)
    return ok


def run_and_agree(check, device, pass_line: str, fail_line: str) -> int:
    """Run ``check()`` (True = pass) on every rank; all ranks agree on the verdict (a rank that
    raised fails it), rank 0 prints it, and every rank returns the exit status.

    The default group is passed to ``check`` by the caller, never held here: a reference to it
    that lives past destroy_process_group() makes PyTorch abort at exit (gloo).
    """
    try:
        ok = check()
    except Exception as exc:  # report it, then let every rank agree on the failure
        import traceback

        traceback.print_exc()
        print(f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        ok = False
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    ok = flag.item() == 0
    if dist.get_rank() == 0:
        print(pass_line if ok else fail_line, flush=True)
    return 0 if ok else 1


def pick_device(args) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when asked for or when every local rank has a GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()
                                         and torch.cuda.device_count() >= world)
    if not use_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def run_in_group(device, timeout_s: float, check, pass_line: str, fail_line: str, setup=None) -> int:
    """Start the default group (nccl on GPUs, gloo on CPU), call ``setup()`` if given, then
    :func:`run_and_agree`; the group is destroyed however that ends."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        if setup is not None:
            setup()
        return run_and_agree(check, device, pass_line, fail_line)
    finally:
        # Free what check() left in reference cycles while the group still exists: with gloo,
        # PyTorch can abort at exit when such objects outlive destroy_process_group().
        gc.collect()
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    return run_in_group(device, args.timeout, lambda: run(args, device, dist.group.WORLD),
                        "PASS: tensor-parallel logits and tokens match Hugging Face",
                        "FAIL: tensor-parallel generation does not match Hugging Face")


if __name__ == "__main__":
    exit_now(main())
