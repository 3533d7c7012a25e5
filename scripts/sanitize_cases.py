"""A representative subset of kernel variants, for compute-sanitizer (memcheck, racecheck).

Small shapes so the sanitizer finishes quickly; covers each row configuration (one thread,
sub-warp, warp, block, clusters of 2 to 16 blocks, long rows staged and read twice), aligned and strided operands, masks,
alibi, in place, the WHOLE kernels of rows that see every key, and stages refilled many times.
"""

import torch

import tp_softmax
from tp_softmax import attention_softmax

torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float16, torch.float32):
    for K in (3, 64, 1000, 1025, 8192, 20000, 40000, 200000, 270000, 600000):
        Q = 3
        s = torch.randn(2, 2, Q, K, device=dev).to(dtype)
        mask = torch.rand(2, 1, 1, K, device=dev) > 0.1
        alibi = torch.randn(2 * 4, 1, K, device=dev).to(dtype)
        attention_softmax(s, mask=mask, alibi=alibi, head_offset=2, causal=True, window=K // 2 + 1)
        attention_softmax(s[..., : K - 1], alibi_slopes=tp_softmax.alibi_slopes(2).to(dev),
                          mask=torch.zeros(Q, K - 1, device=dev, dtype=dtype))
        attention_softmax(s, inplace=True, causal=True)
        attention_softmax(torch.randn_like(s), layer_scale=2e8)  # huge logits (|max| > 3.7e8)
    # Rows that see every key, K apart (the WHOLE kernels): a wide block alone, and clusters with
    # more rows than the resident clusters take at once, so that stages are refilled.
    s = torch.randn(2, 2, 1, 20000, device=dev).to(dtype)
    attention_softmax(s, causal=True)
    s = torch.randn(1, 208, 1, 32776, device=dev).to(dtype)
    attention_softmax(s, layer_scale=0.5)
    attention_softmax(s, inplace=True)
# Rows within a warp with bulk stores and a mask, with more tiles than three times the resident
# blocks, so that every stage is released to warp 0 and refilled; and rows of 8 threads, which
# meet at a block barrier instead.
for dtype, K, Q in ((torch.bfloat16, 1024, 1100), (torch.float32, 512, 800), (torch.float16, 512, 800)):
    s = torch.randn(2, 8, Q, K, device=dev).to(dtype)
    pad = torch.where(torch.rand(2, 1, 1, K, device=dev) > 0.1, 0.0, -1e4).to(dtype)
    attention_softmax(s, mask=pad, causal=True)
# Long rows, staged: more rows than the resident clusters take at once, so each block's ring of
# 27 pieces wraps (96 rows of 17 pieces over about 33 clusters of 4); the window leaves pieces
# empty.
s = torch.randn(8, 6, 2, 270000, device=dev).to(torch.float16)
attention_softmax(s, causal=True, window=100001, alibi_slopes=tp_softmax.alibi_slopes(6).to(dev))
torch.cuda.synchronize()
print("sanitize cases done")
