//! The money rules over random exit paths: a loopback provider that completes, cuts, stalls,
//! answers garbage, refuses (429, 5xx, 4xx, a redirect) or hangs up, against a caller that reads
//! to the end, breaks out of a stream, or cancels at a random moment. After every run: nothing
//! is left reserved, every request that reached the provider and may have been worked on is
//! charged at least its input, no charge exceeds its reservation unless recorded as an overrun,
//! a refusal costs nothing, and the audit is clean.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aex_core::dispatch::{DispatchOptions, Endpoint, ProviderCall};
use aex_core::{AgentSpec, Config, ExecutionState, Kernel, KernelOptions};
use common::{assert_clean, raw_server};
use proptest::prelude::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// What the provider does with a request it has read in full.
#[derive(Debug, Clone, Copy)]
enum Provider {
    /// Answers in full: `chunks` deltas (streamed) or one body, with or without a usage report.
    Completes { chunks: usize, usage: bool },
    /// Sends the head and `chunks` deltas (or part of a body), then drops the connection.
    Cuts { chunks: usize },
    /// Sends the head and `chunks` deltas, then nothing more.
    Stalls { chunks: usize },
    /// A 200 whose body is HTML.
    Garbage,
    /// Refuses with this status before doing any work.
    Refuses(u16),
    /// Closes the connection without answering.
    HangsUp,
}

impl Provider {
    /// Whether the provider may have worked on the request (so it must end charged).
    fn works(self) -> bool {
        !matches!(self, Provider::Refuses(_))
    }
}

/// How the caller leaves.
#[derive(Debug, Clone, Copy)]
enum Caller {
    /// Reads to the end.
    ToTheEnd,
    /// Stops a stream after this many chunks (the callback returns false).
    Breaks(usize),
    /// Cancels after this many milliseconds.
    Cancels(u64),
}

fn provider() -> impl Strategy<Value = Provider> {
    prop_oneof![
        (0..6usize, any::<bool>()).prop_map(|(chunks, usage)| Provider::Completes { chunks, usage }),
        (0..5usize).prop_map(|chunks| Provider::Cuts { chunks }),
        (0..4usize).prop_map(|chunks| Provider::Stalls { chunks }),
        Just(Provider::Garbage),
        prop::sample::select(vec![429u16, 500, 503, 400, 307]).prop_map(Provider::Refuses),
        Just(Provider::HangsUp),
    ]
}

fn caller() -> impl Strategy<Value = Caller> {
    prop_oneof![Just(Caller::ToTheEnd), (0..4usize).prop_map(Caller::Breaks), (0..250u64).prop_map(Caller::Cancels)]
}

fn delta(i: usize) -> String {
    let e = format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": format!("word{i} ")}}]}));
    format!("{:x}\r\n{e}\r\n", e.len())
}

/// Serves `behaviour`, counting the requests it read in full.
async fn serve(mut socket: tokio::net::TcpStream, behaviour: Provider, stream: bool) {
    let sse = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let _ = match behaviour {
        Provider::Completes { chunks, usage } if stream => {
            let mut out = sse.to_string();
            (0..chunks).for_each(|i| out.push_str(&delta(i)));
            if usage {
                let e = format!("data: {}\n\n", json!({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": chunks * 2}}));
                out.push_str(&format!("{:x}\r\n{e}\r\n", e.len()));
            }
            let done = "data: [DONE]\n\n";
            out.push_str(&format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len()));
            socket.write_all(out.as_bytes()).await
        }
        Provider::Completes { chunks, usage } => {
            let text: String = (0..chunks).map(|i| format!("word{i} ")).collect();
            let mut body = json!({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]});
            if usage {
                body["usage"] = json!({"prompt_tokens": 40, "completion_tokens": chunks * 2});
            }
            let body = body.to_string();
            socket.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes()).await
        }
        Provider::Cuts { chunks } | Provider::Stalls { chunks } => {
            let mut out = if stream { sse.to_string() } else { "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"id\": ".to_string() };
            if stream {
                (0..chunks).for_each(|i| out.push_str(&delta(i)));
            }
            let _ = socket.write_all(out.as_bytes()).await;
            if let Provider::Stalls { .. } = behaviour {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(())
        }
        Provider::Garbage => {
            let body = "<html>busy</html>";
            socket.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes()).await
        }
        Provider::Refuses(status) => {
            let extra = if status == 307 { "location: http://127.0.0.1:9/elsewhere\r\n" } else { "retry-after: 0\r\n" };
            socket.write_all(format!("HTTP/1.1 {status} No\r\n{extra}content-length: 0\r\n\r\n").as_bytes()).await
        }
        Provider::HangsUp => Ok(()),
    };
}

