//! Rotating SASL credentials of live librdkafka clients (issue 16).
//!
//! **The second module of the library with `unsafe` code**: one call,
//! `rd_kafka_sasl_set_credentials` (librdkafka ≥ 2.0, exported by
//! `rdkafka-sys`, not wrapped by `rdkafka`). Invariants relied on
//! (`rdkafka.h`):
//!
//! * `rk` is a live client handle: it comes from `Client::native_ptr` of a
//!   client borrowed for the whole call, so it is not destroyed meanwhile.
//! * `username` and `password` are NUL-terminated C strings (`CString`, kept
//!   alive for the call); librdkafka copies them (`rd_strdup`) under its SASL
//!   lock, so nothing borrowed escapes.
//! * It returns NULL on success or an `rd_kafka_error_t` the caller owns and
//!   must free with `rd_kafka_error_destroy` (done here after reading it).
//!
//! What librdkafka does with them: the new credentials are used "the next time
//! this client needs to authenticate to a broker" (PLAIN and SCRAM only);
//! connections already authenticated stay as they are, and brokers waiting
//! to reconnect are woken (`rd_kafka_all_brokers_wakeup`), so a client whose
//! login was refused retries at once with the new ones.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};

use polybus_core::{Error, Result};
use rdkafka::client::{Client, ClientContext};
use rdkafka_sys::bindings as rdsys;

/// Checks a user name and password before they reach librdkafka.
pub(crate) fn check(username: &str, password: &str) -> Result<(CString, CString)> {
    let user = CString::new(username)
        .map_err(|_| Error::InvalidConfig("Kafka SASL user name holds a NUL byte".into()))?;
    // Never show the password, not even in this error.
    let pass = CString::new(password)
        .map_err(|_| Error::InvalidConfig("Kafka SASL password holds a NUL byte".into()))?;
    if username.is_empty() || password.is_empty() {
        return Err(Error::InvalidConfig(
            "Kafka SASL credentials need a user name and a password".into(),
        ));
    }
    Ok((user, pass))
}

/// Sets the SASL credentials `client` uses for its next logins.
pub(crate) fn set<C: ClientContext>(client: &Client<C>, user: &CStr, pass: &CStr) -> Result<()> {
    // SAFETY: see the module doc: a live handle borrowed for the call, C
    // strings alive for the call and copied by librdkafka, the returned error
    // (if any) read and freed here.
    let error =
        unsafe { rdsys::rd_kafka_sasl_set_credentials(client.native_ptr(), user.as_ptr(), pass.as_ptr()) };
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error owned by us; its string lives until destroyed.
    let message = unsafe {
        let text = CStr::from_ptr(rdsys::rd_kafka_error_string(error))
            .to_string_lossy()
            .into_owned();
        rdsys::rd_kafka_error_destroy(error);
        text
    };
    Err(Error::InvalidConfig(format!(
        "librdkafka refused the new SASL credentials: {message}"
    )))
}
