"""Fusion modules of the COMM family: multi-layer, multi-encoder features -> visual tokens.

A fusion module maps the hidden states of frozen encoders to visual tokens in the
LLM input space::

    feats = {"clip": [B, Lc, N, Dc], "dinov2": [B, Ld, N, Dd]}   # Encoder.features, layers of the spec
    tokens = fusion(feats)                                          # [B, N_out, D_llm]

One registry (:data:`FUSIONS`, name -> class) holds COMM (Jiang et al., "From CLIP to
DINO: Visual Encoders Shout in Multi-modal Large Language Models", Sec. 4, Eq. 1), the
LLaVA-1.5 baseline, the COMM paper's analysis variants (its Sec. 3), the Mixture-of-Features
of MMVP (Tong et al., "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal
LLMs", Sec. 4) and the channel concatenation of Prismatic VLMs (Karamcheti et al.) and Eagle.
The modules live in ``fuse`` (not ``train``) because a trained model is a
:class:`~fuse.members.Member` and its vision branch must run the very same code at
inference; ``train.fusion`` builds them from a training config.

Equations (``LLN`` = LayerNorm then Linear, one per layer; ``w = softmax(logits)``
so the layerscale weights are positive and sum to 1; logits start at 0, i.e. a
uniform init: the COMM paper calls alpha and beta of Eq. 1 learnable scale parameters
and does not say how they start):

- ``comm``: ``v1 = sum_i a_i LLN_i(clip_i)``, ``v2 = sum_j b_j LLN_j(dino_j)``,
  ``v = [v1, MLP(v2)]`` (channels; ``concat: token`` stacks the two sequences),
  ``out = Linear(v)``. The MLP has ``mlp_depth`` blocks ``Linear(D, r D) -> GELU ->
  Linear(r D, D)`` with ``r = mlp_ratio``; ``mlp_depth: 0`` is a single Linear
  (the paper's "linear" ablation).
- ``clip``: layer -2, ``mlp2x_gelu`` (LLaVA-1.5).
- ``mean_half`` / ``mean_all``: mean over the second half / all layers, then projector.
- ``layerscale``: ``sum_i w_i z_i``; ``lln_layerscale``: ``sum_i w_i LLN_i(z_i)``;
  ``conv_layerscale``: ``sum_i w_i BN_i(Conv_i(z_i))`` on the patch grid.
- ``a_mof``: ``alpha clip + (1 - alpha) dino`` before one projector (equal widths).
- ``i_mof``: one projector per encoder, tokens interleaved ``c1 d1 c2 d2 ...`` (2N tokens).
- ``channel_concat``: ``[clip, dino]`` on channels, one projector (Prismatic / Eagle).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import FormatError
from .projectors import build_projector

# -- layer selection ------------------------------------------------------------------------------------------


def hidden_state_indices(selector: str | int | Sequence[int], num_layers: int, what: str = "layers") -> list[int]:
    """Turn a layer selector into hidden-state indices (0 = embeddings, i = output of block i).

    Selectors: ``"all"`` (1..L), ``"half"`` (second half: L//2+1..L), ``"last:K"`` (the last
    ``min(K, L)`` blocks, so ``last:6`` of a 24-layer ViT is COMM's 19-24), ``"A-B"`` (blocks A..B),
    an int or a list of ints (negatives count from the end like HF ``hidden_states``: -2 = L-1).
    """
    n = num_layers
    if isinstance(selector, str):
        s = selector.strip()
        if s == "all":
            return list(range(1, n + 1))
        if s == "half":
            return list(range(n // 2 + 1, n + 1))
        if m := re.fullmatch(r"last:(\d+)", s):
            k = min(int(m[1]), n)
            return list(range(n - k + 1, n + 1))
        if m := re.fullmatch(r"(\d+)-(\d+)", s):
            a, b = int(m[1]), int(m[2])
            if not 0 <= a <= b <= n:
                raise FormatError(f"{what}: range {s!r} outside 0-{n}")
            return list(range(a, b + 1))
        if re.fullmatch(r"-?\d+", s):
            selector = int(s)
        else:
            raise FormatError(f"{what}: {selector!r} is not a layer selector "
                              "(expected all, half, last:K, A-B, an int or a list of ints)")
    items = [selector] if isinstance(selector, int) else list(selector)
    out = []
    for i in items:
        j = int(i) + n + 1 if int(i) < 0 else int(i)
        if not 0 <= j <= n:
            raise FormatError(f"{what}: layer {i} out of range for an encoder with {n} layers")
        out.append(j)
    if not out:
        raise FormatError(f"{what}: empty layer list")
    return out


# -- the spec (JSON) --------------------------------------------------------------------------------------------


@dataclass
class FusionSpec:
    """Everything needed to rebuild a fusion module (stored in the member's config.json).

    ``layers`` holds resolved hidden-state indices per encoder role; ``dims`` the encoder widths;
    ``grid`` the patch grid (h, w) shared by all encoders.
    """

    type: str
    layers: dict[str, list[int]]
    dims: dict[str, int]
    grid: tuple[int, int]
    llm_hidden: int
    projector: str = "linear"
    mlp_depth: int = 2
    mlp_ratio: int = 8
    concat: str = "channel"  # channel | token
    width: int | None = None
    alpha: float = 0.5
    conv_kernel: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusionSpec":
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise FormatError(f"fusion spec: unknown fields {bad}; known: {', '.join(sorted(known))}")
        d = dict(d)
        d["grid"] = tuple(d["grid"])
        return cls(**d)

    @property
    def encoders(self) -> list[str]:
        """Encoder roles in the order their features are consumed."""
        return list(self.layers)


# -- building blocks --------------------------------------------------------------------------------------------


class LayerScale(nn.Module):
    """Learnable layer weights ``w = softmax(logits)`` (positive, sum to 1; zeros = uniform init).

    ``forward(x [B, L, N, D]) -> [B, N, D] = sum_l w_l x_l``.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights().to(x.dtype)
        return torch.einsum("l,blnd->bnd", w, x)


class PerLayerLLN(nn.Module):
    """One ``LayerNorm(d_in) -> Linear(d_in, d_out)`` per layer: ``[B, L, N, d_in] -> [B, L, N, d_out]``."""

    def __init__(self, num_layers: int, d_in: int, d_out: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out)) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x[:, i]) for i, m in enumerate(self.layers)], dim=1)


