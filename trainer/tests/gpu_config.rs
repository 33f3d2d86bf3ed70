//! The GPU configuration: `device:` rules and the `bench-gpu` preset.

use switchyard_moe::Precision;
use switchyard_trainer::config::Config;
use switchyard_trainer::device::{CUDA_BUILT, DeviceConfig};

fn load(path: &str) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn issues_at(cfg: &Config, key: &str) -> Vec<String> {
    cfg.validate()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, m)| m)
        .collect()
}

#[test]
fn bench_gpu_preset_validates_and_fits_an_h100() {
    let cfg = load("configs/gpu/bench-gpu.yaml");
    assert_eq!(cfg.device, DeviceConfig::Cuda(None));
    assert_eq!(cfg.precision, Precision::Bf16);
    let issues = cfg.validate();
    if CUDA_BUILT {
        assert!(issues.is_empty(), "{issues:?}");
    } else {
        // Only the missing backend, named with the rebuild command.
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].0, "device");
        assert!(issues[0].1.contains("--features cuda"), "{}", issues[0].1);
    }
    let m = &cfg.model;
    let (d, v, e, f) = (
        m.d_model,
        m.vocab_size,
        m.moe.num_experts,
        m.moe.expert_ffn_dim,
    );
    let per_layer = 2 * d + 4 * d * d + d * e + e * 3 * d * f;
    let params = 2 * v * d + m.n_layers * per_layer + d;
    // f32 weights, gradients and two AdamW moments.
    let state_gb = params as f64 * 16.0 / 1e9;
    println!("bench-gpu: {params} parameters, {state_gb:.1} GB of f32 weights, grads and moments");
    assert!(
        state_gb < 40.0,
        "leaves room for activations on an 80 GB H100"
    );
}

#[test]
fn cuda_rules_name_the_device_key() {
    let mut cfg = load("configs/quickstart.yaml");
    assert_eq!(cfg.device, DeviceConfig::Cpu, "cpu is the default");
    assert!(issues_at(&cfg, "device").is_empty());
    cfg.device = DeviceConfig::Cuda(None);
    assert_eq!(issues_at(&cfg, "device").len(), usize::from(!CUDA_BUILT));
    // Every layout runs on CUDA: the distributed paths are backend-generic.
    for (ep, cp) in [(2, 1), (1, 2), (2, 2)] {
        cfg.parallel.ep = ep;
        cfg.parallel.cp = cp;
        cfg.data.batch_size = cfg.data.batch_size.max(2);
        assert_eq!(
            issues_at(&cfg, "device").len(),
            usize::from(!CUDA_BUILT),
            "ep = {ep}, cp = {cp} on CUDA is allowed"
        );
    }
    cfg.parallel.ep = 1;
    cfg.parallel.cp = 1;
    cfg.parallel.dp = 2;
    assert_eq!(
        issues_at(&cfg, "device").len(),
        usize::from(!CUDA_BUILT),
        "data parallelism on CUDA is allowed"
    );
    // An explicit GPU for several ranks is a choice (they share it; `train` says so).
    cfg.device = DeviceConfig::Cuda(Some(0));
    assert_eq!(issues_at(&cfg, "device").len(), usize::from(!CUDA_BUILT));
}

#[test]
fn device_and_precision_parse_strictly() {
    let base = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart.yaml"),
    )
    .unwrap();
    let with = |extra: &str| serde_yaml::from_str::<Config>(&format!("{base}\n{extra}\n"));
    assert_eq!(
        with("device: cuda:2").unwrap().device,
        DeviceConfig::Cuda(Some(2))
    );
    assert_eq!(with("precision: bf16").unwrap().precision, Precision::Bf16);
    let err = with("device: gpu").unwrap_err().to_string();
    assert!(err.contains("expected `cpu`, `cuda`"), "{err}");
    assert!(with("precision: fp16").is_err());
}

/// `nccl` moves GPU memory: with a CPU device it is a config error naming the backend key
/// and both ways out, never a failure at the first collective.
#[test]
fn nccl_with_a_cpu_device_is_refused_naming_the_fix() {
    let mut cfg = load("configs/quickstart.yaml");
    cfg.comm.backend = serde_yaml::from_str("{type: nccl}").unwrap();
    let found = issues_at(&cfg, "comm.backend.type");
    assert!(
        found
            .iter()
            .any(|m| m.contains("device is `cpu`") && m.contains("device: cuda")),
        "{found:?}"
    );
    cfg.device = DeviceConfig::Cuda(None);
    let found = issues_at(&cfg, "comm.backend.type");
    assert!(!found.iter().any(|m| m.contains("device is")), "{found:?}");
}
