//! Governed provider calls against OpenAI-compatible servers on 127.0.0.1 (wiremock).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use aex_core::dispatch::{DispatchOptions, Endpoint, ProviderCall};
use aex_core::{AgentSpec, Config, Error, Kernel, KernelOptions};
use common::assert_clean;
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn config(primary: &str, secondary: &str) -> Config {
    // The host's key for "primary" comes from CARGO_PKG_NAME, which cargo sets for tests: a
    // stand-in secret without mutating the process environment.
    Config::from_yaml(&format!(
        "providers:\n  primary: {{base_url: \"{primary}/v1\", api_key_env: CARGO_PKG_NAME}}\n  \
         secondary: {{base_url: \"{secondary}/v1\"}}\n  \
         strict: {{base_url: \"{secondary}/v1\", api_key_env: AEX_TEST_KEY_THAT_IS_NEVER_SET}}\n\
         models:\n  mini: {{provider: primary, provider_model: mini-2026, input_price: 0.15, output_price: 0.60, max_output_tokens: 1000, fallbacks: [backup]}}\n  \
         backup: {{provider: secondary, input_price: 1, output_price: 2, max_output_tokens: 500}}\n  \
         byok: {{provider: strict, input_price: 1, output_price: 1}}\n  \
         solo: {{provider: primary, input_price: 1, output_price: 1}}\n  \
         embed: {{provider: secondary, input_price: 0.02, output_price: 0}}\n"
    ))
    .unwrap()
}

fn kernel(primary: &MockServer, secondary: &MockServer, request_timeout: Duration) -> Kernel {
    let options = KernelOptions {
        config: config(&primary.uri(), &secondary.uri()),
        dispatch: DispatchOptions { request_timeout, max_retries: 1, retry_base_delay: Duration::from_millis(1), ..Default::default() },
        ..Default::default()
    };
    common::store_kernel(options)
}

fn chat_reply(model: &str) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there."}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    })
}

fn chat(model: &str) -> ProviderCall {
    ProviderCall::new(Endpoint::ChatCompletions, json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
}

fn sse(events: &[Value], done: bool) -> String {
    let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    if done {
        body.push_str("data: [DONE]\n\n");
    }
    body
}

fn chunk(text: &str) -> Value {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]})
}

fn kinds(k: &Kernel) -> Vec<String> {
    k.events(1, 1_000).unwrap().into_iter().map(|e| e.kind).collect()
}

async fn servers() -> (MockServer, MockServer) {
    (MockServer::start().await, MockServer::start().await)
}

#[tokio::test]
async fn a_plain_call_is_routed_capped_and_settled_with_the_host_key() {
    let (a, b) = servers().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", "Bearer aex-core"))
        .and(body_partial_json(json!({"model": "mini-2026", "max_tokens": 1000})))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_reply("mini-2026")))
        .expect(1)
        .mount(&a)
        .await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let reply = k.call_provider(token.expose(), chat("mini")).await.unwrap();
    assert_eq!(reply.response, chat_reply("mini-2026"), "the response comes back unchanged");
    assert_eq!((reply.model.as_str(), reply.attempts, reply.estimated), ("mini", 1, false));
    assert_eq!(reply.settlement.cost_micro, 15 + 12);
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 27);
    assert_eq!(kinds(&k)[1..], ["agent.created", "execution.reserved", "execution.dispatched", "execution.committed"]);
    let ledger = format!("{:?}", k.events(1, 100).unwrap());
    assert!(!ledger.contains("aex-core\""), "no key in the ledger");
    assert_clean(&k);
}

#[tokio::test]
async fn passthrough_keys_replace_the_host_key_and_need_permission() {
    let (a, b) = servers().await;
    Mock::given(header("authorization", "Bearer sk-agent-own"))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_reply("m")))
        .expect(2)
        .mount(&a)
        .await;
    Mock::given(header("authorization", "Bearer sk-agent-own"))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_reply("m")))
        .expect(1)
        .mount(&b)
        .await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let own = k.create_agent(&AgentSpec { allow_passthrough: true, ..AgentSpec::new("own", 1_000_000) }).unwrap().token;
    let plain = k.create_agent(&AgentSpec::new("plain", 1_000_000)).unwrap().token;
    let with_key = |model: &str| ProviderCall { passthrough_key: Some("sk-agent-own".into()), ..chat(model) };

    k.call_provider(own.expose(), with_key("mini")).await.unwrap();
    k.call_provider(own.expose(), with_key("solo")).await.unwrap();
    let e = k.call_provider(plain.expose(), with_key("mini")).await.unwrap_err().error;
    assert_eq!((e.status(), e.reason()), (403, "passthrough_not_allowed"));
    assert!(!e.to_string().contains("sk-agent-own"));
    // The host holds no key for "strict": bring your own, or be refused before anything is sent.
    let e = k.call_provider(own.expose(), chat("byok")).await.unwrap_err().error;
    assert_eq!(e.reason(), "passthrough_required");
    k.call_provider(own.expose(), with_key("byok")).await.unwrap();
    assert_eq!(k.agent("plain").unwrap().reserved_micro, 0);
    assert_clean(&k);
}