class PerLayerConvBN(nn.Module):
    """One ``Conv2d(k) -> BatchNorm2d`` per layer on the patch grid: ``[B, L, N, D] -> [B, L, N, d_out]``."""

    def __init__(self, num_layers: int, d_in: int, d_out: int, grid: tuple[int, int], kernel: int = 3):
        super().__init__()
        self.grid = tuple(grid)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d_in, d_out, kernel, padding=kernel // 2), nn.BatchNorm2d(d_out))
            for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, d = x.shape
        h, w = self.grid
        if h * w != n:
            raise ValueError(f"conv_layerscale: {n} tokens do not form the {h}x{w} grid")
        outs = []
        for i, m in enumerate(self.layers):
            img = x[:, i].transpose(1, 2).reshape(b, d, h, w)
            outs.append(m(img).flatten(2).transpose(1, 2))
        return torch.stack(outs, dim=1)


def dino_mlp(dim: int, depth: int, ratio: int) -> nn.Module:
    """COMM's DINO MLP: ``depth`` blocks ``Linear(dim, ratio*dim) -> GELU -> Linear(ratio*dim, dim)``.

    ``depth == 0`` gives a single ``Linear(dim, dim)`` (the paper's linear ablation).
    """
    if depth < 0 or ratio < 1:
        raise FormatError(f"fusion mlp_depth must be >= 0 and mlp_ratio >= 1 (got {depth}, {ratio})")
    if depth == 0:
        return nn.Sequential(nn.Linear(dim, dim))
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.GELU())
        layers += [nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim)]
    return nn.Sequential(*layers)


def make_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """``linear`` | ``mlpNx_gelu`` | ``identity`` (shared registry) | ``fused_gelu_mlp`` (Prismatic:
    ``Linear(d, 4d) -> GELU -> Linear(4d, D) -> GELU -> Linear(D, D)``)."""
    if kind == "fused_gelu_mlp":
        return nn.Sequential(nn.Linear(d_in, 4 * d_in), nn.GELU(), nn.Linear(4 * d_in, d_out), nn.GELU(),
                             nn.Linear(d_out, d_out))
    return build_projector(kind, d_in, d_out)


