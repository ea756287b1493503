"""Writes the chat prompts of the GRPO step benchmark: HotpotQA questions from
examples/data/hotpotqa/sample.json, each with its ten paragraphs padded with other questions'
paragraphs to a length between --min-tokens and --max-tokens (counted with the model's chat
template, generation prompt included), in longrl's prompt layout (the document in
<text>...</text>, the question, the instruction). One JSON line per prompt:
{"id": ..., "prompt": [{"role": "user", "content": ...}], "answer": ...}, the input of both
`longrl bench grpo --prompts` and examples/bench/trl_grpo_step.py --prompts.

    ~/bench-venv/bin/python examples/bench/make_grpo_prompts.py \\
        --model ~/.cache/longrl/smollm2-135m-instruct --out runs/grpo_prompts.jsonl

Needs transformers (for the tokenizer and its chat template).
"""

import argparse
import ast
import json
import os
import sys

INSTRUCTION = 'Reason step by step, then end with "Therefore, the answer is" and the answer.'


def paragraphs(item):
    """The question's paragraphs as the document shows them: title line, then text."""
    context = item["context"]
    if isinstance(context, str):
        context = ast.literal_eval(context)
    return [f"{title}\n{''.join(sentences).strip()}" for title, sentences in context]


def user_turn(document, question):
    return f"<text>\n{document}\n</text>\n\n{question}\n\n{INSTRUCTION}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (its tokenizer and chat template count tokens)")
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--data", default=os.path.join(here, "..", "data", "hotpotqa", "sample.json"))
    parser.add_argument("--count", type=int, default=8, help="prompts to write")
    parser.add_argument("--min-tokens", type=int, default=1100)
    parser.add_argument("--max-tokens", type=int, default=1600)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.count < 1 or args.min_tokens > args.max_tokens:
        sys.exit("error: --count must be at least 1 and --min-tokens at most --max-tokens")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(args.data, encoding="utf-8") as f:
        items = json.load(f)

    def length(content):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding (not a dict)
            ids = ids["input_ids"]
        return len(ids)

    written = []
    index = 0
    while len(written) < args.count and index < len(items):
        item = items[index]
        # Targets spread evenly over [min, max].
        k = len(written)
        target = args.min_tokens + (args.max_tokens - args.min_tokens) * k // max(args.count - 1, 1)
        document = paragraphs(item)
        if length(user_turn("\n\n".join(document), item["question"])) > args.max_tokens:
            index += 1
            continue
        # Padding: the other questions' paragraphs, in order, while they fit under the target;
        # done once within 40 tokens of it.
        done = length(user_turn("\n\n".join(document), item["question"])) >= target - 40
        for other in items[index + 1:] + items[:index]:
            for extra in paragraphs(other):
                if done:
                    break
                candidate = document + [extra]
                tokens = length(user_turn("\n\n".join(candidate), item["question"]))
                if tokens <= target:
                    document = candidate
                    done = tokens >= target - 40
            if done:
                break
        content = user_turn("\n\n".join(document), item["question"])
        written.append({"id": item["_id"], "prompt": [{"role": "user", "content": content}], "answer": item["answer"],
                        "tokens": length(content)})
        index += 1
    with open(args.out, "w", encoding="utf-8") as f:
        for row in written:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(written)} prompts of {min(r['tokens'] for r in written)}-{max(r['tokens'] for r in written)} tokens to {args.out}")


if __name__ == "__main__":
    main()
