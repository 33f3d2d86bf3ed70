use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

fn meta(sig: &str) -> ManifestMeta {
    ManifestMeta {
        tokens_seen: 12_800,
        model_signature: sig.into(),
        trainer_state: json!({"sampler": {"epoch": 1, "offset": 42}, "rng": [1, 2, 3], "lr_step": 100}),
        config: json!({"model": {"d_model": 8}}),
    }
}

/// Values chosen to catch any lossy conversion: NaN payload, signed zero, infinities,
/// subnormals, plus a scalar and an empty tensor.
fn model_tensors() -> Vec<NamedTensor> {
    let odd = vec![
        f32::from_bits(0x7fc0_1234),
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        1.0 / 3.0,
        -7.5,
    ];
    vec![
        NamedTensor::f32("layers.0.w", vec![2, 4], odd),
        NamedTensor::f32("layers.0.b", vec![3], vec![0.5, -1.5, 2.25]),
        NamedTensor::f32("scale", vec![], vec![3.0]),
        NamedTensor::f32("empty", vec![0, 5], vec![]),
    ]
}

fn opt_tensors() -> Vec<NamedTensor> {
    vec![NamedTensor::f32(
        "adam.m.layers.0.w",
        vec![8],
        (0..8).map(|i| i as f32 * 0.1).collect(),
    )]
}

fn save_step(mgr: &CheckpointManager, step: u64) -> PathBuf {
    mgr.save(
        step,
        &[
            ("model.safetensors", model_tensors()),
            ("optimizer.safetensors", opt_tensors()),
        ],
        meta("sig-a"),
    )
    .unwrap()
}

fn bits(ts: &[NamedTensor]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let mut v: Vec<_> = ts
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                t.as_f32().unwrap().iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Edits a manifest and seals it again, as a buggy or hostile writer would.
fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("manifest_sha256");
    f(&mut v);
    std::fs::write(&path, manifest::encode_manifest(&v).unwrap()).unwrap();
}

fn root_entries(root: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(tmp.path(), 3).unwrap();
    let dir = save_step(&mgr, 100);
    assert_eq!(dir, tmp.path().join("step-00000100"));
    assert_eq!(
        root_entries(tmp.path()),
        vec!["step-00000100"],
        "no temp dir may remain"
    );

    let loaded = load(&dir).unwrap();
    assert_eq!(
        bits(loaded.tensors("model.safetensors").unwrap()),
        bits(&model_tensors())
    );
    assert_eq!(
        bits(loaded.tensors("optimizer.safetensors").unwrap()),
        bits(&opt_tensors())
    );
    let m = &loaded.manifest;
    assert_eq!(
        (m.format_version, m.step, m.tokens_seen),
        (FORMAT_VERSION, 100, 12_800)
    );
    assert_eq!(m.trainer_state, meta("x").trainer_state);
    assert_eq!(m.config, json!({"model": {"d_model": 8}}));
    assert_eq!(m.model_signature, "sig-a");
    let names: Vec<_> = m.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["model.safetensors", "optimizer.safetensors"]);
    for f in &m.files {
        let bytes = std::fs::read(dir.join(&f.name)).unwrap();
        assert_eq!(f.bytes, bytes.len() as u64);
        assert_eq!(f.sha256, sha256_hex(&bytes));
        assert_eq!(f.sha256.len(), 64);
    }
}

