"""The official `openai` Python client against `longrl serve` (run by tests/serve.rs).

Usage: python3 tests/openai_client.py http://127.0.0.1:PORT/v1

Checks that completions (token-id and text prompts) and chat completions honour `n`,
`logprobs` and `stream`, and that an unsupported field is refused with a 400 naming it.
Exits non-zero on the first failed check.
"""

import sys

import openai
from openai import OpenAI

PROMPT = [5, 17, 29, 41, 8, 3]


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def completions(client):
    reply = client.completions.create(
        model="tiny", prompt=PROMPT, n=3, max_tokens=6, temperature=0.9, seed=7, logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    check(len(reply.choices) == 3, f"n=3 gives {len(reply.choices)} choices")
    for choice in reply.choices:
        ids = choice.model_extra["token_ids"]
        lps = choice.logprobs.token_logprobs
        check(len(ids) == 6 and len(lps) == 6, f"six tokens and log-probs: {choice}")
        check(all(lp <= 0.0 for lp in lps), f"log-probs are at most 0: {lps}")
    check(reply.model_extra["metadata"]["weight_version"] == "default", "the weights version is named")
    texts = client.completions.create(model="tiny", prompt=["the cat", "a dog"], n=2, max_tokens=4, seed=1)
    check(len(texts.choices) == 4, f"two text prompts with n=2 give {len(texts.choices)} choices")
    print("completions: n, token ids, log-probs, text prompts: ok")
    return reply


def completions_stream(client, whole):
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, n=3, max_tokens=6, temperature=0.9, seed=7, logprobs=0, stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    texts, chunks = {}, 0
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    check(chunks > 3, f"a stream of chunks, not one reply: {chunks}")
    for choice in whole.choices:
        check(texts.get(choice.index) == choice.text, f"choice {choice.index} streamed {texts.get(choice.index)!r}, whole {choice.text!r}")
    print(f"completions stream: {chunks} chunks adding up to the whole reply: ok")


def chat(client):
    messages = [{"role": "user", "content": "Where is Oslo?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=5, seed=4, logprobs=True, top_logprobs=2)
    check(len(reply.choices) == 3, f"chat n=3 gives {len(reply.choices)} choices")
    for choice in reply.choices:
        content = choice.logprobs.content
        check(content and len(content) <= 5, f"one log-prob per token: {choice}")
        check(all(len(t.top_logprobs) == 2 for t in content), "two alternatives per token")
    stream = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=5, seed=4, logprobs=True, top_logprobs=2, stream=True)
    texts, scored = {}, 0
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.logprobs and choice.logprobs.content:
                scored += len(choice.logprobs.content)
    for choice in reply.choices:
        check(texts.get(choice.index) == choice.message.content, f"chat choice {choice.index} streamed {texts.get(choice.index)!r}")
    check(scored == sum(len(c.logprobs.content) for c in reply.choices), "streamed log-probs match")
    print("chat: n, logprobs, top_logprobs, stream: ok")


def refusals(client):
    for kwargs, field in [
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ]:
        try:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, **kwargs)
        except openai.BadRequestError as e:
            check(field in str(e), f"the 400 names {field}: {e}")
        else:
            raise AssertionError(f"{field} was accepted")
    try:
        client.completions.create(model="another", prompt=PROMPT, max_tokens=2)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("an unknown model name was accepted")
    print("unsupported fields refused by name: ok")


def main():
    client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
    check([m.id for m in client.models.list()] == ["tiny"], "the served model is listed")
    whole = completions(client)
    completions_stream(client, whole)
    chat(client)
    refusals(client)
    print("all checks passed")


if __name__ == "__main__":
    main()
