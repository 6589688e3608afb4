"""The 7B path: CapImagine-style SFT of a Qwen2.5-VL checkpoint with the HF Trainer.

One device (`--lora` for one GPU, peft) or many through `accelerate launch --config_file
configs/accelerate/fsdp.yaml -m latentmed.zoo.sft ...`; tested on a tiny model with two CPU
processes. The data is the CapImagine-format JSON that `latentmed.zoo.captioner` or
`latentmed.testbed.exports.to_capimagine_sft` writes (image items named by any key the formats use).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..engine import checkpoint
from ..files import atomic_write_json, is_owned, mark_owned, replace_folder

SFT_KIND = "sft"  # marker kind of the checkpoint folders `sft` writes


def _messages(sample: dict, image_root: Path, where: str) -> tuple[list[dict], list]:
    """Chat messages (images as placeholders) and the images they show, read and checked."""
    from .captioner import _image_ref, _turns, open_image

    msgs, images = [], []
    for turn in _turns(sample, where):
        content = []
        for item in turn["content"]:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                images.append(open_image(image_root / _image_ref(item, where), f"{where} image"))
                content.append({"type": "image"})
            elif kind == "text" and isinstance(item.get("text"), str):
                content.append({"type": "text", "text": item["text"]})
            else:
                raise ValueError(f"{where}: expected a text item with 'text' or an image item, got {item!r}")
        msgs.append({"role": turn["role"], "content": content})
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn must be the assistant's")
    return msgs, images


def sft_examples(samples: list[dict], tok, processor, image_root: str | Path, source: str = "data") -> list[dict]:
    """Chat samples (CapImagine format, see `latentmed.zoo.captioner`) -> tokenised examples.

    The user turn (images + text) is the prompt; the loss covers the assistant's text only (its
    imagination and answer) and the end-of-turn token. Image items may name their file with any
    key the formats use (`image_file_name`, `image`, ...), relative to `image_root`.
    """
    from ..engine.inputs import encode

    image_root = Path(image_root)
    out = []
    for i, s in enumerate(samples):
        where = f"{source} sample {i}"
        msgs, images = _messages(s, image_root, where)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"{where}: chat template does not extend the prompt")
        enc = encode(tok, processor, full.rstrip("\n"), images)
        n_prompt = encode(tok, processor, prompt, images).input_ids.shape[1]
        ids = enc.input_ids[0]
        labels = ids.clone()
        labels[:n_prompt] = -100
        if not (labels != -100).any():
            raise ValueError(f"{where}: the assistant turn is empty; nothing to train on")
        out.append(dict(input_ids=ids, labels=labels, pixel_values=enc.pixel_values,
                        image_grid_thw=enc.image_grid_thw))
    return out


class SFTCollator:
    """Right-pads ids/labels, concatenates images; adds the attention mask and token types."""

    def __init__(self, pad_id: int, image_id: int):
        self.pad_id, self.image_id = pad_id, image_id

    def __call__(self, feats: list[dict]) -> dict:
        L = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), L), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), L), dtype=torch.long)
        for b, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = f["input_ids"], f["labels"], 1
        batch = dict(input_ids=ids, labels=labels, attention_mask=mask, mm_token_type_ids=(ids == self.image_id).int())
        pix = [f["pixel_values"] for f in feats if f["pixel_values"] is not None]
        if pix:
            batch["pixel_values"] = torch.cat(pix)
            batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in feats if f["image_grid_thw"] is not None])
        return batch


def _check_settings(**kw) -> None:
    """Training settings that the HF Trainer would take silently or fail on deep inside."""
    if not isinstance(kw["max_steps"], int) or (kw["max_steps"] < 1 and kw["max_steps"] != -1):
        raise ValueError(f"max_steps: must be -1 (use epochs) or an integer >= 1, got {kw['max_steps']!r}")
    for name in ("batch_size", "grad_accum"):
        if not isinstance(kw[name], int) or isinstance(kw[name], bool) or kw[name] < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {kw[name]!r}")
    for name in ("epochs", "lr"):
        v = kw[name]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: must be a finite number > 0, got {v!r}")


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def sft(model_path: str | Path, data: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
        lora: bool = False, lora_r: int = 16, lora_alpha: int = 32, max_steps: int = -1, epochs: float = 1.0,
        lr: float = 1e-5, batch_size: int = 1, grad_accum: int = 1, bf16: bool = False, seed: int = 0,
        freeze_vision: bool = True, save: bool = True, report: bool = True) -> dict:
    """Supervised fine-tuning of a Qwen2.5-VL checkpoint on CapImagine-format data (HF Trainer).

    The same function runs a tiny model on CPU and a 7B model on GPUs: launched plainly it
    trains on one device (`lora=True` for one GPU), launched with `accelerate launch` (e.g.
    configs/accelerate/fsdp.yaml) it trains data-parallel/FSDP. Returns the trainer's metrics.
    """
    from transformers import Trainer, TrainingArguments

    from .captioner import load_interleaved

    model_path, data, out_dir = Path(model_path), Path(data), Path(out_dir)
    _check_settings(max_steps=max_steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum)
    if save:
        _check_out(out_dir)
    samples = load_interleaved(data)  # a missing or malformed data file fails before the model loads
    # the engine's loader checks config, weights, tokenizer and preprocessor and names what is wrong
    x = checkpoint.load(model_path, method="direct", dtype=torch.bfloat16 if bf16 else torch.float32)
    tok, processor, model = x.tokenizer, x.processor, x.model
    examples = sft_examples(samples, tok, processor, image_root or data.parent, source=str(data))
    if freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    partial = out_dir.with_name(out_dir.name + ".partial")
    args = TrainingArguments(output_dir=str(partial), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=grad_accum, learning_rate=lr, max_steps=max_steps,
                             num_train_epochs=epochs, logging_steps=1, save_strategy="no", report_to=[],
                             bf16=bf16, seed=seed, data_seed=seed, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=not report, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=SFTCollator(tok.pad_token_id, model.config.image_token_id
                                                if not lora else model.base_model.model.config.image_token_id))
    result = trainer.train()
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    metrics = dict(result.metrics, world_size=trainer.args.world_size,
                   backend=str(torch.distributed.get_backend()) if dist else None,
                   losses=[h["loss"] for h in trainer.state.log_history if "loss" in h])
    if save and trainer.is_world_process_zero():
        _save(model.merge_and_unload() if lora else model, tok, processor, metrics, out_dir)
    return metrics


def _check_out(out_dir: Path) -> None:
    """The output folder may be new, empty, or an earlier result of `sft` (which it replaces);
    anything else is refused before training, so nothing is overwritten that sft did not write."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise FileExistsError(f"{out_dir}: exists and is not a folder; choose another --out")
    for folder in (out_dir, out_dir.with_name(out_dir.name + ".partial")):
        if folder.is_dir() and any(folder.iterdir()) and not is_owned(folder, SFT_KIND):
            raise FileExistsError(f"{folder}: holds files that `latentmed.zoo.sft` did not write; "
                                  "refusing to replace them: choose a new or empty --out")


