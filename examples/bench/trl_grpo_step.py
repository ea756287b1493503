"""Seconds per GRPO step in TRL's GRPOTrainer on the CPU: the TRL side of `longrl bench grpo`.
Both take a model directory and a JSONL of chat prompts
({"prompt": [{"role": ..., "content": ...}], "answer": ...}; examples/bench/make_grpo_prompts.py
writes one) and run the same steps: the next --prompts-per-step prompts in file order, G
(--group) samples each at temperature 1 without truncation, a reward of 1 when a response
contains the answer (case-insensitive), group-relative advantages, one update (DAPO
token-level loss, no KL term: beta = 0, so no reference model), AdamW; f32 weights.

    pip install trl        # into the venv with torch and transformers
    ~/bench-venv/bin/python examples/bench/trl_grpo_step.py \\
        --model ~/.cache/longrl/smollm2-135m-instruct --prompts runs/grpo_prompts.jsonl --steps 3 --json

A step is timed from the trainer's step begin to its end (generation, rewards, forward and
backward, optimizer). Gradient checkpointing (TRL's default) is off unless
--gradient-checkpointing, as longrl's step keeps activations too.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--prompts", required=True, help="JSONL of chat prompts")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    rows = []
    with open(args.prompts, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"prompt": row["prompt"], "answer": row.get("answer", "")})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                sys.exit(f"error: {args.prompts}:{number}: not a chat prompt: {err}")
    if not rows:
        sys.exit(f"error: {args.prompts}: no prompts")
    dataset = Dataset.from_list(rows)

    def contains_answer(completions, answer, **_):
        rewards = []
        for completion, gold in zip(completions, answer):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            rewards.append(1.0 if gold and gold.lower() in text.lower() else 0.0)
        return rewards

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started = None
            self.seconds = []

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.prompts_per_step * args.group,
            gradient_accumulation_steps=1,
            num_generations=args.group,
            max_completion_length=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            beta=0.0,
            learning_rate=args.lr,
            max_steps=args.steps,
            shuffle_dataset=False,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=args.gradient_checkpointing,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=args.seed,
        )
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        trainer = GRPOTrainer(model=model, reward_funcs=contains_answer, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()

    figures = {
        "tool": "trl",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model,
        "steps": args.steps,
        "group": args.group,
        "prompts_per_step": args.prompts_per_step,
        "new_tokens": args.new_tokens,
        "step_s": timer.seconds,
        "seconds_per_step": statistics.median(timer.seconds) if timer.seconds else None,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"trl {trl.__version__} GRPO on {args.model}: {args.prompts_per_step} prompts x {args.group} samples per step, "
              f"{args.new_tokens} new tokens, {args.threads} threads")
        for i, seconds in enumerate(timer.seconds):
            print(f"  step {i}: {seconds:.2f} s")
        print(f"  {figures['seconds_per_step']:.2f} s per step (median)")


if __name__ == "__main__":
    main()
