//! The two money rules at the dispatcher's edge, against servers on 127.0.0.1: what is sent never
//! asks for more than was reserved, and what may have reached the provider ends charged — and is
//! never sent again.

mod common;

use std::time::Duration;

use aex_core::dispatch::{Cancel, DispatchOptions, Endpoint, ProviderCall};
use aex_core::{AgentSpec, Config, Kernel, KernelOptions};
use common::{assert_clean, raw_server};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// `capped` ($1 / $2 per million tokens, output capped at 100) on `primary`, falling back to
/// `other` on `secondary`.
fn kernel(primary: &str, secondary: &str, timeout: Duration, key_env: &str) -> Kernel {
    let yaml = format!(
        "providers:\n  primary: {{base_url: \"{primary}/v1\"{key_env}}}\n  secondary: {{base_url: \"{secondary}/v1\"}}\n\
         models:\n  capped: {{provider: primary, input_price: 1, output_price: 2, max_output_tokens: 100, fallbacks: [other]}}\n  \
         other: {{provider: secondary, input_price: 1, output_price: 2, max_output_tokens: 100}}\n"
    );
    let options = KernelOptions {
        config: Config::from_yaml(&yaml).unwrap(),
        dispatch: DispatchOptions { request_timeout: timeout, max_retries: 2, retry_base_delay: Duration::from_millis(1), ..Default::default() },
        ..Default::default()
    };
    common::store_kernel(options)
}

fn token(k: &Kernel, passthrough: bool) -> String {
    let mut spec = AgentSpec::new("atlas", 1_000_000);
    spec.allow_passthrough = passthrough;
    k.create_agent(&spec).unwrap().token.expose().to_string()
}

fn chat(extra: Value) -> ProviderCall {
    let mut body = json!({"model": "capped", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    ProviderCall::new(Endpoint::ChatCompletions, body)
}

fn reply(usage: Value) -> Value {
    json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}], "usage": usage})
}

/// (spent, reserved) of the agent, and the kinds of its settlement events.
fn books(k: &Kernel) -> (i64, i64, Vec<String>) {
    let a = k.agent("atlas").unwrap();
    let kinds = k.events(1, 1_000).unwrap().into_iter().map(|e| e.kind).filter(|k| k.starts_with("execution.") && k != "execution.reserved" && k != "execution.dispatched").collect();
    (a.spent_micro, a.reserved_micro, kinds)
}

/// The reservation of the only execution: input counted + 100 output tokens.
fn reservation(k: &Kernel) -> i64 {
    let id = k.events(1, 100).unwrap().into_iter().find(|e| e.kind == "execution.reserved").unwrap().execution_id.unwrap();
    k.execution(&id).unwrap().reserved_micro
}

async fn sent_bodies(server: &MockServer) -> Vec<Value> {
    server.received_requests().await.unwrap().iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
}

#[tokio::test]
async fn the_output_cap_sent_is_the_reservations_whatever_the_body_asks() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(reply(json!({"prompt_tokens": 9, "completion_tokens": 100})))).mount(&a).await;
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
    let t = token(&k, false);
    for extra in [
        json!({"max_tokens": 100_000}),
        json!({"max_tokens": null}),
        json!({"max_completion_tokens": 100_000}),
        json!({"max_completion_tokens": null, "max_tokens": 5_000}),
        json!({}),
    ] {
        k.call_provider(&t, chat(extra.clone())).await.unwrap();
        let sent = sent_bodies(&a).await.pop().unwrap();
        for key in ["max_tokens", "max_completion_tokens"] {
            if extra.get(key).is_some() || (key == "max_tokens" && extra.get("max_completion_tokens").is_none()) {
                assert_eq!(sent[key], 100, "{extra} was sent as {sent}");
            }
        }
    }
    let mut responses = ProviderCall::new(Endpoint::Responses, json!({"model": "capped", "input": "hi", "max_output_tokens": 9_999}));
    responses.execution_id = Some("r1".into());
    k.call_provider(&t, responses).await.unwrap();
    assert_eq!(sent_bodies(&a).await.pop().unwrap()["max_output_tokens"], 100);
    let (_, reserved, kinds) = books(&k);
    assert_eq!(reserved, 0);
    assert!(!kinds.contains(&"execution.overrun".to_string()), "{kinds:?}");
    assert_clean(&k);
}

