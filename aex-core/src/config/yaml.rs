//! The `models.yaml` format.
//!
//! ```yaml
//! providers:
//!   openai: {base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
//!   ollama: {base_url: "http://127.0.0.1:11434/v1"}
//! models:
//!   gpt-4o-mini:
//!     provider: openai
//!     input_price: 0.15          # USD per million tokens (a number or a string, ≤ 6 decimals)
//!     output_price: 0.60
//!     cached_input_price: 0.075  # optional; else cached input is priced as input
//!     max_output_tokens: 16384   # optional; 4096 when absent
//!     context_window: 128000     # optional
//!     tools: true                # capabilities; defaults: tools true, vision false, streaming true
//!     vision: true
//!     streaming: true
//!     fallbacks: [gpt-4o]
//!   llama3:
//!     provider: ollama           # no prices: free, and denied to strict agents
//! limits:
//!   max_tokens_per_minute: 200000          # all agents, all models
//!   model_tokens_per_minute: {gpt-4o-mini: 100000}
//!   max_concurrent: 64                     # open executions, all agents
//! default_model: gpt-4o-mini
//! ```
//!
//! Files written for the AEX 2.0 HTTP daemon load unchanged: a model may instead give
//! `pricing: {input_micro, output_micro}` (integer micro-USD **per token**), `limits:
//! {max_tokens}`, `capabilities: {tools, vision}` and `provider_model`. Unknown fields are refused
//! rather than ignored: a misspelt price must not silently make a model free.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Config, Limits, ModelCapabilities, ModelSpec, Prices, Provider};
use crate::error::{Error, Result};
use crate::money::{self, MAX_MICRO};

/// `max_output_tokens` of a model that does not say.
pub const DEFAULT_MAX_OUTPUT_TOKENS: i64 = 4_096;
/// The largest config file read: 4 MiB.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// The deepest nesting accepted, counted before parsing (the parser's time grows with the square
/// of the depth: a file nested 200 KB deep took 15 s). `models.yaml` needs four levels.
pub const MAX_DEPTH: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    limits: RawLimits,
    default_model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    base_url: String,
    api_key_env: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_tokens_per_minute: Option<u64>,
    #[serde(default)]
    model_tokens_per_minute: BTreeMap<String, u64>,
    max_concurrent: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Usd {
    Number(f64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: Option<String>,
    provider_model: Option<String>,
    input_price: Option<Usd>,
    output_price: Option<Usd>,
    cached_input_price: Option<Usd>,
    max_output_tokens: Option<i64>,
    context_window: Option<i64>,
    tools: Option<bool>,
    vision: Option<bool>,
    streaming: Option<bool>,
    #[serde(default)]
    fallbacks: Vec<String>,
    // The AEX 2.0 daemon's spelling.
    pricing: Option<RawPricing>,
    limits: Option<RawModelLimits>,
    capabilities: Option<RawCapabilities>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricing {
    input_micro: i64,
    output_micro: i64,
    cached_input_micro: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelLimits {
    max_tokens: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    tools: Option<bool>,
    vision: Option<bool>,
    streaming: Option<bool>,
}

/// USD per million tokens, from YAML, into micro-USD per million tokens, exactly.
fn usd_per_mtok(field: &str, v: &Usd) -> Result<i64> {
    match v {
        Usd::Text(t) => money::parse_usd(field, t),
        Usd::Number(x) => money::usd_from_f64(field, *x),
    }
}

fn per_token_micro(field: &str, micro_per_token: i64) -> Result<i64> {
    micro_per_token
        .checked_mul(1_000_000)
        .filter(|m| (0..=MAX_MICRO).contains(m))
        .ok_or_else(|| Error::invalid(field, format!("must be between 0 and 1000 micro-USD per token, got {micro_per_token}")))
}

fn model_spec(name: &str, m: RawModel) -> Result<ModelSpec> {
    let f = |k: &str| format!("models.{name}.{k}");
    let prices = match (&m.pricing, &m.input_price, &m.output_price) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(Error::invalid(f("pricing"), "give either pricing or input_price/output_price, not both"));
        }
        (Some(p), None, None) => Some(Prices {
            input: per_token_micro(&f("pricing.input_micro"), p.input_micro)?,
            output: per_token_micro(&f("pricing.output_micro"), p.output_micro)?,
            cached_input: p.cached_input_micro.map(|c| per_token_micro(&f("pricing.cached_input_micro"), c)).transpose()?,
        }),
        (None, Some(i), Some(o)) => Some(Prices {
            input: usd_per_mtok(&f("input_price"), i)?,
            output: usd_per_mtok(&f("output_price"), o)?,
            cached_input: m.cached_input_price.as_ref().map(|c| usd_per_mtok(&f("cached_input_price"), c)).transpose()?,
        }),
        (None, Some(_), None) => return Err(Error::invalid(f("output_price"), "is required when input_price is given")),
        (None, None, Some(_)) => return Err(Error::invalid(f("input_price"), "is required when output_price is given")),
        (None, None, None) => None,
    };
    if prices.is_none() && m.cached_input_price.is_some() {
        return Err(Error::invalid(f("cached_input_price"), "needs input_price and output_price"));
    }
    let legacy_max = m.limits.and_then(|l| l.max_tokens);
    if m.max_output_tokens.is_some() && legacy_max.is_some() {
        return Err(Error::invalid(f("limits.max_tokens"), "give either max_output_tokens or limits.max_tokens, not both"));
    }
    let caps = m.capabilities;
    let pick = |flat: Option<bool>, nested: Option<bool>, default: bool| flat.or(nested).unwrap_or(default);
    let defaults = ModelCapabilities::default();
    Ok(ModelSpec {
        provider: m.provider,
        provider_model: m.provider_model,
        prices,
        max_output_tokens: m.max_output_tokens.or(legacy_max).unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS),
        context_window: m.context_window,
        capabilities: ModelCapabilities {
            tools: pick(m.tools, caps.as_ref().and_then(|c| c.tools), defaults.tools),
            vision: pick(m.vision, caps.as_ref().and_then(|c| c.vision), defaults.vision),
            streaming: pick(m.streaming, caps.as_ref().and_then(|c| c.streaming), defaults.streaming),
        },
        fallbacks: m.fallbacks,
    })
}

