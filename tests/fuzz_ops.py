"""Hypothesis fuzz groups over fastseg's ops, one group per op, each run in its own process by
tests/test_fuzz.py (``python tests/fuzz_ops.py GROUP``) so that a crash is reported, not suffered.

Each group drives random inputs through the public API (``backend="cpu"`` against
``backend="reference"`` in float64: equal within tolerance) and through ``torch.ops.fastseg.*``
directly (what torch.compile users reach, bypassing the Python checks). Invalid inputs must raise
ValueError / TypeError / RuntimeError; anything else, or a signal, fails. Before each call the example
is written to $FUZZ_LAST so that the parent can show the input that crashed the process."""

from __future__ import annotations

import os
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastseg import ops

CLEAN = (ValueError, TypeError, RuntimeError)
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _note(what: str, **example: object) -> None:
    path = os.environ.get("FUZZ_LAST")
    desc = ", ".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}"
                     f"{':' + str(v.dtype) if isinstance(v, torch.Tensor) else ''}" for k, v in example.items())
    if path:
        with open(path, "w") as f:
            f.write(f"{what}({desc})\n")


def _rand(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)


def _expect_clean(fn, what: str, **example: object) -> None:
    _note(what, **example)
    try:
        fn()
    except CLEAN:
        return
    raise AssertionError(f"{what} accepted invalid input {example}")


def _direct(fn, what: str, **example: object) -> None:
    """A direct torch.ops call: any result or a clean error, never a crash."""
    _note(what, **example)
    try:
        fn()
    except CLEAN:
        pass


# ------------------------------------------------------------------------------------ separable_conv2d

sep_shapes = st.tuples(st.integers(0, 2), st.integers(1, 7), st.integers(1, 9), st.integers(1, 9),
                       st.integers(1, 6), st.sampled_from([1, 3, 5]), st.integers(1, 3), st.integers(1, 3))


@SETTINGS
@given(sep_shapes, st.booleans(), st.booleans(), st.integers(0, 2**16))
def sep_valid(shape, affine, relu, seed):
    n, c, h, w, o, k, stride, dil = shape
    x, dw, pw = _rand((n, c, h, w), seed), _rand((c, 1, k, k), seed + 1), _rand((o, c, 1, 1), seed + 2)
    kw = {"stride": stride, "dilation": dil, "dw_relu": relu, "relu": relu}
    if affine:
        kw.update(dw_scale=_rand((c,), seed + 3), dw_shift=_rand((c,), seed + 4), pw_scale=_rand((o,), seed + 5),
                  pw_shift=_rand((o,), seed + 6))
    _note("separable_conv2d", x=x, dw=dw, pw=pw, **kw)
    _close(ops.separable_conv2d(x, dw, pw, backend="cpu", **kw),
           ops.separable_conv2d(x, dw, pw, backend="reference", **kw))


@SETTINGS
@given(sep_shapes, st.sampled_from(["rank", "dtype", "channels", "pw_channels", "stride", "dilation", "affine",
                                    "padding"]), st.integers(0, 2**16))
def sep_invalid(shape, bad, seed):
    n, c, h, w, o, k, stride, dil = shape
    x, dw, pw = _rand((n, c, h, w), seed), _rand((c, 1, k, k), seed + 1), _rand((o, c, 1, 1), seed + 2)
    kw: dict = {"stride": stride, "dilation": dil}
    if bad == "rank":
        x = x.flatten()
    elif bad == "dtype":
        x = x.to(torch.int32)
    elif bad == "channels":
        dw = _rand((c + 1, 1, k, k), seed)
    elif bad == "pw_channels":
        pw = _rand((o, c + 2, 1, 1), seed)
    elif bad == "stride":
        kw["stride"] = -stride
    elif bad == "dilation":
        kw["dilation"] = 0
    elif bad == "affine":
        kw["pw_scale"] = _rand((o + 1,), seed)
    else:
        kw["padding"] = "full"
    _expect_clean(lambda: ops.separable_conv2d(x, dw, pw, backend="cpu", **kw), "separable_conv2d", x=x, dw=dw,
                  pw=pw, **kw)


