"""Everything a provider bills as input is reserved for before the call, on every Python surface
(the guard, the OpenAI wrapper, the LangChain handler, kernel.chat): tool definitions, schemas,
tool calls in the history, tool answers, Responses input items. A request whose hidden input
would blow the budget is refused before anything is sent; malformed input is refused naming the
field."""

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

import aex
from aex.integrations.langchain import AexCallbackHandler
from aex.integrations.openai import guard as guard_client
from conftest import assert_clean

BIG = "lorem ipsum " * 10_000  # about 20,000 tokens
TOOL = {"type": "function", "function": {"name": "search", "description": BIG, "parameters": {"type": "object"}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def kernel(tmp_path, provider):
    return aex.Kernel(str(tmp_path / "aex.db"), durability="normal", config_yaml=f"""
providers:
  local: {{base_url: "{provider.url}"}}
models:
  mini: {{provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}}
""")


@pytest.fixture
def token(kernel):
    return kernel.create_agent("atlas", "0.01")  # 10,000 micro-USD: about 8,000 input tokens with the reply


def assert_nothing_spent(kernel, provider):
    assert provider.requests == [], "nothing was sent"
    a = kernel.agent("atlas")
    assert (a["spent_micro"], a["reserved_micro"]) == (0, 0)
    assert_clean(kernel)


def test_the_guard_counts_tool_definitions_schemas_and_tool_calls(kernel, provider, token):
    cases = [
        dict(messages=HI, tools=[TOOL]),
        dict(messages=HI, response_format={"type": "json_schema", "json_schema": {"name": "s", "description": BIG}}),
        dict(messages=HI + [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": BIG}}]}]),
        dict(messages=[HumanMessage("hi"), AIMessage("", tool_calls=[{"name": "f", "args": {"q": BIG}, "id": "1"}]), ToolMessage(BIG, tool_call_id="1")]),
    ]
    for request in cases:
        with pytest.raises(aex.InsufficientBudget):
            with kernel.guard(token, "mini", **request):
                pytest.fail("admitted")
    assert_nothing_spent(kernel, provider)


def test_malformed_message_content_is_refused_naming_the_field(kernel, token):
    for messages, field in [([{"role": "user", "content": 12345}], "messages[0].content"),
                            ([{"role": "user", "content": {"type": "text", "text": BIG}}], "messages[0].content"),
                            ("a string", "messages")]:
        with pytest.raises(aex.InvalidRequest) as caught:
            with kernel.guard(token, "mini", messages=messages):
                pass
        assert caught.value.field == field, caught.value
    with pytest.raises(aex.InvalidRequest) as caught:
        kernel.events(-1, 10)
    assert caught.value.field == "from_seq"


def test_the_openai_wrapper_counts_tools_and_responses_input_items(kernel, provider, token):
    with openai.OpenAI(base_url=provider.url, api_key="unused", max_retries=0) as raw:
        client = guard_client(raw, kernel, token)
        with pytest.raises(aex.InsufficientBudget):
            client.chat.completions.create(model="mini", messages=HI, tools=[TOOL])
        with pytest.raises(aex.InsufficientBudget):
            client.responses.create(model="mini", input=[{"type": "function_call_output", "call_id": "1", "output": BIG}])
        with pytest.raises(aex.InvalidRequest) as caught:
            client.responses.create(model="mini", input="hi", previous_response_id="resp_1")
        assert caught.value.field == "previous_response_id"
    assert_nothing_spent(kernel, provider)


def test_kernel_chat_counts_tools(kernel, provider, token):
    with pytest.raises(aex.InsufficientBudget):
        kernel.chat(token, model="mini", messages=HI, tools=[TOOL])
    with pytest.raises(aex.InvalidRequest) as caught:
        kernel.chat(token, model="mini", messages=HI, stream=1)
    assert caught.value.field == "stream"
    assert_nothing_spent(kernel, provider)


def test_the_langchain_handler_counts_bound_tools_and_refuses_what_it_cannot_bound(kernel, provider, token):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    handler = AexCallbackHandler(kernel, token)
    llm = langchain_openai.ChatOpenAI(model="mini", base_url=provider.url, api_key="unused", max_retries=0)
    with pytest.raises(aex.InsufficientBudget):
        llm.bind_tools([TOOL]).invoke("hi", config={"callbacks": [handler]})
    rich_handler = AexCallbackHandler(kernel, kernel.create_agent("rich", "100.00"))
    # More output than aex reserves for the model, or several completions: refused, not sent.
    with pytest.raises(aex.InvalidRequest) as caught:
        langchain_openai.ChatOpenAI(model="mini", base_url=provider.url, api_key="unused", max_retries=0, max_tokens=100_000).invoke(
            "hi", config={"callbacks": [rich_handler]})
    assert caught.value.field == "max_tokens"
    with pytest.raises(aex.InvalidRequest) as caught:
        langchain_openai.ChatOpenAI(model="mini", base_url=provider.url, api_key="unused", max_retries=0, n=3).invoke(
            "hi", config={"callbacks": [rich_handler]})
    assert caught.value.field == "n"
    assert provider.requests == []
    assert kernel.agent("rich")["reserved_micro"] == 0
    assert_clean(kernel)
