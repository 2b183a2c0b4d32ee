"""scripts/gguf_model.py: a causal LM and its tokenizer from a GGUF file. The file here is a tiny
random Llama written with the `gguf` package (a dev dependency) in llama.cpp's layout, float32
tensors and a BPE tokenizer: the path transformers takes for SmolLM2-135M's file, at a tiny size."""

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from fastmax_hf import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # as the scripts put it, run as files

import gguf_model  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 32, 2, 4, 2, 64, 128


def write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer GQA Llama (tied embeddings, no output.weight, as SmolLM2) with a 300-token byte-level
    BPE; returns some of the tensors written, by GGUF name."""
    tokenizer = data.train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog " * 20,
                                          "hello world, hello fastmax"], vocab_size=300)
    spec = json.loads(tokenizer.to_str())
    tokens = [token for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))  # id 0: <|endoftext|>
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    rng = np.random.default_rng(0)
    written = {}

    def tensor(name, *shape):
        written[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        writer.add_tensor(name, written[name])

    head_dim = HIDDEN // HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim)
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


def test_the_model_and_tokenizer_come_from_the_file(tiny_gguf):
    path, written = tiny_gguf
    model, tokenizer = gguf_model.load_gguf_model(path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT)
    assert model.dtype == torch.float32 and config._attn_implementation == "sdpa"
    # a plain float model, which trains and saves: no GGUF quantizer left attached
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not hasattr(config, "quantization_config")
    # tensors llama.cpp stores as HF does (q/k are permuted for its RoPE layout, and unpermuted on load)
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(written["token_embd.weight"]))
    assert torch.equal(model.model.layers[1].self_attn.v_proj.weight, torch.from_numpy(written["blk.1.attn_v.weight"]))
    assert len(tokenizer) == 300 and tokenizer.eos_token_id == 0
    ids = tokenizer("the quick brown fox", return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == "the quick brown fox"
    assert model(**ids).logits.shape == (1, ids["input_ids"].shape[1], 300)


def test_dtype_and_attention_are_passed_on(tiny_gguf):
    import fastmax_hf  # noqa: F401  registers "fastmax"

    model, _ = gguf_model.load_gguf_model(tiny_gguf[0], dtype=torch.bfloat16, attn_implementation="fastmax")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "fastmax"


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"--gguf_file '.*missing\.gguf': no such file"):
        gguf_model.load_gguf_model(tmp_path / "missing.gguf")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"--gguf_file '.*weights\.bin': not a \.gguf file"):
        gguf_model.load_gguf_model(other)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="does not start with the GGUF magic"):
        gguf_model.load_gguf_model(fake)
    with pytest.raises(ValueError, match=r"--teacher_gguf '.*missing\.gguf'"):
        gguf_model.load_gguf_model(tmp_path / "missing.gguf", argument="--teacher_gguf")


def test_a_missing_gguf_package_is_reported_with_how_to_get_it(monkeypatch):
    monkeypatch.setattr(gguf_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="--gguf_file needs the `gguf` package: pip install gguf"):
        gguf_model.check_gguf_package()


# --------------------------------------------------------------------------- scripts/finetune.py --gguf_file


@pytest.mark.parametrize("mode", ["swap", "distill"])
def test_finetune_converts_a_gguf_model_and_the_result_reloads_as_fastmax(tiny_gguf, tmp_path, mode):
    """swap: the file's weights in fastmax from the start; distill: from the file's weights in sdpa,
    with the file itself, in sdpa, as the teacher of the KL. Its tokenizer is the default; the
    saved model reloads with fastmax."""
    from transformers import AutoModelForCausalLM

    from conftest import load_script

    finetune = load_script(ROOT / "scripts" / "finetune.py", "finetune_script")
    path, _ = tiny_gguf
    args = ["--gguf_file", str(path), "--mode", mode, "--max_files", "20", "--seq_len", "16", "--batch_size", "2",
            "--max_steps", "4", "--eval_every", "2", "--eval_blocks", "4", "--mixed_precision", "no",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
    parsed = finetune.parse_args(args)
    assert parsed.model == str(path)  # a pretrained model, not a built-in config
    assert parsed.kd_weight == (1.0 if mode == "distill" else 0.0)
    history = finetune.main(args)
    losses = [r["train_loss"] for r in history if r.get("train_loss") is not None]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    stages = [r["stage"] for r in history if r.get("train_loss") is not None]
    assert stages == (["transfer"] + ["train"] * 3 if mode == "distill" else ["train"] * 4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="fastmax")
    assert reloaded.config.fastmax["p"] == 2 and reloaded.config.vocab_size == 300
    assert reloaded.config.num_hidden_layers == LAYERS and reloaded.config.num_key_value_heads == KV_HEADS
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_finetune_refuses_gguf_file_with_model(tiny_gguf, tmp_path, monkeypatch):
    from conftest import load_script

    finetune = load_script(ROOT / "scripts" / "finetune.py", "finetune_script")
    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    for name in ("--model_name_or_path", "--model"):  # the option and its old alias
        with pytest.raises(SystemExit, match="--gguf_file and --model_name_or_path both name the model"):
            finetune.parse_args(["--gguf_file", str(tiny_gguf[0]), name, "llama-tiny"])
    with pytest.raises(SystemExit, match=r"--gguf_file '.*missing\.gguf': no such file"):
        finetune.main(["--gguf_file", str(tmp_path / "missing.gguf"), "--output_dir", str(tmp_path / "out")])