/// Turns a parser error into `InvalidRequest` naming the field path and the line.
fn parse_error(e: &serde_yaml_ng::Error) -> Error {
    let text = e.to_string();
    // The parser prefixes the path of the field at fault: "models.gpt-4o: unknown field ...".
    let (field, rule) = match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (format!("models.yaml {path}"), rest.to_string()),
        _ => ("models.yaml".to_string(), text.clone()),
    };
    let rule = match e.location() {
        Some(loc) if !rule.contains("line") => format!("{rule} (line {}, column {})", loc.line(), loc.column()),
        _ => rule,
    };
    Error::InvalidRequest { field, rule }
}

impl Config {
    /// Parses and validates a `models.yaml` text.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming the field, and the line where the parser gives one.
    pub fn from_yaml(text: &str) -> Result<Config> {
        check_depth(text)?;
        let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| parse_error(&e))?;
        let mut config = Config::new();
        for (name, p) in raw.providers {
            config = config.with_provider(&name, Provider { base_url: p.base_url, api_key_env: p.api_key_env })?;
        }
        for (name, m) in raw.models {
            let spec = model_spec(&name, m)?;
            config = config.with_model(&name, spec)?;
        }
        config.limits = Limits {
            max_tokens_per_minute: raw.limits.max_tokens_per_minute,
            model_tokens_per_minute: raw.limits.model_tokens_per_minute,
            max_concurrent: raw.limits.max_concurrent,
        };
        config.default_model = raw.default_model;
        config.validate()?;
        config.source_hash = Some(Sha256::digest(text.as_bytes()).into());
        Ok(config)
    }

    /// Reads and parses a `models.yaml` file.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `config` when the file cannot be read, is over 4 MiB,
    /// or could be changed by another user (owned by someone other than this user or root, or
    /// group/other writable: a config decides where prompts and keys go); otherwise as
    /// [`Config::from_yaml`].
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        crate::store::files::check_config_file(path).map_err(|rule| Error::invalid("config", rule))?;
        let unreadable = |e: std::io::Error| Error::invalid("config", format!("cannot read {}: {e}", path.display()));
        let size = std::fs::metadata(path).map_err(unreadable)?.len();
        if size > MAX_FILE_BYTES {
            return Err(Error::invalid("config", format!("{} is larger than 4 MiB", path.display())));
        }
        Config::from_yaml(&std::fs::read_to_string(path).map_err(unreadable)?)
    }
}