#[test]
fn checksum_mismatch_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    let path = dir.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 0x01; // same length, one bit flipped in the data
    std::fs::write(&path, bytes).unwrap();
    match load(&dir) {
        Err(CheckpointError::ChecksumMismatch { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
}

#[test]
fn truncated_file_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::LengthMismatch { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn corrupt_safetensors_with_matching_checksum_is_rejected() {
    // A file whose digest matches the manifest but whose content is not safetensors
    // (e.g. the writer itself produced garbage) must still be refused.
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 4); // header now promises more data than exists
    std::fs::write(&path, &bytes).unwrap();
    let (len, sha) = (bytes.len() as u64, sha256_hex(&bytes));
    edit_manifest(&dir, |v| {
        v["files"][0]["bytes"] = json!(len);
        v["files"][0]["sha256"] = json!(sha);
    });
    match load(&dir) {
        Err(CheckpointError::CorruptTensorFile { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected CorruptTensorFile, got {other:?}"),
    }
}

#[test]
fn missing_file_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    std::fs::remove_file(dir.join("optimizer.safetensors")).unwrap();
    match load(&dir) {
        Err(CheckpointError::MissingFile { path }) => {
            assert_eq!(path, dir.join("optimizer.safetensors"))
        }
        other => panic!("expected MissingFile, got {other:?}"),
    }
}

#[test]
fn manifest_names_escaping_the_directory_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    // A file outside the checkpoint that an attacker would like us to read.
    std::fs::write(tmp.path().join("outside.safetensors"), b"x").unwrap();
    for bad in [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/model.safetensors",
        "..",
        "a\\b",
        "",
    ] {
        edit_manifest(&dir, |v| v["files"][0]["name"] = json!(bad));
        match load(&dir) {
            Err(CheckpointError::UnsafeFileName { name, context, .. }) => {
                assert_eq!(name, bad);
                assert!(context.ends_with(MANIFEST_FILE), "{context}");
            }
            other => panic!("expected UnsafeFileName for {bad:?}, got {other:?}"),
        }
    }
}

#[test]
fn save_rejects_unsafe_and_duplicate_file_names() {
    let tmp = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(tmp.path(), 3).unwrap();
    let err = mgr
        .save(1, &[("../evil.safetensors", vec![])], meta("s"))
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::UnsafeFileName { .. }),
        "{err:?}"
    );
    let err = mgr
        .save(
            1,
            &[("a.safetensors", vec![]), ("a.safetensors", vec![])],
            meta("s"),
        )
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::DuplicateFile { .. }),
        "{err:?}"
    );
    let err = mgr
        .save(1, &[(MANIFEST_FILE, vec![])], meta("s"))
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::DuplicateFile { .. }),
        "{err:?}"
    );
    assert_eq!(mgr.latest_complete().unwrap(), None);
}

#[test]
fn bad_tensors_fail_the_save_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(tmp.path(), 3).unwrap();
    let bad_shape = vec![NamedTensor::f32("w", vec![2, 3], vec![0.0; 5])];
    let err = mgr
        .save(7, &[("model.safetensors", bad_shape)], meta("s"))
        .unwrap_err();
    assert!(
        matches!(&err, CheckpointError::ShapeMismatch { tensor, .. } if tensor == "w"),
        "{err:?}"
    );
    let dup = vec![
        NamedTensor::f32("w", vec![1], vec![0.0]),
        NamedTensor::f32("w", vec![1], vec![1.0]),
    ];
    let err = mgr
        .save(7, &[("model.safetensors", dup)], meta("s"))
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::DuplicateTensor { .. }),
        "{err:?}"
    );
    assert!(
        root_entries(tmp.path()).is_empty(),
        "{:?}",
        root_entries(tmp.path())
    );
}

#[test]
fn unknown_format_version_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    edit_manifest(&dir, |v| v["format_version"] = json!(FORMAT_VERSION + 1));
    match load(&dir) {
        Err(CheckpointError::UnsupportedFormatVersion { path, found, .. }) => {
            assert_eq!(path, dir.join(MANIFEST_FILE));
            assert_eq!(found, (FORMAT_VERSION + 1).to_string());
        }
        other => panic!("expected UnsupportedFormatVersion, got {other:?}"),
    }
    // A newer checkpoint must not be silently skipped in favour of an older one.
    assert!(matches!(
        latest_complete(tmp.path()),
        Err(CheckpointError::UnsupportedFormatVersion { .. })
    ));
}

#[test]
fn model_signature_mismatch_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    let m = read_manifest(&dir).unwrap();
    verify_compatible(&m, &dir, "sig-a").unwrap();
    match verify_compatible(&m, &dir, "sig-b") {
        Err(CheckpointError::SignatureMismatch {
            path,
            expected,
            found,
        }) => {
            assert_eq!(
                (path, expected.as_str(), found.as_str()),
                (dir.join(MANIFEST_FILE), "sig-b", "sig-a")
            );
        }
        other => panic!("expected SignatureMismatch, got {other:?}"),
    }
}

