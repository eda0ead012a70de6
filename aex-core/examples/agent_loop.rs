//! An agent with $0.01 runs a loop of guarded LLM calls until aex cuts it off.
//!
//! The "provider" is simulated (no network): each turn the conversation grows, so the prompt
//! gets longer and every call costs more, as in a real tool-using agent. Every call goes through
//! admit -> dispatch -> commit; when the next reservation no longer fits, admission is denied
//! with 402 before the provider would have been contacted. Then the example prints the spend and
//! the audit of the hash-chained ledger.
//!
//! Run: `cargo run -p aex-core --example agent_loop` (pass a database path to choose the file).

use aex_core::{AdmitRequest, AgentSpec, Config, Error, Kernel, KernelOptions, ModelSpec, Prices, Usage, money};

/// A stand-in for the provider: returns the usage a real call with this prompt would report.
fn simulated_provider(turn: u32, prompt_tokens: i64, max_tokens: i64) -> Usage {
    // Deterministic, realistic-looking completion lengths between 120 and 420 tokens.
    let output = 120 + i64::from((turn * 7919) % 301);
    Usage::new(prompt_tokens, output.min(max_tokens))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args().nth(1) {
        Some(p) => std::path::PathBuf::from(p),
        None => tempfile::Builder::new().prefix("aex-demo-").tempdir()?.keep().join("agents.db"),
    };
    let config = Config::new().with_model(
        "gpt-4o-mini",
        ModelSpec::priced(Prices::from_usd("0.15", "0.60")?, 16_384),
    )?;
    let kernel = Kernel::open(&path, KernelOptions { config, ..Default::default() })?;
    println!("aex {} — database {}", aex_core::VERSION, path.display());

    let name = format!("atlas-{}", std::process::id());
    let spec = AgentSpec { allowed_models: vec!["gpt-4o-mini".into()], strict: true, ..AgentSpec::new(&name, money::parse_usd("budget", "0.01")?) };
    let created = kernel.create_agent(&spec)?;
    println!("agent {name}: budget $0.01, token {} (shown once, stored only as a SHA-256 hash)\n", created.token);

    let mut prompt_tokens: i64 = 900; // system prompt + task
    for turn in 1.. {
        let request = AdmitRequest::new("gpt-4o-mini").input_tokens(prompt_tokens).max_output_tokens(512);
        let admission = match kernel.admit(created.token.expose(), &request) {
            Ok(a) => a,
            Err(denial @ Error::InsufficientBudget { .. }) => {
                println!("\ncall {turn:>2}: DENIED {} {} — {denial}", denial.status(), denial.reason());
                println!("         the provider was never contacted.");
                break;
            }
            Err(other) => return Err(other.into()),
        };
        kernel.mark_dispatched(&admission.execution_id)?;
        let usage = simulated_provider(turn, prompt_tokens, admission.max_output_tokens);
        let settled = kernel.commit(&admission.execution_id, usage)?;
        let agent = kernel.agent(&name)?;
        println!(
            "call {turn:>2}: {:>5} in {:>4} out  reserved ${:<9} charged ${:<9} spent ${:<9} remaining ${}",
            usage.input_tokens,
            usage.output_tokens,
            money::format_usd(settled.reserved_micro),
            money::format_usd(settled.cost_micro),
            money::format_usd(agent.spent_micro),
            money::format_usd(agent.remaining_micro()),
        );
        // The reply and a tool result join the conversation.
        prompt_tokens += usage.output_tokens + 250;
    }

    let agent = kernel.agent(&name)?;
    println!(
        "\n{name}: spent ${} of ${} (reserved ${}), never over budget.",
        money::format_usd(agent.spent_micro),
        money::format_usd(agent.budget_micro),
        money::format_usd(agent.reserved_micro)
    );
    let report = kernel.audit(None)?;
    let head = report.head.as_ref().map(|h| h.to_text()).unwrap_or_default();
    match &report.failure {
        None => println!("audit: clean — {} events verified ({}), head {head}", report.events, report.mode),
        Some(f) => {
            println!("audit: FAILED — {f}");
            std::process::exit(1);
        }
    }
    Ok(())
}
