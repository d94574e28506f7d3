//! Why an invocation failed. Each broken limit has its own kind, so callers (HTTP status codes,
//! metrics labels, pipeline policies) can tell a hostile function from bad input.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeError {
    /// No function of that name is loaded.
    UnknownFunction { function: String },
    /// Every instance slot stayed busy for the whole deadline.
    Saturated { function: String },
    /// The function ran past its wall-clock deadline and was stopped.
    DeadlineExceeded { function: String, deadline_ms: u128 },
    /// The function asked for more linear memory than its cap.
    MemoryLimit { function: String, limit: u64 },
    /// The function wrote more than its output cap.
    OutputTooLarge { function: String, limit: u64 },
    /// The function exited non-zero: it rejected its input. `reason` is its last stderr line.
    Rejected { function: String, code: i32, reason: String },
    /// The function trapped (a bug in the function, or a panic).
    Trap { function: String, cause: String },
    /// The host could not run the function at all.
    Unavailable { function: String, cause: String },
}

impl InvokeError {
    /// Every value `kind` can take.
    pub const KINDS: [&'static str; 8] = [
        "unknown_function",
        "saturated",
        "deadline",
        "memory_limit",
        "output_too_large",
        "rejected",
        "trap",
        "unavailable",
    ];

    /// A short stable label for metrics and JSON errors.
    pub fn kind(&self) -> &'static str {
        match self {
            InvokeError::UnknownFunction { .. } => "unknown_function",
            InvokeError::Saturated { .. } => "saturated",
            InvokeError::DeadlineExceeded { .. } => "deadline",
            InvokeError::MemoryLimit { .. } => "memory_limit",
            InvokeError::OutputTooLarge { .. } => "output_too_large",
            InvokeError::Rejected { .. } => "rejected",
            InvokeError::Trap { .. } => "trap",
            InvokeError::Unavailable { .. } => "unavailable",
        }
    }

    pub fn function(&self) -> &str {
        match self {
            InvokeError::UnknownFunction { function }
            | InvokeError::Saturated { function }
            | InvokeError::DeadlineExceeded { function, .. }
            | InvokeError::MemoryLimit { function, .. }
            | InvokeError::OutputTooLarge { function, .. }
            | InvokeError::Rejected { function, .. }
            | InvokeError::Trap { function, .. }
            | InvokeError::Unavailable { function, .. } => function,
        }
    }
}

impl fmt::Display for InvokeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvokeError::UnknownFunction { function } => write!(f, "unknown function `{function}`"),
            InvokeError::Saturated { function } => {
                write!(f, "function `{function}` is saturated: every instance stayed busy")
            }
            InvokeError::DeadlineExceeded { function, deadline_ms } => {
                write!(f, "function `{function}`: deadline exceeded ({deadline_ms} ms)")
            }
            InvokeError::MemoryLimit { function, limit } => {
                write!(f, "function `{function}`: memory limit of {limit} bytes reached")
            }
            InvokeError::OutputTooLarge { function, limit } => {
                write!(f, "function `{function}`: output too large (limit {limit} bytes)")
            }
            InvokeError::Rejected { function, code, reason } if reason.is_empty() => {
                write!(f, "function `{function}` rejected its input (exit code {code})")
            }
            InvokeError::Rejected { function, code, reason } => {
                write!(f, "function `{function}` rejected its input (exit code {code}): {reason}")
            }
            InvokeError::Trap { function, cause } => {
                write!(f, "function `{function}` trapped: {cause}")
            }
            InvokeError::Unavailable { function, cause } => {
                write!(f, "function `{function}` cannot run: {cause}")
            }
        }
    }
}

impl std::error::Error for InvokeError {}
