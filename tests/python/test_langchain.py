"""LangChain and LangGraph, governed through the callback handler, with the real packages."""

import asyncio
import gc
import json
import socket
import time
import warnings
from typing import Any
from uuid import UUID, uuid4

import pytest

import aex
from conftest import T0, assert_clean

pytest.importorskip("langchain_core", reason="langchain-core is the [langchain] extra")
langgraph = pytest.importorskip("langgraph", reason="langgraph is installed with the test dependencies")

from langchain_core.caches import InMemoryCache  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.globals import get_llm_cache, set_llm_cache  # noqa: E402
from langchain_core.language_models.chat_models import BaseChatModel  # noqa: E402
from langchain_core.language_models.fake import FakeListLLM  # noqa: E402
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402
from langgraph.graph import END, START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402

from aex.integrations.langchain import AexCallbackHandler, AsyncAexCallbackHandler  # noqa: E402
from aex.integrations.langgraph import agovern, govern  # noqa: E402

MODELS = (
    "models:\n  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}\n  other: {input_price: 1, output_price: 1}\n"
    "  fail-429: {input_price: 1, output_price: 2, max_output_tokens: 1000}\n"
    "  fail-500: {input_price: 1, output_price: 2, max_output_tokens: 1000}\n"
)
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


def test_usage_missing_settles_from_an_estimate_and_an_unexplained_error_is_charged(kernel):
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token, model="mini", max_output_tokens=100)
    model = GenericFakeChatModel(messages=iter(["a reply without usage"]))
    model.invoke([HumanMessage("hello")], config={"callbacks": [handler]})
    committed = [e for e in kernel.events(1, 100) if e["kind"] == "execution.committed"]
    assert committed[-1]["data"]["estimated"] is True and committed[-1]["data"]["output_tokens"] == len("a reply without usage")

    class Broken(GenericFakeChatModel):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("provider down")

    # An error that does not prove the request never reached the provider (no refusal status, no
    # failed connection) is in doubt: charged at the full reservation, marked estimated.
    run_id = uuid4()
    with pytest.raises(RuntimeError):
        Broken(messages=iter([])).invoke([HumanMessage("hello")], config={"callbacks": [handler], "run_id": run_id})
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_charged_in_full(kernel, run_id)
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


# ---- every exit path settles exactly once (issue 13) ---------------------------------------------

TERMINAL = ("execution.committed", "execution.released", "execution.failed")
STORY = "Once upon a time there was a budget that nobody could overspend, not even by streaming a long story."
ARGS = {"query": "how budget-governed agents settle a cancelled call " * 10}
HANDLERS = pytest.mark.parametrize("handler_class", [AexCallbackHandler, AsyncAexCallbackHandler], ids=["sync handler", "async handler"])


def all_events(kernel: aex.Kernel) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = kernel.events(out[-1]["seq"] + 1 if out else 1, 500)
        out += page
        if len(page) < 500:
            return out


def terminal(kernel: aex.Kernel, execution_id: Any) -> dict[str, Any]:
    """The execution's terminal event, asserting it has exactly one."""
    ends = [e for e in all_events(kernel) if e["execution_id"] == str(execution_id) and e["kind"] in TERMINAL]
    assert len(ends) == 1, ends
    return ends[0]


def executions(kernel: aex.Kernel) -> list[dict[str, Any]]:
    """Every admitted execution, in admission order."""
    return [kernel.execution(e["execution_id"]) for e in all_events(kernel) if e["kind"] == "execution.reserved"]


def assert_charged_in_full(kernel: aex.Kernel, execution_id: Any) -> None:
    e = kernel.execution(str(execution_id))
    assert e["state"] == "COMMITTED" and e["cost_micro"] == e["reserved_micro"] > 0, e
    end = terminal(kernel, execution_id)
    assert end["data"]["estimated"] is True and end["data"]["output_tokens"] == e["max_output_tokens"], end


def assert_charged_for(kernel: aex.Kernel, execution_id: Any, output: str) -> None:
    """Charged for the admitted input and the counted `output`, marked estimated."""
    e = kernel.execution(str(execution_id))
    assert e["state"] == "COMMITTED", e
    end = terminal(kernel, execution_id)
    assert end["data"]["estimated"] is True, end
    assert end["data"]["input_tokens"] == e["input_tokens"]
    assert end["data"]["output_tokens"] == aex._aex.count_tokens("mini", output) > 0, (end, output)
    assert 0 < e["cost_micro"] < e["reserved_micro"]


