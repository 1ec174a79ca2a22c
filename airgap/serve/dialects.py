"""What OpenAI and Mistral clients send, turned into what llama-server does right. Pure: JSON in, JSON out.

llama-server speaks most of OpenAI's API, but a few fields mean something else to it or nothing at all:
- `n` is an alias of its own `n_cmpl`; accepted up to the slots of the model, refused above;
- a named `tool_choice` ({"type": "function", "function": {"name": ...}}) is read as "auto": the guard sends
  "required" with `tools` restricted to the named function, so that exactly that function is called;
- Mistral's `tool_choice: "any"` is OpenAI's "required"; `random_seed` is `seed`; `safe_prompt` prepends
  Mistral's documented safety system prompt; `/v1/fim/completions` (`prompt`, `suffix`) is llama-server's
  `/infill` (`input_prefix`, `input_suffix`);
- `max_tokens` / `max_completion_tokens` get a default and a cap from the plan, and nonsense is a 400 here
  rather than an endless generation there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Mistral's documented guardrail prompt, prepended when a request sets safe_prompt (docs: "Guardrailing").
MISTRAL_SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
COMPLETION_PATHS = frozenset({"/v1/completions", "/completions"})
EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
FIM_PATHS = frozenset({"/v1/fim/completions"})
POST_PATHS = CHAT_PATHS | COMPLETION_PATHS | EMBEDDING_PATHS | FIM_PATHS
_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "n_predict")
_TOOL_CHOICES = frozenset({"auto", "none", "required"})


class ClientError(Exception):
    """A request the guard refuses: HTTP status and an OpenAI-style error."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class ModelLimits:
    """What one served model allows a request: from its plan."""

    id: str
    n_ctx: int  # tokens of context one request may use
    parallel: int  # slots: concurrent requests, and the largest `n`
    max_tokens_default: int
    max_tokens_cap: int
    embedding: bool = False


@dataclass(frozen=True)
class Adapted:
    """The request as the engine gets it, and what the answer needs on the way back."""

    path: str  # the engine's path
    body: dict[str, Any]
    model: str
    stream: bool
    usage_in_last_chunk: bool  # merge the usage-only chunk into the one with finish_reason (Mistral clients)
    drop_usage_chunk: bool  # the client did not ask for usage: do not send the usage-only chunk
    tools_as_json: bool = False  # a forced call on a template without tools: JSON constrained, turned into tool_calls


def choose_model(document: Mapping[str, Any], models: Mapping[str, ModelLimits]) -> ModelLimits:
    model = document.get("model")
    if model is None:
        if len(models) == 1:
            return next(iter(models.values()))
        raise ClientError(400, f"Field 'model' is required; this server serves: {', '.join(sorted(models))}.",
                          "missing_required_parameter", "model")
    if not isinstance(model, str):
        raise ClientError(400, f"Field 'model' must be a string, found {type(model).__name__}.", "invalid_type",
                          "model")
    if model not in models:
        raise ClientError(404, f"The model {model!r} does not exist; this server serves: "
                               f"{', '.join(sorted(models))}.", "model_not_found", "model")
    return models[model]


