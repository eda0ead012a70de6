//! The gateway through HTTP, against providers on 127.0.0.1: governed calls and their errors,
//! limits on slow or large clients, disconnects and shutdown settling every call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aex_core::dispatch::DispatchOptions;
use aex_core::{AgentSpec, Config, Kernel, KernelOptions};
use aex_serve::{Gateway, ServeOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn kernel(provider: &str) -> Kernel {
    let yaml = format!(
        "providers:\n  p: {{base_url: \"{provider}/v1\"}}\nmodels:\n  mini: {{provider: p, input_price: 1, output_price: 2, max_output_tokens: 100}}\n  other: {{provider: p, input_price: 1, output_price: 2}}\n"
    );
    let options = KernelOptions {
        config: Config::from_yaml(&yaml).unwrap(),
        dispatch: DispatchOptions { request_timeout: Duration::from_secs(30), max_retries: 0, ..Default::default() },
        ..Default::default()
    };
    Kernel::open_in_memory(options).unwrap()
}

fn agent(k: &Kernel, name: &str, budget_micro: i64, edit: impl FnOnce(&mut AgentSpec)) -> String {
    let mut spec = AgentSpec::new(name, budget_micro);
    edit(&mut spec);
    k.create_agent(&spec).unwrap().token.expose().to_string()
}

/// A running gateway: its address, and the sender that shuts it down.
struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.done).await.expect("the gateway stopped").unwrap();
    }
}

async fn start(k: &Kernel, options: ServeOptions) -> Running {
    let gateway = Gateway::bind(k.clone(), ServeOptions { addr: "127.0.0.1:0".parse().unwrap(), ..options }).await.unwrap();
    let addr = gateway.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        gateway
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running { addr, stop: Some(tx), done }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "mini", "messages": [{"role": "user", "content": "hello"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn reply() -> Value {
    json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 1}})
}

fn assert_settled(k: &Kernel, name: &str) {
    assert_eq!(k.agent(name).unwrap().reserved_micro, 0, "nothing left reserved");
    let report = k.audit(None).unwrap();
    assert!(report.failure.is_none(), "{:?}", report.failure);
}