def assert_released(kernel: aex.Kernel, execution_id: Any) -> None:
    e = kernel.execution(str(execution_id))
    assert e["state"] in ("RELEASED", "FAILED") and not e["cost_micro"], e
    terminal(kernel, execution_id)


async def settles(kernel: aex.Kernel, agent: str, seconds: float = 5.0) -> bool:
    """Whether the agent's reservations return to zero within `seconds` (collecting garbage)."""
    deadline = time.monotonic() + seconds
    while kernel.agent(agent)["reserved_micro"] != 0:
        if time.monotonic() > deadline:
            return False
        gc.collect()
        await asyncio.sleep(0.01)
    return True


def text_model(text: str = STORY, max_tokens: int = 200) -> Any:
    return GenericFakeChatModel(messages=iter([text] * 10)).bind(model="mini", max_tokens=max_tokens)


class Stalled(GenericFakeChatModel):
    """A chat model whose provider never answers: it waits until cancelled."""

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)
        raise AssertionError("the call was not cancelled")


class ToolCaller(BaseChatModel):
    """Answers with one tool call and no usage report; streamed, its arguments come in fragments."""

    fragments: list[str] = []

    @property
    def _llm_type(self) -> str:
        return "tool-caller"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        message = AIMessage(content="", tool_calls=[{"name": "search", "args": ARGS, "id": "call_1"}])
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        for i, fragment in enumerate(self.fragments):
            first = i == 0
            chunk = {"name": "search" if first else None, "args": fragment, "id": "call_1" if first else None, "index": 0}
            yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))


@pytest.mark.parametrize("how", ["stream", "astream", "astream, sync handler"])
def test_breaking_out_of_a_stream_charges_the_counted_output(kernel, how):
    # Leaving a stream early (GeneratorExit in LangChain's on_llm_error) does not mean the
    # request was never sent: it ends charged for the input and the output seen so far.
    token = kernel.create_agent("atlas", "1.00")
    handler_class = AexCallbackHandler if how != "astream" else AsyncAexCallbackHandler
    handler = handler_class(kernel, token)
    run_id, seen = uuid4(), []
    config: Any = {"callbacks": [handler], "run_id": run_id}
    if how == "stream":
        for chunk in text_model().stream([HumanMessage("tell me a story")], config=config):
            seen.append(chunk.content)
            if len(seen) == 5:
                break
    else:

        async def main() -> None:
            stream = text_model().astream([HumanMessage("tell me a story")], config=config)
            async for chunk in stream:
                seen.append(chunk.content)
                if len(seen) == 5:
                    break
            await stream.aclose()

        asyncio.run(main())
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_charged_for(kernel, run_id, "".join(seen))
    assert_clean(kernel)


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_tool_call_arguments_are_counted_when_no_usage_is_reported(kernel, streamed):
    token = kernel.create_agent("atlas", "1.00")
    arguments = json.dumps(ARGS)
    model = ToolCaller(fragments=[arguments[i : i + 17] for i in range(0, len(arguments), 17)]).bind(model="mini", max_tokens=1000)
    run_id = uuid4()
    config: Any = {"callbacks": [AexCallbackHandler(kernel, token)], "run_id": run_id}
    if streamed:
        chunks = list(model.stream([HumanMessage("search")], config=config))
        assert "".join(c.tool_call_chunks[0]["args"] for c in chunks if c.tool_call_chunks) == arguments
    else:
        assert model.invoke([HumanMessage("search")], config=config).tool_calls[0]["args"] == ARGS
    end = terminal(kernel, run_id)
    assert end["kind"] == "execution.committed" and end["data"]["estimated"] is True
    assert end["data"]["output_tokens"] >= aex._aex.count_tokens("mini", ARGS["query"]) > 100
    if streamed:
        assert_charged_for(kernel, run_id, arguments)
    assert_clean(kernel)


