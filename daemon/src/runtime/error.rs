//! Why an invocation failed. Each broken limit has its own kind, so callers (HTTP status codes,
//! metrics labels, pipeline policies) can tell a hostile function from bad input.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    /// No function of that name is loaded.
    #[error("unknown function `{function}`")]
    UnknownFunction { function: String },
    /// Every instance slot stayed busy for the whole deadline.
    #[error("function `{function}` is saturated: every instance stayed busy")]
    Saturated { function: String },
    /// The function ran past its wall-clock deadline and was stopped.
    #[error("function `{function}`: deadline exceeded ({deadline_ms} ms)")]
    DeadlineExceeded { function: String, deadline_ms: u128 },
    /// The function asked for more linear memory than its cap.
    #[error("function `{function}`: memory limit of {limit} bytes reached")]
    MemoryLimit { function: String, limit: u64 },
    /// The function wrote more than its output cap.
    #[error("function `{function}`: output too large (limit {limit} bytes)")]
    OutputTooLarge { function: String, limit: u64 },
    /// The function exited non-zero: it rejected its input. `reason` is its last stderr line.
    #[error("function `{function}` rejected its input (exit code {code}){}", colon(reason))]
    Rejected { function: String, code: i32, reason: String },
    /// The function trapped (a bug in the function, or a panic).
    #[error("function `{function}` trapped: {cause}")]
    Trap { function: String, cause: String },
    /// The host could not run the function at all.
    #[error("function `{function}` cannot run: {cause}")]
    Unavailable { function: String, cause: String },
}

fn colon(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(": {reason}") }
}

/// Every kind, its label, and whether it passes: a passing failure (no free instance, a model
/// not loaded until the config is fixed) may succeed later with the same bytes, so a frame
/// that meets one is tried again (MQTT) or handed back (Dapr `RETRY`, HTTP 503). Any other
/// failure would repeat: the frame is settled (MQTT), dropped (Dapr `DROP`), or answered.
const KINDS: [(&str, bool); 8] = [
    ("unknown_function", false),
    ("saturated", true),
    ("deadline", false),
    ("memory_limit", false),
    ("output_too_large", false),
    ("rejected", false),
    ("trap", false),
    ("unavailable", true),
];

impl InvokeError {
    /// Every value `kind` can take.
    pub const KINDS: [&'static str; 8] = {
        let mut names = [""; 8];
        let mut i = 0;
        while i < 8 {
            names[i] = KINDS[i].0;
            i += 1;
        }
        names
    };

    fn index(&self) -> usize {
        match self {
            InvokeError::UnknownFunction { .. } => 0,
            InvokeError::Saturated { .. } => 1,
            InvokeError::DeadlineExceeded { .. } => 2,
            InvokeError::MemoryLimit { .. } => 3,
            InvokeError::OutputTooLarge { .. } => 4,
            InvokeError::Rejected { .. } => 5,
            InvokeError::Trap { .. } => 6,
            InvokeError::Unavailable { .. } => 7,
        }
    }

    /// A short stable label for metrics and JSON errors.
    pub fn kind(&self) -> &'static str {
        KINDS[self.index()].0
    }

    /// Whether the same bytes may succeed later (see [`KINDS`]).
    pub fn passes(&self) -> bool {
        KINDS[self.index()].1
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

/// What a caught panic said, for an error message.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
