//! Payload codecs for typed events, chosen by media type.
//!
//! JSON is always available and is what a message without a content type is
//! read as. MessagePack (feature `msgpack`, `rmp-serde`) and CBOR (feature
//! `cbor`, `ciborium`) are compiled in on demand. A producer writes the codec's
//! media type as the event's `datacontenttype` (the `content-type` header); a
//! consumer decodes by it and refuses a media type it has no codec for with a
//! permanent error, so the message is dead-lettered.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{BoxError, Error, Result};

/// A payload encoding for typed events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Codec {
    /// `application/json` (the default; also for messages without a content type).
    #[default]
    Json,
    /// `application/msgpack`, with named fields (feature `msgpack`).
    #[cfg(feature = "msgpack")]
    #[cfg_attr(docsrs, doc(cfg(feature = "msgpack")))]
    MessagePack,
    /// `application/cbor` (feature `cbor`).
    #[cfg(feature = "cbor")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cbor")))]
    Cbor,
}

impl Codec {
    /// Every codec compiled in.
    pub const ALL: &'static [Codec] = &[
        Codec::Json,
        #[cfg(feature = "msgpack")]
        Codec::MessagePack,
        #[cfg(feature = "cbor")]
        Codec::Cbor,
    ];

    /// The media type this codec writes as `datacontenttype`.
    pub fn media_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            #[cfg(feature = "msgpack")]
            Codec::MessagePack => "application/msgpack",
            #[cfg(feature = "cbor")]
            Codec::Cbor => "application/cbor",
        }
    }

    /// The codec for a media type (parameters such as `charset` ignored, case
    /// insensitive; `application/x-msgpack`, `text/json` and `…+json` accepted),
    /// or `None` when none compiled in reads it. `None` as input means JSON.
    pub fn for_media_type(media_type: Option<&str>) -> Option<Codec> {
        let Some(media_type) = media_type else {
            return Some(Codec::Json);
        };
        if crate::cloudevents::is_json_media_type(media_type) {
            return Some(Codec::Json);
        }
        let essence = media_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        Codec::ALL.iter().copied().find(|codec| match codec {
            #[cfg(feature = "msgpack")]
            Codec::MessagePack => essence == "application/msgpack" || essence == "application/x-msgpack",
            other => essence == other.media_type(),
        })
    }

    /// Encodes `value`; an [`Error::Codec`] if the serializer refuses it.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        let encoded: std::result::Result<Vec<u8>, BoxError> = match self {
            Codec::Json => serde_json::to_vec(value).map_err(Into::into),
            #[cfg(feature = "msgpack")]
            Codec::MessagePack => rmp_serde::to_vec_named(value).map_err(Into::into),
            #[cfg(feature = "cbor")]
            Codec::Cbor => {
                let mut out = Vec::new();
                ciborium::into_writer(value, &mut out)
                    .map(|()| out)
                    .map_err(Into::into)
            }
        };
        encoded.map_err(|source| Error::Codec {
            action: "encode",
            source,
        })
    }

    /// Decodes `bytes`; the deserializer's error on failure.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> std::result::Result<T, BoxError> {
        match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(Into::into),
            #[cfg(feature = "msgpack")]
            Codec::MessagePack => rmp_serde::from_slice(bytes).map_err(Into::into),
            #[cfg(feature = "cbor")]
            Codec::Cbor => ciborium::from_reader(bytes).map_err(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Ride {
        ride_id: String,
        seats: u8,
    }

    #[test]
    fn every_codec_round_trips_and_names_its_media_type() {
        let ride = Ride {
            ride_id: "r-1".into(),
            seats: 3,
        };
        for codec in Codec::ALL {
            let bytes = codec.encode(&ride).unwrap();
            assert_eq!(codec.decode::<Ride>(&bytes).unwrap(), ride, "{codec:?}");
            assert_eq!(Codec::for_media_type(Some(codec.media_type())), Some(*codec));
        }
        assert_eq!(Codec::for_media_type(None), Some(Codec::Json));
        assert_eq!(
            Codec::for_media_type(Some("Application/JSON; charset=utf-8")),
            Some(Codec::Json)
        );
        assert_eq!(Codec::for_media_type(Some("application/xml")), None);
    }
}
