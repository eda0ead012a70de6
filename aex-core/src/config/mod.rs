//! The models aex governs, their providers, prices, capabilities and shared limits.
//!
//! A [`Config`] is built in code ([`Config::with_model`]) or read from a `models.yaml`
//! ([`Config::from_yaml`], format in [`yaml`]). Prices are held as integer micro-USD per million
//! tokens (see [`crate::money`]); a model without prices is free to call (a local model, say) and
//! is denied to strict agents, whose calls must be bounded. The kernel holds one `Config` at a
//! time and can swap it at run time ([`crate::Kernel::reload_config`]); an admission copies the
//! prices it used into the reservation, so a later change never re-prices an open execution.

pub mod yaml;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::agent::validate_model_name;
use crate::error::{Error, Result};
use crate::money::{self, MAX_MICRO};

/// Prices of one model, micro-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prices {
    /// Per million input tokens.
    pub input: i64,
    /// Per million output tokens.
    pub output: i64,
    /// Per million cached input tokens; `None` prices them as input.
    pub cached_input: Option<i64>,
}

impl Prices {
    /// Prices given as USD-per-million-token decimal text, e.g. `("0.15", "0.60")`.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `input_price` or `output_price`.
    pub fn from_usd(input: &str, output: &str) -> Result<Prices> {
        Ok(Prices {
            input: money::parse_usd("input_price", input)?,
            output: money::parse_usd("output_price", output)?,
            cached_input: None,
        })
    }

    fn validate(&self, model: &str) -> Result<()> {
        let check = |what: &str, p: i64| {
            if !(0..=MAX_MICRO).contains(&p) {
                return Err(Error::invalid(
                    format!("models.{model}.{what}"),
                    "must be between 0 and 1e9 USD per million tokens",
                ));
            }
            Ok(())
        };
        check("input_price", self.input)?;
        check("output_price", self.output)?;
        if let Some(c) = self.cached_input {
            check("cached_input_price", c)?;
        }
        Ok(())
    }
}

/// What a model can do. A request using a capability the model lacks is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelCapabilities {
    /// Accepts tool definitions.
    pub tools: bool,
    /// Accepts images.
    pub vision: bool,
    /// Can stream.
    pub streaming: bool,
}

impl Default for ModelCapabilities {
    fn default() -> Self {
        ModelCapabilities { tools: true, vision: false, streaming: true }
    }
}

/// One model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The provider that serves it (a key of [`Config::providers`]), if routed by aex.
    pub provider: Option<String>,
    /// The name the provider knows it by, if not the same.
    pub provider_model: Option<String>,
    /// Prices; `None` for an unpriced (free) model, which strict agents may not call.
    pub prices: Option<Prices>,
    /// The most output tokens one call may produce: the reservation when a request gives no
    /// `max_output_tokens`, and the clamp when it asks for more.
    pub max_output_tokens: i64,
    /// Input plus output tokens the model accepts, if known; a request that cannot fit is denied.
    pub context_window: Option<i64>,
    /// Tools, vision, streaming.
    pub capabilities: ModelCapabilities,
    /// Models to try, in order, when this one fails retryably (used by dispatch).
    pub fallbacks: Vec<String>,
}

impl ModelSpec {
    /// A priced model with default capabilities and no provider.
    pub fn priced(prices: Prices, max_output_tokens: i64) -> ModelSpec {
        ModelSpec {
            provider: None,
            provider_model: None,
            prices: Some(prices),
            max_output_tokens,
            context_window: None,
            capabilities: ModelCapabilities::default(),
            fallbacks: Vec::new(),
        }
    }

    /// The name to count tokens and call the provider with.
    pub fn upstream_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.provider_model.as_deref().unwrap_or(name)
    }
}

/// Where a provider lives and where its key comes from. Never holds the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The OpenAI-compatible API root, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The environment variable holding the host's key, if the host holds one.
    pub api_key_env: Option<String>,
}