#[tokio::test]
async fn streaming_passes_chunks_through_and_settles_from_the_usage_chunk() {
    let (a, b) = servers().await;
    let usage = json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                       "usage": {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53}});
    Mock::given(body_partial_json(json!({"stream": true, "stream_options": {"include_usage": true}})))
        .respond_with(ResponseTemplate::new(200).set_body_raw(sse(&[chunk("Hel"), chunk("lo"), chunk("!"), usage], true), "text/event-stream"))
        .mount(&a)
        .await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let mut got = Vec::new();
    let mut call = chat("mini");
    call.body["stream"] = json!(true);
    let reply = k.stream_provider(token.expose(), call, &mut |data| {
        got.push(data.to_string());
        true
    }).await.unwrap();
    assert_eq!(got.len(), 4);
    assert!(!reply.estimated);
    assert_eq!(reply.settlement.cost_micro, 8 + 2);
    assert_clean(&k);
}

#[tokio::test]
async fn a_stream_cut_or_abandoned_settles_from_counted_output() {
    let (a, b) = servers().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(sse(&[chunk("partial "), chunk("answer")], false), "text/event-stream"))
        .mount(&a)
        .await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let mut call = chat("solo");
    call.body["stream"] = json!(true);
    let e = k.stream_provider(token.expose(), call.clone(), &mut |_| true).await.unwrap_err().error;
    assert_eq!(e.status(), 503, "{e}");
    let committed: Vec<_> = k.events(1, 100).unwrap().into_iter().filter(|e| e.kind == "execution.committed").collect();
    assert!(committed[0].data.contains("\"estimated\":true"), "{}", committed[0].data);

    let reply = k.stream_provider(token.expose(), call, &mut |_| false).await.unwrap();
    assert!(reply.estimated);
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, 0);
    assert_clean(&k);
}

#[tokio::test]
async fn a_provider_429_returns_the_reservation_with_its_retry_after() {
    let (a, b) = servers().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2")).expect(1).mount(&a).await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let e = k.call_provider(token.expose(), chat("mini")).await.unwrap_err().error;
    assert_eq!(e, Error::RateLimited { window: aex_core::RateWindow::Provider, limit: 0, retry_after_ms: 2_000 });
    let a_ = k.agent("atlas").unwrap();
    assert_eq!((a_.spent_micro, a_.reserved_micro), (0, 0));
    assert!(kinds(&k).contains(&"execution.failed".to_string()));
    assert_clean(&k);
}

#[tokio::test]
async fn server_errors_are_retried_then_fall_back_to_the_next_provider() {
    let (a, b) = servers().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).expect(2).mount(&a).await;
    Mock::given(body_partial_json(json!({"model": "backup", "max_tokens": 500})))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_reply("backup")))
        .expect(1)
        .mount(&b)
        .await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let reply = k.call_provider(token.expose(), ProviderCall { execution_id: Some("job-7".into()), ..chat("mini") }).await.unwrap();
    assert_eq!((reply.model.as_str(), reply.attempts), ("backup", 3));
    assert_eq!(reply.settlement.execution_id, "job-7.fallback1");
    assert_eq!(k.execution("job-7").unwrap().state, aex_core::ExecutionState::Failed);
    assert_eq!(k.execution("job-7.retry1").unwrap().state, aex_core::ExecutionState::Failed);
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 100 + 40);
    assert_clean(&k);
}

#[tokio::test]
async fn a_hang_past_the_timeout_is_charged_in_full_and_reported() {
    let (a, b) = servers().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_reply("m")).set_delay(Duration::from_secs(3)))
        .mount(&a)
        .await;
    let k = kernel(&a, &b, Duration::from_millis(200));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let mut call = chat("solo");
    call.body["max_tokens"] = json!(10);
    let e = k.call_provider(token.expose(), call).await.unwrap_err().error;
    assert_eq!(e.status(), 503);
    assert!(e.to_string().contains("no answer within 200 ms"), "{e}");
    // The request may have reached the provider: charged its full reservation (2 input tokens
    // counted + 10 output), once — a call that may have cost money is never retried.
    assert_eq!(a.received_requests().await.unwrap().len(), 1);
    let reserved = k.execution(&k.events(1, 100).unwrap().into_iter().find(|e| e.kind == "execution.reserved").unwrap().execution_id.unwrap()).unwrap().reserved_micro;
    assert_eq!(k.agent("atlas").unwrap().spent_micro, reserved);
    assert_clean(&k);
}

