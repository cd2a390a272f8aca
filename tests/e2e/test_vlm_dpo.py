"""`prefalign dpo` on a tiny Qwen2-VL with data in the issue's layout: step-by-step parity with TRL 1.16's
DPOTrainer (same model, same processor), the LoRA adapter reloaded with peft onto the base VLM, resume,
precomputed reference log-probs and the reference modes.

TRL only takes its vision path when the dataset has a top-level `images` column (given the issue's layout, with
the image inside the content parts, it silently trains on the image placeholder tokens without pixels), so TRL is
fed the equivalent layout: the images in an `images` column, the user text as a string. TRL's
`prepare_multimodal_messages` puts the image part back before the text, which renders the same prompt.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText

from helpers import run_cli
from prefalign.commands.chat import run_chat
from prefalign.commands.eval import evaluate
from prefalign.config import ChatConfig, DPOConfig, EvalConfig
from prefalign.data.load import load_pairs
from prefalign.errors import PrefalignError
from prefalign.model.load import load_processing
from prefalign.stages.dpo import pair_metrics
from prefalign.train.loop import shuffled_groups

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

COMPARED = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "grad_norm")
STEPS = ("--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3",
         "--lr_scheduler_type", "constant", "--save_steps", "0")


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def trl_layout(rows: list[dict], data_dir: Path) -> list[dict]:
    """The same pairs as TRL's vision path wants them: images in an `images` column, string contents."""
    out = []
    for row in rows:
        system, user = row["prompt"]
        out.append({
            "images": [Image.open(data_dir / p["image"]).convert("RGB") for p in user["content"] if p["type"] == "image"],
            "prompt": [system, {"role": "user", "content": "".join(p["text"] for p in user["content"]
                                                                    if p["type"] == "text")}],
            "chosen": row["chosen"], "rejected": row["rejected"],
        })
    return out


def trl_metrics(model_dir: Path, rows: list[dict], out: Path) -> list[dict]:
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    _, processor = load_processing(DPOConfig(model_name_or_path=str(model_dir)))
    args = TRLConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                     lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"], logging_steps=1, report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, train_sampling_strategy="sequential",
                     save_strategy="no", seed=0, max_length=None, dataloader_num_workers=0, disable_dropout=True)
    trainer = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(model_dir),
                         ref_model=AutoModelForImageTextToText.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=processor)
    assert trainer._is_vision_dataset
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_dpo_on_a_vlm_matches_trl_step_by_step(tiny_vlm_dir, vlm_pairs_file, tmp_path):
    """Full fine-tuning, vision tower trained too (TRL freezes nothing); our default layout (each image-bearing prompt
    once per pair, the vision tower once per image) against TRL's padded rows (each image twice)."""
    out = tmp_path / "ours"
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, out, *STEPS, "--freeze_vision_tower", "false") == 0
    ours = records(out)
    loaded = tmp_path / "ref_model"  # the reference loaded from disk instead of copied: the same run
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, loaded, *STEPS, "--freeze_vision_tower", "false",
                   "--ref_model_name_or_path", tiny_vlm_dir) == 0
    assert [r["loss"] for r in records(loaded)] == pytest.approx([r["loss"] for r in ours], abs=1e-7)

    rows = [json.loads(line) for line in vlm_pairs_file.read_text().splitlines()]
    order = [i for g in shuffled_groups(len(rows), 2, seed=42, epoch=0) for i in g]  # our sampler's order
    theirs = trl_metrics(tiny_vlm_dir, trl_layout([rows[i] for i in order], vlm_pairs_file.parent), tmp_path / "trl")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        for key in COMPARED:
            # measured: log-probs within 4e-6 (fp32 sums of ~10 tokens), everything else within 1e-8
            assert a[key] == pytest.approx(b[key], rel=0, abs=1e-5 if key.startswith("logps") else 1e-6), (a["step"], key)
    assert ours[1]["rewards/margins"] != 0.0  # the second step compares trained weights, not two copies