/// Refuses text nested deeper than [`MAX_DEPTH`] — flow collections (`[`, `{`) or block
/// indentation — before the parser sees it.
fn check_depth(text: &str) -> Result<()> {
    let too_deep = |line: usize| {
        Err(Error::invalid("config", format!("line {line}: nested deeper than {MAX_DEPTH} levels")))
    };
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (i, line) in text.lines().enumerate() {
        let content = line.trim_start_matches([' ', '-']);
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if flow == 0 {
            // Block nesting: each deeper indentation (a `- ` counts as one) opens a level.
            let indent = line.len() - line.trim_start_matches(' ').len();
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            let dashes = line.trim_start_matches(' ').bytes().take_while(|&b| b == b'-' || b == b' ').filter(|&b| b == b'-').count();
            if indents.len() + dashes > MAX_DEPTH {
                return too_deep(i + 1);
            }
        }
        // Every bracket counts, quoted or after a `#`: a plain scalar may hold either, and
        // counting too many only refuses a file no models.yaml resembles.
        for c in line.bytes() {
            match c {
                b'[' | b'{' => {
                    flow += 1;
                    if indents.len() + flow > MAX_DEPTH {
                        return too_deep(i + 1);
                    }
                }
                b']' | b'}' => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let started = std::time::Instant::now();
        let hidden = |opener: &str| format!("models: [{opener}, {}{}]", "[".repeat(50_000), "]".repeat(50_000));
        for text in ["models: ".to_string() + &"[".repeat(200_000), "a: ".to_string() + &"{b: ".repeat(40), hidden("a#b"), hidden("it's")] {
            let e = Config::from_yaml(&text).unwrap_err();
            assert!(e.to_string().contains("nested deeper than 32 levels"), "{e}");
        }
        let block: String = (0..40).map(|d| format!("{}k{d}:\n", " ".repeat(d))).collect();
        assert!(Config::from_yaml(&block).unwrap_err().to_string().contains("line 33: nested deeper"));
        let dashes = format!("{}1\n", "- ".repeat(40));
        assert!(Config::from_yaml(&dashes).unwrap_err().to_string().contains("nested deeper"));
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "refused quickly");
        // Thirty levels are fine as far as depth goes (the schema then refuses the fields).
        let ok: String = (0..30).map(|d| format!("{}k{d}:\n", " ".repeat(d))).collect();
        assert!(!Config::from_yaml(&ok).unwrap_err().to_string().contains("nested deeper"));
        Config::from_yaml(FULL).unwrap();
    }

    const FULL: &str = r#"
providers:
  openai: {base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
  ollama: {base_url: "http://127.0.0.1:11434/v1"}
models:
  gpt-4o-mini:
    provider: openai
    input_price: 0.15
    output_price: "0.60"
    cached_input_price: 0.075
    max_output_tokens: 16384
    context_window: 128000
    vision: true
    fallbacks: [gpt-4o]
  gpt-4o:
    provider: openai
    input_price: 2.5
    output_price: 10
  llama3:
    provider: ollama
    streaming: false
limits:
  max_tokens_per_minute: 1000
  model_tokens_per_minute: {gpt-4o: 500}
  max_concurrent: 8
default_model: gpt-4o-mini
"#;

    #[test]
    fn parses_the_documented_format_exactly() {
        let c = Config::from_yaml(FULL).unwrap();
        let mini = c.model("gpt-4o-mini").unwrap();
        assert_eq!(mini.prices, Some(Prices { input: 150_000, output: 600_000, cached_input: Some(75_000) }));
        assert_eq!((mini.max_output_tokens, mini.context_window), (16_384, Some(128_000)));
        assert_eq!(mini.capabilities, ModelCapabilities { tools: true, vision: true, streaming: true });
        assert_eq!(mini.fallbacks, ["gpt-4o"]);
        assert_eq!(c.model("gpt-4o").unwrap().prices.unwrap().output, 10_000_000);
        let llama = c.model("llama3").unwrap();
        assert_eq!((llama.prices, llama.max_output_tokens, llama.capabilities.streaming), (None, DEFAULT_MAX_OUTPUT_TOKENS, false));
        assert_eq!(c.provider("openai").unwrap().api_key_env.as_deref(), Some("OPENAI_API_KEY"));
        assert_eq!(c.limits().max_tokens_per_minute, Some(1_000));
        assert_eq!(c.limits().model_tokens_per_minute["gpt-4o"], 500);
        assert_eq!(c.default_model(), Some("gpt-4o-mini"));
        assert_eq!(c.hash(), <[u8; 32]>::from(Sha256::digest(FULL.as_bytes())));
    }

    #[test]
    fn loads_a_daemon_2_0_file_unchanged() {
        let daemon = r#"
providers:
  openai: {base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
models:
  gpt-4o-mini:
    provider: openai
    provider_model: gpt-4o-mini-2024-07-18
    pricing: {input_micro: 1, output_micro: 2}
    limits: {max_tokens: 4096}
    capabilities: {tools: true, vision: false}
default_model: gpt-4o-mini
"#;
        let c = Config::from_yaml(daemon).unwrap();
        let m = c.model("gpt-4o-mini").unwrap();
        assert_eq!(m.prices, Some(Prices { input: 1_000_000, output: 2_000_000, cached_input: None }));
        assert_eq!((m.max_output_tokens, m.capabilities.vision), (4_096, false));
        assert_eq!(m.upstream_name("gpt-4o-mini"), "gpt-4o-mini-2024-07-18");
    }

    fn refused(text: &str, field: &str, needle: &str) {
        match Config::from_yaml(text) {
            Err(Error::InvalidRequest { field: f, rule }) => {
                assert!(f.contains(field), "field {f:?} should name {field:?} (rule: {rule})");
                assert!(rule.contains(needle), "rule {rule:?} should say {needle:?}");
            }
            other => panic!("{text}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn bad_files_name_the_field_and_line() {
        refused("models:\n  m:\n    input_prise: 1\n", "models.m", "line 3");
        refused("models:\n  m:\n    input_price: 1\n    output_price: 1\n    max_output_tokens: lots\n", "models", "line 5");
        refused("models:\n  m: {input_price: -1, output_price: 1}\n", "models.m.input_price", "negative");
        refused("models:\n  m: {input_price: 0.0000001, output_price: 1}\n", "models.m.input_price", "6 decimal");
        refused("models:\n  m: {input_price: 1}\n", "models.m.output_price", "required");
        refused("models:\n  m: {max_output_tokens: 0}\n", "models.m.max_output_tokens", "between");
        refused("models:\n  m: {provider: nowhere}\n", "models.m.provider", "unknown provider");
        refused("models:\n  m: {fallbacks: [ghost]}\n", "models.m.fallbacks", "ghost");
        refused("providers:\n  p: {base_url: ftp://x}\n", "providers.p.base_url", "http");
        refused("limits: {max_tokens_per_minute: 0}\n", "limits.max_tokens_per_minute", "at least 1");
        refused("limits: {model_tokens_per_minute: {ghost: 5}}\n", "limits.model_tokens_per_minute", "ghost");
        refused("default_model: ghost\n", "default_model", "ghost");
        refused("models: [1, 2]\n", "models", "line 1");
        refused("models:\n  m:\n    pricing: {input_micro: 1, output_micro: 1}\n    input_price: 1\n", "models.m.pricing", "not both");
    }
}
