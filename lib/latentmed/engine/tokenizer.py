"""A local byte-level BPE tokenizer that holds Qwen2.5-VL's special tokens and the latent tokens.

Real checkpoints ship their own tokenizer; the testbed needs one that can be built offline.
It keeps Qwen2.5-VL's special tokens in Qwen's order right after the BPE vocabulary, then the
tokens each method adds, in the order each method's training code adds them (Monet, LVR,
Mirage, then CapImagine's text markers). Code never hard-codes ids: `LatentSpec` reads them
from the tokenizer by name, so the same loading code serves tiny and 7B checkpoints.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Qwen2.5-VL's added tokens, in id order (151643 ... 151664 in the real vocabulary).
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
# Added by each method on top of Qwen's tokenizer, in the order of its `add_tokens` call.
METHOD_TOKENS = {
    "monet": ["<abs_vis_token_pad>", "<abs_vis_token>", "</abs_vis_token>", "<observation>", "</observation>"],
    "lvr": ["<|lvr_start|>", "<|lvr|>", "<|lvr_latent_end|>", "<|lvr_end|>"],
    "mirage": ["<|latent_pad|>", "<|latent_start|>", "<|latent_end|>"],
    "capimagine": ["<imagine>", "</imagine>"],
}

# Qwen2-VL style chat template: string or list content, images become vision markers + one pad.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PROMPT_TEXT = [
    "You are a helpful assistant.",
    "You are a helpful multimodal assistant. You are required to answer the question based on the image provided. Put your final answer in \\boxed{}.",
    "Answer with the option's letter from the given choices directly.",
    "Put your final answer within \\boxed{}.",
    "What colour is the star? Where is the red circle relative to the blue square?",
    "How many red objects are there? Which digit is inside the red square?",
    "Options: A. red B. green C. blue D. yellow Answer: <answer> A </answer> The answer is",
    "the star is red. the red circle is left of the blue square. there are three red objects.",
    "the red square holds the digit seven. Question: Please select the correct answer from the options above.",
    "The choices are listed below: (A) (B) (C) (D) (E) Select the best answer to the above multiple-choice question based on the image. Respond with only the letter (A, B, C, D, or E) of the correct option. The best answer is:",
]


def corpus(words=()) -> list[str]:
    """Sentences that make each of `words` and the option letters (with and without a leading
    space) one token; the testbed passes its vocabulary (`latentmed.testbed.VOCABULARY`)."""
    words = [*dict.fromkeys([*words, *"ABCDE"])]
    lines = list(PROMPT_TEXT)
    lines += [f"{a} {b}" for a, b in product(words, words)]
    lines += [f"{w}\n{w}.{w}?" for w in words]
    return lines


def build_tokenizer(words=(), vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the BPE on `corpus(words)` and wrap it with Qwen's special tokens and chat template;
    a vocabulary too small to make every word one token is an error naming the words."""
    if isinstance(words, str) or not all(isinstance(w, str) and w.strip() and w == w.strip() for w in words):
        raise ValueError(f"words: expected a list of non-empty words without surrounding spaces, got {words!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 256:
        raise ValueError(f"vocab_size: must be an integer >= 256 (the byte alphabet), got {vocab_size!r}")
    fast = _train(words, vocab_size)
    split = [w for w in [*words, *"ABCDE"] if len(fast.encode(w)) != 1 or len(fast.encode(" " + w)) != 1]
    if split:
        raise ValueError(f"vocab_size={vocab_size}: too small to make {', '.join(map(repr, split[:5]))} one token "
                         "each (with and without a leading space); use a larger vocab_size")
    return fast


def _train(words, vocab_size: int) -> PreTrainedTokenizerFast:
    """The BPE trained on `corpus(words)`, wrapped with Qwen's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(words) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None)
    # Special tokens sit right after the BPE vocabulary, in Qwen's order, as in the real layout.
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    fast.add_tokens([t for group in METHOD_TOKENS.values() for t in group], special_tokens=True)
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder (tiny or real) with a clear error when it is missing or broken."""
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer_config.json in this folder")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types; name the folder
        raise ValueError(f"{path}: cannot load tokenizer ({type(exc).__name__}: {exc})") from exc