#[tokio::test]
async fn output_multipliers_and_plain_streams_are_refused_before_anything_is_reserved_or_sent() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
    let t = token(&k, false);
    // And a plain call asking to stream: its answer could not be read as one body.
    for (field, extra) in [("n", json!({"n": 5})), ("best_of", json!({"best_of": 3})), ("n", json!({"n": "2"})), ("stream", json!({"stream": true})), ("stream", json!({"stream": 1})), ("stream", json!({"stream": "true"}))] {
        let e = k.call_provider(&t, chat(extra)).await.unwrap_err().error;
        assert!(matches!(&e, aex_core::Error::InvalidRequest { field: f, .. } if f == field), "{e}");
    }
    k.call_provider(&t, chat(json!({"n": 1}))).await.unwrap_err(); // allowed; the mock has no reply
    assert_eq!(a.received_requests().await.unwrap().len(), 1, "only n = 1 was sent");
    assert_clean(&k);
}

#[tokio::test]
async fn redirects_are_not_followed_and_return_the_reservation() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    let elsewhere = format!("{}/v1/chat/completions", b.uri());
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(307).insert_header("location", elsewhere.as_str())).mount(&a).await;
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
    let t = token(&k, false);
    let e = k.call_provider(&t, chat(json!({}))).await.unwrap_err().error;
    assert_eq!(e.status(), 503, "{e}");
    assert!(e.to_string().contains("redirect"), "{e}");
    assert_eq!(a.received_requests().await.unwrap().len(), 1, "answered once, not retried");
    assert!(b.received_requests().await.unwrap().is_empty(), "the prompt went neither where the redirect pointed nor to a fallback");
    assert_eq!(books(&k), (0, 0, vec!["execution.failed".into()]));
    assert_clean(&k);
}

#[tokio::test]
async fn a_passthrough_key_never_reaches_another_providers_fallback() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).mount(&a).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(reply(json!({"prompt_tokens": 9, "completion_tokens": 1})))).mount(&b).await;
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), ", api_key_env: AEX_TEST_NEVER_SET");
    let t = token(&k, true);
    let mut call = chat(json!({}));
    call.passthrough_key = Some("sk-agent-own-key".into());
    let e = k.call_provider(&t, call).await.unwrap_err().error;
    assert_eq!(e.status(), 503, "{e}");
    assert_eq!(a.received_requests().await.unwrap().len(), 3, "tried and retried on its own provider");
    assert!(b.received_requests().await.unwrap().is_empty(), "the fallback's provider got neither the key nor the prompt");
    assert_eq!(books(&k).0, 0);
    assert_clean(&k);
}

/// A 200 whose body is HTML or cut JSON was work done: charged in full, estimated, never retried.
#[tokio::test]
async fn an_unreadable_2xx_is_charged_once_and_not_retried() {
    for body in ["<html><body>gateway</body></html>", "{\"id\": \"x\", \"choices\": [{\"message\": {\"content\": \"tru"] {
        let (a, b) = (MockServer::start().await, MockServer::start().await);
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_raw(body, "application/json")).mount(&a).await;
        let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
        let t = token(&k, false);
        let e = k.call_provider(&t, chat(json!({}))).await.unwrap_err().error;
        assert_eq!(e.status(), 503, "{e}");
        assert!(e.to_string().contains("charged"), "{e}");
        assert_eq!(a.received_requests().await.unwrap().len(), 1);
        assert!(b.received_requests().await.unwrap().is_empty(), "no fallback either");
        let (spent, reserved, kinds) = books(&k);
        assert_eq!((spent, reserved, kinds), (reservation(&k), 0, vec!["execution.committed".to_string()]));
        assert!(k.events(1, 100).unwrap().iter().any(|e| e.data.contains("\"estimated\":true")));
        assert_clean(&k);
    }
}

