"""Which fact each answer of a retrieval evaluation names: the asked fact's city, a distractor
fact's city, a city no fact of the document names, or no answer at all.

    python3 scripts/answer_sources.py RUN/held_out.jsonl RUN/sft/items.jsonl RUN/rl/items.jsonl

The first file holds the held-out records as `write_jsonl` writes them (context, question,
answers); each further file is an `evaluate` stage's items.jsonl. Only `synthetic` retrieval
records are read (facts "The <colour> <object> is kept in <city>."). For each evaluation
and length bucket it prints the counts and, among the answers that name one of the
document's facts, the share naming the asked one: about 1 / (1 + distractors) when the model
finds the facts but cannot tell which one the question asks for (binding at chance).
Standard library only.
"""

import collections
import json
import math
import re
import sys

FACT = re.compile(r"The (\S+) (\S+) is kept in ([^.\s]+)\.")
ANSWER = re.compile(r"the answer is ([^.\s]+)", re.IGNORECASE)
KINDS = ["asked fact", "distractor fact", "no fact's city", "no answer"]


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answer_source(record, response):
    """One of KINDS for a response to a retrieval record."""
    found = ANSWER.search(response)
    if not found:
        return "no answer"
    city = found.group(1)
    if city in record["answers"]:
        return "asked fact"
    if any(fact_city == city for _, _, fact_city in FACT.findall(record["context"])):
        return "distractor fact"
    return "no fact's city"


def tally(records, items):
    """{bucket: Counter of KINDS} over every sampled response of the evaluation."""
    by_bucket = collections.defaultdict(collections.Counter)
    for item in items:
        record = records.get(item["id"])
        if record is None or not record.get("data_source", "").endswith("retrieval"):
            continue
        for response in item["responses"]:
            by_bucket[item["bucket"]][answer_source(record, response)] += 1
    return by_bucket


def binding(counts):
    """Share of fact-naming answers that name the asked fact, with a 95% normal interval."""
    named = counts["asked fact"] + counts["distractor fact"]
    if named == 0:
        return "-"
    share = counts["asked fact"] / named
    half = 1.96 * math.sqrt(share * (1 - share) / named)
    return f"{100 * share:.1f}% +-{100 * half:.1f}"


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    records = {r["id"]: r for r in load_jsonl(argv[1])}
    print("| evaluation | length | " + " | ".join(KINDS) + " | asked / fact-naming |")
    print("|---" * (len(KINDS) + 3) + "|")
    for path in argv[2:]:
        for bucket, counts in sorted(tally(records, load_jsonl(path)).items()):
            cells = " | ".join(str(counts[k]) for k in KINDS)
            print(f"| {path} | {bucket} | {cells} | {binding(counts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