# -- fusion modules ---------------------------------------------------------------------------------------------


class Fusion(nn.Module):
    """Base class: ``forward(feats: {role: [B, L, N, D]}) -> [B, N_out, D_llm]``."""

    name: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ()  # encoder roles this fusion consumes ("" = the spec's single role)
    default_projector: ClassVar[str] = "linear"
    default_layers: ClassVar[dict[str, Any]] = {}

    def __init__(self, spec: FusionSpec):
        super().__init__()
        self.spec = spec
        need = self.roles or (spec.encoders[:1])
        missing = [r for r in need if r not in spec.layers]
        if missing or (not self.roles and len(spec.layers) != 1):
            raise FormatError(f"fusion {spec.type!r} needs encoders {list(need) or ['<one>']}, "
                              f"got {spec.encoders}")

    @property
    def param_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def num_tokens(self) -> int:
        """Visual tokens per image."""
        h, w = self.spec.grid
        return h * w

    def token_layout(self) -> list[tuple[str, int, int]] | None:
        """Token order as ``(segment, h, w)`` grids, or None when not spatially contiguous."""
        h, w = self.spec.grid
        return [("image", h, w)]

    def _feats(self, feats: dict[str, torch.Tensor], role: str) -> torch.Tensor:
        x = feats[role]
        want = len(self.spec.layers[role])
        if x.dim() != 4 or x.shape[1] != want:
            raise ValueError(f"fusion {self.name}: {role} features must be [B, {want}, N, D], got {tuple(x.shape)}")
        return x.to(self.param_dtype)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(cls: type[Fusion]) -> type[Fusion]:
    FUSIONS[cls.name] = cls
    return cls


def fusion_class(name: str) -> type[Fusion]:
    try:
        return FUSIONS[name]
    except KeyError:
        raise FormatError(f"unknown fusion type {name!r}; known: {', '.join(sorted(FUSIONS))}") from None


def build_fusion(spec: FusionSpec | dict) -> Fusion:
    """Fusion module (random init) from a spec."""
    spec = spec if isinstance(spec, FusionSpec) else FusionSpec.from_dict(spec)
    return fusion_class(spec.type)(spec)


@register_fusion
class CommFusion(Fusion):
    """COMM: CLIP all layers + DINOv2 deep layers, LLN-layerscale each, DINO MLP, concat, Linear.

    Parameters: ``clip_lln``, ``clip_scale``, ``dino_lln``, ``dino_scale``, ``dino_mlp``, ``proj``.
    """

    name = "comm"
    roles = ("clip", "dinov2")
    default_projector = "linear"
    default_layers = {"clip": "all", "dinov2": "last:6"}

    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        if spec.concat not in ("channel", "token"):
            raise FormatError(f"fusion concat must be 'channel' or 'token', got {spec.concat!r}")
        dc, dd = spec.dims["clip"], spec.dims["dinov2"]
        w1 = spec.width or dc
        w2 = spec.width or (w1 if spec.concat == "token" else dd)
        self.clip_lln = PerLayerLLN(len(spec.layers["clip"]), dc, w1)
        self.clip_scale = LayerScale(len(spec.layers["clip"]))
        self.dino_lln = PerLayerLLN(len(spec.layers["dinov2"]), dd, w2)
        self.dino_scale = LayerScale(len(spec.layers["dinov2"]))
        self.dino_mlp = dino_mlp(w2, spec.mlp_depth, spec.mlp_ratio)
        d_cat = w1 + w2 if spec.concat == "channel" else w1
        self.proj = make_projector(spec.projector, d_cat, spec.llm_hidden)

    def branches(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v1 [B, N, w1], v2 [B, N, w2])`` of the COMM paper's Eq. 1 (before the MLP)."""
        v1 = self.clip_scale(self.clip_lln(self._feats(feats, "clip")))
        v2 = self.dino_scale(self.dino_lln(self._feats(feats, "dinov2")))
        return v1, v2

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        v1, v2 = self.branches(feats)
        v = torch.cat([v1, self.dino_mlp(v2)], dim=-1 if self.spec.concat == "channel" else 1)
        return self.proj(v)

    def num_tokens(self) -> int:
        return super().num_tokens() * (2 if self.spec.concat == "token" else 1)

    def token_layout(self):
        h, w = self.spec.grid
        return [("image", h, w)] if self.spec.concat == "channel" else [("clip", h, w), ("dinov2", h, w)]


