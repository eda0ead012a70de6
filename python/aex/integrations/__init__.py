"""Framework integrations. Each lives in its own module and imports its framework lazily, so
``import aex`` never imports LangChain or OpenAI:

* :mod:`aex.integrations.langchain` — a callback handler for LangChain chat and LLM models.
* :mod:`aex.integrations.langgraph` — attach that handler to a compiled LangGraph graph.
* :mod:`aex.integrations.openai` — govern an ``openai.OpenAI`` / ``AsyncOpenAI`` client.
"""
