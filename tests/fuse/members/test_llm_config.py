"""``llm_config_from`` builds plain dicts; transformers' LlamaConfig is the reference it must agree with."""

import pytest
from transformers import LlamaConfig

from fuse.members.base import llm_config_from

CASES = [
    {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256},
    {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
     "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
     "eos_token_id": [128001, 128009], "max_position_embeddings": 8192, "mm_projector_type": "mlp2x_gelu",
     "mm_vision_tower": "openai/clip-vit-large-patch14-336"},
    {"hidden_size": 96, "num_attention_heads": 4, "head_dim": 32, "num_hidden_layers": 1, "tie_word_embeddings": True,
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, "rope_theta": 500000.0},
    {"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
]


@pytest.mark.parametrize("cfg", CASES)
def test_matches_llamaconfig(cfg):
    ours = llm_config_from(cfg)
    ref = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("mm_")}).to_dict()
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias", "rope_parameters"):
        assert ours[k] == ref[k], k
    assert not any(k.startswith("mm_") for k in ours)
    # and transformers reads it back to the same config
    back = LlamaConfig(**{k: v for k, v in ours.items() if k not in ("architectures", "model_type")}).to_dict()
    assert back["rope_parameters"] == ref["rope_parameters"] and back["head_dim"] == ref["head_dim"]

