//! What a governed call adds over a direct reqwest call to the same loopback server.
//!
//! Run: `cargo bench -p aex-core --bench dispatch_overhead`. Interleaved rounds against one
//! OpenAI-compatible mock server on 127.0.0.1; p50 and p99 of each, plain and streaming. The
//! governed call does admit + dispatch + commit (three store transactions, in memory here) around
//! the same HTTP request.

use std::time::{Duration, Instant};

use aex_core::dispatch::{Endpoint, ProviderCall};
use aex_core::{AgentSpec, Config, Kernel, KernelOptions, money};
use futures_util::StreamExt;
use serde_json::json;
use wiremock::matchers::body_partial_json;
use wiremock::{Mock, MockServer, ResponseTemplate};

const ROUNDS: usize = 20;
const CALLS: usize = 50;

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = MockServer::start().await;
    let reply = json!({"id": "c", "object": "chat.completion", "created": 0, "model": "mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}});
    let sse = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\n\
               data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
    Mock::given(body_partial_json(json!({"stream": true}))).respond_with(ResponseTemplate::new(200).set_body_raw(sse, "text/event-stream")).mount(&server).await;
    Mock::given(wiremock::matchers::any()).respond_with(ResponseTemplate::new(200).set_body_json(&reply)).mount(&server).await;

    let config = Config::from_yaml(&format!(
        "providers:\n  local: {{base_url: \"{}/v1\"}}\nmodels:\n  mini: {{provider: local, input_price: 0.15, output_price: 0.60, max_output_tokens: 100}}\n",
        server.uri()
    ))
    .unwrap();
    let kernel = Kernel::open_in_memory(KernelOptions { config, ..Default::default() }).unwrap();
    let token = kernel.create_agent(&AgentSpec::new("bench", money::MAX_MICRO)).unwrap().token;
    let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().unwrap();
    let url = format!("{}/v1/chat/completions", server.uri());
    let body = json!({"model": "mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20});
    let stream_body = json!({"model": "mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": true});

    let (mut direct, mut governed, mut direct_s, mut governed_s) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        for _ in 0..CALLS {
            let t = Instant::now();
            let r: serde_json::Value = client.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
            assert!(r.get("usage").is_some());
            direct.push(t.elapsed().as_secs_f64() * 1e6);

            let t = Instant::now();
            kernel.call_provider(token.expose(), ProviderCall::new(Endpoint::ChatCompletions, body.clone())).await.unwrap();
            governed.push(t.elapsed().as_secs_f64() * 1e6);

            let t = Instant::now();
            let mut s = client.post(&url).json(&stream_body).send().await.unwrap().bytes_stream();
            while let Some(chunk) = s.next().await {
                chunk.unwrap();
            }
            direct_s.push(t.elapsed().as_secs_f64() * 1e6);

            let t = Instant::now();
            kernel.stream_provider(token.expose(), ProviderCall::new(Endpoint::ChatCompletions, stream_body.clone()), &mut |_| true).await.unwrap();
            governed_s.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    println!("loopback chat completion, {} calls each, microseconds", ROUNDS * CALLS);
    for (name, d, g) in [("plain", &mut direct, &mut governed), ("streaming", &mut direct_s, &mut governed_s)] {
        let (d50, d99, g50, g99) = (pct(d, 0.5), pct(d, 0.99), pct(g, 0.5), pct(g, 0.99));
        println!("  {name:<10} direct p50 {d50:7.0} p99 {d99:7.0} | governed p50 {g50:7.0} p99 {g99:7.0} | added p50 {:6.0}", g50 - d50);
    }
}
