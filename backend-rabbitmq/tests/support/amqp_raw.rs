//! A foreign AMQP 0-9-1 publisher for the hostile-input tests: a tiny
//! hand-rolled client over a TCP socket (PLAIN login, one channel in confirm
//! mode, `basic.publish` with a content header and body frames) that writes
//! exactly the bytes any native client (pika, the Java client, amqp091-go) can
//! write: header names and `message_id`s that are not UTF-8, typed header
//! values (timestamps, integers, floats, decimals, tables, arrays, byte
//! arrays), void values. lapin cannot express these (its `ShortString` is a
//! `String`), so the table is encoded here, byte by byte.

#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A typed AMQP field value (RabbitMQ's type tags).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal { scale: u8, value: u32 },
    LongStr(Vec<u8>),
    Array(Vec<Value>),
    Timestamp(u64),
    Table(Vec<(Vec<u8>, Value)>),
    Void,
    Bytes(Vec<u8>),
}

/// One message as a foreign publisher writes it.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawMessage {
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Vec<(Vec<u8>, Value)>,
    /// The `message_id` property (a short string on the wire: any bytes).
    pub(crate) message_id: Option<Vec<u8>>,
}

impl RawMessage {
    pub(crate) fn new(body: impl Into<Vec<u8>>) -> Self {
        RawMessage {
            body: body.into(),
            ..RawMessage::default()
        }
    }

    pub(crate) fn header(mut self, name: impl Into<Vec<u8>>, value: Value) -> Self {
        self.headers.push((name.into(), value));
        self
    }

    pub(crate) fn message_id(mut self, id: impl Into<Vec<u8>>) -> Self {
        self.message_id = Some(id.into());
        self
    }
}

/// Where the broker is: from an `amqp://user:pass@host:port/vhost` URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: String,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) vhost: String,
}

impl Target {
    pub(crate) fn from_url(url: &str) -> Target {
        let rest = url.strip_prefix("amqp://").expect("an amqp:// URL");
        let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("guest:guest", authority));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let addr = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:5672")
        };
        let vhost = match percent_decode(vhost) {
            v if v.is_empty() => "/".to_owned(),
            v => v,
        };
        Target {
            addr,
            user: percent_decode(user),
            password: percent_decode(password),
            vhost,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).expect("a UTF-8 URL part")
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    assert!(s.len() <= 255, "a short string holds at most 255 bytes");
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Bool(b) => out.extend([b't', u8::from(*b)]),
        Value::I8(i) => out.extend([b'b', *i as u8]),
        Value::U8(i) => out.extend([b'B', *i]),
        Value::I16(i) => {
            out.push(b's');
            out.extend(i.to_be_bytes());
        }
        Value::U16(i) => {
            out.push(b'u');
            out.extend(i.to_be_bytes());
        }
        Value::I32(i) => {
            out.push(b'I');
            out.extend(i.to_be_bytes());
        }
        Value::U32(i) => {
            out.push(b'i');
            out.extend(i.to_be_bytes());
        }
        Value::I64(i) => {
            out.push(b'l');
            out.extend(i.to_be_bytes());
        }
        Value::F32(f) => {
            out.push(b'f');
            out.extend(f.to_be_bytes());
        }
        Value::F64(f) => {
            out.push(b'd');
            out.extend(f.to_be_bytes());
        }
        Value::Decimal { scale, value } => {
            out.extend([b'D', *scale]);
            out.extend(value.to_be_bytes());
        }
        Value::LongStr(s) => {
            out.push(b'S');
            long(out, s);
        }
        Value::Array(items) => {
            out.push(b'A');
            let mut inner = Vec::new();
            for item in items {
                value(&mut inner, item);
            }
            long(out, &inner);
        }
        Value::Timestamp(t) => {
            out.push(b'T');
            out.extend(t.to_be_bytes());
        }
        Value::Table(entries) => {
            out.push(b'F');
            table(out, entries);
        }
        Value::Void => out.push(b'V'),
        Value::Bytes(b) => {
            out.push(b'x');
            long(out, b);
        }
    }
}

fn table(out: &mut Vec<u8>, entries: &[(Vec<u8>, Value)]) {
    let mut inner = Vec::new();
    for (name, v) in entries {
        short(&mut inner, name);
        value(&mut inner, v);
    }
    long(out, &inner);
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + args.len());
    payload.extend(class.to_be_bytes());
    payload.extend(id.to_be_bytes());
    payload.extend_from_slice(args);
    payload
}

struct Conn {
    stream: TcpStream,
    frame_max: u32,
}

