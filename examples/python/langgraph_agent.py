"""A LangGraph agent with a tool loop, cut off by aex at its budget.

The model is langchain-core's fake chat model (no network, no key): it asks for the search tool
on every turn and reports usage like a real provider. ``govern(graph, kernel, token)`` attaches
aex to every model call in the graph; the run stops with ``InsufficientBudget`` when the next
call no longer fits, before the model is called.

Run (after ``pip install '.[langchain]' langgraph``):  python examples/python/langgraph_agent.py
"""

import tempfile
from pathlib import Path
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

import aex
from aex.integrations.langgraph import govern


@tool
def search(query: str) -> str:
    """Searches the literature."""
    return f"3 papers about {query}"


class ToolCallingModel(GenericFakeChatModel):
    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)


def turns():
    n = 0
    while True:
        n += 1
        usage = {"input_tokens": 900 + 400 * n, "output_tokens": 180, "total_tokens": 1080 + 400 * n}
        yield AIMessage("", tool_calls=[{"name": "search", "args": {"query": f"topic {n}"}, "id": f"call_{n}"}], usage_metadata=usage)


def main() -> None:
    db = Path(tempfile.mkdtemp(prefix="aex-langgraph-")) / "aex.db"
    kernel = aex.Kernel(str(db), config_yaml="models:\n  gpt-4o-mini: {input_price: 0.15, output_price: 0.60}\n")
    token = kernel.create_agent("researcher", "0.005", allowed_models=["gpt-4o-mini"])

    model = ToolCallingModel(messages=turns()).bind_tools([search], model="gpt-4o-mini", max_tokens=512)
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_node("tools", ToolNode([search]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    governed = govern(graph.compile(), kernel, token)

    try:
        governed.invoke({"messages": [HumanMessage("Survey budget-governed agents.")]}, {"recursion_limit": 1000})
    except aex.InsufficientBudget as stop:
        print(f"stopped: {stop.reason} — needed ${stop.needed_usd}, remaining ${stop.remaining_usd}")
    agent = kernel.agent("researcher")
    calls = sum(1 for e in kernel.events(1, 10_000) if e["kind"] == "execution.committed")
    print(f"{calls} model calls, spent ${aex.format_usd(agent['spent_micro'])} of ${aex.format_usd(agent['budget_micro'])}")
    print("audit:", "clean" if kernel.audit()["clean"] else kernel.audit()["failure"])


if __name__ == "__main__":
    main()
