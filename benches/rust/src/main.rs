//! The Rust side of `scripts/bench`: prints one JSON object per measured row on stdout.
//!
//! ```text
//! aex-bench rust        admit + commit: durability x threads, processes, group commit off
//! aex-bench dispatch    a governed provider call against a direct one, loopback server
//! aex-bench http-hop    the reference: admit + commit as two loopback HTTP round trips
//! aex-bench auth        unknown-token refusals: a near miss against a random guess
//! aex-bench gateway     a chat call through `aex serve` against the same call made directly,
//!                       at 1 and 64 concurrent clients
//! aex-bench postgres    admit + commit on a PostgreSQL server (AEX_BENCH_POSTGRES: its admin
//!                       URL): 1 and 8 threads, 4 processes
//! ```
//!
//! Every row: `surface`, `case`, `durability`, `threads`, `processes`, `calls`, `p50_us`,
//! `p99_us`, `ops_per_s` (settled executions, or calls, per second of wall time); the threaded
//! Rust rows add `writes_per_transaction` (group commit's batching).
//! `AEX_BENCH_SCALE` multiplies the call counts (default 1).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aex_core::{
    AdmitRequest, AgentSpec, Config, Durability, Error, Kernel, KernelOptions, ModelSpec, Prices, StoreOptions, Usage,
    money,
};
use serde_json::{Value, json};

const MODEL: &str = "gpt-4o-mini";