def _save(model, tok, processor, metrics: dict, out_dir: Path) -> Path:
    """Write the checkpoint into `<out>.partial`, metrics last, then swap it in with renames."""
    partial = mark_owned(out_dir.with_name(out_dir.name + ".partial"), SFT_KIND)
    model.save_pretrained(partial, safe_serialization=True)
    tok.save_pretrained(partial)
    processor.save_pretrained(partial)
    atomic_write_json(partial / "sft_metrics.json", metrics)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    return replace_folder(partial, out_dir, SFT_KIND)


def main(argv=None) -> None:
    import argparse

    s = argparse.ArgumentParser(prog="python -m latentmed.zoo.sft",
                                description="CapImagine SFT of a Qwen2.5-VL checkpoint (HF Trainer; LoRA; accelerate)")
    s.add_argument("--model", required=True, help="checkpoint folder (tiny or 7B)")
    s.add_argument("--data", required=True, help="CapImagine-format JSON (latentmed.zoo.captioner, or the testbed export)")
    s.add_argument("--out", required=True)
    s.add_argument("--image-root", default=None)
    s.add_argument("--lora", action="store_true", help="LoRA on the language model's projections (peft)")
    s.add_argument("--max-steps", type=int, default=-1)
    s.add_argument("--epochs", type=float, default=1.0)
    s.add_argument("--lr", type=float, default=1e-5)
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--grad-accum", type=int, default=1)
    s.add_argument("--bf16", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    a = s.parse_args(argv)
    try:
        m = sft(a.model, a.data, a.out, a.image_root, a.lora, max_steps=a.max_steps, epochs=a.epochs, lr=a.lr,
                batch_size=a.batch_size, grad_accum=a.grad_accum, bf16=a.bf16, seed=a.seed)
    except (ValueError, OSError) as exc:  # bad input: its message names the file; no stack trace
        s.exit(1, f"{s.prog}: error: {exc}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in m.items() if k != "losses"}))


if __name__ == "__main__":
    main()
