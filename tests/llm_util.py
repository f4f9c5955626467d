"""Tiny random-weight causal LMs (Llama, Qwen2) with a small BPE tokenizer trained on the spot, for decoder tests."""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "The capital of France is Paris, a city on the river Seine.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "Python is a programming language that lets you work quickly and integrate systems effectively.",
    "A neural network is a function made of layers of weighted sums and simple nonlinear steps.",
    "The sun rises in the east and sets in the west, every day of the year.",
    "Plants make their food from water, air and light in their green leaves.",
    "In computer science, a hash table maps keys to values in constant expected time.",
    "Regular exercise makes the heart stronger and helps people sleep better at night.",
]


def tokenizer(folder: Path):
    """A byte-level BPE tokenizer (vocab ~300) trained on TEXT, saved into ``folder`` as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return fast


def tiny_lm(folder: Path, family: str = "llama", seed: int = 0, tokenizer_files: bool = True) -> Path:
    """A 2-layer causal LM (hidden 64, 4 heads, 2 KV heads) with random weights large enough for clear argmaxes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer(folder)) if tokenizer_files else 320
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=10000.0)
    config = Qwen2Config(**common) if family == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(folder))
    return folder


def text_files(folder: Path) -> None:
    """eval.txt, calibration.txt and prompts.txt in ``folder``."""
    (folder / "eval.txt").write_text("# tiny eval text\n" + "\n".join(TEXT[:5]) + "\n")
    (folder / "calibration.txt").write_text("\n".join(TEXT[3:]) + "\n")
    (folder / "prompts.txt").write_text("The capital of France is\nOnce upon a time\nPython is\n")


def recipe(folder: Path, model: str, extra: str = "") -> Path:
    text_files(folder)
    path = folder / "recipe.yaml"
    path.write_text(f"""name: tiny-lm
model: {{hf: {model}, task: text-generation}}
data: {{eval: eval.txt, calibration: calibration.txt, prompts: prompts.txt, max_new_tokens: 8}}
{extra}""")
    return path
