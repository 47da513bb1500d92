//! Reading a record's headers as raw bytes, through librdkafka's C API.
//!
//! **The one module of the library with `unsafe` code.** rdkafka's safe header
//! accessor (`BorrowedHeaders::try_get`) turns each header name into a `&str`
//! with `to_str().unwrap()`: a record whose header *name* is not UTF-8 — legal
//! on the wire, and written by any C, Go or Python client — panics the poll
//! thread and stops the whole group. This module reads names and values as
//! bytes instead, so such a record becomes an undecodable delivery (dead-lettered
//! with its raw headers) rather than a panic.
//!
//! Invariants relied on (librdkafka 2.x, `rdkafka.h`):
//!
//! * `rd_kafka_message_headers(msg, &hdrs)` returns `RD_KAFKA_RESP_ERR__NOENT`
//!   for a record without headers, another error when it cannot parse the
//!   header block (reported, never taken for "no headers"), or
//!   `RD_KAFKA_RESP_ERR_NO_ERROR`
//!   and sets `hdrs` to headers **owned by the message** (not to be freed) that
//!   stay valid while the message is alive and not modified. The message is
//!   borrowed (`&BorrowedMessage`) for the whole function, and nothing here
//!   modifies it.
//! * `rd_kafka_header_get_all(hdrs, idx, &name, &value, &size)` returns
//!   `NO_ERROR` for `idx < rd_kafka_header_cnt(hdrs)` and sets `name` to a
//!   NUL-terminated C string and `value` to `size` bytes, or to NULL for a null
//!   value; both point into the headers and live as long as they do.
//! * Every byte is copied out before the function returns, so no pointer or
//!   borrow escapes.

#![allow(unsafe_code)]

use std::ffi::CStr;

use rdkafka::message::BorrowedMessage;
use rdkafka_sys::bindings as rdsys;
use rdkafka_sys::types::RDKafkaRespErr;

/// One header as the broker returned it: name and value as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub(crate) name: Vec<u8>,
    /// `None` for a null value.
    pub(crate) value: Option<Vec<u8>>,
}

/// Every header of `message`, in order, with names and values as bytes; the
/// error librdkafka gave when it could not parse the header block (it refuses
/// more than 100,000 headers, or a truncated block, with `_BAD_MSG`). A record
/// without headers (`_NOENT`) has none.
pub(crate) fn read(message: &BorrowedMessage<'_>) -> Result<Vec<RawHeader>, RDKafkaRespErr> {
    let mut out = Vec::new();
    // SAFETY: see the module's invariants. `message.ptr()` is the live message
    // this borrow guarantees; the headers pointer it yields is owned by it and
    // only read here; each name/value is copied before the next call.
    unsafe {
        let mut hdrs: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
        let err = rdsys::rd_kafka_message_headers(message.ptr(), &mut hdrs);
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__NOENT {
            return Ok(out);
        }
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(err);
        }
        if hdrs.is_null() {
            return Ok(out);
        }
        let count = rdsys::rd_kafka_header_cnt(hdrs);
        out.reserve(count);
        for idx in 0..count {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size: usize = 0;
            let err = rdsys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size);
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(err);
            }
            if name.is_null() {
                return Err(RDKafkaRespErr::RD_KAFKA_RESP_ERR__BAD_MSG);
            }
            let name = CStr::from_ptr(name).to_bytes().to_vec();
            let value = if value.is_null() {
                None
            } else {
                Some(std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec())
            };
            out.push(RawHeader { name, value });
        }
    }
    Ok(out)
}
