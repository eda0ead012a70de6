//! Agent tokens: how they are made, shown and recognised.
//!
//! A token is `aex_` followed by 48 lowercase hex digits: 192 bits from the operating system's
//! CSPRNG. It is returned once, at creation or rotation, inside a [`Token`] whose `Debug` and
//! `Display` show only its prefix. The store keeps its SHA-256 digest ([`TokenHash`]) and a short
//! display prefix, never the token.
//!
//! Lookup is by digest: a presented token is hashed and the digest is looked up through the
//! store's unique index. The index compares digests, never the secret, and the digest of a guess
//! shares no prefix structure with the secret, so response timing tells an attacker nothing about
//! which bytes of a real token they have right.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The prefix every aex token starts with.
pub const TOKEN_PREFIX: &str = "aex_";
const SECRET_BYTES: usize = 24;
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + SECRET_BYTES * 2;
/// How many characters of the token are kept and shown for recognition (`aex_` + 6 hex digits).
const DISPLAY_LEN: usize = TOKEN_PREFIX.len() + 6;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// May admit executions (the default).
    #[default]
    Execution,
    /// May be authenticated but never admit an execution.
    ReadOnly,
}

impl Scope {
    /// The stable name: `execution` or `read-only`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Execution => "execution",
            Scope::ReadOnly => "read-only",
        }
    }

    /// Parses `execution` or `read-only`.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `scope` for anything else.
    pub fn parse(s: &str) -> Result<Scope> {
        match s {
            "execution" => Ok(Scope::Execution),
            "read-only" | "read_only" | "readonly" => Ok(Scope::ReadOnly),
            _ => Err(Error::invalid("scope", format!("must be 'execution' or 'read-only', got '{s}'"))),
        }
    }
}

/// A freshly issued agent token. The only place the secret exists in aex; shown once.
/// `Debug` and `Display` print only the display prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Draws a new token from the OS CSPRNG.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the operating system has no randomness to give.
    pub fn generate() -> Result<Token> {
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::fill(&mut secret).map_err(|e| Error::Unavailable(format!("OS random source: {e}")))?;
        Ok(Token(format!("{TOKEN_PREFIX}{}", hex::encode(secret))))
    }

    /// The secret text, to hand to the agent. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 digest the store keeps.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }

    /// The short prefix kept for display, e.g. `aex_3f9a1c`.
    pub fn display_prefix(&self) -> &str {
        &self.0[..DISPLAY_LEN]
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}…)", self.display_prefix())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.display_prefix())
    }
}

/// The SHA-256 digest of a token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Digest of presented token text.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Hashes a presented token if it is well-formed.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] (`unknown_token`) when the text cannot be an aex token; the
    /// message never echoes it.
    pub fn of_presented(token: &str) -> Result<TokenHash> {
        let well_formed = token.len() == TOKEN_LEN
            && token.starts_with(TOKEN_PREFIX)
            && token[TOKEN_PREFIX.len()..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !well_formed {
            return Err(Error::Unauthenticated { reason: crate::error::AuthFailure::UnknownToken });
        }
        Ok(TokenHash::of(token))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_well_formed_and_never_printed() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), TOKEN_LEN);
        assert!(TokenHash::of_presented(a.expose()).is_ok());
        assert_eq!(TokenHash::of_presented(a.expose()).unwrap(), a.hash());
        let shown = format!("{a:?} {a}");
        assert!(!shown.contains(&a.expose()[DISPLAY_LEN..]), "{shown}");
    }

    #[test]
    fn malformed_tokens_are_unknown() {
        for bad in ["", "aex_", "sk-123", &"aex_".repeat(13), &format!("aex_{}", "G".repeat(48))] {
            let e = TokenHash::of_presented(bad).unwrap_err();
            assert_eq!(e.status(), 401);
        }
    }
}
