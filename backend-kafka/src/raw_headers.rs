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
//!
//! **Header names with a NUL byte.** The wire gives each name with its length,
//! and a Java producer can write `"a\u0000b"` (a C client any bytes), but
//! `rd_kafka_header_get_all` hands the name out as a C string: read with
//! `CStr`, `a\0b` would silently become `a`. librdkafka's public API has no
//! name length, so the length is read from the header itself
//! (`rd_kafka_header_t` in `rdkafka_header.h`: `size_t rkhdr_ser_size,
//! rkhdr_value_size, rkhdr_name_size; char *rkhdr_value; char rkhdr_name[]`, the
//! name pointer pointing at `rkhdr_name`, and a non-null value stored right
//! after the name and its NUL, by `rd_kafka_header_add`, which the record
//! parser calls with the length from the wire). That private layout is not
//! assumed blindly: [`layout_verified`] builds headers with known name lengths
//! through the public API once per process and checks every field it reads
//! (name length, value length, value pointer); each header read is checked
//! again (the length covers the C string, a non-null value starts right after
//! the name). When the check fails (another librdkafka layout), names are read
//! as C strings and a record where that is not the full name (found with
//! `rd_kafka_header_get`, which compares full name lengths) is refused
//! ([`ReadError::NameNotReadable`]) rather than renamed.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::sync::OnceLock;

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

/// Why a record's headers could not be read exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// librdkafka could not parse the header block (it refuses more than
    /// 100,000 headers, or a truncated block, with `_BAD_MSG`).
    Librdkafka(RDKafkaRespErr),
    /// A header name holds a NUL byte and its full length could not be read
    /// (the private layout check failed): the name would have been truncated.
    NameNotReadable,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Librdkafka(code) => {
                write!(
                    f,
                    "librdkafka could not read the record's header block ({code:?})"
                )
            }
            ReadError::NameNotReadable => f.write_str(
                "a header name holds a NUL byte and this librdkafka build does not give its full length",
            ),
        }
    }
}

/// Offsets, back from a header's name, of the private `rd_kafka_header_t`
/// fields read here (see the module doc).
const VALUE_PTR_BACK: usize = size_of::<*mut c_char>();
const NAME_SIZE_BACK: usize = VALUE_PTR_BACK + size_of::<usize>();
const VALUE_SIZE_BACK: usize = NAME_SIZE_BACK + size_of::<usize>();

/// Reads the private fields of the header whose name is at `name`.
///
/// # Safety
/// `name` must be a name pointer returned by `rd_kafka_header_get_all` for
/// headers that are still alive, and [`layout_verified`] must have returned
/// `true`: the fields then lie inside the header's own allocation.
unsafe fn private_fields(name: *const c_char) -> (usize, usize, *const c_void) {
    // SAFETY: per the function's contract the header struct starts
    // `VALUE_SIZE_BACK + size_of::<usize>()` bytes before `name`; unaligned
    // reads, so no alignment is assumed.
    unsafe {
        let base = name.cast::<u8>();
        let name_size = base.sub(NAME_SIZE_BACK).cast::<usize>().read_unaligned();
        let value_size = base.sub(VALUE_SIZE_BACK).cast::<usize>().read_unaligned();
        let value = base.sub(VALUE_PTR_BACK).cast::<*const c_void>().read_unaligned();
        (name_size, value_size, value)
    }
}

/// Whether this process's librdkafka stores headers as `rdkafka_header.h`
/// says, checked once with headers built through the public API: names with
/// NUL bytes of known lengths, a non-null and a null value.
pub(crate) fn layout_verified() -> bool {
    static VERIFIED: OnceLock<bool> = OnceLock::new();
    *VERIFIED.get_or_init(|| {
        // (name, value): lengths chosen so no two fields could be confused.
        let samples: [(&[u8], Option<&[u8]>); 3] = [
            (b"ab\0cde", Some(b"xyz")),
            (b"q\0\0r9xyzw", None),
            (b"plain-name", Some(b"")),
        ];
        // SAFETY: the headers are created, read and destroyed here; every
        // pointer read comes from `rd_kafka_header_get_all` on them, and the
        // private fields are read only after the public value pointer and
        // size agree with what was added (so the struct is where it should be
        // for the first sample before anything else is trusted).
        unsafe {
            let hdrs = rdsys::rd_kafka_headers_new(samples.len());
            if hdrs.is_null() {
                return false;
            }
            let mut ok = true;
            for (name, value) in samples {
                let (value_ptr, value_len) = match value {
                    Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
                    None => (std::ptr::null(), 0),
                };
                let err = rdsys::rd_kafka_header_add(
                    hdrs,
                    name.as_ptr().cast::<c_char>(),
                    name.len() as isize,
                    value_ptr,
                    value_len,
                );
                ok &= err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR;
            }
            for (idx, (name, value)) in samples.iter().enumerate() {
                if !ok {
                    break;
                }
                let (mut n, mut v, mut size): (*const c_char, *const c_void, usize) =
                    (std::ptr::null(), std::ptr::null(), 0);
                let err = rdsys::rd_kafka_header_get_all(hdrs, idx, &mut n, &mut v, &mut size);
                if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || n.is_null() {
                    ok = false;
                    break;
                }
                let (name_size, value_size, value_field) = private_fields(n);
                ok &= name_size == name.len() && value_field == v;
                ok &= std::slice::from_raw_parts(n.cast::<u8>(), name.len()) == *name;
                match value {
                    Some(expected) => {
                        ok &= value_size == expected.len()
                            && size == expected.len()
                            && v == n.cast::<u8>().add(name.len() + 1).cast::<c_void>();
                    }
                    None => ok &= v.is_null() && value_size == 0,
                }
            }
            rdsys::rd_kafka_headers_destroy(hdrs);
            if !ok {
                tracing::warn!(
                    "librdkafka's header layout is not the one polybus checks for: header \
                     names with NUL bytes make a record undecodable instead of being read"
                );
            }
            ok
        }
    })
}