def adapt(path: str, document: Mapping[str, Any], models: Mapping[str, ModelLimits], *,
          mistral_client: bool = False, native_tools: bool = True) -> Adapted:
    """The engine request for a client request on `path`; ClientError for what cannot be served."""
    if path not in POST_PATHS:
        raise ClientError(404, f"Unknown endpoint POST {path}.", "unknown_url")
    limits = choose_model(document, models)
    body = copy.deepcopy(dict(document))
    body["model"] = limits.id
    if path in EMBEDDING_PATHS:
        if not limits.embedding:
            raise ClientError(400, f"Model {limits.id!r} is a chat model; embeddings need a model served with "
                                   f"embedding = true.", "model_not_embedding", "model")
        if "input" not in body:
            raise ClientError(400, "Field 'input' is required.", "missing_required_parameter", "input")
        if body.get("encoding_format") not in (None, "float", "base64"):  # the openai SDK asks for base64
            raise ClientError(400, f"Field 'encoding_format' must be 'float' or 'base64', found "
                                   f"{body['encoding_format']!r:.40}.", "invalid_value", "encoding_format")
        if body.get("output_dtype") not in (None, "float"):
            raise ClientError(400, f"Field 'output_dtype' must be 'float', found {body['output_dtype']!r:.40}.",
                              "invalid_value", "output_dtype")
        body.pop("output_dtype", None)  # Mistral's name; float is what the engine gives
        return Adapted("/v1/embeddings", body, limits.id, False, False, False)
    if limits.embedding:
        raise ClientError(400, f"Model {limits.id!r} is an embedding model; use /v1/embeddings.",
                          "model_not_chat", "model")
    mistral = mistral_client or any(k in body for k in ("random_seed", "safe_prompt", "prompt_mode"))
    _map_seed(body)
    _map_max_tokens(body, limits)
    _check_n(body, limits)
    stream = _check_stream(body)
    tools_as_json = False
    if path in CHAT_PATHS:
        _check_messages(body)
        _safe_prompt(body)
        _map_tool_choice(body)
        if not native_tools and body.get("tool_choice") == "required":
            _tools_as_json(body)
            tools_as_json = True
        engine_path = "/v1/chat/completions"
    elif path in FIM_PATHS:
        body = _fim(body)
        engine_path = "/infill"
    else:
        if "prompt" not in body:
            raise ClientError(400, "Field 'prompt' is required.", "missing_required_parameter", "prompt")
        engine_path = "/v1/completions"
    asked_usage = False
    if stream:
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ClientError(400, "Field 'stream_options' must be an object.", "invalid_type", "stream_options")
        asked_usage = bool((options or {}).get("include_usage", False))
        # Mistral's API always ends a stream with usage; ask the engine for it, and merge it into the last chunk
        body["stream_options"] = {**(options or {}), "include_usage": asked_usage or mistral}
    else:
        body.pop("stream_options", None)
    if tools_as_json:  # answered whole by the engine, then streamed by the guard as tool-call chunks
        body["stream"] = False
        body.pop("stream_options", None)
    return Adapted(engine_path, body, limits.id, stream, usage_in_last_chunk=stream and mistral,
                   drop_usage_chunk=stream and not asked_usage and not mistral, tools_as_json=tools_as_json)


TOOLS_PROMPT = ("You can call these functions (JSON Schema of their arguments):\n{tools}\n"
                "Answer with exactly one JSON object {{\"name\": ..., \"arguments\": {{...}}}} calling one of them.")


def _tools_as_json(body: dict[str, Any]) -> None:
    """A forced tool call for a chat template that knows no tools: the engine's JSON schema constraint makes
    the model write {"name", "arguments"} for one of the tools; the guard turns that into `tool_calls`."""
    tools = body.pop("tools")
    body.pop("tool_choice", None)
    body.pop("parallel_tool_calls", None)
    functions = [t["function"] for t in tools if isinstance(t.get("function"), dict) and "name" in t["function"]]
    if not functions:
        raise ClientError(400, "Each tool needs a 'function' with a 'name'.", "invalid_value", "tools")
    schema = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": f["name"]},
                       "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
    } for f in functions]}
    described = json.dumps([{"name": f["name"], "description": f.get("description", ""),
                             "parameters": f.get("parameters") or {}} for f in functions])
    body["messages"] = [{"role": "system", "content": TOOLS_PROMPT.format(tools=described)}, *body["messages"]]
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}