@SETTINGS
@given(st.lists(st.integers(0, 6), min_size=4, max_size=4), st.integers(0, 6), st.integers(1, 4),
       st.integers(-2, 3), st.integers(-2, 3), st.integers(-1, 3), st.integers(-1, 3), st.integers(0, 2**16))
def sep_direct(xs, o, k, stride, dilation, pad_beg, pad_end, seed):
    x = _rand(xs, seed, torch.float32)
    dw, pw = _rand((xs[1], 1, k, k), seed, torch.float32), _rand((o, xs[1], 1, 1), seed, torch.float32)
    _direct(lambda: torch.ops.fastseg.separable_conv2d(x, dw, pw, None, None, None, None, stride, pad_beg, pad_end,
                                                       dilation, False, False),
            "torch.ops.fastseg.separable_conv2d", x=x, dw=dw, pw=pw, stride=stride, dilation=dilation,
            pad_beg=pad_beg, pad_end=pad_end)


# ------------------------------------------------------------------------------------ attention

@SETTINGS
@given(st.integers(0, 2), st.integers(1, 6), st.integers(1, 6), st.integers(1, 7), st.integers(1, 7),
       st.booleans(), st.integers(0, 2**16))
def attention_valid(b, ck, c, h, w, epilogue, seed):
    q, k, v = _rand((b, ck, h, w), seed), _rand((b, ck, h, w), seed + 1), _rand((b, c, h, w), seed + 2)
    kw = {"gamma": _rand((1,), seed + 3), "residual": _rand((b, c, h, w), seed + 4)} if epilogue else {}
    _note("position_attention", q=q, k=k, v=v, **kw)
    _close(ops.position_attention(q, k, v, backend="cpu", **kw), ops.position_attention(q, k, v, backend="reference",
                                                                                        **kw))
    _note("channel_attention", x=v, **kw)
    _close(ops.channel_attention(v, backend="cpu", **kw), ops.channel_attention(v, backend="reference", **kw))


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5),
       st.sampled_from(["rank", "dtype", "keys", "values", "gamma", "residual", "backend"]), st.integers(0, 2**16))
def attention_invalid(b, c, h, w, bad, seed):
    q, k, v = _rand((b, c, h, w), seed), _rand((b, c, h, w), seed + 1), _rand((b, c, h, w), seed + 2)
    kw: dict = {"backend": "cpu"}
    if bad == "rank":
        q = q[0]
    elif bad == "dtype":
        k = k.to(torch.int64)
    elif bad == "keys":
        k = _rand((b, c + 1, h, w), seed)
    elif bad == "values":
        v = _rand((b, c, h + 1, w), seed)
    elif bad == "gamma":
        kw["gamma"] = _rand((2,), seed)
    elif bad == "residual":
        kw["residual"] = _rand((b, c, h, w + 1), seed)
    else:
        kw["backend"] = "fastest"
    _expect_clean(lambda: ops.position_attention(q, k, v, **kw), "position_attention", q=q, k=k, v=v, **kw)
    if bad in ("rank", "gamma", "residual", "backend", "dtype"):
        x = q if bad == "rank" else (k if bad == "dtype" else v)
        _expect_clean(lambda: ops.channel_attention(x, **kw), "channel_attention", x=x, **kw)


@SETTINGS
@given(st.lists(st.integers(0, 5), min_size=3, max_size=5), st.lists(st.integers(0, 5), min_size=3, max_size=5),
       st.lists(st.integers(0, 5), min_size=3, max_size=5), st.integers(0, 2**16))
