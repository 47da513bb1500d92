//! Message headers as brokers carry them: an ordered multimap whose values keep
//! their bytes (or are null).
//!
//! Kafka allows repeated header keys, values that are not UTF-8 and null values;
//! AMQP values are typed; NATS values are text. What polybus *sends* follows the
//! portable grammar (UTF-8 text without CR/LF, see [`crate::names`]); what it
//! *receives* may come from any producer, so a delivery's headers keep what the
//! broker returned, and a dead-letter copy carries them unchanged.

use bytes::Bytes;

/// One header value: bytes, or null (a Kafka header without a value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderValue {
    /// The value's bytes (UTF-8 text for everything polybus sends).
    Bytes(Bytes),
    /// No value at all (distinct from an empty value).
    Null,
}

impl HeaderValue {
    /// The value as text, if it is UTF-8 (`None` for other bytes and for null).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Bytes(b) => std::str::from_utf8(b).ok(),
            HeaderValue::Null => None,
        }
    }

    /// The value's bytes (`None` for null).
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            HeaderValue::Bytes(b) => Some(b),
            HeaderValue::Null => None,
        }
    }

    /// Whether the value is null.
    pub fn is_null(&self) -> bool {
        matches!(self, HeaderValue::Null)
    }
}

impl From<&str> for HeaderValue {
    fn from(v: &str) -> Self {
        HeaderValue::Bytes(Bytes::copy_from_slice(v.as_bytes()))
    }
}

impl From<String> for HeaderValue {
    fn from(v: String) -> Self {
        HeaderValue::Bytes(Bytes::from(v))
    }
}

impl From<&String> for HeaderValue {
    fn from(v: &String) -> Self {
        HeaderValue::from(v.as_str())
    }
}

impl From<Vec<u8>> for HeaderValue {
    fn from(v: Vec<u8>) -> Self {
        HeaderValue::Bytes(Bytes::from(v))
    }
}

impl From<&[u8]> for HeaderValue {
    fn from(v: &[u8]) -> Self {
        HeaderValue::Bytes(Bytes::copy_from_slice(v))
    }
}

impl From<Bytes> for HeaderValue {
    fn from(v: Bytes) -> Self {
        HeaderValue::Bytes(v)
    }
}

impl From<Option<Bytes>> for HeaderValue {
    fn from(v: Option<Bytes>) -> Self {
        v.map_or(HeaderValue::Null, HeaderValue::Bytes)
    }
}

impl PartialEq<str> for HeaderValue {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == Some(other.as_bytes())
    }
}

impl PartialEq<&str> for HeaderValue {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == Some(other.as_bytes())
    }
}

/// Headers: an ordered multimap of text keys to [`HeaderValue`]s.
///
/// Entries keep the order they were added (or received) in, and a key may
/// repeat. [`get`](Headers::get) reads the first value of a key as text;
/// [`get_all`](Headers::get_all) reads every value. Equality ignores the order
/// *between* different keys (brokers such as NATS and AMQP do not keep it) but
/// not the order of one key's values.
///
/// ```
/// use polybus_core::Headers;
/// let mut h = Headers::new();
/// h.insert("source", "app");
/// h.append("tag", "a");
/// h.append("tag", "b");
/// assert_eq!(h.get("source"), Some("app"));
/// assert_eq!(h.get_all("tag").count(), 2);
/// ```
#[derive(Debug, Clone, Default, Eq)]
pub struct Headers {
    entries: Vec<(String, HeaderValue)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// How many entries (a repeated key counts each time).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first value of `key` as text, if it exists and is UTF-8.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_value(key).and_then(HeaderValue::as_str)
    }

    /// The first value of `key`.
    pub fn get_value(&self, key: &str) -> Option<&HeaderValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Every value of `key`, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.entries.iter().filter(move |(k, _)| k == key).map(|(_, v)| v)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    /// Sets `key` to `value`, replacing every earlier value of `key` (the new
    /// entry takes the place of the first one).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<HeaderValue>) {
        let key = key.into();
        let value = value.into();
        match self.entries.iter().position(|(k, _)| *k == key) {
            Some(first) => {
                self.entries[first].1 = value;
                let mut i = first + 1;
                while i < self.entries.len() {
                    if self.entries[i].0 == key {
                        self.entries.remove(i);
                    } else {
                        i += 1;
                    }
                }
            }
            None => self.entries.push((key, value)),
        }
    }

    /// Adds a value for `key`, keeping the ones it already has.
    pub fn append(&mut self, key: impl Into<String>, value: impl Into<HeaderValue>) {
        self.entries.push((key.into(), value.into()));
    }

    /// Removes every value of `key`; returns the first one.
    pub fn remove(&mut self, key: &str) -> Option<HeaderValue> {
        let first = self.entries.iter().position(|(k, _)| k == key)?;
        let value = self.entries.remove(first).1;
        self.entries.retain(|(k, _)| k != key);
        Some(value)
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &HeaderValue) -> bool) {
        self.entries.retain(|(k, v)| keep(k, v));
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HeaderValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Every key, in order (a repeated key repeats).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    fn sorted(&self) -> Vec<&(String, HeaderValue)> {
        let mut all: Vec<_> = self.entries.iter().collect();
        // Stable: one key's values keep their order.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.sorted() == other.sorted()
    }
}

impl<K: Into<String>, V: Into<HeaderValue>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers {
            entries: iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        }
    }
}

impl<K: Into<String>, V: Into<HeaderValue>> Extend<(K, V)> for Headers {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.entries
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

impl IntoIterator for Headers {
    type Item = (String, HeaderValue);
    type IntoIter = std::vec::IntoIter<(String, HeaderValue)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a HeaderValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, HeaderValue)>,
        fn(&'a (String, HeaderValue)) -> (&'a str, &'a HeaderValue),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multimap_that_keeps_bytes() {
        let mut h = Headers::new();
        h.append("k", "1");
        h.append("k", HeaderValue::Null);
        h.append("bin", vec![0xff, 0xfe]);
        assert_eq!(h.get("k"), Some("1"));
        assert_eq!(h.get_all("k").count(), 2);
        assert_eq!(h.get("bin"), None, "not UTF-8");
        assert_eq!(
            h.get_value("bin").and_then(HeaderValue::as_bytes),
            Some(&[0xff, 0xfe][..])
        );
        h.insert("k", "2");
        assert_eq!(h.get_all("k").collect::<Vec<_>>(), vec![&HeaderValue::from("2")]);
        assert_eq!(h.remove("bin"), Some(HeaderValue::from(vec![0xff, 0xfe])));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn equality_ignores_order_between_keys_only() {
        let a: Headers = [("x", "1"), ("y", "2"), ("x", "3")].into_iter().collect();
        let b: Headers = [("y", "2"), ("x", "1"), ("x", "3")].into_iter().collect();
        let c: Headers = [("y", "2"), ("x", "3"), ("x", "1")].into_iter().collect();
        assert_eq!(a, b);
        assert_ne!(a, c, "one key's values keep their order");
        let null: Headers = [("x", HeaderValue::Null)].into_iter().collect();
        let empty: Headers = [("x", "")].into_iter().collect();
        assert_ne!(null, empty, "null is not empty");
    }
}
