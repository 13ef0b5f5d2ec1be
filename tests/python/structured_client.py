"""Structured outputs through the official `openai` package against rrt's OpenAI API.

Usage: structured_client.py BASE_URL
`response_format` json_schema (strict) on 20 varied prompts, each reply parsed and validated
with the `jsonschema` package (not the server's word), streamed and not; json_object mode;
a malformed schema; and the fields rrt does not honour, each refused with a 400 that names it.
Prints one JSON object of what it saw; the Rust test asserts on it.
"""

import json
import sys

import jsonschema
import openai

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

SUBJECTS = [
    "a retired sailor", "a young painter", "a chess champion", "a baker", "an astronaut",
    "a librarian", "a marathon runner", "a jazz pianist", "a beekeeper", "a mountain guide",
    "a student", "a famous chef", "a night nurse", "a magician", "a lighthouse keeper",
    "a physics teacher", "a surfer", "a cartographer", "a violin maker", "a gardener",
]


def main() -> None:
    base_url = sys.argv[1]
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "strict": True, "schema": PERSON},
    }
    out = {"schema_replies": [], "invalid": [], "finish_reasons": []}
    for i, subject in enumerate(SUBJECTS):
        messages = [
            {"role": "system", "content": "You describe people as JSON."},
            {"role": "user", "content": f"Describe {subject}."},
        ]
        if i % 4 == 0:
            # Every fourth streamed: the chunks joined must be the same kind of reply.
            chunks = client.chat.completions.create(
                model=model, messages=messages, response_format=fmt, temperature=0,
                max_tokens=96, stream=True,
            )
            text, finish = "", None
            for ch in chunks:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
        else:
            r = client.chat.completions.create(
                model=model, messages=messages, response_format=fmt, temperature=0,
                max_tokens=96,
            )
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        out["schema_replies"].append(text)
        out["finish_reasons"].append(finish)
        try:
            jsonschema.validate(json.loads(text), PERSON)
        except Exception as e:  # noqa: BLE001 - any failure is reported to the Rust test
            out["invalid"].append({"subject": subject, "text": text, "error": str(e)[:300]})

    r = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Give a cat's name and age as a JSON object with the keys name and age."},
        ],
        response_format={"type": "json_object"}, temperature=0, max_tokens=96,
    )
    text = r.choices[0].message.content
    try:
        out["json_object"] = {"parsed": json.loads(text), "text": text}
    except Exception as e:  # noqa: BLE001
        out["json_object"] = {"error": str(e), "text": text}

    # Tool calls: required (any tool), a named tool, auto; streamed and not.
    tools = [
        {"type": "function", "function": {
            "name": "get_weather", "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False}}},
        {"type": "function", "function": {
            "name": "add", "description": "Add two integers",
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"], "additionalProperties": False}}},
    ]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    calls = {}

    def check_call(name, args_text, finish):
        try:
            jsonschema.validate(json.loads(args_text), schemas[name])
            ok = True
        except Exception as e:  # noqa: BLE001
            ok = str(e)[:300]
        return {"name": name, "arguments": args_text, "valid": ok, "finish_reason": finish}

    for label, choice in [("required", "required"), ("named", {"type": "function", "function": {"name": "add"}})]:
        r = client.chat.completions.create(
            model=model, messages=weather, tools=tools, tool_choice=choice, temperature=0, max_tokens=96,
        )
        m = r.choices[0].message
        tc = m.tool_calls[0] if m.tool_calls else None
        calls[label] = check_call(tc.function.name, tc.function.arguments, r.choices[0].finish_reason) if tc else {"content": m.content}
        calls[label]["id"] = tc.id if tc else None
        chunks = client.chat.completions.create(
            model=model, messages=weather, tools=tools, tool_choice=choice, temperature=0, max_tokens=96,
            stream=True,
        )
        name, args, finish, pieces, content = None, "", None, 0, ""
        for ch in chunks:
            if not ch.choices:
                continue
            d = ch.choices[0].delta
            content += d.content or ""
            for t in d.tool_calls or []:
                pieces += 1
                if t.function and t.function.name:
                    name = t.function.name
                if t.function and t.function.arguments:
                    args += t.function.arguments
            finish = ch.choices[0].finish_reason or finish
        calls[label + "_stream"] = check_call(name, args, finish) if name else {"content": content}
        calls[label + "_stream"]["pieces"] = pieces
    # Several calls allowed (`parallel_tool_calls=True`: at most 8) and not (False): every call
    # validates, the streamed calls (assembled by index) equal the unstreamed ones.
    two_cities = [{"role": "user", "content": "What is the weather in Paris and in Rome? Call the tool once per city."}]
    for label, parallel in [("parallel", True), ("single", False)]:
        extra = {"parallel_tool_calls": parallel}
        r = client.chat.completions.create(
            model=model, messages=two_cities, tools=tools, tool_choice="required", temperature=0,
            max_tokens=256, **extra,
        )
        whole = [check_call(t.function.name, t.function.arguments, r.choices[0].finish_reason)
                 for t in r.choices[0].message.tool_calls or []]
        chunks = client.chat.completions.create(
            model=model, messages=two_cities, tools=tools, tool_choice="required", temperature=0,
            max_tokens=256, stream=True, **extra,
        )
        by_index, finish = {}, None
        for ch in chunks:
            if not ch.choices:
                continue
            for t in ch.choices[0].delta.tool_calls or []:
                c = by_index.setdefault(t.index, {"name": None, "arguments": "", "id": None})
                if t.id:
                    c["id"] = t.id
                if t.function and t.function.name:
                    c["name"] = t.function.name
                if t.function and t.function.arguments:
                    c["arguments"] += t.function.arguments
            finish = ch.choices[0].finish_reason or finish
        streamed = [check_call(by_index[i]["name"], by_index[i]["arguments"], finish)
                    for i in sorted(by_index)]
        calls[label] = {"whole": whole, "streamed": streamed, "indexes": sorted(by_index),
                        "ids": [c["id"] for _, c in sorted(by_index.items())]}
    r = client.chat.completions.create(
        model=model, messages=weather, tools=tools, temperature=0, max_tokens=64,
    )
    m = r.choices[0].message
    calls["auto"] = {"content": m.content, "tool_calls": len(m.tool_calls or []), "finish_reason": r.choices[0].finish_reason}
    # The answer of a call, sent back: the conversation goes on.
    first = calls["required"]
    history = weather + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": first.get("id") or "call_1", "type": "function",
            "function": {"name": first.get("name") or "get_weather", "arguments": first.get("arguments") or "{}"}}]},
        {"role": "tool", "tool_call_id": first.get("id") or "call_1", "content": "{\"temperature\": 18}"},
    ]
    r = client.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="none", max_tokens=24, temperature=0)
    calls["after_tool"] = {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason}
    out["tool_calls"] = calls

    def error_of(**kwargs):
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kwargs
            )
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            return {"status": e.status_code, "message": body.get("message", ""), "param": body.get("param")}
        return None

    out["errors"] = {
        "bad_schema": error_of(response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
        }),
        "bad_format": error_of(response_format={"type": "yaml"}),
        "tool_choice_unknown": error_of(
            tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice_without_tools": error_of(tool_choice="required"),
        "functions": error_of(extra_body={"functions": [{"name": "f"}]}),
        "logit_bias": error_of(logit_bias={"42": -100}),
        "presence_penalty": error_of(presence_penalty=0.5),
        "frequency_penalty": error_of(frequency_penalty=0.5),
        "unknown": error_of(extra_body={"frobnicate": True}),
    }
    try:
        client.completions.create(model=model, prompt="hi", max_tokens=4, extra_body={"tools": tools})
        out["errors"]["completion_tools"] = None
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        out["errors"]["completion_tools"] = {"status": e.status_code, "message": body.get("message", ""), "param": body.get("param")}
    out["neutral_ok"] = error_of(
        presence_penalty=0, logit_bias={}, user="someone",
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    ) is None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
