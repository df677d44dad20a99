//! `data:` as a stage's inputs carry it: the values go into the cache key, the fields that name
//! files do not (the content digests of the files do), so moving a dataset re-uses its results.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::DataConfig;

/// The fields of the `data:` kinds that name files or directories. They travel in the inputs'
/// [`Locations`](crate::kind::Locations), never in the key; every file they name is listed by
/// [`DataConfig::content_files`] and hashed into the key by content.
pub const PATH_FIELDS: &[&str] = &["path", "images", "labels"];

/// The `data:` section without its file locations, plus the generator fingerprint of a
/// `synthetic` dataset (which has no file to hash).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataValues {
    /// Every value of the section (`kind` included) but the [`PATH_FIELDS`].
    #[serde(flatten)]
    pub values: Map<String, Value>,
    /// [`DataConfig::generated_fingerprint`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<String>,
}

impl DataValues {
    /// Splits a section into its values and its file locations.
    pub fn split(config: &DataConfig) -> (DataValues, Map<String, Value>) {
        let Value::Object(mut values) = serde_json::to_value(config).expect("data serialises")
        else {
            unreachable!("a data section serialises to an object")
        };
        let mut locations = Map::new();
        for f in PATH_FIELDS {
            if let Some(v) = values.remove(*f) {
                locations.insert((*f).to_string(), v);
            }
        }
        (DataValues { values, generated: config.generated_fingerprint() }, locations)
    }

    /// The section back from its values and locations.
    pub fn config(&self, locations: &Map<String, Value>) -> Result<DataConfig, String> {
        let mut all = self.values.clone();
        for (k, v) in locations {
            all.insert(k.clone(), v.clone());
        }
        serde_json::from_value(Value::Object(all))
            .map_err(|e| format!("the inputs' `data:` section does not parse: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_round_trip_for_every_kind() {
        for json in [
            r#"{"kind":"cifar10","path":"c","split":"test","image_size":16}"#,
            r#"{"kind":"idx","images":"i.gz","labels":"l.gz","limit":5}"#,
            r#"{"kind":"idx","images":"i.gz"}"#,
            r#"{"kind":"npz","path":"a/*.npz","key":"x"}"#,
            r#"{"kind":"folder","path":"imgs","channels":"rgb"}"#,
            r#"{"kind":"synthetic","n":3,"seed":2}"#,
        ] {
            let c: DataConfig = serde_json::from_str(json).unwrap();
            let (values, at) = DataValues::split(&c);
            for f in PATH_FIELDS {
                assert!(!values.values.contains_key(*f), "{json}: `{f}` in the values");
            }
            assert_eq!(values.config(&at).unwrap(), c, "{json}");
            // Through JSON, as a job carries it.
            let back: DataValues =
                serde_json::from_value(serde_json::to_value(&values).unwrap()).unwrap();
            assert_eq!(back, values);
        }
    }

    #[test]
    fn every_path_field_names_files_the_key_hashes() {
        // Each path field, when set, changes the files `content_files` lists (so the key sees
        // the files' contents through their digests).
        let dir = std::path::Path::new("/base");
        let c: DataConfig =
            serde_json::from_str(r#"{"kind":"idx","images":"i.gz","labels":"l.gz"}"#).unwrap();
        let files = c.content_files(dir).unwrap();
        assert_eq!(files, [dir.join("i.gz"), dir.join("l.gz")]);
        let c: DataConfig = serde_json::from_str(r#"{"kind":"cifar10","path":"c"}"#).unwrap();
        assert!(c.content_files(dir).unwrap().iter().all(|f| f.starts_with("/base/c")));
    }
}
