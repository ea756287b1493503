"""The PyTorch/transformers side of `longrl bench model`: the same shapes and measurements
on the same machine, so longrl's figures can be read as ratios.

    pip install torch transformers
    python3 examples/bench/transformers_bench.py --preset tiny
    python3 examples/bench/transformers_bench.py --preset smollm2-135m --vocab 49152
    python3 examples/bench/transformers_bench.py --preset smollm2-135m --vocab 49152 --json
    python3 examples/bench/transformers_bench.py --preset qwen2-0.5b --vocab 151936 --device cuda \
        --precision bf16-mixed --peak-tflops 989

With --json it prints one JSON object whose keys (`prefill`, `decode_batch1`, `decode_group`,
`train`, in tokens/s) are those of `longrl bench model --json`; examples/bench/compare_model.py
runs both and prints the ratios.

Random weights (the shapes are what matters); torch uses as many threads as longrl's CPU
backend (all cores) unless --threads is given. `--precision bf16-mixed` does what longrl's
does: inference through a bf16 copy of the weights, training under bf16 autocast over the f32
weights (log-softmax in f32). On CUDA every timing waits for the device (synchronize).
"""

import argparse
import copy
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

PRESETS = {
    "tiny": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=768, tie_word_embeddings=True)),
    "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                                          num_key_value_heads=3, intermediate_size=1536,
                                                          tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                                        num_key_value_heads=2, intermediate_size=4864,
                                                        tie_word_embeddings=True, rope_theta=1000000.0)),
}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - start


def train_flops_per_token(params, config, seq):
    """Model FLOPs of one training token, counted as `longrl bench model` counts them: 6 per
    matmul parameter (all parameters, the embedding tied to the LM head) plus the causal
    attention's 12 * layers * width * seq / 2."""
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    return 6.0 * params + 6.0 * config.num_hidden_layers * width * seq


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16-mixed"])
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for the model FLOP utilisation")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config_cls, model_cls, shape = PRESETS[args.preset]
    config = config_cls(vocab_size=args.vocab, max_position_embeddings=131072, **shape)
    device = torch.device(args.device)
    model = model_cls(config).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    mixed = args.precision == "bf16-mixed"
    generator = copy.deepcopy(model).to(torch.bfloat16) if mixed else model
    prompt = torch.tensor([[(i * 7919 + 13) % args.vocab for i in range(args.prompt_len)]], device=device)
    gen = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        generator.generate(prompt[:, :16], max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
        _, prefill = timed(lambda: generator(prompt, use_cache=True, logits_to_keep=1))
        _, one = timed(lambda: generator.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                  **gen))
        _, group = timed(lambda: generator.generate(prompt, max_new_tokens=args.new_tokens,
                                                    min_new_tokens=args.new_tokens, num_return_sequences=args.group,
                                                    **gen))
    del generator
    figures = {
        "tool": "transformers",
        "preset": args.preset,
        "vocab": args.vocab,
        "device": args.device,
        "precision": args.precision,
        "torch": torch.__version__,
        "threads": args.threads,
        "parameters": params,
        "prefill": args.prompt_len / prefill,
        "decode_batch1": (args.new_tokens - 1) / max(one - prefill, 1e-9),
        # transformers repeats the prompt for each sequence of a group: its prefill is G prompts.
        "decode_group": args.group * (args.new_tokens - 1) / max(group - args.group * prefill, 1e-9),
        "group_wall_s": group,
    }
    if not args.json:
        print(f"transformers bench: preset {args.preset}, vocab {args.vocab}, torch {torch.__version__}, "
              f"{args.device}, {args.precision}, {args.threads} threads")
        print(f"  parameters {params}")
        print(f"  prefill {args.prompt_len} tokens, batch 1: {figures['prefill']:.1f} tokens/s")
        print(f"  decode, batch 1: {figures['decode_batch1']:.1f} tokens/s")
        print(f"  decode, group of {args.group} (prompt repeated): {figures['decode_group']:.1f} tokens/s")
        print(f"  group of {args.group}: prompt + {args.new_tokens} tokens each, wall: {group:.2f} s")

    model.train()
    ids = torch.tensor([[(i * 31 + b * 17 + 5) % args.vocab for i in range(args.train_seq)] for b in range(args.train_batch)],
                       device=device)
    half = args.train_seq // 2

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            logits = model(ids).logits[:, half - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, half:].unsqueeze(-1))
        (-logp.sum()).backward()
        model.zero_grad(set_to_none=True)

    step()
    times = sorted(timed(step)[1] for _ in range(3))
    figures["train"] = args.train_batch * args.train_seq / times[1]
    figures["train_gflops"] = figures["train"] * train_flops_per_token(params, config, args.train_seq) / 1e9
    if args.peak_tflops:
        figures["mfu_percent"] = figures["train_gflops"] / args.peak_tflops / 10.0
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"  forward+backward, batch {args.train_batch} x {args.train_seq} tokens: {figures['train']:.1f} tokens/s")
        print(f"  forward+backward model FLOP rate: {figures['train_gflops']:.1f} GFLOP/s")
        if args.peak_tflops:
            print(f"  model FLOP utilisation: {figures['mfu_percent']:.2f} %")


if __name__ == "__main__":
    main()