/// Every header of `message`, in order, with names and values as bytes; the
/// error librdkafka gave when it could not parse the header block (it refuses
/// more than 100,000 headers, or a truncated block, with `_BAD_MSG`). A record
/// without headers (`_NOENT`) has none.
pub(crate) fn read(message: &BorrowedMessage<'_>) -> Result<Vec<RawHeader>, ReadError> {
    let verified = layout_verified();
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
            return Err(ReadError::Librdkafka(err));
        }
        if hdrs.is_null() {
            return Ok(out);
        }
        let count = rdsys::rd_kafka_header_cnt(hdrs);
        out.reserve(count);
        for idx in 0..count {
            let mut name: *const c_char = std::ptr::null();
            let mut value: *const c_void = std::ptr::null();
            let mut size: usize = 0;
            let err = rdsys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size);
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(ReadError::Librdkafka(err));
            }
            if name.is_null() {
                return Err(ReadError::Librdkafka(RDKafkaRespErr::RD_KAFKA_RESP_ERR__BAD_MSG));
            }
            let c_len = CStr::from_ptr(name).to_bytes().len();
            let name_len = if verified {
                // The header's own length, checked against what the public
                // API shows of the same header.
                let (name_size, value_size, value_field) = private_fields(name);
                // Pointer and size comparisons first; the terminating NUL is
                // read last, only once everything else agrees (short-circuit).
                let consistent = name_size >= c_len
                    && value_field == value
                    && (value.is_null()
                        || (value_size == size
                            && value == name.cast::<u8>().wrapping_add(name_size + 1).cast::<c_void>()))
                    && *name.cast::<u8>().add(name_size) == 0;
                if !consistent {
                    return Err(ReadError::NameNotReadable);
                }
                name_size
            } else {
                // Without the length: a name that is not exactly its C string
                // is not found by an exact-length lookup of that C string.
                if !c_name_is_whole(hdrs, name) {
                    return Err(ReadError::NameNotReadable);
                }
                c_len
            };
            let name = std::slice::from_raw_parts(name.cast::<u8>(), name_len).to_vec();
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

/// Whether every header whose name reads as the C string at `name` has
/// exactly that name: `rd_kafka_header_get` matches full name lengths, so it
/// must find as many headers under that C string as there are. Quadratic in
/// the header count; used only when the private layout check failed.
///
/// # Safety
/// `hdrs` and `name` come from `rd_kafka_header_get_all` on live headers.
unsafe fn c_name_is_whole(hdrs: *const rdsys::rd_kafka_headers_t, name: *const c_char) -> bool {
    // SAFETY: per the contract; only public calls on live headers.
    unsafe {
        let target = CStr::from_ptr(name);
        let mut same = 0usize;
        for i in 0..rdsys::rd_kafka_header_cnt(hdrs) {
            let (mut n, mut v, mut s): (*const c_char, *const c_void, usize) =
                (std::ptr::null(), std::ptr::null(), 0);
            if rdsys::rd_kafka_header_get_all(hdrs, i, &mut n, &mut v, &mut s)
                == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
                && !n.is_null()
                && CStr::from_ptr(n) == target
            {
                same += 1;
            }
        }
        let (mut v, mut s): (*const c_void, usize) = (std::ptr::null(), 0);
        same > 0
            && rdsys::rd_kafka_header_get(hdrs, same - 1, name, &mut v, &mut s)
                == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
    }
}

#[cfg(test)]
mod tests {
    use super::layout_verified;

    /// The librdkafka this crate pins stores headers the way `raw_headers`
    /// reads them; if an upgrade changes that, this fails (and names with NUL
    /// bytes make records undecodable instead of being read).
    #[test]
    fn the_pinned_librdkafka_has_the_checked_header_layout() {
        assert!(layout_verified());
    }
}