def test_lora_adapter_reloads_onto_the_base_vlm(tiny_vlm_dir, vlm_pairs_file, tmp_path):
    """The done-when case: LoRA on the language model (vision tower frozen), the adapter reloaded with peft onto the
    base VLM gives the trained policy's numbers (the run's final evaluation on the same pairs)."""
    from peft import PeftModel

    out = tmp_path / "lora"
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, out, *STEPS, "--use_peft", "--lora_r", "4",
                   "--learning_rate", "1e-2", "--eval_dataset_name", vlm_pairs_file) == 0
    final_eval = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r][-1]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "language_model" in adapter["target_modules"] and (out / "processor_config.json").is_file()

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    adapted = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert adapted and not any("visual" in n for n in adapted)  # no adapter in the vision tower
    cfg = DPOConfig(model_name_or_path=str(tiny_vlm_dir), dataset_name=str(vlm_pairs_file), output_dir=str(out),
                    per_device_eval_batch_size=8)
    tokenizer, processor = load_processing(DPOConfig(model_name_or_path=str(out)))
    metrics = pair_metrics(model, None, tokenizer, load_pairs(cfg)[0], cfg, processor)
    # `prefalign eval` reloads the adapter the same way (its base from adapter_config.json, the processor beside it)
    evaluated = evaluate(EvalConfig(model_name_or_path=str(out), dataset_name=str(vlm_pairs_file)))["metrics"]
    for key in ("eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins"):
        assert metrics[key] == pytest.approx(final_eval[key], rel=1e-5, abs=1e-6), key
        assert evaluated[key] == pytest.approx(final_eval[key], rel=1e-5, abs=1e-6), key
    assert abs(metrics["eval_rewards/margins"]) > 1e-4  # the adapter changed the model
    with pytest.raises(PrefalignError, match="answering image prompts is not supported yet"):
        evaluate(EvalConfig(model_name_or_path=str(out), dataset_name=str(vlm_pairs_file), num_samples=1))

    # chat: /image attaches an image part; the reply is generated with the image's tokens and pixels
    image = vlm_pairs_file.parent / "images" / "img0.png"
    lines = iter([f"/image {image}", "what is in this image", "/exit"])
    history = run_chat(ChatConfig(model_name_or_path=str(out), max_new_tokens=4), input_fn=lambda _: next(lines),
                       output=io.StringIO())
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert [p["type"] for p in history[0]["content"]] == ["image", "text"] and isinstance(history[1]["content"], str)


def test_resume_and_precomputed_reference_reproduce_the_run(tiny_vlm_dir, vlm_pairs_file, tmp_path, monkeypatch):
    """4 steps straight; the same resumed from step 2; the same with reference log-probs precomputed (the image
    pixels are part of the cache key) and gradient checkpointing -- all three give the same curve."""
    monkeypatch.setenv("PREFALIGN_CACHE_DIR", str(tmp_path / "cache"))
    flags = ("--per_device_train_batch_size", "2", "--max_steps", "4", "--learning_rate", "1e-3", "--use_peft",
             "--lora_r", "4")
    straight, resumed, cached = tmp_path / "straight", tmp_path / "resumed", tmp_path / "cached"
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, straight, *flags, "--save_steps", "0") == 0
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, resumed, *flags, "--save_steps", "2") == 0
    (resumed / "metrics.jsonl").unlink()
    for f in resumed.glob("adapter_*"):
        f.unlink()
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, resumed, *flags, "--save_steps", "2",
                   "--resume_from_checkpoint", resumed / "checkpoint-2") == 0
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, cached, *flags, "--save_steps", "0",
                   "--precompute_ref_log_probs", "--gradient_checkpointing") == 0
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1
    # the trained adapter continued as policy and, frozen, as reference: they agree at the first step
    continued = tmp_path / "continued"
    assert run_cli("dpo", tiny_vlm_dir, vlm_pairs_file, continued, "--max_steps", "1", "--peft_adapter_path",
                   straight) == 0
    assert records(continued)[0]["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert records(continued)[0]["logps/chosen"] != pytest.approx(records(straight)[0]["logps/chosen"], abs=1e-3)
    a, b, c = records(straight), records(resumed), records(cached)
    assert [r["step"] for r in b] == [3, 4]
    for key in ("loss", "logps/chosen", "rewards/margins"):
        assert [r[key] for r in a[2:]] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-7), key
        assert [r[key] for r in a] == pytest.approx([r[key] for r in c], rel=1e-5, abs=1e-7), key


def test_images_with_a_text_model_are_a_one_line_error(tiny_model_dir, vlm_pairs_file, tmp_path, capsys):
    from helpers import VLM_TEMPLATE

    parts_template = tmp_path / "parts.jinja"  # a text model whose template renders parts: still no processor
    parts_template.write_text(VLM_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>"))
    cases = [((), "the row has an image part, but the chat template renders only string contents"),
             (("--chat_template", parts_template), "the row has an image part, but there is no image processor")]
    for extra, message in cases:
        assert run_cli("dpo", tiny_model_dir, vlm_pairs_file, tmp_path / "out", "--max_steps", "1", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{vlm_pairs_file}:1" in err[0] and message in err[0], err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
