"""SPEC 1.5: every bad argument raises ValueError / TypeError naming it, and writes nothing."""

import math

import pytest
import torch

from tp_softmax import attention_softmax

B, H, Q, K = 2, 3, 4, 10


def _scores():
    return torch.randn(B, H, Q, K, generator=torch.Generator().manual_seed(0))


# (id, keyword arguments (scores replaced when given), exception, words the message must contain)
BAD_SCORES = [
    ("scores 3-D", dict(scores=torch.randn(H, Q, K)), ValueError, ["scores", "(3, 4, 10)"]),
    ("scores 5-D", dict(scores=torch.randn(1, B, H, Q, K)), ValueError, ["scores", "(1, 2, 3, 4, 10)"]),
    ("scores int32", dict(scores=torch.ones(B, H, Q, K, dtype=torch.int32)), TypeError, ["scores", "int32"]),
    ("scores bool", dict(scores=torch.ones(B, H, Q, K, dtype=torch.bool)), TypeError, ["scores", "bool"]),
    ("scores float64", dict(scores=torch.randn(B, H, Q, K, dtype=torch.float64)), TypeError, ["scores", "float64"]),
    ("scores a list", dict(scores=[[1.0, 2.0]]), TypeError, ["scores", "list"]),
]
BAD_ARGUMENTS = [
    ("mask wrong K", dict(mask=torch.ones(B, 1, 1, K - 1, dtype=torch.bool)), ValueError, ["mask", "(2, 1, 1, 9)"]),
    ("mask wrong B", dict(mask=torch.zeros(B + 1, 1, 1, K)), ValueError, ["mask", "(3, 1, 1, 10)"]),
    ("mask wrong H", dict(mask=torch.zeros(1, H + 1, Q, K)), ValueError, ["mask", "(1, 4, 4, 10)"]),
    ("mask wrong Q", dict(mask=torch.zeros(Q + 1, K)), ValueError, ["mask", "(5, 10)"]),
    ("mask 5-D", dict(mask=torch.zeros(1, B, H, Q, K)), ValueError, ["mask", "(1, 2, 3, 4, 10)"]),
    ("mask int64", dict(mask=torch.ones(K, dtype=torch.int64)), TypeError, ["mask", "int64"]),
    ("mask uint8", dict(mask=torch.ones(K, dtype=torch.uint8)), TypeError, ["mask", "uint8"]),
    ("mask on meta", dict(mask=torch.ones(K, dtype=torch.bool, device="meta")), ValueError, ["mask", "meta", "cpu"]),
    ("mask a list", dict(mask=[True] * K), TypeError, ["mask", "list"]),
    ("alibi wrong K", dict(alibi=torch.zeros(B * H, 1, K - 1)), ValueError, ["alibi", "(6, 1, 9)"]),
    ("alibi wrong Q", dict(alibi=torch.zeros(1, H, Q - 1, K)), ValueError, ["alibi", "(1, 3, 3, 10)"]),
    ("alibi wrong B", dict(alibi=torch.zeros(B + 1, H, 1, K)), ValueError, ["alibi", "(3, 3, 1, 10)"]),
    ("alibi 3-D not batch-major", dict(alibi=torch.zeros(B * H + 1, 1, K)), ValueError, ["alibi", "(7, 1, 10)"]),
    ("alibi 2-D", dict(alibi=torch.zeros(H, K)), ValueError, ["alibi", "(3, 10)"]),
    ("alibi 5-D", dict(alibi=torch.zeros(1, B, H, 1, K)), ValueError, ["alibi", "(1, 2, 3, 1, 10)"]),
    ("alibi int32", dict(alibi=torch.zeros(B * H, 1, K, dtype=torch.int32)), TypeError, ["alibi", "int32"]),
    ("alibi on meta", dict(alibi=torch.zeros(B * H, 1, K, device="meta")), ValueError, ["alibi", "meta"]),
    ("alibi too few heads 3-D", dict(alibi=torch.zeros(B * 4, 1, K), head_offset=2), ValueError, ["alibi", "4", "5"]),
    ("alibi too few heads 4-D", dict(alibi=torch.zeros(1, 4, 1, K), head_offset=2), ValueError, ["alibi", "4", "5"]),
    ("alibi_slopes too few heads", dict(alibi_slopes=torch.rand(4), head_offset=2), ValueError, ["alibi_slopes", "4", "5"]),
    ("alibi_slopes 2-D too few heads", dict(alibi_slopes=torch.rand(B, 2)), ValueError, ["alibi_slopes", "2", "3"]),
    ("alibi_slopes wrong B", dict(alibi_slopes=torch.rand(B + 1, H)), ValueError, ["alibi_slopes", "(3, 3)"]),
    ("alibi_slopes 3-D", dict(alibi_slopes=torch.rand(1, B, H)), ValueError, ["alibi_slopes", "(1, 2, 3)"]),
    ("alibi_slopes int64", dict(alibi_slopes=torch.ones(H, dtype=torch.int64)), TypeError, ["alibi_slopes", "int64"]),
    ("alibi_slopes on meta", dict(alibi_slopes=torch.rand(H, device="meta")), ValueError, ["alibi_slopes", "meta"]),
    ("alibi and alibi_slopes", dict(alibi=torch.zeros(B * H, 1, K), alibi_slopes=torch.rand(H)), ValueError, ["alibi", "alibi_slopes"]),
    ("head_offset negative", dict(head_offset=-1), ValueError, ["head_offset", "-1"]),
    ("head_offset float", dict(head_offset=1.0), TypeError, ["head_offset", "float"]),
    ("window 0", dict(window=0), ValueError, ["window", "0"]),
    ("window negative", dict(window=-3, causal=True), ValueError, ["window", "-3"]),
    ("window float", dict(window=2.5), TypeError, ["window", "float"]),
    ("window bool", dict(window=True), TypeError, ["window", "bool"]),
    ("layer_scale inf", dict(layer_scale=math.inf), ValueError, ["layer_scale", "inf"]),
    ("layer_scale -inf", dict(layer_scale=-math.inf), ValueError, ["layer_scale", "inf"]),
    ("layer_scale nan", dict(layer_scale=math.nan), ValueError, ["layer_scale", "nan"]),
    ("layer_scale str", dict(layer_scale="0.5"), TypeError, ["layer_scale", "str"]),
    ("layer_scale tensor", dict(layer_scale=torch.tensor(0.5)), TypeError, ["layer_scale", "Tensor"]),
    ("causal int", dict(causal=1), TypeError, ["causal", "int"]),
    ("inplace None", dict(inplace=None), TypeError, ["inplace", "NoneType"]),
]


