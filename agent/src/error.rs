//! Errors at the edges of the agent's subsystems (installer, flows, status), typed by what the
//! caller did wrong or what went wrong inside, so the control socket maps each kind to one HTTP
//! status in one place (`api`), and nothing below it knows about HTTP.

/// What a request to the agent can fail with. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (a bad address family, an unknown protocol or interface).
    #[error("{0}")]
    BadRequest(String),
    /// The policy text does not parse or validate; the running policy stays in force.
    #[error("{0}")]
    InvalidPolicy(String),
    /// The policy is valid but could not be installed (a map full, a kernel refusal); the
    /// running policy stays in force.
    #[error("{0:#}")]
    NotInstalled(anyhow::Error),
    /// What was asked about does not exist (an unknown identity in `flows --identity`).
    #[error("{0}")]
    NotFound(String),
    /// The subsystem that answers is not running (stopping, or failed).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: a map that cannot be read, a kernel error.
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
