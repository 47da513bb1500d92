//! A foreign NATS publisher: raw protocol bytes over a plain TCP socket, so a
//! test can write what async-nats (and polybus's `send`) never would — header
//! values and names that are not UTF-8, odd casing, very long values.
//!
//! JetStream: the record goes to the topic's subject (the stream `<topic with
//! ~>` carries exactly that subject) with a reply inbox, and the publish counts
//! only once the PubAck came back. Core NATS: `PING`/`PONG` after the `HPUB`, so
//! the server has processed it (and queued it to subscribers) before we return.

use std::time::Duration;

use polybus_conformance::{Foreign, ForeignRecord};
use polybus_core::{Error, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Why a record cannot be written to NATS at all (`None`: it can).
pub(crate) fn inexpressible(record: &ForeignRecord) -> Option<String> {
    if record.payload.is_none() {
        return Some(
            "NATS has no null payload (no tombstones): a message always has a payload, maybe empty".into(),
        );
    }
    if record.headers.iter().any(|(_, v)| v.is_none()) {
        return Some("NATS header values are text lines: there is no null value".into());
    }
    if let Some(key) = &record.key
        && std::str::from_utf8(key).is_err()
    {
        return Some(
            "NATS has no message key: polybus carries it in the text header polybus-key, so a binary key cannot be written"
                .into(),
        );
    }
    let breaks_frame = |b: &[u8]| b.iter().any(|&c| c == b'\r' || c == b'\n');
    for (name, value) in &record.headers {
        if breaks_frame(name) || name.contains(&b':') || name.is_empty() {
            return Some("a NATS header name cannot be empty or hold ':', CR or LF".into());
        }
        if value.as_deref().is_some_and(breaks_frame) {
            return Some("a NATS header value cannot hold CR or LF".into());
        }
    }
    None
}

/// Whether async-nats 0.50 can parse these headers (it drops the connection
/// on a header block that is not UTF-8 or a name that is not printable ASCII).
pub(crate) fn async_nats_parses(record: &ForeignRecord) -> bool {
    record.headers.iter().all(|(name, value)| {
        std::str::from_utf8(name).is_ok_and(|n| n.chars().all(|c| c.is_ascii_graphic() && c != ':'))
            && value.as_deref().is_none_or(|v| std::str::from_utf8(v).is_ok())
    })
}

/// The header block of `record` (`NATS/1.0`, `name: value` lines, blank line).
pub(crate) fn header_block(record: &ForeignRecord) -> Vec<u8> {
    let mut block = b"NATS/1.0\r\n".to_vec();
    let key = record
        .key
        .iter()
        .map(|k| (b"polybus-key".to_vec(), Some(k.clone())));
    for (name, value) in key.chain(record.headers.iter().cloned()) {
        block.extend_from_slice(&name);
        block.extend_from_slice(b": ");
        block.extend_from_slice(value.as_deref().unwrap_or_default());
        block.extend_from_slice(b"\r\n");
    }
    block.extend_from_slice(b"\r\n");
    block
}

fn io_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(format!("foreign NATS publisher: {what}: {e}"))
}

/// `host:port` of a `nats://host:port` URL (no credentials, no TLS).
pub(crate) fn plain_address(url: &str) -> Option<String> {
    let rest = url.strip_prefix("nats://")?;
    let first = rest.split(',').next()?;
    if first.contains('@') || first.contains('?') {
        return None;
    }
    Some(first.trim_end_matches('/').to_owned())
}

/// Writes `record` to `subject` as raw protocol bytes; with `jetstream`, waits
/// for the stream's PubAck.
pub(crate) async fn publish(
    url: &str,
    subject: &str,
    record: &ForeignRecord,
    jetstream: bool,
) -> Result<Foreign> {
    if let Some(why) = inexpressible(record) {
        return Ok(Foreign::Inexpressible(why));
    }
    let Some(address) = plain_address(url) else {
        return Ok(Foreign::Inexpressible(
            "the raw foreign publisher speaks plain nats:// without credentials only".into(),
        ));
    };
    let headers = header_block(record);
    let payload = record.payload.clone().unwrap_or_default();
    tokio::time::timeout(Duration::from_secs(10), async {
        let socket = TcpStream::connect(&address).await.map_err(|e| io_error("connect", e))?;
        let mut socket = BufReader::new(socket);
        let mut line = String::new();
        socket.read_line(&mut line).await.map_err(|e| io_error("INFO", e))?;
        if !line.starts_with("INFO ") {
            return Err(io_error("expected INFO", line));
        }
        let inbox = format!("_INBOX.foreign.{}", uuid_like());
        let mut out = Vec::new();
        out.extend_from_slice(
            br#"CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1,"name":"foreign"}"#,
        );
        out.extend_from_slice(b"\r\n");
        let reply = if jetstream {
            out.extend_from_slice(format!("SUB {inbox} 1\r\n").as_bytes());
            format!(" {inbox}")
        } else {
            String::new()
        };
        out.extend_from_slice(
            format!(
                "HPUB {subject}{reply} {} {}\r\n",
                headers.len(),
                headers.len() + payload.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&headers);
        out.extend_from_slice(&payload);
        out.extend_from_slice(b"\r\nPING\r\n");
        socket.get_mut().write_all(&out).await.map_err(|e| io_error("write", e))?;
        let mut ponged = false;
        let mut acked = !jetstream;
        while !(ponged && acked) {
            line.clear();
            if socket.read_line(&mut line).await.map_err(|e| io_error("read", e))? == 0 {
                return Err(io_error("read", "the server closed the connection"));
            }
            let op = line.trim_end();
            if op == "PONG" {
                ponged = true;
            } else if op == "PING" {
                socket.get_mut().write_all(b"PONG\r\n").await.map_err(|e| io_error("write", e))?;
            } else if op.starts_with("-ERR") {
                return Err(io_error("server error", op));
            } else if op.starts_with("MSG ") || op.starts_with("HMSG ") {
                let total: usize = op
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| io_error("bad reply line", op))?;
                let mut body = vec![0; total + 2];
                socket.read_exact(&mut body).await.map_err(|e| io_error("read", e))?;
                let body = String::from_utf8_lossy(&body[..total]).into_owned();
                if op.starts_with("HMSG ") || body.contains("\"error\"") {
                    return Err(io_error("no PubAck", body));
                }
                acked = true;
            }
        }
        Ok(Foreign::Published)
    })
    .await
    .map_err(|_| io_error("timed out", "10 s"))?
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}{:x}", std::process::id())
}
