//! Poison messages on JetStream (issue 10): messages async-nats cannot parse.
//!
//! async-nats 0.50 parses a message's header block as UTF-8 text with header
//! names of printable ASCII; anything else (a raw `HPUB` with `X-City:
//! Z\xfcrich` from another client) is a protocol error to it, and it drops the
//! whole connection. The server has delivered the message by then, so it is
//! pending on the consumer and comes back after AckWait to kill the connection
//! again — on every subscription of that client.
//!
//! The route polybus takes: after every reconnect, each pull loop asks for its
//! consumer's info and fetches the messages the consumer has delivered and not
//! seen acknowledged (stream sequences above the ack floor up to
//! `delivered.stream_seq`, each checked once) by sequence through
//! `$JS.API.STREAM.MSG.GET`, whose JSON answer carries headers and payload in
//! base64, so nothing is parsed as text on the way. A message whose header
//! block async-nats would refuse ([`client_rejects`], the same checks in the
//! same order as its parser) becomes an undecodable delivery: a labelled copy
//! (payload intact, raw headers in `polybus-dlq-raw-headers`) that the runner
//! dead-letters. Its settlement goes to the consumer's ack subject built for
//! that stream sequence (`$JS.ACK.<stream>.<consumer>.1.<seq>.0.0.0`): the
//! server looks a pending message up by its stream sequence and takes its own
//! delivery sequence from there, so the ack removes it from the pending set.

use base64::Engine as _;
use polybus_core::{Bytes, Error, Message, Result, dlq_headers, wire};

use crate::BACKEND;

/// Why async-nats 0.50 would refuse this header block (and drop its
/// connection), or `None` when it parses it. Mirrors its `HMSG` parser
/// (`connection.rs`): UTF-8 block, a `NATS/1.0` first line with an optional
/// numeric status, every other non-empty line `name:value` (continuation lines
/// start with whitespace) and names of printable ASCII without `:`.
pub(crate) fn client_rejects(block: &[u8]) -> Option<&'static str> {
    let Ok(text) = std::str::from_utf8(block) else {
        return Some("the header block is not UTF-8");
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next().and_then(|l| l.strip_prefix("NATS/1.0")) else {
        return Some("the header block does not start with NATS/1.0");
    };
    let version = version.trim();
    let status = version.split_once(' ').map_or(version, |(s, _)| s.trim());
    if !status.is_empty() && !status.parse::<u16>().is_ok_and(|s| (100..1000).contains(&s)) {
        return Some("the header block's status is not a number");
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Some("a header line without ':'");
        };
        if name.contains(|c: char| !c.is_ascii_graphic() || c == ':') {
            return Some("a header name that is not printable ASCII");
        }
        while lines.next_if(|s| s.starts_with(char::is_whitespace)).is_some() {}
    }
    None
}

