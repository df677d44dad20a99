//! The manifest's JSON Schema (`progdiff schema`), for editors: with
//! `# yaml-language-server: $schema=progdiff.schema.json` at the top of a manifest,
//! yaml-language-server completes keys and flags mistakes as they are typed.

use progdiff_kinds::config::{DiffusionConfig, ModelConfig};
use progdiff_kinds::data::DataConfig;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::kinds::StageParams;

/// The JSON Schema (draft 2020-12) of a manifest.
pub fn manifest_schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let data = generator.subschema_for::<DataConfig>().to_value();
    let model = generator.subschema_for::<ModelConfig>().to_value();
    let diffusion = generator.subschema_for::<DiffusionConfig>().to_value();
    let resources = generator.subschema_for::<crate::resources::Resources>().to_value();
    let mut variants = Vec::new();
    let mut defs: Map<String, Value> = Map::new();
    for (kind, mut schema) in StageParams::schemas(&mut generator) {
        // Hoist the kind's own definitions to the root.
        if let Some(Value::Object(d)) = schema.as_object_mut().and_then(|o| o.remove("$defs")) {
            defs.extend(d);
        }
        let obj = schema.as_object_mut().expect("struct schemas are objects");
        obj.remove("$schema");
        let props = obj.entry("properties").or_insert_with(|| json!({}));
        let props = props.as_object_mut().expect("properties is an object");
        props.insert("kind".into(), json!({ "const": kind }));
        props.insert(
            "needs".into(),
            json!({
                "description": "Stages this one needs (their outputs are its inputs).",
                "anyOf": [ { "type": "string" }, { "type": "array", "items": { "type": "string" } } ]
            }),
        );
        props.insert("resources".into(), resources.clone());
        props.insert(
            "retries".into(),
            json!({ "description": "How many times a cluster backend resubmits a failed job of this stage.", "type": "integer", "minimum": 0, "maximum": 100 }),
        );
        props.insert(
            "for_each".into(),
            json!({ "description": "`group`: one instance per timestep group of the upstream allocation.", "enum": ["group"] }),
        );
        let required = obj.entry("required").or_insert_with(|| json!([]));
        if let Value::Array(r) = required {
            r.push(json!("kind"));
        }
        obj.insert("additionalProperties".into(), json!(false));
        obj.insert("title".into(), json!(format!("stage of kind `{kind}`")));
        variants.push(schema);
    }
    for (k, v) in generator.take_definitions(true) {
        defs.insert(k, v);
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "progdiff manifest",
        "type": "object",
        "additionalProperties": false,
                "properties": {
            "name": { "type": "string", "description": "Experiment name (defaults to the file name)." },
            "seed": { "type": "integer", "minimum": 0, "description": "Seed for every stage that draws random numbers." },
            "seeds": { "type": ["integer", "null"], "minimum": 1, "maximum": 1000, "description": "Run every variant with this many seeds (`seed`, `seed`+1, ...): a `seed` axis after the sweep's, variants `seed=0`, `seed=1`, ...; `progdiff report` folds the seeds of one configuration into one row with mean, std, 95% CI and n." },
            "data": data,
            "model": model,
            "diffusion": diffusion,
            "stages": {
                "type": "object",
                "description": "Stages by name.",
                "additionalProperties": { "oneOf": variants }
            },
            "extends": {
                "type": "string",
                "description": "A manifest this one changes (path relative to this file): mappings merge key by key, other values replace, `null` removes an inherited entry; `name` is not inherited."
            },
            "sweep": {
                "type": ["object", "null"],
                "description": "Variants of this manifest: the Cartesian product of each `product` path, the `zip` group and the `variants` list. Paths are dotted: `allocate.k`, `prune.proxy.kind`, `model.channels`, `seed`.",
                "additionalProperties": false,
                "properties": {
                    "product": {
                        "type": "object",
                        "description": "Dotted path -> list of values; every combination is a variant.",
                        "additionalProperties": { "type": "array", "minItems": 1 }
                    },
                    "zip": {
                        "type": "object",
                        "description": "Dotted path -> list of values, all of one length; the i-th values go together.",
                        "additionalProperties": { "type": "array", "minItems": 1 }
                    },
                    "variants": {
                        "type": "array",
                        "description": "Named variants: `{ name: ..., <dotted path>: <value>, ... }`.",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": { "name": { "type": "string" } }
                        }
                    }
                }
            }
        },
        "$defs": defs,
    })
}
