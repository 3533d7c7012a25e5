"""Run one attention_softmax problem a few times, for `ncu` (achieved bandwidth, occupancy, stalls).

    ncu --clock-control none --kernel-name regex:softmax_kernel --launch-skip 2 \\
        --launch-count 1 python scripts/profile_case.py B H_LOCAL H_TOTAL Q K DTYPE [causal] [alibi] [pad]

(`scripts/gpu_check.sh ncu` profiles the cases that miss their targets.)
"""

import sys

import torch

from tp_softmax import attention_softmax


def main(argv):
    B, H, HT, Q, K = (int(v) for v in argv[:5])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[argv[5]]
    flags = set(argv[6:])
    scores = (torch.randn(B, H, Q, K, device="cuda") * 4).to(dtype)
    kwargs = dict(causal="causal" in flags, head_offset=HT - H)
    if "alibi" in flags:
        kwargs["alibi"] = torch.randn(B, HT, 1, K, device="cuda").to(dtype)
    if "pad" in flags:
        pad = torch.zeros(B, 1, 1, K, device="cuda", dtype=dtype)
        pad[..., : K // 8] = float("-inf")
        kwargs["mask"] = pad
    for _ in range(3):
        attention_softmax(scores, **kwargs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1:])