/// Limits shared by every agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Tokens per minute across all agents and models.
    pub max_tokens_per_minute: Option<u64>,
    /// Tokens per minute per model, across agents.
    pub model_tokens_per_minute: BTreeMap<String, u64>,
    /// Open executions across all agents.
    pub max_concurrent: Option<u64>,
}

/// The largest `max_output_tokens` or `context_window` a model may declare.
pub const MAX_OUTPUT_TOKENS: i64 = 10_000_000;

/// The whole configuration. Cheap to share behind an `Arc`; immutable once built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    providers: BTreeMap<String, Provider>,
    models: BTreeMap<String, ModelSpec>,
    limits: Limits,
    default_model: Option<String>,
    source_hash: Option<[u8; 32]>,
}

impl Config {
    /// An empty config: every model is unknown.
    pub fn new() -> Self {
        Config::default()
    }

    /// Adds or replaces a model.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `models.NAME.FIELD` (see [`Config::validate`]).
    pub fn with_model(mut self, name: &str, spec: ModelSpec) -> Result<Self> {
        validate_model(name, &spec)?;
        self.models.insert(name.to_string(), spec);
        Ok(self)
    }

    /// Adds or replaces a provider.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `providers.NAME.base_url` when it is not an http(s) URL.
    pub fn with_provider(mut self, name: &str, provider: Provider) -> Result<Self> {
        validate_provider(name, &provider)?;
        self.providers.insert(name.to_string(), provider);
        Ok(self)
    }

    /// Sets the shared limits.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `limits.FIELD` for a zero limit.
    pub fn with_limits(mut self, limits: Limits) -> Result<Self> {
        validate_limits(&limits)?;
        self.limits = limits;
        Ok(self)
    }

    /// Checks the cross-references: every model's provider and fallbacks, per-model limits and
    /// the default model name things that exist.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming the first dangling reference.
    pub fn validate(&self) -> Result<()> {
        for (name, spec) in &self.models {
            validate_model(name, spec)?;
            if let Some(p) = &spec.provider
                && !self.providers.contains_key(p)
            {
                return Err(Error::invalid(format!("models.{name}.provider"), format!("names unknown provider '{p}'")));
            }
            for f in &spec.fallbacks {
                if !self.models.contains_key(f) || f == name {
                    return Err(Error::invalid(
                        format!("models.{name}.fallbacks"),
                        format!("'{f}' must be another configured model"),
                    ));
                }
            }
        }
        for (name, p) in &self.providers {
            validate_provider(name, p)?;
        }
        validate_limits(&self.limits)?;
        for m in self.limits.model_tokens_per_minute.keys() {
            if !self.models.contains_key(m) {
                return Err(Error::invalid("limits.model_tokens_per_minute", format!("names unknown model '{m}'")));
            }
        }
        if let Some(d) = &self.default_model
            && !self.models.contains_key(d)
        {
            return Err(Error::invalid("default_model", format!("names unknown model '{d}'")));
        }
        Ok(())
    }

    /// The model's spec, if configured.
    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.models.get(name)
    }

    /// Every configured model, by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelSpec)> {
        self.models.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.get(name)
    }

    /// Every provider, by name.
    pub fn providers(&self) -> impl Iterator<Item = (&str, &Provider)> {
        self.providers.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The shared limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The model used when a caller names none, if configured.
    pub fn default_model(&self) -> Option<&str> {
        self.default_model.as_deref()
    }

    /// SHA-256 identifying this config: of the file's bytes when read from YAML, otherwise of a
    /// canonical rendering of its contents. Recorded in the ledger on every load.
    pub fn hash(&self) -> [u8; 32] {
        self.source_hash.unwrap_or_else(|| Sha256::digest(format!("{self:?}").as_bytes()).into())
    }

    /// [`Config::hash`] as lowercase hex, the form the ledger and the surfaces show.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash())
    }
}