/// Usage the provider reports out of range is not trusted: the answer still comes back, and the
/// call is charged its full reservation instead of being left open.
#[tokio::test]
async fn usage_out_of_range_settles_at_the_reservation_and_keeps_the_answer() {
    for usage in [json!({"prompt_tokens": -1, "completion_tokens": 5}), json!({"prompt_tokens": 9, "completion_tokens": 1_000_000_000_000_i64})] {
        let (a, b) = (MockServer::start().await, MockServer::start().await);
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(reply(usage.clone()))).mount(&a).await;
        let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
        let t = token(&k, false);
        let r = k.call_provider(&t, chat(json!({}))).await.unwrap();
        assert_eq!(r.response["choices"][0]["message"]["content"], "ok");
        assert!(r.estimated);
        assert_eq!(books(&k), (reservation(&k), 0, vec!["execution.committed".into()]), "{usage}");
        assert_clean(&k);
    }
}

/// Tool-call arguments are output: without a usage report they are counted, plain and streamed.
#[tokio::test]
async fn tool_call_arguments_are_counted_when_no_usage_is_reported() {
    let args = format!("{{\"query\": \"{}\"}}", "weather in paris ".repeat(4));
    let plain = json!({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
        "tool_calls": [{"id": "t", "type": "function", "function": {"name": "search", "arguments": args}}]}}]});
    let pieces: Vec<String> = args.as_bytes().chunks(8).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
    let mut sse: String = pieces
        .iter()
        .map(|p| format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}]})))
        .collect();
    sse.push_str("data: [DONE]\n\n");
    for streamed in [false, true] {
        let (a, b) = (MockServer::start().await, MockServer::start().await);
        let template = if streamed { ResponseTemplate::new(200).set_body_raw(sse.clone(), "text/event-stream") } else { ResponseTemplate::new(200).set_body_json(plain.clone()) };
        Mock::given(method("POST")).respond_with(template).mount(&a).await;
        let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
        let t = token(&k, false);
        let r = if streamed {
            k.stream_provider(&t, chat(json!({"stream": true})), &mut |_| true).await.unwrap()
        } else {
            k.call_provider(&t, chat(json!({}))).await.unwrap()
        };
        assert!(r.estimated);
        let e = k.execution(&r.settlement.execution_id).unwrap();
        let output = e.usage.unwrap().output_tokens;
        assert_eq!(output, args.len() as i64, "streamed={streamed}: the byte bound of the arguments, for a model without a tokenizer");
        assert_clean(&k);
    }
}

/// A provider that reads the whole request and closes the connection may have processed it:
/// charged, and not sent again.
#[tokio::test]
async fn a_connection_lost_after_sending_is_charged_and_not_retried() {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let url = raw_server(move |socket| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { drop(socket) }
    })
    .await;
    let b = MockServer::start().await;
    let k = kernel(&url, &b.uri(), Duration::from_secs(5), "");
    let t = token(&k, false);
    let failure = k.call_provider(&t, chat(json!({}))).await.unwrap_err();
    let e = &failure.error;
    assert_eq!(e.status(), 503, "{e}");
    // The failure says what it cost, and which execution it was.
    let settlement = failure.settlement.as_ref().expect("the charged attempt's settlement");
    assert_eq!(settlement.cost_micro, reservation(&k));
    assert_eq!(failure.execution_id.as_deref(), Some(settlement.execution_id.as_str()));
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1, "sent once");
    assert!(b.received_requests().await.unwrap().is_empty());
    assert_eq!(books(&k), (reservation(&k), 0, vec!["execution.committed".into()]));
    assert_clean(&k);
}

