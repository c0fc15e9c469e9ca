"""Swap fastseg's fused modules into an existing model: ``fuse_modules(model) -> (model, report)``.

What is recognised:

* **Separable convolutions**: depthwise conv → (BatchNorm) → (ReLU) → pointwise 1×1 conv → (BatchNorm)
  → (ReLU), as consecutive entries of an ``nn.Sequential`` (nested Sequentials are looked through:
  smp's ``SeparableConv2d(dw, pw)`` followed by BatchNorm and ReLU in the enclosing Sequential) or as
  submodules that a module's ``forward`` calls one after the other and nothing else (checked by
  tracing it with ``torch.fx``: timm's Xception ``SeparableConv2d(conv_dw, bn_dw, act_dw, conv_pw,
  ...)``, a user's own block). The chain becomes one :class:`fastseg.nn.SeparableConv2d`.
* **DANet attention**: a module with ``query_conv``/``key_conv``/``value_conv`` 1×1 convs and a
  ``gamma`` parameter (the reference DANet ``PAM_Module``), or with only ``gamma`` and a softmax (its
  ``CAM_Module``), becomes :class:`fastseg.nn.PositionAttention` / :class:`ChannelAttention` — but
  only after both give the same output on a random probe input, since names alone do not prove the
  forward is DANet's.

Weights are not copied: the fastseg modules hold the original ``Parameter`` and buffer objects, so an
optimizer built before the swap keeps training the same tensors (``state_dict`` keys do change).

Train and eval behaviour stay those of the original model. A fused ``SeparableConv2d`` folds its
BatchNorms into the kernel's affines only in eval mode (running statistics); in train mode it runs
depthwise conv → batch_norm → ReLU → pointwise → batch_norm → ReLU with the original BatchNorm modules,
so batch statistics, running-stat updates and gradients are exactly the original ones. Chains without
BatchNorm are fused in both modes.

Only what gives the same function is swapped: zero padding equal to DeepLab's "same" padding (odd
effective kernel, symmetric), square kernels, channel multiplier 1, plain ``nn.Conv2d`` (not
``Conv2dSame``-style dynamic padding), ``nn.ReLU`` (other activations end the chain) and BatchNorm2d
(timm's ``BatchNormAct2d`` counts as BatchNorm + its activation when that is ReLU or Identity).
Modules with hooks are never folded away (timm's feature extraction hooks the ReLU ending a block: the
chain then stops before it). Chains that look fusable but are not are listed in ``report.skipped``
with the reason.

Example::

    >>> import segmentation_models_pytorch as smp
    >>> model = smp.DeepLabV3Plus(encoder_weights=None).eval()
    >>> fused, report = fuse_modules(model)
    >>> len(report.fused)   # 3 separable ASPP branches + the decoder's separable conv
    4
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fastseg.nn.attention import ChannelAttention, PositionAttention
from fastseg.nn.conv import SeparableConv2d
from fastseg.ops._reference import fixed_padding

__all__ = ["FuseRecord", "FuseReport", "fuse_modules"]

_RELU = "relu"  # a ReLU applied as a function (F.relu, torch.relu, x.relu()) inside a traced forward


@dataclass
class FuseRecord:
    """One swap: ``name`` (qualified, in the returned model) now holds a ``kind`` module that replaced
    the original modules ``replaced`` (qualified names in the input model)."""

    name: str
    kind: str
    replaced: list[str]
    detail: str = ""


@dataclass
class FuseReport:
    """What :func:`fuse_modules` swapped (``fused``) and what looked fusable but was left alone
    (``skipped``: (qualified name, reason))."""

    fused: list[FuseRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.fused)} module(s) fused, {len(self.skipped)} skipped"]
        lines += [f"  {r.name}: {r.kind} ({r.detail}) <- {', '.join(r.replaced)}" for r in self.fused]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- chains

@dataclass
class _Elem:
    path: str  # name relative to the container being matched ("" for a functional ReLU)
    module: nn.Module | str  # a leaf module or _RELU
    unit: int  # index of the container's top-level unit (child / call) it belongs to


def _is_bn(m: object) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not _hooked(m)


def _is_leaf(m: nn.Module) -> bool:
    return _is_bn(m) or not any(True for _ in m.children())


class _ChildTracer(fx.Tracer):
    """Traces one level: every submodule call stays a call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