def _call(kwargs):
    kwargs = dict(kwargs)
    scores = kwargs.pop("scores", None)
    return attention_softmax(_scores() if scores is None else scores, **kwargs)


@pytest.mark.parametrize("kwargs,error,words", [c[1:] for c in BAD_SCORES + BAD_ARGUMENTS],
                         ids=[c[0] for c in BAD_SCORES + BAD_ARGUMENTS])
def test_bad_argument_raises_and_names_it(kwargs, error, words):
    with pytest.raises(error) as info:
        _call(kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"message {message!r} does not mention {word!r}"


@pytest.mark.parametrize("kwargs,error,words", [c[1:] for c in BAD_ARGUMENTS if c[0] != "inplace None"],
                         ids=[c[0] for c in BAD_ARGUMENTS if c[0] != "inplace None"])
def test_bad_argument_with_inplace_writes_nothing(kwargs, error, words):
    scores = _scores()
    before = scores.clone()
    with pytest.raises(error):
        attention_softmax(scores, inplace=True, **kwargs)
    assert torch.equal(scores, before), "scores was written before the error"


def _overlapping():
    storage = torch.randn(64)
    return storage, storage.as_strided((1, 2, 3, 8), (64, 8, 2, 1))  # rows overlap


CANNOT_WRITE = [
    ("expanded batch", lambda: (None, torch.randn(1, H, Q, K).expand(B, H, Q, K))),
    ("expanded keys", lambda: (None, torch.randn(B, H, Q, 1).expand(B, H, Q, K))),
    ("overlapping rows", _overlapping),
]


@pytest.mark.parametrize("make", [c[1] for c in CANNOT_WRITE], ids=[c[0] for c in CANNOT_WRITE])
def test_inplace_on_a_tensor_that_cannot_be_written_in_place(make):
    base, scores = make()
    base = scores if base is None else base
    before = base.clone()
    with pytest.raises(ValueError) as info:
        attention_softmax(scores, inplace=True)
    assert "inplace" in str(info.value) and "scores" in str(info.value)
    assert torch.equal(base, before)
    attention_softmax(scores)  # reading such a tensor is fine


def test_inplace_on_scores_that_require_grad():
    scores = _scores().requires_grad_()
    with pytest.raises(ValueError, match="inplace"):
        attention_softmax(scores, inplace=True)
    with torch.no_grad():
        assert attention_softmax(scores.detach().clone(), inplace=True) is not None


def test_valid_edge_arguments_are_accepted():
    """The boundaries of the checks above are legal calls."""
    scores = _scores()
    attention_softmax(scores, window=1)
    attention_softmax(scores, head_offset=0, alibi=torch.zeros(B * H, 1, K))
    attention_softmax(scores, head_offset=2, alibi_slopes=torch.rand(5))
    attention_softmax(scores, mask=torch.zeros(()))
    attention_softmax(scores, mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
    attention_softmax(scores, layer_scale=2)