/// `request_timeout` bounds the wait for the answer and each gap in a stream, not the length of
/// a healthy stream; keep-alive events with no data are skipped.
#[tokio::test]
async fn a_slow_healthy_stream_is_not_cut_and_pings_are_skipped() {
    let url = raw_server(|mut socket| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut events: Vec<String> = (0..6).map(|i| format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": format!("w{i} ")}}]}))).collect();
        events.insert(2, "event: ping\ndata:\n\n".into());
        events.push(format!("data: {}\n\n", json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6}})));
        events.push("data: [DONE]\n\n".into());
        for e in events {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let chunk = format!("{:x}\r\n{e}\r\n", e.len());
            if socket.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = socket.write_all(b"0\r\n\r\n").await;
    })
    .await;
    let b = MockServer::start().await;
    // 9 events 400 ms apart: 3.6 s in all, each gap well under the 1.5 s timeout.
    let k = kernel(&url, &b.uri(), Duration::from_millis(1_500), "");
    let t = token(&k, false);
    let mut chunks = Vec::new();
    let r = k
        .stream_provider(&t, chat(json!({"stream": true})), &mut |data| {
            chunks.push(data.to_string());
            true
        })
        .await
        .unwrap();
    assert!(!r.estimated, "settled from the usage chunk");
    assert_eq!(chunks.len(), 7, "six deltas and the usage chunk; no empty ping payload: {chunks:?}");
    assert!(chunks.iter().all(|c| !c.is_empty()));
    assert_eq!(r.settlement.cost_micro, 9 + 12);
    assert_clean(&k);
}

/// The response comes back exactly as the provider sent it: key order, number forms and all.
#[tokio::test]
async fn the_providers_bytes_come_back_unchanged() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    let body = r#"{"z": 1.10, "big": 12345678901234567890123, "id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}"#;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_raw(body, "application/json")).mount(&a).await;
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
    let t = token(&k, false);
    let r = k.call_provider(&t, chat(json!({}))).await.unwrap();
    assert_eq!(r.raw, body);
    assert_clean(&k);
}

/// A server that answers a stream with `chunks` deltas of one word each, then stalls (never
/// ends), or, with no chunks, reads the request and never answers.
async fn stalling_server(chunks: usize) -> String {
    raw_server(move |mut socket| async move {
        if chunks > 0 {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            for i in 0..chunks {
                let e = format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": format!("word{i} ")}}]}));
                socket.write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes()).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    })
    .await
}

/// Cancelling a stream stops it at once — not at the provider's next chunk — and charges what was
/// counted; the failure carries that settlement.
#[tokio::test]
async fn a_cancelled_stream_stops_at_once_and_is_charged_for_what_was_counted() {
    let url = stalling_server(3).await;
    let b = MockServer::start().await;
    let k = kernel(&url, &b.uri(), Duration::from_secs(60), "");
    let t = token(&k, false);
    let call = chat(json!({"stream": true}));
    let cancel = call.cancel.clone();
    let mut seen = 0;
    let started = std::time::Instant::now();
    let failure = k
        .stream_provider(&t, call, &mut |_| {
            seen += 1;
            if seen == 3 {
                let c = cancel.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    c.cancel();
                });
            }
            true
        })
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30), "returned at the cancellation, not at the provider's pace");
    assert_eq!(failure.error.status(), 503, "{}", failure.error);
    assert!(failure.error.to_string().contains("cancelled"), "{}", failure.error);
    let s = failure.settlement.expect("settled");
    let counted = aex_core::admission::count_text_tokens("capped", "word0 word1 word2 ");
    let input = k.execution(&s.execution_id).unwrap().input_tokens;
    assert_eq!(s.cost_micro, input + 2 * counted, "input plus the three words counted");
    let (_, reserved, kinds) = books(&k);
    assert_eq!((reserved, kinds), (0, vec!["execution.committed".to_string()]));
    assert!(k.events(1, 100).unwrap().iter().any(|e| e.kind == "execution.committed" && e.data.contains("\"estimated\":true")));
    assert_clean(&k);
}

/// Cancelled while waiting for the answer: the request was sent, nothing was seen, so the full
/// reservation is charged (never under-charged).
#[tokio::test]
async fn a_call_cancelled_while_waiting_for_its_answer_is_charged_in_full() {
    let url = stalling_server(0).await;
    let b = MockServer::start().await;
    let k = kernel(&url, &b.uri(), Duration::from_secs(60), "");
    let t = token(&k, false);
    let call = chat(json!({}));
    let cancel = call.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let failure = tokio::time::timeout(Duration::from_secs(30), k.call_provider(&t, call)).await.expect("returned at the cancellation").unwrap_err();
    assert_eq!(failure.settlement.map(|s| s.cost_micro), Some(reservation(&k)));
    assert_eq!(books(&k), (reservation(&k), 0, vec!["execution.committed".into()]));
    assert!(b.received_requests().await.unwrap().is_empty(), "no fallback after a cancellation");
    assert_clean(&k);
}