class _SingleEncoder(Fusion):
    """One encoder, several layers merged into ``[B, N, D]``, then a projector."""

    roles = ()

    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        self.role = spec.encoders[0]
        self.n_layers = len(spec.layers[self.role])
        self.d_in = spec.dims[self.role]
        self.build()
        self.proj = make_projector(spec.projector, self.merged_dim, spec.llm_hidden)

    merged_dim = property(lambda self: self.d_in)

    def build(self) -> None:
        pass

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(self.merge(self._feats(feats, self.role)))


@register_fusion
class ClipFusion(_SingleEncoder):
    """LLaVA-1.5: one layer (default -2), ``mlp2x_gelu``. Several layers are concatenated on channels."""

    name = "clip"
    default_projector = "mlp2x_gelu"
    default_layers = {"clip": -2}

    merged_dim = property(lambda self: self.d_in * self.n_layers)

    def merge(self, x):
        return x.permute(0, 2, 1, 3).flatten(2)


@register_fusion
class MeanHalfFusion(_SingleEncoder):
    """Mean(half): mean of the second half of the layers."""

    name = "mean_half"
    default_layers = {"clip": "half"}

    def merge(self, x):
        return x.mean(dim=1)


@register_fusion
class MeanAllFusion(MeanHalfFusion):
    """Mean(all): mean of all layers."""

    name = "mean_all"
    default_layers = {"clip": "all"}


@register_fusion
class LayerscaleFusion(_SingleEncoder):
    """Layerscale(all): ``sum_i w_i z_i``."""

    name = "layerscale"
    default_layers = {"clip": "all"}

    def build(self):
        self.scale = LayerScale(self.n_layers)

    def merge(self, x):
        return self.scale(x)


@register_fusion
class LLNLayerscaleFusion(_SingleEncoder):
    """LLN-Layerscale(all): ``sum_i w_i Linear_i(LN_i(z_i))``."""

    name = "lln_layerscale"
    default_layers = {"clip": "all"}

    merged_dim = property(lambda self: self.spec.width or self.d_in)

    def build(self):
        self.lln = PerLayerLLN(self.n_layers, self.d_in, self.spec.width or self.d_in)
        self.scale = LayerScale(self.n_layers)

    def merge(self, x):
        return self.scale(self.lln(x))


@register_fusion
class ConvLayerscaleFusion(_SingleEncoder):
    """Conv-Layerscale(all): ``sum_i w_i BN_i(Conv_i(z_i))`` (conv on the patch grid)."""

    name = "conv_layerscale"
    default_layers = {"clip": "all"}

    merged_dim = property(lambda self: self.spec.width or self.d_in)

    def build(self):
        self.conv = PerLayerConvBN(self.n_layers, self.d_in, self.spec.width or self.d_in, self.spec.grid,
                                   self.spec.conv_kernel)
        self.scale = LayerScale(self.n_layers)

    def merge(self, x):
        return self.scale(self.conv(x))


class _TwoEncoder(Fusion):
    roles = ("clip", "dinov2")
    default_projector = "mlp2x_gelu"
    default_layers = {"clip": -2, "dinov2": -2}

    def _pair(self, feats):
        c = self._feats(feats, "clip").permute(0, 2, 1, 3).flatten(2)
        d = self._feats(feats, "dinov2").permute(0, 2, 1, 3).flatten(2)
        return c, d

    def _widths(self):
        s = self.spec
        return s.dims["clip"] * len(s.layers["clip"]), s.dims["dinov2"] * len(s.layers["dinov2"])


@register_fusion
class AMoFFusion(_TwoEncoder):
    """A-MoF (MMVP): ``alpha * clip + (1 - alpha) * dino`` before one projector (fixed alpha)."""

    name = "a_mof"

    def __init__(self, spec):
        super().__init__(spec)
        wc, wd = self._widths()
        if wc != wd:
            raise FormatError(f"a_mof needs equal CLIP and DINOv2 feature widths, got {wc} and {wd}")
        if not 0.0 <= spec.alpha <= 1.0:
            raise FormatError(f"a_mof alpha must be in [0, 1], got {spec.alpha}")
        self.proj = make_projector(spec.projector, wc, spec.llm_hidden)

    def forward(self, feats):
        c, d = self._pair(feats)
        a = self.spec.alpha
        return self.proj(a * c + (1.0 - a) * d)


