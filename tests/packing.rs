//! Packing several documents per row (`[data] packing = "documents"`): a packed row gives each
//! document exactly the logits it gets alone, in every family, on the CPU backend's kernels.
//! (tests/backends.rs checks the same on wgpu and libtorch, where the block-diagonal mask
//! takes the eager and fused attention paths.)

mod common;

use burn::tensor::Device;

#[test]
fn a_packed_row_gives_each_document_its_logits_alone_in_every_family() {
    let device = Device::flex();
    for name in [
        "roberta-tiny",
        "bert-tiny",
        "xlmr-tiny",
        "modernbert-tiny",
        "modernbert-tiny-old",
    ] {
        let model = common::fixture_masked_lm(name, &device);
        let worst = common::assert_packed_rows_equal_documents_alone(&model, &device, name);
        eprintln!("{name}: packed vs alone, largest relative difference {worst:e}");
    }
}

/// A run stopped at step 6 and resumed to 12 (a fresh sampler finding where step 6 starts by
/// drawing the lengths before it) against an uninterrupted run of 12: every loss equal.
/// Returns the uninterrupted run's folder.
fn stop_and_resume_equals_uninterrupted(
    dir: &std::path::Path,
    sets: &[&str],
) -> std::path::PathBuf {
    let config = common::write_tiny_config(dir, "");
    // A constant schedule, so that a run of 6 steps extended to 12 follows the 12-step run's
    // learning rates.
    let config_text = std::fs::read_to_string(&config).unwrap();
    let config_text = config_text.replacen(
        "[schedule]\nwarmup_steps = 5\n",
        "[schedule]\ndecay = \"constant\"\nwarmup_steps = 2\n",
        1,
    );
    std::fs::write(&config, config_text).unwrap();
    let whole = dir.join("whole");
    common::train_run(&config, &whole, "cpu", 12, sets);
    let stopped = dir.join("stopped");
    common::train_run(&config, &stopped, "cpu", 6, sets);
    common::masklm_ok([
        "train".as_ref(),
        "--resume".as_ref(),
        stopped.as_os_str(),
        "--set".as_ref(),
        "training.max_steps=12".as_ref(),
    ]);
    let (a, b) = (common::losses(&whole), common::losses(&stopped));
    assert_eq!((a.len(), b.len()), (12, 12), "{sets:?}");
    for (step, loss) in &a {
        assert!(
            (loss - b[step]).abs() <= 1e-6,
            "{sets:?} step {step}: {loss} uninterrupted vs {} resumed",
            b[step]
        );
    }
    whole
}

fn samples_seen(run: &std::path::Path, step: usize) -> u64 {
    let state = run.join(format!("checkpoints/step-{step:07}/state.json"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    state["samples_seen"].as_u64().expect("samples_seen")
}

/// `masklm train` with `packing = "documents"` draws more documents per step than unpacked
/// rows hold, and resumes exactly.
#[test]
fn packed_training_feeds_more_documents_per_step_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let packed = ["data.packing=\"documents\"", "training.batch_size=4"];
    let whole = stop_and_resume_equals_uninterrupted(dir.path(), &packed);
    let samples = samples_seen(&whole, 12);
    assert!(
        samples > 12 * 4,
        "12 packed steps drew only {samples} documents"
    );
}

/// Batch-size warmup (ModernBERT's `batch_size_warmup_tokens`), unpacked and packed: early
/// steps draw fewer samples, and the run resumes exactly.
#[test]
fn batch_size_warmup_draws_fewer_samples_early_and_resumes_exactly() {
    for (name, packing) in [("line", "line"), ("documents", "documents")] {
        let dir = tempfile::tempdir().unwrap();
        let packing = format!("data.packing=\"{packing}\"");
        let sets = [
            packing.as_str(),
            "training.batch_size=8",
            "training.batch_size_warmup_tokens=2000",
            "training.batch_size_warmup_min_size=2",
        ];
        let whole = stop_and_resume_equals_uninterrupted(dir.path(), &sets);
        let plain = dir.path().join("plain");
        let config = dir.path().join("config.toml");
        common::train_run(
            &config,
            &plain,
            "cpu",
            12,
            &[packing.as_str(), "training.batch_size=8"],
        );
        let (warm, full) = (samples_seen(&whole, 12), samples_seen(&plain, 12));
        assert!(
            warm < full,
            "{name}: warmup drew {warm} samples, no warmup {full}"
        );
    }
}
