//! A foreign Kafka producer for the hostile-input cases: records written through
//! librdkafka's C API with exactly the bytes a C, Go or Python client can write —
//! header names that are not UTF-8, null header values, repeated header names,
//! binary keys, null payloads — which rdkafka's safe API cannot express (its
//! header names are `&str`).

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::raw::{c_char, c_void};
use std::time::Duration;

use polybus_conformance::ForeignRecord;
use polybus_core::{Error, Result};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka_sys::bindings as rdsys;
use rdkafka_sys::types::RDKafkaRespErr;

/// Writes `record` to `topic` on `bootstrap`, then flushes.
pub fn produce(bootstrap: &str, topic: &str, record: &ForeignRecord) -> Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // tansu cannot fetch from inside a batch (NOTES): one record per batch.
        .set("batch.num.messages", "1")
        // A Java producer may write records up to the broker's limit (more with
        // compression): larger than polybus's own producer limit.
        .set("message.max.bytes", "2000000")
        .set("log_level", "3")
        .create()
        .map_err(|e| Error::InvalidConfig(format!("foreign producer: {e}")))?;
    let name = CString::new(topic).map_err(|_| Error::InvalidConfig(format!("topic {topic:?}")))?;
    let payload = record.payload.clone();
    let key = record.key.clone();
    // SAFETY: `hdrs` is a fresh header list we own until `rd_kafka_produceva`
    // succeeds (then librdkafka owns it; on failure we destroy it). Every name,
    // value, key and payload pointer refers to memory that lives until the call
    // returns, and RD_KAFKA_MSG_F_COPY makes librdkafka copy payload and key.
    unsafe {
        let hdrs = rdsys::rd_kafka_headers_new(record.headers.len().max(1));
        for (header_name, value) in &record.headers {
            let (ptr, len) = match value {
                Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
                None => (std::ptr::null(), 0),
            };
            let err = rdsys::rd_kafka_header_add(
                hdrs,
                header_name.as_ptr().cast::<c_char>(),
                header_name.len() as isize,
                ptr,
                len,
            );
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                rdsys::rd_kafka_headers_destroy(hdrs);
                return Err(Error::InvalidConfig(format!("adding a header: {err:?}")));
            }
        }
        let mut vus: Vec<rdsys::rd_kafka_vu_t> = Vec::new();
        let mut vu = |vtype, u| vus.push(rdsys::rd_kafka_vu_t { vtype, u });
        use rdsys::rd_kafka_vtype_t as V;
        vu(
            V::RD_KAFKA_VTYPE_TOPIC,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 { cstr: name.as_ptr() },
        );
        vu(
            V::RD_KAFKA_VTYPE_MSGFLAGS,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                i: rdsys::RD_KAFKA_MSG_F_COPY,
            },
        );
        let mem = |bytes: &Option<Vec<u8>>| rdsys::rd_kafka_vu_s__bindgen_ty_1 {
            mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                ptr: bytes
                    .as_ref()
                    .map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut c_void),
                size: bytes.as_ref().map_or(0, Vec::len),
            },
        };
        vu(V::RD_KAFKA_VTYPE_VALUE, mem(&payload));
        if key.is_some() {
            vu(V::RD_KAFKA_VTYPE_KEY, mem(&key));
        }
        vu(
            V::RD_KAFKA_VTYPE_HEADERS,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 { headers: hdrs },
        );
        let error = rdsys::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len());
        if !error.is_null() {
            let code = rdsys::rd_kafka_error_code(error);
            rdsys::rd_kafka_error_destroy(error);
            rdsys::rd_kafka_headers_destroy(hdrs);
            return Err(Error::InvalidConfig(format!(
                "producing a foreign record: {code:?}"
            )));
        }
    }
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| Error::timeout(format!("flushing a foreign record: {e}"), Duration::from_secs(10)))
}
