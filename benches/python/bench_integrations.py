"""What the integrations add per model call.

* LangChain: the same fake chat model invoked with and without ``AexCallbackHandler``.
* OpenAI: the same request through the raw client and the governed one, against an
  OpenAI-compatible server on 127.0.0.1.

Interleaved rounds on one in-memory kernel; medians. Run after ``pip install .[langchain,openai]``
(and langgraph is not needed):  python benches/python/bench_integrations.py
"""

import statistics
import sys
import time
from pathlib import Path

import openai
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage

import aex
from aex.integrations.langchain import AexCallbackHandler
from aex.integrations.openai import guard

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from provider import Provider  # noqa: E402

ROUNDS, CALLS = 30, 40
MODELS = "models:\n  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}\n"


def median_us(samples):
    return statistics.median(samples) * 1e6


def rounds(fns):
    out = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            out[name].append((time.perf_counter() - start) / CALLS)
    return {name: median_us(v) for name, v in out.items()}


def main() -> None:
    k = aex.Kernel(":memory:", config_yaml=MODELS)
    token = k.create_agent("bench", "1000000")

    def replies():
        while True:
            yield AIMessage("ok", usage_metadata={"input_tokens": 20, "output_tokens": 5, "total_tokens": 25})

    model = GenericFakeChatModel(messages=replies()).bind(model="mini", max_tokens=50)
    handler = AexCallbackHandler(k, token)
    noop = BaseCallbackHandler()
    msgs = [HumanMessage("hello there")]
    lc = rounds({
        "off": lambda: model.invoke(msgs),
        "noop": lambda: model.invoke(msgs, config={"callbacks": [noop]}),
        "on": lambda: model.invoke(msgs, config={"callbacks": [handler]}),
    })

    provider = Provider()
    raw = openai.OpenAI(base_url=provider.url, api_key="sk-bench", max_retries=0)
    governed = guard(raw, k, token)
    chat = [{"role": "user", "content": "hello"}]
    oa = rounds({
        "raw": lambda: raw.chat.completions.create(model="mini", messages=chat, max_tokens=50),
        "governed": lambda: governed.chat.completions.create(model="mini", messages=chat, max_tokens=50),
    })
    provider.stop()

    # The wrapper's own work, without the network: the same request through the raw and the
    # governed client over an HTTP transport that answers at once.
    try:
        import httpx2 as httpx_module  # the HTTP library of the openai releases that have it
    except ImportError:
        import httpx as httpx_module  # type: ignore[no-redef]

    reply = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }
    stub_http = httpx_module.Client(transport=httpx_module.MockTransport(lambda request: httpx_module.Response(200, json=reply)))
    stub = openai.OpenAI(base_url="http://stub.invalid/v1", api_key="sk-bench", max_retries=0, http_client=stub_http)
    stub_governed = guard(stub, k, token)
    own = rounds({
        "stub": lambda: stub.chat.completions.create(model="mini", messages=chat, max_tokens=50),
        "governed": lambda: stub_governed.chat.completions.create(model="mini", messages=chat, max_tokens=50),
    })

    print(f"per model call, median of {ROUNDS} rounds x {CALLS} calls (microseconds)")
    print(f"  LangChain fake model: no callbacks {lc['off']:.1f}, a no-op handler {lc['noop']:.1f}, AexCallbackHandler {lc['on']:.1f}")
    print(f"    aex's handler adds {lc['on'] - lc['noop']:.1f} over a handler that does nothing")
    print(f"  OpenAI client over loopback HTTP: raw {oa['raw']:.1f}, governed {oa['governed']:.1f} (difference {oa['governed'] - oa['raw']:.1f}, within the HTTP noise)")
    print(f"    the wrapper's own work (a transport that answers at once): {own['governed'] - own['stub']:.1f} per call")


if __name__ == "__main__":
    main()