#[test]
fn renamed_directory_step_mismatch_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    let moved = tmp.path().join("step-00000002");
    std::fs::rename(&dir, &moved).unwrap();
    assert!(matches!(
        load(&moved),
        Err(CheckpointError::StepMismatch {
            manifest_step: 1,
            dir_step: 2,
            ..
        })
    ));
}

#[test]
fn keep_last_deletes_oldest_but_never_the_one_just_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(tmp.path(), 2).unwrap();
    for step in [10, 20, 30, 40, 50] {
        save_step(&mgr, step);
    }
    assert_eq!(
        root_entries(tmp.path()),
        vec!["step-00000040", "step-00000050"]
    );
    // With keep_last = 1, saving an older step keeps that one (it was just written).
    let one = CheckpointManager::new(tmp.path(), 1).unwrap();
    let dir = save_step(&one, 5);
    assert_eq!(root_entries(tmp.path()), vec!["step-00000005"]);
    load(&dir).unwrap();
    // Directories that are not checkpoints are left alone.
    std::fs::create_dir(tmp.path().join("notes")).unwrap();
    save_step(&one, 6);
    assert_eq!(root_entries(tmp.path()), vec!["notes", "step-00000006"]);
}

#[test]
fn keep_last_zero_and_existing_step_are_errors() {
    assert!(matches!(
        CheckpointManager::new("/tmp/x", 0),
        Err(CheckpointError::InvalidKeepLast { .. })
    ));
    let tmp = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(tmp.path(), 3).unwrap();
    let dir = save_step(&mgr, 3);
    let before = std::fs::read(dir.join(MANIFEST_FILE)).unwrap();
    let err = mgr
        .save(3, &[("model.safetensors", vec![])], meta("other"))
        .unwrap_err();
    assert!(
        matches!(&err, CheckpointError::AlreadyExists { path } if *path == dir),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read(dir.join(MANIFEST_FILE)).unwrap(),
        before,
        "existing checkpoint was modified"
    );
}

#[test]
fn latest_complete_never_returns_temp_or_incomplete_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mgr = CheckpointManager::new(root, 10).unwrap();
    assert_eq!(mgr.latest_complete().unwrap(), None);
    let good = save_step(&mgr, 5);

    // Newer-looking but incomplete: a crashed temp dir (even with a manifest), a step dir
    // without manifest, and one with a half-written manifest.
    let crashed = root.join(".step-00000009.tmp-999999");
    std::fs::create_dir(&crashed).unwrap();
    std::fs::copy(good.join(MANIFEST_FILE), crashed.join(MANIFEST_FILE)).unwrap();
    std::fs::create_dir(root.join("step-00000010")).unwrap();
    std::fs::write(root.join("step-00000010/model.safetensors"), b"partial").unwrap();
    std::fs::create_dir(root.join("step-00000011")).unwrap();
    std::fs::write(
        root.join("step-00000011").join(MANIFEST_FILE),
        b"{\"format_version\": 1, \"st",
    )
    .unwrap();
    std::fs::write(root.join("step-00000012"), b"a file, not a dir").unwrap();

    assert_eq!(mgr.latest_complete().unwrap(), Some(good.clone()));
    assert_eq!(resume_target(root, "auto").unwrap(), Some(good));

    // The next save removes the stale temp dir but leaves the others for a human.
    save_step(&mgr, 6);
    assert!(!crashed.exists());
    assert!(root.join("step-00000010").exists() && root.join("step-00000011").exists());
    assert_eq!(
        mgr.latest_complete().unwrap(),
        Some(root.join("step-00000006"))
    );
}