/// Cancelled before anything was sent — up front, or during a retry's backoff after a free
/// failure — nothing more is admitted or sent, and nothing is charged.
#[tokio::test]
async fn a_call_cancelled_before_sending_or_between_retries_costs_nothing() {
    let a = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&a).await;
    let yaml = format!(
        "providers:\n  primary: {{base_url: \"{}/v1\"}}\nmodels:\n  capped: {{provider: primary, input_price: 1, output_price: 2, max_output_tokens: 100}}\n",
        a.uri()
    );
    let options = KernelOptions {
        config: Config::from_yaml(&yaml).unwrap(),
        dispatch: DispatchOptions { max_retries: 2, retry_base_delay: Duration::from_secs(60), ..Default::default() },
        ..Default::default()
    };
    let k = common::store_kernel(options);
    let t = token(&k, false);

    let up_front = chat(json!({}));
    up_front.cancel.cancel();
    let failure = k.call_provider(&t, up_front).await.unwrap_err();
    assert_eq!((failure.execution_id, failure.settlement), (None, None), "nothing was admitted");
    assert!(a.received_requests().await.unwrap().is_empty());

    let call = chat(json!({}));
    let cancel = Cancel::new();
    let mut call = call;
    call.cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel();
    });
    let failure = tokio::time::timeout(Duration::from_secs(30), k.call_provider(&t, call)).await.expect("the backoff was cut short").unwrap_err();
    assert_eq!(a.received_requests().await.unwrap().len(), 1, "no retry after the cancellation");
    let s = failure.settlement.expect("the refused attempt's settlement");
    assert_eq!((s.cost_micro, s.state), (0, aex_core::ExecutionState::Failed));
    assert_eq!(books(&k), (0, 0, vec!["execution.failed".into()]));
    assert_clean(&k);
}

/// The call object alone, as a binding drives it: every ending settles by the rules, exactly once,
/// and a call dropped without an ending (a panic, a cancelled task) still settles.
#[test]
fn a_call_settles_by_how_it_ended() {
    use aex_core::AdmitRequest;
    use aex_core::call::{Call, Ending};
    let k = kernel("http://127.0.0.1:9", "http://127.0.0.1:9", Duration::from_secs(5), "");
    let t = token(&k, false);
    let admit = |id: &str| k.admit_dispatched(&t, &AdmitRequest::new("capped").input_tokens(10).max_output_tokens(100).execution_id(id)).unwrap();
    let cost = |id: &str| k.execution(id).unwrap();

    // Not sent: released. Sent and refused: failed. Neither charges anything.
    let c = Call::new(&k, &admit("not-sent"), "capped");
    assert_eq!(c.end(Ending::Interrupted("cancelled".into())).unwrap().settlement.state.as_str(), "RELEASED");
    let mut c = Call::new(&k, &admit("refused"), "capped");
    c.sent();
    assert_eq!(c.end(Ending::Refused { status: 503 }).unwrap().settlement.state.as_str(), "FAILED");

    // Sent, then dropped with nothing seen: the full reservation, estimated.
    let a = admit("dropped");
    let mut c = Call::new(&k, &a, "capped");
    c.sent();
    drop(c);
    assert_eq!((cost("dropped").state.as_str(), cost("dropped").cost_micro), ("COMMITTED", Some(a.reserved_micro)));

    // Sent, some output, then interrupted: the input plus the output counted (bytes here).
    let mut c = Call::new(&k, &admit("cut"), "capped");
    c.sent();
    c.output("twelve bytes");
    let s = c.end(Ending::Interrupted("cut".into())).unwrap();
    assert!(s.estimated);
    assert_eq!(cost("cut").usage.unwrap().output_tokens, 12);

    // A valid usage report wins over counting; a bad one is distrusted (full reservation).
    let mut c = Call::new(&k, &admit("reported"), "capped");
    c.sent();
    c.output("ignored when usage is reported");
    c.usage(&json!({"prompt_tokens": 10, "completion_tokens": 3}), false);
    let s = c.end(Ending::Completed).unwrap();
    assert_eq!((s.estimated, s.settlement.cost_micro), (false, 10 + 6));
    let a = admit("bad-usage");
    let mut c = Call::new(&k, &a, "capped");
    c.sent();
    c.usage(&json!({"prompt_tokens": 10, "completion_tokens": -3}), false);
    assert_eq!(c.end(Ending::Completed).unwrap().settlement.cost_micro, a.reserved_micro);

    // A failure reported after output was seen: that output was work, so it is charged.
    let mut c = Call::new(&k, &admit("failed-late"), "capped");
    c.sent();
    c.output("twelve bytes");
    let s = c.end(Ending::Failed("500 mid-stream".into())).unwrap();
    assert_eq!((s.estimated, s.settlement.state.as_str()), (true, "COMMITTED"));
    assert_eq!(cost("failed-late").usage.unwrap().output_tokens, 12);

    // Marked sent, but the connection was never made: released.
    let mut c = Call::new(&k, &admit("never-connected"), "capped");
    c.sent();
    assert_eq!(c.end(Ending::NotSent("cannot connect".into())).unwrap().settlement.state.as_str(), "RELEASED");
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, 0);
    assert_clean(&k);
}

