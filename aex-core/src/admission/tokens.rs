//! Counting input tokens when the caller did not.
//!
//! * OpenAI-family models (those `tiktoken` knows by name, e.g. `gpt-4o`, `gpt-4.1`, `o3`,
//!   `gpt-3.5-turbo`): the message texts are encoded with the model's real BPE (`o200k_base`,
//!   `cl100k_base`, ...), loaded once, lazily, on first use; plus OpenAI's chat framing of 3 tokens
//!   per message and 3 priming the reply.
//! * Every other model: an upper bound that holds for every byte-level BPE tokenizer (GPT,
//!   Claude, Llama, Mistral families): a token covers at least one byte, so a text never has more
//!   tokens than UTF-8 bytes. Each message adds its role's bytes and 4 framing tokens; the reply is
//!   primed with 3.
//!
//! Over-estimating only reserves more for the length of the call; settlement charges real usage.

use super::Message;

/// Framing tokens per message, and priming the reply, in OpenAI's chat format.
const OPENAI_PER_MESSAGE: i64 = 3;
const PER_REPLY: i64 = 3;
/// Framing tokens per message assumed for unknown formats.
const BOUND_PER_MESSAGE: i64 = 4;

/// Prompts larger than this many bytes are bounded by their length instead of tokenized: BPE
/// time grows faster than linearly on long runs without spaces (25 MB took over 13 s; at this
/// size the worst text measured took about 1 s, English 60 ms, in a release build), and the
/// bound is an over-estimate, so it only reserves more. Counting happens before the write
/// transaction, so even that second is the caller's alone.
pub const TOKENIZE_MAX_BYTES: usize = 1 << 20;

/// Counts the input tokens `messages` will cost on `model` (the provider's name for it).
pub fn estimate_input_tokens(model: &str, messages: &[Message]) -> i64 {
    let n = messages.len() as i64;
    let bytes: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
    if bytes > TOKENIZE_MAX_BYTES {
        return byte_bound(messages);
    }
    match tiktoken_rs::tokenizer::get_tokenizer(model) {
        Some(tokenizer) => {
            let bpe = tiktoken_rs::bpe_for_tokenizer(tokenizer).ok();
            match bpe {
                Some(bpe) => {
                    let body: usize = messages.iter().map(|m| bpe.count_ordinary(&m.role) + bpe.count_ordinary(&m.content)).sum();
                    to_i64(body).saturating_add(OPENAI_PER_MESSAGE * n + PER_REPLY)
                }
                None => byte_bound(messages),
            }
        }
        None => byte_bound(messages),
    }
}

/// Counts the tokens of one text on `model` (no chat framing): the real tokenizer for OpenAI
/// models, the UTF-8 byte length for others.
pub fn count_text_tokens(model: &str, text: &str) -> i64 {
    let bpe = tiktoken_rs::tokenizer::get_tokenizer(model).and_then(|t| tiktoken_rs::bpe_for_tokenizer(t).ok());
    to_i64(bpe.map_or(text.len(), |bpe| bpe.count_ordinary(text)))
}

/// The byte-length bound used for models without a known tokenizer.
pub fn byte_bound(messages: &[Message]) -> i64 {
    let body: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
    to_i64(body).saturating_add(BOUND_PER_MESSAGE * messages.len() as i64 + PER_REPLY)
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_models_use_the_byte_bound() {
        assert_eq!(estimate_input_tokens("claude-x", &[]), 3);
        let msgs = [Message::new("user", "héllo")]; // 4 + 6 bytes
        assert_eq!(estimate_input_tokens("llama3", &msgs), 10 + 4 + 3);
    }

    #[test]
    fn openai_models_use_their_real_tokenizer() {
        // "hello world" is 2 tokens in o200k_base; "user" is 1.
        let msgs = [Message::new("user", "hello world")];
        assert_eq!(estimate_input_tokens("gpt-4o-mini", &msgs), 3 + 3 + 3);
        // The bound is never below the real count.
        let long = [Message::new("user", "The quick brown fox jumps over the lazy dog. ".repeat(50))];
        assert!(estimate_input_tokens("gpt-4o", &long) < byte_bound(&long) / 3);
    }

    #[test]
    fn prompts_over_the_tokenizer_limit_are_bounded_by_their_bytes() {
        // At the limit the text is tokenized; one byte over it, it is bounded by its length (an
        // over-estimate, never under).
        let mut text = "The quick brown fox jumps over the lazy dog. ".repeat(TOKENIZE_MAX_BYTES / 45 + 1);
        text.truncate(TOKENIZE_MAX_BYTES);
        let at = [Message::new("", text.clone())];
        let over = [Message::new("", text + "x")];
        assert!(estimate_input_tokens("gpt-4o", &at) < byte_bound(&at));
        assert_eq!(estimate_input_tokens("gpt-4o", &over), byte_bound(&over));
        let huge = [Message::new("user", "y".repeat(25 << 20))];
        assert_eq!(estimate_input_tokens("gpt-4o", &huge), byte_bound(&huge));
    }
}