#[test]
fn resume_target_resolves_auto_and_explicit_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    assert_eq!(
        resume_target(&root, "auto").unwrap(),
        None,
        "missing root means start fresh"
    );
    let mgr = CheckpointManager::new(&root, 10).unwrap();
    let d1 = save_step(&mgr, 1);
    let d2 = save_step(&mgr, 2);
    assert_eq!(resume_target(&root, "auto").unwrap(), Some(d2));
    assert_eq!(
        resume_target(&root, d1.to_str().unwrap()).unwrap(),
        Some(d1.clone())
    );

    std::fs::remove_file(d1.join(MANIFEST_FILE)).unwrap();
    for spec in [
        d1.to_str().unwrap().to_string(),
        root.join("nope").display().to_string(),
        String::new(),
    ] {
        match resume_target(&root, &spec) {
            Err(e @ CheckpointError::NotACheckpoint { .. }) => {
                assert!(e.to_string().contains(&spec), "{e}")
            }
            other => panic!("expected NotACheckpoint for {spec:?}, got {other:?}"),
        }
    }
}

#[test]
fn inspect_reports_stats_and_checksum_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 100);
    let report = inspect(&dir).unwrap();
    assert!(report.all_ok());
    let b = report.files[0]
        .tensors
        .iter()
        .find(|t| t.name == "layers.0.b")
        .unwrap();
    assert_eq!(
        (b.count, b.min, b.max, b.mean, b.nan_count),
        (3, Some(-1.5), Some(2.25), Some(1.25 / 3.0), 0)
    );
    let w = report.files[0]
        .tensors
        .iter()
        .find(|t| t.name == "layers.0.w")
        .unwrap();
    assert_eq!(
        (w.count, w.nan_count, w.min, w.max),
        (8, 1, Some(f64::NEG_INFINITY), Some(f64::INFINITY))
    );
    let empty = report.files[0]
        .tensors
        .iter()
        .find(|t| t.name == "empty")
        .unwrap();
    assert_eq!((empty.count, empty.min), (0, None));

    let text = report.to_string();
    for needle in [
        "step 100",
        "tokens_seen 12800",
        "model.safetensors",
        "checksum OK",
        "layers.0.b",
        "[3]",
        "count=3",
        "nan=1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }

    std::fs::remove_file(dir.join("optimizer.safetensors")).unwrap();
    let report = inspect(&dir).unwrap();
    assert!(!report.all_ok());
    assert!(matches!(&report.files[1].status, FileStatus::Bad(m) if m.contains("missing")));
    assert!(report.to_string().contains("BAD"));
}

/// Runs `f` on a thread and fails the test if it has not returned within 10 s (a read that
/// blocks on a FIFO would otherwise hang the suite).
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("blocked: the checkpoint reader waited on something that is not a regular file")
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn expect_not_regular(err: CheckpointError, path: &Path, found: &str) {
    let text = err.to_string();
    match &err {
        CheckpointError::NotRegularFile { path: p, found: f } => {
            assert_eq!(p, path);
            assert!(f.contains(found), "{f}");
        }
        other => panic!(
            "expected NotRegularFile for {}, got {other:?}",
            path.display()
        ),
    }
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn any_changed_byte_of_a_manifest_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(tmp.path(), 3).unwrap();
    let old = save_step(&mgr, 1);
    let dir = save_step(&mgr, 2);
    let path = dir.join(MANIFEST_FILE);
    let sealed = std::fs::read(&path).unwrap();
    let at = |needle: &str| {
        sealed
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap()
    };
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut flipped = sealed.clone();
    flipped[at("12800") + 4] ^= 0x01; // tokens_seen 12800 -> 12801: still valid JSON
    cases.push(("a bit of a value", flipped));
    let mut spaced = sealed.clone();
    spaced.insert(at("\"tokens_seen\""), b' ');
    cases.push(("whitespace", spaced));
    let mut digest = sealed.clone();
    digest[at("manifest_sha256") + 20] ^= 0x01;
    cases.push(("the recorded digest", digest));
    let mut key = sealed.clone();
    key[at("manifest_sha256") + 14] ^= 0x01; // manifest_sha257: no seal on a format-2 manifest
    cases.push(("the seal's key", key));
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        match read_manifest(&dir) {
            Err(e @ CheckpointError::ManifestCorrupt { .. }) => {
                assert!(e.to_string().contains(&path.display().to_string()), "{e}")
            }
            other => panic!("{what}: expected ManifestCorrupt, got {other:?}"),
        }
        assert!(load(&dir).is_err() && inspect(&dir).is_err(), "{what}");
        // `--resume auto` never loads it; it takes the newest verified checkpoint.
        assert_eq!(
            resume_target(tmp.path(), "auto").unwrap(),
            Some(old.clone())
        );
    }
    std::fs::write(&path, &sealed).unwrap();
    load(&dir).unwrap();
}

