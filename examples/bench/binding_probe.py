"""PyTorch twin of examples/bench/binding_probe.rhai: trains a randomly initialized Qwen2 of the
same config (transformers) on the same SFT tasks, with the loss on the response only, then
answers the held-out tasks greedily and reports pass@1 and which fact each answer quotes.

  python3 examples/bench/binding_probe.py MODEL_DIR TRAIN.jsonl HELD_OUT.jsonl [--epochs N] [--lr LR]

Needs torch and transformers (the bench venv); never part of the tests.
"""
import argparse
import json
import random
import re

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

INSTRUCTION = 'Reason step by step, then end with "Therefore, the answer is" and the answer.'
FACT = re.compile(r"The (\w+) (\w+) is kept in (\w+)\.")


def prompt_text(tokenizer, record):
    """The prompt longrl renders for a record without a prebuilt one (stdlib/src/prompt.rs)."""
    user = f"<text>\n{record['context']}\n</text>\n\n{record['question']}\n\n{INSTRUCTION}"
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def padded_batch(pairs):
    """input ids, attention mask and labels ([batch, length]; labels -100 outside the response)."""
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.zeros(len(pairs), length, dtype=torch.long)
    mask = torch.zeros(len(pairs), length, dtype=torch.long)
    labels = torch.full((len(pairs), length), -100)
    for row, (p, r) in enumerate(pairs):
        ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        mask[row, : len(p) + len(r)] = 1
        labels[row, len(p) : len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


def train(model, tokenizer, records, epochs, lr, batch):
    pairs = [(tokenizer(prompt_text(tokenizer, r))["input_ids"], tokenizer(r["trace"] + tokenizer.eos_token)["input_ids"]) for r in records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    step = 0
    for _ in range(epochs):
        random.shuffle(pairs)
        for start in range(0, len(pairs), batch):
            ids, mask, labels = padded_batch(pairs[start : start + batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)


def evaluate(model, tokenizer, records):
    """pass@1, and of the answers quoting a fact, the share quoting the asked one."""
    right = quoted = quoted_asked = 0
    with torch.no_grad():
        for record in records:
            ids = tokenizer(prompt_text(tokenizer, record), return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
            text = tokenizer.decode(out[0, ids.shape[1] :])
            answer = re.search(r"answer is (\w+)", text)
            right += bool(answer and answer[1] == record["answers"][0])
            facts = {city for _, _, city in FACT.findall(record["context"])}
            if answer and answer[1] in facts:
                quoted += 1
                quoted_asked += answer[1] == record["answers"][0]
    print(f"held-out pass@1 {right / len(records):.3f}; answers naming a fact's city {quoted}, of which the asked one {quoted_asked}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("train")
    parser.add_argument("held_out")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--rope", type=float, default=1e6)
    parser.add_argument("--init-std", type=float, default=0.02)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    config = Qwen2Config.from_pretrained(args.model_dir)
    config.rope_theta = args.rope
    model = Qwen2ForCausalLM(config)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=args.init_std)
    train(model, tokenizer, load(args.train), args.epochs, args.lr, args.batch)
    model.eval()
    evaluate(model, tokenizer, load(args.held_out))


if __name__ == "__main__":
    main()