/// A raw header: name and value bytes as written.
pub(crate) type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// The header lines of a raw block, as bytes: `name: value` split at the first
/// `:`, the value without the whitespace around it (as NATS clients read it);
/// a line without `:` is a name with a null value.
pub(crate) fn raw_headers(block: &[u8]) -> Vec<RawHeader> {
    let trim = |mut b: &[u8]| {
        while let [first, rest @ ..] = b
            && first.is_ascii_whitespace()
        {
            b = rest;
        }
        while let [rest @ .., last] = b
            && last.is_ascii_whitespace()
        {
            b = rest;
        }
        b.to_vec()
    };
    block
        .split(|&b| b == b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(|line| match line.iter().position(|&b| b == b':') {
            Some(i) => (line[..i].to_vec(), Some(trim(&line[i + 1..]))),
            None => (line.to_vec(), None),
        })
        .collect()
}

/// A message fetched by sequence whose headers async-nats cannot parse.
#[derive(Debug, Clone)]
pub(crate) struct Poisoned {
    pub(crate) sequence: u64,
    pub(crate) subject: String,
    /// The labelled copy: payload intact, polybus's own headers decoded (key,
    /// id, timestamp), the other decodable headers as headers, and every raw
    /// header but polybus's own in `polybus-dlq-raw-headers`.
    pub(crate) message: Message,
    pub(crate) reason: String,
    /// The consumer's ack subject for this stream sequence.
    pub(crate) ack_subject: String,
}

/// Fetches stream sequence `sequence` of `stream` through
/// `$JS.API.STREAM.MSG.GET` and returns it if async-nats could not parse it.
/// `Ok(None)`: it parses, or it is no longer in the stream.
pub(crate) async fn fetch_if_poisoned(
    client: &async_nats::Client,
    stream: &str,
    consumer: &str,
    sequence: u64,
    timeout: std::time::Duration,
) -> Result<Option<Poisoned>> {
    let subject = format!("$JS.API.STREAM.MSG.GET.{stream}");
    let body = format!(r#"{{"seq":{sequence}}}"#);
    let answer = tokio::time::timeout(timeout, client.request(subject, body.into()))
        .await
        .map_err(|_| Error::timeout(format!("fetching stream '{stream}' sequence {sequence}"), timeout))?
        .map_err(|e| {
            crate::backend_error(
                &format!("fetching stream '{stream}' sequence {sequence}"),
                e,
                true,
            )
        })?;
    let json: serde_json::Value = serde_json::from_slice(&answer.payload).map_err(|e| Error::Backend {
        backend: BACKEND,
        message: format!("the answer to STREAM.MSG.GET is not JSON: {e}"),
        retryable: true,
        source: None,
    })?;
    if json.get("error").is_some() {
        // 10037 "no message found": removed by the stream's limits, or deleted.
        return Ok(None);
    }
    let Some(found) = json.get("message") else {
        return Ok(None);
    };
    let b64 = &base64::engine::general_purpose::STANDARD;
    let decode = |field: &str| -> Vec<u8> {
        found
            .get(field)
            .and_then(|v| v.as_str())
            .and_then(|s| b64.decode(s).ok())
            .unwrap_or_default()
    };
    let block = decode("hdrs");
    if block.is_empty() {
        return Ok(None);
    }
    let Some(why) = client_rejects(&block) else {
        return Ok(None);
    };
    let payload = Bytes::from(decode("data"));
    let message_subject = found
        .get("subject")
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_owned();
    let raw = raw_headers(&block);
    let is_own = |name: &[u8]| name.starts_with(b"polybus-");
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
    let mut msg_id = None;
    let mut decodable = Vec::new();
    for (name, value) in &raw {
        let (Some(name), Some(value)) = (text(name), value.as_deref().and_then(text)) else {
            continue;
        };
        if name.eq_ignore_ascii_case("nats-msg-id") {
            msg_id = Some(value);
        } else if !name.to_ascii_lowercase().starts_with("nats-")
            && !name.contains(|c: char| !c.is_ascii_graphic() || c == ':')
        {
            decodable.push((name, polybus_core::HeaderValue::from(value)));
        }
    }
    let mut message = wire::decode(payload, decodable, || {
        msg_id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("{stream}:{sequence}"))
    });
    let label = wire::raw_headers_label(
        raw.iter()
            .filter(|(name, _)| !is_own(name))
            .map(|(name, value)| (&name[..], value.as_deref())),
    );
    message.system_headers.insert(dlq_headers::RAW_HEADERS, label);
    Ok(Some(Poisoned {
        sequence,
        subject: message_subject,
        message,
        reason: format!(
            "NATS headers the client library cannot parse ({why}); stream '{stream}' sequence {sequence}, \
             fetched by sequence (raw headers in polybus-dlq-raw-headers)"
        ),
        ack_subject: format!("$JS.ACK.{stream}.{consumer}.1.{sequence}.0.0.0"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_async_nats_refuses() {
        assert_eq!(client_rejects(b"NATS/1.0\r\nA: b\r\nc-D:  e f \r\n\r\n"), None);
        assert_eq!(client_rejects(b"NATS/1.0\r\nlong:\r\n  continued\r\n\r\n"), None);
        assert!(client_rejects(b"NATS/1.0\r\nX-City: Z\xfcrich\r\n\r\n").is_some());
        assert!(client_rejects(b"NATS/1.0\r\n\xffname: v\r\n\r\n").is_some());
        assert!(client_rejects("NATS/1.0\r\nStädt: v\r\n\r\n".as_bytes()).is_some());
        assert!(client_rejects(b"NATS/1.0\r\nno colon\r\n\r\n").is_some());
        assert!(client_rejects(b"NATS/1.0\r\nsp ace: v\r\n\r\n").is_some());
        assert!(client_rejects(b"NATS/2.0\r\n\r\n").is_some());
    }

    #[test]
    fn raw_headers_keep_bytes_and_order() {
        let raw = raw_headers(b"NATS/1.0\r\n\xffname: v\r\nfine: ok\r\nfine:  two \r\nbare\r\n\r\n");
        assert_eq!(
            raw,
            vec![
                (b"\xffname".to_vec(), Some(b"v".to_vec())),
                (b"fine".to_vec(), Some(b"ok".to_vec())),
                (b"fine".to_vec(), Some(b"two".to_vec())),
                (b"bare".to_vec(), None),
            ]
        );
    }
}