#[test]
fn format_1_manifests_load_but_are_reported_unverified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    let path = dir.join(MANIFEST_FILE);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("manifest_sha256");
    v["format_version"] = json!(1);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let loaded = load(&dir).unwrap();
    assert_eq!(loaded.manifest.format_version, 1);
    assert_eq!(latest_complete(tmp.path()).unwrap(), Some(dir.clone()));
    let report = inspect(&dir).unwrap();
    assert!(report.all_ok());
    assert!(report.to_string().contains("UNVERIFIED"), "{report}");
    // Its data files are still verified against it.
    let model = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&model, bytes).unwrap();
    assert!(matches!(
        load(&dir),
        Err(CheckpointError::ChecksumMismatch { .. })
    ));
}

#[test]
fn links_fifos_and_devices_in_a_checkpoint_are_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_step(&CheckpointManager::new(tmp.path(), 3).unwrap(), 1);
    let model = dir.join("model.safetensors");
    let original = std::fs::read(&model).unwrap();

    // A link to an identical copy outside the checkpoint: length and digest would match.
    let outside = tmp.path().join("outside.safetensors");
    std::fs::write(&outside, &original).unwrap();
    std::fs::remove_file(&model).unwrap();
    std::os::unix::fs::symlink(&outside, &model).unwrap();
    let err = load(&dir).unwrap_err();
    expect_not_regular(
        err,
        &model,
        &format!("symbolic link to {}", outside.display()),
    );

    std::fs::remove_file(&model).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &model).unwrap();
    let d = dir.clone();
    let err = within_10s(move || load(&d).unwrap_err());
    expect_not_regular(err, &model, "symbolic link to /dev/zero");

    std::fs::remove_file(&model).unwrap();
    mkfifo(&model);
    let d = dir.clone();
    let err = within_10s(move || load(&d).unwrap_err());
    expect_not_regular(err, &model, "FIFO");
    let d = dir.clone();
    let report = within_10s(move || inspect(&d).unwrap());
    assert!(matches!(&report.files[0].status, FileStatus::Bad(m) if m.contains("FIFO")));

    // A longer file is refused by its length before anything is read.
    std::fs::remove_file(&model).unwrap();
    let mut longer = original.clone();
    longer.push(0);
    std::fs::write(&model, &longer).unwrap();
    assert!(matches!(
        load(&dir),
        Err(CheckpointError::LengthMismatch { actual, .. }) if actual == longer.len() as u64
    ));
    std::fs::write(&model, &original).unwrap();
    load(&dir).unwrap();

    // The manifest: a link (to a valid copy), a FIFO, a huge (sparse) file.
    let manifest = dir.join(MANIFEST_FILE);
    let copy = tmp.path().join("manifest-copy.json");
    std::fs::rename(&manifest, &copy).unwrap();
    std::os::unix::fs::symlink(&copy, &manifest).unwrap();
    expect_not_regular(read_manifest(&dir).unwrap_err(), &manifest, "symbolic link");
    std::fs::remove_file(&manifest).unwrap();
    mkfifo(&manifest);
    let d = dir.clone();
    let err = within_10s(move || read_manifest(&d).unwrap_err());
    expect_not_regular(err, &manifest, "FIFO");
    // Not skipped in favour of an older checkpoint: someone has to look at it.
    let root = tmp.path().to_path_buf();
    assert!(within_10s(move || latest_complete(&root)).is_err());
    std::fs::remove_file(&manifest).unwrap();
    std::fs::File::create(&manifest)
        .unwrap()
        .set_len(MANIFEST_MAX_BYTES + 1)
        .unwrap();
    assert!(matches!(
        read_manifest(&dir),
        Err(CheckpointError::ManifestTooLarge { bytes, .. }) if bytes == MANIFEST_MAX_BYTES + 1
    ));
}