fn validate_model(name: &str, spec: &ModelSpec) -> Result<()> {
    validate_model_name("models", name)?;
    if let Some(p) = &spec.prices {
        p.validate(name)?;
    }
    if !(1..=MAX_OUTPUT_TOKENS).contains(&spec.max_output_tokens) {
        return Err(Error::invalid(
            format!("models.{name}.max_output_tokens"),
            format!("must be between 1 and {MAX_OUTPUT_TOKENS}"),
        ));
    }
    if let Some(w) = spec.context_window
        && !(1..=MAX_OUTPUT_TOKENS * 10).contains(&w)
    {
        return Err(Error::invalid(format!("models.{name}.context_window"), "must be between 1 and 100,000,000"));
    }
    if let Some(pm) = &spec.provider_model {
        validate_model_name(&format!("models.{name}.provider_model"), pm)?;
    }
    Ok(())
}

fn validate_provider(name: &str, p: &Provider) -> Result<()> {
    if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) || p.base_url.len() > 2048 {
        return Err(Error::invalid(format!("providers.{name}.base_url"), "must be an http:// or https:// URL"));
    }
    if let Some(env) = &p.api_key_env
        && (env.is_empty() || !env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        return Err(Error::invalid(format!("providers.{name}.api_key_env"), "must be an environment variable name"));
    }
    if p.api_key_env.is_some() && p.base_url.starts_with("http://") && !is_loopback_url(&p.base_url) {
        return Err(Error::invalid(
            format!("providers.{name}.base_url"),
            "must be https:// when api_key_env is set: over plain http:// to another host the key would travel in clear",
        ));
    }
    Ok(())
}

/// Whether an `http://` URL's host is this machine: `localhost`, `127.0.0.0/8` or `[::1]`. Parsed
/// by the same WHATWG rules the HTTP client follows (so `http://evil\\@127.0.0.1/` is `evil`).
fn is_loopback_url(url: &str) -> bool {
    match url::Url::parse(url).ok().and_then(|u| u.host().map(|h| h.to_owned())) {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn validate_limits(l: &Limits) -> Result<()> {
    if l.max_tokens_per_minute == Some(0) {
        return Err(Error::invalid("limits.max_tokens_per_minute", "must be at least 1 (omit it for no limit)"));
    }
    if l.max_concurrent == Some(0) {
        return Err(Error::invalid("limits.max_concurrent", "must be at least 1 (omit it for no limit)"));
    }
    if let Some((m, _)) = l.model_tokens_per_minute.iter().find(|(_, v)| **v == 0) {
        return Err(Error::invalid(format!("limits.model_tokens_per_minute.{m}"), "must be at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_never_goes_over_plain_http_to_another_host() {
        let with = |url: &str, key: Option<&str>| validate_provider("p", &Provider { base_url: url.into(), api_key_env: key.map(Into::into) });
        for ok in [
            "https://api.example.com/v1",
            "http://127.0.0.1:11434/v1",
            "http://localhost/v1",
            "http://LOCALHOST/v1",
            "http://[::1]:8080/v1",
            "http://127.8.9.1/v1",
            "http://user@127.0.0.1/v1",
        ] {
            with(ok, Some("KEY")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        with("http://llm.example.com/v1", None).unwrap();
        for bad in [
            "http://llm.example.com/v1",
            "http://10.0.0.5:8000/v1",
            "http://localhost.example.com/v1",
            "http://127.0.0.1@evil.example/v1",
            "http://evil.example\\@127.0.0.1/v1",
            "http://evil.example\\@localhost/v1",
            "http://0.0.0.0/v1",
        ] {
            let e = with(bad, Some("KEY")).err().unwrap_or_else(|| panic!("{bad} was accepted"));
            assert!(matches!(&e, Error::InvalidRequest { field, .. } if field == "providers.p.base_url"), "{bad}: {e}");
        }
    }
}