@register_fusion
class IMoFFusion(_TwoEncoder):
    """I-MoF (MMVP): one projector per encoder, tokens interleaved one by one (2N tokens)."""

    name = "i_mof"

    def __init__(self, spec):
        super().__init__(spec)
        wc, wd = self._widths()
        self.proj_clip = make_projector(spec.projector, wc, spec.llm_hidden)
        self.proj_dino = make_projector(spec.projector, wd, spec.llm_hidden)

    def forward(self, feats):
        c, d = self._pair(feats)
        tc, td = self.proj_clip(c), self.proj_dino(d)
        b, n, dim = tc.shape
        return torch.stack([tc, td], dim=2).reshape(b, 2 * n, dim)

    def num_tokens(self):
        return 2 * super().num_tokens()

    def token_layout(self):
        return None


@register_fusion
class ChannelConcatFusion(_TwoEncoder):
    """Channel concatenation (Prismatic ``dinosiglip`` / Eagle): ``[clip, dino]`` -> one projector."""

    name = "channel_concat"

    def __init__(self, spec):
        super().__init__(spec)
        wc, wd = self._widths()
        self.proj = make_projector(spec.projector, wc + wd, spec.llm_hidden)

    def forward(self, feats):
        c, d = self._pair(feats)
        return self.proj(torch.cat([c, d], dim=-1))


def make_spec(fusion_type: str, encoders: dict[str, Any], llm_hidden: int, *, layers: dict[str, Any] | None = None,
              projector: str | None = None, **options: Any) -> FusionSpec:
    """Spec for ``fusion_type`` over built encoders ``{role: Encoder}`` (layer selectors resolved).

    ``layers`` maps role -> selector and defaults to the fusion's own defaults; for single-encoder
    fusions the role is the only key of ``layers`` (or ``options['encoder']``, default ``clip``).
    """
    cls = fusion_class(fusion_type)
    if cls.roles:
        roles = list(cls.roles)
        sel = {r: cls.default_layers.get(r, -2) for r in roles}
    else:
        role = options.pop("encoder", None) or (next(iter(layers)) if layers else "clip")
        roles = [role]
        sel = {role: next(iter(cls.default_layers.values()))}
    options.pop("encoder", None)
    for r, v in (layers or {}).items():
        if r not in sel:
            raise FormatError(f"fusion {fusion_type!r}: layers given for {r!r}, which it does not use "
                              f"(it uses {', '.join(roles)})")
        if v is not None:
            sel[r] = v
    missing = [r for r in roles if r not in encoders]
    if missing:
        raise FormatError(f"fusion {fusion_type!r} needs encoders {roles}; missing {missing}")
    grids = {r: tuple(encoders[r].grid) for r in roles}
    if len(set(grids.values())) != 1:
        raise FormatError(f"fusion {fusion_type!r}: encoder patch grids differ ({grids}); set the encoders' "
                          "image_size so that image_size / patch_size agree")
    resolved = {r: hidden_state_indices(sel[r], encoders[r].num_layers, f"fusion.layers.{r}") for r in roles}
    return FusionSpec(type=fusion_type, layers=resolved, dims={r: encoders[r].hidden_size for r in roles},
                      grid=grids[roles[0]], llm_hidden=llm_hidden, projector=projector or cls.default_projector,
                      **options)


def layers_note(spec: FusionSpec) -> str:
    """Human-readable summary, e.g. ``comm: clip layers 1-24, dinov2 layers 19-24``."""
    parts = []
    for r, ls in spec.layers.items():
        rng = f"{ls[0]}-{ls[-1]}" if len(ls) > 1 and ls == list(range(ls[0], ls[-1] + 1)) else ",".join(map(str, ls))
        parts.append(f"{r} layers {rng}")
    return f"{spec.type}: {', '.join(parts)}"


__all__ = ["FUSIONS", "Fusion", "FusionSpec", "LayerScale", "PerLayerLLN", "PerLayerConvBN", "build_fusion",
           "dino_mlp", "fusion_class", "layers_note", "make_projector", "make_spec", "register_fusion",
           "hidden_state_indices"]