@HANDLERS
@pytest.mark.parametrize("how", ["task.cancel", "wait_for"])
def test_a_cancelled_ainvoke_is_charged_at_once(kernel, handler_class, how):
    # LangChain sends no on_llm_error when ainvoke is cancelled; the request may have reached the
    # provider, so the call ends charged (at its full reservation: nothing was seen), promptly.
    token = kernel.create_agent("atlas", "1.00")
    model = Stalled(messages=iter([])).bind(model="mini", max_tokens=200)
    handler = handler_class(kernel, token)

    async def main() -> None:
        call = model.ainvoke([HumanMessage("hello")], config={"callbacks": [handler]})
        if how == "task.cancel":
            task = asyncio.ensure_future(call)
            await asyncio.sleep(0.05)
            assert kernel.agent("atlas")["reserved_micro"] > 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            del task
        else:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(call, 0.05)
        del call
        assert await settles(kernel, "atlas"), "the cancelled call still holds its reservation"

    asyncio.run(main())
    (e,) = executions(kernel)
    assert_charged_in_full(kernel, e["execution_id"])
    assert_clean(kernel)


class RunKeeper(BaseCallbackHandler):
    """Keeps every run id it sees, as a tracer keeps the runs that never finished."""

    def __init__(self) -> None:
        self.run_ids: list[UUID] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.run_ids.append(run_id)


@pytest.mark.parametrize("attach", [govern, agovern], ids=["govern", "agovern"])
@pytest.mark.parametrize("tracer", [False, True], ids=["run ids released", "run ids kept"])
def test_a_cancelled_graph_run_is_charged_at_once(kernel, attach, tracer):
    # Within a chain or a graph, the node's on_chain_error(CancelledError) ends the model runs it
    # awaited, even when something else keeps their run ids alive.
    token = kernel.create_agent("atlas", "1.00")

    class Binder(Stalled):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    graph = attach(agent_graph(Binder(messages=iter([])), asynchronous=True), kernel, token)
    keeper = RunKeeper()
    config: Any = {"callbacks": [keeper]} if tracer else {}

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(graph.ainvoke({"messages": [HumanMessage("go")]}, config), 0.1)
        assert await settles(kernel, "atlas"), "the cancelled graph run still holds its reservation"
        assert len(keeper.run_ids) == (1 if tracer else 0)

    asyncio.run(main())
    (e,) = executions(kernel)
    assert_charged_in_full(kernel, e["execution_id"])
    assert_clean(kernel)


def test_a_run_abandoned_without_any_callback_settles_when_collected(kernel):
    # The last resort: nothing more will come for a run whose id LangChain let go of.
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token, model="mini", max_output_tokens=100)
    run_id = uuid4()
    execution_id = str(run_id)
    handler.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=run_id, invocation_params={"model": "mini"})
    assert kernel.execution(execution_id)["state"] == "DISPATCHED", "treated as sent from the start"
    del run_id
    gc.collect()
    assert_charged_in_full(kernel, execution_id)
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def test_a_call_is_dispatched_before_the_model_runs_and_settles_once(kernel):
    token = kernel.create_agent("atlas", "1.00")
    states = []

    class Watching(GenericFakeChatModel):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            states.append(kernel.execution(str(run_id))["state"])
            return super()._generate(*args, **kwargs)

    handler = AexCallbackHandler(kernel, token)
    run_id = uuid4()
    model = Watching(messages=iter([AIMessage("hi", usage_metadata=USAGE)])).bind(model="mini", max_tokens=300)
    model.invoke([HumanMessage("hello")], config={"callbacks": [handler], "run_id": run_id})
    assert states == ["DISPATCHED"]
    assert kernel.execution(str(run_id))["cost_micro"] == PER_CALL
    # A late or repeated callback for a settled run changes nothing.
    handler.on_llm_error(RuntimeError("late"), run_id=run_id)
    handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=AIMessage("x"))]]), run_id=run_id)
    assert terminal(kernel, run_id)["kind"] == "execution.committed"
    assert kernel.agent("atlas")["spent_micro"] == PER_CALL and kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def batch_budget(kernel: aex.Kernel, n: int) -> str:
    """A token whose budget fits exactly `n` reservations of `text_model()`'s calls."""
    probe = kernel.create_agent("probe", "1.00")
    admission = kernel.admit_call(probe, "mini", messages=[HumanMessage("prompt 1")], max_output_tokens=200)
    kernel.release(admission.execution_id, "probe")
    per = admission.reserved_micro
    return kernel.create_agent("atlas", aex.format_usd(n * per + per - 1).lstrip("$"))