#[tokio::test]
async fn embeddings_and_responses_are_governed_too() {
    let (a, b) = servers().await;
    Mock::given(path("/v1/embeddings"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"object": "list", "data": [], "model": "embed", "usage": {"prompt_tokens": 16, "total_tokens": 16}})))
        .mount(&b)
        .await;
    Mock::given(path("/v1/responses"))
        .and(body_partial_json(json!({"max_output_tokens": 4096})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "r", "output_text": "hi", "usage": {"input_tokens": 40, "output_tokens": 10}})))
        .mount(&a)
        .await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let e = k.call_provider(token.expose(), ProviderCall::new(Endpoint::Embeddings, json!({"model": "embed", "input": ["a", "b"]}))).await.unwrap();
    assert_eq!(e.settlement.cost_micro, 1);
    let r = k.call_provider(token.expose(), ProviderCall::new(Endpoint::Responses, json!({"model": "solo", "input": "hello"}))).await.unwrap();
    assert_eq!(r.settlement.cost_micro, 40 + 10);
    assert_clean(&k);
}

#[test]
fn the_blocking_api_and_concurrent_streams_racing_one_budget() {
    const K: i64 = 12;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(servers());
    let usage = json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}});
    rt.block_on(
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(sse(&[chunk("x"), usage], true), "text/event-stream"))
            .mount(&a),
    );
    let k = kernel(&a, &b, Duration::from_secs(5));
    // Each call reserves 13 input tokens (the byte bound of "user" + "hi" + framing) + 10 output
    // at $1/M = 23 micro-USD and is charged 5 + 10 = 15.
    let token = k.create_agent(&AgentSpec::new("atlas", K * 23)).unwrap().token.expose().to_string();
    let admitted = Arc::new(AtomicI64::new(0));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (k, token, admitted) = (k.clone(), token.clone(), admitted.clone());
            std::thread::spawn(move || loop {
                let mut call = chat("solo");
                call.body["stream"] = json!(true);
                call.body["max_tokens"] = json!(10);
                match k.stream_provider_blocking(&token, call, &mut |_| true) {
                    Ok(r) => {
                        assert_eq!(r.settlement.cost_micro, 15);
                        let a = k.agent("atlas").unwrap();
                        assert!(a.spent_micro + a.reserved_micro <= a.budget_micro, "overshoot: {a:?}");
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        assert_eq!(e.error.status(), 402, "{e}");
                        return;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let agent = k.agent("atlas").unwrap();
    let n = admitted.load(Ordering::SeqCst);
    assert!(n >= K, "every reservation that fitted ran: {n}");
    assert_eq!((agent.spent_micro, agent.reserved_micro), (n * 15, 0));
    assert!(agent.budget_micro - agent.spent_micro < 23, "stopped only when the next reservation no longer fitted");
    assert_clean(&k);
    drop(rt);
}

#[tokio::test]
async fn an_unreachable_provider_returns_every_reservation() {
    let (a, b) = servers().await;
    // Nothing listens on the discard port of 127.0.0.1: every connection is refused.
    let yaml = "providers:\n  gone: {base_url: \"http://127.0.0.1:9/v1\"}\nmodels:\n  lost: {provider: gone, input_price: 1, output_price: 1}\n";
    let options = KernelOptions {
        config: Config::from_yaml(yaml).unwrap(),
        dispatch: DispatchOptions { max_retries: 2, retry_base_delay: Duration::from_millis(1), ..Default::default() },
        ..Default::default()
    };
    let k = common::store_kernel(options);
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let e = k.call_provider(token.expose(), chat("lost")).await.unwrap_err().error;
    assert_eq!(e.status(), 503, "{e}");
    assert!(e.to_string().contains("every attempt failed (3)"), "{e}");
    // Nothing was ever written to a provider: each attempt's reservation was released.
    let released = kinds(&k).iter().filter(|k| *k == "execution.released").count();
    assert_eq!(released, 3);
    let agent = k.agent("atlas").unwrap();
    assert_eq!((agent.spent_micro, agent.reserved_micro), (0, 0));
    assert_clean(&k);
    drop((a, b));
}

#[tokio::test]
async fn an_execution_id_is_never_sent_twice() {
    let (a, b) = servers().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(chat_reply("m"))).expect(1).mount(&a).await;
    let k = kernel(&a, &b, Duration::from_secs(5));
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token;
    let call = ProviderCall { execution_id: Some("once".into()), ..chat("solo") };
    k.call_provider(token.expose(), call.clone()).await.unwrap();
    let e = k.call_provider(token.expose(), call).await.unwrap_err().error;
    assert_eq!((e.status(), e.reason()), (409, "idempotency_conflict"));
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 120);
    assert_clean(&k);
}
