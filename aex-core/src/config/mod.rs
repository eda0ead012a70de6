//! The models aex knows and what they cost.
//!
//! A [`Config`] maps model names to [`ModelSpec`]s. Prices are held as integer micro-USD per
//! million tokens (see [`crate::money`]). The kernel holds one `Config` at a time; an admission
//! copies the prices it used into the reservation, so a later change of config never re-prices an
//! open execution.

use std::collections::BTreeMap;

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

/// One model: its prices and output cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Prices in micro-USD per million tokens.
    pub prices: Prices,
    /// The most output tokens one call may produce; the default reservation when a request
    /// gives no `max_output_tokens`, and the clamp when it asks for more.
    pub max_output_tokens: i64,
}

/// The largest `max_output_tokens` a model may declare.
pub const MAX_OUTPUT_TOKENS: i64 = 10_000_000;

/// The set of models the kernel governs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    models: BTreeMap<String, ModelSpec>,
}

impl Config {
    /// An empty config: every model is unknown.
    pub fn new() -> Self {
        Config::default()
    }

    /// Adds or replaces a model.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `models.NAME.FIELD` for a bad name, a price outside
    /// `0..=1e9 USD` per million tokens, or `max_output_tokens` outside `1..=10,000,000`.
    pub fn with_model(mut self, name: &str, spec: ModelSpec) -> Result<Self> {
        validate_model_name("models", name)?;
        spec.prices.validate(name)?;
        if !(1..=MAX_OUTPUT_TOKENS).contains(&spec.max_output_tokens) {
            return Err(Error::invalid(
                format!("models.{name}.max_output_tokens"),
                format!("must be between 1 and {MAX_OUTPUT_TOKENS}"),
            ));
        }
        self.models.insert(name.to_string(), spec);
        Ok(self)
    }

    /// The model's spec, if configured.
    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.models.get(name)
    }

    /// Every configured model, by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelSpec)> {
        self.models.iter().map(|(k, v)| (k.as_str(), v))
    }
}
