//! `progdiff validate`: every mistake reported with file:line:col; no input panics.

use crate::common::*;
use progdiff::manifest::Manifest;
use proptest::prelude::*;

const THREE_MISTAKES: &str = "\
name: broken
diffusion: { steps: 40, schedule: cosine }
model:
  channels: 64
  chanel_mult: [1, 2]
stages:
  allocate: { kind: snr-allocate, groups: 4, k: 1.5 }
  per_group:
    kind: command
    needs: [allocte]
    for_each: group
    run: 'true'
";

#[test]
fn three_mistakes_are_all_reported_with_positions() {
    let p = Project::new();
    p.write("m.yaml", THREE_MISTAKES);
    let out = p.run(&["validate", "m.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("m.yaml:")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with(
            "m.yaml:5:3: `model.chanel_mult`: unknown field `chanel_mult`, expected one of"
        ),
        "{err}"
    );
    assert!(
        lines[1].starts_with("m.yaml:7:46: `stages.allocate.k`: must be in (0, 1], got 1.5"),
        "{err}"
    );
    assert!(
        lines[2].starts_with("m.yaml:10:13: `stages.per_group.needs`: unknown stage `allocte`"),
        "{err}"
    );
    assert!(err.contains("hint: did you mean `channel_mult`?"), "{err}");
    assert!(err.contains("hint: did you mean `allocate`?"), "{err}");
}

#[test]
fn graph_errors_name_the_problem() {
    let cases = [
        (
            "stages:\n  a: { kind: command, run: 'true', needs: b }\n  b: { kind: command, run: 'true', needs: a }\n",
            "dependency cycle: `a` -> `b` -> `a`",
        ),
        (
            "stages:\n  a: { kind: command, run: 'true', for_each: group }\n",
            "`for_each: group` needs an `snr-allocate` stage",
        ),
        (
            "diffusion: { steps: 0 }\nstages:\n  a: { kind: command, run: 'true' }\n",
            "must be at least 1, got 0",
        ),
        (
            "diffusion: { steps: 5, schedule: cosine }\nstages:\n  a: { kind: snr-allocate, groups: 6 }\n",
            "`stages.a.groups`",
        ),
        ("stages:\n  a: { kind: snr-allocate, k: 0 }\n", "must be in (0, 1], got 0"),
        (
            "diffusion: { steps: 20 }\nstages:\n  a: { kind: snr-allocate, groups: 2 }\n",
            "needs more than 20 steps",
        ),
        ("stages:\n  a: { kind: trian }\n", "unknown stage kind `trian`, expected one of"),
        ("stages:\n  a: { kind: command, run: 'true', needs: a }\n", "cannot need itself"),
        ("stages: {}\n", "declares no stage"),
        (
            "seed: -1\nstages:\n  a: { kind: command, run: 'true' }\n",
            "must be a non-negative integer",
        ),
        (
            "stages:\n  a: { kind: snr-allocate, groups: many }\n",
            "`stages.a.groups`: found string \"many\", expected usize",
        ),
        ("sweeps: 1\nstages:\n  a: { kind: command, run: 'true' }\n", "unknown field `sweeps`"),
        ("a: [1, 2\n", "invalid YAML"),
        ("- 1\n- 2\n", "a manifest is a mapping"),
    ];
    for (text, expected) in cases {
        let err = Manifest::parse(text, "m.yaml", std::path::Path::new("."), "m").unwrap_err();
        let all = err.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(all.contains(expected), "for\n{text}\nexpected `{expected}` in:\n{all}");
        assert!(err.iter().all(|d| d.pos.line >= 1 && d.pos.col >= 1), "{all}");
    }
}

#[test]
fn defaults_are_filled() {
    let m = Manifest::parse(
        "stages:\n  a: { kind: snr-allocate }\n",
        "m.yaml",
        std::path::Path::new("."),
        "stem",
    )
    .unwrap();
    assert_eq!(m.name, "stem");
    assert_eq!(m.seed, 0);
    assert_eq!(m.diffusion.steps, 1000);
    assert_eq!(m.model.channels, 128);
    assert_eq!(m.stages[0].params.groups(), Some(10));
}

#[test]
fn schema_describes_stage_kinds() {
    let p = Project::new();
    let (out, v) = p.json(&["schema"]);
    assert!(out.status.success());
    let variants = v["properties"]["stages"]["additionalProperties"]["oneOf"].as_array().unwrap();
    let kinds: Vec<&str> =
        variants.iter().map(|s| s["properties"]["kind"]["const"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"snr-allocate") && kinds.contains(&"command"), "{kinds:?}");
    assert!(v["properties"]["model"].is_object());
}

fn yaml_fragment() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("1".to_string()),
        Just("-3".to_string()),
        Just("0.5".to_string()),
        Just("true".to_string()),
        Just("~".to_string()),
        Just("'x'".to_string()),
        Just("group".to_string()),
        Just("snr-allocate".to_string()),
        Just("command".to_string()),
        "[a-z]{1,6}",
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        let key = prop_oneof![
            Just("kind"),
            Just("needs"),
            Just("for_each"),
            Just("groups"),
            Just("k"),
            Just("run"),
            Just("steps"),
            Just("stages"),
            Just("model"),
            Just("a"),
            Just("b"),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((key, inner), 0..4).prop_map(|kv| {
                let items: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", items.join(", "))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = Manifest::parse(&text, "m.yaml", std::path::Path::new("."), "m");
    }

    #[test]
    fn arbitrary_manifest_shapes_never_panic(
        stages in prop::collection::vec(("[a-c]", yaml_fragment()), 0..4),
        diffusion in yaml_fragment(),
    ) {
        let mut text = format!("diffusion: {diffusion}\nstages:\n");
        for (name, body) in stages {
            text.push_str(&format!("  {name}: {body}\n"));
        }
        if let Ok(m) = Manifest::parse(&text, "m.yaml", std::path::Path::new("."), "m") {
            // Whatever validates can be expanded into a graph.
            let _ = progdiff::dag::Dag::build(&m);
        }
    }
}

#[test]
fn sample_steps_are_checked_against_the_diffusion_steps() {
    let text = "diffusion: { steps: 100, schedule: cosine, sample_steps: ddim3000 }\nstages:\n  a: { kind: snr-allocate, groups: 2 }\n";
    let err = Manifest::parse(text, "m.yaml", std::path::Path::new("."), "m").unwrap_err();
    assert_eq!(err.len(), 1, "{err:?}");
    assert_eq!(err[0].path, "diffusion.sample_steps");
    assert_eq!((err[0].pos.line, err[0].pos.col), (1, 44));
    assert!(err[0].message.contains("3000"), "{}", err[0]);
}