impl Conn {
    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(0xce);
        self.stream.write_all(&frame).await
    }

    async fn read_frame(&mut self) -> std::io::Result<(u8, u16, Vec<u8>)> {
        let mut head = [0u8; 7];
        self.stream.read_exact(&mut head).await?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        self.stream.read_exact(&mut payload).await?;
        if payload.pop() != Some(0xce) {
            return Err(std::io::Error::other("bad frame end"));
        }
        Ok((head[0], u16::from_be_bytes([head[1], head[2]]), payload))
    }

    /// Reads frames until the method `(class, id)`; a `close` from the broker is an error.
    async fn expect(&mut self, class: u16, id: u16) -> std::io::Result<Vec<u8>> {
        loop {
            let (kind, _, payload) = self.read_frame().await?;
            if kind != 1 || payload.len() < 4 {
                continue;
            }
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            if got == (class, id) {
                return Ok(payload[4..].to_vec());
            }
            if got == (10, 50) || got == (20, 40) {
                let text_len = payload[6] as usize;
                let text = String::from_utf8_lossy(&payload[7..7 + text_len]);
                return Err(std::io::Error::other(format!(
                    "the broker closed the {}: {} {text}",
                    if got.0 == 10 { "connection" } else { "channel" },
                    u16::from_be_bytes([payload[4], payload[5]])
                )));
            }
        }
    }
}

async fn connect(target: &Target) -> std::io::Result<Conn> {
    let stream = TcpStream::connect(&target.addr).await?;
    let mut conn = Conn {
        stream,
        frame_max: 131_072,
    };
    conn.stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
    conn.expect(10, 10).await?; // connection.start
    let mut args = Vec::new();
    table(
        &mut args,
        &[(
            b"product".to_vec(),
            Value::LongStr(b"polybus-foreign-test".to_vec()),
        )],
    );
    short(&mut args, b"PLAIN");
    let mut response = vec![0u8];
    response.extend(target.user.as_bytes());
    response.push(0);
    response.extend(target.password.as_bytes());
    long(&mut args, &response);
    short(&mut args, b"en_US");
    conn.send(1, 0, &method(10, 11, &args)).await?; // start-ok
    let tune = conn.expect(10, 30).await?;
    let server_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
    if server_max != 0 {
        conn.frame_max = conn.frame_max.min(server_max);
    }
    let mut args = Vec::new();
    args.extend(1u16.to_be_bytes()); // channel-max
    args.extend(conn.frame_max.to_be_bytes());
    args.extend(0u16.to_be_bytes()); // no heartbeats
    conn.send(1, 0, &method(10, 31, &args)).await?; // tune-ok
    let mut args = Vec::new();
    short(&mut args, target.vhost.as_bytes());
    short(&mut args, b"");
    args.push(0);
    conn.send(1, 0, &method(10, 40, &args)).await?; // connection.open
    conn.expect(10, 41).await?;
    conn.send(1, 1, &method(20, 10, &[0])).await?; // channel.open
    conn.expect(20, 11).await?;
    conn.send(1, 1, &method(85, 10, &[0])).await?; // confirm.select
    conn.expect(85, 11).await?;
    Ok(conn)
}

/// The content header's payload for `message` (class 60, persistent).
fn content_header(message: &RawMessage) -> Vec<u8> {
    let mut flags: u16 = 1 << 12; // delivery-mode
    if !message.headers.is_empty() {
        flags |= 1 << 13;
    }
    if message.message_id.is_some() {
        flags |= 1 << 7;
    }
    let mut out = Vec::new();
    out.extend(60u16.to_be_bytes());
    out.extend(0u16.to_be_bytes());
    out.extend((message.body.len() as u64).to_be_bytes());
    out.extend(flags.to_be_bytes());
    if !message.headers.is_empty() {
        table(&mut out, &message.headers);
    }
    out.push(2);
    if let Some(id) = &message.message_id {
        short(&mut out, id);
    }
    out
}

/// Publishes every message to `exchange` (routing key empty) and waits for the
/// broker's confirm of each; then closes the connection.
pub(crate) async fn publish(target: &Target, exchange: &str, messages: &[RawMessage]) -> std::io::Result<()> {
    let work = async {
        let mut conn = connect(target).await?;
        for message in messages {
            let mut args = Vec::new();
            args.extend(0u16.to_be_bytes());
            short(&mut args, exchange.as_bytes());
            short(&mut args, b"");
            args.push(0);
            conn.send(1, 1, &method(60, 40, &args)).await?;
            conn.send(2, 1, &content_header(message)).await?;
            let chunk = conn.frame_max as usize - 8;
            for body in message.body.chunks(chunk) {
                conn.send(3, 1, body).await?;
            }
            // basic.ack (or basic.nack: an error)
            loop {
                let (kind, _, payload) = conn.read_frame().await?;
                if kind != 1 || payload.len() < 4 {
                    continue;
                }
                match (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    u16::from_be_bytes([payload[2], payload[3]]),
                ) {
                    (60, 80) => break,
                    (60, 120) => return Err(std::io::Error::other("the broker nacked the message")),
                    (10, 50) | (20, 40) => {
                        return Err(std::io::Error::other(
                            "the broker closed the connection or channel",
                        ));
                    }
                    _ => {}
                }
            }
        }
        let mut args = Vec::new();
        args.extend(200u16.to_be_bytes());
        short(&mut args, b"bye");
        args.extend([0, 0, 0, 0]);
        conn.send(1, 0, &method(10, 50, &args)).await?;
        let _ = conn.expect(10, 51).await;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .map_err(|_| std::io::Error::other("the foreign publisher timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed() {
        let t = Target::from_url("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            (t.addr.as_str(), t.user.as_str(), t.vhost.as_str()),
            ("127.0.0.1:5672", "guest", "/")
        );
    }
}