def attention_direct(qs, ks, vs, seed):
    q, k, v = (_rand(s, seed + i, torch.float32) for i, s in enumerate((qs, ks, vs)))
    _direct(lambda: torch.ops.fastseg.position_attention(q, k, v), "torch.ops.fastseg.position_attention", q=q, k=k,
            v=v)
    _direct(lambda: torch.ops.fastseg.channel_attention(v), "torch.ops.fastseg.channel_attention", x=v)


# ------------------------------------------------------------------------------------ roi_align

def _rois(k: int, batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 4, generator=g, dtype=torch.float64) * torch.tensor([w, h, w, h]) * 1.4 - 2
    x1, x2 = torch.minimum(xy[:, 0], xy[:, 2]), torch.maximum(xy[:, 0], xy[:, 2])
    y1, y2 = torch.minimum(xy[:, 1], xy[:, 3]), torch.maximum(xy[:, 1], xy[:, 3])
    idx = torch.randint(0, max(batch, 1), (k,), generator=g).double()
    return torch.stack([idx, x1, y1, x2, y2], 1)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.integers(0, 5),
       st.integers(1, 4), st.integers(1, 4), st.sampled_from([0.5, 1.0, 0.25]), st.integers(-1, 3), st.booleans(),
       st.integers(0, 2**16))
def roi_valid(n, c, h, w, k, ph, pw, scale, sampling, aligned, seed):
    feats, rois = _rand((n, c, h, w), seed), _rois(k, n, h / scale, w / scale, seed)
    kw = {"spatial_scale": scale, "sampling_ratio": sampling, "aligned": aligned}
    _note("roi_align", features=feats, rois=rois, output_size=(ph, pw), **kw)
    _close(ops.roi_align(feats, rois, (ph, pw), backend="cpu", **kw),
           ops.roi_align(feats, rois, (ph, pw), backend="reference", **kw))


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 6),
       st.sampled_from(["rois_cols", "rois_rank", "output_size", "features_rank", "batch_idx", "dtype", "nan"]),
       st.integers(0, 2**16))
def roi_invalid(n, c, s, bad, seed):
    feats, rois, size = _rand((n, c, s, s), seed), _rois(3, n, s, s, seed), (2, 2)
    kw: dict = {}
    if bad == "rois_cols":
        rois = rois[:, :4]
    elif bad == "rois_rank":
        rois = rois[0]
    elif bad == "output_size":
        size = (0, -2)
    elif bad == "features_rank":
        feats = feats[0]
    elif bad == "batch_idx":
        rois[0, 0] = n + 3
    elif bad == "dtype":
        feats = feats.to(torch.int32)
    else:
        rois[1, 2] = float("nan")
    _expect_clean(lambda: ops.roi_align(feats, rois, size, backend="cpu", **kw), "roi_align", features=feats,
                  rois=rois, output_size=size, **kw)


@SETTINGS
@given(st.lists(st.integers(0, 4), min_size=3, max_size=5), st.lists(st.integers(0, 6), min_size=1, max_size=3),
       st.integers(-1, 3), st.integers(-1, 3), st.floats(-1, 2), st.integers(-2, 3), st.integers(0, 2**16))
def roi_direct(fs, rs, ph, pw, scale, sampling, seed):
    feats = _rand(fs, seed, torch.float32)
    rois = (torch.rand(*rs, generator=torch.Generator().manual_seed(seed)) * 8 - 2) if rs else torch.zeros(0)
    _direct(lambda: torch.ops.fastseg.roi_align(feats, rois, ph, pw, scale, sampling, False),
            "torch.ops.fastseg.roi_align", features=feats, rois=rois, pooled=(ph, pw), scale=scale, sampling=sampling)


GROUPS = {
    "separable_conv2d": (sep_valid, sep_invalid, sep_direct),
    "attention": (attention_valid, attention_invalid, attention_direct),
    "roi_align": (roi_valid, roi_invalid, roi_direct),
}


def main(group: str) -> None:
    torch.set_num_threads(1)
    for prop in GROUPS[group]:
        prop()
        print(f"{group}: {prop.__name__} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