_RELU_FUNCS = {torch.relu, torch.relu_, nn.functional.relu}


def _traced_units(module: nn.Module) -> list[tuple[str, nn.Module | str]] | None:
    """The calls of ``module.forward`` if it is a straight line x → f1 → f2 → … → out of submodule
    calls and ReLUs, each output used only by the next call; else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ChildTracer().trace(module)
    except Exception:  # anything fx cannot trace is simply not a chain
        return None
    nodes = list(graph.nodes)
    if len(nodes) < 2 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    units: list[tuple[str, nn.Module | str]] = []
    prev = nodes[0]
    for node in nodes[1:-1]:
        if len(prev.users) != 1 or not node.args or node.args[0] is not prev or any(
                isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return None
        if node.op == "call_module":
            units.append((str(node.target), module.get_submodule(str(node.target))))
        elif (node.op == "call_function" and node.target in _RELU_FUNCS) or (
                node.op == "call_method" and node.target in ("relu", "relu_")):
            units.append(("", _RELU))
        else:
            return None
        prev = node
    out = nodes[-1].args[0]
    if out is not prev or len(prev.users) != 1:
        return None
    return units


def _units(module: nn.Module) -> tuple[str, list[tuple[str, nn.Module | str]]] | None:
    """(how, top-level units) of a module whose forward is a straight chain: "seq" for nn.Sequential's
    own forward, "fx" for a traced one; None otherwise."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return "seq", [(n, m) for n, m in module._modules.items() if m is not None]  # repeats kept
    if _is_leaf(module) or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return None
    units = _traced_units(module)
    return None if units is None else ("fx", units)


def _flatten(module: nn.Module) -> tuple[str, list[tuple[str, nn.Module | str]], list[_Elem]] | None:
    """A chain container's top-level units and its leaves in call order (chain children looked into)."""
    got = _units(module)
    if got is None:
        return None
    how, units = got
    elems: list[_Elem] = []
    for i, (name, unit) in enumerate(units):
        inner = None if isinstance(unit, str) or _is_leaf(unit) else _flatten(unit)
        if inner is None:
            elems.append(_Elem(name, unit, i))
        else:
            elems += [_Elem(f"{name}.{e.path}" if e.path else "", e.module, i) for e in inner[2]]
    return how, units, elems


# ----------------------------------------------------------------------------------------- matching

def _hooked(m: nn.Module | str) -> bool:
    """Hooks see a module's own inputs and outputs (timm's feature extraction hooks a ReLU): such a
    module is never folded away."""
    return isinstance(m, nn.Module) and bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                             or m._backward_pre_hooks)


def _relu_like(m: nn.Module | str) -> bool:
    return m == _RELU or (type(m) is nn.ReLU and not _hooked(m))


def _bn_act(m: nn.Module) -> str | None:
    """For a BatchNorm: "none", or "relu" when it applies a ReLU itself (timm's BatchNormAct2d); None
    when its forward does something else fastseg cannot fold."""
    if type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return "none"
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if isinstance(act, nn.Module) and (drop is None or isinstance(drop, nn.Identity)):
        if isinstance(act, nn.Identity):
            return "none"
        if type(act) is nn.ReLU:
            return "relu"
    return None


