"""The official `openai` Python package against rrt's OpenAI-compatible HTTP API.

Usage: openai_client.py BASE_URL API_KEY PROMPT
Runs completions and chat, streamed and not, with and without usage, seeded sampling, stop
strings, bad requests and a stream closed mid-way; prints one JSON object of what it saw (the
Rust test asserts on it, and compares the greedy text with the gRPC API's).
"""

import json
import sys

import openai


def main() -> None:
    base_url, key, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    out = {}

    out["models"] = [m.id for m in client.models.list().data]
    model = out["models"][0]

    c = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    out["completion"] = {
        "text": c.choices[0].text,
        "finish_reason": c.choices[0].finish_reason,
        "usage": c.usage.model_dump(),
        "object": c.object,
    }

    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
    )
    out["completion_stream"] = {
        "text": "".join(ch.choices[0].text for ch in chunks if ch.choices),
        "finish_reasons": [ch.choices[0].finish_reason for ch in chunks if ch.choices],
        "usage_chunks": sum(1 for ch in chunks if ch.usage is not None),
    }

    chunks = list(
        client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    out["completion_stream_usage"] = {
        "text": "".join(ch.choices[0].text for ch in chunks if ch.choices),
        "last_choices": len(last.choices),
        "usage": last.usage.model_dump() if last.usage else None,
        "usage_chunks": sum(1 for ch in chunks if ch.usage is not None),
    }

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt},
    ]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    out["chat"] = {
        "role": r.choices[0].message.role,
        "content": r.choices[0].message.content,
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump(),
        "object": r.object,
    }
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_choices = [ch for ch in chunks if ch.choices]
    out["chat_stream"] = {
        "first_role": with_choices[0].choices[0].delta.role,
        "content": "".join(ch.choices[0].delta.content or "" for ch in with_choices),
        "finish_reason": with_choices[-1].choices[0].finish_reason,
        "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None,
    }

    seeded = [
        client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0.9, seed=seed
        ).choices[0].text
        for seed in (7, 7, 8)
    ]
    out["seeded"] = seeded

    greedy = out["completion"]["text"]
    words = greedy.split()
    stop = words[1] if len(words) > 1 else words[0]
    s = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, stop=[stop]
    )
    out["stop"] = {"stop": stop, "text": s.choices[0].text, "finish_reason": s.choices[0].finish_reason}

    def error_of(call):
        try:
            call()
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            return {"status": e.status_code, "message": body.get("message", ""), "type": body.get("type")}
        return None

    out["bad_request"] = error_of(
        lambda: client.completions.create(model=model, prompt=prompt, max_tokens=0)
    )
    out["n2"] = error_of(
        lambda: client.completions.create(model=model, prompt=prompt, max_tokens=4, n=2)
    )
    out["bad_quality"] = error_of(
        lambda: client.completions.create(
            model=model, prompt=prompt, max_tokens=4, extra_body={"rrt_quality": "best"}
        )
    )
    full = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"rrt_quality": "full"}
    )
    out["full_quality_text"] = full.choices[0].text
    out["unknown_model"] = error_of(
        lambda: client.completions.create(model="no-such-model", prompt=prompt, max_tokens=4)
    )
    nokey = openai.OpenAI(base_url=base_url, api_key="wrong-key-0123456789", max_retries=0)
    out["bad_key"] = error_of(
        lambda: nokey.completions.create(model=model, prompt=prompt, max_tokens=4)
    )

    # A stream closed after a few chunks: the worker must cancel the rest.
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=400, temperature=0, stream=True
    )
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            break
    stream.close()
    out["closed_after"] = seen

    print(json.dumps(out))


if __name__ == "__main__":
    main()
