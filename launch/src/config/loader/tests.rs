use super::*;
use serde::Deserialize;

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Root {
    model: Model,
    optim: Optim,
    data: Data,
    #[serde(default)]
    layers: Vec<Layer>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    logging: Option<Logging>,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Model {
    dim: usize,
    moe: Moe,
}

fn default_capacity() -> f64 {
    1.25
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Moe {
    num_experts: usize,
    top_k: usize,
    #[serde(default = "default_capacity")]
    capacity_factor: f64,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Optim {
    lr: f64,
    #[serde(default)]
    warmup_steps: u64,
    schedule: Schedule,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Schedule {
    Constant,
    Cosine,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Data {
    batch_size: usize,
    source: Source,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Source {
    Text {
        path: String,
        #[serde(default)]
        shuffle: bool,
    },
    Synthetic {
        vocab: usize,
        seq_len: usize,
        #[serde(default)]
        noise: Option<Noise>,
    },
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Noise {
    std: f64,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Layer {
    hidden: usize,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Logging {
    every: u64,
}

/// Line numbers are relied on by the tests below.
const BASE: &str = "\
model:
  dim: 64
  moe:
    num_experts: 8
    top_k: 2
optim:
  lr: 0.001
  schedule: cosine
data:
  batch_size: 4
  source:
    type: text
    path: corpus.txt
layers:
  - hidden: 128
  - hidden: 256
";

fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "test bug: {from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

fn err(text: &str, overrides: &[&str]) -> String {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match load_config_str::<Root>(text, "cfg.yaml", &ov) {
        Ok(cfg) => panic!("expected an error, got {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

fn ok(text: &str, overrides: &[&str]) -> Root {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load_config_str::<Root>(text, "cfg.yaml", &ov).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn loads_with_defaults() {
    let cfg = ok(BASE, &[]);
    assert_eq!(cfg.model.moe.top_k, 2);
    assert_eq!(cfg.model.moe.capacity_factor, 1.25);
    assert_eq!(cfg.optim.schedule, Schedule::Cosine);
    assert_eq!(
        cfg.data.source,
        Source::Text {
            path: "corpus.txt".into(),
            shuffle: false
        }
    );
    assert_eq!(cfg.layers.len(), 2);
    assert_eq!(cfg.seed, None);
    assert_eq!(cfg.logging, None);
}

#[test]
fn misspelt_key_has_position_path_and_hint() {
    assert_eq!(
        err(&with("    top_k: 2", "    top_kk: 2"), &[]),
        "cfg.yaml:5:5: model.moe.top_kk: unknown key; did you mean `top_k`?"
    );
}

#[test]
fn unknown_key_without_close_match_lists_expected() {
    assert_eq!(
        err(&with("  dim: 64", "  dim: 64\n  zzzzzzzz: 1"), &[]),
        "cfg.yaml:3:3: model.zzzzzzzz: unknown key; expected one of `dim`, `moe`"
    );
}

#[test]
fn unknown_key_inside_tagged_enum_is_located() {
    // serde buffers internally tagged enums: the position must come from the YAML text.
    assert_eq!(
        err(&with("    path: corpus.txt", "    pth: corpus.txt"), &[]),
        "cfg.yaml:13:5: data.source.pth: unknown key; did you mean `path`?"
    );
}

#[test]
fn wrong_type_points_at_value() {
    assert_eq!(
        err(&with("  lr: 0.001", "  lr: fast"), &[]),
        "cfg.yaml:7:7: optim.lr: invalid type: string \"fast\", expected f64"
    );
}

#[test]
fn wrong_type_inside_tagged_enum_is_located() {
    let text = with(
        "    path: corpus.txt",
        "    path: corpus.txt\n    shuffle: maybe",
    );
    assert_eq!(
        err(&text, &[]),
        "cfg.yaml:14:14: data.source.shuffle: invalid type: string \"maybe\", expected a boolean"
    );
}

#[test]
fn wrong_type_in_list_uses_index() {
    assert_eq!(
        err(&with("  - hidden: 256", "  - hidden: big"), &[]),
        "cfg.yaml:16:13: layers[1].hidden: invalid type: string \"big\", expected usize"
    );
}

#[test]
fn unknown_tag_variant_has_hint() {
    assert_eq!(
        err(&with("    type: text", "    type: txt"), &[]),
        "cfg.yaml:12:11: data.source.type: unknown variant `txt`; did you mean `text`?"
    );
}

#[test]
fn unknown_unit_variant_has_hint() {
    assert_eq!(
        err(&with("  schedule: cosine", "  schedule: cosin"), &[]),
        "cfg.yaml:8:13: optim.schedule: unknown variant `cosin`; did you mean `cosine`?"
    );
    assert_eq!(
        err(&with("  schedule: cosine", "  schedule: linear"), &[]),
        "cfg.yaml:8:13: optim.schedule: unknown variant `linear`; \
         expected one of `constant`, `cosine`"
    );
}

#[test]
fn missing_required_field() {
    assert_eq!(
        err(&with("    top_k: 2\n", ""), &[]),
        "cfg.yaml:3:3: model.moe.top_k: missing required key"
    );
    // Inside a tagged enum variant: reported at the enum's key.
    assert_eq!(
        err(&with("    path: corpus.txt\n", ""), &[]),
        "cfg.yaml:11:3: data.source.path: missing required key"
    );
    assert_eq!(
        err(&with("    type: text\n", ""), &[]),
        "cfg.yaml:11:3: data.source.type: missing required key"
    );
}

#[test]
fn malformed_yaml_is_located() {
    let e = err(&with("  dim: 64", "  dim: 64: 3"), &[]);
    assert!(e.starts_with("cfg.yaml:2:10: invalid YAML: "), "{e}");
    let e = err(&with("  batch_size: 4", "  batch_size: [4"), &[]);
    assert!(e.starts_with("cfg.yaml:11:9: invalid YAML: "), "{e}");
}

#[test]
fn overrides_are_applied() {
    let cfg = ok(
        BASE,
        &[
            "model.moe.top_k=4",
            "optim.lr=3e-4",
            "data.source={type: synthetic, vocab: 100, seq_len: 16}",
            "seed=7",
            "layers[0].hidden=64",
            "logging.every=10",
        ],
    );
    assert_eq!(cfg.model.moe.top_k, 4);
    assert_eq!(cfg.optim.lr, 3e-4);
    assert_eq!(
        cfg.data.source,
        Source::Synthetic {
            vocab: 100,
            seq_len: 16,
            noise: None,
        }
    );
    assert_eq!(cfg.seed, Some(7));
    assert_eq!(cfg.layers[0].hidden, 64);
    assert_eq!(cfg.logging, Some(Logging { every: 10 }));
}

#[test]
fn override_errors_name_the_override() {
    assert_eq!(
        err(BASE, &["model.moe.top_k=lots"]),
        "--set model.moe.top_k=lots: model.moe.top_k: invalid type: string \"lots\", \
         expected usize"
    );
    assert_eq!(
        err(BASE, &["data.source={type: text, pth: a}"]),
        "--set data.source={type: text, pth: a}: data.source.pth: unknown key; \
         did you mean `path`?"
    );
    assert_eq!(
        err(BASE, &["data.source.type=txt"]),
        "--set data.source.type=txt: data.source.type: unknown variant `txt`; \
         did you mean `text`?"
    );
    assert_eq!(
        err(BASE, &["model.moe.top_kk=3"]),
        "--set model.moe.top_kk=3: model.moe.top_kk: unknown key; did you mean `top_k`?"
    );
}

#[test]
fn malformed_overrides_are_all_reported() {
    let e = err(
        BASE,
        &[
            "nonsense",
            "=3",
            "model.dim.x=3",
            "layers[9].hidden=1",
            "seed=[1",
        ],
    );
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 5, "{e}");
    assert_eq!(
        lines[0],
        "--set nonsense: malformed override: expected `key.path=value`"
    );
    assert_eq!(lines[1], "--set =3: malformed override: empty key path");
    assert_eq!(
        lines[2],
        "--set model.dim.x=3: cannot set key `x`: `model.dim` is a number, not a map"
    );
    assert_eq!(
        lines[3],
        "--set layers[9].hidden=1: index 9 out of range: `layers` has 2 entries"
    );
    assert!(
        lines[4].starts_with("--set seed=[1: invalid YAML value `[1`"),
        "{}",
        lines[4]
    );
}

#[test]
fn semantic_issues_are_located_all_at_once() {
    let ov = vec!["optim.warmup_steps=0".to_string()];
    let doc = ConfigDoc::parse(BASE, "cfg.yaml", &ov).unwrap();
    let cfg: Root = doc.deserialize().unwrap();
    assert_eq!(cfg.optim.warmup_steps, 0);
    let e = doc
        .validate(vec![
            (
                "model.moe.top_k".into(),
                "must be <= num_experts (8)".into(),
            ),
            ("layers[1].hidden".into(), "must divide dim (64)".into()),
            (
                "model.moe.capacity_factor".into(),
                "must be >= 1.5 with top_k 2".into(),
            ),
            ("optim.warmup_steps".into(), "must be > 0".into()),
        ])
        .unwrap_err();
    assert_eq!(e.issues.len(), 4);
    assert_eq!(
        e.to_string(),
        "cfg.yaml:5:5: model.moe.top_k: must be <= num_experts (8)\n\
         cfg.yaml:16:5: layers[1].hidden: must divide dim (64)\n\
         cfg.yaml: (default): model.moe.capacity_factor: must be >= 1.5 with top_k 2\n\
         --set optim.warmup_steps=0: optim.warmup_steps: must be > 0"
    );
    assert!(doc.validate(Vec::new()).is_ok());
}

#[test]
fn load_config_checked_reports_semantic_issues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.yaml");
    std::fs::write(&path, BASE).unwrap();
    let e = load_config_checked::<Root>(&path, &[], |c: &mut Root, _| {
        let mut v = Vec::new();
        if c.model.moe.top_k < 4 {
            v.push(("model.moe.top_k".to_string(), "must be >= 4".to_string()));
        }
        v
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}:5:5: model.moe.top_k: must be >= 4", path.display())
    );
    let cfg: Root = load_config(&path, &["model.moe.top_k=4".into()]).unwrap();
    assert_eq!(cfg.model.moe.top_k, 4);
    // The check learns which keys an override set (for paths relative to the working
    // directory) and may complete the config.
    let cfg = load_config_checked::<Root>(
        &path,
        &["model.moe={num_experts: 8, top_k: 4}".into()],
        |c, set| {
            assert!(set("model.moe.top_k") && set("model.moe") && !set("model"));
            c.model.moe.top_k += 1;
            Vec::new()
        },
    )
    .unwrap();
    assert_eq!(cfg.model.moe.top_k, 5);
    let missing = load_config::<Root>(&dir.path().join("nope.yaml"), &[]).unwrap_err();
    assert!(
        missing.to_string().contains("cannot read config"),
        "{missing}"
    );
}

#[test]
fn locate_finds_keys_and_values() {
    let doc = ConfigDoc::parse(BASE, "cfg.yaml", &[]).unwrap();
    let at = |line, column| Some(Location { line, column });
    assert_eq!(doc.locate("model"), at(1, 1));
    assert_eq!(doc.locate("model.moe.top_k"), at(5, 5));
    assert_eq!(doc.locate_value("model.moe.top_k"), at(5, 12));
    assert_eq!(doc.locate("data.source.type"), at(12, 5));
    assert_eq!(doc.locate("layers[1]"), at(16, 5));
    assert_eq!(doc.locate("layers[1].hidden"), at(16, 5));
    assert_eq!(doc.locate("model.moe.capacity_factor"), None);
}

#[test]
fn anchors_and_merge_keys_are_located() {
    let text = "\
base: &b
  num_experts: 8
  top_k: 2
model:
  dim: 64
  moe:
    <<: *b
    top_kk: 3
optim: {lr: 0.1, schedule: constant}
data: {batch_size: 1, source: {type: synthetic, vocab: 10, seq_len: 4}}
";
    // `base` itself is an unknown root key; report it first.
    assert_eq!(
        err(text, &[]),
        "cfg.yaml:1:1: base: unknown key; expected one of `model`, `optim`, `data`, \
         `layers`, `seed`, `logging`"
    );
    let text = text.replacen("base:", "layers:\n  - hidden: 1\nxbase:", 1);
    let doc = ConfigDoc::parse(&text, "cfg.yaml", &[]).unwrap();
    assert_eq!(
        doc.locate("model.moe.num_experts"),
        Some(Location { line: 4, column: 3 })
    );
    assert_eq!(
        doc.locate("data.source.vocab"),
        Some(Location {
            line: 12,
            column: 49
        })
    );
}

#[test]
fn keys_through_nested_aliases_and_merge_chains_are_located() {
    let text = "\
a: &a {x: 1, inner: &i {y: 2}}
b: &b {<<: *a, z: 3}
c: {<<: [*b, {w: 4}], x: 5, deep: *i, list: [*a]}
";
    let doc = ConfigDoc::parse(text, "cfg.yaml", &[]).unwrap();
    let at = |line, column| Some(Location { line, column });
    // Merged through a chain of two merge keys, then below an alias inside the anchor.
    assert_eq!(doc.locate("c.inner.y"), at(1, 25));
    assert_eq!(doc.locate("c.z"), at(2, 16));
    // The second merge source, and an explicit key that overrides a merged one.
    assert_eq!(doc.locate("c.w"), at(3, 15));
    assert_eq!(doc.locate("c.x"), at(3, 23));
    assert_eq!(doc.locate("c.deep.y"), at(1, 25));
    assert_eq!(doc.locate("c.list[0].inner"), at(1, 14));
    assert_eq!(doc.locate("c.nothing"), None);
}

/// Nested anchors: 100 scalars, aliased 100 times, that aliased 100 times (10^6 nodes
/// expanded from 1 KiB; yaml_serde's own guard lets it through).
fn nested_anchors() -> String {
    let ones = vec!["1"; 100].join(", ");
    let a0 = vec!["*a0"; 100].join(", ");
    format!(
        "a0: &a0 [{ones}]\na1: &a1 [{a0}]\na2: [{}]\n",
        vec!["*a1"; 100].join(", ")
    )
}

#[test]
fn loads_past_a_limit_are_refused_naming_it() {
    let e = err(&nested_anchors(), &[]);
    assert_eq!(
        e,
        format!(
            "cfg.yaml:3:46: config exceeds the loader's limit of {} nodes after alias \
             expansion; configs are small trees: write the values out instead of repeating \
             anchors (`&a`) and aliases (`*a`), and nest less",
            limits::NODES
        )
    );
    let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    assert!(err(&deep, &[]).contains("limit of 64 levels of nesting"));
    let big = format!("seed: 1\n#{}\n", "x".repeat(limits::FILE_BYTES));
    assert!(
        err(&big, &[]).contains(&format!("limit of {} bytes", limits::FILE_BYTES)),
        "{}",
        err(&big, &[])
    );
    // 40 keys of 16 KiB nested: 640 KiB of text, 13 MiB of key paths.
    let key = "k".repeat(1 << 14);
    let long_paths = format!("{}1{}", format!("{{{key}: ").repeat(40), "}".repeat(40));
    assert!(err(&long_paths, &[]).contains(&format!(
        "limit of {} bytes of key paths",
        limits::PATH_BYTES
    )));
}

#[test]
fn resolved_yaml_includes_defaults_and_round_trips() {
    let cfg = ok(BASE, &["seed=3"]);
    let y = resolved_yaml(&cfg);
    assert!(y.contains("capacity_factor: 1.25"), "{y}");
    assert!(y.contains("type: text"), "{y}");
    assert_eq!(ok(&y, &[]), cfg);
}

#[test]
fn did_you_mean_uses_edit_distance() {
    let c: Vec<String> = ["top_k", "num_experts", "capacity_factor"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(did_you_mean("tpo_k", &c), Some("top_k")); // transposition
    assert_eq!(did_you_mean("num_expert", &c), Some("num_experts"));
    assert_eq!(did_you_mean("capacity_fctr", &c), Some("capacity_factor"));
    assert_eq!(did_you_mean("lr", &c), None);
    assert_eq!(edit_distance("abc", "acb"), 1);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
}

#[test]
fn exit_code_is_two() {
    assert_eq!(EXIT_CODE, 2);
    let e = ConfigDoc::parse(BASE, "cfg.yaml", &["x".into()]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn errors_nested_below_a_tagged_enum_are_located() {
    let synthetic = "    type: synthetic\n    vocab: 10\n    seq_len: 4\n    noise:\n      \
                     std: 0.1\n      sdt: 2\nlayers:";
    let text = with("    type: text\n    path: corpus.txt\nlayers:", synthetic);
    assert_eq!(
        err(&text, &[]),
        "cfg.yaml:17:7: data.source.noise.sdt: unknown key; did you mean `std`?"
    );
    let text = text
        .replace("      sdt: 2\n", "")
        .replace("std: 0.1", "std: high");
    assert_eq!(
        err(&text, &[]),
        "cfg.yaml:16:12: data.source.noise.std: invalid type: string \"high\", expected f64"
    );
}

#[test]
fn whole_node_of_wrong_kind_and_empty_file() {
    assert_eq!(
        err(
            &with(
                "model:\n  dim: 64\n  moe:\n    num_experts: 8\n    top_k: 2",
                "model: 5"
            ),
            &[]
        ),
        "cfg.yaml:1:8: model: invalid type: integer `5`, expected struct Model"
    );
    assert_eq!(err("", &[]), "cfg.yaml: model: missing required key");
}
