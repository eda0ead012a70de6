"""LangChain and LangGraph, governed through the callback handler, with the real packages."""

import asyncio
import warnings
from typing import Any
from uuid import uuid4

import pytest

import aex
from conftest import T0, assert_clean

pytest.importorskip("langchain_core", reason="langchain-core is the [langchain] extra")
langgraph = pytest.importorskip("langgraph", reason="langgraph is installed with the test dependencies")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402
from langgraph.graph import END, START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402

from aex.integrations.langchain import AexCallbackHandler, AsyncAexCallbackHandler  # noqa: E402
from aex.integrations.langgraph import agovern, govern  # noqa: E402

MODELS = "models:\n  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}\n  other: {input_price: 1, output_price: 1}\n"
USAGE = {"input_tokens": 1000, "output_tokens": 200, "total_tokens": 1200}
PER_CALL = 150 + 120  # the cost of USAGE on "mini", micro-USD


class FakeToolModel(GenericFakeChatModel):
    """langchain-core's fake chat model, counting its calls and accepting bound tools."""

    calls: int = 0

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        type(self).calls += 1
        return super()._generate(*args, **kwargs)


@tool
def search(query: str) -> str:
    """Searches the web."""
    return f"results for {query}"


def tool_calling_messages():
    n = 0
    while True:
        n += 1
        yield AIMessage(content="", tool_calls=[{"name": "search", "args": {"query": f"q{n}"}, "id": f"call_{n}"}], usage_metadata=USAGE)


def agent_graph(model: Any, asynchronous: bool = False) -> Any:
    bound = model.bind_tools([search], model="mini", max_tokens=300)

    def agent(state: MessagesState) -> dict:
        return {"messages": [bound.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("agent", aagent if asynchronous else agent)
    g.add_node("tools", ToolNode([search]))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition)
    g.add_edge("tools", "agent")
    return g.compile()


@pytest.fixture
def kernel(tmp_path):
    FakeToolModel.calls = 0
    return aex.Kernel(str(tmp_path / "aex.db"), config_yaml=MODELS, durability="normal", manual_clock_ms=T0)


def test_a_langgraph_tool_loop_is_stopped_at_exactly_the_budget(kernel):
    # Each call reserves 150 (input) + 180 (300 max tokens) = 330 and is charged 270; with a
    # budget of $0.003 the tenth call is refused: 9 * 270 = 2430 spent, 570 left, 330 fits, then
    # 2700 spent, 300 left < 330.
    token = kernel.create_agent("atlas", "0.003")
    model = FakeToolModel(messages=tool_calling_messages())
    graph = govern(agent_graph(model), kernel, token)
    with pytest.raises(aex.InsufficientBudget) as denied:
        graph.invoke({"messages": [HumanMessage("research budget-governed agents " * 60)]}, {"recursion_limit": 500})
    a = kernel.agent("atlas")
    assert FakeToolModel.calls == a["spent_micro"] // PER_CALL, "every call that ran was charged, none more"
    assert a["spent_micro"] == FakeToolModel.calls * PER_CALL and a["reserved_micro"] == 0
    assert denied.value.remaining_micro == 3000 - a["spent_micro"] < denied.value.needed_micro
    assert_clean(kernel)


@pytest.mark.parametrize(
    "agent_kwargs,bind,reason",
    [
        ({"allowed_models": ["other"]}, {}, "model_not_allowed"),
        ({"tools": False}, {}, "tools_not_allowed"),
        ({"streaming": False}, {"stream": True}, "streaming_not_allowed"),
    ],
)
def test_policy_denials_happen_before_the_model_is_invoked(kernel, agent_kwargs, bind, reason):
    token = kernel.create_agent("atlas", "1.00", **agent_kwargs)
    model = FakeToolModel(messages=tool_calling_messages())
    runnable = model.bind_tools([search], model="mini", max_tokens=100, **bind)
    with pytest.raises(aex.PolicyDenied) as denied:
        runnable.invoke([HumanMessage("hi")], config={"callbacks": [AexCallbackHandler(kernel, token)]})
    assert denied.value.reason == reason
    assert FakeToolModel.calls == 0, "the model was never called"


def test_usage_missing_settles_from_an_estimate_and_errors_release(kernel):
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token, model="mini", max_output_tokens=100)
    model = GenericFakeChatModel(messages=iter(["a reply without usage"]))
    model.invoke([HumanMessage("hello")], config={"callbacks": [handler]})
    committed = [e for e in kernel.events(1, 100) if e["kind"] == "execution.committed"]
    assert committed[-1]["data"]["estimated"] is True and committed[-1]["data"]["output_tokens"] == len("a reply without usage")

    class Broken(GenericFakeChatModel):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("provider down")

    with pytest.raises(RuntimeError):
        Broken(messages=iter([])).invoke([HumanMessage("hello")], config={"callbacks": [handler]})
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert [e for e in kernel.events(1, 100) if e["kind"] == "execution.released"]
    assert_clean(kernel)


def test_the_run_id_is_the_execution_id_so_a_run_is_charged_once(kernel):
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token, model="mini", max_output_tokens=100)
    run_id = uuid4()
    params = {"invocation_params": {"model": "mini", "max_tokens": 100}}
    handler.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=run_id, **params)
    handler.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=run_id, **params)  # a repeat
    assert kernel.agent("atlas")["reserved_micro"] == kernel.execution(str(run_id))["reserved_micro"]


def test_a_custom_base_url_chatopenai_stream_warns_once(kernel):
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token, model="mini", max_output_tokens=10)
    serialized = {"id": ["langchain", "chat_models", "openai", "ChatOpenAI"], "kwargs": {"openai_api_base": "http://127.0.0.1:1/v1"}}
    params = {"invocation_params": {"model": "mini", "stream": True}}
    with pytest.warns(RuntimeWarning, match="stream_usage"):
        handler.on_chat_model_start(serialized, [[HumanMessage("hi")]], run_id=uuid4(), **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handler.on_chat_model_start(serialized, [[HumanMessage("hi")]], run_id=uuid4(), **params)


@pytest.mark.parametrize("attach", [govern, agovern], ids=["sync handler", "async handler"])
def test_async_graph(kernel, attach):
    token = kernel.create_agent("atlas", "0.003")
    graph = attach(agent_graph(FakeToolModel(messages=tool_calling_messages()), asynchronous=True), kernel, token)

    async def main():
        await graph.ainvoke({"messages": [HumanMessage("go " * 300)]}, {"recursion_limit": 500})

    with pytest.raises(aex.InsufficientBudget):
        asyncio.run(main())
    a = kernel.agent("atlas")
    assert a["spent_micro"] == FakeToolModel.calls * PER_CALL and a["reserved_micro"] == 0
    assert isinstance(AsyncAexCallbackHandler(kernel, token), AsyncAexCallbackHandler)
    assert_clean(kernel)


def test_importing_aex_does_not_import_the_frameworks():
    import subprocess
    import sys

    code = "import sys, aex; assert 'langchain_core' not in sys.modules and 'openai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