fn kernel(url: &str) -> Kernel {
    let yaml = format!("providers:\n  p: {{base_url: \"{url}/v1\"}}\nmodels:\n  m: {{provider: p, input_price: 1, output_price: 2, max_output_tokens: 100}}\n");
    let options = KernelOptions {
        config: Config::from_yaml(&yaml).unwrap(),
        dispatch: DispatchOptions { request_timeout: Duration::from_millis(400), max_retries: 1, retry_base_delay: Duration::from_millis(1), ..Default::default() },
        ..Default::default()
    };
    common::store_kernel(options)
}

async fn run(behaviour: Provider, stream: bool, caller: Caller) -> Result<(), TestCaseError> {
    let reached = Arc::new(AtomicUsize::new(0));
    let seen = reached.clone();
    let url = raw_server(move |socket| {
        seen.fetch_add(1, Ordering::SeqCst);
        serve(socket, behaviour, stream)
    })
    .await;
    let k = kernel(&url);
    let token = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap().token.expose().to_string();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": stream});
    let call = ProviderCall::new(Endpoint::ChatCompletions, body);
    if let Caller::Cancels(ms) = caller {
        let cancel = call.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            cancel.cancel();
        });
    }
    let stop_after = if let Caller::Breaks(n) = caller { n } else { usize::MAX };
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        if stream {
            let mut chunks = 0;
            k.stream_provider(&token, call, &mut |_| {
                chunks += 1;
                chunks < stop_after
            })
            .await
        } else {
            k.call_provider(&token, call).await
        }
    })
    .await;
    prop_assert!(result.is_ok(), "the call returned in bounded time");

    let agent = k.agent("atlas").unwrap();
    prop_assert_eq!(agent.reserved_micro, 0, "nothing left reserved");
    let events = k.events(1, 1_000).unwrap();
    let ids: std::collections::BTreeSet<String> = events.iter().filter_map(|e| e.execution_id.clone()).collect();
    let mut charged = 0;
    for id in &ids {
        let e = k.execution(id).unwrap();
        prop_assert!(!e.state.is_open(), "{id} settled: {:?}", e.state);
        let cost = e.cost_micro.unwrap_or(0);
        let overrun = events.iter().any(|v| v.kind == "execution.overrun" && v.execution_id.as_deref() == Some(id));
        prop_assert!(cost <= e.reserved_micro || overrun, "{id}: {cost} above its reservation {} without an overrun", e.reserved_micro);
        match e.state {
            ExecutionState::Committed => {
                prop_assert!(cost >= e.input_tokens, "{id}: charged {cost}, less than its input {}", e.input_tokens);
                charged += 1;
            }
            _ => prop_assert_eq!(cost, 0),
        }
    }
    let reached = reached.load(Ordering::SeqCst);
    if behaviour.works() {
        // Every request the provider read may have been worked on: each ends charged (and a
        // cancellation mid-send may charge one the provider never read: over, never under).
        prop_assert!(charged >= reached, "{reached} requests reached the provider, {charged} charged");
        prop_assert!(reached <= 1, "work may have been done: never sent again ({reached} requests)");
    } else if let Caller::Cancels(_) = caller {
        // Cancelled while waiting for the answer: aex cannot know the provider would refuse.
        prop_assert!(charged <= 1, "{charged} charged");
    } else {
        prop_assert_eq!(charged, 0, "a refusal costs nothing");
    }
    let report = k.audit(None).unwrap();
    prop_assert!(report.failure.is_none(), "{:?}", report.failure);
    assert_clean(&k);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_exit_path_ends_settled_by_the_money_rules(behaviour in provider(), stream in any::<bool>(), caller in caller()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(run(behaviour, stream, caller))?;
    }
}
