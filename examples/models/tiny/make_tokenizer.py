"""Trains the embedded tiny model's tokenizer: byte-level BPE, 1,024 tokens, on generated
tasks (their documents, questions and reasoning traces) and the prompt instruction, so
every word of the synthetic tasks is one token.

    cargo run --release -- run examples/models/tiny/corpus.rhai --name tiny-corpus
    pip install tokenizers
    python3 examples/models/tiny/make_tokenizer.py runs/tiny-corpus/corpus.jsonl
"""

import json
import pathlib
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = pathlib.Path(__file__).resolve().parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# The instruction of stdlib/src/prompt.rs, so prompts tokenize compactly.
INSTRUCTION = ('Find the parts of the text that answer the question, reason step by step, and end with '
               '"Therefore, the answer is" followed by the answer.')


def texts(corpus):
    for line in open(corpus, encoding="utf-8"):
        record = json.loads(line)
        yield record["context"]
        yield record["question"]
        yield record["metadata"].get("trace", "")
        yield "<text>\n" + record["context"][:200] + "\n</text>\n\n" + record["question"] + "\n\n" + INSTRUCTION
    for n in range(0, 1000):
        yield f"So {n + 1} - {n} = 1. The answer is {n}."


def main(corpus):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts(corpus), trainer=trainer)
    tokenizer.save(str(HERE / "tokenizer.json"))
    print("vocab", tokenizer.get_vocab_size())


if __name__ == "__main__":
    main(sys.argv[1])
