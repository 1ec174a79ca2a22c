"""The guard's request mapping (airgap.serve.dialects): what OpenAI and Mistral clients send, as llama-server
needs it. The same mapping is exercised end to end, with the real SDKs and engine, in tests/e2e/test_engine."""

from __future__ import annotations

from typing import Any

import pytest

from airgap.serve.dialects import MISTRAL_SAFE_PROMPT, ClientError, ModelLimits, adapt

CHAT = ModelLimits(id="chat", n_ctx=4096, parallel=4, max_tokens_default=512, max_tokens_cap=4096)
EMBED = ModelLimits(id="embed", n_ctx=512, parallel=2, max_tokens_default=1, max_tokens_cap=512, embedding=True)
MODELS = {"chat": CHAT, "embed": EMBED}
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> dict[str, Any]:
    return adapt("/v1/chat/completions", {"model": "chat", "messages": HI, **fields}, MODELS).body


def refused(path: str, document: dict[str, Any], models: dict[str, ModelLimits] = MODELS) -> ClientError:
    with pytest.raises(ClientError) as caught:
        adapt(path, document, models)
    return caught.value


def test_max_completion_tokens_becomes_the_engines_n_predict() -> None:
    body = chat(max_completion_tokens=7)
    assert body["n_predict"] == 7 and "max_completion_tokens" not in body and "max_tokens" not in body


def test_max_tokens_gets_the_plans_default_and_is_capped() -> None:
    assert chat()["n_predict"] == 512
    error = refused("/v1/chat/completions", {"model": "chat", "messages": HI, "max_tokens": 5000})
    assert error.status == 400 and error.param == "max_tokens"
    assert error.message == "Field 'max_tokens' is 5000; model 'chat' allows at most 4096 tokens per request."
    negative = refused("/v1/chat/completions", {"model": "chat", "messages": HI, "max_completion_tokens": -1})
    assert negative.message == "Field 'max_completion_tokens' must be at least 1, found -1."
    text = refused("/v1/chat/completions", {"model": "chat", "messages": HI, "max_tokens": "9"})
    assert text.message == "Field 'max_tokens' must be an integer, found '9'."


def test_n_is_kept_away_from_the_engines_alias_and_bounded_by_the_slots() -> None:
    assert "n" not in chat(n=1) and "n_cmpl" not in chat(n=1)
    assert chat(n=3)["n_cmpl"] == 3
    error = refused("/v1/chat/completions", {"model": "chat", "messages": HI, "n": 5})
    assert error.message == "Field 'n' is 5; this server returns between 1 and 4 choices per request for model 'chat'."


def test_named_tool_choice_forces_that_function() -> None:
    body = chat(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "clock"}})
    assert body["tool_choice"] == "required" and body["tools"] == [CLOCK]
    error = refused("/v1/chat/completions", {"model": "chat", "messages": HI, "tools": [WEATHER],
                                             "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert error.message == "tool_choice names the function 'nope', which is not among 'tools'."


def test_mistral_any_random_seed_and_safe_prompt() -> None:
    body = chat(tools=[WEATHER], tool_choice="any", random_seed=42, safe_prompt=True)
    assert body["tool_choice"] == "required" and body["seed"] == 42 and "random_seed" not in body
    assert body["messages"][0] == {"role": "system", "content": MISTRAL_SAFE_PROMPT}
    assert "safe_prompt" not in body
    merged = chat(messages=[{"role": "system", "content": "Be brief."}, *HI], safe_prompt=True)["messages"]
    assert merged[0]["content"] == f"{MISTRAL_SAFE_PROMPT}\n\nBe brief." and len(merged) == 2


def test_required_without_tools_and_unknown_choice_are_refused() -> None:
    assert refused("/v1/chat/completions", {"model": "chat", "messages": HI, "tool_choice": "required"}).message == (
        "tool_choice 'required' needs a non-empty 'tools' list.")
    assert refused("/v1/chat/completions", {"model": "chat", "messages": HI, "tools": [WEATHER],
                                            "tool_choice": "sometimes"}).param == "tool_choice"


def test_stream_usage_follows_the_dialect() -> None:
    openai_plain = adapt("/v1/chat/completions", {"model": "chat", "messages": HI, "stream": True}, MODELS)
    assert openai_plain.body["stream_options"] == {"include_usage": False} and not openai_plain.usage_in_last_chunk
    asked = adapt("/v1/chat/completions", {"model": "chat", "messages": HI, "stream": True,
                                           "stream_options": {"include_usage": True}}, MODELS)
    assert asked.body["stream_options"] == {"include_usage": True} and not asked.drop_usage_chunk
    mistral = adapt("/v1/chat/completions", {"model": "chat", "messages": HI, "stream": True}, MODELS,
                    mistral_client=True)
    assert mistral.body["stream_options"] == {"include_usage": True} and mistral.usage_in_last_chunk


def test_fim_goes_to_infill() -> None:
    adapted = adapt("/v1/fim/completions", {"model": "chat", "prompt": "def f(", "suffix": "return x"}, MODELS)
    assert adapted.path == "/infill"
    assert adapted.body["input_prefix"] == "def f(" and adapted.body["input_suffix"] == "return x"


def test_models_and_endpoints_must_match() -> None:
    unknown = refused("/v1/chat/completions", {"model": "gpt-4o", "messages": HI})
    assert unknown.status == 404 and unknown.code == "model_not_found"
    assert unknown.message == "The model 'gpt-4o' does not exist; this server serves: chat, embed."
    assert refused("/v1/embeddings", {"model": "chat", "input": "x"}).code == "model_not_embedding"
    assert refused("/v1/chat/completions", {"model": "embed", "messages": HI}).code == "model_not_chat"
    assert adapt("/v1/embeddings", {"model": "embed", "input": "x"}, MODELS).path == "/v1/embeddings"
    assert refused("/v1/files", {"model": "chat"}).status == 404
    assert adapt("/v1/chat/completions", {"messages": HI}, {"chat": CHAT}).model == "chat"
    assert refused("/v1/chat/completions", {"messages": HI}).code == "missing_required_parameter"


def test_malformed_messages_and_seed() -> None:
    assert refused("/v1/chat/completions", {"model": "chat", "messages": []}).param == "messages"
    assert refused("/v1/chat/completions", {"model": "chat", "messages": HI, "seed": -3}).message == (
        "Field 'seed' must be between 0 and 4294967295, found -3.")


def test_a_forced_call_on_a_template_without_tools_becomes_constrained_json() -> None:
    adapted = adapt("/v1/chat/completions", {"model": "chat", "messages": HI, "tools": [WEATHER, CLOCK],
                                             "tool_choice": {"type": "function", "function": {"name": "clock"}},
                                             "stream": True}, MODELS, native_tools=False)
    assert adapted.tools_as_json and adapted.stream and adapted.body["stream"] is False
    assert "tools" not in adapted.body and "tool_choice" not in adapted.body
    schema = adapted.body["response_format"]["json_schema"]["schema"]
    assert [option["properties"]["name"] for option in schema["anyOf"]] == [{"const": "clock"}]
    assert adapted.body["messages"][0]["role"] == "system" and '"clock"' in adapted.body["messages"][0]["content"]
    auto = adapt("/v1/chat/completions", {"model": "chat", "messages": HI, "tools": [WEATHER]}, MODELS,
                 native_tools=False)
    assert not auto.tools_as_json and auto.body["tools"] == [WEATHER]  # "auto" may answer in prose