# (The async handler's denials do not stop a sync call: LangChain swallows them. See langgraph.py.)
@pytest.mark.parametrize(
    "handler_class,api",
    [(AexCallbackHandler, "generate"), (AexCallbackHandler, "agenerate"), (AsyncAexCallbackHandler, "agenerate")],
    ids=["generate, sync handler", "agenerate, sync handler", "agenerate, async handler"],
)
def test_a_denied_prompt_in_a_batch_releases_the_prompts_admitted_before_it(kernel, handler_class, api):
    token = batch_budget(kernel, 2)
    FakeToolModel.calls = 0
    model = FakeToolModel(messages=iter(["a reply"] * 10))
    prompts = [[HumanMessage(f"prompt {i}")] for i in (1, 2, 3)]
    handler = handler_class(kernel, token)
    with pytest.raises(aex.InsufficientBudget):
        if api == "generate":
            model.generate(prompts, callbacks=[handler], model="mini", max_tokens=200)
        else:
            asyncio.run(model.agenerate(prompts, callbacks=[handler], model="mini", max_tokens=200))
    assert FakeToolModel.calls == 0, "the model was never called"
    admitted = [e for e in executions(kernel) if e["agent"] == "atlas"]
    assert len(admitted) == 2
    for e in admitted:
        assert_released(kernel, e["execution_id"])
    a = kernel.agent("atlas")
    assert a["reserved_micro"] == 0 and a["spent_micro"] == 0
    assert_clean(kernel)


@HANDLERS
# LangChain runs an inline handler's starts one after the other and never awaits those after a
# refused one; Python warns about each when it is collected.
@pytest.mark.filterwarnings("ignore:coroutine 'ahandle_event' was never awaited:RuntimeWarning")
def test_a_policy_denial_in_the_middle_of_a_batch_admits_nothing_after_it(kernel, handler_class):
    # The async handler's starts run concurrently: prompts after the denied one must not be left
    # reserved either.
    token = kernel.create_agent("atlas", "1.00", vision=False)
    model = FakeToolModel(messages=iter(["a reply"] * 10))
    image = HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    prompts = [[HumanMessage("one")], [HumanMessage("two")], [image], [HumanMessage("four")], [HumanMessage("five")]]

    async def main() -> None:
        with pytest.raises(aex.PolicyDenied):
            await model.agenerate(prompts, callbacks=[handler_class(kernel, token)], model="mini", max_tokens=200)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    gc.collect()
    assert FakeToolModel.calls == 0
    assert len(executions(kernel)) == 2
    for e in executions(kernel):
        assert_released(kernel, e["execution_id"])
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def test_a_denied_prompt_in_an_llm_batch_releases_the_others(kernel):
    token = batch_budget(kernel, 2)
    llm = FakeListLLM(responses=["a reply"] * 10)
    with pytest.raises(aex.InsufficientBudget):
        llm.generate(["prompt 1", "prompt 2", "prompt 3"], callbacks=[AexCallbackHandler(kernel, token, model="mini", max_output_tokens=200)])
    assert llm.i == 0
    assert [e["state"] for e in executions(kernel) if e["agent"] == "atlas"] == ["RELEASED", "RELEASED"]
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


@pytest.fixture
def llm_cache():
    previous = get_llm_cache()
    set_llm_cache(InMemoryCache())
    yield
    set_llm_cache(previous)


@HANDLERS
def test_a_cache_hit_is_released(kernel, llm_cache, handler_class):
    # A cached generation never reached the provider: it costs nothing.
    token = kernel.create_agent("atlas", "1.00")
    FakeToolModel.calls = 0
    model = FakeToolModel(messages=iter([AIMessage("cached reply", usage_metadata=USAGE)] * 3)).bind(model="mini", max_tokens=300)
    handler = handler_class(kernel, token)
    first, second = uuid4(), uuid4()

    async def main() -> None:
        for run_id in (first, second):
            reply = await model.ainvoke([HumanMessage("same question")], config={"callbacks": [handler], "run_id": run_id})
            assert reply.content == "cached reply"

    asyncio.run(main())
    assert FakeToolModel.calls == 1
    assert kernel.execution(str(first))["cost_micro"] == PER_CALL
    assert_released(kernel, second)
    a = kernel.agent("atlas")
    assert a["spent_micro"] == PER_CALL and a["reserved_micro"] == 0
    assert_clean(kernel)