#[tokio::test]
async fn governed_calls_answer_the_providers_bytes_and_say_what_they_cost() {
    let provider = MockServer::start().await;
    let raw = r#"{"z": 1.10, "id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}"#;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_raw(raw, "application/json")).mount(&provider).await;
    let k = kernel(&provider.uri());
    let token = agent(&k, "atlas", 1_000_000, |_| {});
    let gw = start(&k, ServeOptions::default()).await;
    for prefix in ["/v1", "/openai/v1"] {
        let r = client().post(gw.url(&format!("{prefix}/chat/completions"))).bearer_auth(&token).json(&chat(json!({"max_tokens": 5000}))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-aex-execution-id"].to_str().unwrap().to_string();
        assert_eq!(r.headers()["x-aex-cost-micro"], "11");
        assert_eq!(r.text().await.unwrap(), raw, "the provider's bytes, unchanged");
        assert_eq!(k.execution(&id).unwrap().cost_micro, Some(11));
    }
    let sent: Value = serde_json::from_slice(&provider.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["max_tokens"], 100, "the output cap is the reservation's");
    assert_eq!(sent["model"], "mini");
    assert!(provider.received_requests().await.unwrap()[0].headers.get("authorization").is_none(), "the agent token is not forwarded");
    assert_settled(&k, "atlas");

    // The metrics say the same, in the Prometheus text format.
    let metrics = client().get(gw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "aex_agent_spent_micro{agent=\"atlas\"} 22",
        "aex_agent_reserved_micro{agent=\"atlas\"} 0",
        "aex_requests_total{endpoint=\"chat\",status=\"200\",code=\"ok\"} 2",
        "aex_settlements_total{state=\"committed\"} 2",
        "aex_provider_latency_seconds_count 2",
        "aex_gateway_overhead_seconds_count 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(metrics.contains("aex_store_transactions_total"), "{metrics}");
    gw.shutdown().await;
}

#[tokio::test]
async fn errors_are_openai_shaped_with_the_status_and_reason() {
    let provider = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(reply())).mount(&provider).await;
    let k = kernel(&provider.uri());
    let token = agent(&k, "atlas", 50, |_| {});
    let limited = agent(&k, "limited", 1_000_000, |s| s.rpm = Some(1));
    let only_other = agent(&k, "narrow", 1_000_000, |s| s.allowed_models = vec!["other".into()]);
    let gw = start(&k, ServeOptions { max_body_bytes: 4096, ..ServeOptions::default() }).await;
    let url = gw.url("/v1/chat/completions");
    let c = client();

    let error = |v: Value| v["error"].clone();
    let r = c.post(&url).json(&chat(json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error(r.json().await.unwrap())["code"], "missing_token");

    let r = c.post(&url).bearer_auth("aex_not-a-token").json(&chat(json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e = error(r.json().await.unwrap());
    assert_eq!((e["code"].as_str(), e["type"].as_str()), (Some("unknown_token"), Some("authentication_error")));

    let r = c.post(&url).bearer_auth(&token).body("{\"model\": ").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e = error(r.json().await.unwrap());
    assert_eq!(e["param"], "body");
    assert!(e["message"].as_str().unwrap().contains("JSON"), "{e}");

    let r = c.post(&url).bearer_auth(&token).json(&chat(json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 402);
    let e = error(r.json().await.unwrap());
    assert_eq!(e["code"], "budget_exceeded");
    assert!(e["needed_micro"].as_i64().unwrap() > 50 && e["remaining_micro"] == 50, "{e}");

    assert_eq!(c.post(&url).bearer_auth(&limited).json(&chat(json!({}))).send().await.unwrap().status(), 200);
    let r = c.post(&url).bearer_auth(&limited).json(&chat(json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let seconds: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=61).contains(&seconds), "{seconds}");
    assert_eq!(error(r.json().await.unwrap())["code"], "agent_rpm");

    let r = c.post(&url).bearer_auth(&token).body(format!("{{\"model\": \"mini\", \"pad\": \"{}\"}}", "x".repeat(10_000))).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error(r.json().await.unwrap())["code"], "body_too_large");

    let r = c.get(gw.url("/v1/models")).bearer_auth(&only_other).send().await.unwrap();
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(), ["other"]);
    assert_settled(&k, "atlas");
    gw.shutdown().await;
}

/// A provider that answers a stream with three deltas and then stalls; `hung_up` fires when the
/// gateway drops the connection.
async fn stalling_provider() -> (String, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = socket.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                let _ = socket.write_all(head.as_bytes()).await;
                for i in 0..3 {
                    let e = format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": format!("word{i} ")}}]}));
                    let _ = socket.write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes()).await;
                }
                // Wait for the gateway to hang up (a read of 0 bytes), at most a minute.
                let _ = tokio::time::timeout(Duration::from_secs(60), socket.read(&mut buf)).await;
                let _ = tx.send(());
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_has_its_call_cancelled_and_settled_at_once() {
    let (url, mut hung_up) = stalling_provider().await;
    let k = kernel(&url);
    let token = agent(&k, "atlas", 1_000_000, |_| {});
    let gw = start(&k, ServeOptions::default()).await;
    let mut r = client().post(gw.url("/v1/chat/completions")).bearer_auth(&token).json(&chat(json!({"stream": true}))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while seen.matches("word").count() < 3 {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    drop(r); // the client goes away while the provider stalls
    tokio::time::timeout(Duration::from_secs(10), hung_up.recv()).await.expect("the provider saw the gateway hang up");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while k.agent("atlas").unwrap().reserved_micro != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = k.agent("atlas").unwrap();
    assert_eq!(a.reserved_micro, 0);
    assert!(a.spent_micro > 0, "charged for what was counted");
    assert_settled(&k, "atlas");
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_calls_finish_within_the_grace_then_cancels_and_settles_them() {
    let (url, _hung_up) = stalling_provider().await;
    let k = kernel(&url);
    let token = agent(&k, "atlas", 1_000_000, |_| {});
    let gw = start(&k, ServeOptions { shutdown_grace: Duration::from_millis(300), ..ServeOptions::default() }).await;
    let mut r = client().post(gw.url("/v1/chat/completions")).bearer_auth(&token).json(&chat(json!({"stream": true}))).send().await.unwrap();
    let _ = r.chunk().await.unwrap();
    let started = std::time::Instant::now();
    gw.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(20), "shutdown did not wait for the stalled provider");
    let a = k.agent("atlas").unwrap();
    assert_eq!(a.reserved_micro, 0);
    assert!(a.spent_micro > 0);
    assert_settled(&k, "atlas");
}

#[tokio::test]
async fn slow_clients_cannot_hold_the_gateway() {
    let k = kernel("http://127.0.0.1:9");
    let gw = start(&k, ServeOptions { header_timeout: Duration::from_millis(300), idle_timeout: Duration::from_millis(300), ..ServeOptions::default() }).await;
    // Headers that never end: the connection is closed.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await.expect("closed by the header timeout").unwrap_or(0);
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"), "{}", String::from_utf8_lossy(&buf[..n]));
    // A body that never arrives: 408.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer aex_x\r\ncontent-length: 100\r\n\r\n{").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await.expect("answered").unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&buf[..n]));
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_token_and_beyond_loopback_one_is_required() {
    let k = kernel("http://127.0.0.1:9");
    let refused = Gateway::bind(k.clone(), ServeOptions { addr: "0.0.0.0:0".parse().unwrap(), ..ServeOptions::default() }).await;
    assert!(matches!(refused, Err(aex_core::Error::InvalidRequest { ref field, .. }) if field == "admin_token"));
    for bad in ["", "a;b", "two words"] {
        let refused = Gateway::bind(k.clone(), ServeOptions { admin_token: Some(bad.into()), ..ServeOptions::default() }).await;
        assert!(matches!(refused, Err(aex_core::Error::InvalidRequest { ref field, .. }) if field == "admin_token"), "{bad:?}");
    }
    let options = ServeOptions { admin_token: Some("s3cret-admin".into()), ..ServeOptions::default() };
    assert!(!format!("{options:?}").contains("s3cret"), "the admin token never reaches Debug output");
    let gw = start(&k, options).await;
    let c = client();
    for path in ["/admin/activity", "/admin/replay"] {
        assert_eq!(c.get(gw.url(path)).send().await.unwrap().status(), 401, "{path}");
        assert_eq!(c.get(gw.url(path)).bearer_auth("wrong").send().await.unwrap().status(), 401, "{path}");
        let r = c.get(gw.url(path)).bearer_auth("s3cret-admin").send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let lower = c.get(gw.url("/admin/replay")).header("authorization", "bearer  s3cret-admin").send().await.unwrap();
    assert_eq!(lower.status(), 200, "the scheme in any case, spaces trimmed");
    let replay: Value = c.get(gw.url("/admin/replay")).bearer_auth("s3cret-admin").send().await.unwrap().json().await.unwrap();
    assert_eq!(replay["clean"], true);
    let activity: Value = c.get(gw.url("/admin/activity?limit=5")).bearer_auth("s3cret-admin").send().await.unwrap().json().await.unwrap();
    assert_eq!(activity["data"][0]["kind"], "config.loaded");
    assert_eq!(c.get(gw.url("/health")).send().await.unwrap().status(), 200);
    gw.shutdown().await;
}

/// A provider that answers every chat request after `delay`, so that many are in flight at once.
async fn slow_provider(delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let body = reply().to_string();
    let answer: &'static str = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).leak();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// A thousand clients, each on its own connection, all with a call in flight at once: every one
/// answered, every one settled, the books exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_are_held_and_settled() {
    const CLIENTS: usize = 1_000;
    let url = slow_provider(Duration::from_millis(500)).await;
    let k = kernel(&url);
    let token = agent(&k, "atlas", 1_000_000_000, |_| {});
    let gw = start(&k, ServeOptions::default()).await;
    let body = chat(json!({})).to_string();
    let request: Arc<str> = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into();
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (request, barrier, addr) = (request.clone(), barrier.clone(), gw.addr);
            tokio::spawn(async move {
                let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
                barrier.wait().await; // every connection is open before any request is sent
                socket.write_all(request.as_bytes()).await.unwrap();
                let mut answer = Vec::new();
                socket.read_to_end(&mut answer).await.unwrap();
                String::from_utf8_lossy(&answer).into_owned()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let answer = tokio::time::timeout(Duration::from_secs(120), t).await.expect("answered in time").unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{}", answer.lines().next().unwrap_or(""));
        ok += 1;
    }
    assert_eq!(ok, CLIENTS);
    let a = k.agent("atlas").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (11 * CLIENTS as i64, 0));
    assert_settled(&k, "atlas");
    gw.shutdown().await;
}

/// A plain call whose client hangs up while the provider works: the request reached the provider,
/// so it is charged (in full, nothing having been seen), never released.
#[tokio::test]
async fn a_plain_call_whose_client_leaves_is_charged_not_released() {
    let url = slow_provider(Duration::from_secs(30)).await;
    let k = kernel(&url);
    let token = agent(&k, "atlas", 1_000_000, |_| {});
    let gw = start(&k, ServeOptions::default()).await;
    let body = chat(json!({})).to_string();
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nx-aex-execution-id: leaver\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while k.execution("leaver").map(|e| e.dispatched_at_ms.is_none()).unwrap_or(true) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // the request is with the provider
    drop(socket);
    while k.execution("leaver").unwrap().state.is_open() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = k.execution("leaver").unwrap();
    assert_eq!((e.state, e.cost_micro), (aex_core::ExecutionState::Committed, Some(e.reserved_micro)));
    assert_settled(&k, "atlas");
    gw.shutdown().await;
}

/// A stream names its execution in its headers, like a plain answer.
#[tokio::test]
async fn a_stream_names_its_execution() {
    let (url, _hung_up) = stalling_provider().await;
    let k = kernel(&url);
    let token = agent(&k, "atlas", 1_000_000, |_| {});
    let gw = start(&k, ServeOptions::default()).await;
    let r = client().post(gw.url("/v1/chat/completions")).bearer_auth(&token).json(&chat(json!({"stream": true}))).send().await.unwrap();
    let id = r.headers()["x-aex-execution-id"].to_str().unwrap().to_string();
    assert!(k.execution(&id).is_ok(), "{id}");
    drop(r);
    gw.shutdown().await;
}

/// An agent's own provider key (`x-aex-provider-key`) reaches its model's provider and nothing
/// else — not the ledger, not an error — and only agents allowed passthrough may send one.
#[tokio::test]
async fn a_passthrough_key_goes_to_the_provider_only_and_only_when_allowed() {
    let provider = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(reply())).mount(&provider).await;
    let k = kernel(&provider.uri());
    let own = agent(&k, "own", 1_000_000, |s| s.allow_passthrough = true);
    let plain = agent(&k, "plain", 1_000_000, |_| {});
    let gw = start(&k, ServeOptions::default()).await;
    let c = client();
    let key = "sk-agent-own-key-s3cret";
    let r = c.post(gw.url("/v1/chat/completions")).bearer_auth(&own).header("x-aex-provider-key", key).json(&chat(json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let sent = &provider.received_requests().await.unwrap()[0];
    assert_eq!(sent.headers.get("authorization").unwrap(), &format!("Bearer {key}"));
    let r = c.post(gw.url("/v1/chat/completions")).bearer_auth(&plain).header("x-aex-provider-key", key).json(&chat(json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("passthrough") && !body.contains(key), "{body}");
    assert_eq!(provider.received_requests().await.unwrap().len(), 1, "the refused one was not sent");
    let ledger: String = k.events(1, 1_000).unwrap().iter().map(|e| e.data.clone()).collect();
    assert!(!ledger.contains(key));
    assert_settled(&k, "own");
    gw.shutdown().await;
}

/// Headers aex cannot read are refused naming the field, never dropped: a dropped execution id
/// would let one call be sent twice.
#[tokio::test]
async fn unreadable_headers_are_refused_not_dropped() {
    let provider = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(reply())).mount(&provider).await;
    let k = kernel(&provider.uri());
    let token = agent(&k, "atlas", 1_000_000, |_| {});
    let gw = start(&k, ServeOptions::default()).await;
    for (name, field) in [("x-aex-execution-id", "execution_id"), ("x-aex-provider-key", "provider_key")] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&token)
            .header(name, reqwest::header::HeaderValue::from_bytes("tâche-1".as_bytes()).unwrap())
            .json(&chat(json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], field);
    }
    assert!(provider.received_requests().await.unwrap().is_empty());
    gw.shutdown().await;
}

/// Unknown paths and wrong methods answer OpenAI-shaped JSON like every other error.
#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let k = kernel("http://127.0.0.1:9");
    let gw = start(&k, ServeOptions::default()).await;
    for (method, path, status) in [("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405), ("PUT", "/v1/embeddings", 405)] {
        let r = client().request(method.parse().unwrap(), gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string(), "{method} {path}");
    }
    gw.shutdown().await;
}

/// Without an admin token, admin endpoints answer loopback hosts and origins only (no DNS
/// rebinding, no cross-site reload); concurrent scrapes each see every agent.
#[tokio::test]
async fn admin_endpoints_without_a_token_answer_loopback_only_and_scrapes_are_whole() {
    let k = kernel("http://127.0.0.1:9");
    for i in 0..20 {
        agent(&k, &format!("a{i}"), 1_000, |_| {});
    }
    let gw = start(&k, ServeOptions::default()).await;
    let c = client();
    assert_eq!(c.get(gw.url("/dashboard/data")).header("host", "attacker.example").send().await.unwrap().status(), 403);
    let r = c.post(gw.url("/admin/reload_config")).header("origin", "http://attacker.example").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(c.get(gw.url("/dashboard/data")).send().await.unwrap().status(), 200);
    let scrapes: Vec<_> = (0..16).map(|_| tokio::spawn(c.get(gw.url("/metrics")).send())).collect();
    for s in scrapes {
        let text = s.await.unwrap().unwrap().text().await.unwrap();
        assert_eq!(text.lines().filter(|l| l.starts_with("aex_agent_budget_micro{")).count(), 20);
    }
    gw.shutdown().await;
}
