"""Config-only stand-ins of the real 8B checkpoints (no weights), for ``fuse merge --dry-run``.

Each stand-in is a directory with the real ``config.json`` and sharded safetensors files
whose *headers* list every real tensor (name, shape, dtype, offsets) while the data area
is a sparse hole (``truncate``): the files report their real size (so
:class:`~fuse.checkpoint.LazyCheckpoint`'s truncation check passes) but use almost no
disk. Reading a tensor returns zeros. Shapes come from the real architectures
instantiated on the ``meta`` device (transformers ``LlamaForCausalLM``,
``CLIPVisionModel`` ViT-L/14-336, ``ConvNextModel`` ConvNeXt-L renamed to timm/MGM keys)
and from this package's MGM/SliME modules at their real widths.

``python -m fuse.testing.standins OUT`` writes ``OUT/{llama3-8b-instruct,mgm-8b,slime-8b}``
(each with a stand-in tokenizer that has LLaMA-3's special-token ids and chat template but no real
BPE merges) and ``OUT/minigemini_slime.yaml`` (the shipped recipe pointed at them) and prints the
tensor count and bytes of each. Sizes (bf16) match the hub listings: LLaMA-3-8B-Instruct
16.06 GB, MGM-8B 17.12 GB (4 shards 4.98 + 5.00 + 4.92 + 2.22 GB on the hub).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

from ..checkpoint import INDEX_NAME, parse_size

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=128000,
                 eos_token_id=128009, attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
                 mlp_bias=False, pretraining_tp=1, rope_scaling=None, use_cache=True)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
CONVNEXT_L = dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536], patch_size=4, layer_norm_eps=1e-6)
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _shapes(module: torch.nn.Module, prefix: str = "", skip=lambda k: False) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items() if not skip(k)}


def llama_shapes(vocab_rows: int = 128256) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(LlamaConfig(**{**LLAMA3_8B, "vocab_size": vocab_rows}))
    return _shapes(m)


def clip_shapes(prefix: str = "model.vision_tower.vision_tower.") -> dict[str, tuple[int, ...]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        m = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336))
    out = {}
    for k, v in m.state_dict().items():
        if k.endswith("position_ids"):
            continue
        bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
        out[prefix + "vision_model." + bare] = tuple(v.shape)
    return out


def convnext_shapes(prefix: str = "model.vision_tower_aux.") -> dict[str, tuple[int, ...]]:
    from transformers import ConvNextConfig, ConvNextModel

    from ..encoders.convnext import hf_to_timm_key

    with torch.device("meta"):
        m = ConvNextModel(ConvNextConfig(**CONVNEXT_L))
    return {prefix + hf_to_timm_key(k, stem="vision_stem", stages="vision_stages"): tuple(v.shape)
            for k, v in m.state_dict().items() if not k.startswith("layernorm.")}


def mgm_shapes() -> dict[str, tuple[int, ...]]:
    from ..members.mgm_mining import PatchInfoMining
    from ..fusions.projectors import build_projector

    with torch.device("meta"):
        mining = PatchInfoMining(1024, sum(CONVNEXT_L["hidden_sizes"]))
        proj = build_projector("mlp2x_gelu", 1024, 4096)
    return {**llama_shapes(), **clip_shapes(), **convnext_shapes(),
            **{"model.vlm_uni_" + k: tuple(v.shape) for k, v in mining.state_dict().items()},
            **_shapes(proj, "model.mm_projector.")}


def slime_shapes(vocab_rows: int = 128257) -> dict[str, tuple[int, ...]]:
    from ..members.slime_modules import GatedProjector, LocalSampler

    with torch.device("meta"):
        proj = GatedProjector(1024, 4096, 24, 8)
        sampler = LocalSampler(1024, 144, 8)
    return {**llama_shapes(vocab_rows), **clip_shapes(), **_shapes(proj, "model.mm_projector."),
            **_shapes(sampler, "model.sampler.")}


def write_sparse_checkpoint(directory: str | os.PathLike, shapes: dict[str, tuple[int, ...]],
                            dtype: torch.dtype = torch.bfloat16, max_shard_size: str | int = "5GB") -> dict:
    """Sharded safetensors whose headers describe ``shapes`` and whose data are sparse holes.

    Returns ``{"tensors": n, "bytes": data bytes, "shards": [file sizes]}``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    limit, item = parse_size(max_shard_size), dtype.itemsize
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for k, s in shapes.items():
        n = math.prod(s) * item
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append((k, s))
        used += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, sizes, total = {}, [], 0
    for name, entries in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for k, s in entries:
            n = math.prod(s) * item
            header[k] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(s), "data_offsets": [off, off + n]}
            off += n
            weight_map[k] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(d / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            fh.truncate(8 + len(raw) + off)  # sparse: no data blocks are allocated
        sizes.append(8 + len(raw) + off)
        total += off
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"tensors": len(shapes), "bytes": total, "shards": sizes}


