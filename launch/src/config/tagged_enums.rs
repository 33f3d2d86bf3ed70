//! Every internally tagged enum of the config tree rejects unknown keys next to its tag, in
//! every variant. serde ignores them for unit variants (serde issue 2123), so each such
//! enum uses empty struct variants; this walks every enum and every variant, and a scan of
//! the source makes sure no tagged enum is left out of the walk.

use serde::de::DeserializeOwned;

/// The variants of an internally tagged enum, read from the error for an unknown tag.
fn variants<T: DeserializeOwned>() -> Vec<String> {
    let err = match serde_yaml::from_str::<T>("{type: zz_no_such_variant}") {
        Ok(_) => panic!("an unknown tag was accepted"),
        Err(e) => e.to_string(),
    };
    let list = err
        .split_once("expected ")
        .unwrap_or_else(|| panic!("no variant list in `{err}`"))
        .1;
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Every variant of `T`, given an unknown key, is an error naming that key.
fn rejects_unknown_keys<T: DeserializeOwned>(name: &str) -> usize {
    let variants = variants::<T>();
    assert!(!variants.is_empty(), "{name}: no variants found");
    for v in &variants {
        let yaml = format!("{{type: {v}, zz_unknown_key: 1}}");
        match serde_yaml::from_str::<T>(&yaml) {
            Ok(_) => panic!("{name}: `{yaml}` was accepted, the unknown key ignored"),
            Err(e) => assert!(
                e.to_string().contains("zz_unknown_key"),
                "{name}: `{yaml}` failed, but not on the unknown key: {e}"
            ),
        }
    }
    variants.len()
}

/// The tagged enums of the config tree, by type name.
fn walk() -> Vec<(&'static str, usize)> {
    vec![
        (
            "CapacityConfig",
            rejects_unknown_keys::<switchyard_moe::CapacityConfig>("CapacityConfig"),
        ),
        (
            "RouterConfig",
            rejects_unknown_keys::<switchyard_moe::RouterConfig>("RouterConfig"),
        ),
        (
            "CommBackendConfig",
            rejects_unknown_keys::<switchyard_comm::CommBackendConfig>("CommBackendConfig"),
        ),
        (
            "Strategy",
            rejects_unknown_keys::<switchyard_placement::Strategy>("Strategy"),
        ),
        (
            "TokenizerConfig",
            rejects_unknown_keys::<switchyard_trainer::data::TokenizerConfig>("TokenizerConfig"),
        ),
        (
            "SourceConfig",
            rejects_unknown_keys::<switchyard_trainer::data::SourceConfig>("SourceConfig"),
        ),
    ]
}

#[test]
fn every_variant_of_every_tagged_enum_rejects_unknown_keys() {
    for (name, count) in walk() {
        assert!(count >= 2, "{name}: only {count} variant(s) found");
    }
}

#[test]
fn the_walk_covers_every_tagged_enum_in_the_tree() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                // Build output, third-party stand-ins and test fixtures are not config.
                if !["target", "vendor", "tests", ".git"].contains(&name.as_str()) {
                    stack.push(path);
                }
                continue;
            }
            if !name.ends_with(".rs") || name == "tests.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut lines = text.lines();
            while let Some(line) = lines.next() {
                if !(line.trim_start().starts_with("#[serde(") && line.contains("tag = ")) {
                    continue;
                }
                let decl = lines
                    .by_ref()
                    .find(|l| l.contains("enum "))
                    .unwrap_or_else(|| panic!("{}: a tag without an enum", path.display()));
                let enum_name = decl
                    .split("enum ")
                    .nth(1)
                    .and_then(|r| r.split([' ', '{', '<']).next())
                    .unwrap()
                    .to_string();
                found.push(enum_name);
            }
        }
    }
    let walked: Vec<&str> = walk().into_iter().map(|(name, _)| name).collect();
    assert!(found.len() >= 6, "the scan found only {found:?}");
    for name in &found {
        assert!(
            walked.contains(&name.as_str()),
            "the internally tagged enum `{name}` is not walked by this test; add it to walk()"
        );
    }
}
