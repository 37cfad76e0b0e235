"""Fusion modules against the papers' equations (COMM Sec. 3-4, Eq. 1; MMVP's Mixture-of-Features, Sec. 4),
computed by hand with torch.nn.functional."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fuse.errors import FormatError
from fuse.fusions.modules import FUSIONS, FusionSpec, build_fusion, hidden_state_indices

B, N, DC, DD, LLM = 2, 4, 6, 5, 7


def _spec(kind, layers, **kw):
    dims = {r: {"clip": DC, "dinov2": DD}[r] for r in layers}
    return FusionSpec(type=kind, layers=layers, dims=dims, grid=(2, 2), llm_hidden=LLM, **kw)


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _feats(seed=1, lc=3, ld=2):
    g = torch.Generator().manual_seed(seed)
    return {"clip": torch.randn(B, lc, N, DC, generator=g), "dinov2": torch.randn(B, ld, N, DD, generator=g)}


def _lln(x, seq):
    ln, lin = seq[0], seq[1]
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps), lin.weight, lin.bias)


def test_registry_has_every_fusion_of_the_issue():
    assert set(FUSIONS) == {"comm", "clip", "mean_half", "mean_all", "layerscale", "lln_layerscale",
                            "conv_layerscale", "a_mof", "i_mof", "channel_concat"}


def test_comm_matches_spec_equations_by_hand():
    f = _randomise(build_fusion(_spec("comm", {"clip": [1, 2, 3], "dinov2": [2, 3]}, mlp_depth=2, mlp_ratio=2)))
    x = _feats()
    a = torch.softmax(f.clip_scale.logits.detach(), 0)
    b = torch.softmax(f.dino_scale.logits.detach(), 0)
    # v1 = sum_i alpha_i Linear_i(LN_i(clip_i)),  v2 = sum_j beta_j Linear_j(LN_j(dino_j))
    v1 = sum(a[i] * _lln(x["clip"][:, i], f.clip_lln.layers[i]) for i in range(3))
    v2 = sum(b[j] * _lln(x["dinov2"][:, j], f.dino_lln.layers[j]) for j in range(2))
    m = f.dino_mlp  # 2 blocks: Linear(D, 2D) GELU Linear(2D, D) [GELU] Linear(D, 2D) GELU Linear(2D, D)
    h = F.linear(F.gelu(F.linear(v2, m[0].weight, m[0].bias)), m[2].weight, m[2].bias)
    h = F.linear(F.gelu(F.linear(F.gelu(h), m[4].weight, m[4].bias)), m[6].weight, m[6].bias)
    v = torch.cat([v1, h], dim=-1)
    out = F.linear(v, f.proj[0].weight, f.proj[0].bias)
    with torch.no_grad():
        got_v1, got_v2 = f.branches(x)
        got = f(x)
    torch.testing.assert_close(got_v1, v1)
    torch.testing.assert_close(got_v2, v2)
    torch.testing.assert_close(got, out)
    assert got.shape == (B, N, LLM) and f.num_tokens() == N
    assert sum(p.numel() for p in m.parameters()) == 2 * (DD * 2 * DD + 2 * DD + 2 * DD * DD + DD)


def test_comm_token_concat_and_depth_options():
    f = _randomise(build_fusion(_spec("comm", {"clip": [1, 2], "dinov2": [2]}, concat="token", mlp_depth=1)))
    x = _feats(lc=2, ld=1)
    with torch.no_grad():
        v1, v2 = f.branches(x)
        out = f(x)
    assert out.shape == (B, 2 * N, LLM) and f.num_tokens() == 2 * N
    torch.testing.assert_close(out[:, :N], f.proj(v1).detach())
    torch.testing.assert_close(out[:, N:], f.proj(f.dino_mlp(v2)).detach())
    assert f.token_layout() == [("clip", 2, 2), ("dinov2", 2, 2)]
    lin = build_fusion(_spec("comm", {"clip": [1], "dinov2": [1]}, mlp_depth=0))
    assert len(lin.dino_mlp) == 1 and isinstance(lin.dino_mlp[0], torch.nn.Linear)


def test_layerscale_weights_sum_to_one_and_start_uniform():
    f = build_fusion(_spec("comm", {"clip": [1, 2, 3], "dinov2": [1, 2]}))
    for scale, n in ((f.clip_scale, 3), (f.dino_scale, 2)):
        torch.testing.assert_close(scale.weights(), torch.full((n,), 1.0 / n))
    _randomise(f, seed=3)
    opt = torch.optim.Adam(f.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        f(_feats()).mean().backward()
        opt.step()
    for scale in (f.clip_scale, f.dino_scale):
        w = scale.weights().detach()
        assert (w > 0).all() and abs(float(w.sum()) - 1.0) < 1e-6
        assert not torch.allclose(w, torch.full_like(w, 1.0 / len(w)))  # they did learn


def test_analysis_variants_by_hand():
    x = _feats(lc=4)
    lay = {"clip": [1, 2, 3, 4]}
    mean_all = _randomise(build_fusion(_spec("mean_all", lay)))
    ls = _randomise(build_fusion(_spec("layerscale", lay)))
    lln = _randomise(build_fusion(_spec("lln_layerscale", lay)))
    conv = _randomise(build_fusion(_spec("conv_layerscale", lay, conv_kernel=3)))
    conv.eval()  # BatchNorm with running stats (0 mean, 1 var) for the hand computation
    c = x["clip"]
    with torch.no_grad():
        torch.testing.assert_close(mean_all(x), mean_all.proj(c.mean(1)))
        w = torch.softmax(ls.scale.logits, 0)
        torch.testing.assert_close(ls(x), ls.proj(sum(w[i] * c[:, i] for i in range(4))))
        w = torch.softmax(lln.scale.logits, 0)
        torch.testing.assert_close(lln(x), lln.proj(sum(w[i] * _lln(c[:, i], lln.lln.layers[i]) for i in range(4))))
        w = torch.softmax(conv.scale.logits, 0)
        ref = 0
        for i in range(4):
            cv, bn = conv.conv.layers[i]
            img = c[:, i].transpose(1, 2).reshape(B, DC, 2, 2)
            y = F.conv2d(img, cv.weight, cv.bias, padding=1)
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            ref = ref + w[i] * y.flatten(2).transpose(1, 2)
        torch.testing.assert_close(conv(x), conv.proj(ref))


def test_mof_and_concat_by_hand():
    g = torch.Generator().manual_seed(5)
    x = {"clip": torch.randn(B, 1, N, DC, generator=g), "dinov2": torch.randn(B, 1, N, DC, generator=g)}
    spec = FusionSpec(type="a_mof", layers={"clip": [2], "dinov2": [2]}, dims={"clip": DC, "dinov2": DC}, grid=(2, 2),
                      llm_hidden=LLM, projector="mlp2x_gelu", alpha=0.3)
    a = _randomise(build_fusion(spec))
    i = _randomise(build_fusion(FusionSpec(**{**spec.__dict__, "type": "i_mof"})))
    cc = _randomise(build_fusion(FusionSpec(**{**spec.__dict__, "type": "channel_concat"})))
    c, d = x["clip"][:, 0], x["dinov2"][:, 0]
    with torch.no_grad():
        torch.testing.assert_close(a(x), a.proj(0.3 * c + 0.7 * d))
        ti = i(x)
        assert ti.shape == (B, 2 * N, LLM) and i.num_tokens() == 2 * N
        torch.testing.assert_close(ti[:, 0::2], i.proj_clip(c))  # c1 d1 c2 d2 ...
        torch.testing.assert_close(ti[:, 1::2], i.proj_dino(d))
        torch.testing.assert_close(cc(x), cc.proj(torch.cat([c, d], -1)))
    with pytest.raises(FormatError, match="equal"):
        build_fusion(_spec("a_mof", {"clip": [1], "dinov2": [1]}, projector="mlp2x_gelu"))  # 6 vs 5 channels


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_every_fusion_runs_and_trains(kind):
    cls = FUSIONS[kind]
    layers = {r: [1, 2] for r in cls.roles} if cls.roles else {"clip": [1, 2]}
    if kind == "a_mof":
        spec = FusionSpec(type=kind, layers=layers, dims={"clip": DC, "dinov2": DC}, grid=(2, 2), llm_hidden=LLM,
                          projector="mlp2x_gelu")
        x = {"clip": torch.randn(B, 2, N, DC), "dinov2": torch.randn(B, 2, N, DC)}
    else:
        spec = _spec(kind, layers, projector=cls.default_projector)
        x = {k: v[:, :2] for k, v in _feats(lc=2, ld=2).items() if k in layers}
    f = _randomise(build_fusion(spec))
    out = f(x)
    assert out.shape == (B, f.num_tokens(), LLM)
    out.square().mean().backward()
    no_grad = [n for n, p in f.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad


def test_layer_selectors():
    assert hidden_state_indices("last:6", 24) == list(range(19, 25))  # COMM's DINOv2 layers 19-24
    assert hidden_state_indices("last:6", 3) == [1, 2, 3]  # tiny DINOv2: last min(6, L)
    assert hidden_state_indices("all", 24) == list(range(1, 25))
    assert hidden_state_indices("half", 24) == list(range(13, 25))
    assert hidden_state_indices(-2, 24) == [23] and hidden_state_indices([-1, 3], 4) == [4, 3]
    assert hidden_state_indices("19-24", 24) == list(range(19, 25))
    with pytest.raises(FormatError, match="out of range"):
        hidden_state_indices(30, 24)
    with pytest.raises(FormatError, match="selector"):
        hidden_state_indices("middle", 24)
