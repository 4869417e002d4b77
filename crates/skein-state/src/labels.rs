//! A port's labels (`"VIP_0": "/httpi:3141"`): a sorted list of pairs.
//!
//! Ports carry one or two labels. A `BTreeMap<String, String>` allocates a
//! whole node (≈ 0.5 KB) for one label, which at 10,000 tasks was 11 MB of
//! an agent's heap (replica-mem-bench, docs/BENCHMARKS.md); this is the
//! same map, serialized the same way, in ≈ 80 bytes.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Labels sorted by key, each key once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(Box<str>, Box<str>)>);

impl Labels {
    pub fn new() -> Labels {
        Labels::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[i].1)
    }

    /// Sets `key` to `value`, replacing an earlier value (as a map would).
    pub fn insert(&mut self, key: impl Into<Box<str>>, value: impl Into<Box<str>>) {
        let key = key.into();
        let value = value.into();
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(key, value)` in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = str;

    /// The value of `key`; panics if there is none, as a map's index does.
    fn index(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| panic!("no label {key:?}"))
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Box<str>, Box<str>)>,
        fn(&'a (Box<str>, Box<str>)) -> (&'a str, &'a str),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Labels {
        let mut labels = Labels::new();
        for (k, v) in iter {
            labels.insert(k, v);
        }
        labels
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
        struct LabelsVisitor;

        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label names to string values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                // Collected, then sorted once: a later duplicate wins, as
                // it did in the map this replaced.
                let mut pairs: Vec<(usize, Box<str>, Box<str>)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    pairs.push((pairs.len(), k.into(), v.into()));
                }
                pairs.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
                pairs.dedup_by(|later, earlier| later.1 == earlier.1);
                let mut out: Vec<(Box<str>, Box<str>)> =
                    pairs.into_iter().map(|(_, k, v)| (k, v)).collect();
                out.shrink_to_fit();
                Ok(Labels(out))
            }
        }

        d.deserialize_map(LabelsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// Decoded from any JSON object, labels equal the map serde_json
        /// would have made (last duplicate wins) and encode to the same text.
        #[test]
        fn same_as_a_map(pairs in prop::collection::vec(("[a-c]{0,2}", "[xy]{0,2}"), 0..12)) {
            let body: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::json!(k), serde_json::json!(v)))
                .collect();
            let text = format!("{{{}}}", body.join(","));
            let map: BTreeMap<String, String> = serde_json::from_str(&text).expect("map");
            let labels: Labels = serde_json::from_str(&text).expect("labels");
            prop_assert_eq!(labels.len(), map.len());
            for (k, v) in &map {
                prop_assert_eq!(labels.get(k), Some(v.as_str()));
            }
            prop_assert_eq!(
                serde_json::to_string(&labels).expect("encode"),
                serde_json::to_string(&map).expect("encode")
            );
            let inserted: Labels = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            prop_assert_eq!(inserted, labels);
        }
    }

    #[test]
    fn not_a_map_is_an_error() {
        assert!(serde_json::from_str::<Labels>(r#"["VIP_0"]"#).is_err());
        assert!(serde_json::from_str::<Labels>(r#"{"VIP_0": 1}"#).is_err());
    }
}