def _dw_problem(conv: nn.Conv2d) -> str | None:
    """Why a depthwise conv cannot be fastseg's depthwise stage (None: it can)."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if k[0] != k[1] or s[0] != s[1] or d[0] != d[1]:
        return "non-square kernel, stride or dilation"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    beg, end = fixed_padding(k[0], d[0], "same")
    pad = conv.padding
    if pad == "same":  # PyTorch's "same" (stride 1) is symmetric exactly when DeepLab's is
        pad = (beg, beg) if beg == end and s[0] == 1 else None
    if beg != end or pad != (beg, beg):
        return f"padding {conv.padding} is not DeepLab's 'same' padding ({beg}, {end})"
    return None


def _is_depthwise(m: object) -> bool:
    return type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels > 1 and not _hooked(m)


def _is_pointwise(m: object, channels: int) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid", "same") and m.groups == 1 and m.in_channels == channels
            and m.padding_mode == "zeros" and not _hooked(m))


@dataclass
class _Match:
    start: int
    dw: nn.Conv2d
    bn_dw: nn.Module | None
    relu_dw: bool
    pw: nn.Conv2d
    # where the chain may stop: (stop index, exclusive; pointwise BatchNorm; final ReLU), shortest first
    ends: list[tuple[int, nn.Module | None, bool]]


def _match_at(elems: list[_Elem], i: int) -> _Match | str | None:
    """The separable chain starting at elems[i] (None: no depthwise → pointwise there; str: there is
    one, but it cannot be fused, and why)."""
    dw = elems[i].module
    if not _is_depthwise(dw):
        return None
    j = i + 1

    def skip_identity() -> None:
        nonlocal j
        while j < len(elems) and isinstance(elems[j].module, nn.Identity):
            j += 1

    def bn_here(channels: int) -> str | None:
        m = elems[j].module if j < len(elems) else None
        if isinstance(m, nn.Module) and _is_bn(m) and m.num_features == channels:
            return _bn_act(m)
        return None

    skip_identity()
    bn_dw, relu_dw = None, False
    if j < len(elems) and _is_bn(elems[j].module):
        act = bn_here(dw.in_channels)
        if act is None:
            return "the depthwise conv's BatchNorm does not match or applies an activation other than ReLU"
        bn_dw, relu_dw = elems[j].module, act == "relu"
        j += 1
        skip_identity()
    if j < len(elems) and _relu_like(elems[j].module):
        relu_dw = True
        j += 1
        skip_identity()
    if j >= len(elems) or not _is_pointwise(elems[j].module, dw.in_channels):
        return None  # a depthwise conv alone (MobileNet-style): nothing fastseg fuses
    problem = _dw_problem(dw)
    if problem is not None:
        return problem
    pw = elems[j].module
    j += 1
    ends: list[tuple[int, nn.Module | None, bool]] = [(j, None, False)]
    skip_identity()
    bn_pw, relu_pw = None, False
    act = bn_here(pw.out_channels)
    if act is not None:
        bn_pw, relu_pw = elems[j].module, act == "relu"
        j += 1
        ends.append((j, bn_pw, relu_pw))
        skip_identity()
    if j < len(elems) and _relu_like(elems[j].module):
        j += 1
        ends.append((j, bn_pw, True))
    return _Match(i, dw, bn_dw, relu_dw, pw, ends)


# ----------------------------------------------------------------------------------------- building

def _build_separable(m: _Match, end: tuple[int, nn.Module | None, bool]) -> SeparableConv2d:
    """A fastseg SeparableConv2d holding the chain's own modules and Parameters. BatchNorm modules are
    used as they are (also SyncBatchNorm and timm's BatchNormAct2d, whose ReLU the flags repeat:
    ReLU∘ReLU = ReLU), so train mode, which runs them unfused, behaves exactly as before."""
    dw, pw = m.dw, m.pw
    _, bn_pw, relu_pw = end
    with torch.device("meta"):
        sep = SeparableConv2d(dw.in_channels, pw.out_channels, dw.kernel_size[0], dw.stride[0], dw.dilation[0],
                              bn=True, relu_after_depthwise=m.relu_dw, relu=relu_pw)
        # fastseg pads explicitly (DeepLab's fixed padding) and then runs the conv with padding 0
        depthwise = nn.Conv2d(dw.in_channels, dw.in_channels, dw.kernel_size, dw.stride, 0, dw.dilation,
                              groups=dw.in_channels, bias=dw.bias is not None)
    depthwise.weight = dw.weight  # the same Parameter objects: optimizers keep working
    if dw.bias is not None:
        depthwise.bias = dw.bias
    depthwise.train(dw.training)
    sep.depthwise, sep.pointwise, sep.bn_depth, sep.bn_point = depthwise, pw, m.bn_dw, bn_pw
    sep.training = dw.training
    return sep


def _describe(m: _Match, end: tuple[int, nn.Module | None, bool]) -> str:
    k, d, s = m.dw.kernel_size[0], m.dw.dilation[0], m.dw.stride[0]
    dw = "+".join(n for n, on in (("bn", m.bn_dw is not None), ("relu", m.relu_dw)) if on) or "-"
    pw = "+".join(n for n, on in (("bn", end[1] is not None), ("relu", end[2])) if on) or "-"
    return f"{m.dw.in_channels}->{m.pw.out_channels} {k}x{k} d={d} s={s}, dw[{dw}] pw[{pw}]"


# ----------------------------------------------------------------------------------------- attention

def _probe_equal(old: nn.Module, new: nn.Module, channels: int) -> bool:
    """Same output on a random input (eval mode, no grad; the modules' own mode is restored)."""
    param = next(old.parameters())
    x = torch.randn(2, channels, 5, 7, device=param.device, dtype=param.dtype)
    modes = [(m, m.training) for m in old.modules()]
    try:
        old.eval()
        new.eval()
        with torch.no_grad():
            a, b = old(x), new(x)
    except Exception:
        return False
    finally:
        for m, mode in modes:
            m.train(mode)
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _attention_swap(module: nn.Module) -> tuple[nn.Module, str] | None:
    if isinstance(module, (PositionAttention, ChannelAttention)) or _hooked(module):
        return None
    gamma = getattr(module, "gamma", None)
    if not isinstance(gamma, nn.Parameter) or gamma.numel() != 1:
        return None
    convs = [getattr(module, n, None) for n in ("query_conv", "key_conv", "value_conv")]
    if all(type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.groups == 1 for c in convs):
        q, k, v = convs
        channels = v.in_channels
        if not (q.in_channels == k.in_channels == channels == v.out_channels and q.out_channels == k.out_channels
                and q.stride == k.stride == v.stride == (1, 1) and q.padding == k.padding == v.padding == (0, 0)):
            return None
        with torch.device("meta"):
            new = PositionAttention(channels)
        new.query_conv, new.key_conv, new.value_conv, new.gamma = q, k, v, gamma
        kind = "position_attention"
    elif all(c is None for c in convs) and all(isinstance(c, nn.Softmax) for c in module.children()) \
            and not any(True for _ in module.buffers()) and sum(1 for _ in module.parameters()) == 1:
        with torch.device("meta"):
            new = ChannelAttention()
        new.gamma = gamma
        channels = 3
        kind = "channel_attention"
    else:
        return None
    new.train(module.training)
    # names alone do not prove the forward is DANet's: compare on a probe with a non-zero gamma
    saved = gamma.detach().clone()
    with torch.no_grad():
        gamma.fill_(0.7)
    try:
        same = _probe_equal(module, new, channels)
    finally:
        with torch.no_grad():
            gamma.copy_(saved)
    return (new, kind) if same else None


# ----------------------------------------------------------------------------------------- the walk

def _fuse_container(module: nn.Module, prefix: str, report: FuseReport) -> tuple[nn.Module, set[str]]:
    """Fuse the chains of one straight-line container that cover whole top-level units of it (chains
    inside one unit are left to that unit's own walk). Returns the module (a new Sequential when a
    traced forward had to be rebuilt) and the names of the children created here."""
    flat = _flatten(module)
    if flat is None:
        return module, set()
    how, units, elems = flat
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for idx, e in enumerate(elems):
        first.setdefault(e.unit, idx)
        last[e.unit] = idx
    found: list[tuple[_Match, tuple[int, nn.Module | None, bool]]] = []
    i = 0
    while i < len(elems):
        got = _match_at(elems, i)
        if isinstance(got, _Match) and first[elems[i].unit] == i:
            ends = []  # the stops that end a unit (trailing Identities of that unit included)
            for stop, bn, relu in got.ends:
                tail = last[elems[stop - 1].unit] + 1
                consumed = [units[u][1] for u in range(elems[i].unit, elems[stop - 1].unit + 1)]
                if all(isinstance(elems[k].module, nn.Identity) and not _hooked(elems[k].module)
                       for k in range(stop, tail)) and not any(
                        _hooked(x) for u in consumed if not isinstance(u, str) for x in u.modules()):
                    ends.append((tail, bn, relu))
            if ends:
                found.append((got, ends[-1]))  # the longest chain that ends where a unit ends
                i = ends[-1][0]
                continue
            if elems[i].unit != elems[got.ends[0][0] - 1].unit:
                report.skipped.append((_qual(prefix, elems[i].path), "the chain ends inside a submodule"))
        elif isinstance(got, str) and first[elems[i].unit] == i:
            report.skipped.append((_qual(prefix, elems[i].path), got))
        i += 1
    if not found:
        return module, set()

    def unit_range(m: _Match, end: tuple[int, nn.Module | None, bool]) -> range:
        return range(elems[m.start].unit, elems[end[0] - 1].unit + 1)

    if how == "fx" and len(found) == 1 and list(unit_range(*found[0])) == list(range(len(units))) \
            and not _hooked(module):
        m, end = found[0]  # the whole forward is one chain: the fastseg module replaces the module itself
        replaced = [_qual(prefix, elems[k].path) for k in range(m.start, end[0])
                    if not isinstance(elems[k].module, (str, nn.Identity))]
        report.fused.append(FuseRecord(prefix, "separable_conv2d", replaced, _describe(m, end)))
        return _build_separable(m, end), {n for n, _ in units}
    if how == "fx":
        # attributes can be swapped in place when each consumed call is a submodule called only once;
        # otherwise the straight line is rebuilt as a Sequential (functional ReLUs become nn.ReLU)
        calls = [n for n, _ in units if n]
        if not all(units[u][0] and calls.count(units[u][0]) == 1 for m, end in found for u in unit_range(m, end)):
            mode = module.training
            module = nn.Sequential(*[_new(nn.ReLU(), mode) if isinstance(u, str) else u for _, u in units])
            module.training = mode
            units = [(str(k), u) for k, u in enumerate(module)]
    created: set[str] = set()
    for m, end in found:
        names = [units[u][0] for u in unit_range(m, end)]
        setattr(module, names[0], _build_separable(m, end))
        for n in names[1:]:
            setattr(module, n, _new(nn.Identity(), module.training))
        created.update(names)
        replaced = [_qual(prefix, elems[k].path) for k in range(m.start, end[0])
                    if not isinstance(elems[k].module, (str, nn.Identity))]
        report.fused.append(FuseRecord(_qual(prefix, names[0]), "separable_conv2d", replaced, _describe(m, end)))
    return module, created


def _new(module: nn.Module, training: bool) -> nn.Module:
    """A module created by the swap, in its surroundings' mode (set on it alone, not recursively)."""
    module.training = training
    return module


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _walk(module: nn.Module, prefix: str, report: FuseReport, attention: bool) -> nn.Module:
    if attention:
        swapped = _attention_swap(module)
        if swapped is not None:
            report.fused.append(FuseRecord(prefix, swapped[1], [prefix], type(module).__name__))
            return swapped[0]
    if isinstance(module, SeparableConv2d):
        return module
    module, created = _fuse_container(module, prefix, report)
    for name, child in list(module.named_children()):
        if name in created:
            continue
        new = _walk(child, _qual(prefix, name), report, attention)
        if new is not child:
            setattr(module, name, new)
    return module


def fuse_modules(model: nn.Module, *, inplace: bool = False, attention: bool = True) -> tuple[nn.Module, FuseReport]:
    """Replace what fastseg can fuse in ``model`` by fastseg modules holding the same weights.

    Args:
        model: any ``nn.Module`` (train or eval mode; each swap keeps the original's mode and behaviour).
        inplace: modify ``model`` itself (default: a deep copy; the copy's modules hold the copy's
            parameters).
        attention: also swap DANet-style position/channel attention modules.

    Returns:
        ``(model, report)``: the model with its separable-conv chains replaced by
        :class:`fastseg.nn.SeparableConv2d` (and DANet attention by :class:`PositionAttention` /
        :class:`ChannelAttention`), and a :class:`FuseReport` of what was swapped and skipped.
        The returned model may be a new object when ``model`` itself was a chain.

    Example::

        >>> block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32, bias=False),
        ...                       nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 1, bias=False),
        ...                       nn.BatchNorm2d(64), nn.ReLU()).eval()
        >>> fused, report = fuse_modules(block)
        >>> type(fused[0]).__name__, [r.kind for r in report.fused]
        ('SeparableConv2d', ['separable_conv2d'])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    return _walk(model, "", report, attention), report