# -- configs (real field values; see the hub listings quoted in the recipe) -------------------------
def llama3_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA3_8B,
            "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0"}


def mgm8b_config(hd: bool = False) -> dict:
    cfg = {**llama3_config(), "_name_or_path": "model_zoo/LLM/llama-3/Meta-Llama-3-8B-Instruct",
           "architectures": ["MGMLlamaForCausalLM"], "model_type": "mgm", "eos_token_id": 128001,
           "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_global": hd,
           "image_grid": 2 if hd else 1, "image_grid_pinpoints": None, "image_size_aux": 1536 if hd else 768,
           "mm_hidden_size": 1024, "mm_hidden_size_aux": 2880, "mm_projector_lr": None,
           "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
           "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
           "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
           "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
           "optimize_vision_tower": False, "optimize_vision_tower_aux": False,
           "tokenizer_model_max_length": 4096 if hd else 2048, "tokenizer_padding_side": "right",
           "transformers_version": "4.36.2"}
    return cfg


def slime8b_config() -> dict:
    from .slime import slime_config

    cfg = slime_config({**llama3_config()}, 128257, clip_hidden=1024, resampler_dim=144)
    cfg.update(pad_token_id=128256, eos_token_id=128009, torch_dtype="bfloat16")
    return cfg


# LLaMA-3's special tokens at their real ids (128000..128255); the rest of the stand-in vocabulary
# is byte-level ASCII plus unreachable fillers, so only the special ids are meaningful.
def llama3_specials() -> dict[int, str]:
    named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
             128007: "<|end_header_id|>", 128009: "<|eot_id|>"}
    out, r = {}, 0
    for i in range(128000, 128256):
        if i in named:
            out[i] = named[i]
        else:
            out[i] = f"<|reserved_special_token_{r}|>"
            r += 1
    return out


def write_standin_tokenizer(directory: str | os.PathLike, extra: dict[int, str] | None = None) -> None:
    """A byte-level tokenizer with LLaMA-3's special-token ids and chat template (no real BPE merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import CHAT_TEMPLATE, _bytes_to_unicode

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: i for i, b in enumerate(list(range(32, 127)) + [9, 10])}
    i = len(vocab)
    while i < 128000:
        vocab[f"<|filler_{i}|>"] = i
        i += 1
    specials = {**llama3_specials(), **(extra or {})}
    for idx in sorted(specials):
        vocab[specials[idx]] = idx
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|reserved_special_token_0|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(specials[idx], special=True, normalized=False) for idx in sorted(specials)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token=(extra or {}).get(128256))
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def _write_configs(d: Path, config: dict, eos: list[int]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": eos}))


def write_standins(out: str | os.PathLike) -> dict[str, dict]:
    """Write the three stand-ins and a recipe using them; returns per-checkpoint figures."""
    out = Path(out)
    figures = {}
    for name in ("llama3-8b-instruct", "mgm-8b"):
        write_standin_tokenizer(out / name)
    write_standin_tokenizer(out / "slime-8b", {128256: "<pad>"})
    _write_configs(out / "llama3-8b-instruct", llama3_config(), [128001, 128009])
    figures["llama3-8b-instruct"] = write_sparse_checkpoint(out / "llama3-8b-instruct", llama_shapes())
    _write_configs(out / "mgm-8b", mgm8b_config(), [128001, 128009])
    figures["mgm-8b"] = write_sparse_checkpoint(out / "mgm-8b", mgm_shapes())
    _write_configs(out / "slime-8b", slime8b_config(), [128009])
    figures["slime-8b"] = write_sparse_checkpoint(out / "slime-8b", slime_shapes())
    recipe = (Path(__file__).resolve().parents[2] / "recipes" / "minigemini_slime.yaml")
    text = recipe.read_text() if recipe.is_file() else ""
    import yaml

    data = yaml.safe_load(text) if text else {"members": [{"name": "mgm", "format": "mgm"},
                                                            {"name": "slime", "format": "slime"}]}
    data["base_model"] = "llama3-8b-instruct"
    for m in data["members"]:
        m["model"] = {"mgm": "mgm-8b", "slime": "slime-8b"}.get(m.get("name") or m.get("format"), m.get("model"))
    data.setdefault("output", {})["dir"] = "fused"
    (out / "minigemini_slime.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fuse.testing.standins OUT_DIR", file=sys.stderr)
        return 2
    from ..cli_utils import user_errors
    from ..output_dir import atomic_output_dir

    @user_errors
    def write() -> dict:  # atomically; an earlier stand-ins dir is replaced, any other directory refused
        with atomic_output_dir(argv[0], force=True) as tmp:
            return write_standins(tmp)

    figs = write()
    for name, f in figs.items():
        shards = " + ".join(f"{s / 1e9:.2f}" for s in f["shards"])
        print(f"{name}: {f['tensors']} tensors, {f['bytes']:,} bytes ({f['bytes'] / 1e9:.2f} GB; shards {shards} GB)")
    print(f"recipe: {Path(argv[0]) / 'minigemini_slime.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