#[test]
fn symlinked_step_dirs_are_not_resumed_automatically_and_are_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    let elsewhere = tmp.path().join("elsewhere");
    let mgr = CheckpointManager::new(&root, 10).unwrap();
    let d1 = save_step(&mgr, 1);
    let target = save_step(&CheckpointManager::new(&elsewhere, 10).unwrap(), 5);
    let link = root.join("step-00000005");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_eq!(list_complete(&root).unwrap(), vec![(1, d1.clone())]);
    assert_eq!(resume_target(&root, "auto").unwrap(), Some(d1));
    // Named explicitly, a link is resolved to its target.
    assert_eq!(
        resume_target(&root, link.to_str().unwrap()).unwrap(),
        Some(target.canonicalize().unwrap())
    );
    // A save of that step moves the link (not its target) aside.
    let d5 = save_step(&mgr, 5);
    assert!(std::fs::symlink_metadata(&d5).unwrap().is_dir());
    let aside: Vec<_> = root_entries(&root)
        .into_iter()
        .filter(|n| n.starts_with(".step-00000005.incomplete-"))
        .collect();
    assert_eq!(aside.len(), 1, "{:?}", root_entries(&root));
    assert!(
        std::fs::symlink_metadata(root.join(&aside[0]))
            .unwrap()
            .is_symlink()
    );
    load(&target).unwrap();
    // The root itself may be a link.
    let root_link = tmp.path().join("ckpt-link");
    std::os::unix::fs::symlink(&root, &root_link).unwrap();
    assert_eq!(list_complete(&root_link).unwrap().len(), 2);
}

#[test]
fn an_incomplete_step_dir_is_moved_aside_by_the_next_save_of_that_step() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mgr = CheckpointManager::new(root, 2).unwrap();
    let d4 = save_step(&mgr, 4);
    let d6 = save_step(&mgr, 6);
    std::fs::remove_file(d6.join(MANIFEST_FILE)).unwrap();
    let old_model = std::fs::read(d6.join("model.safetensors")).unwrap();
    assert_eq!(resume_target(root, "auto").unwrap(), Some(d4));

    // The resumed run reaches step 6 again: the save succeeds.
    assert_eq!(save_step(&mgr, 6), d6);
    load(&d6).unwrap();
    let aside = root_entries(root)
        .into_iter()
        .find(|n| n.starts_with(".step-00000006.incomplete-"))
        .expect("the incomplete directory is kept");
    assert_eq!(
        std::fs::read(root.join(&aside).join("model.safetensors")).unwrap(),
        old_model
    );

    // A corrupt manifest is moved aside the same way, here by a multi-writer save; later
    // saves and pruning leave the moved directories alone.
    let d8 = save_step(&mgr, 8);
    std::fs::write(d8.join(MANIFEST_FILE), b"{\"format_version\": 2}").unwrap();
    let tmp_dir = mgr.begin_shared(8, 77).unwrap();
    let entries = write_files(
        &tmp_dir,
        &[("model.rank-0000.safetensors", model_tensors())],
    )
    .unwrap();
    mgr.commit_shared(&tmp_dir, 8, entries, meta("sig-a"))
        .unwrap();
    load(&d8).unwrap();
    save_step(&mgr, 10);
    save_step(&mgr, 12);
    let names = root_entries(root);
    assert_eq!(
        names.iter().filter(|n| n.contains(".incomplete-")).count(),
        2,
        "{names:?}"
    );
    assert_eq!(
        list_complete(root).unwrap().len(),
        2,
        "keep_last counts only complete checkpoints: {names:?}"
    );

    // A complete checkpoint is still never replaced.
    assert!(matches!(
        mgr.begin_shared(12, 78),
        Err(CheckpointError::AlreadyExists { .. })
    ));
}