fn scale() -> f64 {
    std::env::var("AEX_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0)
}

/// How many executions a row runs: fewer under `full`, where each costs an fsync.
fn calls_for(durability: &str) -> usize {
    let base = if durability == "full" { 1_500.0 } else { 6_000.0 };
    (base * scale()).max(50.0) as usize
}

fn config() -> Config {
    Config::new().with_model(MODEL, ModelSpec::priced(Prices::from_usd("0.15", "0.60").unwrap(), 16_384)).unwrap()
}

fn open(path: &Path, durability: &str, max_batch: usize) -> Kernel {
    let store = StoreOptions { durability: Durability::parse(durability).unwrap(), max_batch, ..StoreOptions::default() };
    Kernel::open(path, KernelOptions { config: config(), store, ..KernelOptions::default() }).unwrap()
}

/// One guarded call: admit, then commit the provider's usage. Returns its latency in µs.
fn one_call(k: &Kernel, token: &str, req: &AdmitRequest) -> f64 {
    one_call_as(k, token, req, false)
}

/// [`one_call`], admitting the call dispatched (as the dispatcher and `aex serve` do) when
/// `dispatched`: under `full`, one fsync per call instead of two.
fn one_call_as(k: &Kernel, token: &str, req: &AdmitRequest, dispatched: bool) -> f64 {
    let t = Instant::now();
    let a = if dispatched { k.admit_dispatched(token, req) } else { k.admit(token, req) }.unwrap();
    k.commit(&a.execution_id, Usage::new(1_200, 180)).unwrap();
    t.elapsed().as_secs_f64() * 1e6
}

fn request() -> AdmitRequest {
    AdmitRequest::new(MODEL).input_tokens(1_200).max_output_tokens(256)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn row(surface: &str, case: &str, durability: &str, threads: usize, processes: usize, mut micros: Vec<f64>, wall: Duration) -> Value {
    micros.sort_by(f64::total_cmp);
    json!({
        "surface": surface, "case": case, "durability": durability, "threads": threads, "processes": processes,
        "calls": micros.len(),
        "p50_us": (percentile(&micros, 0.5) * 10.0).round() / 10.0,
        "p99_us": (percentile(&micros, 0.99) * 10.0).round() / 10.0,
        "ops_per_s": (micros.len() as f64 / wall.as_secs_f64()).round(),
    })
}

fn with_batching(mut row: Value, writes_per_transaction: f64) -> Value {
    row["writes_per_transaction"] = json!((writes_per_transaction * 10.0).round() / 10.0);
    row
}

fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").unwrap();
    out.flush().unwrap();
}

/// `threads` threads, each with its own agent, share one kernel on a fresh file. Also returns
/// the writes per transaction (group commit's batching) over the measured calls.
fn threaded(durability: &str, threads: usize, max_batch: usize, dispatched: bool) -> (Vec<f64>, Duration, f64) {
    let dir = tempfile::tempdir().unwrap();
    let k = open(&dir.path().join("bench.db"), durability, max_batch);
    let tokens: Vec<String> = (0..threads)
        .map(|i| k.create_agent(&AgentSpec::new(format!("t{i}"), money::MAX_MICRO)).unwrap().token.expose().to_string())
        .collect();
    let per_thread = calls_for(durability) / threads;
    let req = request();
    for t in &tokens {
        one_call(&k, t, &req); // warm the statement cache and the pages
    }
    let before = k.write_stats();
    let start = Instant::now();
    let micros = std::thread::scope(|s| {
        let handles: Vec<_> = tokens
            .iter()
            .map(|token| {
                let (k, req) = (&k, &req);
                s.spawn(move || (0..per_thread).map(|_| one_call_as(k, token, req, dispatched)).collect::<Vec<f64>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let wall = start.elapsed();
    let after = k.write_stats();
    let batching = (after.writes - before.writes) as f64 / (after.transactions - before.transactions).max(1) as f64;
    (micros, wall, batching)
}

fn now_us() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()
}

/// A child process of [`processes`], started with the others: its own kernel on the shared
/// database, which its `threads` threads share, each with an agent of its own, making `calls`
/// calls between them once `go` exists.
fn child(db: &str, durability: &str, calls: usize, go: &str, threads: usize) {
    let k = open(Path::new(db), durability, aex_core::store::DEFAULT_MAX_BATCH);
    let tokens: Vec<_> = (0..threads)
        .map(|t| k.create_agent(&AgentSpec::new(format!("p{}-{t}", std::process::id()), money::MAX_MICRO)).unwrap().token)
        .collect();
    let req = request();
    for token in &tokens {
        one_call(&k, token.expose(), &req);
    }
    println!("ready");
    while !Path::new(go).exists() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let start = now_us();
    let micros: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = tokens
            .iter()
            .map(|token| {
                let (k, req) = (&k, &req);
                s.spawn(move || (0..calls / threads).map(|_| one_call(k, token.expose(), req)).collect::<Vec<f64>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    println!("{}", json!({"start_us": start as u64, "end_us": now_us() as u64, "micros": micros}));
}

fn processes(durability: &str, n: usize) -> (Vec<f64>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    processes_on(db.to_str().unwrap(), durability, n, 1)
}

/// [`processes`] on the database `db` names (a file, or a PostgreSQL URL), with `threads`
/// threads in each process.
fn processes_on(db: &str, durability: &str, n: usize, threads: usize) -> (Vec<f64>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    drop(open(Path::new(db), durability, 1));
    let go = dir.path().join("go");
    let calls = calls_for(durability) / n;
    let mut children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args(["child", db, durability, &calls.to_string(), go.to_str().unwrap(), &threads.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut readers: Vec<_> = children.iter_mut().map(|c| BufReader::new(c.stdout.take().unwrap()).lines()).collect();
    for r in &mut readers {
        assert_eq!(r.next().unwrap().unwrap(), "ready");
    }
    std::fs::write(&go, b"").unwrap();
    let (mut micros, mut start, mut end) = (Vec::new(), u64::MAX, 0);
    for r in &mut readers {
        let v: Value = serde_json::from_str(&r.next().unwrap().unwrap()).unwrap();
        start = start.min(v["start_us"].as_u64().unwrap());
        end = end.max(v["end_us"].as_u64().unwrap());
        micros.extend(v["micros"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()));
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    (micros, Duration::from_micros(end - start))
}

fn rust_rows() {
    for durability in ["full", "normal", "memory"] {
        for threads in [1, 2, 8] {
            let (m, wall, batching) = threaded(durability, threads, aex_core::store::DEFAULT_MAX_BATCH, false);
            emit(&with_batching(row("rust", "admit+commit", durability, threads, 1, m, wall), batching));
        }
        if durability == "full" {
            // Admitted dispatched, as every governed provider call is: its settlement rides on
            // the next fsync.
            for threads in [1, 8] {
                let (m, wall, batching) = threaded(durability, threads, aex_core::store::DEFAULT_MAX_BATCH, true);
                emit(&with_batching(row("rust", "admit dispatched+commit", durability, threads, 1, m, wall), batching));
            }
        }
        // The same 8 threads with group commit off: every write its own transaction.
        let (m, wall, batching) = threaded(durability, 8, 1, false);
        emit(&with_batching(row("rust", "admit+commit, group commit off", durability, 8, 1, m, wall), batching));
    }
    for durability in ["full", "normal"] {
        for n in [2, 4] {
            let (m, wall) = processes(durability, n);
            emit(&row("rust", "admit+commit", durability, 1, n, m, wall));
        }
    }
}

/// A new database on the PostgreSQL server `admin` names; its URL.
fn postgres_db(admin: &str) -> String {
    let name = format!("aex_bench_{}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
    postgres::Client::connect(admin, postgres::NoTls).unwrap().batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

/// The fleet store: admit + commit on a PostgreSQL server (`AEX_BENCH_POSTGRES`, an admin URL)
/// from one thread, from eight threads each with its own kernel (its own connection), and from
/// four processes of one thread and of two (which share their process's kernel: group commit).
fn postgres_rows() {
    let Ok(admin) = std::env::var("AEX_BENCH_POSTGRES") else {
        eprintln!("aex-bench postgres: set AEX_BENCH_POSTGRES to a server's admin URL (scripts/postgres starts one)");
        std::process::exit(2);
    };
    let calls = (2_000.0 * scale()).max(50.0) as usize;
    let req = request();
    for threads in [1, 8] {
        let db = postgres_db(&admin);
        let kernels: Vec<Kernel> = (0..threads).map(|_| open(Path::new(&db), "full", 1)).collect();
        let tokens: Vec<String> = (0..threads)
            .map(|i| kernels[0].create_agent(&AgentSpec::new(format!("t{i}"), money::MAX_MICRO)).unwrap().token.expose().to_string())
            .collect();
        for (k, t) in kernels.iter().zip(&tokens) {
            one_call(k, t, &req);
        }
        let per_thread = calls / threads;
        let start = Instant::now();
        let micros: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = kernels
                .iter()
                .zip(&tokens)
                .map(|(k, t)| {
                    let req = &req;
                    s.spawn(move || (0..per_thread).map(|_| one_call(k, t, req)).collect::<Vec<f64>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        emit(&row("rust", "admit+commit on PostgreSQL (loopback)", "server", threads, 1, micros, start.elapsed()));
    }
    for threads in [1, 2] {
        let (m, wall) = processes_on(&postgres_db(&admin), "full", 4, threads);
        emit(&row("rust", "admit+commit on PostgreSQL (loopback)", "server", threads, 4, m, wall));
    }
}

/// A governed call against a direct reqwest call to the same loopback server, interleaved.
fn dispatch_rows() {
    use aex_core::dispatch::{Endpoint, ProviderCall};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let server = MockServer::start().await;
        let reply = json!({"id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}});
        Mock::given(wiremock::matchers::any()).respond_with(ResponseTemplate::new(200).set_body_json(&reply)).mount(&server).await;
        let config = Config::from_yaml(&format!(
            "providers:\n  local: {{base_url: \"{}/v1\"}}\nmodels:\n  {MODEL}: {{provider: local, input_price: 0.15, output_price: 0.60, max_output_tokens: 100}}\n",
            server.uri()
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = StoreOptions { durability: Durability::Normal, ..StoreOptions::default() };
        let k = Kernel::open(dir.path().join("d.db"), KernelOptions { config, store, ..KernelOptions::default() }).unwrap();
        let token = k.create_agent(&AgentSpec::new("bench", money::MAX_MICRO)).unwrap().token;
        let client = reqwest::Client::new();
        let url = format!("{}/v1/chat/completions", server.uri());
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20});
        let calls = (1_000.0 * scale()).max(50.0) as usize;
        let (mut direct, mut governed) = (Vec::new(), Vec::new());
        let (mut direct_wall, mut governed_wall) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..calls {
            let t = Instant::now();
            let r: Value = client.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
            assert!(r.get("usage").is_some());
            direct_wall += t.elapsed();
            direct.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            k.call_provider(token.expose(), ProviderCall::new(Endpoint::ChatCompletions, body.clone())).await.unwrap();
            governed_wall += t.elapsed();
            governed.push(t.elapsed().as_secs_f64() * 1e6);
        }
        emit(&row("rust", "provider call, direct (no aex)", "-", 1, 1, direct, direct_wall));
        emit(&row("rust", "provider call, governed by aex", "normal", 1, 1, governed, governed_wall));
    });
}

/// The reference: what admit + commit would cost if each were a round trip to a local HTTP
/// server that does nothing but answer (so no work at all is counted on its side).
fn http_hop_row() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        // One request per read: small bodies on a keep-alive connection.
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                        if sock.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    });
    let client = reqwest::Client::new();
    let local = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (admit_url, commit_url) = (format!("http://{addr}/v1/admit"), format!("http://{addr}/v1/commit"));
    let admit = json!({"model": MODEL, "input_tokens": 1200, "max_output_tokens": 256}).to_string();
    let commit = json!({"execution_id": "0190f5a2-0000-7000-8000-000000000000", "input_tokens": 1200, "output_tokens": 180}).to_string();
    let calls = (3_000.0 * scale()).max(50.0) as usize;
    let post = |url: &str, body: &str| {
        local.block_on(async {
            let r = client.post(url).header("authorization", "Bearer aex_x").body(body.to_string()).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        });
    };
    post(&admit_url, &admit);
    let start = Instant::now();
    let micros: Vec<f64> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            post(&admit_url, &admit);
            post(&commit_url, &commit);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    emit(&row("reference", "2 loopback HTTP round trips, server does nothing", "-", 1, 1, micros, start.elapsed()));
    drop(rt);
}

/// A loopback provider that answers every request at once with the same small chat completion
/// (keep-alive, one request per read): the floor under both the direct and the gateway rows.
async fn instant_provider() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = json!({"id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})
    .to_string();
    let reply: &'static [u8] = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes().leak();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 || sock.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy that governs nothing: it forwards each POST to the provider with one pooled client
/// and returns the answer, on the gateway's runtime. What any HTTP gateway costs before it does
/// any work of its own: the floor under `aex serve`'s overhead.
async fn plain_proxy(provider: std::net::SocketAddr) -> std::net::SocketAddr {
    use axum::body::Bytes;
    use axum::serve::ListenerExt;
    let client = reqwest::Client::new();
    let upstream = format!("http://{provider}/v1/chat/completions");
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: Bytes| {
            let (client, upstream) = (client.clone(), upstream.clone());
            async move { client.post(&upstream).header("content-type", "application/json").body(body).send().await.unwrap().bytes().await.unwrap() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// `clients` tasks each making `calls` POSTs of `body` to `url`; every latency (µs) and the wall time.
async fn load(url: &str, token: &str, body: &Value, clients: usize, calls: usize) -> (Vec<f64>, Duration) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, token, body) = (client.clone(), url.to_string(), token.to_string(), body.to_string());
            tokio::spawn(async move {
                let mut micros = Vec::with_capacity(calls);
                for _ in 0..calls {
                    let t = Instant::now();
                    let r = client.post(&url).bearer_auth(&token).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                    r.bytes().await.unwrap();
                    micros.push(t.elapsed().as_secs_f64() * 1e6);
                }
                micros
            })
        })
        .collect();
    let mut micros = Vec::new();
    for t in tasks {
        micros.extend(t.await.unwrap());
    }
    (micros, start.elapsed())
}

/// A chat call through `aex serve` (its own runtime, two workers, durability `normal`) against
/// the same call straight to the provider, at 1 and 64 concurrent clients.
fn gateway_rows() {
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(aex_serve::WORKER_THREADS).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (provider, proxy, gateway, token) = server_rt.block_on(async {
        let provider = instant_provider().await;
        let proxy = plain_proxy(provider).await;
        let config = Config::from_yaml(&format!(
            "providers:\n  local: {{base_url: \"http://{provider}/v1\"}}\nmodels:\n  {MODEL}: {{provider: local, input_price: 0.15, output_price: 0.60, max_output_tokens: 100}}\n"
        ))
        .unwrap();
        let store = StoreOptions { durability: Durability::Normal, ..StoreOptions::default() };
        let k = Kernel::open(dir.path().join("g.db"), KernelOptions { config, store, ..KernelOptions::default() }).unwrap();
        let token = k.create_agent(&AgentSpec::new("bench", money::MAX_MICRO)).unwrap().token.expose().to_string();
        let options = aex_serve::ServeOptions { addr: "127.0.0.1:0".parse().unwrap(), ..aex_serve::ServeOptions::default() };
        let gateway = aex_serve::Gateway::bind(k, options).await.unwrap();
        let addr = gateway.local_addr().unwrap();
        tokio::spawn(gateway.run(std::future::pending()));
        (provider, proxy, addr, token)
    });
    let client_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20});
    let direct = format!("http://{provider}/v1/chat/completions");
    let governed = format!("http://{gateway}/v1/chat/completions");
    let proxied = format!("http://{proxy}/v1/chat/completions");
    // The AEX 2.0 daemon in front of the same provider, when `AEX2_START` names its starter
    // (benches/aex2/start): it prints "URL TOKEN" once ready and runs until its group is killed.
    let aex2 = std::env::var("AEX2_START").ok().and_then(|start| {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(start).arg(format!("http://{provider}/v1")).stdout(Stdio::piped()).stderr(Stdio::null()).process_group(0).spawn().ok()?;
        let line = BufReader::new(child.stdout.take()?).lines().next()?.ok()?;
        let (url, token) = line.split_once(' ')?;
        Some((child, format!("{url}/v1/chat/completions"), token.to_string()))
    });
    client_rt.block_on(async {
        // Warm every path (connections, the tokenizer, the statement cache).
        load(&direct, &token, &body, 1, 50).await;
        load(&governed, &token, &body, 1, 50).await;
        load(&proxied, &token, &body, 1, 50).await;
        if let Some((_, url, t)) = &aex2 {
            load(url, t, &body, 1, 20).await;
        }
        for clients in [1, 64] {
            let calls = ((if clients == 1 { 2_000.0 } else { 100.0 }) * scale()).max(10.0) as usize;
            let (m, wall) = load(&direct, &token, &body, clients, calls).await;
            emit(&row("gateway", "chat call, direct to the provider (no aex)", "-", clients, 1, m, wall));
            let (m, wall) = load(&proxied, &token, &body, clients, calls).await;
            emit(&row("gateway", "chat call through a plain proxy (governs nothing)", "-", clients, 1, m, wall));
            let (m, wall) = load(&governed, &token, &body, clients, calls).await;
            emit(&row("gateway", "chat call through aex serve", "normal", clients, 1, m, wall));
            if let Some((_, url, t)) = &aex2 {
                // The daemon is about 100 times slower: fewer calls give it the same wall time.
                let (m, wall) = load(url, t, &body, clients, (calls / 10).max(5)).await;
                emit(&row("gateway", "chat call through the AEX 2.0 daemon", "-", clients, 1, m, wall));
            }
        }
    });
    if let Some((child, _, _)) = aex2 {
        let _ = Command::new("kill").arg("--").arg(format!("-{}", child.id())).status();
    }
    drop(server_rt);
}

/// Refusing an unknown token: one that differs from a real token in its last character against
/// a random one. Lookup is by SHA-256 digest, so the two should take the same time.
fn auth_rows() {
    let k = Kernel::open_in_memory(KernelOptions { config: config(), ..KernelOptions::default() }).unwrap();
    let real = k.create_agent(&AgentSpec::new("real", money::MAX_MICRO)).unwrap().token.expose().to_string();
    let near = format!("{}{}", &real[..real.len() - 1], if real.ends_with('0') { '1' } else { '0' });
    let far = format!("aex_{}", "5".repeat(real.len() - 4));
    let req = request();
    let calls = (5_000.0 * scale()).max(50.0) as usize;
    let (mut near_us, mut far_us) = (Vec::new(), Vec::new());
    let start = Instant::now();
    for _ in 0..calls {
        for (token, out) in [(&near, &mut near_us), (&far, &mut far_us)] {
            let t = Instant::now();
            assert!(matches!(k.admit(token, &req), Err(Error::Unauthenticated { .. })));
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let wall = start.elapsed() / 2;
    emit(&row("rust", "refused token, all but the last character right", "in-memory", 1, 1, near_us, wall));
    emit(&row("rust", "refused token, random", "in-memory", 1, 1, far_us, wall));
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["rust"] => rust_rows(),
        ["dispatch"] => dispatch_rows(),
        ["http-hop"] => http_hop_row(),
        ["auth"] => auth_rows(),
        ["gateway"] => gateway_rows(),
        ["postgres"] => postgres_rows(),
        ["child", db, durability, calls, go, threads] => child(db, durability, calls.parse().unwrap(), go, threads.parse().unwrap()),
        _ => {
            eprintln!("usage: aex-bench rust | dispatch | http-hop | auth | gateway | postgres");
            std::process::exit(2);
        }
    }
}
