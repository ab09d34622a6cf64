//! What the server lets a client do: set by whoever starts it (`mvm mcp --allow-image …`),
//! never by the client.

use std::time::Duration;

/// The server's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The images a client may start, each `REFERENCE@sha256:<digest>`, compared whole.
    pub allowed_images: Vec<String>,
    /// The image `sandbox_run_code` and `mvm tool run` start when given no sandbox (allowed
    /// with the others).
    pub default_image: Option<String>,
    /// The most sandboxes of this server at once (any state).
    pub max_sandboxes: usize,
    /// The longest a call may ask to run a command.
    pub max_timeout: Duration,
    /// The most bytes of each of a command's stdout and stderr returned (the rest is counted,
    /// not kept: `truncated`).
    pub max_output_bytes: usize,
    /// The largest file read or written through a tool, and the largest program text.
    pub max_file_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            allowed_images: Vec::new(),
            default_image: None,
            max_sandboxes: 4,
            max_timeout: Duration::from_secs(600),
            max_output_bytes: 64 * 1024,
            max_file_bytes: 1024 * 1024,
        }
    }
}

impl Limits {
    /// Whether a client may start `image`: the default image or one allowed, exactly.
    pub fn allows(&self, image: &str) -> bool {
        self.default_image.as_deref() == Some(image)
            || self.allowed_images.iter().any(|allowed| allowed == image)
    }
}

/// A call's timeout: `asked` seconds (the default when none), within `1..=max`.
pub(crate) fn call_timeout(asked: Option<u64>, max: Duration) -> Result<Duration, String> {
    let seconds = asked.unwrap_or(DEFAULT_TIMEOUT_S.min(max.as_secs()));
    if seconds == 0 || seconds > max.as_secs() {
        return Err(format!(
            "timeout_seconds {seconds} is not 1-{} (this server's ceiling)",
            max.as_secs()
        ));
    }
    Ok(Duration::from_secs(seconds))
}

/// A call's timeout when it gives none.
pub(crate) const DEFAULT_TIMEOUT_S: u64 = 60;
