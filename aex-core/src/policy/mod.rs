//! Policy: what an agent may call, checked on the request actually made.
//!
//! Rules, in order: the model is configured; it is on the agent's allowed list (empty = any
//! configured model); tools, streaming and vision only if the agent has the capability; in strict
//! mode, a request must give `max_output_tokens` (its cost must be bounded by the caller, not by a
//! default). The token's scope is checked earlier, with authentication. Each denial is
//! [`Error::PolicyDenied`] with a stable [`PolicyRule`].

use crate::admission::AdmitRequest;
use crate::agent::Agent;
use crate::config::{Config, ModelSpec};
use crate::error::{Error, PolicyRule, Result};

fn deny(reason: PolicyRule, message: String) -> Error {
    Error::PolicyDenied { reason, message }
}

/// Checks the request against the agent's policy and returns the model's spec.
///
/// # Errors
/// [`Error::PolicyDenied`] naming the first rule broken.
pub fn check<'c>(agent: &Agent, config: &'c Config, req: &AdmitRequest) -> Result<&'c ModelSpec> {
    let spec = config
        .model(&req.model)
        .ok_or_else(|| deny(PolicyRule::ModelNotConfigured, format!("model '{}' is not configured", req.model)))?;
    if !agent.allowed_models.is_empty() && !agent.allowed_models.iter().any(|m| m == &req.model) {
        return Err(deny(
            PolicyRule::ModelNotAllowed,
            format!("agent '{}' may not call model '{}'", agent.name, req.model),
        ));
    }
    let caps = agent.capabilities;
    if req.tools && !caps.tools {
        return Err(deny(PolicyRule::ToolsNotAllowed, format!("agent '{}' may not use tools", agent.name)));
    }
    if req.streaming && !caps.streaming {
        return Err(deny(PolicyRule::StreamingNotAllowed, format!("agent '{}' may not stream", agent.name)));
    }
    if req.vision && !caps.vision {
        return Err(deny(PolicyRule::VisionNotAllowed, format!("agent '{}' may not send images", agent.name)));
    }
    if agent.strict && req.max_output_tokens.is_none() {
        return Err(deny(
            PolicyRule::StrictMaxOutputTokens,
            format!("agent '{}' is strict: the request must set max_output_tokens", agent.name),
        ));
    }
    Ok(spec)
}