/// A listener whose backlog is full: connections to it hang until the client gives up.
fn full_backlog() -> (String, Vec<std::net::TcpStream>) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; the listener takes it over.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(libc::bind(fd, std::ptr::from_ref(&addr).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t), 0);
        assert_eq!(libc::listen(fd, 0), 0);
        std::net::TcpListener::from_raw_fd(fd)
    };
    let addr = listener.local_addr().unwrap();
    // Fill the accept queue (never accepted) until a connection no longer completes at once.
    let mut held = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    std::mem::forget(listener);
    (format!("http://{addr}"), held)
}

/// A connection still pending when the answer's timeout would run out sent nothing: it fails as
/// a connection first (the connect timeout is at most half the request timeout) and the
/// reservation is released, whatever the two timeouts were set to.
#[tokio::test]
async fn a_connection_that_never_opens_is_released_even_with_a_short_request_timeout() {
    let (url, _held) = full_backlog();
    let b = MockServer::start().await;
    let yaml = format!(
        "providers:\n  primary: {{base_url: \"{url}/v1\"}}\nmodels:\n  capped: {{provider: primary, input_price: 1, output_price: 2, max_output_tokens: 100}}\n"
    );
    let options = KernelOptions {
        config: Config::from_yaml(&yaml).unwrap(),
        dispatch: DispatchOptions {
            connect_timeout: Duration::from_millis(600),
            request_timeout: Duration::from_millis(400),
            max_retries: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let k = common::store_kernel(options);
    let t = token(&k, false);
    let failure = k.call_provider(&t, chat(json!({}))).await.unwrap_err();
    assert!(failure.error.to_string().contains("cannot reach"), "{}", failure.error);
    assert_eq!(failure.settlement.map(|s| (s.state, s.cost_micro)), Some((aex_core::ExecutionState::Released, 0)));
    assert_eq!(books(&k), (0, 0, vec!["execution.released".into()]));
    drop(b);
    assert_clean(&k);
}

/// Everything the provider bills as input is counted before the call, so a request whose input
/// lies outside the message text is reserved for — here, refused by a budget it would blow —
/// and never sent.
#[tokio::test]
async fn input_outside_the_message_text_is_counted_before_sending() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(reply(json!({"prompt_tokens": 9, "completion_tokens": 1})))).mount(&a).await;
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
    let mut spec = AgentSpec::new("atlas", 10_000); // about 10,000 input tokens at $1 / million
    spec.allow_passthrough = false;
    let t = k.create_agent(&spec).unwrap().token.expose().to_string();
    let big = "lorem ipsum ".repeat(10_000); // ~20,000 tokens
    let hi = json!([{"role": "user", "content": "hi"}]);
    let chat_cases = [
        ("tools", json!({"messages": hi, "tools": [{"type": "function", "function": {"name": "f", "description": big, "parameters": {"type": "object"}}}]})),
        ("response_format", json!({"messages": hi, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "description": big}}})),
        ("tool calls in the history", json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": big}}]}]})),
        ("a tool's answer", json!({"messages": [{"role": "tool", "tool_call_id": "1", "content": big}]})),
    ];
    for (what, extra) in chat_cases {
        let e = k.call_provider(&t, chat(extra)).await.unwrap_err().error;
        assert_eq!(e.status(), 402, "{what}: {e}");
    }
    let responses = ProviderCall::new(Endpoint::Responses, json!({"model": "capped", "input": [{"type": "function_call_output", "call_id": "1", "output": big}]}));
    assert_eq!(k.call_provider(&t, responses).await.unwrap_err().error.status(), 402, "a Responses input item");
    let tokens = ProviderCall::new(Endpoint::Embeddings, json!({"model": "capped", "input": vec![vec![1; 8_000]; 2]}));
    assert_eq!(k.call_provider(&t, tokens).await.unwrap_err().error.status(), 402, "embeddings as token arrays");
    // Input stored at the provider cannot be counted: refused, naming the field.
    for stored in ["previous_response_id", "conversation", "prompt"] {
        let call = ProviderCall::new(Endpoint::Responses, json!({"model": "capped", "input": "hi", stored: "resp_1"}));
        let e = k.call_provider(&t, call).await.unwrap_err().error;
        assert!(matches!(&e, aex_core::Error::InvalidRequest { field, .. } if field == stored), "{e}");
    }
    // Malformed messages are refused naming the field, not counted as nothing.
    for (field, messages) in [("messages", json!("a string")), ("messages[0].content", json!([{"role": "user", "content": 5}])), ("messages[0]", json!(["hi"]))] {
        let e = k.call_provider(&t, chat(json!({"messages": messages}))).await.unwrap_err().error;
        assert!(matches!(&e, aex_core::Error::InvalidRequest { field: f, .. } if f == field), "{field}: {e}");
    }
    assert!(a.received_requests().await.unwrap().is_empty(), "nothing was sent");
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 0);
    // The same small request is admitted and sent.
    k.call_provider(&t, chat(json!({"messages": hi}))).await.unwrap();
    assert_clean(&k);
}