def _int_field(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ClientError(400, f"Field {name!r} must be an integer, found {value!r:.40}.", "invalid_type", name)
    return value


def _map_seed(body: dict[str, Any]) -> None:
    random_seed = _int_field(body, "random_seed")
    body.pop("random_seed", None)
    if random_seed is not None and body.get("seed") is None:
        body["seed"] = random_seed
    seed = _int_field(body, "seed")
    if seed is not None and not 0 <= seed < 1 << 32:
        raise ClientError(400, f"Field 'seed' must be between 0 and 4294967295, found {seed}.", "invalid_value",
                          "seed")


def _map_max_tokens(body: dict[str, Any], limits: ModelLimits) -> None:
    asked = None
    for name in _TOKEN_FIELDS:
        value = _int_field(body, name)
        body.pop(name, None)
        if value is not None and asked is None:
            asked = (name, value)
    if asked is None:
        body["n_predict"] = limits.max_tokens_default
        return
    name, value = asked
    if value < 1:
        raise ClientError(400, f"Field {name!r} must be at least 1, found {value}.", "invalid_value", name)
    if value > limits.max_tokens_cap:
        raise ClientError(400, f"Field {name!r} is {value}; model {limits.id!r} allows at most "
                               f"{limits.max_tokens_cap} tokens per request.", "invalid_value", name)
    body["n_predict"] = value


def _check_n(body: dict[str, Any], limits: ModelLimits) -> None:
    n = _int_field(body, "n")
    body.pop("n", None)
    if n is None or n == 1:
        return
    if n < 1 or n > limits.parallel:
        raise ClientError(400, f"Field 'n' is {n}; this server returns between 1 and {limits.parallel} choices "
                               f"per request for model {limits.id!r}.", "invalid_value", "n")
    body["n_cmpl"] = n


def _check_stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ClientError(400, f"Field 'stream' must be true or false, found {stream!r:.40}.", "invalid_type",
                          "stream")
    return stream


def _check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError(400, "Field 'messages' must be a non-empty list.", "invalid_value", "messages")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ClientError(400, "Each message must be an object with a 'role'.", "invalid_value", "messages")


def _safe_prompt(body: dict[str, Any]) -> None:
    safe = body.pop("safe_prompt", False)
    body.pop("prompt_mode", None)
    if safe is not True:
        if safe not in (False, None):
            raise ClientError(400, f"Field 'safe_prompt' must be true or false, found {safe!r:.40}.",
                              "invalid_type", "safe_prompt")
        return
    messages = body["messages"]
    first = messages[0]
    if first.get("role") == "system" and isinstance(first.get("content"), str):
        messages[0] = {**first, "content": f"{MISTRAL_SAFE_PROMPT}\n\n{first['content']}"}
    else:
        messages.insert(0, {"role": "system", "content": MISTRAL_SAFE_PROMPT})


def _map_tool_choice(body: dict[str, Any]) -> None:
    choice = body.get("tool_choice")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ClientError(400, "Field 'tools' must be a list of objects.", "invalid_type", "tools")
    if choice is None:
        return
    if choice == "any":  # Mistral
        body["tool_choice"] = "required"
        choice = "required"
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise ClientError(400, f"Field 'tool_choice' must be one of auto, none, required, any or a named "
                                   f"function, found {choice!r:.40}.", "invalid_value", "tool_choice")
        if choice == "required" and not tools:
            raise ClientError(400, "tool_choice 'required' needs a non-empty 'tools' list.", "invalid_value",
                              "tool_choice")
        return
    if not isinstance(choice, dict):
        raise ClientError(400, "Field 'tool_choice' must be a string or an object.", "invalid_type", "tool_choice")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ClientError(400, "A named tool_choice needs {'type': 'function', 'function': {'name': ...}}.",
                          "invalid_value", "tool_choice")
    named = [t for t in tools or [] if isinstance(t.get("function"), dict) and t["function"].get("name") == name]
    if not named:
        raise ClientError(400, f"tool_choice names the function {name!r}, which is not among 'tools'.",
                          "invalid_value", "tool_choice")
    body["tools"] = named[:1]
    body["tool_choice"] = "required"


def _fim(body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.pop("prompt", None)
    suffix = body.pop("suffix", None)
    if not isinstance(prompt, str):
        raise ClientError(400, "Field 'prompt' must be a string.", "invalid_type", "prompt")
    if suffix is not None and not isinstance(suffix, str):
        raise ClientError(400, "Field 'suffix' must be a string.", "invalid_type", "suffix")
    body.pop("min_tokens", None)
    return {**body, "input_prefix": prompt, "input_suffix": suffix or "", "prompt": ""}
