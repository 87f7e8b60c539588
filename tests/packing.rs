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

/// `masklm train` with `packing = "documents"`: steps see more documents than unpacked rows
/// hold, and a run stopped at step 6 and resumed to 12 (a fresh sampler finding where step 6
/// starts by packing the lengths before it) reproduces every later loss of an uninterrupted run.
#[test]
fn packed_training_feeds_more_documents_per_step_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_tiny_config(
        dir.path(),
        "[schedule]\ndecay = \"constant\"\nwarmup_steps = 2\n",
    );
    // (The tiny config's [schedule] is replaced: a constant schedule, so that a run of 6
    // steps extended to 12 follows the 12-step run's learning rates.)
    let config_text = std::fs::read_to_string(&config).unwrap();
    let config_text = config_text.replacen("[schedule]\nwarmup_steps = 5\n", "", 1);
    std::fs::write(&config, config_text).unwrap();
    let packed = ["data.packing=\"documents\"", "training.batch_size=4"];
    let whole = dir.path().join("whole");
    common::train_run(&config, &whole, "cpu", 12, &packed);
    let stopped = dir.path().join("stopped");
    common::train_run(&config, &stopped, "cpu", 6, &packed);
    common::masklm_ok([
        "train".as_ref(),
        "--resume".as_ref(),
        stopped.as_os_str(),
        "--set".as_ref(),
        "training.max_steps=12".as_ref(),
    ]);
    let (a, b) = (common::losses(&whole), common::losses(&stopped));
    assert_eq!((a.len(), b.len()), (12, 12));
    for (step, loss) in &a {
        assert!(
            (loss - b[step]).abs() <= 1e-6,
            "step {step}: {loss} uninterrupted vs {} resumed",
            b[step]
        );
    }
    // Documents per step: more than the 4 rows an unpacked step holds.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join("checkpoints/step-0000012/state.json")).unwrap(),
    )
    .unwrap();
    let samples = state["samples_seen"].as_u64().expect("samples_seen");
    assert!(
        samples > 12 * 4,
        "12 packed steps drew only {samples} documents"
    );
}
