"""The OpenAI-compatibility suite: real clients (the official `openai` library, LangChain,
litellm) against a real securerun server. Run by tests/compat.rs with the servers' addresses
and tokens in the environment; every check raises on failure.

    COMPAT_LLM=host:port COMPAT_LLM_TOKEN=... COMPAT_ENC=host:port COMPAT_ENC_TOKEN=... python suite.py
"""

import base64
import json
import os
import struct
import sys

import jsonschema
import openai

LLM = f"http://{os.environ['COMPAT_LLM']}/v1"
LLM_TOKEN = os.environ["COMPAT_LLM_TOKEN"]
ENC = f"http://{os.environ['COMPAT_ENC']}/v1"
ENC_TOKEN = os.environ["COMPAT_ENC_TOKEN"]
MODEL = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

passed = []


def check(name):
    def wrap(f):
        f()
        passed.append(name)
        print("ok", name, flush=True)
        return f

    return wrap


llm = openai.OpenAI(base_url=LLM, api_key=LLM_TOKEN, max_retries=0)
enc = openai.OpenAI(base_url=ENC, api_key=ENC_TOKEN, max_retries=0)


@check("openai: chat")
def _():
    r = llm.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].message.content, r
    assert r.usage.completion_tokens > 0


@check("openai: stream with usage")
def _():
    chunks = list(
        llm.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0, chunks[-1]


@check("openai: JSON mode")
def _():
    r = llm.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}], temperature=0,
        max_tokens=100, response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict), r


@check("openai: JSON schema")
def _():
    for prompt in ["Describe a person.", "Who wrote Hamlet?", "Invent a character for a novel."]:
        r = llm.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0.7, seed=3,
            max_tokens=100,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "strict": True, "schema": PERSON}},
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


@check("openai: parse with a pydantic model")
def _():
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        country: str

    r = llm.chat.completions.parse(model=MODEL, messages=QUESTION, temperature=0, max_tokens=60,
                                   response_format=City)
    assert isinstance(r.choices[0].message.parsed, City), r


@check("openai: tools with a round trip")
def _():
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # One call: a 135M model given the choice repeats its call until the budget runs out.
    r = llm.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                    tool_choice="required", parallel_tool_calls=False,
                                    temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"})
    r = llm.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                    tool_choice="none", temperature=0, max_tokens=30)
    assert r.choices[0].message.content, r


@check("openai: streamed tool calls")
def _():
    calls = {}
    for c in llm.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, temperature=0, max_tokens=60, stream=True,
    ):
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(d.index, ["", ""])
            entry[0] += d.function.name or ""
            entry[1] += d.function.arguments or ""
    assert calls and all(n == "get_weather" and json.loads(a) for n, a in calls.values()), calls


@check("openai: logprobs")
def _():
    r = llm.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5,
                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


@check("openai: legacy completions with a list of prompts")
def _():
    prompts = ["The capital of France is", "One, two, three,"]
    r = llm.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1], r
    alone = [llm.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=4)
             .choices[0].text for p in prompts]
    assert [c.text for c in r.choices] == alone, (r, alone)


@check("openai: an unsupported field is a 400 naming it")
def _():
    try:
        llm.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2,
                                    extra_body={"prediction": {"type": "content", "content": "x"}})
    except openai.BadRequestError as e:
        assert e.body["param"] == "prediction", e.body
    else:
        raise AssertionError("accepted")


@check("openai: embeddings float and base64")
def _():
    texts = ["A man is eating food.", "A man is eating a piece of bread."]
    f = enc.embeddings.create(model=EMBED, input=texts)
    a, b = f.data[0].embedding, f.data[1].embedding
    assert abs(sum(x * y for x, y in zip(a, b)) - 0.7553) < 0.001
    raw = enc.embeddings.create(model=EMBED, input=texts[:1], encoding_format="base64")
    decoded = raw.data[0].embedding
    if isinstance(decoded, str):
        decoded = list(struct.unpack(f"<{len(base64.b64decode(decoded)) // 4}f", base64.b64decode(decoded)))
    assert max(abs(x - y) for x, y in zip(decoded, a)) < 1e-6


@check("openai: embeddings dimensions")
def _():
    try:
        enc.embeddings.create(model=EMBED, input="x", dimensions=8)
    except openai.BadRequestError as e:
        # MiniLM was not trained for truncation: refused by name, never silently ignored.
        assert e.body["param"] == "dimensions", e.body
    else:
        raise AssertionError("accepted")


@check("openai: models list and retrieve")
def _():
    assert [m.id for m in llm.models.list()] == [MODEL]
    assert llm.models.retrieve(MODEL).id == MODEL
    try:
        llm.models.retrieve("gpt-4o")
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("found")


@check("langchain: with_structured_output")
def _():
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=LLM, api_key=LLM_TOKEN, model=MODEL, temperature=0, max_tokens=100,
                      max_retries=0)
    schema = {"title": "Person", "description": "A person", **PERSON}
    out = chat.with_structured_output(schema, method="json_schema").invoke("Describe a person.")
    assert out is not None, out
    jsonschema.validate(out, PERSON)


@check("langchain: bind_tools")
def _():
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=LLM, api_key=LLM_TOKEN, model=MODEL, temperature=0, max_tokens=60,
                      max_retries=0)
    msg = chat.bind_tools([WEATHER_TOOL], tool_choice="get_weather",
                          parallel_tool_calls=False).invoke("Weather in Oslo?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather", msg
    assert isinstance(msg.tool_calls[0]["args"]["city"], str), msg


@check("litellm: completion and stream")
def _():
    import litellm

    r = litellm.completion(model=f"openai/{MODEL}", api_base=LLM, api_key=LLM_TOKEN,
                           messages=QUESTION, temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].message.content, r
    text = "".join(
        c.choices[0].delta.content or ""
        for c in litellm.completion(model=f"openai/{MODEL}", api_base=LLM, api_key=LLM_TOKEN,
                                    messages=QUESTION, temperature=0, max_tokens=8, stream=True)
    )
    assert "Paris" in text, text
    e = litellm.embedding(model=f"openai/{EMBED}", api_base=ENC, api_key=ENC_TOKEN, input=["hello"])
    assert len(e.data[0]["embedding"]) == 384


print(f"compat: {len(passed)} checks passed")