/// A 2xx whose body is an error object is not an answer: charged in full (it may have been
/// work), reported, and not retried.
#[tokio::test]
async fn a_2xx_error_object_is_charged_in_full_and_reported() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(json!({"error": {"message": "overloaded"}}))).mount(&a).await;
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
    let t = token(&k, false);
    let failure = k.call_provider(&t, chat(json!({}))).await.unwrap_err();
    assert_eq!(failure.error.status(), 503, "{}", failure.error);
    assert_eq!(failure.settlement.map(|s| s.cost_micro), Some(reservation(&k)));
    assert_eq!(a.received_requests().await.unwrap().len(), 1);
    assert_clean(&k);
}

/// A provider refusing the key (401, 403) is the operator's problem, not the request's: 503
/// saying so, the reservation returned, not retried.
#[tokio::test]
async fn a_refused_key_is_unavailable_not_a_bad_request() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": {"message": "bad key"}}))).mount(&a).await;
    let k = kernel(&a.uri(), &b.uri(), Duration::from_secs(5), "");
    let t = token(&k, false);
    let failure = k.call_provider(&t, chat(json!({}))).await.unwrap_err();
    assert_eq!(failure.error.status(), 503, "{}", failure.error);
    assert!(failure.error.to_string().contains("refused the key"), "{}", failure.error);
    assert_eq!(failure.settlement.map(|s| (s.state, s.cost_micro)), Some((aex_core::ExecutionState::Failed, 0)));
    assert_eq!(a.received_requests().await.unwrap().len(), 1);
    assert_clean(&k);
}
