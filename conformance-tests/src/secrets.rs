//! Secret-leak checks (issue 16): collect every log line a test produces and
//! search it, and every error's `Display` and `Debug`, for a secret in the
//! forms it could leak in.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Every form a secret could leak in: plain, percent-encoded (as in a URL) and
/// base64 (standard and URL-safe, padded or not, as in SASL PLAIN or HTTP Basic).
pub fn leak_forms(secret: &str) -> Vec<String> {
    let mut forms = vec![secret.to_owned(), percent_encode(secret)];
    for alphabet in [STANDARD, URL_SAFE] {
        let b64 = base64(secret.as_bytes(), alphabet);
        forms.push(b64.trim_end_matches('=').to_owned());
        forms.push(b64);
    }
    forms.sort();
    forms.dedup();
    forms
}

/// The forms of `secret` found in `text` (empty: no leak).
pub fn leaks_in(text: &str, secret: &str) -> Vec<String> {
    leak_forms(secret)
        .into_iter()
        .filter(|form| text.contains(form.as_str()))
        .collect()
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 with padding.
pub fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// URL-safe base64 without padding (as in JWTs).
pub fn base64url(bytes: &[u8]) -> String {
    base64(bytes, URL_SAFE).trim_end_matches('=').to_owned()
}

/// Percent-encodes everything but unreserved characters.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The lines written by the tracing subscriber [`capture_logs`] installs.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test binary) a global tracing subscriber that records
/// every event of every crate at TRACE level, and returns its buffer.
pub fn capture_logs() -> LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogBuffer::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
    .clone()
}

/// Everything an error shows: `Display`, `Debug` and its sources' `Display`.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{e}\n{e:?}\n");
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!("{s}\n{s:?}\n"));
        source = s.source();
    }
    text
}

/// Asserts that none of `secrets` appears in `text`, after checking (the
/// positive control) that the search finds each form of a planted secret.
pub fn assert_no_leak(text: &str, secrets: &[&str]) {
    let planted = "planted-s3cret/+=?&";
    for form in leak_forms(planted) {
        let with_plant = format!("{text}\nsomething {form} else\n");
        assert!(
            !leaks_in(&with_plant, planted).is_empty(),
            "the search misses the planted form {form}"
        );
    }
    assert!(leaks_in(text, planted).is_empty());
    for secret in secrets {
        assert!(
            secret.len() >= 6,
            "a secret this short would match by chance: {secret}"
        );
        let found = leaks_in(text, secret);
        assert!(found.is_empty(), "secret leaked as {found:?} in:\n{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64(b"", STANDARD), "");
        assert_eq!(base64(b"f", STANDARD), "Zg==");
        assert_eq!(base64(b"fo", STANDARD), "Zm8=");
        assert_eq!(base64(b"foobar", STANDARD), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff], URL_SAFE), "-_8=");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn planted_secrets_are_found() {
        assert_no_leak("nothing to see", &["hunter22"]);
        let text = format!("log: {}", base64(b"hunter22", STANDARD));
        assert!(!leaks_in(&text, "hunter22").is_empty());
    }
}
