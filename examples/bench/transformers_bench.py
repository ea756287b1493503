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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def median_seconds(device, fn, runs=3):
    return sorted(timed(device, fn)[1] for _ in range(runs))[runs // 2]


def train_flops_per_token(params, config, seq):
    """Model FLOPs of one training token, counted as `longrl bench model` counts them: 6 per
    matmul parameter (all parameters, the embedding tied to the LM head) plus the causal
    attention's 12 * layers * width * seq / 2."""
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    return 6.0 * params + 6.0 * config.num_hidden_layers * width * seq


def inference(generator, device, args):
    """Prefill and decode rates, after a warm-up at the timed shapes (as longrl's bench does).
    The group's prefill is timed on its own: transformers prefills the prompt once per row."""
    prompt = torch.tensor([[(i * 7919 + 13) % args.vocab for i in range(args.prompt_len)]], device=device)
    rows = prompt.repeat(args.group, 1)
    gen = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)

    def generate(new_tokens, group=1):
        return generator.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  num_return_sequences=group, **gen)

    with torch.no_grad():
        generate(2, args.group)
        generate(2)
        prefill = median_seconds(device, lambda: generator(prompt, use_cache=True, logits_to_keep=1))
        group_prefill = median_seconds(device, lambda: generator(rows, use_cache=True, logits_to_keep=1))
        _, one = timed(device, lambda: generate(args.new_tokens))
        _, group = timed(device, lambda: generate(args.new_tokens, args.group))
    return {
        "prefill": args.prompt_len / prefill,
        "decode_batch1": (args.new_tokens - 1) / max(one - prefill, 1e-9),
        "decode_group": args.group * (args.new_tokens - 1) / max(group - group_prefill, 1e-9),
        "group_wall_s": group,
    }


def training(model, device, mixed, args):
    """Forward+backward rate of the log-probs of each sequence's second half (the logits only
    where they are scored, as longrl's `score_batch`), median of three after a warm-up."""
    model.train()
    ids = torch.tensor([[(i * 31 + b * 17 + 5) % args.vocab for i in range(args.train_seq)] for b in range(args.train_batch)],
                       device=device)
    half = args.train_seq // 2

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            logits = model(ids, logits_to_keep=half + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, half:].unsqueeze(-1))
        (-logp.sum()).backward()
        model.zero_grad(set_to_none=True)

    step()
    return args.train_batch * args.train_seq / median_seconds(device, step)


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
    config = config_cls(vocab_size=args.vocab, max_position_embeddings=131072, attn_implementation="sdpa", **shape)
    device = torch.device(args.device)
    with device:  # initialised where it runs: a 0.5B model's init on the host costs seconds
        model = model_cls(config).eval()
    params = sum(p.numel() for p in model.parameters())
    mixed = args.precision == "bf16-mixed"
    generator = copy.deepcopy(model).to(torch.bfloat16) if mixed else model
    figures = {
        "tool": "transformers",
        "preset": args.preset,
        "vocab": args.vocab,
        "device": args.device,
        "precision": args.precision,
        # "highest" is true f32 products; "high" would let CUDA use TF32.
        "f32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch": torch.__version__,
        "threads": args.threads,
        "parameters": params,
    }
    figures.update(inference(generator, device, args))
    del generator
    figures["train"] = training(model, device, mixed, args)
    figures["train_gflops"] = figures["train"] * train_flops_per_token(params, config, args.train_seq) / 1e9
    if args.peak_tflops:
        figures["mfu_percent"] = figures["train_gflops"] / args.peak_tflops / 10.0
    if args.json:
        print(json.dumps(figures))
        return
    print(f"transformers bench: preset {args.preset}, vocab {args.vocab}, torch {torch.__version__}, "
          f"{args.device}, {args.precision} (f32 products: {figures['f32_matmul_precision']}), {args.threads} threads")
    print(f"  parameters {params}")
    print(f"  prefill {args.prompt_len} tokens, batch 1: {figures['prefill']:.1f} tokens/s")
    print(f"  decode, batch 1: {figures['decode_batch1']:.1f} tokens/s")
    print(f"  decode, group of {args.group} (prompt repeated): {figures['decode_group']:.1f} tokens/s")
    print(f"  group of {args.group}: prompt + {args.new_tokens} tokens each, wall: {figures['group_wall_s']:.2f} s")
    print(f"  forward+backward, batch {args.train_batch} x {args.train_seq} tokens: {figures['train']:.1f} tokens/s")
    print(f"  forward+backward model FLOP rate: {figures['train_gflops']:.1f} GFLOP/s")
    if args.peak_tflops:
        print(f"  model FLOP utilisation: {figures['mfu_percent']:.2f} %")


if __name__ == "__main__":
    main()
