//! Policy: what an agent may call, checked on the request actually made.
//!
//! Rules, in order:
//! 1. the model is configured (so it has a price, or is explicitly free, and a route);
//! 2. it is on the agent's allowed list (empty = any configured model);
//! 3. tools, streaming and vision: the agent must be allowed them **and** the model must support
//!    them;
//! 4. strict mode: the model must be priced and the request must give `max_output_tokens`, so the
//!    reservation bounds the cost;
//! 5. input plus output tokens fit the model's context window, when it declares one;
//! 6. a request carrying its own provider key needs an agent allowed to pass keys through.
//!
//! The token's scope is checked earlier, with authentication. Each denial is
//! [`Error::PolicyDenied`] with a stable [`PolicyRule`] and a message naming the rule.

use crate::admission::AdmitRequest;
use crate::agent::Agent;
use crate::config::{Config, ModelSpec};
use crate::error::{Error, PolicyRule, Result};

fn deny(reason: PolicyRule, message: String) -> Error {
    Error::PolicyDenied { reason, message }
}

/// Checks the request against the agent's policy and the model's capabilities, and returns the
/// model's spec.
///
/// # Errors
/// [`Error::PolicyDenied`] naming the first rule broken.
pub fn check<'c>(agent: &Agent, config: &'c Config, req: &AdmitRequest) -> Result<&'c ModelSpec> {
    let (name, model) = (&agent.name, &req.model);
    let spec = config
        .model(model)
        .ok_or_else(|| deny(PolicyRule::ModelNotConfigured, format!("model '{model}' is not configured")))?;
    if !agent.allowed_models.is_empty() && !agent.allowed_models.iter().any(|m| m == model) {
        return Err(deny(PolicyRule::ModelNotAllowed, format!("agent '{name}' may not call model '{model}'")));
    }
    let (agent_caps, model_caps) = (agent.capabilities, spec.capabilities);
    let uses = [
        (req.tools, agent_caps.tools, model_caps.tools, "use tools", PolicyRule::ToolsNotAllowed, PolicyRule::ModelLacksTools),
        (req.streaming, agent_caps.streaming, model_caps.streaming, "stream", PolicyRule::StreamingNotAllowed, PolicyRule::ModelLacksStreaming),
        (req.vision, agent_caps.vision, model_caps.vision, "send images", PolicyRule::VisionNotAllowed, PolicyRule::ModelLacksVision),
    ];
    for (used, agent_may, model_can, what, agent_rule, model_rule) in uses {
        if used && !agent_may {
            return Err(deny(agent_rule, format!("agent '{name}' may not {what}")));
        }
        if used && !model_can {
            return Err(deny(model_rule, format!("model '{model}' cannot {what}")));
        }
    }
    if req.passthrough && !agent.allow_passthrough {
        return Err(deny(
            PolicyRule::PassthroughNotAllowed,
            format!("agent '{name}' may not pass its own provider key through"),
        ));
    }
    if agent.strict {
        if spec.prices.is_none() {
            return Err(deny(
                PolicyRule::StrictUnpricedModel,
                format!("agent '{name}' is strict: model '{model}' has no price, so its cost cannot be bounded"),
            ));
        }
        if req.max_output_tokens.is_none() {
            return Err(deny(
                PolicyRule::StrictMaxOutputTokens,
                format!("agent '{name}' is strict: the request must set max_output_tokens"),
            ));
        }
    }
    Ok(spec)
}

/// Checks that `input + output` tokens fit the model's context window.
///
/// # Errors
/// [`Error::PolicyDenied`] (`context_window_exceeded`).
pub fn check_context_window(model: &str, spec: &ModelSpec, input_tokens: i64, output_tokens: i64) -> Result<()> {
    if let Some(window) = spec.context_window
        && input_tokens + output_tokens > window
    {
        return Err(deny(
            PolicyRule::ContextWindowExceeded,
            format!("{input_tokens} input + {output_tokens} output tokens exceed model '{model}''s context window of {window}"),
        ));
    }
    Ok(())
}