class LoopbackChat(BaseChatModel):
    """A real chat model over the OpenAI client, pointed at the loopback provider."""

    base_url: str
    model: str = "mini"
    max_tokens: int = 100

    @property
    def _llm_type(self) -> str:
        return "loopback"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.max_tokens}

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="sk-test", max_retries=0, timeout=10)
        reply = client.chat.completions.create(
            model=self.model, max_tokens=self.max_tokens, messages=[{"role": "user", "content": str(m.content)} for m in messages]
        )
        u = reply.usage
        usage: Any = {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens, "total_tokens": u.total_tokens}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(reply.choices[0].message.content or "", usage_metadata=usage))])


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def test_a_provider_refusal_or_a_failed_connection_returns_the_reservation(kernel, provider):
    openai = pytest.importorskip("openai")
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token)
    ok, refused, down, unreachable = uuid4(), uuid4(), uuid4(), uuid4()
    LoopbackChat(base_url=provider.url).invoke([HumanMessage("hi")], config={"callbacks": [handler], "run_id": ok})
    assert kernel.execution(str(ok))["cost_micro"] == 15 + 4  # 100 input, 6 output tokens on "mini"
    with pytest.raises(openai.RateLimitError):
        LoopbackChat(base_url=provider.url, model="fail-429").invoke([HumanMessage("hi")], config={"callbacks": [handler], "run_id": refused})
    with pytest.raises(openai.InternalServerError):
        LoopbackChat(base_url=provider.url, model="fail-500").invoke([HumanMessage("hi")], config={"callbacks": [handler], "run_id": down})
    with pytest.raises(openai.APIConnectionError):
        LoopbackChat(base_url=closed_port_url()).invoke([HumanMessage("hi")], config={"callbacks": [handler], "run_id": unreachable})
    for run_id in (refused, down, unreachable):
        assert_released(kernel, run_id)
    a = kernel.agent("atlas")
    assert a["spent_micro"] == 19 and a["reserved_micro"] == 0
    assert_clean(kernel)


class StatusError(Exception):
    """An SDK's error for an HTTP status (as openai's, anthropic's and httpx's carry it)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"provider answered {status_code}")
        self.status_code = status_code


def start_run(kernel: aex.Kernel, handler: AexCallbackHandler) -> UUID:
    run_id = uuid4()
    handler.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=run_id, invocation_params={"model": "mini", "max_tokens": 100})
    return run_id


@pytest.mark.parametrize(
    "error",
    [GeneratorExit(), asyncio.CancelledError(), KeyboardInterrupt(), TimeoutError("read timed out"), ValueError("bad JSON"), StatusError(200)],
    ids=lambda e: type(e).__name__ + (f" {e.status_code}" if isinstance(e, StatusError) else ""),
)
def test_an_error_that_does_not_prove_the_request_unsent_is_charged(kernel, error):
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token)
    run_id = start_run(kernel, handler)
    handler.on_llm_error(error, run_id=run_id)
    assert_charged_in_full(kernel, run_id)
    # Once output was seen, even a status error cannot mean the provider did no work.
    run_id = start_run(kernel, handler)
    handler.on_llm_new_token("Hello", chunk=ChatGenerationChunk(message=AIMessageChunk(content="Hello")), run_id=run_id)
    handler.on_llm_new_token("", chunk=ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
        {"name": "search", "args": '{"query": "x"}', "id": "c1", "index": 0}])), run_id=run_id)
    handler.on_llm_error(StatusError(500), run_id=run_id)
    assert_charged_for(kernel, run_id, 'Hello{"query": "x"}')
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_a_status_error_before_any_output_returns_the_reservation(kernel, status):
    token = kernel.create_agent("atlas", "1.00")
    handler = AexCallbackHandler(kernel, token)
    run_id = start_run(kernel, handler)

    class Wrapped(Exception):
        pass

    try:
        raise Wrapped("the integration's own error") from StatusError(status)
    except Wrapped as e:
        handler.on_llm_error(e, run_id=run_id)
    assert kernel.execution(str(run_id))["state"] == "FAILED"
    assert terminal(kernel, run_id)["data"]["error"] == f"provider answered {status}"
    assert kernel.agent("atlas")["reserved_micro"] == 0 and kernel.agent("atlas")["spent_micro"] == 0
    assert_clean(kernel)
